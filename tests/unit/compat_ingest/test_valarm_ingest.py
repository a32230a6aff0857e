"""Valarm messages through the legacy ingest path: key lookup, MAC, policy, replay, audit."""

from __future__ import annotations

import json

import pytest
from compat_helpers import SOURCE, T0, Env, valarm_body, valarm_sig

from sensorseal.core.errors import RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.registry import LEGACY_EPOCH

DEV = "5f1a2b3c4d5e6f7081928374"


def add(env: Env, policy: str = "legacy", dev: str = DEV, key: str | None = None) -> str:
    d = env.registry.add_legacy_device("hub", "valarm", external_id=dev, secret=key,
                                       policy=policy)
    return key if key is not None else str(d.generated_secret)


def post(env: Env, body: bytes, sig: str | None):  # type: ignore[no-untyped-def]
    return env.compat.valarm(body, sig, source=SOURCE)


@pytest.mark.parametrize(("alg", "policy"), [("sha256", "legacy"), ("md5", "legacy"),
                                             ("sha256", "lax"), ("md5", "legacy-unsigned")])
def test_right_mac_accepted_and_stored(env: Env, alg: str, policy: str) -> None:
    key = add(env, policy)
    assert len(key) == 20 and key.isalnum()
    body = valarm_body(DEV, seq=7, readings={"temp_c": 21.5, "door": True})
    out = post(env, body, valarm_sig(body, key, alg))
    assert out.ok and out.device_id == DEV and out.weak == (alg == "md5")
    [row] = env.store.telemetry(device_id=DeviceId.parse(DEV))
    assert (row.epoch, row.seq, row.level, row.route) == (LEGACY_EPOCH, 7, f"legacy:valarm-{alg}",
                                                          "/v1/compat/valarm")
    assert json.loads(row.payload)["readings"] == {"temp_c": 21.5, "door": True}
    assert env.compat.stats.accepted["valarm"] == 1


@pytest.mark.parametrize("policy", ["lax", "standard", "stringent"])
def test_md5_refused_without_a_legacy_policy(env: Env, policy: str) -> None:
    key = add(env, policy)
    body = valarm_body(DEV)
    out = post(env, body, valarm_sig(body, key, "md5"))
    assert out.reason is RejectReason.POLICY_VIOLATION
    assert env.reasons() == ["policy_violation"]
    assert env.store.count_telemetry() == 0


def test_sha256_refused_where_only_sealed_is_allowed(env: Env) -> None:
    key = add(env, "standard")
    body = valarm_body(DEV)
    assert post(env, body, valarm_sig(body, key)).reason is RejectReason.POLICY_VIOLATION


def test_every_refusal_audited_with_its_reason(env: Env) -> None:
    key = add(env)
    good = valarm_body(DEV, seq=1)
    assert post(env, good, valarm_sig(good, key)).ok
    cases = [
        (valarm_body(DEV, seq=2), valarm_sig(valarm_body(DEV, seq=2), "Z" * 20), "bad_mac"),
        (good.replace(b"21.5", b"31.5"), valarm_sig(good, key), "bad_mac"),  # altered byte
        (good, valarm_sig(good, key), "replay"),  # the same message again
        (valarm_body(DEV, seq=3, ts=T0 - 2 * 3600_000),
         valarm_sig(valarm_body(DEV, seq=3, ts=T0 - 2 * 3600_000), key), "stale"),
        (valarm_body("5f1a2b3c4d5e6f70819283ff"),
         valarm_sig(valarm_body("5f1a2b3c4d5e6f70819283ff"), key), "unknown_device"),
        (good, "sha1=" + "0" * 40, "unsupported"),
        (good, None, "malformed"),
        (b"{not json", valarm_sig(b"{not json", key), "malformed"),
        (b"[" * 5000 + b"]" * 5000, valarm_sig(b"[]", key), "malformed"),  # JSON bomb
        (b"x" * 20_000, valarm_sig(b"x", key), "oversize"),
    ]
    for body, sig, reason in cases:
        out = post(env, body, sig)
        assert not out.ok and out.reason == reason, (reason, out)
    assert env.reasons() == [c[2] for c in cases]
    events = env.store.events(reason="bad_mac")
    assert all(e.device_id == DEV and e.source == SOURCE for e in events)
    assert all(key not in e.detail for e in env.store.events(limit=100))
    assert env.store.count_telemetry() == 1


def test_altered_byte_anywhere_is_refused(env: Env) -> None:
    key = add(env)
    body = valarm_body(DEV, seq=5)
    sig = valarm_sig(body, key)
    for i in range(len(body)):
        altered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
        assert not post(env, altered, sig).ok
    assert env.store.count_telemetry() == 0
    assert post(env, body, sig).ok


def test_suspended_and_revoked_refused(env: Env) -> None:
    key = add(env)
    did = DeviceId.parse(DEV)
    env.registry.suspend(did)
    body = valarm_body(DEV, seq=1)
    assert post(env, body, valarm_sig(body, key)).reason is RejectReason.SUSPENDED
    env.registry.resume(did)
    assert post(env, body, valarm_sig(body, key)).ok
    env.registry.revoke(did)
    body2 = valarm_body(DEV, seq=2)
    assert post(env, body2, valarm_sig(body2, key)).reason is RejectReason.REVOKED
    assert [e.device_id for e in env.store.events(reason="suspended")] == [DEV]
    assert [e.device_id for e in env.store.events(reason="revoked")] == [DEV]


def test_replay_refused_after_restart_and_left_of_window(env: Env) -> None:
    from sensorseal.server.compat_ingest import CompatIngest

    key = add(env)
    for seq in (1, 2, 100):
        body = valarm_body(DEV, seq=seq)
        assert post(env, body, valarm_sig(body, key)).ok
    fresh = CompatIngest(env.registry, env.store, clock_ms=env.clock)  # a restart
    for seq, reason in ((100, "replay"), (2, "replay"), (50, None)):
        body = valarm_body(DEV, seq=seq)
        out = fresh.valarm(body, valarm_sig(body, key), source=SOURCE)
        assert out.reason == (None if reason is None else RejectReason(reason)), seq


def test_millisecond_timestamps_as_counter_fit_64_bit(env: Env) -> None:
    key = add(env)
    for ts in (T0, T0 + 1000):
        body = valarm_body(DEV, seq=None, ts=ts)
        assert post(env, body, valarm_sig(body, key)).ok
    body = valarm_body(DEV, seq=None, ts=T0 + 1000)
    assert post(env, body, valarm_sig(body, key)).reason is RejectReason.REPLAY
    rows = env.store.telemetry(device_id=DeviceId.parse(DEV))
    assert [r.seq for r in rows] == [T0 + 1000, T0] and T0 > 2**40
    big = 2**63 - 1
    body = valarm_body(DEV, seq=big)
    assert post(env, body, valarm_sig(body, key)).ok
    assert env.store.max_seq(DeviceId.parse(DEV), LEGACY_EPOCH) == big


def test_non_finite_reading_refused(env: Env) -> None:
    key = add(env)
    body = b'{"device_id":"%s","seq":1,"readings":{"t":1e999}}' % DEV.encode()
    assert post(env, body, valarm_sig(body, key)).reason is RejectReason.MALFORMED


def test_imported_key_and_key_never_stored_in_clear(env: Env) -> None:
    key = "ImportedKey123456789"
    add(env, key=key)
    body = valarm_body(DEV)
    assert post(env, body, valarm_sig(body, key, "md5")).ok
    env.store.close()
    data = b"".join(p.read_bytes() for p in env.path.parent.glob("sensorseal.db*"))
    assert key.encode() not in data
