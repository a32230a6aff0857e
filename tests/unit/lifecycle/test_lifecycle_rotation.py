"""Epoch rotation: both epochs land during the grace period, the old one is refused after it
(with its reason), across restarts and several pipelines; revocation is immediate and final."""

from __future__ import annotations

import pytest
from lifecycle_support import HOUR_MS, Env, reasons, sealed

from sensorseal.core.errors import ConfigError, RejectReason
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import DeviceStatus


def test_messages_in_flight_on_both_epochs_land_during_grace(env: Env) -> None:
    old = env.registry.add_device("gw-buffered", "standard")
    assert env.ingest(sealed(old, 1))[0].ok  # epoch 1 context now cached
    buffered = [sealed(old, s) for s in (2, 3, 4)]  # sealed before the rotation, sent later
    new = env.life.rotate(old.device_id, grace_ms=2 * HOUR_MS)
    assert (new.device_id, new.epoch) == (old.device_id, 2) and new.secret != old.secret
    assert env.registry.get(old.device_id).epoch == 2
    env.clock.now_ms += HOUR_MS
    mixed = [sealed(new, 1, now_ms=env.clock.now_ms), buffered[0],
             sealed(new, 2, now_ms=env.clock.now_ms), buffered[1], buffered[2]]
    assert reasons(env.ingest(*mixed)) == [None] * 5
    stored = {(r.epoch, r.seq) for r in env.store.telemetry(device_id=old.device_id)}
    assert stored == {(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)}
    assert reasons(env.ingest(buffered[0])) == [RejectReason.REPLAY]  # still replay-checked


def test_grace_expiry_refuses_the_old_epoch(env: Env) -> None:
    old = env.registry.add_device("late", "standard")
    assert env.ingest(sealed(old, 1))[0].ok
    new = env.life.rotate(old.device_id, grace_ms=HOUR_MS)
    env.clock.now_ms += HOUR_MS - 1
    assert env.ingest(sealed(old, 2))[0].ok  # last millisecond of grace
    env.clock.now_ms += 1
    late = sealed(old, 3)
    assert reasons(env.ingest(late)) == [RejectReason.UNKNOWN_EPOCH]
    assert env.ingest(sealed(new, 1, now_ms=env.clock.now_ms))[0].ok
    # A fresh process (nothing cached) refuses it too, and audits why.
    other = env.restart()
    try:
        assert reasons(env.ingest(late, pipeline=other.pipeline)) == [RejectReason.UNKNOWN_EPOCH]
    finally:
        other.close()
    [event, *_] = env.store.events(reason="unknown_epoch")
    assert event.device_id == old.device_id.hex()


def test_zero_grace_and_repeated_rotation(env: Env) -> None:
    e1 = env.registry.add_device("twice", "standard")
    e2 = env.life.rotate(e1.device_id, grace_ms=HOUR_MS)
    e3 = env.life.rotate(e1.device_id, grace_ms=0)
    now = env.clock.now_ms
    # e1's grace (set by the first rotation) still runs; e2 ended at once; never extended.
    assert reasons(env.ingest(sealed(e1, 1), sealed(e2, 1, now_ms=now),
                              sealed(e3, 1, now_ms=now))) == [None, RejectReason.UNKNOWN_EPOCH,
                                                              None]
    epochs = env.store.list_epochs(e1.device_id)
    assert [(i.epoch, i.expires_ms) for i in epochs] == [(1, now + HOUR_MS), (2, now), (3, None)]


def test_future_epochs_and_unknown_secrets_refused(env: Env) -> None:
    cred = env.registry.add_device("future", "standard")
    from sensorseal.core.credential import DeviceCredential
    guessed = DeviceCredential(cred.device_id, 2, cred.secret)  # no epoch 2 exists
    far = DeviceCredential(cred.device_id, 7, cred.secret)
    assert reasons(env.ingest(sealed(guessed, 1), sealed(far, 1))) == [
        RejectReason.UNKNOWN_EPOCH, RejectReason.UNKNOWN_EPOCH]


def test_other_process_sees_rotation_within_status_ttl(env: Env) -> None:
    old = env.registry.add_device("ttl", "standard")
    remote = Pipeline(env.registry, env.store, clock_ms=env.clock)  # no invalidate hook
    assert env.ingest(sealed(old, 1), pipeline=remote)[0].ok
    new = env.life.rotate(old.device_id, grace_ms=0)
    env.clock.now_ms += 1_000  # the status TTL
    assert reasons(env.ingest(sealed(old, 2), sealed(new, 1, now_ms=env.clock.now_ms),
                              pipeline=remote)) == [RejectReason.UNKNOWN_EPOCH, None]


def test_rotate_refuses_negative_grace_and_revoked_devices(env: Env) -> None:
    cred = env.registry.add_device("gone", "standard")
    with pytest.raises(ConfigError):
        env.life.rotate(cred.device_id, grace_ms=-1)
    env.life.revoke(cred.device_id)
    with pytest.raises(ConfigError, match="revoked"):
        env.life.rotate(cred.device_id)


def test_revoke_is_immediate_runs_hooks_and_is_final(env: Env) -> None:
    cred = env.registry.add_device("stolen", "standard")
    slow = Pipeline(env.registry, env.store, clock_ms=env.clock, status_ttl_ms=3_600_000)
    env.life.add_invalidate_hook(slow.invalidate)
    cut: list[str] = []
    env.life.add_revoke_hook(lambda d: cut.append(d.hex()))
    assert env.ingest(sealed(cred, 1), pipeline=slow)[0].ok
    env.life.revoke(cred.device_id)
    assert reasons(env.ingest(sealed(cred, 2), pipeline=slow)) == [RejectReason.REVOKED]
    assert cut == [cred.device_id.hex()]
    with pytest.raises(ConfigError):
        env.registry.resume(cred.device_id)
    assert env.registry.get(cred.device_id).status is DeviceStatus.REVOKED


def test_failing_broker_hook_still_revokes(env: Env) -> None:
    cred = env.registry.add_device("hook", "standard")
    calls: list[str] = []

    def broken(_d: object) -> None:
        raise OSError("broker down")

    env.life.add_revoke_hook(broken)
    env.life.add_revoke_hook(lambda d: calls.append("second"))
    with pytest.raises(ConfigError, match="broker hook failed"):
        env.life.revoke(cred.device_id)
    assert calls == ["second"]
    assert reasons(env.ingest(sealed(cred, 1))) == [RejectReason.REVOKED]
