"""What only the PostgreSQL back end promises: URLs, migrations shared with SQLite's numbering,
bulk provisioning, concurrent upgrades, and recovery after its connections are cut.

Runs against a fresh database with a random name on the machine's PostgreSQL (see
tests/pg_support.py); skipped with the reason when it is unreachable, failed under CI=true.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pg_support
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.store import (
    DeviceExists,
    DeviceRecord,
    DeviceStatus,
    TelemetryRow,
    open_store,
)
from sensorseal.store import sqlite as sqlite_store
from sensorseal.store.postgres import PostgresStore, migrations, redact_url


@pytest.fixture
def pg_url() -> Iterator[str]:
    pg_support.require_postgres()
    with pg_support.fresh_database() as url:
        yield url


def rec(n: int) -> DeviceRecord:
    return DeviceRecord(DeviceId(n.to_bytes(12, "big")), f"d{n}", DeviceStatus.ACTIVE, 1,
                        "standard", 1_000 + n)


def rows(dev: DeviceRecord, *seqs: int) -> list[TelemetryRow]:
    return [TelemetryRow(dev.device_id, 1, s, 10, None, "sealed", "r", "http", b"x") for s in seqs]


def test_migration_numbers_match_sqlite() -> None:
    """One schema version means one schema on both back ends."""
    pg = [(v, name) for v, name, _ in migrations()]
    lite = [(v, name) for v, name, _ in sqlite_store.migrations()]
    assert pg == lite


def test_open_store_url_migrates(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema_version() == max(v for v, _, _ in migrations())
        assert store.migrate() == store.schema_version()
    finally:
        store.close()
    with pytest.raises(ConfigError, match="closed"):
        store.get_meta("x")


def test_unmigrated_database_reports_version_zero(pg_url: str) -> None:
    store = open_store(pg_url, migrate=False)
    try:
        assert store.schema_version() == 0  # type: ignore[attr-defined]
    finally:
        store.close()


def test_concurrent_upgrades_apply_once(pg_url: str) -> None:
    """Workers starting together all migrate at open: the advisory lock makes it one upgrade."""
    stores = [PostgresStore(pg_url, pool_size=1) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def up(s: PostgresStore) -> None:
        try:
            barrier.wait(5)
            s.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=up, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors
        with psycopg.connect(pg_url) as conn:
            versions = [v for (v,) in conn.execute("SELECT version FROM schema_version")]
        assert sorted(versions) == [v for v, _, _ in migrations()]
    finally:
        for s in stores:
            s.close()


def test_newer_schema_is_refused(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_version VALUES (9999, 'future', 0)")
        with pytest.raises(ConfigError, match="newer"):
            store.migrate()
    finally:
        store.close()


def test_bulk_add_devices(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        store.migrate()
        items = [(rec(n), b"w%d" % n) for n in range(1, 2_001)]
        store.add_devices(items)
        assert store.get_device(rec(1_500).device_id) == rec(1_500)
        assert store.get_secret(rec(2_000).device_id, 1) == b"w2000"
        with pytest.raises(DeviceExists):
            store.add_devices([(rec(2_001), b"new"), (rec(7), b"clash")])
        assert store.get_device(rec(2_001).device_id) is None  # all or nothing
        store.add_devices([])
    finally:
        store.close()


def test_two_pools_share_the_replay_truth(pg_url: str) -> None:
    """Two stores (as in two worker processes) racing on the same keys store each once."""
    one, two = PostgresStore(pg_url, pool_size=2), PostgresStore(pg_url, pool_size=2)
    try:
        one.migrate()
        dev = rec(1)
        one.add_device(dev, b"w")
        out: dict[int, list[bool]] = {0: [], 1: []}
        barrier = threading.Barrier(2)

        def work(k: int, store: PostgresStore) -> None:
            barrier.wait(5)
            for start in range(0, 1_000, 50):
                seqs = list(range(start, start + 50))
                if k:
                    seqs.reverse()  # opposite order: the deadlock-prone case
                out[k].extend(store.record(rows(dev, *seqs)))

        threads = [threading.Thread(target=work, args=(k, s)) for k, s in ((0, one), (1, two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(out[0]) + sum(out[1]) == 1_000
        assert one.count_telemetry() == 1_000
    finally:
        one.close()
        two.close()


def test_recovers_after_connections_are_cut(pg_url: str) -> None:
    """What a database restart does to a worker: every pooled connection dies. The call that
    meets a dead connection fails (the pipeline then answers 503 / withholds the PUBACK); the
    pool replaces the connection and later calls work without any restart of ours."""
    store = PostgresStore(pg_url, pool_size=2)
    try:
        store.migrate()
        dev = rec(1)
        store.add_device(dev, b"w")
        assert store.record(rows(dev, 1)) == [True]
        dbname = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_support.ADMIN_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        failures = 0
        for seq in range(2, 12):
            try:
                store.record(rows(dev, seq))
            except psycopg.OperationalError:
                failures += 1
        assert failures <= 2  # at most one per pooled connection
        assert store.count_telemetry() == 11 - failures
        assert store.record(rows(dev, 100)) == [True]
    finally:
        store.close()


def test_url_password_is_never_shown() -> None:
    url = "postgresql://ingest:s3cret-pw@db.example:5433/sensorseal"
    assert "s3cret" not in redact_url(url)
    assert redact_url(url) == "postgresql://ingest:***@db.example:5433/sensorseal"
    with pytest.raises(ConfigError) as info:
        PostgresStore("postgresql://ingest:s3cret-pw@127.0.0.1:1/x", connect_timeout_s=1)
    assert "s3cret" not in str(info.value)


def test_insert_mode_is_checked() -> None:
    with pytest.raises(ConfigError, match="insert mode"):
        PostgresStore("postgresql://127.0.0.1:1/x", insert_mode="bulk")  # type: ignore[arg-type]


@pytest.mark.skipif(os.environ.get("SENSORSEAL_DATABASE_URL") is not None,
                    reason="the environment already names a database")
def test_datadir_uses_database_url(pg_url: str, tmp_path: Path) -> None:
    from sensorseal.datadir import DataDir

    env = {"SENSORSEAL_DATABASE_URL": pg_url}
    data = DataDir(tmp_path / "d", env=env)
    assert not data.is_initialized()
    token = data.init()
    assert data.is_initialized() and not data.db_path.exists()  # no SQLite file
    store, _ = data.open()
    try:
        assert isinstance(store, PostgresStore)
    finally:
        store.close()
    assert data.check_token(token)
    with pytest.raises(ConfigError, match="already initialized"):
        DataDir(tmp_path / "other", env=env).init()
