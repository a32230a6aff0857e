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

import json
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
from sensorseal.store.base import (
    KEK_BLOB_COLUMNS,
    ApiTokenRow,
    Assignment,
    AuditEvent,
    DeviceExists,
    DeviceRecord,
    DeviceStatus,
    EpochInfo,
    GatewayRecord,
    IotCoreConfigRow,
    IotCoreDevice,
    IotCoreKeyRow,
    KeyEpochRow,
    LegacyCredential,
    NetworkRecord,
    OperatorRow,
    PublicKeyRow,
    SessionRow,
    TelemetryRow,
    UpdateDeviceRow,
    UpdateManifestRow,
    UpdateRolloutRow,
    WrappedBlob,
    WrappedKind,
)

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
_SELECT_OPERATOR = (
    "SELECT name, password_hash, role, groups, disabled, created_ms FROM operators"
)
_SELECT_TOKEN = (
    "SELECT token_id, name, sha256, role, groups, created_ms, created_by, revoked_ms"  # noqa: S105
    " FROM api_tokens"
)

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


def _operator(row: Any) -> OperatorRow:
    name, password_hash, role, groups, disabled, created_ms = row
    return OperatorRow(name, password_hash, role, groups, bool(disabled), created_ms)


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

    # -- console (migration 0003): groups, policies, operators, sessions, tokens -----------

    def set_device_group(self, device_id: DeviceId, group: str | None) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE devices SET group_name = ? WHERE id = ?",
                               (group, bytes(device_id)))
            return cur.rowcount == 1

    def device_groups(self) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute("SELECT id, group_name FROM devices"
                                " WHERE group_name IS NOT NULL").fetchall()
        return {bytes(i).hex(): str(g) for i, g in rows}

    def set_device_policy(self, device_id: DeviceId, policy: str) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE devices SET policy = ? WHERE id = ?",
                               (policy, bytes(device_id)))
            return cur.rowcount == 1

    def list_policies(self) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute("SELECT name, spec FROM policies ORDER BY name").fetchall()
        return {str(n): str(s) for n, s in rows}

    def put_policy(self, name: str, spec: str, now_ms: int) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO policies (name, spec, updated_ms) VALUES (?, ?, ?)"
                         " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,"
                         " updated_ms = excluded.updated_ms", (name, spec, now_ms))

    def delete_policy(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM policies WHERE name = ?", (name,)).rowcount == 1

    def policy_attachments(self) -> dict[tuple[str, str], str]:
        with self._read() as conn:
            rows = conn.execute("SELECT kind, target, policy FROM policy_attachments").fetchall()
        return {(str(k), str(t)): str(p) for k, t, p in rows}

    def attach_policy(self, kind: str, target: str, policy: str | None) -> None:
        with self._write() as conn:
            if policy is None:
                conn.execute("DELETE FROM policy_attachments WHERE kind = ? AND target = ?",
                             (kind, target))
            else:
                conn.execute("INSERT INTO policy_attachments (kind, target, policy)"
                             " VALUES (?, ?, ?) ON CONFLICT (kind, target)"
                             " DO UPDATE SET policy = excluded.policy", (kind, target, policy))

    def add_operator(self, row: OperatorRow) -> bool:
        with self._write() as conn:
            cur = conn.execute("INSERT INTO operators (name, password_hash, role, groups,"
                               " disabled, created_ms) VALUES (?, ?, ?, ?, ?, ?)"
                               " ON CONFLICT DO NOTHING",
                               (row.name, row.password_hash, row.role, row.groups,
                                int(row.disabled), row.created_ms))
            return cur.rowcount == 1

    def get_operator(self, name: str) -> OperatorRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_OPERATOR + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _operator(row)

    def list_operators(self) -> list[OperatorRow]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_OPERATOR + " ORDER BY name").fetchall()
        return [_operator(r) for r in rows]

    def update_operator(self, name: str, *, password_hash: str | None = None,
                        disabled: bool | None = None) -> bool:
        with self._write() as conn:
            found = False
            if password_hash is not None:
                found = conn.execute("UPDATE operators SET password_hash = ? WHERE name = ?",
                                     (password_hash, name)).rowcount == 1
            if disabled is not None:
                found = conn.execute("UPDATE operators SET disabled = ? WHERE name = ?",
                                     (int(disabled), name)).rowcount == 1
            return found

    def add_session(self, row: SessionRow) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO sessions (id_sha256, operator, csrf, created_ms,"
                         " expires_ms) VALUES (?, ?, ?, ?, ?)", tuple(row))

    def get_session(self, id_sha256: str) -> SessionRow | None:
        with self._read() as conn:
            row = conn.execute("SELECT id_sha256, operator, csrf, created_ms, expires_ms"
                               " FROM sessions WHERE id_sha256 = ?", (id_sha256,)).fetchone()
        return None if row is None else SessionRow(*row)

    def delete_session(self, id_sha256: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM sessions WHERE id_sha256 = ?", (id_sha256,))

    def delete_sessions_of(self, operator: str) -> int:
        with self._write() as conn:
            return int(conn.execute("DELETE FROM sessions WHERE operator = ?",
                                    (operator,)).rowcount)

    def purge_sessions(self, now_ms: int) -> int:
        with self._write() as conn:
            return int(conn.execute("DELETE FROM sessions WHERE expires_ms <= ?",
                                    (now_ms,)).rowcount)

    def add_token(self, row: ApiTokenRow) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO api_tokens (token_id, name, sha256, role, groups,"
                         " created_ms, created_by, revoked_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         tuple(row))

    def get_token(self, token_id: str) -> ApiTokenRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_TOKEN + " WHERE token_id = ?", (token_id,)).fetchone()
        return None if row is None else ApiTokenRow(*row)

    def list_tokens(self) -> list[ApiTokenRow]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_TOKEN + " ORDER BY created_ms, token_id").fetchall()
        return [ApiTokenRow(*r) for r in rows]

    def revoke_token(self, token_id: str, now_ms: int) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE api_tokens SET revoked_ms = ? WHERE token_id = ?"
                               " AND revoked_ms IS NULL", (now_ms, token_id))
            return cur.rowcount == 1

    def events_for_devices(self, device_ids: Sequence[str], *, reason: str | None = None,
                           since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        ids = list(device_ids)
        if not ids:
            return []
        # json_each binds the whole list as one parameter (no SQL built from values).
        sql = _SELECT_EVENT + " WHERE device_id IN (SELECT value FROM json_each(?))"  # noqa: S608
        args: list[object] = [json.dumps(ids)]
        if reason is not None:
            sql += " AND reason = ?"
            args.append(reason)
        if since_ms is not None:
            sql += " AND at_ms >= ?"
            args.append(since_ms)
        sql += " ORDER BY at_ms DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [_event(r) for r in rows]


    # -- key lifecycle (migration 0002; see KeyLifecycleStore) -------------------------------

    def add_epoch(self, device_id: DeviceId, epoch: int, wrapped: bytes, created_ms: int, *,
                  renewal_state: bytes | None = None, grace_ms: int = 0) -> None:
        dev = bytes(device_id)
        with self._write() as conn:
            row = conn.execute("SELECT status, epoch FROM devices WHERE id = ?",
                               (dev,)).fetchone()
            if row is None:
                raise ConfigError(f"no device {device_id}")
            if row[0] == DeviceStatus.REVOKED.value:
                raise ConfigError(f"device {device_id} is revoked")
            if epoch <= row[1]:
                raise ConfigError(f"epoch {epoch} is not above the current epoch {row[1]}")
            conn.execute("INSERT INTO device_secrets (device_id, epoch, wrapped, created_ms)"
                         " VALUES (?, ?, ?, ?) ON CONFLICT (device_id, epoch) DO UPDATE"
                         " SET wrapped = excluded.wrapped, created_ms = excluded.created_ms,"
                         " expires_ms = NULL", (dev, epoch, wrapped, created_ms))
            if renewal_state is not None:
                self._put_renewal(conn, dev, renewal_state, grace_ms, created_ms)

    @staticmethod
    def _put_renewal(conn: sqlite3.Connection, dev: bytes, state: bytes, grace_ms: int,
                     now_ms: int) -> None:
        conn.execute("INSERT INTO device_renewals (device_id, state, grace_ms, updated_ms)"
                     " VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE"
                     " SET state = excluded.state, grace_ms = excluded.grace_ms,"
                     " updated_ms = excluded.updated_ms", (dev, state, grace_ms, now_ms))

    def switch_epoch(self, device_id: DeviceId, from_epoch: int, to_epoch: int,
                     old_expires_ms: int | None, *, renewal_state: bytes | None = None) -> bool:
        dev = bytes(device_id)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE devices SET epoch = ? WHERE id = ? AND epoch = ? AND status != ?"
                " AND EXISTS (SELECT 1 FROM device_secrets WHERE device_id = ? AND epoch = ?)",
                (to_epoch, dev, from_epoch, DeviceStatus.REVOKED.value, dev, to_epoch))
            if cur.rowcount != 1:
                return False
            conn.execute("UPDATE device_secrets SET expires_ms = CASE WHEN expires_ms IS NULL"
                         " THEN ? ELSE min(expires_ms, coalesce(?, expires_ms)) END"
                         " WHERE device_id = ? AND epoch = ?",
                         (old_expires_ms, old_expires_ms, dev, from_epoch))
            if renewal_state is not None:
                conn.execute("UPDATE device_renewals SET state = ? WHERE device_id = ?",
                             (renewal_state, dev))
            return True

    def epoch_info(self, device_id: DeviceId, epoch: int) -> EpochInfo | None:
        with self._read() as conn:
            row = conn.execute("SELECT epoch, created_ms, expires_ms FROM device_secrets"
                               " WHERE device_id = ? AND epoch = ?",
                               (bytes(device_id), epoch)).fetchone()
        return None if row is None else EpochInfo(*row)

    def list_epochs(self, device_id: DeviceId) -> list[EpochInfo]:
        with self._read() as conn:
            rows = conn.execute("SELECT epoch, created_ms, expires_ms FROM device_secrets"
                                " WHERE device_id = ? ORDER BY epoch",
                                (bytes(device_id),)).fetchall()
        return [EpochInfo(*r) for r in rows]

    def get_renewal(self, device_id: DeviceId) -> tuple[bytes, int] | None:
        with self._read() as conn:
            row = conn.execute("SELECT state, grace_ms FROM device_renewals"
                               " WHERE device_id = ?", (bytes(device_id),)).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))

    def put_renewal(self, device_id: DeviceId, state: bytes, grace_ms: int,
                    now_ms: int) -> None:
        with self._write() as conn:
            self._put_renewal(conn, bytes(device_id), state, grace_ms, now_ms)

    def add_public_key(self, device_id: DeviceId, purpose: str, alg: int, public: bytes,
                       added_ms: int) -> bool:
        with self._write() as conn:
            try:
                cur = conn.execute("INSERT INTO device_public_keys (device_id, purpose, alg,"
                                   " public, added_ms) VALUES (?, ?, ?, ?, ?)"
                                   " ON CONFLICT DO NOTHING",
                                   (bytes(device_id), purpose, alg, public, added_ms))
            except sqlite3.IntegrityError as exc:
                raise ConfigError(f"cannot add a {purpose!r:.20} key for {device_id}: "
                                  f"{exc}") from None
            return cur.rowcount == 1

    def public_keys(self, device_id: DeviceId, purpose: str) -> list[PublicKeyRow]:
        with self._read() as conn:
            rows = conn.execute("SELECT purpose, alg, public, added_ms FROM device_public_keys"
                                " WHERE device_id = ? AND purpose = ?"
                                " ORDER BY added_ms DESC, public",
                                (bytes(device_id), purpose)).fetchall()
        return [PublicKeyRow(p, a, bytes(k), t) for p, a, k, t in rows]

    def wrapped_secrets(self, *, after: tuple[DeviceId, int] | None = None,
                        limit: int = 500) -> list[tuple[DeviceId, int, bytes]]:
        dev, epoch = (b"", -1) if after is None else (bytes(after[0]), after[1])
        with self._read() as conn:
            rows = conn.execute("SELECT device_id, epoch, wrapped FROM device_secrets"
                                " WHERE (device_id, epoch) > (?, ?)"
                                " ORDER BY device_id, epoch LIMIT ?",
                                (dev, epoch, limit)).fetchall()
        return [(DeviceId(d), int(e), bytes(w)) for d, e, w in rows]

    def replace_secret(self, device_id: DeviceId, epoch: int, old: bytes, new: bytes) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE device_secrets SET wrapped = ? WHERE device_id = ?"
                               " AND epoch = ? AND wrapped = ?",
                               (new, bytes(device_id), epoch, old))
            return cur.rowcount == 1

    # -- KEK rotation: blobs outside device_secrets (networks, gateways, legacy, EVA) ---------

    def kek_blobs(self, kind: WrappedKind, *, after: tuple[bytes | str, int] | None = None,
                  limit: int = 500) -> list[WrappedBlob]:
        table, key, blob, epoch = KEK_BLOB_COLUMNS[WrappedKind(kind)]
        where = f"{blob} IS NOT NULL" + ("" if after is None else f" AND ({key}, {epoch}) > (?, ?)")
        args: tuple[object, ...] = () if after is None else (after[0], after[1])
        with self._read() as conn:
            # identifiers come from KEK_BLOB_COLUMNS only; values are parameters
            sql = (f"SELECT {key}, {epoch}, {blob} FROM {table}"  # noqa: S608
                   f" WHERE {where} ORDER BY 1, 2")  # key, then epoch (may be a literal)
            rows = conn.execute(sql + " LIMIT ?", (*args, limit)).fetchall()
        return [WrappedBlob(r if isinstance(r, str) else bytes(r), int(e), bytes(w))
                for r, e, w in rows]

    def replace_kek_blob(self, kind: WrappedKind, row: bytes | str, epoch: int, old: bytes,
                         new: bytes) -> bool:
        table, key, blob, epoch_expr = KEK_BLOB_COLUMNS[WrappedKind(kind)]
        with self._write() as conn:
            sql = (f"UPDATE {table} SET {blob} = ? WHERE {key} = ?"  # noqa: S608
                   f" AND {epoch_expr} = ? AND {blob} = ?")
            cur = conn.execute(sql, (new, row, epoch, old))
            return cur.rowcount == 1

    # -- compat (migration 0005): legacy credentials, digests, hub uptime, hub commands --------

    def add_legacy_device(self, record: DeviceRecord, credential: LegacyCredential) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO devices (id, name, status, epoch, policy, created_ms,"
                             " last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (bytes(record.device_id), record.name, record.status.value,
                              record.epoch, record.policy, record.created_ms,
                              record.last_seen_ms))
                conn.execute(_INSERT_LEGACY, _legacy_params(credential))
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise DeviceExists(f"device {record.device_id} or legacy id "
                                       f"{credential.external_id!r:.40} exists") from None
                raise ConfigError(f"invalid legacy device: {exc}") from None

    def get_legacy(self, kind: str, external_id: str) -> LegacyCredential | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_LEGACY + " WHERE kind = ? AND external_id = ?",
                               (kind, external_id)).fetchone()
        return None if row is None else _legacy(row)

    def get_legacy_of(self, device_id: DeviceId) -> LegacyCredential | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_LEGACY + " WHERE device_id = ?",
                               (bytes(device_id),)).fetchone()
        return None if row is None else _legacy(row)

    def legacy_in_state(self, state: str, *, limit: int = 1000) -> list[LegacyCredential]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_LEGACY + " WHERE state = ? ORDER BY created_ms LIMIT ?",
                                (state, limit)).fetchall()
        return [_legacy(r) for r in rows]

    def start_legacy_migration(self, device_id: DeviceId, epoch: int, wrapped_secret: bytes,
                               target_policy: str, now_ms: int) -> bool:
        dev = bytes(device_id)
        with self._write() as conn:
            row = conn.execute("SELECT d.status FROM legacy_credentials l JOIN devices d"
                               " ON d.id = l.device_id WHERE l.device_id = ?"
                               " AND l.state = 'active'", (dev,)).fetchone()
            if row is None or row[0] == DeviceStatus.REVOKED.value:
                return False
            try:
                conn.execute("INSERT INTO device_secrets (device_id, epoch, wrapped, created_ms)"
                             " VALUES (?, ?, ?, ?)", (dev, epoch, wrapped_secret, now_ms))
            except sqlite3.IntegrityError:
                return False  # that epoch already has a secret: never overwrite one
            conn.execute("UPDATE devices SET epoch = ? WHERE id = ?", (epoch, dev))
            conn.execute("UPDATE legacy_credentials SET state = 'migrating', target_policy = ?"
                         " WHERE device_id = ?", (target_policy, dev))
            return True

    def finish_legacy_migration(self, device_id: DeviceId, event: AuditEvent) -> bool:
        dev = bytes(device_id)
        with self._write() as conn:
            row = conn.execute("SELECT target_policy FROM legacy_credentials WHERE device_id = ?"
                               " AND state = 'migrating'", (dev,)).fetchone()
            if row is None or row[0] is None:
                return False
            conn.execute("UPDATE devices SET policy = ? WHERE id = ?", (row[0], dev))
            conn.execute("UPDATE legacy_credentials SET state = 'migrated' WHERE device_id = ?",
                         (dev,))
            conn.execute(_INSERT_EVENT, _event_params(event))
            return True

    def claim_digest(self, device_id: DeviceId, digest: bytes, now_ms: int,
                     expires_ms: int) -> bool:
        with self._write() as conn:
            conn.execute("DELETE FROM compat_digests WHERE expires_ms <= ?", (now_ms,))
            cur = conn.execute("INSERT INTO compat_digests (device_id, digest, expires_ms)"
                               " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                               (bytes(device_id), bytes(digest), expires_ms))
            return cur.rowcount == 1

    def release_digest(self, device_id: DeviceId, digest: bytes) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM compat_digests WHERE device_id = ? AND digest = ?",
                         (bytes(device_id), bytes(digest)))

    def hub_uptime(self, device_id: DeviceId) -> tuple[int, int] | None:
        with self._read() as conn:
            row = conn.execute("SELECT last_uptime_ms, last_seen_ms FROM compat_hub_uptime"
                               " WHERE device_id = ?", (bytes(device_id),)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def set_hub_uptime(self, device_id: DeviceId, uptime_ms: int, seen_ms: int) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO compat_hub_uptime (device_id, last_uptime_ms, last_seen_ms)"
                         " VALUES (?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                         " last_uptime_ms = excluded.last_uptime_ms,"
                         " last_seen_ms = excluded.last_seen_ms",
                         (bytes(device_id), uptime_ms, seen_ms))

    def queue_command(self, device_id: DeviceId, command: str, now_ms: int) -> int:
        with self._write() as conn:
            try:
                cur = conn.execute("INSERT INTO compat_commands (device_id, command, created_ms)"
                                   " VALUES (?, ?, ?)", (bytes(device_id), command, now_ms))
            except sqlite3.IntegrityError:
                raise ConfigError(f"no device {device_id}") from None
            return int(cur.lastrowid or 0)

    def take_commands(self, device_id: DeviceId, now_ms: int, limit: int) -> list[str]:
        with self._write() as conn:
            rows = conn.execute("SELECT id, command FROM compat_commands WHERE device_id = ?"
                                " AND delivered_ms IS NULL ORDER BY id LIMIT ?",
                                (bytes(device_id), limit)).fetchall()
            conn.executemany("UPDATE compat_commands SET delivered_ms = ? WHERE id = ?",
                             [(now_ms, i) for i, _ in rows])
        return [str(c) for _, c in rows]

    # -- networks and gateways (migration 0004; see GatewayStore) ----------------------------

    def add_network(self, record: NetworkRecord, wrapped_key: bytes) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO networks (id, name, alg, required_layers, created_ms)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (bytes(record.network_id), record.name, record.alg,
                          record.required_layers, record.created_ms))
            conn.execute("INSERT INTO network_keys (network_id, epoch, wrapped_key, created_ms)"
                         " VALUES (?, 0, ?, ?)",
                         (bytes(record.network_id), wrapped_key, record.created_ms))

    def get_network(self, network_id: bytes) -> NetworkRecord | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_NETWORK + " WHERE id = ?",
                               (bytes(network_id),)).fetchone()
        return None if row is None else _network(row)

    def list_networks(self) -> list[NetworkRecord]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_NETWORK + " ORDER BY created_ms, id").fetchall()
        return [_network(r) for r in rows]

    def network_key(self, network_id: bytes) -> bytes | None:
        with self._read() as conn:
            row = conn.execute("SELECT wrapped_key FROM network_keys WHERE network_id = ?"
                               " ORDER BY epoch DESC LIMIT 1", (bytes(network_id),)).fetchone()
        return None if row is None else bytes(row[0])

    def network_keys(self, network_id: bytes) -> list[KeyEpochRow]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_KEY_EPOCH.format("wrapped_key", "network_keys",
                                                         "network_id") + " ORDER BY epoch",
                                (bytes(network_id),)).fetchall()
        return [_key_epoch(r) for r in rows]

    def rotate_network_key(self, network_id: bytes, epoch: int, wrapped_key: bytes,
                           created_ms: int, old_not_after_ms: int) -> bool:
        net = bytes(network_id)
        with self._write() as conn:
            (newest,) = conn.execute("SELECT max(epoch) FROM network_keys WHERE network_id = ?",
                                     (net,)).fetchone()
            if newest is None or epoch != newest + 1:
                return False
            conn.execute("INSERT INTO network_keys (network_id, epoch, wrapped_key, created_ms)"
                         " VALUES (?, ?, ?, ?)", (net, epoch, wrapped_key, created_ms))
            conn.execute("UPDATE network_keys SET not_after_ms = min(coalesce(not_after_ms, ?),"
                         " ?) WHERE network_id = ? AND epoch < ?",
                         (old_not_after_ms, old_not_after_ms, net, epoch))
            return True

    def add_gateway(self, record: GatewayRecord, wrapped_secret: bytes,
                    networks: Sequence[bytes]) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO gateways (id, name, status, epoch, created_ms)"
                             " VALUES (?, ?, ?, ?, ?)",
                             (bytes(record.gateway_id), record.name, record.status.value,
                              record.epoch, record.created_ms))
                conn.execute("INSERT INTO gateway_secrets (gateway_id, epoch, wrapped_secret,"
                             " created_ms) VALUES (?, ?, ?, ?)",
                             (bytes(record.gateway_id), record.epoch, wrapped_secret,
                              record.created_ms))
                conn.executemany("INSERT INTO gateway_networks (gateway_id, network_id)"
                                 " VALUES (?, ?)",
                                 [(bytes(record.gateway_id), bytes(n)) for n in networks])
            except sqlite3.IntegrityError as exc:
                raise ConfigError(f"cannot add gateway: {exc}") from None

    def get_gateway(self, gateway_id: DeviceId) -> GatewayRecord | None:
        with self._read() as conn:
            row = conn.execute("SELECT id, name, status, epoch, created_ms FROM gateways"
                               " WHERE id = ?", (bytes(gateway_id),)).fetchone()
        if row is None:
            return None
        return GatewayRecord(DeviceId(row[0]), row[1], DeviceStatus(row[2]), row[3], row[4])

    def gateway_secret(self, gateway_id: DeviceId, epoch: int) -> bytes | None:
        found = self.gateway_epoch(gateway_id, epoch)
        return None if found is None else found.wrapped

    def gateway_epoch(self, gateway_id: DeviceId, epoch: int) -> KeyEpochRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_KEY_EPOCH.format("wrapped_secret", "gateway_secrets",
                                                        "gateway_id") + " AND epoch = ?",
                               (bytes(gateway_id), epoch)).fetchone()
        return None if row is None else _key_epoch(row)

    def rotate_gateway(self, gateway_id: DeviceId, from_epoch: int, wrapped_secret: bytes,
                       created_ms: int, old_not_after_ms: int) -> bool:
        gw = bytes(gateway_id)
        with self._write() as conn:
            cur = conn.execute("UPDATE gateways SET epoch = ? WHERE id = ? AND epoch = ?"
                               " AND status != ?",
                               (from_epoch + 1, gw, from_epoch, DeviceStatus.REVOKED.value))
            if cur.rowcount != 1:
                return False
            conn.execute("INSERT INTO gateway_secrets (gateway_id, epoch, wrapped_secret,"
                         " created_ms) VALUES (?, ?, ?, ?)",
                         (gw, from_epoch + 1, wrapped_secret, created_ms))
            conn.execute("UPDATE gateway_secrets SET not_after_ms = min(coalesce(not_after_ms,"
                         " ?), ?) WHERE gateway_id = ? AND epoch <= ?",
                         (old_not_after_ms, old_not_after_ms, gw, from_epoch))
            return True

    def gateway_networks(self, gateway_id: DeviceId) -> list[bytes]:
        with self._read() as conn:
            rows = conn.execute("SELECT network_id FROM gateway_networks WHERE gateway_id = ?"
                                " ORDER BY network_id", (bytes(gateway_id),)).fetchall()
        return [bytes(r[0]) for r in rows]

    def assign_device(self, assignment: Assignment) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO device_networks (device_id, network_id, mode,"
                             " assigned_ms) VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE"
                             " SET network_id = excluded.network_id, mode = excluded.mode,"
                             " assigned_ms = excluded.assigned_ms",
                             (bytes(assignment.device_id), bytes(assignment.network_id),
                              assignment.mode, assignment.assigned_ms))
            except sqlite3.IntegrityError as exc:
                raise ConfigError(f"cannot assign device: {exc}") from None

    def device_assignment(self, device_id: DeviceId) -> Assignment | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_ASSIGNMENT + " WHERE device_id = ?",
                               (bytes(device_id),)).fetchone()
        return None if row is None else _assignment(row)

    def network_assignments(self, network_id: bytes) -> list[Assignment]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_ASSIGNMENT + " WHERE network_id = ? ORDER BY device_id",
                                (bytes(network_id),)).fetchall()
        return [_assignment(r) for r in rows]

    # -- signed updates (migration 0006; see UpdateStore) -------------------------------------

    def put_image(self, sha256: bytes, data: bytes, created_ms: int) -> bool:
        with self._write() as conn:
            cur = conn.execute("INSERT INTO update_images (sha256, size, data, created_ms)"
                               " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               (bytes(sha256), len(data), bytes(data), created_ms))
            return cur.rowcount == 1

    def get_image(self, sha256: bytes) -> bytes | None:
        with self._read() as conn:
            row = conn.execute("SELECT data FROM update_images WHERE sha256 = ?",
                               (bytes(sha256),)).fetchone()
        return None if row is None else bytes(row[0])

    def add_manifest(self, row: UpdateManifestRow) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO update_manifests (seq, device_class, image_version,"
                             " image_sha256, payload, signed, manifest_ref, created_ms)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (row.seq, row.device_class, row.image_version,
                              bytes(row.image_sha256), bytes(row.payload), row.signed,
                              row.manifest_ref, row.created_ms))
            except sqlite3.IntegrityError as exc:
                raise ConfigError(f"cannot add manifest {row.seq}: {exc}") from None

    def get_manifest(self, seq: int) -> UpdateManifestRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_MANIFEST + " WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else _manifest_row(row)

    def max_manifest_seq(self) -> int:
        with self._read() as conn:
            (top,) = conn.execute("SELECT coalesce(max(seq), 0) FROM update_manifests").fetchone()
        return int(top)

    def set_signed_manifest(self, seq: int, signed: bytes, manifest_ref: str) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE update_manifests SET signed = ?, manifest_ref = ?"
                               " WHERE seq = ?", (bytes(signed), manifest_ref, seq))
            return cur.rowcount == 1

    def add_rollout(self, row: UpdateRolloutRow, devices: Sequence[UpdateDeviceRow]) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO update_rollouts (rollout_id, manifest_seq, manifest_ref,"
                             " image_version, device_class, target, created_ms)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(row))
                conn.executemany(_INSERT_ROLLOUT_DEVICE,
                                 [(row.rollout_id, *_update_device_params(d)) for d in devices])
            except sqlite3.IntegrityError as exc:
                raise ConfigError(f"cannot add rollout {row.rollout_id!r:.60}: {exc}") from None

    def get_rollout(self, rollout_id: str) -> UpdateRolloutRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_ROLLOUT + " WHERE rollout_id = ?",
                               (rollout_id,)).fetchone()
        return None if row is None else UpdateRolloutRow(*row)

    def list_rollouts(self, *, limit: int = 100) -> list[UpdateRolloutRow]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_ROLLOUT + " ORDER BY created_ms DESC, rollout_id"
                                " LIMIT ?", (limit,)).fetchall()
        return [UpdateRolloutRow(*r) for r in rows]

    def rollout_device(self, rollout_id: str, device_id: DeviceId) -> UpdateDeviceRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_ROLLOUT_DEVICE + " WHERE rollout_id = ? AND device_id = ?",
                               (rollout_id, bytes(device_id))).fetchone()
        return None if row is None else _update_device(row)

    def rollout_devices(self, rollout_id: str) -> list[UpdateDeviceRow]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_ROLLOUT_DEVICE + " WHERE rollout_id = ?"
                                " ORDER BY device_id", (rollout_id,)).fetchall()
        return [_update_device(r) for r in rows]

    def replace_rollout_device(self, rollout_id: str, row: UpdateDeviceRow, *,
                               expect_revision: int) -> bool:
        with self._write() as conn:
            cur = conn.execute("UPDATE update_rollout_devices SET state = ?, reason = ?,"
                               " offset_bytes = ?, attempts = ?, updated_ms = ?, revision = ?"
                               " WHERE rollout_id = ? AND device_id = ? AND revision = ?",
                               (row.state, row.reason, row.offset, row.attempts, row.updated_ms,
                                row.revision, rollout_id, bytes(row.device_id),
                                expect_revision))
            return cur.rowcount == 1

    def open_rollouts_of(self, device_id: DeviceId) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT r.rollout_id FROM update_rollout_devices d"
                                " JOIN update_rollouts r ON r.rollout_id = d.rollout_id"
                                " WHERE d.device_id = ? AND d.state NOT IN ('installed', 'failed')"
                                " ORDER BY r.created_ms DESC, r.rollout_id",
                                (bytes(device_id),)).fetchall()
        return [str(r[0]) for r in rows]

    # -- drop-in endpoints (migration 0007): Cloud IoT Core devices, keys, configs; EVA keys --

    def add_iotcore_device(self, record: DeviceRecord, binding: IotCoreDevice) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO devices (id, name, status, epoch, policy, created_ms,"
                             " last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (bytes(record.device_id), record.name, record.status.value,
                              record.epoch, record.policy, record.created_ms,
                              record.last_seen_ms))
                conn.execute("INSERT INTO iotcore_devices (device_id, path, short_name,"
                             " counter_field, created_ms) VALUES (?, ?, ?, ?, ?)",
                             (bytes(binding.device_id), binding.path, binding.short_name,
                              binding.counter_field, binding.created_ms))
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise DeviceExists(f"device {record.device_id} or IoT Core device "
                                       f"{binding.short_name!r:.60} exists") from None
                raise ConfigError(f"invalid IoT Core device: {exc}") from None

    def iotcore_device(self, path: str) -> IotCoreDevice | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_IOTCORE + " WHERE path = ?", (path,)).fetchone()
        return None if row is None else IotCoreDevice(DeviceId(row[0]), *row[1:])

    def iotcore_device_of(self, device_id: DeviceId) -> IotCoreDevice | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_IOTCORE + " WHERE device_id = ?",
                               (bytes(device_id),)).fetchone()
        return None if row is None else IotCoreDevice(DeviceId(row[0]), *row[1:])

    def add_iotcore_key(self, device_id: DeviceId, alg: str, pem: str, expires_ms: int | None,
                        added_ms: int) -> int | None:
        with self._write() as conn:
            cur = conn.execute("INSERT INTO iotcore_keys (device_id, alg, pem, expires_ms,"
                               " added_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               (bytes(device_id), alg, pem, expires_ms, added_ms))
            return cur.lastrowid if cur.rowcount == 1 else None

    def iotcore_keys(self, device_id: DeviceId) -> list[IotCoreKeyRow]:
        with self._read() as conn:
            rows = conn.execute("SELECT id, device_id, alg, pem, expires_ms, added_ms"
                                " FROM iotcore_keys WHERE device_id = ? ORDER BY id",
                                (bytes(device_id),)).fetchall()
        return [IotCoreKeyRow(r[0], DeviceId(r[1]), *r[2:]) for r in rows]

    def remove_iotcore_key(self, device_id: DeviceId, key_id: int) -> bool:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM iotcore_keys WHERE device_id = ? AND id = ?",
                               (bytes(device_id), key_id))
            return cur.rowcount == 1

    def put_iotcore_config(self, device_id: DeviceId, data: bytes, now_ms: int) -> int:
        dev = bytes(device_id)
        with self._write() as conn:  # BEGIN IMMEDIATE: the max() below cannot race
            (change,) = conn.execute("SELECT coalesce(max(change_id), 0) + 1"
                                     " FROM iotcore_configs").fetchone()
            row = conn.execute("SELECT version FROM iotcore_configs WHERE device_id = ?",
                               (dev,)).fetchone()
            version = 1 if row is None else int(row[0]) + 1
            conn.execute("INSERT INTO iotcore_configs (device_id, version, data, change_id,"
                         " updated_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE"
                         " SET version = excluded.version, data = excluded.data,"
                         " change_id = excluded.change_id, updated_ms = excluded.updated_ms",
                         (dev, version, bytes(data), change, now_ms))
            return version

    def iotcore_config(self, device_id: DeviceId) -> IotCoreConfigRow | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_IOTCORE_CONFIG + " WHERE device_id = ?",
                               (bytes(device_id),)).fetchone()
        return None if row is None else _iotcore_config(row)

    def iotcore_configs_after(self, change_id: int, *,
                              limit: int = 500) -> list[IotCoreConfigRow]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_IOTCORE_CONFIG + " WHERE change_id > ?"
                                " ORDER BY change_id LIMIT ?", (change_id, limit)).fetchall()
        return [_iotcore_config(r) for r in rows]

    def add_eva_key(self, key_id: str, wrapped: bytes, now_ms: int) -> bool:
        with self._write() as conn:
            cur = conn.execute("INSERT INTO eva_keys (key_id, wrapped, created_ms)"
                               " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                               (key_id, wrapped, now_ms))
            return cur.rowcount == 1

    def eva_key(self, key_id: str) -> bytes | None:
        with self._read() as conn:
            row = conn.execute("SELECT wrapped FROM eva_keys WHERE key_id = ?",
                               (key_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def list_eva_keys(self) -> list[tuple[str, int]]:
        with self._read() as conn:
            rows = conn.execute("SELECT key_id, created_ms FROM eva_keys"
                                " ORDER BY key_id").fetchall()
        return [(str(k), int(c)) for k, c in rows]

    def remove_eva_key(self, key_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM eva_keys WHERE key_id = ?",
                                (key_id,)).rowcount == 1


_SELECT_NETWORK = "SELECT id, name, alg, required_layers, created_ms FROM networks"
_SELECT_ASSIGNMENT = "SELECT device_id, network_id, mode, assigned_ms FROM device_networks"


_SELECT_KEY_EPOCH = "SELECT epoch, {0}, created_ms, not_after_ms FROM {1} WHERE {2} = ?"


def _key_epoch(row: Any) -> KeyEpochRow:
    return KeyEpochRow(int(row[0]), bytes(row[1]), int(row[2]),
                       None if row[3] is None else int(row[3]))


def _network(row: Any) -> NetworkRecord:
    return NetworkRecord(bytes(row[0]), row[1], row[2], row[3], row[4])


def _assignment(row: Any) -> Assignment:
    return Assignment(DeviceId(row[0]), bytes(row[1]), row[2], row[3])


def _event_params(e: AuditEvent) -> tuple[object, ...]:
    return (e.at_ms, e.reason, e.transport, e.source, e.device_id, e.detail)


_SELECT_LEGACY = (
    "SELECT device_id, kind, external_id, wrapped, options, state, target_policy, created_ms"
    " FROM legacy_credentials"
)
_INSERT_LEGACY = (
    "INSERT INTO legacy_credentials (device_id, kind, external_id, wrapped, options, state,"
    " target_policy, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _legacy(row: Any) -> LegacyCredential:
    dev, kind, external_id, wrapped, options, state, target, created_ms = row
    return LegacyCredential(DeviceId(dev), kind, external_id,
                            None if wrapped is None else bytes(wrapped), options, state, target,
                            created_ms)


def _legacy_params(c: LegacyCredential) -> tuple[object, ...]:
    return (bytes(c.device_id), c.kind, c.external_id, c.wrapped, c.options, c.state,
            c.target_policy, c.created_ms)


_SELECT_IOTCORE = (
    "SELECT device_id, path, short_name, counter_field, created_ms FROM iotcore_devices"
)
_SELECT_IOTCORE_CONFIG = (
    "SELECT device_id, version, data, change_id, updated_ms FROM iotcore_configs"
)


def _iotcore_config(row: Any) -> IotCoreConfigRow:
    return IotCoreConfigRow(DeviceId(row[0]), int(row[1]), bytes(row[2]), int(row[3]),
                            int(row[4]))


_SELECT_MANIFEST = (
    "SELECT seq, device_class, image_version, image_sha256, payload, signed, manifest_ref,"
    " created_ms FROM update_manifests"
)
_SELECT_ROLLOUT = (
    "SELECT rollout_id, manifest_seq, manifest_ref, image_version, device_class, target,"
    " created_ms FROM update_rollouts"
)
_SELECT_ROLLOUT_DEVICE = (
    "SELECT device_id, state, reason, offset_bytes, attempts, updated_ms, revision"
    " FROM update_rollout_devices"
)
_INSERT_ROLLOUT_DEVICE = (
    "INSERT INTO update_rollout_devices (rollout_id, device_id, state, reason, offset_bytes,"
    " attempts, updated_ms, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _manifest_row(row: Any) -> UpdateManifestRow:
    seq, cls, version, sha, payload, signed, ref, created = row
    return UpdateManifestRow(int(seq), str(cls), int(version), bytes(sha), bytes(payload),
                             None if signed is None else bytes(signed), ref, int(created))


def _update_device(row: Any) -> UpdateDeviceRow:
    dev, state, reason, offset, attempts, updated, revision = row
    return UpdateDeviceRow(DeviceId(dev), str(state), reason, int(offset), int(attempts),
                           int(updated), int(revision))


def _update_device_params(d: UpdateDeviceRow) -> tuple[object, ...]:
    return (bytes(d.device_id), d.state, d.reason, d.offset, d.attempts, d.updated_ms,
            d.revision)
