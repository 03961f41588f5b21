"""Alembic environment: the service's models are the target; `store.migrate` passes the URL."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from service.store import Base

config = context.config


def run_migrations_online() -> None:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Batch mode: SQLite alters tables by copying them; PostgreSQL runs plain ALTERs.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
