"""The default store: one SQLite file in WAL mode.

Threading, chosen by measurement (tests/unit/store/bench_store.py): on a shared 2-core machine a
lock around one connection and one connection per thread gave the same throughput, within the
run-to-run noise, for a mixed get_device/record load from 4 threads (the GIL and SQLite's single
writer dominate). The simpler design wins, with one refinement: a file database has one *writer*
connection and one *reader* connection, each behind its own lock, so that a slow console query
(a count over millions of rows) never stalls ingest; WAL lets a reader and a writer work at the
same time. An in-memory database is private to its connection, so there both roles share one
connection and one lock.

`record()` is the hot path. It inserts a whole batch with one `executemany` in one
`BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two processes never deadlock
upgrading a read lock). When SQLite reports as many new rows as the batch has rows (the normal
case: no replay, not even within the batch), every row was stored and no further query is
needed. Otherwise one query reads back the rows inserted by this transaction: exactly those with
an id above the highest id seen at its start, because the write lock is held throughout. In the
same run, record() reaches the speed of a bare sqlite3 `executemany` of the same rows.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.store.base import AuditEvent, DeviceExists, DeviceRecord, DeviceStatus, TelemetryRow

__all__ = ["MEMORY", "SQLiteStore", "migrations"]

MEMORY = ":memory:"
BUSY_TIMEOUT_MS = 10_000

_INSERT_ROW = (
    "INSERT INTO telemetry (device_id, epoch, seq, received_ms, device_ts_ms, level, route,"
    " transport, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_INSERT_EVENT = (
    "INSERT INTO audit (at_ms, reason, transport, source, device_id, detail)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_SELECT_DEVICE = (
    "SELECT id, name, status, epoch, policy, created_ms, last_seen_ms FROM devices"
)
_SELECT_ROW = (
    "SELECT device_id, epoch, seq, received_ms, device_ts_ms, level, route, transport, payload"
    " FROM telemetry"
)
_SELECT_EVENT = "SELECT at_ms, reason, transport, source, device_id, detail FROM audit"

_Key = tuple[bytes, int, int]  # (device_id, epoch, seq)
_row_params = attrgetter("device_id", "epoch", "seq", "received_ms", "device_ts_ms", "level",
                         "route", "transport", "payload")
_device_id = attrgetter("device_id")
_received = attrgetter("received_ms")
_TOUCH_DEVICE = (
    "UPDATE devices SET last_seen_ms = max(coalesce(last_seen_ms, ?), ?) WHERE id = ?"
)
_TOUCH_NEW_ROWS = (
    "UPDATE devices SET last_seen_ms = max(coalesce(last_seen_ms, new.at), new.at)"
    " FROM (SELECT device_id, max(received_ms) AS at FROM telemetry NOT INDEXED WHERE id > ?"
    " GROUP BY device_id) AS new WHERE devices.id = new.device_id"
)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every bundled migration, in order (files `NNNN_name.sql`)."""
    found = []
    for entry in files("sensorseal.store").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    # Numbers are unique and increasing; gaps are allowed (features reserve their numbers).
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise ConfigError(f"store migrations must have unique positive numbers: {versions}")
    return found


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    buf: list[str] = []
    for line in script.splitlines(keepends=True):
        buf.append(line)
        text = "".join(buf)
        if sqlite3.complete_statement(text):
            if text.strip():
                yield text
            buf = []
    leftover = [ln for ln in buf if ln.strip() and not ln.lstrip().startswith("--")]
    if leftover:
        raise ConfigError("store migration ends with an incomplete statement")


# sqlite3 rows are untyped tuples; these three functions are where they become domain values.

def _device(row: Any) -> DeviceRecord:
    dev_id, name, status, epoch, policy, created_ms, last_seen_ms = row
    return DeviceRecord(DeviceId(dev_id), name, DeviceStatus(status), epoch, policy, created_ms,
                        last_seen_ms)


def _telemetry(row: Any) -> TelemetryRow:
    return TelemetryRow(DeviceId(row[0]), *row[1:])


def _event(row: Any) -> AuditEvent:
    return AuditEvent(*row)


class SQLiteStore:
    """`Store` on one SQLite database file (or `":memory:"` for tests)."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._memory = self._path == MEMORY
        self._closed = False
        self._writer = self._connect()
        self._write_lock = threading.Lock()
        if self._memory:
            self._reader, self._read_lock = self._writer, self._write_lock
        else:
            try:
                self._reader = self._connect()
            except BaseException:
                self._writer.close()
                raise
            self._read_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r})"

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open SQLite database {self._path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self._memory:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ConfigError(f"SQLite database {self._path} refuses WAL mode ({mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:  # e.g. "file is not a database"
            conn.close()
            raise ConfigError(f"cannot use SQLite database {self._path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction on the writer connection; rolled back on any error."""
        with self._write_lock:
            self._check_open()
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            self._check_open()
            yield self._reader

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the store is closed")

    # -- lifecycle -------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply missing migrations in one transaction; idempotent; returns the version."""
        available = migrations()
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                         " applied_ms INTEGER NOT NULL)")
            applied = {int(v) for (v,) in conn.execute("SELECT version FROM schema_version")}
            newest = max(applied, default=0)
            known = max((v for v, _, _ in available), default=0)
            if newest > known:
                raise ConfigError(f"database schema version {newest} is newer than this "
                                  f"sensorseal (knows up to {known}); upgrade sensorseal")
            for version, name, sql in available:
                if version in applied:
                    continue
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, name, applied_ms)"
                             " VALUES (?, ?, ?)", (version, name, int(time.time() * 1000)))
        return known

    def schema_version(self) -> int:
        """The newest applied migration, 0 for an empty database."""
        with self._read() as conn:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                  " AND name = 'schema_version'").fetchone()
            if exists is None:
                return 0
            (version,) = conn.execute("SELECT coalesce(max(version), 0)"
                                      " FROM schema_version").fetchone()
            return int(version)

    def close(self) -> None:
        """Close both connections; idempotent. Later calls raise ConfigError."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        if not self._memory:
            with self._read_lock:
                self._reader.close()

    # -- registry --------------------------------------------------------------------------

    def add_device(self, record: DeviceRecord, wrapped_secret: bytes) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO devices (id, name, status, epoch, policy, created_ms,"
                             " last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (bytes(record.device_id), record.name, record.status.value,
                              record.epoch, record.policy, record.created_ms,
                              record.last_seen_ms))
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise DeviceExists(f"device {record.device_id} exists") from None
                raise ConfigError(f"invalid device record: {exc}") from None
            conn.execute("INSERT INTO device_secrets (device_id, epoch, wrapped, created_ms)"
                         " VALUES (?, ?, ?, ?)",
                         (bytes(record.device_id), record.epoch, wrapped_secret,
                          record.created_ms))

    def get_device(self, device_id: DeviceId) -> DeviceRecord | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_DEVICE + " WHERE id = ?",
                               (bytes(device_id),)).fetchone()
        return None if row is None else _device(row)

    def list_devices(self, *, limit: int = 1000, offset: int = 0) -> list[DeviceRecord]:
        """Oldest first (creation time, then id), so that paging is stable."""
        with self._read() as conn:
            rows = conn.execute(_SELECT_DEVICE + " ORDER BY created_ms, id LIMIT ? OFFSET ?",
                                (limit, offset)).fetchall()
        return [_device(r) for r in rows]

    def rename_device(self, device_id: DeviceId, name: str) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE devices SET name = ? WHERE id = ?",
                               (name, bytes(device_id)))
            return cur.rowcount == 1

    def set_status(self, device_id: DeviceId, status: DeviceStatus) -> bool:
        """Revoked is final: revoking again is a no-op, any other change raises ConfigError."""
        status = DeviceStatus(status)
        with self._write() as conn:
            row = conn.execute("SELECT status FROM devices WHERE id = ?",
                               (bytes(device_id),)).fetchone()
            if row is None:
                return False
            if row[0] == DeviceStatus.REVOKED.value and status is not DeviceStatus.REVOKED:
                raise ConfigError(f"device {device_id} is revoked; its status cannot change")
            conn.execute("UPDATE devices SET status = ? WHERE id = ?",
                         (status.value, bytes(device_id)))
            return True

    def get_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        with self._read() as conn:
            row = conn.execute("SELECT wrapped FROM device_secrets WHERE device_id = ?"
                               " AND epoch = ?", (bytes(device_id), epoch)).fetchone()
        return None if row is None else bytes(row[0])

    # -- telemetry and replay truth --------------------------------------------------------

    def record(self, rows: Sequence[TelemetryRow], events: Sequence[AuditEvent] = ()) -> list[bool]:
        # attrgetter builds each parameter tuple in C, in column order (DeviceId binds as a blob)
        params = list(map(_row_params, rows))
        with self._write() as conn:
            stored: list[bool] = []
            if params:
                (top,) = conn.execute("SELECT coalesce(max(id), 0) FROM telemetry").fetchone()
                try:
                    inserted = conn.executemany(_INSERT_ROW, params).rowcount
                except sqlite3.IntegrityError as exc:
                    raise ConfigError(f"record(): row of an unknown device ({exc})") from None
                # last_seen_ms moves forward only, and only for stored rows: a replay is no
                # sign of life (anyone can resend an old message).
                if inserted == len(params):
                    stored = [True] * len(params)  # no replay, not even inside the batch
                    # newest arrival per device: sort by time, the last write per key wins
                    latest = dict(sorted(zip(map(_device_id, rows), map(_received, rows),
                                             strict=True), key=itemgetter(1)))
                    conn.executemany(_TOUCH_DEVICE, [(at, at, dev) for dev, at in latest.items()])
                else:
                    stored = self._which_are_new(conn, params, top)
                    conn.execute(_TOUCH_NEW_ROWS, (top,))  # the rows above `top` are the new ones
            if events:
                conn.executemany(_INSERT_EVENT, [_event_params(e) for e in events])
        return stored

    @staticmethod
    def _which_are_new(conn: sqlite3.Connection, params: list[Any], top: int) -> list[bool]:
        """Slow path (the batch held replays): the rows stored are those with an id above
        `top`; within the batch, the first occurrence of a key is the one that was stored."""
        new: set[_Key] = set(conn.execute("SELECT device_id, epoch, seq FROM telemetry"
                                          " WHERE id > ?", (top,)))
        stored = []
        for p in params:
            key = (bytes(p[0]), p[1], p[2])
            if key in new:
                new.discard(key)
                stored.append(True)
            else:
                stored.append(False)
        return stored

    def max_seq(self, device_id: DeviceId, epoch: int) -> int | None:
        with self._read() as conn:
            (top,) = conn.execute("SELECT max(seq) FROM telemetry WHERE device_id = ?"
                                  " AND epoch = ?", (bytes(device_id), epoch)).fetchone()
        return None if top is None else int(top)

    def telemetry(self, *, device_id: DeviceId | None = None,
                  limit: int = 100) -> list[TelemetryRow]:
        """Newest first: by arrival overall; per device by (epoch, seq), which the unique index
        serves without a sort (a device's counter only moves forward)."""
        with self._read() as conn:
            if device_id is None:
                rows = conn.execute(_SELECT_ROW + " ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
            else:
                rows = conn.execute(_SELECT_ROW + " WHERE device_id = ?"
                                    " ORDER BY epoch DESC, seq DESC LIMIT ?",
                                    (bytes(device_id), limit)).fetchall()
        return [_telemetry(r) for r in rows]

    def count_telemetry(self, device_id: DeviceId | None = None) -> int:
        with self._read() as conn:
            if device_id is None:
                (n,) = conn.execute("SELECT count(*) FROM telemetry").fetchone()
            else:
                (n,) = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = ?",
                                    (bytes(device_id),)).fetchone()
        return int(n)

    # -- audit -----------------------------------------------------------------------------

    def add_events(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        with self._write() as conn:
            conn.executemany(_INSERT_EVENT, [_event_params(e) for e in events])

    def events(self, *, reason: str | None = None, device_id: str | None = None,
               since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        where: list[str] = []
        args: list[object] = []
        if reason is not None:
            where.append("reason = ?")
            args.append(reason)
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if since_ms is not None:
            where.append("at_ms >= ?")
            args.append(since_ms)
        sql = _SELECT_EVENT
        if where:  # only the constant fragments above are joined; values are bound
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at_ms DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [_event(r) for r in rows]

    def count_events_by_reason(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute("SELECT reason, count(*) FROM audit GROUP BY reason"
                                " ORDER BY reason").fetchall()
        return {str(reason): int(n) for reason, n in rows}

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _event_params(e: AuditEvent) -> tuple[object, ...]:
    return (e.at_ms, e.reason, e.transport, e.source, e.device_id, e.detail)
