"""PostgresStore's optional protocols: ConsoleStore, KeyLifecycleStore, CompatStore, GatewayStore.

The same statements as SQLiteStore's (store/sqlite.py), in PostgreSQL's dialect: `%s`
parameters, BYTEA, BOOLEAN, `= ANY(array)` where SQLite uses json_each, and row locks
(`FOR UPDATE`) where SQLite relies on its single writer: two workers may run the same
compare-and-swap at once, and exactly one of them must win.

A mixin so that postgres.py stays about ingest; it only needs `_conn()` and `_tx()`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

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
    KeyEpochRow,
    LegacyCredential,
    NetworkRecord,
    OperatorRow,
    PublicKeyRow,
    SessionRow,
    WrappedBlob,
    WrappedKind,
)

__all__ = ["READ_RETRY_S", "PostgresFeatures", "reads_retry"]

READ_RETRY_S = 15.0
_T = TypeVar("_T")
_P = ParamSpec("_P")


def reads_retry(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Retry a READ that met a lost connection (a database restart or fail-over) for up to
    READ_RETRY_S: reads are idempotent, and a registry lookup that fails would otherwise turn
    into a refused message. Writes are never retried here: the caller (pipeline, MQTT worker)
    owns that decision, because only it knows what was acknowledged."""
    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        deadline = time.monotonic() + READ_RETRY_S
        delay = 0.05
        while True:
            try:
                return method(*args, **kwargs)
            except (psycopg.OperationalError, PoolTimeout):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
    return wrapper


_SELECT_OPERATOR = "SELECT name, password_hash, role, groups, disabled, created_ms FROM operators"
_SELECT_TOKEN = (
    "SELECT token_id, name, sha256, role, groups, created_ms, created_by, revoked_ms"  # noqa: S105
    " FROM api_tokens"
)
_SELECT_EVENT = "SELECT at_ms, reason, transport, source, device_id, detail FROM audit"
_INSERT_EVENT = (
    "INSERT INTO audit (at_ms, reason, transport, source, device_id, detail)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
_SELECT_LEGACY = (
    "SELECT device_id, kind, external_id, wrapped, options, state, target_policy, created_ms"
    " FROM legacy_credentials"
)
_INSERT_LEGACY = (
    "INSERT INTO legacy_credentials (device_id, kind, external_id, wrapped, options, state,"
    " target_policy, created_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
_SELECT_NETWORK = "SELECT id, name, alg, required_layers, created_ms FROM networks"
_SELECT_ASSIGNMENT = "SELECT device_id, network_id, mode, assigned_ms FROM device_networks"


def _operator(row: Any) -> OperatorRow:
    name, password_hash, role, groups, disabled, created_ms = row
    return OperatorRow(name, password_hash, role, groups, bool(disabled), created_ms)


def _legacy(row: Any) -> LegacyCredential:
    dev, kind, external_id, wrapped, options, state, target, created_ms = row
    return LegacyCredential(DeviceId(bytes(dev)), kind, external_id,
                            None if wrapped is None else bytes(wrapped), options, state, target,
                            created_ms)


_SELECT_KEY_EPOCH = "SELECT epoch, {0}, created_ms, not_after_ms FROM {1} WHERE {2} = %s"


def _key_epoch(row: Any) -> KeyEpochRow:
    return KeyEpochRow(int(row[0]), bytes(row[1]), int(row[2]),
                       None if row[3] is None else int(row[3]))


def _network(row: Any) -> NetworkRecord:
    return NetworkRecord(bytes(row[0]), row[1], row[2], row[3], row[4])


def _assignment(row: Any) -> Assignment:
    return Assignment(DeviceId(bytes(row[0])), bytes(row[1]), row[2], row[3])


class PostgresFeatures:
    """The optional store protocols on PostgreSQL (mixed into PostgresStore)."""

    def _conn(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError

    @reads_retry
    def _one(self, sql: str, args: Sequence[object] = ()) -> Any:
        with self._conn() as conn:
            return conn.execute(sql.encode(), args).fetchone()

    @reads_retry
    def _all(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        with self._conn() as conn:
            return conn.execute(sql.encode(), args).fetchall()

    def _change(self, sql: str, args: Sequence[object] = ()) -> int:
        with self._tx() as conn:
            return int(conn.execute(sql.encode(), args).rowcount)

    # -- console (migration 0003) ----------------------------------------------------------

    def set_device_group(self, device_id: DeviceId, group: str | None) -> bool:
        return self._change("UPDATE devices SET group_name = %s WHERE id = %s",
                            (group, bytes(device_id))) == 1

    def device_groups(self) -> dict[str, str]:
        rows = self._all("SELECT id, group_name FROM devices WHERE group_name IS NOT NULL")
        return {bytes(i).hex(): str(g) for i, g in rows}

    def set_device_policy(self, device_id: DeviceId, policy: str) -> bool:
        return self._change("UPDATE devices SET policy = %s WHERE id = %s",
                            (policy, bytes(device_id))) == 1

    def list_policies(self) -> dict[str, str]:
        return {str(n): str(s) for n, s in self._all("SELECT name, spec FROM policies"
                                                     " ORDER BY name")}

    def put_policy(self, name: str, spec: str, now_ms: int) -> None:
        self._change("INSERT INTO policies (name, spec, updated_ms) VALUES (%s, %s, %s)"
                     " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,"
                     " updated_ms = excluded.updated_ms", (name, spec, now_ms))

    def delete_policy(self, name: str) -> bool:
        return self._change("DELETE FROM policies WHERE name = %s", (name,)) == 1

    def policy_attachments(self) -> dict[tuple[str, str], str]:
        rows = self._all("SELECT kind, target, policy FROM policy_attachments")
        return {(str(k), str(t)): str(p) for k, t, p in rows}

    def attach_policy(self, kind: str, target: str, policy: str | None) -> None:
        if policy is None:
            self._change("DELETE FROM policy_attachments WHERE kind = %s AND target = %s",
                         (kind, target))
        else:
            self._change("INSERT INTO policy_attachments (kind, target, policy)"
                         " VALUES (%s, %s, %s) ON CONFLICT (kind, target)"
                         " DO UPDATE SET policy = excluded.policy", (kind, target, policy))

    def add_operator(self, row: OperatorRow) -> bool:
        return self._change("INSERT INTO operators (name, password_hash, role, groups, disabled,"
                            " created_ms) VALUES (%s, %s, %s, %s, %s, %s)"
                            " ON CONFLICT DO NOTHING",
                            (row.name, row.password_hash, row.role, row.groups,
                             bool(row.disabled), row.created_ms)) == 1

    def get_operator(self, name: str) -> OperatorRow | None:
        row = self._one(_SELECT_OPERATOR + " WHERE name = %s", (name,))
        return None if row is None else _operator(row)

    def list_operators(self) -> list[OperatorRow]:
        return [_operator(r) for r in self._all(_SELECT_OPERATOR + " ORDER BY name")]

    def update_operator(self, name: str, *, password_hash: str | None = None,
                        disabled: bool | None = None) -> bool:
        with self._tx() as conn:
            found = False
            if password_hash is not None:
                found = conn.execute("UPDATE operators SET password_hash = %s WHERE name = %s",
                                     (password_hash, name)).rowcount == 1
            if disabled is not None:
                found = conn.execute("UPDATE operators SET disabled = %s WHERE name = %s",
                                     (bool(disabled), name)).rowcount == 1
            return found

    def add_session(self, row: SessionRow) -> None:
        self._change("INSERT INTO sessions (id_sha256, operator, csrf, created_ms, expires_ms)"
                     " VALUES (%s, %s, %s, %s, %s)", tuple(row))

    def get_session(self, id_sha256: str) -> SessionRow | None:
        row = self._one("SELECT id_sha256, operator, csrf, created_ms, expires_ms FROM sessions"
                        " WHERE id_sha256 = %s", (id_sha256,))
        return None if row is None else SessionRow(*row)

    def delete_session(self, id_sha256: str) -> None:
        self._change("DELETE FROM sessions WHERE id_sha256 = %s", (id_sha256,))

    def delete_sessions_of(self, operator: str) -> int:
        return self._change("DELETE FROM sessions WHERE operator = %s", (operator,))

    def purge_sessions(self, now_ms: int) -> int:
        return self._change("DELETE FROM sessions WHERE expires_ms <= %s", (now_ms,))

    def add_token(self, row: ApiTokenRow) -> None:
        self._change("INSERT INTO api_tokens (token_id, name, sha256, role, groups, created_ms,"
                     " created_by, revoked_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                     tuple(row))

    def get_token(self, token_id: str) -> ApiTokenRow | None:
        row = self._one(_SELECT_TOKEN + " WHERE token_id = %s", (token_id,))
        return None if row is None else ApiTokenRow(*row)

    def list_tokens(self) -> list[ApiTokenRow]:
        return [ApiTokenRow(*r) for r in self._all(_SELECT_TOKEN
                                                   + " ORDER BY created_ms, token_id")]

    def revoke_token(self, token_id: str, now_ms: int) -> bool:
        return self._change("UPDATE api_tokens SET revoked_ms = %s WHERE token_id = %s"
                            " AND revoked_ms IS NULL", (now_ms, token_id)) == 1

    def events_for_devices(self, device_ids: Sequence[str], *, reason: str | None = None,
                           since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        ids = list(device_ids)
        if not ids:
            return []
        sql = _SELECT_EVENT + " WHERE device_id = ANY(%s::text[])"  # the list is one parameter
        args: list[object] = [ids]
        if reason is not None:
            sql += " AND reason = %s"
            args.append(reason)
        if since_ms is not None:
            sql += " AND at_ms >= %s"
            args.append(since_ms)
        sql += " ORDER BY at_ms DESC, id DESC LIMIT %s"
        args.append(limit)
        return [AuditEvent(*r) for r in self._all(sql, args)]

    # -- key lifecycle (migration 0002) ----------------------------------------------------

    def add_epoch(self, device_id: DeviceId, epoch: int, wrapped: bytes, created_ms: int, *,
                  renewal_state: bytes | None = None, grace_ms: int = 0) -> None:
        dev = bytes(device_id)
        with self._tx() as conn:
            row = conn.execute("SELECT status, epoch FROM devices WHERE id = %s FOR UPDATE",
                               (dev,)).fetchone()
            if row is None:
                raise ConfigError(f"no device {device_id}")
            if row[0] == DeviceStatus.REVOKED.value:
                raise ConfigError(f"device {device_id} is revoked")
            if epoch <= row[1]:
                raise ConfigError(f"epoch {epoch} is not above the current epoch {row[1]}")
            conn.execute("INSERT INTO device_secrets (device_id, epoch, wrapped, created_ms)"
                         " VALUES (%s, %s, %s, %s) ON CONFLICT (device_id, epoch) DO UPDATE"
                         " SET wrapped = excluded.wrapped, created_ms = excluded.created_ms,"
                         " expires_ms = NULL", (dev, epoch, wrapped, created_ms))
            if renewal_state is not None:
                self._put_renewal(conn, dev, renewal_state, grace_ms, created_ms)

    @staticmethod
    def _put_renewal(conn: psycopg.Connection[Any], dev: bytes, state: bytes, grace_ms: int,
                     now_ms: int) -> None:
        conn.execute("INSERT INTO device_renewals (device_id, state, grace_ms, updated_ms)"
                     " VALUES (%s, %s, %s, %s) ON CONFLICT (device_id) DO UPDATE"
                     " SET state = excluded.state, grace_ms = excluded.grace_ms,"
                     " updated_ms = excluded.updated_ms", (dev, state, grace_ms, now_ms))

    def switch_epoch(self, device_id: DeviceId, from_epoch: int, to_epoch: int,
                     old_expires_ms: int | None, *, renewal_state: bytes | None = None) -> bool:
        dev = bytes(device_id)
        with self._tx() as conn:
            # The UPDATE's WHERE is re-checked after a concurrent writer commits (READ
            # COMMITTED), so of two workers confirming the same switch exactly one sees 1 row.
            cur = conn.execute(
                "UPDATE devices SET epoch = %s WHERE id = %s AND epoch = %s AND status <> %s"
                " AND EXISTS (SELECT 1 FROM device_secrets WHERE device_id = %s AND epoch = %s)",
                (to_epoch, dev, from_epoch, DeviceStatus.REVOKED.value, dev, to_epoch))
            if cur.rowcount != 1:
                return False
            conn.execute("UPDATE device_secrets SET expires_ms = CASE WHEN expires_ms IS NULL"
                         " THEN %s::int8 ELSE least(expires_ms, coalesce(%s::int8, expires_ms))"
                         " END WHERE device_id = %s AND epoch = %s",
                         (old_expires_ms, old_expires_ms, dev, from_epoch))
            if renewal_state is not None:
                conn.execute("UPDATE device_renewals SET state = %s WHERE device_id = %s",
                             (renewal_state, dev))
            return True

    def epoch_info(self, device_id: DeviceId, epoch: int) -> EpochInfo | None:
        row = self._one("SELECT epoch, created_ms, expires_ms FROM device_secrets"
                        " WHERE device_id = %s AND epoch = %s", (bytes(device_id), epoch))
        return None if row is None else EpochInfo(*row)

    def list_epochs(self, device_id: DeviceId) -> list[EpochInfo]:
        return [EpochInfo(*r) for r in self._all(
            "SELECT epoch, created_ms, expires_ms FROM device_secrets WHERE device_id = %s"
            " ORDER BY epoch", (bytes(device_id),))]

    def get_renewal(self, device_id: DeviceId) -> tuple[bytes, int] | None:
        row = self._one("SELECT state, grace_ms FROM device_renewals WHERE device_id = %s",
                        (bytes(device_id),))
        return None if row is None else (bytes(row[0]), int(row[1]))

    def put_renewal(self, device_id: DeviceId, state: bytes, grace_ms: int,
                    now_ms: int) -> None:
        with self._tx() as conn:
            self._put_renewal(conn, bytes(device_id), state, grace_ms, now_ms)

    def add_public_key(self, device_id: DeviceId, purpose: str, alg: int, public: bytes,
                       added_ms: int) -> bool:
        try:
            return self._change("INSERT INTO device_public_keys (device_id, purpose, alg,"
                                " public, added_ms) VALUES (%s, %s, %s, %s, %s)"
                                " ON CONFLICT DO NOTHING",
                                (bytes(device_id), purpose, alg, public, added_ms)) == 1
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"cannot add a {purpose!r:.20} key for {device_id} "
                              f"({type(exc).__name__})") from None

    def public_keys(self, device_id: DeviceId, purpose: str) -> list[PublicKeyRow]:
        rows = self._all("SELECT purpose, alg, public, added_ms FROM device_public_keys"
                         " WHERE device_id = %s AND purpose = %s ORDER BY added_ms DESC, public",
                         (bytes(device_id), purpose))
        return [PublicKeyRow(p, a, bytes(k), t) for p, a, k, t in rows]

    def wrapped_secrets(self, *, after: tuple[DeviceId, int] | None = None,
                        limit: int = 500) -> list[tuple[DeviceId, int, bytes]]:
        dev, epoch = (b"", -1) if after is None else (bytes(after[0]), after[1])
        rows = self._all("SELECT device_id, epoch, wrapped FROM device_secrets"
                         " WHERE (device_id, epoch) > (%s::bytea, %s::int4)"
                         " ORDER BY device_id, epoch LIMIT %s", (dev, epoch, limit))
        return [(DeviceId(bytes(d)), int(e), bytes(w)) for d, e, w in rows]

    def replace_secret(self, device_id: DeviceId, epoch: int, old: bytes, new: bytes) -> bool:
        return self._change("UPDATE device_secrets SET wrapped = %s WHERE device_id = %s"
                            " AND epoch = %s AND wrapped = %s",
                            (new, bytes(device_id), epoch, old)) == 1

    # -- KEK rotation: blobs outside device_secrets (networks, gateways, legacy, EVA) ---------

    def kek_blobs(self, kind: WrappedKind, *, after: tuple[bytes | str, int] | None = None,
                  limit: int = 500) -> list[WrappedBlob]:
        table, key, blob, epoch = KEK_BLOB_COLUMNS[WrappedKind(kind)]
        where = f"{blob} IS NOT NULL" + ("" if after is None else
                                         f" AND ({key}, {epoch}) > (%s, %s::int8)")
        args: tuple[object, ...] = () if after is None else (after[0], after[1])
        # identifiers come from KEK_BLOB_COLUMNS only; values are parameters
        sql = (f"SELECT {key}, {epoch}, {blob} FROM {table}"  # noqa: S608
               f" WHERE {where} ORDER BY 1, 2")  # key, then epoch (may be a literal)
        rows = self._all(sql + " LIMIT %s", (*args, limit))
        return [WrappedBlob(r if isinstance(r, str) else bytes(r), int(e), bytes(w))
                for r, e, w in rows]

    def replace_kek_blob(self, kind: WrappedKind, row: bytes | str, epoch: int, old: bytes,
                         new: bytes) -> bool:
        table, key, blob, epoch_expr = KEK_BLOB_COLUMNS[WrappedKind(kind)]
        sql = (f"UPDATE {table} SET {blob} = %s WHERE {key} = %s"  # noqa: S608
               f" AND {epoch_expr} = %s AND {blob} = %s")
        return self._change(sql, (new, row, epoch, old)) == 1

    # -- compat (migration 0005) -----------------------------------------------------------

    def add_legacy_device(self, record: DeviceRecord, credential: LegacyCredential) -> None:
        c = credential
        try:
            with self._tx() as conn:
                conn.execute("INSERT INTO devices (id, name, status, epoch, policy, created_ms,"
                             " last_seen_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (bytes(record.device_id), record.name, record.status.value,
                              record.epoch, record.policy, record.created_ms,
                              record.last_seen_ms))
                conn.execute(_INSERT_LEGACY, (bytes(c.device_id), c.kind, c.external_id,
                                              c.wrapped, c.options, c.state, c.target_policy,
                                              c.created_ms))
        except pg_errors.UniqueViolation:
            raise DeviceExists(f"device {record.device_id} or legacy id "
                               f"{credential.external_id!r:.40} exists") from None
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"invalid legacy device ({type(exc).__name__})") from None

    def get_legacy(self, kind: str, external_id: str) -> LegacyCredential | None:
        row = self._one(_SELECT_LEGACY + " WHERE kind = %s AND external_id = %s",
                        (kind, external_id))
        return None if row is None else _legacy(row)

    def get_legacy_of(self, device_id: DeviceId) -> LegacyCredential | None:
        row = self._one(_SELECT_LEGACY + " WHERE device_id = %s", (bytes(device_id),))
        return None if row is None else _legacy(row)

    def legacy_in_state(self, state: str, *, limit: int = 1000) -> list[LegacyCredential]:
        return [_legacy(r) for r in self._all(
            _SELECT_LEGACY + " WHERE state = %s ORDER BY created_ms LIMIT %s", (state, limit))]

    def start_legacy_migration(self, device_id: DeviceId, epoch: int, wrapped_secret: bytes,
                               target_policy: str, now_ms: int) -> bool:
        dev = bytes(device_id)
        with self._tx() as conn:
            row = conn.execute("SELECT d.status FROM legacy_credentials l JOIN devices d"
                               " ON d.id = l.device_id WHERE l.device_id = %s"
                               " AND l.state = 'active' FOR UPDATE", (dev,)).fetchone()
            if row is None or row[0] == DeviceStatus.REVOKED.value:
                return False
            inserted = conn.execute("INSERT INTO device_secrets (device_id, epoch, wrapped,"
                                    " created_ms) VALUES (%s, %s, %s, %s)"
                                    " ON CONFLICT DO NOTHING",
                                    (dev, epoch, wrapped_secret, now_ms)).rowcount
            if inserted != 1:
                return False  # that epoch already has a secret: never overwrite one
            conn.execute("UPDATE devices SET epoch = %s WHERE id = %s", (epoch, dev))
            conn.execute("UPDATE legacy_credentials SET state = 'migrating', target_policy = %s"
                         " WHERE device_id = %s", (target_policy, dev))
            return True

    def finish_legacy_migration(self, device_id: DeviceId, event: AuditEvent) -> bool:
        dev = bytes(device_id)
        with self._tx() as conn:
            row = conn.execute("SELECT target_policy FROM legacy_credentials WHERE device_id = %s"
                               " AND state = 'migrating' FOR UPDATE", (dev,)).fetchone()
            if row is None or row[0] is None:
                return False
            conn.execute("UPDATE devices SET policy = %s WHERE id = %s", (row[0], dev))
            conn.execute("UPDATE legacy_credentials SET state = 'migrated' WHERE device_id = %s",
                         (dev,))
            conn.execute(_INSERT_EVENT, (event.at_ms, event.reason, event.transport,
                                         event.source, event.device_id, event.detail))
            return True

    def claim_digest(self, device_id: DeviceId, digest: bytes, now_ms: int,
                     expires_ms: int) -> bool:
        with self._tx() as conn:
            conn.execute("DELETE FROM compat_digests WHERE expires_ms <= %s", (now_ms,))
            cur = conn.execute("INSERT INTO compat_digests (device_id, digest, expires_ms)"
                               " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                               (bytes(device_id), bytes(digest), expires_ms))
            return cur.rowcount == 1

    def release_digest(self, device_id: DeviceId, digest: bytes) -> None:
        self._change("DELETE FROM compat_digests WHERE device_id = %s AND digest = %s",
                     (bytes(device_id), bytes(digest)))

    def hub_uptime(self, device_id: DeviceId) -> tuple[int, int] | None:
        row = self._one("SELECT last_uptime_ms, last_seen_ms FROM compat_hub_uptime"
                        " WHERE device_id = %s", (bytes(device_id),))
        return None if row is None else (int(row[0]), int(row[1]))

    def set_hub_uptime(self, device_id: DeviceId, uptime_ms: int, seen_ms: int) -> None:
        self._change("INSERT INTO compat_hub_uptime (device_id, last_uptime_ms, last_seen_ms)"
                     " VALUES (%s, %s, %s) ON CONFLICT (device_id) DO UPDATE SET"
                     " last_uptime_ms = excluded.last_uptime_ms,"
                     " last_seen_ms = excluded.last_seen_ms",
                     (bytes(device_id), uptime_ms, seen_ms))

    def queue_command(self, device_id: DeviceId, command: str, now_ms: int) -> int:
        try:
            with self._tx() as conn:
                row = conn.execute("INSERT INTO compat_commands (device_id, command, created_ms)"
                                   " VALUES (%s, %s, %s) RETURNING id",
                                   (bytes(device_id), command, now_ms)).fetchone()
        except pg_errors.ForeignKeyViolation:
            raise ConfigError(f"no device {device_id}") from None
        return int(row[0]) if row else 0

    def take_commands(self, device_id: DeviceId, now_ms: int, limit: int) -> list[str]:
        with self._tx() as conn:
            # SKIP LOCKED: two workers answering the same hub never deliver a command twice.
            rows = conn.execute("SELECT id, command FROM compat_commands WHERE device_id = %s"
                                " AND delivered_ms IS NULL ORDER BY id LIMIT %s"
                                " FOR UPDATE SKIP LOCKED", (bytes(device_id), limit)).fetchall()
            if rows:
                conn.execute("UPDATE compat_commands SET delivered_ms = %s"
                             " WHERE id = ANY(%s::int8[])", (now_ms, [i for i, _ in rows]))
        return [str(c) for _, c in rows]

    # -- networks and gateways (migration 0004) --------------------------------------------

    def add_network(self, record: NetworkRecord, wrapped_key: bytes) -> None:
        try:
            with self._tx() as conn:
                conn.execute("INSERT INTO networks (id, name, alg, required_layers, created_ms)"
                             " VALUES (%s, %s, %s, %s, %s)",
                             (bytes(record.network_id), record.name, record.alg,
                              record.required_layers, record.created_ms))
                conn.execute("INSERT INTO network_keys (network_id, epoch, wrapped_key,"
                             " created_ms) VALUES (%s, 0, %s, %s)",
                             (bytes(record.network_id), wrapped_key, record.created_ms))
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"cannot add network ({type(exc).__name__})") from None

    def get_network(self, network_id: bytes) -> NetworkRecord | None:
        row = self._one(_SELECT_NETWORK + " WHERE id = %s", (bytes(network_id),))
        return None if row is None else _network(row)

    def list_networks(self) -> list[NetworkRecord]:
        return [_network(r) for r in self._all(_SELECT_NETWORK + " ORDER BY created_ms, id")]

    def network_key(self, network_id: bytes) -> bytes | None:
        row = self._one("SELECT wrapped_key FROM network_keys WHERE network_id = %s"
                        " ORDER BY epoch DESC LIMIT 1", (bytes(network_id),))
        return None if row is None else bytes(row[0])

    def network_keys(self, network_id: bytes) -> list[KeyEpochRow]:
        return [_key_epoch(r) for r in self._all(
            _SELECT_KEY_EPOCH.format("wrapped_key", "network_keys", "network_id")
            + " ORDER BY epoch", (bytes(network_id),))]

    def rotate_network_key(self, network_id: bytes, epoch: int, wrapped_key: bytes,
                           created_ms: int, old_not_after_ms: int) -> bool:
        net = bytes(network_id)
        with self._tx() as conn:
            # the network row lock serializes rotations of one network
            if conn.execute("SELECT 1 FROM networks WHERE id = %s FOR UPDATE",
                            (net,)).fetchone() is None:
                return False
            row = conn.execute("SELECT max(epoch) FROM network_keys WHERE network_id = %s",
                               (net,)).fetchone()
            if row is None or row[0] is None or epoch != int(row[0]) + 1:
                return False
            conn.execute("INSERT INTO network_keys (network_id, epoch, wrapped_key, created_ms)"
                         " VALUES (%s, %s, %s, %s)", (net, epoch, wrapped_key, created_ms))
            conn.execute("UPDATE network_keys SET not_after_ms = LEAST(coalesce(not_after_ms,"
                         " %s), %s) WHERE network_id = %s AND epoch < %s",
                         (old_not_after_ms, old_not_after_ms, net, epoch))
            return True

    def add_gateway(self, record: GatewayRecord, wrapped_secret: bytes,
                    networks: Sequence[bytes]) -> None:
        try:
            with self._tx() as conn:
                conn.execute("INSERT INTO gateways (id, name, status, epoch, created_ms)"
                             " VALUES (%s, %s, %s, %s, %s)",
                             (bytes(record.gateway_id), record.name, record.status.value,
                              record.epoch, record.created_ms))
                conn.execute("INSERT INTO gateway_secrets (gateway_id, epoch, wrapped_secret,"
                             " created_ms) VALUES (%s, %s, %s, %s)",
                             (bytes(record.gateway_id), record.epoch, wrapped_secret,
                              record.created_ms))
                for n in networks:
                    conn.execute("INSERT INTO gateway_networks (gateway_id, network_id)"
                                 " VALUES (%s, %s)", (bytes(record.gateway_id), bytes(n)))
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"cannot add gateway ({type(exc).__name__})") from None

    def get_gateway(self, gateway_id: DeviceId) -> GatewayRecord | None:
        row = self._one("SELECT id, name, status, epoch, created_ms FROM gateways WHERE id = %s",
                        (bytes(gateway_id),))
        if row is None:
            return None
        return GatewayRecord(DeviceId(bytes(row[0])), row[1], DeviceStatus(row[2]), row[3],
                             row[4])

    def gateway_secret(self, gateway_id: DeviceId, epoch: int) -> bytes | None:
        found = self.gateway_epoch(gateway_id, epoch)
        return None if found is None else found.wrapped

    def gateway_epoch(self, gateway_id: DeviceId, epoch: int) -> KeyEpochRow | None:
        row = self._one(_SELECT_KEY_EPOCH.format("wrapped_secret", "gateway_secrets",
                                                 "gateway_id") + " AND epoch = %s",
                        (bytes(gateway_id), epoch))
        return None if row is None else _key_epoch(row)

    def rotate_gateway(self, gateway_id: DeviceId, from_epoch: int, wrapped_secret: bytes,
                       created_ms: int, old_not_after_ms: int) -> bool:
        gw = bytes(gateway_id)
        with self._tx() as conn:
            cur = conn.execute("UPDATE gateways SET epoch = %s WHERE id = %s AND epoch = %s"
                               " AND status != %s",
                               (from_epoch + 1, gw, from_epoch, DeviceStatus.REVOKED.value))
            if cur.rowcount != 1:
                return False
            conn.execute("INSERT INTO gateway_secrets (gateway_id, epoch, wrapped_secret,"
                         " created_ms) VALUES (%s, %s, %s, %s)",
                         (gw, from_epoch + 1, wrapped_secret, created_ms))
            conn.execute("UPDATE gateway_secrets SET not_after_ms = LEAST(coalesce("
                         "not_after_ms, %s), %s) WHERE gateway_id = %s AND epoch <= %s",
                         (old_not_after_ms, old_not_after_ms, gw, from_epoch))
            return True

    def gateway_networks(self, gateway_id: DeviceId) -> list[bytes]:
        return [bytes(r[0]) for r in self._all(
            "SELECT network_id FROM gateway_networks WHERE gateway_id = %s ORDER BY network_id",
            (bytes(gateway_id),))]

    def assign_device(self, assignment: Assignment) -> None:
        try:
            self._change("INSERT INTO device_networks (device_id, network_id, mode, assigned_ms)"
                         " VALUES (%s, %s, %s, %s) ON CONFLICT (device_id) DO UPDATE"
                         " SET network_id = excluded.network_id, mode = excluded.mode,"
                         " assigned_ms = excluded.assigned_ms",
                         (bytes(assignment.device_id), bytes(assignment.network_id),
                          assignment.mode, assignment.assigned_ms))
        except pg_errors.IntegrityError as exc:
            raise ConfigError(f"cannot assign device ({type(exc).__name__})") from None

    def device_assignment(self, device_id: DeviceId) -> Assignment | None:
        row = self._one(_SELECT_ASSIGNMENT + " WHERE device_id = %s", (bytes(device_id),))
        return None if row is None else _assignment(row)

    def network_assignments(self, network_id: bytes) -> list[Assignment]:
        return [_assignment(r) for r in self._all(
            _SELECT_ASSIGNMENT + " WHERE network_id = %s ORDER BY device_id",
            (bytes(network_id),))]
