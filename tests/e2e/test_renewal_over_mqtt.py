"""E5 renewal over MQTT, end to end: a real `sensorseal serve` process (its embedded broker, or
a private Mosquitto kept in step through dynamic security), the real `sensorseal device renew
--publish` in another process, and `MqttDevice` on a real connection.

(a) online: the offer arrives on the commands topic while the device streams telemetry; the
    device switches to epoch N+1, its next message confirms, the broker moves the device's
    password to N+1 and cuts the session, the device logs in again with the N+1 password and
    keeps publishing. Every message the broker acknowledged is stored exactly once, and the N
    password is refused afterwards.
(b) offline: the offer (and a resend) are published while the device is disconnected; its
    persistent session keeps them; the device completes the renewal when it comes back.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from server_process import ServerProcess

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.keys import broker_password
from sensorseal.core.renewal import DeviceKemKey, RenewalSuite
from sensorseal.datadir import DataDir
from sensorseal.device.device import Device
from sensorseal.mqtt import topics
from sensorseal.mqtt.client import MqttDevice
from sensorseal.mqtt.outbox import OutboxFull

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mqtt_support  # tests/ helpers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}


def cli(data: Path, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sensorseal", "--data-dir", str(data), *args],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    if check is not None:
        assert proc.returncode == check, (args, proc.stdout, proc.stderr)
    return proc


def wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@dataclass
class Site:
    """A data directory, its running server and how devices reach the broker."""

    data: Path
    host: str
    port: int
    protocol: MQTTProtocolVersion  # MQTT 3.1.1 for the embedded broker, 5 for Mosquitto

    def add_device(self, name: str, suite: str) -> tuple[DeviceCredential, DeviceKemKey]:
        cred = DeviceCredential.parse(
            json.loads(cli(self.data, "device", "add", name, "--json").stdout)["credential"])
        keys = self.data.parent / f"{name}-keys.json"
        cli(self.data, "device", "enroll-keys", str(cred.device_id), "--suite", suite,
            "--signing", "none", "--out", str(keys))
        private = base64.b64decode(json.loads(keys.read_text())["renewal_private"])
        kem = DeviceKemKey.from_private_bytes(
            RenewalSuite.X25519 if suite == "x25519" else RenewalSuite.MLKEM768_X25519, private)
        return cred, kem

    def server_epoch(self, cred: DeviceCredential) -> int:
        store, _ = DataDir(self.data, env=clean_env()).open()
        try:
            record = store.get_device(cred.device_id)
            assert record is not None
            return record.epoch
        finally:
            store.close()

    def stored_readings(self, cred: DeviceCredential) -> list[tuple[int, bytes]]:
        """(epoch, payload) of every stored telemetry row of the device."""
        db = sqlite3.connect(self.data / "sensorseal.db")
        try:
            return [(int(e), bytes(p)) for e, p in db.execute(
                "SELECT epoch, payload FROM telemetry WHERE device_id = ? AND route = ?",
                (bytes(cred.device_id), topics.telemetry(cred.device_id)))]
        finally:
            db.close()

    def login(self, cred: DeviceCredential, epoch_secret: bytes, epoch: int) -> bool:
        """Can a fresh client log in as the device with the password of `epoch`?"""
        probe = mqtt_support.Probe.connect(
            self.host, self.port, cred.device_id.hex(),
            broker_password(epoch_secret, cred.device_id, epoch), protocol=self.protocol)
        refused = probe.refused
        probe.close()
        return not refused


@pytest.fixture(params=["embedded", "mosquitto-dynsec"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    data = tmp_path / "data"
    DataDir(data, env=clean_env()).init()
    argv = [sys.executable, "-m", "sensorseal", "--data-dir", str(data), "serve",
            "--http-port", "0"]
    with ExitStack() as stack:
        env = clean_env()
        if request.param == "embedded":
            argv += ["--mqtt-port", "0"]
            protocol = mqtt.MQTTv311
        else:
            broker = stack.enter_context(mqtt_support.mosquitto(tmp_path))
            argv += ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}", "--dynsec"]
            env |= {"SENSORSEAL_DYNSEC_USERNAME": broker.admin_username,
                    "SENSORSEAL_DYNSEC_PASSWORD": broker.admin_password}
            protocol = mqtt.MQTTv5
        server = ServerProcess(argv, env)
        stack.callback(server.stop)
        url = server.wait_for({"mqtt": "sensorseal: MQTT on "})["mqtt"]
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        yield Site(data, host, int(port), protocol)


def mqtt_device(site: Site, cred: DeviceCredential, kem: DeviceKemKey, state: Path,
                commands: list[bytes]) -> MqttDevice:
    return MqttDevice(Device(cred, state), site.host, site.port,
                      outbox_path=state / "outbox.db", kem_key=kem, protocol=site.protocol,
                      on_command=lambda body: commands.append(body))


class Streamer:
    """Publishes {"n": i} every few milliseconds on its own thread until stopped."""

    def __init__(self, dev: MqttDevice, period_s: float = 0.02) -> None:
        self.dev, self.period = dev, period_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dev.publish_telemetry(json.dumps({"n": self.sent}).encode(), qos=1)
                self.sent += 1
            except OutboxFull:
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> Streamer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class LostReading(AssertionError):
    """A reading the broker acknowledged to the device was never stored."""


def assert_each_stored_once(site: Site, cred: DeviceCredential, sent: int) -> Counter[int]:
    """Every reading 0..sent-1 stored exactly once; returns how many per epoch. (The broker's
    PUBACK to the device comes before the server stored the message: wait for the store.)"""
    if not wait(lambda: sum(b'"n"' in p for _, p in site.stored_readings(cred)) >= sent, 15):
        got = {json.loads(p)["n"] for _, p in site.stored_readings(cred) if b'"n"' in p}
        events = cli(site.data, "events", "--json", "--device", str(cred.device_id)).stdout
        raise LostReading(f"missing {sorted(set(range(sent)) - got)} of {sent}; events:\n"
                          f"{events}")
    rows = [(e, p) for e, p in site.stored_readings(cred) if p != b'{"held": 1}']
    held = [e for e, p in site.stored_readings(cred) if p == b'{"held": 1}']
    assert held in ([], [1])  # the N message resent after the switch: inside N's grace
    numbers = Counter(json.loads(p)["n"] for _, p in rows)
    assert sorted(numbers) == list(range(sent)), "a reading is missing"
    assert set(numbers.values()) == {1}, "a reading is stored twice"
    return Counter(e for e, _ in rows)


def test_online_device_renews_over_mqtt_and_logs_in_with_the_new_password(
        site: Site, tmp_path: Path) -> None:
    cred, kem = site.add_device("online", "x25519")
    commands: list[bytes] = []
    dev = mqtt_device(site, cred, kem, tmp_path / "dev", commands)
    with dev:
        assert dev.wait_connected(10)
        with Streamer(dev) as streamer:
            assert wait(lambda: streamer.sent >= 10, 5)
            # Sealed under N but sent only after the switch (an outbox entry left behind).
            held = dev.device.seal(b'{"held": 1}', route=topics.telemetry(cred.device_id))
            out = cli(site.data, "device", "renew", str(cred.device_id), "--publish").stdout
            published = time.monotonic()
            assert "published" in out
            assert wait(lambda: dev.device.epoch == 2, 10), "the device did not switch"
            switched = time.monotonic()
            assert wait(lambda: site.server_epoch(cred) == 2, 10), "the server did not confirm"
            confirmed = time.monotonic()
            # The broker's password moved to N+1 and the session was cut; the device is back.
            assert wait(lambda: dev.stats.connects >= 2 and dev.connected, 15), dev.stats
            back = time.monotonic()
            dev.outbox.append(topics.telemetry(cred.device_id), held, 1)
            after = streamer.sent
            assert wait(lambda: streamer.sent >= after + 10, 5)
        assert dev.flush(15), "not every message was acknowledged"
        sent = streamer.sent
        # (A reading PUBACKed by the embedded broker just before it cut the session was lost
        # about 1 run in 10 until sensorseal.mqtt.embedded._DeliveringBroker.)
        per_epoch = assert_each_stored_once(site, cred, sent)
        assert wait(lambda: [p for _, p in site.stored_readings(cred)].count(
            b'{"held": 1}') == 1, 10)
        assert per_epoch[1] > 1 and per_epoch[2] > 0, per_epoch
        assert dev.stats.renewals_accepted == 1
        assert dev.stats.downlink_rejected == {}
        assert commands == [], "the offer reached the application's command handler"
        new_secret = dev.device.credential.secret
        assert not site.login(cred, cred.secret, 1), "the epoch-1 password still logs in"
        assert site.login(cred, new_secret, 2)
    print(f"\n{site.protocol.name}: switched {switched - published:.3f} s after the CLI "
          f"returned, confirmed seen {confirmed - published:.3f} s, back online "
          f"{back - published:.3f} s; {sent} readings, per epoch {dict(per_epoch)}, "
          f"{dev.stats.connects} connects, {dev.stats.logins_refused} logins refused")


def test_offline_device_completes_the_renewal_when_it_returns(
        site: Site, tmp_path: Path) -> None:
    cred, kem = site.add_device("offline", "x25519")
    commands: list[bytes] = []
    state = tmp_path / "dev"
    first = mqtt_device(site, cred, kem, state, commands)
    with first:  # the first connection makes the broker keep a session for the device
        assert first.wait_connected(10)
        first.publish_telemetry(b'{"n": 0}')
        assert first.flush(10)
    first.device.close()
    # Offline: the offer is published, then published again (the same offer).
    assert "published" in cli(site.data, "device", "renew", str(cred.device_id),
                              "--publish").stdout
    assert "published" in cli(site.data, "device", "renew", str(cred.device_id), "--resend",
                              "--publish").stdout
    assert site.server_epoch(cred) == 1
    back = mqtt_device(site, cred, kem, state, commands)
    with back:
        assert wait(lambda: back.device.epoch == 2, 15), back.stats
        assert wait(lambda: site.server_epoch(cred) == 2, 10), "the renewal was not confirmed"
        assert wait(lambda: back.stats.connects >= 2 and back.connected, 15), back.stats
        back.publish_telemetry(b'{"n": 1}')
        assert back.flush(10)
        assert wait(lambda: len(site.stored_readings(cred)) == 2, 10)
        assert back.stats.renewals_accepted == 1  # the second delivery was a no-op
        assert back.stats.downlink_rejected == {}
    assert commands == []
    assert sorted(site.stored_readings(cred)) == [(1, b'{"n": 0}'), (2, b'{"n": 1}')]
    assert not site.login(cred, cred.secret, 1)
    # Nothing pending any more: a resend says so.
    assert cli(site.data, "device", "renew", str(cred.device_id), "--resend", "--publish",
               check=1).returncode == 1


def test_publish_without_a_running_server_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    DataDir(data, env=clean_env()).init()
    site = Site(data, "127.0.0.1", 0, mqtt.MQTTv5)
    cred, _ = site.add_device("lonely", "x25519")
    proc = cli(data, "device", "renew", str(cred.device_id), "--publish", check=4)
    assert "no server with MQTT" in proc.stderr
    # No offer was made: nothing to resend.
    assert cli(data, "device", "renew", str(cred.device_id), "--resend", check=1).returncode
