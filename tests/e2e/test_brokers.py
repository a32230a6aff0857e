"""Broker-side defence in depth against real brokers: a private Mosquitto 2.x with the dynamic
security plugin (plain and TLS listeners), and the embedded amqtt broker with registry auth.

What must hold: a device connects only as itself, publishes and subscribes only under its own
topics (a denied publish never reaches even an all-seeing subscriber), suspension and revocation
kick and refuse, and an acknowledged QoS 1 message is never lost to a slow subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mqtt_support
from mqtt_support import Probe, settle
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import broker_password
from sensorseal.keystore import SoftwareKeystore
from sensorseal.mqtt import topics
from sensorseal.mqtt.dynsec import DynsecAdmin
from sensorseal.mqtt.embedded import registry_auth
from sensorseal.mqtt.mosquitto import MosquittoProcess
from sensorseal.registry import Registry
from sensorseal.store import SQLiteStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HOST = "127.0.0.1"
SERVICE = "ingest-svc"


class Dev:
    """A device as the broker knows it: id, and the password derived from a random root."""

    def __init__(self) -> None:
        self.id = DeviceId(os.urandom(12))
        self.user = self.id.hex()
        self.password = broker_password(os.urandom(32), self.id, 1)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    with mqtt_support.mosquitto(tmp_path_factory.mktemp("mosq"), tls=True) as proc:
        yield proc


@pytest.fixture(scope="module")
def admin(broker: MosquittoProcess) -> Iterator[DynsecAdmin]:
    assert broker.tls_files is not None and broker.tls_port is not None
    # The admin goes over the TLS listener: that also proves CA verification end to end.
    with DynsecAdmin(HOST, broker.tls_port, broker.admin_username, broker.admin_password,
                     ca_cert=broker.tls_files.ca_cert) as a:
        yield a


@pytest.fixture(scope="module")
def service_password(admin: DynsecAdmin) -> str:
    pw = os.urandom(16).hex()
    admin.ensure_service_account(SERVICE, pw)
    return pw


def _device(admin: DynsecAdmin) -> Dev:
    d = Dev()
    admin.sync_device(d.id, "active", d.password)
    return d


def _connect(broker: MosquittoProcess, user: str | None, pw: str | None, **kw: object) -> Probe:
    return Probe.connect(HOST, broker.port, user, pw, **kw)  # type: ignore[arg-type]


def _watcher(broker: MosquittoProcess) -> Probe:
    """The all-seeing subscriber (the dynsec admin may read `#`)."""
    w = _connect(broker, broker.admin_username, broker.admin_password)
    assert not w.refused and w.subscribe("sensorseal/#")
    return w


# --------------------------------------------------------------------------- listeners / TLS


def test_plain_and_tls_listeners_and_a_wrong_ca_is_refused(broker: MosquittoProcess,
                                                            tmp_path: Path) -> None:
    assert broker.tls_files is not None and broker.tls_port is not None
    plain = _connect(broker, broker.admin_username, broker.admin_password)
    assert not plain.refused
    plain.close()
    tls = Probe.connect(HOST, broker.tls_port, broker.admin_username, broker.admin_password,
                        ca_cert=broker.tls_files.ca_cert)
    assert not tls.refused
    tls.close()
    other_ca = mqtt_support.make_ca_and_cert(tmp_path / "other").ca_cert
    with pytest.raises(ssl.SSLCertVerificationError):
        Probe.connect(HOST, broker.tls_port, broker.admin_username, broker.admin_password,
                      ca_cert=other_ca)
    config = broker.config_path.read_text()
    assert "max_queued_messages 0\n" in config and "per_listener_settings false" in config
    assert broker.admin_password not in config + broker.log_text()


# --------------------------------------------------------------------------- dynsec


def test_a_device_connects_only_as_itself(broker: MosquittoProcess, admin: DynsecAdmin) -> None:
    a, b = _device(admin), _device(admin)
    ok = _connect(broker, a.user, a.password)
    assert not ok.refused
    ok.close()
    for user, pw in [(a.user, b.password), (b.user, a.password), (a.user, a.password + "x"),
                     (Dev().user, a.password), (None, None)]:
        probe = _connect(broker, user, pw)
        assert probe.refused, (user is not None and user[:6], "should be refused")


def test_a_device_publishes_and_subscribes_only_under_its_own_topics(
        broker: MosquittoProcess, admin: DynsecAdmin, service_password: str) -> None:
    a, b = _device(admin), _device(admin)
    watcher = _watcher(broker)
    dev = _connect(broker, a.user, a.password)
    assert not dev.refused
    # subscriptions: exactly its own commands and RPC requests, no wildcards, nobody else's
    assert dev.subscribe(topics.commands(a.id))
    assert dev.subscribe(topics.rpc_request(a.id))
    for f in [topics.commands(b.id), "sensorseal/+/commands", "sensorseal/#",
              topics.telemetry(b.id), "#"]:
        assert not dev.subscribe(f), f
    # publishes: own telemetry/state/acks/rpc response arrive; anything else is denied
    allowed = [topics.telemetry(a.id), topics.state(a.id), topics.acks(a.id),
               topics.rpc_response(a.id, "0a1b")]
    for t in allowed:
        assert dev.publish_outcome(t, b"m") == "acked", t
    denied = [topics.telemetry(b.id), topics.commands(b.id), topics.commands(a.id),
              topics.rpc_request(a.id), topics.rpc_response(b.id, "0a1b"), "sensorseal/x",
              "elsewhere"]
    for t in denied:
        probe = _connect(broker, a.user, a.password)
        assert probe.publish_outcome(t, b"m") in ("refused", "disconnected"), t
        probe.close()
    assert watcher.wait(lambda: len(watcher.messages) >= len(allowed))
    settle()
    assert sorted(watcher.topics_seen()) == sorted(allowed)
    # the service account reaches the device's commands; the device receives them
    svc = _connect(broker, SERVICE, service_password)
    assert not svc.refused
    assert svc.subscribe("$share/workers/sensorseal/+/telemetry")
    assert not svc.subscribe("#") and not svc.subscribe(topics.commands(a.id))
    assert svc.wait_acked([svc.publish(topics.commands(a.id), b"cmd")])
    assert dev.wait(lambda: (topics.commands(a.id), b"cmd") in dev.messages)
    # the service account cannot pose as a device (on its own connection: Mosquitto 2.0 with
    # max_queued_messages 0 drops a client right after refusing its publish)
    forger = _connect(broker, SERVICE, service_password)
    assert forger.publish_outcome(topics.telemetry(a.id), b"forged") in ("refused",
                                                                          "disconnected")
    forger.close()
    dev.publish(topics.telemetry(a.id), b"t2")
    assert svc.wait(lambda: (topics.telemetry(a.id), b"t2") in svc.messages)
    for p in (dev, svc, watcher):
        p.close()


def test_suspend_and_revoke_kick_and_refuse_and_a_resync_kicks_nobody(
        broker: MosquittoProcess, admin: DynsecAdmin) -> None:
    d = _device(admin)
    dev = _connect(broker, d.user, d.password)
    assert not dev.refused
    admin.sync_device(d.id, "active", d.password)  # unchanged registry: nobody is disturbed
    settle()
    assert not dev.disconnected.is_set()
    admin.sync_device(d.id, "suspended", d.password)
    assert dev.disconnected.wait(5), "a suspended device must be kicked"
    assert _connect(broker, d.user, d.password).refused
    admin.sync_device(d.id, "active", d.password)
    again = _connect(broker, d.user, d.password)
    assert not again.refused
    new_password = broker_password(os.urandom(32), d.id, 2)  # key epoch rotated
    admin.sync_device(d.id, "active", new_password)
    assert again.disconnected.wait(5), "the old epoch's session must go"
    assert _connect(broker, d.user, d.password).refused
    third = _connect(broker, d.user, new_password)
    assert not third.refused
    admin.sync_device(d.id, "revoked", None)
    assert third.disconnected.wait(5), "a revoked device must be kicked"
    assert _connect(broker, d.user, new_password).refused
    assert admin.get_client(d.user) is None
    admin.sync_device(d.id, "revoked", None)  # idempotent


# --------------------------------------------------------------------------- slow subscriber

N_SLOW = 5000


def _slow_subscriber_run(broker: MosquittoProcess) -> tuple[int, int]:
    """Publish N_SLOW QoS 1 messages while the subscriber stalls until every PUBACK is in;
    return (PUBACKs the publisher got, distinct messages the subscriber eventually received)."""
    with DynsecAdmin(HOST, broker.port, broker.admin_username, broker.admin_password) as adm:
        adm.ensure_service_account(SERVICE, "svc-pw")
        d = Dev()
        adm.sync_device(d.id, "active", d.password)
    stalled = {"done": False}
    all_acked = threading.Event()

    def stall(_msg: mqtt.MQTTMessage) -> None:
        if not stalled["done"]:
            stalled["done"] = True
            all_acked.wait(30)  # blocks paho's network thread: the broker must queue

    # MQTT 3.1.1 subscriber: the broker's max_inflight_messages applies to it
    sub = Probe.connect(HOST, broker.port, SERVICE, "svc-pw", protocol=mqtt.MQTTv311)
    sub.on_message_hook = stall
    assert sub.subscribe(topics.telemetry(d.id))
    pub = Probe.connect(HOST, broker.port, d.user, d.password)
    mids = [pub.publish(topics.telemetry(d.id), f"{i:06d}".encode()) for i in range(N_SLOW)]
    assert pub.wait_acked(mids, timeout=30)
    all_acked.set()
    acked = sum(1 for m in mids if not pub.pubacks[m].is_failure)
    deadline = time.monotonic() + 15
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:  # until all arrived, or nothing new for 1.5 s
        n = len(sub.messages)
        if n >= N_SLOW:
            break
        if n != last:
            last, quiet_since = n, time.monotonic()
        elif time.monotonic() - quiet_since > 1.5 and stalled["done"]:
            break
        time.sleep(0.05)
    received = len({payload for _t, payload in sub.messages})
    pub.close()
    sub.close()
    return acked, received


def test_a_slow_qos1_subscriber_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    with mqtt_support.mosquitto(tmp_path) as proc:
        acked, received = _slow_subscriber_run(proc)
    assert acked == N_SLOW
    assert received == N_SLOW, f"lost {N_SLOW - received} acknowledged messages"


def test_mosquittos_default_queue_limit_would_drop_acknowledged_messages(tmp_path: Path) -> None:
    """Why the generated config sets max_queued_messages 0: with Mosquitto's default of 1000
    the publisher gets every PUBACK, yet the slow subscriber misses thousands."""
    with mqtt_support.mosquitto(tmp_path, max_queued_messages=1000,
                                max_inflight_messages=20) as proc:
        acked, received = _slow_subscriber_run(proc)
    assert acked == N_SLOW
    assert received < N_SLOW - 1000, received


# --------------------------------------------------------------------------- embedded amqtt


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    store = SQLiteStore(str(tmp_path / "reg.db"))
    store.migrate()
    yield Registry(store, SoftwareKeystore(os.urandom(32)))
    store.close()


def _embedded_probe(port: int, user: str | None, pw: str | None) -> Probe:
    return Probe.connect(HOST, port, user, pw, protocol=mqtt.MQTTv311)


def test_embedded_broker_with_registry_auth(registry: Registry) -> None:
    ca, cb = registry.add_device("a"), registry.add_device("b")
    pw_a = broker_password(ca.secret, ca.device_id, ca.epoch)
    pw_b = broker_password(cb.secret, cb.device_id, cb.epoch)
    auth = registry_auth(registry)
    with mqtt_support.embedded_broker(auth.as_broker_auth()) as eb:
        assert eb.port != 0
        for user, pw in [(ca.device_id.hex(), pw_b), (cb.device_id.hex(), pw_a),
                         (ca.device_id.hex(), ""), (auth.service_username, "nope"),
                         (None, None)]:
            assert _embedded_probe(eb.port, user, pw).refused
        svc = _embedded_probe(eb.port, auth.service_username, auth.service_password)
        dev = _embedded_probe(eb.port, ca.device_id.hex(), pw_a)
        assert not svc.refused and not dev.refused
        assert svc.subscribe("sensorseal/+/telemetry")
        assert not svc.subscribe("#")
        assert dev.subscribe(topics.commands(ca.device_id))
        assert not dev.subscribe(topics.commands(cb.device_id))
        assert not dev.subscribe("sensorseal/+/commands")
        dev.publish(topics.telemetry(cb.device_id), b"forged")  # dropped by the broker
        dev.publish(topics.telemetry(ca.device_id), b"mine")
        assert svc.wait(lambda: len(svc.messages) >= 1)
        svc.publish(topics.commands(ca.device_id), b"cmd")
        assert dev.wait(lambda: (topics.commands(ca.device_id), b"cmd") in dev.messages)
        settle()
        assert svc.messages == [(topics.telemetry(ca.device_id), b"mine")]
        # suspension: new logins refused at once, the open session closed on request
        registry.suspend(ca.device_id)
        assert _embedded_probe(eb.port, ca.device_id.hex(), pw_a).refused
        closed = asyncio.run_coroutine_threadsafe(
            eb.disconnect_user(ca.device_id.hex()), eb.loop).result(5)  # type: ignore[attr-defined]
        assert closed == 1 and dev.disconnected.wait(5)
        svc.close()
        # MQTT 5 is not spoken by amqtt 0.12: say so in a test, so an upgrade is noticed
        with pytest.raises(TimeoutError):
            Probe.connect(HOST, eb.port, cb.device_id.hex(), pw_b, protocol=mqtt.MQTTv5,
                          timeout=1.5)


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:  # MQTT variable-length remaining length
        byte, n = n % 128, n // 128
        length += bytes((byte | (0x80 if n else 0),))
        if not n:
            return bytes((first,)) + length + body


def test_embedded_broker_delivers_what_it_acked_when_the_publisher_leaves_at_once(
        registry: Registry) -> None:
    """amqtt 0.12.1 PUBACKs a QoS 1 PUBLISH when it queues it, and its client loop used to stop
    at DISCONNECT with messages still queued: acknowledged and lost. One write of CONNECT,
    200 PUBLISH and DISCONNECT makes the broker see the DISCONNECT while most are queued."""
    ca = registry.add_device("burst")
    pw = broker_password(ca.secret, ca.device_id, ca.epoch)
    auth = registry_auth(registry)
    topic = topics.telemetry(ca.device_id)
    with mqtt_support.embedded_broker(auth.as_broker_auth()) as eb:
        svc = _embedded_probe(eb.port, auth.service_username, auth.service_password)
        assert svc.subscribe("sensorseal/+/telemetry")
        connect = _packet(0x10, _mqtt_str("MQTT") + b"\x04\xc2\x00\x3c" + _mqtt_str("burst-1")
                          + _mqtt_str(ca.device_id.hex()) + _mqtt_str(pw))
        publishes = b"".join(_packet(0x32, _mqtt_str(topic) + (i + 1).to_bytes(2, "big")
                                     + b"m%03d" % i) for i in range(200))
        with socket.create_connection((HOST, eb.port), timeout=5) as sock:
            sock.sendall(connect + publishes + b"\xe0\x00")
            received = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    received += chunk
        assert received[:4] == b"\x20\x02\x00\x00", "CONNACK accepted"
        acked = received.count(b"\x40\x02")  # PUBACKs (the ids never contain 0x40 0x02 here)
        assert acked > 0
        svc.wait(lambda: len(svc.messages) >= acked, timeout=10)
        settle()
        got = {payload for _topic, payload in svc.messages}
        assert len(got) >= acked, f"{acked} acked, {len(got)} delivered"
        svc.close()
