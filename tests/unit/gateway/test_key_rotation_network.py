"""Rotation of the E1 network key and of gateway keys (issue 4 item 1) and the gateway's own
reason for frames of networks it does not serve (issue 5).

- the E1 frame names its key epoch in the kid context: one encoding per epoch, nothing extra at
  epoch 0, and the epoch is an HKDF input (keys of two epochs differ);
- `network rotate`: both epochs accepted by a gateway during the grace period (frames in flight
  on both), the old one dropped and counted (`link_epoch`) after it, audited as unknown_epoch;
  a frame claiming the new epoch under the old key fails E1;
- `gateway rotate`: batches sealed under the old and the new gateway epoch both land during the
  grace period; afterwards the old one is refused as unknown_epoch, even from a warm cache;
- KEK rotation re-wraps every network epoch; migration 0008 keeps existing networks and
  gateways working; the store methods agree on SQLite and PostgreSQL;
- the CLI prints a new link key once, with the right exit codes.

Grace periods end through injected clocks, never sleeps.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from gateway_world import T0, World, make_world, sealed_batch

from sensorseal.cli import main
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import _bstr
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.core.link import (
    MAX_LINK_EPOCH,
    LinkAlg,
    NetworkKey,
    NetworkKeyring,
    open_frame,
    parse_frame,
    wrap,
)
from sensorseal.datadir import DataDir
from sensorseal.gateway.cloud import GatewayIngest
from sensorseal.gateway.config import GatewayConfig, _parse, load_config
from sensorseal.gateway.provision import GatewayRegistry, network_key_text, parse_network_key
from sensorseal.gateway.relay import DROP_REASONS, Forward, Reack, Relay, ack_payload
from sensorseal.keystore.software import SoftwareKeystore, load_kek
from sensorseal.lifecycle import rotate_kek
from sensorseal.store.base import DeviceStatus, GatewayRecord, NetworkRecord, WrappedKind
from sensorseal.store.sqlite import SQLiteStore, _statements, migrations

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for pg_support

NET = bytes.fromhex("6650a1b2c3d4e5f6aabbccdd")
KEY = bytes(range(16))
A = bytes.fromhex("6650a1b2c3d4e5f601234567")
HOUR = 3_600_000


# -- the frame: epoch in the kid context --------------------------------------------------------

def raw_frame(kid_context: bytes, *, order: tuple[int, ...] = (1, 4, 6, 10),
              ct: bytes = bytes(24)) -> bytes:
    """A frame built by hand (not authentic): to test the parser's structure checks."""
    values = {1: 10, 4: A, 6: b"\x05", 10: kid_context}
    hdr = cbor2.dumps({label: values[label] for label in order})
    return b"\xd0\x83" + _bstr(hdr) + b"\xa0" + _bstr(ct)


@pytest.mark.parametrize("alg", list(LinkAlg))
def test_epoch_zero_frames_are_the_frames_of_before(alg: LinkAlg) -> None:
    """A network that never rotated sends what it always sent: kid context = network id, and
    the per-sender key derived as before (HKDF info with the 12-byte network id)."""
    frame = wrap(b"hello", network=NetworkKey(NET, KEY, alg), sender=A, seq=1000)
    hdr = cbor2.loads(cbor2.loads(frame).value[0])
    assert hdr[10] == NET and len(hdr) == 4
    parsed = parse_frame(frame)
    assert parsed.epoch == 0 and parsed.network_id == NET
    assert open_frame(parsed, NetworkKey(NET, KEY, alg, epoch=0)) == b"hello"


@pytest.mark.parametrize("epoch", [1, 23, 255, 256, 65_535, 65_536, MAX_LINK_EPOCH])
def test_every_epoch_round_trips_and_costs_its_bytes_only(epoch: int) -> None:
    key = NetworkKey(NET, KEY, epoch=epoch)
    frame = wrap(b"reading", network=key, sender=A, seq=7)
    parsed = parse_frame(frame)
    assert (parsed.network_id, parsed.epoch, parsed.sender, parsed.seq) == (NET, epoch, A, 7)
    assert open_frame(parsed, NetworkKey(NET, KEY, epoch=epoch)) == b"reading"
    base = len(wrap(b"reading", network=NetworkKey(NET, KEY), sender=A, seq=7))
    assert len(frame) - base == (epoch.bit_length() + 7) // 8  # 1 byte up to 255, at most 4


def test_keys_of_two_epochs_differ_even_with_the_same_raw_key() -> None:
    """The epoch is an HKDF input: a frame of epoch 1 does not open under epoch 0's derivation
    although an operator loaded the same 16 bytes, and vice versa."""
    e0, e1 = NetworkKey(NET, KEY), NetworkKey(NET, KEY, epoch=1)
    # the derivation itself, recomputed from docs/protocol.md 14.1 (info names the kid context)
    for key, ctx in ((e0, NET), (e1, NET + b"\x01")):
        info = cbor2.dumps(["sensorseal/1", "link", ctx, A, 10, 16 + 13])
        okm = HKDF(algorithm=hashes.SHA256(), length=29, salt=None, info=info).derive(KEY)
        assert key.sender_keys(A)[0].iv == int.from_bytes(okm[16:], "big")
    f0, f1 = (parse_frame(wrap(b"same", network=k, sender=A, seq=5)) for k in (e0, e1))
    assert f0.ciphertext != f1.ciphertext
    for frame, wrong in ((f0, e1), (f1, e0)):
        with pytest.raises(Rejected) as exc:
            open_frame(frame, wrong)
        assert exc.value.reason is RejectReason.DECRYPT_FAILED
    # the same frame with its epoch byte changed (claiming epoch 2): authenticates nowhere
    bad = bytearray(wrap(b"same", network=e1, sender=A, seq=5))
    at = bytes(bad).index(NET + b"\x01") + 12
    bad[at] = 2
    with pytest.raises(Rejected) as exc:
        open_frame(parse_frame(bytes(bad)), NetworkKey(NET, KEY, epoch=2))
    assert exc.value.reason is RejectReason.DECRYPT_FAILED


@pytest.mark.parametrize("ctx, why", [
    (NET + b"\x00", "explicit epoch 0"),
    (NET + b"\x00\x01", "leading zero byte"),
    (NET + b"\x01\x02\x03\x04\x05", "more than 4 epoch bytes"),
    (NET[:11], "short network id"),
])
def test_one_encoding_per_epoch(ctx: bytes, why: str) -> None:
    assert parse_frame(raw_frame(NET + b"\x01")).epoch == 1  # the well-formed twin parses
    with pytest.raises(Rejected) as exc:
        parse_frame(raw_frame(ctx))
    assert exc.value.reason is RejectReason.MALFORMED, why


def test_label_order_is_fixed() -> None:
    assert parse_frame(raw_frame(NET)).epoch == 0
    with pytest.raises(Rejected) as exc:
        parse_frame(raw_frame(NET, order=(4, 1, 6, 10)))
    assert exc.value.reason is RejectReason.MALFORMED


def test_epoch_range_and_keyring_rules() -> None:
    for bad in (-1, MAX_LINK_EPOCH + 1):
        with pytest.raises(ConfigError):
            NetworkKey(NET, KEY, epoch=bad)
    ring = NetworkKeyring([(NetworkKey(NET, KEY), T0 + 10), (NetworkKey(NET, KEY, epoch=1), None)])
    assert ring.current.epoch == 1 and [k.epoch for k, _ in ring] == [0, 1]
    assert ring.usable(0, T0 + 9) is not None and ring.usable(0, T0 + 10) is None
    assert ring.get(0) is not None and ring.usable(1, 10**15) is not None
    assert ring.usable(2, T0) is None
    with pytest.raises(ConfigError):
        ring.add(NetworkKey(NET, KEY, epoch=1))
    with pytest.raises(ConfigError):
        ring.add(NetworkKey(bytes(12), KEY, epoch=2))
    assert KEY.hex() not in repr(ring) and KEY.hex() not in repr(NetworkKey(NET, KEY, epoch=3))


def test_key_text_carries_the_epoch() -> None:
    key = NetworkKey(NET, KEY, 10, epoch=3)
    text = network_key_text(key, KEY)
    assert text.startswith(f"ssn1.{NET.hex()}.3.10.")
    back = parse_network_key(text)
    assert (back.network_id, back.epoch, back.alg) == (NET, 3, 10)
    assert wrap(b"x", network=back, sender=A, seq=1) == wrap(b"x", network=key, sender=A, seq=1)
    legacy = f"ssn1.{NET.hex()}.10.{text.rsplit('.', 1)[1]}"  # texts printed before epochs
    assert parse_network_key(legacy).epoch == 0
    for bad in (f"ssn1.{NET.hex()}.03.10.AAAA", f"ssn1.{NET.hex()}.x.10.AAAA", "ssn1.a.b"):
        with pytest.raises(ConfigError):
            parse_network_key(bad)


# -- the gateway and the cloud -------------------------------------------------------------------

def relay_of(cfg: GatewayConfig) -> Relay:
    return Relay(bytes(cfg.gateway_id), cfg.networks, cfg.devices)


def deliver(world: World, cfg: GatewayConfig, items: list[bytes], seq: int,
            drops: list[tuple[str, int, int]] | None = None) -> list[int]:
    body = sealed_batch(cfg, items, seq, drops)
    return world.ingest.handle(body, e4=True, source="test")[1]


def forward(relay: Relay, frame: bytes, now: int) -> Forward:
    verdict = relay.receive(frame, now)
    assert isinstance(verdict, Forward), relay.counts
    relay.commit(verdict)
    return verdict


def test_network_rotation_both_epochs_in_grace_then_old_refused(world: World) -> None:
    net, key0 = world.network("e1+e4")
    cred_a, dev_a, _ = world.device(net, "e3")
    cred_b, dev_b, _ = world.device(net, "e2")
    assert dev_a is not None and dev_b is not None and key0.epoch == 0
    cfg0 = world.gateway([net])
    gw_id = cfg0.gateway_id
    # frames already on their way under epoch 0 when the operator rotates
    in_flight = [dev_a.frame(b'{"a":0}')[0], dev_b.frame(b'{"b":0}')[0]]

    key1, text = world.gateways.rotate_network(net, grace_ms=HOUR)
    assert key1.epoch == 1 and text.startswith(f"ssn1.{net.hex()}.1.")
    assert world.gateways.network_key_text(net) == text
    [event] = world.store.events(reason="network_key_rotated")
    assert f"epoch 0 -> 1, grace {HOUR // 1000}s" in event.detail and text not in event.detail
    doc = world.gateways.gateway_config(gw_id)
    assert [(n["epoch"], n["not_after_ms"]) for n in doc["networks"]] == [(0, T0 + HOUR),
                                                                          (1, None)]
    cfg = _parse(doc)
    relay = relay_of(cfg)

    dev_a.rekey(parse_network_key(text))  # device a got the new key; device b not yet
    with pytest.raises(ConfigError):
        dev_a.rekey(key0)  # never back to an older epoch
    fresh = [dev_a.frame(b'{"a":1}')[0], dev_b.frame(b'{"b":1}')[0]]
    assert [parse_frame(f).epoch for f in in_flight + fresh] == [0, 0, 1, 0]
    fwds = [forward(relay, f, T0 + 1000) for f in in_flight + fresh]
    # each ack is under the epoch of its frame: the device that sent it can open it
    for fwd, dev_key in zip(fwds, (key0, key0, key1, key0), strict=True):
        ack = parse_frame(relay.ack(fwd, 1))
        assert ack.epoch == fwd.link_epoch == dev_key.epoch
        assert open_frame(ack, dev_key) == ack_payload(fwd.sender, fwd.link_seq)
    assert isinstance(relay.receive(fresh[0], T0 + 1000), Reack)  # a resend is re-acked
    assert deliver(world, cfg, [f.item for f in fwds], 1) == [0, 0, 0, 0]
    assert world.store.count_telemetry(cred_a.device_id) == 2
    assert world.store.count_telemetry(cred_b.device_id) == 2

    # a member holding only the old key claims the new epoch: fails E1, counted as such
    old_as_new = NetworkKey(net, key0._key, key0.alg, epoch=1)
    assert relay.receive(wrap(b"x", network=old_as_new, sender=dev_b.sender, seq=900),
                         T0 + 1000) is None
    assert relay.counts["link_auth"] == 1
    # an epoch nobody issued
    assert relay.receive(wrap(b"x", network=NetworkKey(net, os.urandom(16), key0.alg, epoch=7),
                              sender=dev_b.sender, seq=901), T0 + 1000) is None
    assert relay.counts["link_epoch"] == 1

    # the grace period ends (the gateway's own clock): epoch 0 is dropped, epoch 1 flows
    late_old, late_new = dev_b.frame(b'{"b":2}')[0], dev_a.frame(b'{"a":2}')[0]
    assert relay.receive(late_old, T0 + HOUR) is None
    assert relay.counts["link_epoch"] == 2
    fwd = forward(relay, late_new, T0 + HOUR)
    assert deliver(world, cfg, [fwd.item], 2,
                   drops=[("link_epoch", relay.counts["link_epoch"], T0 + HOUR)]) == [0]
    [audit] = world.store.events(reason="unknown_epoch")
    assert audit.transport == "gateway" and "2 frames" in audit.detail \
        and "link_epoch" in audit.detail
    # the cloud clock moves on too: a configuration exported now holds epoch 1 only
    world.clock.now_ms = T0 + HOUR
    late = _parse(world.gateways.gateway_config(gw_id))
    assert [k.epoch for k, _ in late.networks[net]] == [1]
    assert relay_of(late).receive(dev_b.frame(b'{"b":3}')[0], T0 + HOUR) is None


def test_unknown_network_has_its_own_reason(world: World) -> None:
    net, _ = world.network()
    _, dev, _ = world.device(net, "e3")
    assert dev is not None
    cfg = world.gateway([net])
    relay = relay_of(cfg)
    elsewhere = NetworkKey(os.urandom(12), os.urandom(16))
    for seq in range(3):
        assert relay.receive(wrap(b"hi", network=elsewhere, sender=dev.sender, seq=seq),
                             T0) is None
    assert relay.counts["unknown_network"] == 3 and relay.counts["unknown_device"] == 0
    assert DROP_REASONS["unknown_network"] is RejectReason.UNKNOWN_NETWORK
    assert DROP_REASONS["link_epoch"] is RejectReason.UNKNOWN_EPOCH
    assert Rejected(RejectReason.UNKNOWN_NETWORK).status == 403
    deliver(world, cfg, [], 1, drops=[("unknown_network", 3, T0)])
    [event] = world.store.events(reason="unknown_network")
    assert "3 frames" in event.detail
    assert world.store.events(reason="unknown_device") == []


@pytest.mark.parametrize("ttl_ms", [0, 1000])  # 1000: the server's default status TTL
def test_gateway_rotation_old_and_new_batches_land_then_old_refused(
        tmp_path: Path, ttl_ms: int) -> None:
    world = make_world(tmp_path)
    try:
        ingest = GatewayIngest(world.gateways, world.pipeline, world.store,
                               clock_ms=world.clock, ttl_ms=ttl_ms)
        net, _ = world.network("e1+e4")
        _, dev, _ = world.device(net, "e3")
        assert dev is not None
        old = world.gateway([net])
        relay = relay_of(old)

        def batch(cfg: GatewayConfig, seq: int) -> list[int]:
            item = forward(relay, dev.frame(b"%d" % seq)[0], world.clock.now_ms).item  # type: ignore[union-attr]
            return ingest.handle(sealed_batch(cfg, [item], seq), e4=True, source="t")[1]

        assert batch(old, 1) == [0]  # warms the cache when ttl_ms > 0
        cred = world.gateways.rotate_gateway(old.gateway_id, grace_ms=HOUR)
        assert cred.epoch == old.credential.epoch + 1 and cred.secret != old.credential.secret
        [event] = world.store.events(reason="gateway_key_rotated")
        assert f"epoch {old.credential.epoch} -> {cred.epoch}" in event.detail
        new = _parse(world.gateways.gateway_config(old.gateway_id))
        assert new.credential == cred
        # a gateway still running the old configuration and one restarted with the new one;
        # a server sees the rotation within its TTL (the CLI runs in another process)
        world.clock.now_ms = T0 + 1000
        assert batch(old, 2) == [0]
        assert batch(new, 1) == [0]
        assert batch(old, 3) == [0]
        world.clock.now_ms = T0 + HOUR - 1
        assert batch(old, 4) == [0]
        world.clock.now_ms = T0 + HOUR  # grace over: refused on time, even from the cache
        # (with ttl_ms=1000 the context checked 1 ms ago is served from the cache here)
        with pytest.raises(Rejected) as exc:
            batch(old, 5)
        assert exc.value.reason is RejectReason.UNKNOWN_EPOCH
        assert batch(new, 2) == [0]
        assert world.store.count_telemetry() == 6
        # a second rotation never extends the first epoch's end
        world.gateways.rotate_gateway(old.gateway_id, grace_ms=100 * HOUR)
        info = world.gateways.gateway_epoch(old.gateway_id, old.credential.epoch)
        assert info is not None and info.not_after_ms == T0 + HOUR
        info = world.gateways.gateway_epoch(old.gateway_id, cred.epoch)
        assert info is not None and info.not_after_ms == T0 + 101 * HOUR
    finally:
        world.close()


def test_rotation_refusals_and_compare_and_swap(world: World) -> None:
    net, _ = world.network()
    cfg = world.gateway([net])
    gw = cfg.gateway_id
    with pytest.raises(ConfigError):
        world.gateways.rotate_network(net, grace_ms=-1)
    with pytest.raises(ConfigError):
        world.gateways.rotate_network(os.urandom(12))
    with pytest.raises(ConfigError):
        world.gateways.rotate_gateway(DeviceId(os.urandom(12)))
    # another process rotated meanwhile: the stale rotation changes nothing
    assert not world.store.rotate_network_key(net, 5, b"blob", T0, T0)
    assert not world.store.rotate_gateway(gw, cfg.credential.epoch + 3, b"blob", T0, T0)
    assert [r.epoch for r in world.store.network_keys(net)] == [0]
    with world.store._write() as conn:
        conn.execute("UPDATE gateways SET status = 'revoked' WHERE id = ?", (bytes(gw),))
    with pytest.raises(ConfigError, match="revoked"):
        world.gateways.rotate_gateway(gw)
    assert not world.store.rotate_gateway(gw, cfg.credential.epoch, b"blob", T0, T0)
    with pytest.raises(Rejected) as exc:
        world.ingest.handle(sealed_batch(cfg, [], 1), e4=True, source="t")
    assert exc.value.reason is RejectReason.REVOKED


def test_config_written_before_epochs_still_loads(tmp_path: Path, world: World) -> None:
    net, _ = world.network()
    cfg = world.gateway([net])
    doc = world.gateways.gateway_config(cfg.gateway_id)
    for n in doc["networks"]:
        del n["epoch"], n["not_after_ms"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    loaded = load_config(path)
    (key, end), = list(loaded.networks[net])
    assert key.epoch == 0 and end is None


# -- KEK rotation, migration 0008, both back ends --------------------------------------------------

def test_kek_rotation_rewraps_every_network_epoch(tmp_path: Path) -> None:
    path = tmp_path / "data"
    DataDir(path, env={}).init()
    store = SQLiteStore(path / "sensorseal.db")
    store.migrate()
    try:
        old = SoftwareKeystore(load_kek(path, {}))
        gws = GatewayRegistry(store, old)
        record, text0 = gws.add_network("field")
        net = record.network_id
        texts = [text0] + [gws.rotate_network(net)[1] for _ in range(3)]
        raws = [parse_network_key(t) for t in texts]
        result = rotate_kek(path, store, env={})
        assert result.rewrapped == 4
        new = SoftwareKeystore(load_kek(path, {}))
        rows = store.network_keys(net)
        assert [r.epoch for r in rows] == [0, 1, 2, 3]
        assert all(r.wrapped[1:5].hex() == new.kek_id for r in rows)
        fresh = GatewayRegistry(store, new)
        for epoch, key in enumerate(raws):
            assert wrap(b"x", network=fresh.network_key(net, epoch), sender=A, seq=1) == \
                wrap(b"x", network=key, sender=A, seq=1)
        # a stolen database with the old KEK, or none, yields no network key of any epoch
        for r in rows:
            for keystore in (old, SoftwareKeystore(os.urandom(32))):
                with pytest.raises(ConfigError):
                    keystore.unwrap(DeviceId(net), r.epoch, r.wrapped)
        # a blob moved onto another epoch's row does not unwrap (bound to (id, epoch))
        with pytest.raises(ConfigError):
            new.unwrap(DeviceId(net), 1, rows[0].wrapped)
    finally:
        store.close()
    db = b"".join(p.read_bytes() for p in path.glob("sensorseal.db*"))
    assert all(key._key not in db for key in raws)  # only wrapped blobs on disk


def _schema7_then_migrate(open_store: Callable[[], Any], run_sql: Callable[[str, tuple[Any, ...]],
                                                                           None],
                          keystore: SoftwareKeystore, ph: str) -> Any:
    """A database as sensorseal left it at schema 7 (network key in networks.wrapped_key,
    gateway secret in gateways.wrapped_secret), then migrated to 8."""
    net, gw = os.urandom(12), os.urandom(12)
    key, secret = os.urandom(16), os.urandom(32)
    q = ", ".join([ph] * 6)
    run_sql(f"INSERT INTO networks (id, name, alg, required_layers, wrapped_key, created_ms)"
            f" VALUES ({q})", (net, "old", 10, "e1+e3", keystore.wrap(DeviceId(net), 0, key), 5))
    run_sql(f"INSERT INTO gateways (id, name, status, epoch, wrapped_secret, created_ms)"
            f" VALUES ({q})", (gw, "gw", "active", 1, keystore.wrap(DeviceId(gw), 1, secret), 6))
    run_sql(f"INSERT INTO gateway_networks (gateway_id, network_id) VALUES ({ph}, {ph})",
            (gw, net))
    store = open_store()
    store.migrate()
    gws = GatewayRegistry(store, keystore, clock_ms=lambda: T0)
    assert gws.network_key(net).epoch == 0
    # a device provisioned before the change still talks to the network
    before = NetworkKey(net, key)
    assert open_frame(parse_frame(wrap(b"hi", network=before, sender=A, seq=3)),
                      gws.network_key(net)) == b"hi"
    assert gws.gateway_secret(DeviceId(gw), 1) == secret
    info = gws.gateway_epoch(DeviceId(gw), 1)
    assert info is not None and info.not_after_ms is None
    doc = gws.gateway_config(DeviceId(gw))
    assert DeviceCredential.parse(doc["gateway"]).secret == secret
    assert [(n["epoch"], n["not_after_ms"]) for n in doc["networks"]] == [(0, None)]
    # and it rotates like a new one
    gws.rotate_network(net, grace_ms=HOUR)
    gws.rotate_gateway(DeviceId(gw), grace_ms=HOUR)
    assert [r.epoch for r in store.network_keys(net)] == [0, 1]
    assert store.get_gateway(DeviceId(gw)).epoch == 2
    return store


def test_migration_0008_keeps_sqlite_networks_and_gateways(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                 " applied_ms INTEGER NOT NULL)")
    for version, name, sql in migrations():
        if version > 7:
            break
        for statement in _statements(sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, ?, 0)", (version, name))
    keystore = SoftwareKeystore(os.urandom(32))

    def run_sql(sql: str, args: tuple[Any, ...]) -> None:
        conn.execute(sql, args)

    store = _schema7_then_migrate(lambda: SQLiteStore(db), run_sql, keystore, "?")
    conn.close()
    try:
        cols = {r[1] for r in store._reader.execute("PRAGMA table_info(networks)")}
        assert "wrapped_key" not in cols  # the key lives in network_keys only
        assert store.schema_version() == 8
    finally:
        store.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    import pg_support

    pg_support.require_postgres()
    with pg_support.fresh_database(prefix="sensorseal_rot") as url:
        yield url


def test_migration_0008_keeps_postgres_networks_and_gateways(pg_url: str) -> None:
    import psycopg

    from sensorseal.store.postgres import PostgresStore
    from sensorseal.store.postgres import migrations as pg_migrations

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                     " name TEXT NOT NULL, applied_ms BIGINT NOT NULL)")
        for version, name, sql in pg_migrations():
            if version > 7:
                break
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_version VALUES (%s, %s, 0)", (version, name))
        keystore = SoftwareKeystore(os.urandom(32))

        def run_sql(sql: str, args: tuple[Any, ...]) -> None:
            conn.execute(sql.encode(), args)

        store = _schema7_then_migrate(lambda: PostgresStore(pg_url, pool_size=2), run_sql,
                                      keystore, "%s")
    try:
        assert store.schema_version() == 8
    finally:
        store.close()


def test_store_methods_match_on_postgres(tmp_path: Path, pg_url: str) -> None:
    from sensorseal.store.postgres import PostgresStore

    lite = SQLiteStore(tmp_path / "ref.db")
    lite.migrate()
    pg = PostgresStore(pg_url, pool_size=2)
    pg.migrate()

    def same(name: str, *args: Any, **kw: Any) -> Any:
        got = []
        for s in (lite, pg):
            try:
                got.append(("ok", getattr(s, name)(*args, **kw)))
            except ConfigError as exc:
                got.append(("raised", type(exc).__name__))
        assert got[0] == got[1], f"{name}{args}: sqlite {got[0]} != postgresql {got[1]}"
        return got[0][1]

    try:
        net = NetworkRecord(b"\x01" * 12, "field", 10, "e1+e3", 7)
        gw = GatewayRecord(DeviceId(b"\x03" * 12), "gw", DeviceStatus.ACTIVE, 1, 8)
        same("add_network", net, b"k0")
        same("add_gateway", gw, b"s1", [net.network_id])
        assert same("rotate_network_key", net.network_id, 1, b"k1", 10, 100) is True
        assert same("rotate_network_key", net.network_id, 1, b"kx", 11, 100) is False
        assert same("rotate_network_key", net.network_id, 3, b"kx", 11, 100) is False
        assert same("rotate_network_key", b"\x09" * 12, 1, b"kx", 11, 100) is False
        assert same("rotate_network_key", net.network_id, 2, b"k2", 20, 500) is True
        rows = same("network_keys", net.network_id)
        assert [(r.epoch, r.wrapped, r.not_after_ms) for r in rows] == [
            (0, b"k0", 100), (1, b"k1", 500), (2, b"k2", None)]
        assert same("network_key", net.network_id) == b"k2"
        same("network_keys", b"\x09" * 12)
        assert same("rotate_gateway", gw.gateway_id, 1, b"s2", 30, 300) is True
        assert same("rotate_gateway", gw.gateway_id, 1, b"s3", 30, 300) is False
        same("get_gateway", gw.gateway_id)
        assert same("gateway_epoch", gw.gateway_id, 1).not_after_ms == 300
        same("gateway_epoch", gw.gateway_id, 2)
        same("gateway_epoch", gw.gateway_id, 3)
        same("gateway_secret", gw.gateway_id, 2)
        for kind in (WrappedKind.NETWORK, WrappedKind.GATEWAY):
            same("kek_blobs", kind)
            same("kek_blobs", kind, after=(net.network_id, 0), limit=1)
            same("kek_blobs", kind, after=(bytes(gw.gateway_id), 1))
        assert same("replace_kek_blob", WrappedKind.NETWORK, net.network_id, 1, b"k1",
                    b"k1'") is True
        assert same("replace_kek_blob", WrappedKind.NETWORK, net.network_id, 2, b"k1",
                    b"k1'") is False
    finally:
        lite.close()
        pg.close()


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_network_and_gateway_rotate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    DataDir(data, env={}).init()
    store, keystore = DataDir(data, env={}).open()
    try:
        gws = GatewayRegistry(store, keystore)
        record, text0 = gws.add_network("field")
        gw = gws.add_gateway("gw", [record.network_id])
    finally:
        store.close()
    runner = CliRunner()
    base = ["--data-dir", str(data)]
    nid = record.network_id.hex()

    r = runner.invoke(main, [*base, "network", "rotate", nid, "--grace", "2h"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    texts = [ln for ln in lines if ln.startswith("ssn1.")]
    assert len(texts) == 1 and texts[0].startswith(f"ssn1.{nid}.1.")  # shown once, here
    assert "epoch 0 stays valid for 7200s" in r.output
    key1 = parse_network_key(texts[0])

    # the gateway rotates and writes its new configuration: new credential, both epochs
    out = tmp_path / "gw.json"
    r = runner.invoke(main, [*base, "gateway", "rotate", str(gw.device_id), "--grace", "90m",
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "epoch 1 stays valid for 5400s" in r.output and "ss1." not in r.output
    cfg = load_config(out)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert cfg.credential.epoch == 2 and cfg.credential.secret != gw.secret
    ring = cfg.networks[record.network_id]
    assert [k.epoch for k, _ in ring] == [0, 1]
    assert wrap(b"x", network=ring.current, sender=A, seq=1) == \
        wrap(b"x", network=key1, sender=A, seq=1)
    assert text0 not in r.output

    # exit codes: 2 for usage, 3 for what the registry refuses; nothing printed as a key
    for args, code in (
            (["network", "rotate", "zz"], 2),
            (["network", "rotate", nid, "--grace", "7x"], 2),
            (["network", "rotate", nid, "--grace", "400d"], 2),
            (["network", "rotate", os.urandom(12).hex()], 3),
            (["gateway", "rotate", os.urandom(12).hex()], 3),
            (["gateway", "rotate", str(gw.device_id), "--out", str(out)], 2)):
        r = runner.invoke(main, [*base, *args])
        assert r.exit_code == code, (args, r.output)
        assert "ssn1." not in r.output
    # the refused calls changed nothing
    store, keystore = DataDir(data, env={}).open()
    try:
        assert [x.epoch for x in store.network_keys(record.network_id)] == [0, 1]
        assert store.get_gateway(gw.device_id).epoch == 2  # type: ignore[union-attr]
        reasons = [e.reason for e in store.events(limit=100)]
        assert reasons.count("network_key_rotated") == 1
        assert reasons.count("gateway_key_rotated") == 1
    finally:
        store.close()
