"""What only the SQLite back end promises: file format, pragmas, migrations, restarts, URLs."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.store import (
    DeviceRecord,
    DeviceStatus,
    SQLiteStore,
    Store,
    TelemetryRow,
    open_store,
)
from sensorseal.store.sqlite import _statements, migrations

DEV = DeviceRecord(DeviceId(b"\x01" * 12), "d", DeviceStatus.ACTIVE, 1, "standard", 1)


def rows(*seqs: int, dev: DeviceRecord = DEV) -> list[TelemetryRow]:
    return [TelemetryRow(dev.device_id, 1, s, 10, None, "sealed", "r", "http", b"x" * 100)
            for s in seqs]


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


NEWEST = max(v for v, _, _ in migrations())


def test_file_is_wal_with_the_full_schema(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert store.schema_version() == 0
    assert store.migrate() == NEWEST
    store.close()
    conn = raw(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"devices", "device_secrets", "telemetry", "audit", "meta",
            "schema_version"} <= tables
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"audit_at_ms", "audit_reason", "audit_device_id"} <= indexes
    assert conn.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall() == [
        (v, name) for v, name, _ in migrations()]


def test_connection_pragmas(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    try:
        for conn in (store._writer, store._reader):
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        store.close()


def test_migrate_twice_and_across_reopen_applies_once(tmp_path: Path) -> None:
    for _ in range(3):
        store = SQLiteStore(tmp_path / "s.db")
        assert store.migrate() == NEWEST
        assert store.migrate() == NEWEST
        store.close()
    count = raw(tmp_path / "s.db").execute("SELECT count(*) FROM schema_version").fetchone()
    assert count == (len(migrations()),)


def test_migration_failure_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = [(1, "0001_initial.sql", migrations()[0][2]),
              (2, "0002_broken.sql", "CREATE TABLE extra (x INTEGER);\nNOT SQL AT ALL;\n")]
    monkeypatch.setattr("sensorseal.store.sqlite.migrations", lambda: broken)
    store = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(sqlite3.OperationalError):
        store.migrate()
    assert store.schema_version() == 0  # not even migration 1 or the version table stayed
    conn = raw(tmp_path / "s.db")
    assert conn.execute("SELECT name FROM sqlite_master WHERE name IN ('devices', 'extra')"
                        ).fetchall() == []
    monkeypatch.undo()
    assert store.migrate() == NEWEST
    store.close()


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.migrate()
    store.close()
    conn = raw(tmp_path / "s.db")
    conn.execute("INSERT INTO schema_version VALUES (?, '9999_future.sql', 0)", (NEWEST + 1,))
    conn.commit()
    conn.close()
    store = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(ConfigError, match="newer"):
        store.migrate()
    store.close()


def test_statement_splitter() -> None:
    script = ("-- header\nCREATE TABLE a (x TEXT DEFAULT ';');\n\n"
              "CREATE INDEX i ON a (x); -- trailing\n-- end\n")
    assert [s.strip().splitlines()[-1] for s in _statements(script)] == [
        "CREATE TABLE a (x TEXT DEFAULT ';');", "CREATE INDEX i ON a (x); -- trailing"]
    with pytest.raises(ConfigError, match="incomplete"):
        list(_statements("CREATE TABLE b (x)\n"))


def test_replay_truth_survives_a_restart(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.migrate()
    store.add_device(DEV, b"w")
    assert store.record(rows(1, 2, 3)) == [True, True, True]
    store.close()
    again = SQLiteStore(tmp_path / "s.db")
    again.migrate()
    assert again.max_seq(DEV.device_id, 1) == 3
    assert again.record(rows(3, 4, 2)) == [False, True, False]
    assert again.count_telemetry() == 4
    again.close()


def test_two_stores_on_one_file_share_the_replay_truth(tmp_path: Path) -> None:
    """Two workers (two connections) racing on the same keys: each key is stored once."""
    first = SQLiteStore(tmp_path / "s.db")
    first.migrate()
    first.add_device(DEV, b"w")
    second = SQLiteStore(tmp_path / "s.db")
    outcomes: list[list[bool]] = [[], []]
    barrier = threading.Barrier(2)

    def work(store: Store, out: list[bool]) -> None:
        barrier.wait(timeout=10)
        for start in range(0, 3_000, 300):
            out.extend(store.record(rows(*range(start, start + 300))))

    threads = [threading.Thread(target=work, args=(s, o))
               for s, o in zip((first, second), outcomes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes[0]) == len(outcomes[1]) == 3_000
    assert [a != b for a, b in zip(*outcomes, strict=True)] == [True] * 3_000
    assert first.count_telemetry() == 3_000
    first.close()
    second.close()


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.migrate()
    store.close()
    store.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        store.get_meta("x")
    with pytest.raises(ConfigError, match="closed"):
        store.set_meta("x", "y")


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigError, match="cannot use SQLite database"):
        SQLiteStore(tmp_path / "junk.db")
    with pytest.raises(ConfigError, match="cannot open SQLite database"):
        SQLiteStore(tmp_path / "missing-dir" / "x.db")


def test_repr_names_the_file_only(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert repr(store) == f"SQLiteStore({str(tmp_path / 's.db')!r})"
    store.close()


# -- open_store ------------------------------------------------------------------------------

def test_open_store_sqlite_url_and_plain_path(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    store = open_store(f"sqlite:///{db}")
    store.set_meta("k", "v")
    store.close()
    assert db.is_file()
    plain = open_store(str(db))  # the same file, named as a path
    assert plain.get_meta("k") == "v"
    plain.close()


@pytest.mark.parametrize("url", [":memory:", "sqlite://:memory:", "sqlite:///:memory:"])
def test_open_store_in_memory_is_migrated_and_private(url: str) -> None:
    one, two = open_store(url), open_store(url)
    one.add_device(DEV, b"w")
    assert one.get_device(DEV.device_id) == DEV
    assert two.get_device(DEV.device_id) is None
    one.close()
    two.close()


def test_open_store_without_migrate(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "n.db"), migrate=False)
    assert isinstance(store, SQLiteStore) and store.schema_version() == 0
    store.close()


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://u@127.0.0.1:1/db?connect_timeout=2", "cannot connect to PostgreSQL"),
    ("postgres://u@127.0.0.1:1/db?connect_timeout=2", "cannot connect to PostgreSQL"),
    ("mysql://x/y", "unknown store URL scheme"),
    ("sqlite://relative.db", "absolute path"),
    ("", "empty"),
    ("/no/such/dir/for/sensorseal/x.db", "does not exist"),
])
def test_open_store_refuses(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url)
