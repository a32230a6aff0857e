"""The gateway's MQTT radio for real: a private Mosquitto (dynsec accounts and ACLs per device,
gateway and stranger), the cloud app on HTTPS (uvicorn) and the gateway in front of it.

- devices in modes e3, e2 and e2+e3 publish frames on their uplink topics and are acked only
  after the gateway buffered them; the cloud stores every acked message exactly once;
- a stranger with a broker account but no network key: never acked, never forwarded, counted
  (link_auth) and audited; garbage, empty and oversized payloads are dropped and counted and the
  gateway keeps serving the devices; a member's recorded frame republished on another device's
  topic is only re-acked, to the device it authenticated as;
- the broker is restarted (same port, no persistence) in the middle of a stream, with the
  gateway a real process over TLS (`sensorseal gateway run --transport mqtt`): no acked frame
  is lost and none is stored twice.

Fixtures and helpers (`Cloud`, `pki`, `world`) come from tests/e2e/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: mqtt_support
sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "gateway"))
from gateway_world import World
from test_gateway import Cloud, pki, world  # noqa: F401 - fixtures used by name

import mqtt_support
from sensorseal.core.keys import broker_password
from sensorseal.core.link import NetworkKey, wrap
from sensorseal.gateway.buffer import Buffer
from sensorseal.gateway.config import GatewayConfig, write_config
from sensorseal.gateway.mqtt_radio import (
    DEFAULT_PREFIX,
    MqttGatewayRadio,
    MqttRadio,
    device_acls,
    downlink_topic,
    gateway_acls,
    uplink_topic,
)
from sensorseal.gateway.node import LayeredDevice
from sensorseal.gateway.relay import RateLimit, ack_payload
from sensorseal.gateway.service import Gateway, GatewaySettings
from sensorseal.gateway.upstream import Upstream
from sensorseal.mqtt.dynsec import Acl, DynsecAdmin
from sensorseal.mqtt.mosquitto import MosquittoProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STRANGER = "stranger"
STRANGER_PW = "stranger-" + os.urandom(8).hex()


# -- broker accounts ---------------------------------------------------------------------------

def accounts(broker: MosquittoProcess, net: bytes, devices: list[LayeredDevice],
             gateway: GatewayConfig) -> None:
    """Dynsec clients: each device confined to its topics, the gateway to its network's, and a
    stranger who may publish on every uplink topic of the network (the worst case: the broker's
    ACLs do not stop it; only E1 does)."""
    with DynsecAdmin(broker.host, broker.port, broker.admin_username,
                     broker.admin_password) as admin:
        for d in devices:
            cred = d.device.credential
            role = f"radio-{cred.device_id.hex()}"
            admin.create_role(role, device_acls(net, d.sender))
            admin.create_client(cred.device_id.hex(),
                                broker_password(cred.secret, cred.device_id, cred.epoch),
                                roles=[role])
        gcred = gateway.credential
        admin.create_role("radio-gateway", gateway_acls([net]))
        admin.create_client(gcred.device_id.hex(),
                            broker_password(gcred.secret, gcred.device_id, gcred.epoch),
                            roles=["radio-gateway"])
        admin.create_role("radio-stranger", [
            Acl(kind, f"{DEFAULT_PREFIX}/{net.hex()}/{way}/+")
            for kind in ("publishClientSend", "subscribePattern") for way in ("up", "down")])
        admin.create_client(STRANGER, STRANGER_PW, roles=["radio-stranger"])


def device_radio(broker_addr: tuple[str, int], dev: LayeredDevice, *,
                 tls: ssl.SSLContext | None = None, timeout_s: float = 0.3) -> MqttRadio:
    cred = dev.device.credential
    radio = MqttRadio(broker_addr, dev.network, username=cred.device_id.hex(),
                      password=broker_password(cred.secret, cred.device_id, cred.epoch),
                      tls=tls, senders=[dev.sender], timeout_s=timeout_s)
    assert radio.wait_ready(10), "device radio did not connect and subscribe"
    return radio


def send_until_acked(radio: MqttRadio, dev: LayeredDevice, payload: bytes,
                     limit_s: float = 30.0) -> None:
    """What a device does: keep the frame and resend the same bytes until the gateway acks."""
    frame, seq = dev.frame(payload)
    deadline = time.monotonic() + limit_s
    while not radio.send(frame, dev.sender, seq, attempts=3):
        assert time.monotonic() < deadline, "gateway never acked"


def wait_stored(w: World, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while w.store.count_telemetry() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # anything extra (a duplicate) would show up now


def gateway_drops(w: World) -> dict[str, str]:
    """Audit reason -> detail of the drop reports the cloud received from gateways."""
    return {e.reason: e.detail for e in w.store.events(limit=1_000)
            if e.transport == "gateway"}


# -- the gateway in this process (so the test can read its counters) ---------------------------

class GatewayThread:
    """Gateway + MqttGatewayRadio on their own event loop in a thread."""

    def __init__(self, config: GatewayConfig, buffer_path: Path, upstream: Upstream,
                 host: str, port: int, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._args = (config, buffer_path, upstream, host, port, options)
        self.ready = threading.Event()
        self.gateway: Gateway | None = None
        self.radio: MqttGatewayRadio | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        config, buffer_path, upstream, host, port, options = self._args
        self.buffer = Buffer(buffer_path)
        self.gateway = Gateway(config, self.buffer, upstream,
                               GatewaySettings(rate=RateLimit(1000, 1000)))
        self.radio = MqttGatewayRadio(self.gateway, host, port, **options)
        self._task = asyncio.current_task()
        try:
            await self.radio.run(ready=lambda _a: self.ready.set())
        except asyncio.CancelledError:
            pass
        finally:
            self.buffer.close()

    def start(self) -> GatewayThread:
        self._thread.start()
        assert self.ready.wait(10), "gateway did not subscribe"
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the gateway's loop (the relay is not thread-safe) and return its value."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def counts(self) -> dict[str, int]:
        assert self.gateway is not None
        gw = self.gateway
        return dict(self.call(lambda: dict(gw.relay.counts)))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        assert not self._thread.is_alive(), "gateway did not stop"
        self.loop.close()


# -- tests -------------------------------------------------------------------------------------

def test_devices_over_mqtt_exactly_once_strangers_and_junk_dropped(
        world: World, pki: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    net, key = world.network("e1+e4")
    devices = [world.device(net, mode)[1] for mode in ("e3", "e2", "e2+e3")]
    layered = [d for d in devices if d is not None]
    cfg = world.gateway([net])
    cloud = Cloud(world, pki["server_cert"], pki["server_key"])
    cloud.start()
    upstream = Upstream(cloud.url, ca_file=pki["ca"])
    acked: list[bytes] = []
    radios: list[MqttRadio] = []
    gw: GatewayThread | None = None
    probe: mqtt_support.Probe | None = None
    try:
        with mqtt_support.mosquitto(tmp_path) as broker:
            accounts(broker, net, layered, cfg)
            addr = (broker.host, broker.port)
            gw = GatewayThread(cfg, tmp_path / "buffer.db", upstream, *addr).start()
            # The broker's admin sees every radio topic: what went up, what acks went down.
            probe = mqtt_support.Probe.connect(*addr, broker.admin_username,
                                               broker.admin_password)
            assert probe.subscribe(f"{DEFAULT_PREFIX}/#")
            radios = [device_radio(addr, d) for d in layered]

            def burst(start: int, rounds: int) -> None:
                for i in range(start, start + rounds):
                    for n, (radio, dev) in enumerate(zip(radios, layered, strict=True)):
                        payload = json.dumps({"dev": n, "i": i}).encode()
                        send_until_acked(radio, dev, payload)
                        acked.append(payload)

            burst(0, 10)
            assert gw.counts().get("link_auth", 0) == 0

            # A stranger (broker account, no network key) claims the e3 device's id.
            victim = layered[0]
            fake = NetworkKey(net, os.urandom(16), key.alg)
            strange = MqttRadio(addr, fake, username=STRANGER, password=STRANGER_PW,
                                senders=[victim.sender], timeout_s=0.15)
            assert strange.wait_ready(10)
            for s in range(5):
                frame = wrap(b'{"evil":1}', network=fake, sender=victim.sender, seq=10_000 + s)
                assert not strange.send(frame, victim.sender, 10_000 + s, attempts=1)

            # Junk on the uplink topics: random bytes, nothing, a frame's first bytes, payloads
            # over the 255-byte MTU (one just over, one of 60 KB), one the broker must not even
            # hand to the gateway (over its Maximum Packet Size).
            strange.close()
            junk = mqtt_support.Probe.connect(*addr, STRANGER, STRANGER_PW)
            up = uplink_topic(net, victim.sender)
            mids = [junk.publish(up, payload) for payload in (
                os.urandom(40), b"", b"\xd0\x83\x58", os.urandom(256), b"\xd0" * 60_000,
                os.urandom(200_000))]
            assert junk.wait_acked(mids)

            # A member's recorded frame replayed on another device's topic: only re-acked, and
            # the ack goes to the device the frame authenticated as.
            dev_a, dev_b = layered[0], layered[1]
            recorded = next(p for t, p in probe.messages
                            if t == uplink_topic(net, dev_a.sender))
            before = len(probe.messages)
            assert junk.wait_acked([junk.publish(uplink_topic(net, dev_b.sender), recorded)])
            junk.close()
            down_a = downlink_topic(net, dev_a.sender)
            assert probe.wait(lambda: any(t == down_a for t, _ in probe.messages[before:]), 5)
            mqtt_support.settle(0.2)
            assert downlink_topic(net, dev_b.sender) not in \
                [t for t, _ in probe.messages[before:]]

            # Still serving the devices.
            burst(10, 5)
            counts = gw.counts()
            stats = gw.radio.stats if gw.radio is not None else None
            wait_stored(world, len(acked))
            # The drops reach the cloud's audit log with the gateway's next batch (each second).
            deadline = time.monotonic() + 10
            while len(gateway_drops(world)) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)

            # With the gateway gone, the stranger answers a frame with forged acks: one under
            # a made-up key, a genuine ack of an earlier frame, noise. None counts.
            gw.stop()
            old_ack = next(p for t, p in probe.messages if t == down_a)
            frame, seq = dev_a.frame(b'{"never":"acked"}')
            forgeries = [wrap(ack_payload(dev_a.sender, seq), network=fake, sender=cfg.gateway_id,
                              seq=1), old_ack, os.urandom(30)]
            forger = mqtt_support.Probe.connect(*addr, STRANGER, STRANGER_PW)

            def forge(msg: Any) -> None:
                if msg.topic == uplink_topic(net, dev_a.sender):
                    for f in forgeries:
                        forger.client.publish(down_a, f, qos=1)

            forger.on_message_hook = forge
            assert forger.subscribe(uplink_topic(net, dev_a.sender))
            radio_a = radios[0]
            refused = radio_a.stats.acks_refused
            assert not radio_a.send(frame, dev_a.sender, seq, attempts=2)
            assert radio_a.stats.acks_refused - refused >= 2 * len(forgeries)
            forger.close()
    finally:
        for r in radios:
            r.close()
        if probe is not None:
            probe.close()
        if gw is not None:
            gw.stop()
        upstream.close()
        cloud.stop()

    assert counts.get("link_auth") == 5, counts
    assert counts.get("garbage") == 3, counts
    assert counts.get("oversize") == 2, counts
    assert counts.get("reacked", 0) >= 1, counts
    # Every payload but the one over the gateway's Maximum Packet Size reached the relay.
    assert stats is not None and stats.frames_in >= len(acked) + 5 + 5 + 1, stats
    stored = [r.payload for r in world.store.telemetry(limit=10_000)]
    assert len(stored) == len(acked) == 45
    assert sorted(stored) == sorted(acked)  # every acked frame, exactly once
    assert all(b"evil" not in p for p in stored)
    transports = {r.transport.rsplit(":", 1)[1] for r in world.store.telemetry(limit=10_000)}
    assert transports == {"e1+e3+e4", "e1+e2+e4", "e1+e2+e3+e4"}
    details = gateway_drops(world)
    assert "link_auth" in details.get("decrypt_failed", ""), details
    assert "garbage" in details.get("malformed", ""), details
    assert "oversize" in details.get("oversize", ""), details




def test_broker_restart_mid_stream_loses_no_acked_frame(
        world: World, pki: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    net, _key = world.network("e1+e4")
    devices = [world.device(net, mode)[1] for mode in ("e3", "e2", "e2+e3")]
    layered = [d for d in devices if d is not None]
    cred = world.gateways.add_gateway("mqtt-gw", [net])
    write_config(tmp_path / "gw.json", world.gateways.gateway_config(cred.device_id))
    cloud = Cloud(world, pki["server_cert"], pki["server_key"])
    cloud.start()
    acked: list[bytes] = []
    lock = threading.Lock()
    radios: list[MqttRadio] = []
    proc: subprocess.Popen[str] | None = None
    try:
        with mqtt_support.mosquitto(tmp_path, tls=True) as broker:
            from sensorseal.gateway.config import load_config
            accounts(broker, net, layered, load_config(tmp_path / "gw.json"))
            assert broker.tls_port is not None and broker.tls_files is not None
            ca = str(broker.tls_files.ca_cert)
            proc = subprocess.Popen(
                [sys.executable, "-m", "sensorseal", "gateway", "run",
                 "--config", str(tmp_path / "gw.json"), "--buffer", str(tmp_path / "buffer.db"),
                 "--upstream", cloud.url, "--ca", str(pki["ca"]), "--transport", "mqtt",
                 "--mqtt-host", broker.host, "--mqtt-port", str(broker.tls_port),
                 "--mqtt-ca", ca], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"listening on mqtts://{broker.host}:{broker.tls_port}" in line, line
            addr = (broker.host, broker.tls_port)
            radios = [device_radio(addr, d, tls=ssl.create_default_context(cafile=ca))
                      for d in layered]
            rounds = 40

            errors: list[BaseException] = []

            def stream(n: int) -> None:
                try:
                    for i in range(rounds):
                        payload = json.dumps({"dev": n, "i": i}).encode()
                        send_until_acked(radios[n], layered[n], payload)
                        with lock:
                            acked.append(payload)
                except BaseException as exc:
                    errors.append(exc)

            senders = [threading.Thread(target=stream, args=(n,)) for n in range(len(layered))]
            for t in senders:
                t.start()
            deadline = time.monotonic() + 20
            while len(acked) < 20:
                assert time.monotonic() < deadline, "no progress before the restart"
                time.sleep(0.01)
            at_restart = len(acked)
            broker.restart()  # same ports; persistence off: sessions and queues are gone
            for t in senders:
                t.join(60)
                assert not t.is_alive()
            assert not errors, errors
            assert at_restart < rounds * len(layered)  # the restart was mid-stream
            assert all(r.stats.disconnects >= 1 for r in radios)
            wait_stored(world, len(acked))
            proc.terminate()  # SIGTERM: a clean stop
            assert proc.wait(10) == 0
    finally:
        for r in radios:
            r.close()
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        cloud.stop()
    stored = [r.payload for r in world.store.telemetry(limit=10_000)]
    assert len(acked) == 120
    assert len(stored) == len(acked)
    assert sorted(stored) == sorted(acked)  # every acked frame, exactly once
