"""E5 renewal over HPKE, both suites: the offer travels inside a downlink sealed under the current
epoch, the device's first message under N+1 confirms it, and a device that was offline (or whose
confirmation got lost, or that restarted) gets the very same offer again until it confirms."""

from __future__ import annotations

from pathlib import Path

import pytest
from lifecycle_support import HOUR_MS, Env, reasons, sealed

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.renewal import DeviceKemKey, Phase, RenewalSuite, make_offer
from sensorseal.device.device import Device
from sensorseal.lifecycle import renewal_offer_of
from sensorseal.mqtt import topics
from sensorseal.mqtt.commands import CloudLink

SUITES = [RenewalSuite.X25519, RenewalSuite.MLKEM768_X25519]


def provision(env: Env, tmp_path: Path, suite: RenewalSuite,
              name: str = "renewable") -> tuple[DeviceCredential, DeviceKemKey, Device]:
    cred = env.registry.add_device(name, "standard")
    kem = DeviceKemKey.generate(suite)
    env.registry.register_renewal_key(cred.device_id, kem.public_key())
    return cred, kem, Device(cred, tmp_path / name, clock_ms=env.clock)


def receive(env: Env, dev: Device, kem: DeviceKemKey) -> DeviceCredential:
    """What the device does with a downlink it picked up (MQTT commands topic)."""
    route = topics.commands(dev.device_id)
    data = env.life.deliver(dev.device_id, route)
    assert data is not None
    offer = renewal_offer_of(dev.open_downlink(data, route).payload)
    assert offer is not None
    return dev.accept_renewal(offer, kem)


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_renewal_confirmed_by_first_message_under_new_epoch(env: Env, tmp_path: Path,
                                                            suite: RenewalSuite) -> None:
    cred, kem, dev = provision(env, tmp_path, suite)
    with dev:
        assert env.ingest(dev.seal(b"before"))[0].ok
        env.life.renew(cred.device_id, grace_ms=HOUR_MS)
        state = env.life.renewal_state(cred.device_id)
        assert state is not None and state.phase is Phase.PENDING
        assert env.registry.get(cred.device_id).epoch == 1  # not before proof of possession
        buffered = dev.seal(b"sealed under 1, delivered late")
        new = receive(env, dev, kem)
        assert (new.epoch, dev.epoch) == (2, 2) and new.secret != cred.secret
        assert env.ingest(dev.seal(b"first under 2"))[0].ok
        assert env.registry.get(cred.device_id).epoch == 2
        state = env.life.renewal_state(cred.device_id)
        assert state is not None and state.phase is Phase.CONFIRMED
        assert env.store.events(reason="key_renewal_confirmed")
        assert env.ingest(buffered)[0].ok  # epoch 1 in its grace period
        env.clock.now_ms += HOUR_MS
        assert reasons(env.ingest(sealed(cred, 99, now_ms=env.clock.now_ms))) == [
            RejectReason.UNKNOWN_EPOCH]
        # The cloud now seals downlinks under epoch 2; the device drops the old secret.
        # (A fresh CloudLink on the same counter: see test_cloud_link_follows_an_epoch_change.)
        route = topics.commands(cred.device_id)
        link = CloudLink(env.registry, env.counter, clock_ms=env.clock)
        opened = dev.open_downlink(link.seal_down(cred.device_id, b"ping", route), route)
        assert (opened.epoch, opened.payload, dev.previous) == (2, b"ping", None)
        assert env.life.deliver(cred.device_id, route) is None  # nothing pending any more


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_offline_device_gets_the_same_offer_after_a_server_restart(env: Env, tmp_path: Path,
                                                                   suite: RenewalSuite) -> None:
    cred, kem, dev = provision(env, tmp_path, suite, "offline")
    offer = env.life.renew(cred.device_id)
    dev.close()  # the device is off; its downlink was never picked up
    server = env.restart()
    try:
        assert server.life.pending_offer(cred.device_id) == offer
        with Device(cred, tmp_path / "offline", clock_ms=env.clock) as back:
            assert env.ingest(back.seal(b"still epoch 1"), pipeline=server.pipeline)[0].ok
            route = topics.commands(cred.device_id)
            data = server.life.deliver(cred.device_id, route)
            assert data is not None
            again = renewal_offer_of(back.open_downlink(data, route).payload)
            assert again == offer  # the same bytes, re-delivered
            assert again is not None
            back.accept_renewal(again, kem)
            assert env.ingest(back.seal(b"now epoch 2"), pipeline=server.pipeline)[0].ok
        assert server.registry.get(cred.device_id).epoch == 2
    finally:
        server.close()


def test_lost_confirmation_redelivery_and_device_restart(env: Env, tmp_path: Path) -> None:
    cred, kem, dev = provision(env, tmp_path, RenewalSuite.X25519, "lossy")
    env.life.renew(cred.device_id)
    new = receive(env, dev, kem)
    lost = dev.seal(b"lost on the way")  # first message under 2 never arrives
    del lost
    dev.close()
    # The device restarts with its persisted credentials (new + previous until confirmed).
    with Device(new, tmp_path / "lossy", clock_ms=env.clock, previous=cred) as dev2:
        assert receive(env, dev2, kem) == new  # the same offer again: a no-op
        msg = dev2.seal(b"arrives")
        assert env.ingest(msg)[0].ok
        assert env.registry.get(cred.device_id).epoch == 2


def test_superseding_offer_replaces_the_pending_secret(env: Env, tmp_path: Path) -> None:
    cred, kem, dev = provision(env, tmp_path, RenewalSuite.X25519, "super")
    with dev:
        env.life.renew(cred.device_id)
        first = receive(env, dev, kem)
        env.life.renew(cred.device_id)  # the operator renews again before any confirmation
        state = env.life.renewal_state(cred.device_id)
        assert state is not None and state.offers_made == 2
        assert reasons(env.ingest(dev.seal(b"under the superseded secret"))) == [
            RejectReason.DECRYPT_FAILED]
        second = receive(env, dev, kem)  # still opens: the epoch-1 downlink is kept
        assert second.epoch == first.epoch and second.secret != first.secret
        assert env.ingest(dev.seal(b"under the newest secret"))[0].ok
        assert env.registry.get(cred.device_id).epoch == 2


def test_offer_outside_an_authenticated_downlink_is_refused(env: Env, tmp_path: Path) -> None:
    cred, kem, dev = provision(env, tmp_path, RenewalSuite.X25519, "forged")
    with dev:
        # Anyone with the public key can make an offer: it must not reach accept_renewal.
        forged = make_offer(cred.device_id, kem.public_key(), 1, b"\x00" * 32)
        with pytest.raises(Rejected):
            dev.open_downlink(forged, topics.commands(cred.device_id))
        other_kem = DeviceKemKey.generate()
        with pytest.raises(Rejected) as err:
            dev.accept_renewal(make_offer(cred.device_id, other_kem.public_key(), 1,
                                          b"\x01" * 32), kem)
        assert err.value.reason is RejectReason.DECRYPT_FAILED
        assert dev.epoch == 1


def test_renew_needs_a_registered_key_and_an_active_device(env: Env) -> None:
    cred = env.registry.add_device("nokey", "standard")
    with pytest.raises(ConfigError, match="no renewal key"):
        env.life.renew(cred.device_id)
    env.registry.register_renewal_key(cred.device_id, DeviceKemKey.generate().public_key())
    env.registry.suspend(cred.device_id)
    with pytest.raises(ConfigError, match="suspended"):
        env.life.renew(cred.device_id)


def test_rotation_voids_a_pending_offer(env: Env, tmp_path: Path) -> None:
    cred, _kem, dev = provision(env, tmp_path, RenewalSuite.X25519, "rotated")
    with dev:
        env.life.renew(cred.device_id)
        rotated = env.life.rotate(cred.device_id, grace_ms=0)
        assert env.life.pending_offer(cred.device_id) is None
        assert env.ingest(sealed(rotated, 1, now_ms=env.clock.now_ms))[0].ok
        assert env.registry.get(cred.device_id).epoch == 2


def test_cloud_link_follows_an_epoch_change(env: Env) -> None:
    cred = env.registry.add_device("link", "standard")
    route = topics.commands(cred.device_id)
    env.link.seal_down(cred.device_id, b"under 1", route)  # caches epoch 1
    env.life.rotate(cred.device_id, grace_ms=0)
    data = env.link.seal_down(cred.device_id, b"under 2", route)
    from sensorseal.core.envelope import parse
    assert parse(data).epoch == 2
