"""The store for more than one machine: PostgreSQL through psycopg 3 and a connection pool.

Several ingest workers (processes, possibly on several hosts) share one database. What they
share through it is the replay truth: UNIQUE (device_id, epoch, seq) on telemetry. A batch is
written as ONE statement in ONE transaction:

    INSERT INTO telemetry (...) SELECT ... FROM unnest(<one array per column>) WITH ORDINALITY
        ORDER BY ord ON CONFLICT DO NOTHING RETURNING device_id, epoch, seq

Two workers racing on the same key cannot both store it: the second waits on the first's
transaction and then skips the row, and RETURNING tells each which rows were its own. Within a
batch the ORDER BY keeps arrival order, so the first copy of a key is the one stored (the same
rule as SQLiteStore). `insert_mode="copy"` is the alternative measured by benchmarks/scale.py:
COPY into a per-connection temporary table, then the same INSERT ... SELECT from it. On this
machine (2 cores, loopback, 1,000-row batches of 100-byte payloads) the single unnest statement
was faster, so it is the default; see docs/benchmarks.md for the figures.

`last_seen_ms` is moved forward in the same transaction, for stored rows only. Device rows are
updated in id order and a transaction that still meets a deadlock (PostgreSQL aborts one of two
transactions that wait on each other, e.g. two workers storing redelivered copies of the same
messages in different orders) is retried from the start: nothing of it was committed.

Connection loss (a database restart) surfaces as psycopg.OperationalError from the failing call;
the pool drops broken connections and opens new ones, so the next call works again once the
server is back. The ingest pipeline turns the failure into IngestUnavailable: HTTP 503, MQTT
no PUBACK, and the sender retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from operator import attrgetter
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.store.base import AuditEvent, DeviceExists, DeviceRecord, DeviceStatus, TelemetryRow
from sensorseal.store.postgres_features import PostgresFeatures, reads_retry

__all__ = ["DEFAULT_POOL_SIZE", "PostgresStore", "migrations", "reads_retry", "redact_url"]

DEFAULT_POOL_SIZE = 8
CONNECT_TIMEOUT_S = 10.0
DEADLOCK_RETRIES = 5
InsertMode = Literal["unnest", "copy"]
# Serialises schema upgrades of workers that start at the same time (any constant will do; this
# one is "sensorseal" in ASCII, truncated to 63 bits).
_MIGRATION_LOCK = 0x73656E736F727365

_INSERT_UNNEST = (  # column lists spelled out: no query text is ever built from values
    "INSERT INTO telemetry (device_id, epoch, seq, received_ms, device_ts_ms, level, route,"
    " transport, payload) SELECT device_id, epoch, seq, received_ms, device_ts_ms, level, route,"
    " transport, payload FROM unnest(%b::bytea[], %b::int4[], %b::int8[], %b::int8[],"
    " %b::int8[], %b::text[], %b::text[], %b::text[], %b::bytea[]) WITH ORDINALITY"
    " AS t(device_id, epoch, seq, received_ms, device_ts_ms, level, route, transport, payload,"
    " ord) ORDER BY ord ON CONFLICT DO NOTHING RETURNING device_id, epoch, seq"
)
_STAGE_TABLE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS telemetry_stage (ord int4, device_id bytea,"
    " epoch int4, seq int8, received_ms int8, device_ts_ms int8, level text, route text,"
    " transport text, payload bytea) ON COMMIT DELETE ROWS"
)
_COPY_STAGE = (
    "COPY telemetry_stage (ord, device_id, epoch, seq, received_ms, device_ts_ms, level, route,"
    " transport, payload) FROM STDIN (FORMAT BINARY)"
)
_STAGE_TYPES = ["int4", "bytea", "int4", "int8", "int8", "int8", "text", "text", "text", "bytea"]
_INSERT_STAGED = (
    "INSERT INTO telemetry (device_id, epoch, seq, received_ms, device_ts_ms, level, route,"
    " transport, payload) SELECT device_id, epoch, seq, received_ms, device_ts_ms, level, route,"
    " transport, payload FROM telemetry_stage ORDER BY ord"
    " ON CONFLICT DO NOTHING RETURNING device_id, epoch, seq"
)
_TOUCH_DEVICES = (
    "UPDATE devices AS d SET last_seen_ms = greatest(coalesce(d.last_seen_ms, n.at), n.at)"
    " FROM unnest(%b::bytea[], %b::int8[]) AS n(id, at) WHERE d.id = n.id"
)
_LOCK_DEVICES = (
    "SELECT 1 FROM devices WHERE id = ANY(%b::bytea[]) ORDER BY id FOR NO KEY UPDATE"
)
_INSERT_EVENTS = (
    "INSERT INTO audit (at_ms, reason, transport, source, device_id, detail)"
    " SELECT * FROM unnest(%b::int8[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[])"
)
_SELECT_DEVICE = "SELECT id, name, status, epoch, policy, created_ms, last_seen_ms FROM devices"
_SELECT_ROW = (
    "SELECT device_id, epoch, seq, received_ms, device_ts_ms, level, route, transport, payload"
    " FROM telemetry"
)
_SELECT_EVENT = "SELECT at_ms, reason, transport, source, device_id, detail FROM audit"

_Key = tuple[bytes, int, int]
_row_params = attrgetter("device_id", "epoch", "seq", "received_ms", "device_ts_ms", "level",
                         "route", "transport", "payload")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every PostgreSQL migration, in order. The numbers are those of
    the SQLite migrations (store/migrations/): one schema version means one schema."""
    found = []
    for entry in files("sensorseal.store").joinpath("migrations_pg").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise ConfigError(f"PostgreSQL migrations must have unique positive numbers: {versions}")
    return found


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _device(row: Any) -> DeviceRecord:
    dev_id, name, status, epoch, policy, created_ms, last_seen_ms = row
    return DeviceRecord(DeviceId(bytes(dev_id)), name, DeviceStatus(status), epoch, policy,
                        created_ms, last_seen_ms)


def _telemetry(row: Any) -> TelemetryRow:
    return TelemetryRow(DeviceId(bytes(row[0])), row[1], row[2], row[3], row[4], row[5], row[6],
                        row[7], bytes(row[8]))


class PostgresStore(PostgresFeatures):
    """`Store` on a PostgreSQL database named by a `postgresql://` URL (libpq syntax), with
    the console, key lifecycle, compat and gateway protocols (postgres_features.py)."""

    def __init__(self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
                 insert_mode: InsertMode = "unnest",
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if insert_mode not in ("unnest", "copy"):
            raise ConfigError(f"unknown insert mode {insert_mode!r}")
        self._shown = redact_url(url)
        self._insert_mode = insert_mode
        self._closed = False
        self._close_lock = threading.Lock()
        self._pool = ConnectionPool(url, min_size=1, max_size=max(1, pool_size), open=False,
                                    timeout=connect_timeout_s, name="sensorseal",
                                    kwargs={"autocommit": True,
                                            "connect_timeout": max(1, int(connect_timeout_s))})
        try:
            # One direct attempt first: a refused or misnamed server fails at once with a
            # clear message, instead of after the pool's whole wait.
            psycopg.connect(url, connect_timeout=max(1, int(connect_timeout_s))).close()
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise ConfigError(f"cannot connect to PostgreSQL at {self._shown}: "
                              f"{type(exc).__name__}") from None

    def __repr__(self) -> str:
        return f"PostgresStore({self._shown!r})"

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        if self._closed:
            raise ConfigError("the store is closed")
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction; rolled back on any error (the pool also discards a broken conn)."""
        with self._conn() as conn, conn.transaction():
            yield conn

    # -- lifecycle -------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply missing migrations in one transaction, under an advisory lock so that
        workers starting together upgrade once; idempotent; returns the version."""
        available = migrations()
        known = max((v for v, _, _ in available), default=0)
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                         " applied_ms BIGINT NOT NULL)")
            applied = {int(v) for (v,) in conn.execute("SELECT version FROM schema_version")}
            newest = max(applied, default=0)
            if newest > known:
                raise ConfigError(f"database schema version {newest} is newer than this "
                                  f"sensorseal (knows up to {known}); upgrade sensorseal")
            for version, name, sql in available:
                if version in applied:
                    continue
                conn.execute(sql.encode("utf-8"))  # a whole script: simple query protocol
                conn.execute("INSERT INTO schema_version (version, name, applied_ms)"
                             " VALUES (%s, %s, %s)", (version, name, int(time.time() * 1000)))
        return known

    @reads_retry
    def schema_version(self) -> int:
        with self._conn() as conn:
            exists = conn.execute("SELECT to_regclass('schema_version')").fetchone()
            if exists is None or exists[0] is None:
                return 0
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()

    # -- registry --------------------------------------------------------------------------

    def add_device(self, record: DeviceRecord, wrapped_secret: bytes) -> None:
        try:
            with self._tx() as conn:
                conn.execute("INSERT INTO devices (id, name, status, epoch, policy, created_ms,"
                             " last_seen_ms) VALUES (%b, %s, %s, %s, %s, %s, %s)",
                             (bytes(record.device_id), record.name, record.status.value,
                              record.epoch, record.policy, record.created_ms,
                              record.last_seen_ms))
                conn.execute("INSERT INTO device_secrets (device_id, epoch, wrapped, created_ms)"
                             " VALUES (%b, %s, %b, %s)",
                             (bytes(record.device_id), record.epoch, wrapped_secret,
                              record.created_ms))
        except pg_errors.UniqueViolation:
            raise DeviceExists(f"device {record.device_id} exists") from None
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"invalid device record ({type(exc).__name__})") from None

    def add_devices(self, items: Sequence[tuple[DeviceRecord, bytes]]) -> None:
        """Bulk provisioning: many devices in one transaction through COPY (all or none).
        Raises DeviceExists if any id exists."""
        if not items:
            return
        try:
            with self._tx() as conn, conn.cursor() as cur:
                with cur.copy("COPY devices (id, name, status, epoch, policy, created_ms,"
                              " last_seen_ms) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["bytea", "text", "text", "int4", "text", "int8", "int8"])
                    for rec, _ in items:
                        copy.write_row((bytes(rec.device_id), rec.name, rec.status.value,
                                        rec.epoch, rec.policy, rec.created_ms, rec.last_seen_ms))
                with cur.copy("COPY device_secrets (device_id, epoch, wrapped, created_ms)"
                              " FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["bytea", "int4", "bytea", "int8"])
                    for rec, wrapped in items:
                        copy.write_row((bytes(rec.device_id), rec.epoch, wrapped,
                                        rec.created_ms))
        except pg_errors.UniqueViolation:
            raise DeviceExists("a device in the batch exists") from None
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"invalid device record ({type(exc).__name__})") from None

    @reads_retry
    def get_device(self, device_id: DeviceId) -> DeviceRecord | None:
        with self._conn() as conn:
            row = conn.execute(_SELECT_DEVICE + " WHERE id = %b", (bytes(device_id),)).fetchone()
        return None if row is None else _device(row)

    @reads_retry
    def list_devices(self, *, limit: int = 1000, offset: int = 0) -> list[DeviceRecord]:
        """Oldest first (creation time, then id), so that paging is stable."""
        with self._conn() as conn:
            rows = conn.execute(_SELECT_DEVICE + " ORDER BY created_ms, id LIMIT %s OFFSET %s",
                                (limit, offset)).fetchall()
        return [_device(r) for r in rows]

    def rename_device(self, device_id: DeviceId, name: str) -> bool:
        with self._tx() as conn:
            cur = conn.execute("UPDATE devices SET name = %s WHERE id = %b",
                               (name, bytes(device_id)))
            return cur.rowcount == 1

    def set_status(self, device_id: DeviceId, status: DeviceStatus) -> bool:
        """Revoked is final: revoking again is a no-op, any other change raises ConfigError."""
        status = DeviceStatus(status)
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM devices WHERE id = %b FOR UPDATE",
                               (bytes(device_id),)).fetchone()
            if row is None:
                return False
            if row[0] == DeviceStatus.REVOKED.value and status is not DeviceStatus.REVOKED:
                raise ConfigError(f"device {device_id} is revoked; its status cannot change")
            conn.execute("UPDATE devices SET status = %s WHERE id = %b",
                         (status.value, bytes(device_id)))
            return True

    @reads_retry
    def get_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        with self._conn() as conn:
            row = conn.execute("SELECT wrapped FROM device_secrets WHERE device_id = %b"
                               " AND epoch = %s", (bytes(device_id), epoch)).fetchone()
        return None if row is None else bytes(row[0])

    # -- telemetry and replay truth --------------------------------------------------------

    def record(self, rows: Sequence[TelemetryRow], events: Sequence[AuditEvent] = ()) -> list[bool]:
        params = list(map(_row_params, rows))
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                with self._tx() as conn:
                    stored = self._insert_rows(conn, params) if params else []
                    if events:
                        self._insert_events(conn, events)
                return stored
            except pg_errors.ForeignKeyViolation:
                raise ConfigError("record(): row of an unknown device") from None
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == DEADLOCK_RETRIES:
                    raise
                time.sleep(0.005 * (attempt + 1))  # nothing was committed: try again
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_rows(self, conn: psycopg.Connection[Any], params: list[Any]) -> list[bool]:
        if self._insert_mode == "copy":
            conn.execute(_STAGE_TABLE)
            with conn.cursor() as cur:
                with cur.copy(_COPY_STAGE) as copy:
                    copy.set_types(_STAGE_TYPES)
                    for n, p in enumerate(params):
                        copy.write_row((n, *p))
                new = cur.execute(_INSERT_STAGED).fetchall()
        else:
            columns = [list(c) for c in zip(*params, strict=True)]
            columns[0] = [bytes(d) for d in columns[0]]
            new = conn.execute(_INSERT_UNNEST, columns).fetchall()
        if len(new) == len(params):
            stored = [True] * len(params)  # no replay, not even inside the batch
            fresh = params
        else:
            stored = _first_copies(params, {(bytes(d), e, s) for d, e, s in new})
            fresh = [p for p, ok in zip(params, stored, strict=True) if ok]
        if fresh:
            # last_seen_ms moves forward only, and only for stored rows: a replay is no sign of
            # life. Rows are locked in id order so that two batches never wait on each other.
            latest: dict[bytes, int] = {}
            for p in fresh:
                dev, at = bytes(p[0]), p[3]
                if latest.get(dev, -1) < at:
                    latest[dev] = at
            ids = sorted(latest)
            conn.execute(_LOCK_DEVICES, (ids,))
            conn.execute(_TOUCH_DEVICES, (ids, [latest[i] for i in ids]))
        return stored

    @staticmethod
    def _insert_events(conn: psycopg.Connection[Any], events: Sequence[AuditEvent]) -> None:
        conn.execute(_INSERT_EVENTS, ([e.at_ms for e in events], [e.reason for e in events],
                                      [e.transport for e in events], [e.source for e in events],
                                      [e.device_id for e in events], [e.detail for e in events]))

    @reads_retry
    def max_seq(self, device_id: DeviceId, epoch: int) -> int | None:
        with self._conn() as conn:
            row = conn.execute("SELECT max(seq) FROM telemetry WHERE device_id = %b"
                               " AND epoch = %s", (bytes(device_id), epoch)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @reads_retry
    def telemetry(self, *, device_id: DeviceId | None = None,
                  limit: int = 100) -> list[TelemetryRow]:
        """Newest first: by arrival overall; per device by (epoch, seq)."""
        with self._conn() as conn:
            if device_id is None:
                rows = conn.execute(_SELECT_ROW + " ORDER BY id DESC LIMIT %s",
                                    (limit,)).fetchall()
            else:
                rows = conn.execute(_SELECT_ROW + " WHERE device_id = %b"
                                    " ORDER BY epoch DESC, seq DESC LIMIT %s",
                                    (bytes(device_id), limit)).fetchall()
        return [_telemetry(r) for r in rows]

    @reads_retry
    def count_telemetry(self, device_id: DeviceId | None = None) -> int:
        with self._conn() as conn:
            if device_id is None:
                row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
            else:
                row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %b",
                                   (bytes(device_id),)).fetchone()
        return 0 if row is None else int(row[0])

    # -- audit -----------------------------------------------------------------------------

    def add_events(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        with self._tx() as conn:
            self._insert_events(conn, events)

    @reads_retry
    def events(self, *, reason: str | None = None, device_id: str | None = None,
               since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        where: list[str] = []
        args: list[object] = []
        if reason is not None:
            where.append("reason = %s")
            args.append(reason)
        if device_id is not None:
            where.append("device_id = %s")
            args.append(device_id)
        if since_ms is not None:
            where.append("at_ms >= %s")
            args.append(since_ms)
        sql = _SELECT_EVENT
        if where:  # only the constant fragments above are joined; values are bound
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at_ms DESC, id DESC LIMIT %s"
        args.append(limit)
        with self._conn() as conn:
            rows = conn.execute(sql.encode(), args).fetchall()
        return [AuditEvent(*r) for r in rows]

    @reads_retry
    def count_events_by_reason(self) -> dict[str, int]:
        with self._conn() as conn:
            rows = conn.execute("SELECT reason, count(*) FROM audit GROUP BY reason"
                                " ORDER BY reason").fetchall()
        return {str(reason): int(n) for reason, n in rows}

    # -- meta ------------------------------------------------------------------------------

    @reads_retry
    def get_meta(self, key: str) -> str | None:
        with self._conn() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (%s, %s)"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _first_copies(params: list[Any], new: set[_Key]) -> list[bool]:
    """Which rows of the batch were stored: those whose key the INSERT returned, the first
    occurrence of each key within the batch (arrival order was kept by ORDER BY ord)."""
    stored = []
    for p in params:
        key = (bytes(p[0]), p[1], p[2])
        if key in new:
            new.discard(key)
            stored.append(True)
        else:
            stored.append(False)
    return stored
