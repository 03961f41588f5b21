"""Alembic environment: the service's models are the target; `store.migrate` passes the URL."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from service.store import Base

config = context.config
MIGRATION_LOCK = 0x7261797366  # "raysf": any constant shared by every replica


def run_migrations_online() -> None:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Batch mode: SQLite alters tables by copying them; PostgreSQL runs plain ALTERs.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Replicas starting together migrate one after the other; the later ones then
                # find the schema current. The lock ends with the transaction.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()


run_migrations_online()
