"""Relay (the gateway's decisions) and the cloud's gateway route, in one process: every mode,
every drop reason, a hostile gateway under E3, and the layers a network requires enforced."""

from __future__ import annotations

import json
import os

import cbor2
import pytest
from gateway_world import T0, World, sealed_batch

from sensorseal.core.envelope import seal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.core.layers import E3_ROUTE, Layer, envelope_item, gateway_secret
from sensorseal.core.link import NetworkKey, parse_frame, wrap
from sensorseal.gateway.relay import Forward, RateLimit, Reack, Relay


def relay_for(world: World, networks: list[bytes], **kw: object) -> tuple[Relay, object]:
    cfg = world.gateway(networks)
    return Relay(bytes(cfg.gateway_id), cfg.networks, cfg.devices, **kw), cfg  # type: ignore[arg-type]


def deliver(world: World, cfg: object, items: list[bytes], seq: int, e4: bool = True
            ) -> list[int]:
    body = sealed_batch(cfg, items, seq)  # type: ignore[arg-type]
    _, codes = world.ingest.handle(body, e4=e4, source="test")
    return codes


@pytest.mark.parametrize("mode", ["e3", "e2", "e2+e3"])
def test_every_mode_reaches_the_cloud_once(world: World, mode: str) -> None:
    net, _ = world.network("e1+e4" if mode == "e2" else "e1+e3+e4")
    cred, dev, _ = world.device(net, mode)
    relay, cfg = relay_for(world, [net])
    assert dev is not None
    frames = [dev.frame(json.dumps({"i": i}).encode())[0] for i in range(3)]
    fwds = [relay.receive(f, T0) for f in frames]
    assert all(isinstance(f, Forward) for f in fwds)
    for f in fwds:
        relay.commit(f)  # type: ignore[arg-type]
    assert deliver(world, cfg, [f.item for f in fwds], 1) == [0, 0, 0]  # type: ignore[union-attr]
    rows = world.store.telemetry(device_id=cred.device_id)
    assert sorted(json.loads(r.payload)["i"] for r in rows) == [0, 1, 2]
    want = {"e3": "e1+e3+e4", "e2": "e1+e2+e4", "e2+e3": "e1+e2+e3+e4"}[mode]
    assert {r.transport for r in rows} == {f"gateway:{cfg.gateway_id.hex()}:{want}"}  # type: ignore[attr-defined]
    # the same frame again: authentic, already buffered -> re-acked, never forwarded twice
    assert isinstance(relay.receive(frames[0], T0), Reack)
    # the same items in a later batch: stored once, the copies refused as replays
    assert deliver(world, cfg, [f.item for f in fwds], 2) == [1, 1, 1]  # type: ignore[union-attr]
    assert world.store.count_telemetry(cred.device_id) == 3


def test_bad_input_is_dropped_early_and_counted(world: World) -> None:
    net, key = world.network()
    _, dev, _ = world.device(net, "e2")
    _, flooder, _ = world.device(net, "e3")
    relay, _ = relay_for(world, [net], mtu=255, rate=RateLimit(per_s=1, burst=5))
    assert dev is not None and flooder is not None
    stranger = NetworkKey(key.network_id, os.urandom(16), key.alg)
    elsewhere = NetworkKey(os.urandom(12), os.urandom(16))
    cases = {
        "garbage": os.urandom(60),
        "oversize": dev.frame(b"x" * 300)[0],
        "unknown_network": wrap(b"hi", network=elsewhere, sender=dev.sender, seq=1),
        "link_auth": wrap(b"hi", network=stranger, sender=dev.sender, seq=99),
        "unknown_device": wrap(b"hi", network=key, sender=os.urandom(12), seq=1),
    }
    for label, frame in cases.items():
        assert relay.receive(frame, T0) is None, label
        assert relay.counts[label] == 1, label
    # an E2 frame whose inner layer is not under the device's gateway key
    forged = seal(b"x", keys=derive(os.urandom(32), DeviceId(dev.sender), 1, Direction.UP),
                  seq=5, route="/e2/" + net.hex(), timestamp_ms=T0)
    assert relay.receive(wrap(forged, network=key, sender=dev.sender, seq=500), T0) is None
    assert relay.counts["e2_failed"] == 1
    # a flooding device is cut to its bucket; the other device keeps being served
    passed = sum(isinstance(relay.receive(flooder.frame(b"f")[0], T0), Forward)
                 for _ in range(50))
    assert passed == 5 and relay.counts["rate_limited"] == 45
    assert isinstance(relay.receive(dev.frame(b"ok")[0], T0), Forward)


def test_hostile_gateway_under_e3_learns_nothing_and_cannot_alter(world: World) -> None:
    net, _ = world.network("e1+e3")
    cred, dev, _ = world.device(net, "e3")
    relay, cfg = relay_for(world, [net])
    assert dev is not None
    secret_payload = b'{"patient_heart_rate":71,"label":"S3CR3T-READING"}'
    frame, _ = dev.frame(secret_payload)
    fwd = relay.receive(frame, T0)
    assert isinstance(fwd, Forward)
    # Everything the gateway holds: its config (network keys, E2 secrets), the frame, the item.
    seen = [frame, fwd.item, json.dumps(world.gateway_config_doc(cfg.gateway_id)).encode()]
    for blob in seen:
        assert b"S3CR3T" not in blob and b"heart" not in blob
    # E2 secrets it holds are one-way from the root: not the root, not its E3 keys
    assert gateway_secret(cred.secret, cred.device_id, 1) != cred.secret
    inner = cbor2.loads(fwd.item)[2]
    seq = 10
    # 1. any changed byte of the inner envelope: refused
    for i in (5, len(inner) // 2, len(inner) - 1):
        bad = bytearray(inner)
        bad[i] ^= 0x40
        seq += 1
        assert deliver(world, cfg, [envelope_item(frozenset({Layer.E1}), bytes(bad))], seq) == [1]
    # 2. an envelope it makes up for the device (it has no E3 key): refused
    fake = seal(b'{"patient_heart_rate":200}', keys=derive(os.urandom(32), cred.device_id, 1,
                Direction.UP), seq=77, route=E3_ROUTE, timestamp_ms=T0)
    assert deliver(world, cfg, [envelope_item(frozenset({Layer.E1}), fake)], 20) == [1]
    # 3. claiming it checked E2 for an E3 device, or that E3/E4 happened: refused
    with pytest.raises(Rejected):
        deliver(world, cfg, [cbor2.dumps([0, "e1+e3", inner])], 21)
    # 4. the genuine item, then a replay of it: stored once
    assert deliver(world, cfg, [fwd.item], 22) == [0]
    assert deliver(world, cfg, [fwd.item], 23) == [1]
    # 5. replaying a whole batch envelope: refused at the batch level
    body = sealed_batch(cfg, [fwd.item], 24)
    world.ingest.handle(body, e4=True, source="t")
    with pytest.raises(Rejected) as exc:
        world.ingest.handle(body, e4=True, source="t")
    assert exc.value.reason is RejectReason.REPLAY
    rows = world.store.telemetry(device_id=cred.device_id)
    assert [r.payload for r in rows] == [secret_payload]
    reasons = world.store.count_events_by_reason()
    refused = reasons.get("decrypt_failed", 0) + reasons.get("malformed", 0)
    assert refused >= 4 and reasons.get("replay", 0) >= 1


def test_the_cloud_enforces_the_required_layers(world: World) -> None:
    strict, _ = world.network("e1+e3+e4")
    other, _ = world.network("e1+e3")
    _cred, dev, raw = world.device(strict, "e3")
    _, dev_e2, _ = world.device(strict, "e2")
    _, dev_other, _ = world.device(other, "e3")
    relay, cfg = relay_for(world, [strict])
    relay_other, cfg_other = relay_for(world, [other])
    assert dev is not None and dev_e2 is not None and dev_other is not None

    def item(r: Relay, d: object, payload: bytes) -> bytes:
        f = r.receive(d.frame(payload)[0], T0)  # type: ignore[attr-defined]
        assert isinstance(f, Forward)
        r.commit(f)
        return f.item

    # no TLS upstream (E4 missing) -> policy_violation
    assert deliver(world, cfg, [item(relay, dev, b"1")], 1, e4=False) == [1]
    # E2-only where the network requires E3 -> policy_violation
    assert deliver(world, cfg, [item(relay, dev_e2, b"2")], 2) == [1]
    # a gateway vouching for a network it does not serve -> policy_violation
    assert deliver(world, cfg, [item(relay_other, dev_other, b"3")], 3) == [1]
    # the device bypassing its gateway (direct HTTPS: no E1) -> policy_violation
    direct = raw.seal(b"4", route="/v1/messages")
    [r] = world.pipeline.ingest([(direct, "/v1/messages")], transport="http", source="t",
                                opener=world.ingest.direct_opener(True))
    assert r.reason is RejectReason.POLICY_VIOLATION
    # the right combination passes
    assert deliver(world, cfg, [item(relay, dev, b"5")], 4) == [0]
    assert deliver(world, cfg_other, [item(relay_other, dev_other, b"6")], 1, e4=False) == [0]
    assert world.store.count_events_by_reason()["policy_violation"] == 4


def test_unknown_or_forged_gateway_is_refused(world: World) -> None:
    net, _ = world.network()
    _, cfg = relay_for(world, [net])
    forged = type(cfg)(type(cfg.credential)(cfg.gateway_id, 1, os.urandom(32)),  # type: ignore[attr-defined]
                       cfg.networks, cfg.devices)  # type: ignore[attr-defined]
    with pytest.raises(Rejected) as exc:
        world.ingest.handle(sealed_batch(forged, [], 1), e4=True, source="t")
    assert exc.value.reason is RejectReason.DECRYPT_FAILED
    drops = sealed_batch(cfg, [], 2, drops=[("link_auth", 7, T0)])  # type: ignore[arg-type]
    assert world.ingest.handle(drops, e4=True, source="t")[1] == []
    [event] = world.store.events(reason="decrypt_failed")
    assert event.transport == "gateway" and "7 frames" in event.detail


def test_frames_fit_a_radio(world: World) -> None:
    net, _ = world.network()
    _, dev, _ = world.device(net, "e2+e3")
    assert dev is not None
    frame, _ = dev.frame(b"x" * 60)
    assert len(frame) <= 255
    assert parse_frame(frame).network_id == net
