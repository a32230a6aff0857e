"""The optional store protocols (console, key lifecycle, compat, gateways) on PostgreSQL behave
like SQLite's: the same calls, in the same order, against both back ends, give the same answers.

SQLiteStore is the reference (its own feature tests live with each feature); this differential
test is what keeps PostgresStore's port of each statement honest.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pg_support
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.store import DeviceExists, SQLiteStore
from sensorseal.store.base import (
    ApiTokenRow,
    Assignment,
    AuditEvent,
    DeviceRecord,
    DeviceStatus,
    GatewayRecord,
    LegacyCredential,
    NetworkRecord,
    OperatorRow,
    SessionRow,
)
from sensorseal.store.postgres import PostgresStore


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    pg_support.require_postgres()
    with pg_support.fresh_database() as url:
        lite = SQLiteStore(tmp_path / "ref.db")
        lite.migrate()
        pg = PostgresStore(url, pool_size=2)
        pg.migrate()
        try:
            yield lite, pg
        finally:
            lite.close()
            pg.close()


def dev(n: int) -> DeviceRecord:
    return DeviceRecord(DeviceId(n.to_bytes(12, "big")), f"d{n}", DeviceStatus.ACTIVE, 1,
                        "standard", 100 + n)


def outcome(call: Callable[[], Any]) -> Any:
    try:
        return ("ok", call())
    except (ConfigError, DeviceExists) as exc:
        return ("raised", type(exc).__name__)


def same(both: tuple[Any, Any], name: str, *args: Any, **kwargs: Any) -> Any:
    lite, pg = both
    want = outcome(lambda: getattr(lite, name)(*args, **kwargs))
    got = outcome(lambda: getattr(pg, name)(*args, **kwargs))
    assert got == want, f"{name}{args}: sqlite {want} != postgresql {got}"
    return got


def test_console_methods_match_sqlite(both: tuple[Any, Any]) -> None:
    a, b = dev(1), dev(2)
    for s in both:
        s.add_device(a, b"w1")
        s.add_device(b, b"w2")
    same(both, "set_device_group", a.device_id, "north")
    same(both, "set_device_group", DeviceId(b"\x09" * 12), "x")
    same(both, "device_groups")
    same(both, "set_device_policy", b.device_id, "strict")
    same(both, "get_device", b.device_id)
    same(both, "put_policy", "p1", '{"min": "sealed"}', 5)
    same(both, "put_policy", "p1", '{"min": "signed"}', 6)
    same(both, "put_policy", "p0", "{}", 7)
    same(both, "list_policies")
    same(both, "delete_policy", "p0")
    same(both, "delete_policy", "p0")
    same(both, "attach_policy", "group", "north", "p1")
    same(both, "attach_policy", "network", "", "p1")
    same(both, "attach_policy", "network", "", None)
    same(both, "policy_attachments")
    op = OperatorRow("alice", "argon2id$x", "admin", None, False, 10)
    same(both, "add_operator", op)
    same(both, "add_operator", op)
    same(both, "add_operator", OperatorRow("bob", "h", "viewer", '["north"]', True, 11))
    same(both, "update_operator", "bob", disabled=False, password_hash="h2")
    same(both, "update_operator", "nobody", disabled=True)
    same(both, "get_operator", "bob")
    same(both, "get_operator", "nobody")
    same(both, "list_operators")
    same(both, "add_session", SessionRow("s1", "alice", "c", 1, 50))
    same(both, "add_session", SessionRow("s2", "alice", "c", 1, 500))
    same(both, "add_session", SessionRow("s3", "bob", "c", 1, 500))
    same(both, "get_session", "s2")
    same(both, "purge_sessions", 100)
    same(both, "delete_sessions_of", "alice")
    same(both, "delete_session", "s3")
    same(both, "get_session", "s3")
    tok = ApiTokenRow("t1", "ci", "ab" * 32, "operator", None, 3, "alice", None)
    same(both, "add_token", tok)
    same(both, "add_token", tok._replace(token_id="t0", created_ms=3))
    same(both, "revoke_token", "t1", 9)
    same(both, "revoke_token", "t1", 10)
    same(both, "get_token", "t1")
    same(both, "list_tokens")
    for s in both:
        s.add_events([AuditEvent(1, "replay", "http", "x", a.device_id.hex()),
                      AuditEvent(2, "bad_mac", "http", "x", b.device_id.hex()),
                      AuditEvent(3, "replay", "http", "x", "ff" * 12)])
    same(both, "events_for_devices", [a.device_id.hex(), b.device_id.hex()])
    same(both, "events_for_devices", [a.device_id.hex()], reason="replay", since_ms=1, limit=5)
    same(both, "events_for_devices", [])


def test_key_lifecycle_methods_match_sqlite(both: tuple[Any, Any]) -> None:
    a = dev(1)
    for s in both:
        s.add_device(a, b"w1")
    did = a.device_id
    same(both, "add_epoch", did, 1, b"x", 5)  # not above the current epoch
    same(both, "add_epoch", DeviceId(b"\x08" * 12), 2, b"x", 5)
    same(both, "add_epoch", did, 2, b"w2", 6, renewal_state=b"state", grace_ms=1000)
    same(both, "add_epoch", did, 2, b"w2b", 7)
    same(both, "get_renewal", did)
    same(both, "put_renewal", did, b"state2", 2000, 8)
    same(both, "switch_epoch", did, 1, 3, 99)  # no secret for 3
    same(both, "switch_epoch", did, 1, 2, 900, renewal_state=b"done")
    same(both, "switch_epoch", did, 1, 2, 900)  # already switched: the CAS fails
    same(both, "epoch_info", did, 1)
    same(both, "list_epochs", did)
    same(both, "get_renewal", did)
    same(both, "add_public_key", did, "signing", -8, b"k1", 1)
    same(both, "add_public_key", did, "signing", -8, b"k1", 2)
    same(both, "add_public_key", did, "renewal", 1, b"k2", 3)
    same(both, "public_keys", did, "signing")
    same(both, "wrapped_secrets")
    same(both, "wrapped_secrets", after=(did, 1), limit=1)
    same(both, "replace_secret", did, 1, b"nope", b"new")
    same(both, "replace_secret", did, 1, b"w1", b"new")
    same(both, "get_secret", did, 1)


def test_compat_methods_match_sqlite(both: tuple[Any, Any]) -> None:
    a = dev(1)
    cred = LegacyCredential(a.device_id, "valarm", a.device_id.hex(), b"wrapped",
                            '{"aes_bits": 128}', "active", None, 5)
    same(both, "add_legacy_device", a, cred)
    same(both, "add_legacy_device", dev(2), dataclasses.replace(cred, device_id=dev(2).device_id))
    same(both, "get_legacy", "valarm", a.device_id.hex())
    same(both, "get_legacy_of", a.device_id)
    same(both, "legacy_in_state", "active")
    same(both, "start_legacy_migration", a.device_id, 1, b"native", "standard", 9)  # epoch taken
    same(both, "start_legacy_migration", a.device_id, 2, b"native", "standard", 9)
    same(both, "start_legacy_migration", a.device_id, 3, b"native", "standard", 9)
    ev = AuditEvent(10, "legacy_migrated", "cli", "op", a.device_id.hex())
    same(both, "finish_legacy_migration", a.device_id, ev)
    same(both, "finish_legacy_migration", a.device_id, ev)
    same(both, "get_device", a.device_id)
    same(both, "claim_digest", a.device_id, b"d1", 100, 200)
    same(both, "claim_digest", a.device_id, b"d1", 150, 300)
    same(both, "claim_digest", a.device_id, b"d1", 250, 300)  # expired, claimable again
    same(both, "release_digest", a.device_id, b"d1")
    same(both, "claim_digest", a.device_id, b"d1", 260, 300)
    same(both, "hub_uptime", a.device_id)
    same(both, "set_hub_uptime", a.device_id, 1_000, 5)
    same(both, "set_hub_uptime", a.device_id, 2_000, 6)
    same(both, "hub_uptime", a.device_id)
    same(both, "queue_command", a.device_id, "reboot", 1)
    same(both, "queue_command", a.device_id, "ping", 2)
    same(both, "queue_command", DeviceId(b"\x07" * 12), "x", 2)
    same(both, "take_commands", a.device_id, 3, 1)
    same(both, "take_commands", a.device_id, 4, 10)
    same(both, "take_commands", a.device_id, 5, 10)


def test_gateway_methods_match_sqlite(both: tuple[Any, Any]) -> None:
    a = dev(1)
    for s in both:
        s.add_device(a, b"w1")
    net = NetworkRecord(b"\x01" * 12, "field", 1, "e1+e3", 7)
    same(both, "add_network", net, b"netkey")
    same(both, "get_network", net.network_id)
    same(both, "list_networks")
    same(both, "network_key", net.network_id)
    same(both, "network_key", b"\x02" * 12)
    gw = GatewayRecord(DeviceId(b"\x03" * 12), "gw", DeviceStatus.ACTIVE, 1, 8)
    same(both, "add_gateway", gw, b"gwsecret", [net.network_id])
    same(both, "add_gateway", gw._replace(gateway_id=DeviceId(b"\x04" * 12)), b"s",
         [b"\x05" * 12])
    same(both, "get_gateway", gw.gateway_id)
    same(both, "get_gateway", DeviceId(b"\x04" * 12))
    same(both, "gateway_secret", gw.gateway_id, 1)
    same(both, "gateway_secret", gw.gateway_id, 2)
    same(both, "gateway_networks", gw.gateway_id)
    same(both, "assign_device", Assignment(a.device_id, net.network_id, "e3", 9))
    same(both, "assign_device", Assignment(a.device_id, net.network_id, "e2+e3", 10))
    same(both, "assign_device", Assignment(a.device_id, b"\x06" * 12, "e3", 10))
    same(both, "device_assignment", a.device_id)
    same(both, "network_assignments", net.network_id)
