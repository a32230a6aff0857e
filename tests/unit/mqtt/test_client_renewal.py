"""`MqttDevice` and E5 renewal on a real (embedded) broker whose logins the test controls: an
offer on the commands topic is taken (both HPKE suites) and answered under the new epoch, never
handed to the command handler; forged or unauthenticated offers change nothing; the broker
login falls back to the previous epoch's password while the server has not confirmed, and
uses the new one first once it has."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import parse, seal, unseal
from sensorseal.core.errors import Rejected
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import broker_password, derive
from sensorseal.core.renewal import DeviceKemKey, RenewalSuite, make_offer
from sensorseal.device.device import Device
from sensorseal.lifecycle import renewal_body
from sensorseal.mqtt import topics
from sensorseal.mqtt.client import RENEWAL_ACK, MqttDevice
from sensorseal.mqtt.embedded import BrokerAuth, EmbeddedBroker

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mqtt_support  # tests/ helpers

pytestmark = pytest.mark.timeout(60)

SERVICE = "svc"


def wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@dataclass
class Logins:
    """The broker's password table: username -> accepted passwords (changed by the test)."""

    allowed: dict[str, set[str]] = field(default_factory=dict)

    def check(self, username: str, password: str) -> bool:
        return password in self.allowed.get(username, set())


@dataclass
class Rig:
    broker: EmbeddedBroker
    logins: Logins
    cred: DeviceCredential
    probe: mqtt_support.Probe  # the cloud side: publishes commands, reads acks
    down_seq: int = 0

    @property
    def user(self) -> str:
        return self.cred.device_id.hex()

    def password(self, cred: DeviceCredential) -> str:
        return broker_password(cred.secret, cred.device_id, cred.epoch)

    def send_down(self, body: bytes, cred: DeviceCredential | None = None) -> None:
        """Seal `body` as the cloud would (downlink keys of `cred`'s epoch) and publish it."""
        cred = cred or self.cred
        self.down_seq += 1
        route = topics.commands(cred.device_id)
        data = seal(body, keys=derive(cred.secret, cred.device_id, cred.epoch, Direction.DOWN),
                    seq=self.down_seq, route=route, timestamp_ms=time.time_ns() // 1_000_000,
                    level=Level.SEALED)
        self.probe.publish(route, data)

    def acks(self) -> list[bytes]:
        return [d for t, d in list(self.probe.messages) if t == topics.acks(self.cred.device_id)]

    def kick(self) -> int:
        loop = self.broker.loop  # type: ignore[attr-defined]
        return asyncio.run_coroutine_threadsafe(self.broker.disconnect_user(self.user),
                                                loop).result(5)


@pytest.fixture
def rig() -> Iterator[Rig]:
    cred = DeviceCredential(DeviceId(os.urandom(12)), 1, os.urandom(32))
    logins = Logins({SERVICE: {"svc-pw"}})
    logins.allowed[cred.device_id.hex()] = {broker_password(cred.secret, cred.device_id, 1)}
    auth = BrokerAuth(logins.check, lambda _u, _t, _a: True)
    with mqtt_support.embedded_broker(auth) as broker:
        probe = mqtt_support.Probe.connect("127.0.0.1", broker.port, SERVICE, "svc-pw",
                                           protocol=mqtt.MQTTv311)
        assert probe.subscribe(topics.acks(cred.device_id))
        yield Rig(broker, logins, cred, probe)
        probe.close()


def open_ack(data: bytes, cred: DeviceCredential) -> dict[str, object]:
    ctx = SecurityContext.from_secret(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    opened = unseal(data, route=topics.acks(cred.device_id), contexts=lambda _d, _e: ctx,
                    now_ms=time.time_ns() // 1_000_000)
    body = cbor2.loads(opened.payload)
    assert isinstance(body, dict)
    return body


def start(rig: Rig, tmp_path: Path, kem: DeviceKemKey | None,
          **kw: object) -> tuple[MqttDevice, list[bytes], list[tuple[DeviceCredential, object]]]:
    commands: list[bytes] = []
    renewed: list[tuple[DeviceCredential, object]] = []
    dev = MqttDevice(Device(rig.cred, tmp_path / "state"), "127.0.0.1", rig.broker.port,
                     outbox_path=tmp_path / "outbox.db", protocol=mqtt.MQTTv311, kem_key=kem,
                     on_command=lambda b: commands.append(b),
                     on_renewal=lambda new, prev: renewed.append((new, prev)),
                     **kw)  # type: ignore[arg-type]
    dev.start()
    assert dev.wait_subscribed(10)
    return dev, commands, renewed


@pytest.mark.parametrize("suite", [RenewalSuite.X25519, RenewalSuite.MLKEM768_X25519],
                         ids=["x25519", "mlkem768-x25519"])
def test_an_offer_on_the_commands_topic_is_taken_and_answered_under_the_new_epoch(
        rig: Rig, tmp_path: Path, suite: RenewalSuite) -> None:
    kem = DeviceKemKey.generate(suite)
    dev, commands, renewed = start(rig, tmp_path, kem)
    try:
        dev.announce_state(b"before", level=Level.SIGNED)  # keys of the other level in use
        new_secret = os.urandom(32)
        offer = make_offer(rig.cred.device_id, kem.public_key(), 1, new_secret)
        rig.send_down(renewal_body(offer))
        assert wait(lambda: len(rig.acks()) == 1)
        new = DeviceCredential(rig.cred.device_id, 2, new_secret)
        assert dev.device.credential == new
        assert open_ack(rig.acks()[0], new) == {"cmd": RENEWAL_ACK, "ok": True}
        with pytest.raises(Rejected):  # the proof of possession is not sealed under N
            open_ack(rig.acks()[0], rig.cred)
        assert renewed == [(new, rig.cred)]
        # The same offer again (a resend): a no-op, answered again.
        rig.send_down(renewal_body(offer))
        assert wait(lambda: len(rig.acks()) == 2)
        assert open_ack(rig.acks()[1], new)["ok"] is True
        assert dev.stats.renewals_accepted == 1 and len(renewed) == 1
        # Everything sealed from now on is epoch 2, at either level, with fresh numbers.
        up_topics = (topics.telemetry(new.device_id), topics.state(new.device_id))
        for topic in up_topics:
            assert rig.probe.subscribe(topic)
        dev.publish_telemetry(b"t")
        dev.announce_state(b"s", level=Level.SIGNED)  # the other level: keys and counter too
        dev.announce_state(b"s", level=Level.SEALED)
        assert dev.flush(10)
        assert wait(lambda: sum(t in up_topics for t, _ in list(rig.probe.messages)) == 3)
        sent = [parse(d) for t, d in list(rig.probe.messages) if t in up_topics]
        assert [(e.epoch, e.level) for e in sent] == [
            (2, Level.SEALED), (2, Level.SIGNED), (2, Level.SEALED)]
        seqs = [e.seq for e in sent] + [parse(a).seq for a in rig.acks()]
        assert len(set(seqs)) == len(seqs)  # one counter for every uplink of epoch 2
        assert commands == [] and dev.stats.downlink_rejected == {}
    finally:
        dev.stop()
        dev.device.close()


def test_forged_and_unauthenticated_offers_change_nothing(rig: Rig, tmp_path: Path) -> None:
    kem = DeviceKemKey.generate()
    dev, commands, renewed = start(rig, tmp_path, kem)
    try:
        # Sealed to another device's KEM key, inside an authentic downlink: DECRYPT_FAILED.
        other = DeviceKemKey.generate()
        rig.send_down(renewal_body(make_offer(rig.cred.device_id, other.public_key(), 1,
                                              os.urandom(32))))
        # A genuine offer, but published bare (no downlink envelope): never even opened.
        good = make_offer(rig.cred.device_id, kem.public_key(), 1, os.urandom(32))
        rig.probe.publish(topics.commands(rig.cred.device_id), renewal_body(good))
        # ... and inside an envelope sealed with the wrong downlink key.
        forger = DeviceCredential(rig.cred.device_id, 1, os.urandom(32))
        rig.send_down(renewal_body(good), forger)
        # An offer that renews epoch 5, not 1.
        rig.send_down(renewal_body(make_offer(rig.cred.device_id, kem.public_key(), 5,
                                              os.urandom(32))))
        assert wait(lambda: sum(dev.stats.downlink_rejected.values()) == 4), dev.stats
        assert dev.device.epoch == 1 and renewed == [] and commands == []
        assert dev.stats.renewals_refused == 2 and dev.stats.renewals_accepted == 0
        assert wait(lambda: len(rig.acks()) == 2)  # the two authentic offers are answered
        refused = [open_ack(a, rig.cred) for a in rig.acks()]
        assert [(a["ok"], a["error"]) for a in refused] == [
            (False, "decrypt_failed"), (False, "unknown_epoch")]
        # An ordinary command still reaches the handler.
        rig.send_down(cbor2.dumps({"cmd": "c1", "body": b"open"}))
        assert wait(lambda: commands == [b"open"])
    finally:
        dev.stop()
        dev.device.close()


def test_without_a_kem_key_an_offer_is_refused_not_handed_to_the_application(
        rig: Rig, tmp_path: Path) -> None:
    dev, commands, _ = start(rig, tmp_path, None)
    try:
        kem = DeviceKemKey.generate()
        rig.send_down(renewal_body(make_offer(rig.cred.device_id, kem.public_key(), 1,
                                              os.urandom(32))))
        assert wait(lambda: len(rig.acks()) == 1)
        assert open_ack(rig.acks()[0], rig.cred) == {"cmd": RENEWAL_ACK, "ok": False,
                                                     "error": "no renewal key"}
        assert commands == [] and dev.device.epoch == 1 and dev.stats.renewals_refused == 1
    finally:
        dev.stop()
        dev.device.close()


def test_login_falls_back_to_the_previous_password_until_the_server_confirms(
        rig: Rig, tmp_path: Path) -> None:
    kem = DeviceKemKey.generate()
    dev, _, _ = start(rig, tmp_path, kem)
    try:
        new = DeviceCredential(rig.cred.device_id, 2, os.urandom(32))
        rig.send_down(renewal_body(make_offer(new.device_id, kem.public_key(), 1, new.secret)))
        assert wait(lambda: dev.device.epoch == 2)
        # Cut before the server confirmed: the broker still knows only the epoch-1 password.
        assert rig.kick() == 1
        assert wait(lambda: dev.stats.connects == 2 and dev.connected, 10), dev.stats
        assert dev.stats.logins_refused == 1 and dev.stats.password_fallbacks == 1
        # The server confirms: the broker moves to epoch 2 and cuts the session.
        rig.logins.allowed[rig.user] = {rig.password(new)}
        started = time.monotonic()
        assert rig.kick() == 1
        assert wait(lambda: dev.stats.connects == 3 and dev.connected, 10), dev.stats
        print(f"reconnected with the new password after {time.monotonic() - started:.2f} s")
        assert dev.stats.logins_refused == 1  # the newest password was tried first
        assert dev.stats.password_fallbacks == 1
        # Neither password works (e.g. revoked): attempts follow paho's growing delay.
        rig.logins.allowed[rig.user] = set()
        assert rig.kick() == 1
        time.sleep(3.5)
        assert 1 <= dev.stats.logins_refused - 1 <= 3, dev.stats  # 1 s, then 2 s: not hot
        assert not dev.connected
    finally:
        dev.stop()
        dev.device.close()
