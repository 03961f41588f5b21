"""The store on SQLite and on a real PostgreSQL server (pgserver: PostgreSQL's own binaries,
started on a private socket): the same migrations, the same constraints."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service import store
from service.store import Job, Kind, Status


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'raysft.db'}"
    url = request.getfixturevalue("postgres_url")
    engine = store.make_engine(url)
    with engine.begin() as connection:  # each test starts from an empty database
        connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url


@pytest.fixture
def sessions(url):
    store.migrate(url)
    engine = store.make_engine(url)
    yield store.session_factory(engine)
    engine.dispose()


def test_migrations_build_exactly_the_models_schema(url, sessions):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = store.make_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), store.Base.metadata)
    engine.dispose()
    assert diff == []
    store.migrate(url)  # idempotent: already at head


@pytest.mark.integration
@pytest.mark.parametrize("url", ["postgresql"], indirect=True)  # SQLite is a one-replica install
def test_replicas_starting_together_migrate_and_bootstrap_once(url):
    """Four API replicas start at once, as in a Deployment's rollout: each process migrates and
    adds the bootstrap key. An advisory lock serialises the migrations; a replica that loses the
    race for the key's rows retries and finds them."""
    replica = ("import sys; from service import store; url = sys.argv[1]; store.migrate(url); "
               "s = store.session_factory(store.make_engine(url))(); store.create_api_key(s, 'admin', 'k-boot')")
    processes = [subprocess.Popen([sys.executable, "-c", replica, url], stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr[-3000:]
    engine = store.make_engine(url)
    with store.session_factory(engine)() as session:
        assert store.tenant_for_key(session, "k-boot") == "admin"
        assert len(session.scalars(select(store.ApiKey)).all()) == 1
    engine.dispose()


def job(tenant="acme", **fields) -> Job:
    return Job(**{"tenant_id": tenant, "kind": Kind.DATASET, "status": Status.QUEUED, "spec": {"name": "x"},
                  "request_hash": "h"} | fields)


def test_keys_are_stored_hashed_and_map_to_their_tenant(sessions):
    with sessions() as session:
        key = store.create_api_key(session, "acme")
        assert store.tenant_for_key(session, key) == "acme"
        assert store.tenant_for_key(session, key + "x") is None
        stored = session.scalars(select(store.ApiKey.key_hash)).all()
    assert key not in stored and store.hash_key(key) in stored


def test_one_job_per_tenant_and_idempotency_key(sessions):
    with sessions() as session:
        store.create_api_key(session, "acme")
        store.create_api_key(session, "globex")
        session.add_all([job(idempotency_key="k"), job(tenant="globex", idempotency_key="k"), job(), job()])
        session.commit()
        session.add(job(idempotency_key="k"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_one_training_per_pipeline(sessions):
    with sessions() as session:
        store.create_api_key(session, "acme")
        parent = job()
        parent.kind = Kind.PIPELINE
        session.add(parent)
        session.commit()
        session.add(job(parent_id=parent.id, submission_id="a"))
        session.commit()
        session.add(job(parent_id=parent.id, submission_id="b"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_statuses_and_spec_round_trip(sessions):
    with sessions() as session:
        store.create_api_key(session, "acme")
        record = job(spec={"name": "x", "sources": [{"uri": "s3://b/k", "weight": 0.5}]})
        session.add(record)
        session.commit()
        record.finish(Status.LOST, "gone")
        session.commit()
    with sessions() as session:
        loaded = session.get(Job, record.id)
        assert loaded.status is Status.LOST and loaded.status.is_terminal and loaded.error == "gone"
        assert loaded.spec["sources"][0]["weight"] == 0.5 and loaded.finished_at is not None


def test_fine_tuning_jobs_are_filtered_by_their_metadata_in_sql(sessions):
    tagged = [None, {"team": "support", "run": "a b&c"}, {"team": "sales", "empty": ""}, {}]
    with sessions() as session:
        store.create_api_key(session, "acme")
        session.add_all([job(kind=Kind.PIPELINE, request_hash=f"h{i}", idempotency_key=f"k{i}",
                             fine_tuning={"model": "tiny", "metadata": metadata}) for i, metadata in enumerate(tagged)])
        session.commit()

    def matching(wanted) -> list:
        with sessions() as session:
            found = session.scalars(select(Job).where(store.metadata_matches(wanted))).all()
            return sorted(tagged.index(j.fine_tuning["metadata"]) for j in found)

    assert matching({"team": "support"}) == matching({"team": "support", "run": "a b&c"}) == [1]
    assert matching({"team": "sales", "empty": ""}) == [2] and matching({"empty": ""}) == [2]
    assert matching({"team": "support", "run": "a"}) == matching({"team": ""}) == matching({"absent": "x"}) == []
    assert matching("null") == [0, 3]  # created without metadata, or with none in it
