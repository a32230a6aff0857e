"""`sensorseal demo`: a small fleet, live readings, live attacks, and what was refused and why.

Everything runs on the embedded defaults in one process: a SQLite data directory (a fresh
temporary one unless given), the HTTP ingest server and the embedded MQTT broker on free ports,
simulated devices that seal and send over real HTTP or real MQTT (every second device, the last
one excepted). One sealed command and one sealed JSON-RPC call go down to an MQTT device and its
verified answers come back. The attacks are the ones the platform exists to stop; the summary
reads their reasons back from the audit log, where the server recorded them (the attacker itself
only ever sees a generic refusal), or, for a publish the broker's ACL dropped, from the fact that
it never reached anyone.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from starlette.applications import Starlette

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import broker_password, derive
from sensorseal.datadir import DataDir
from sensorseal.device import Device, HttpSender
from sensorseal.mqtt import topics
from sensorseal.mqtt.client import MqttDevice
from sensorseal.mqtt.commands import COUNTER_FILE, CloudLink, CommandSender, DownlinkCounter
from sensorseal.mqtt.rpc import RpcClient, RpcDispatcher
from sensorseal.operators import Role
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.console import Console as WebConsole
from sensorseal.server.mqtt_service import MqttOptions, MqttService
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import Store

__all__ = ["run_demo"]

ROUTE = "/v1/messages"


@dataclass
class Attack:
    name: str
    expected: str
    device_id: str
    status: int = 0
    reason: str = "-"
    via: str = "HTTP"
    answer: str = ""

    @property
    def refused(self) -> bool:
        # Over MQTT the sender gets no verdict: what counts is where it was stopped and why.
        return (self.status >= 400 or self.via == "MQTT") and self.reason == self.expected


class _ServerThread:
    """uvicorn on a socket we bound (so port 0 works), in a daemon thread."""

    def __init__(self, app: Starlette, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="demo-server", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the demo server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _reading(rng: random.Random, n: int) -> dict[str, float | int]:
    return {"n": n, "temp_c": round(rng.gauss(21, 2), 2), "rh": round(rng.uniform(30, 60), 1)}


def _last_reason(store: Store, device_id: str, after_ms: int) -> str:
    for event in store.events(device_id=device_id, since_ms=after_ms, limit=20):
        return event.reason
    return "-"


def _attacks(registry: Registry, store: Store, sender: HttpSender, devices: list[Device],
             accepted_envelope: bytes, console: Console) -> list[Attack]:
    victim, revoked = devices[0], devices[-1]
    results: list[Attack] = []

    def mount(name: str, expected: str, device_id: DeviceId, envelope: bytes) -> None:
        before = int(time.time() * 1000) - 1
        attack = Attack(name, expected, str(device_id))
        attack.status = sender.send(envelope).status
        attack.reason = _last_reason(store, str(device_id), before)
        results.append(attack)

    # 1. Forgery: the victim's id, but a key the attacker made up.
    forged_keys = derive(os.urandom(32), victim.device_id, victim.epoch, Direction.UP)
    mount("forged message (made-up key)", "decrypt_failed", victim.device_id,
          seal(b'{"temp_c": -40}', keys=forged_keys, seq=10**9, route=ROUTE,
               timestamp_ms=int(time.time() * 1000)))
    # 2. Tampering: one bit flipped in the ciphertext of a genuine message.
    genuine = bytearray(victim.seal_json({"temp_c": 22.0}))
    genuine[-20] ^= 0x01
    mount("bit-flipped message", "decrypt_failed", victim.device_id, bytes(genuine))
    # 3. Replay: a message the server already accepted, sent again verbatim.
    mount("replayed message", "replay", victim.device_id, accepted_envelope)
    # 4. A device nobody provisioned.
    stranger = DeviceId(os.urandom(12))
    mount("unknown device", "unknown_device", stranger,
          seal(b'{"temp_c": 1}', keys=derive(os.urandom(32), stranger, 1, Direction.UP), seq=1,
               route=ROUTE, timestamp_ms=int(time.time() * 1000)))
    # 5. A stolen device, revoked by the operator: its genuine keys no longer count.
    registry.revoke(revoked.device_id, actor="demo")
    time.sleep(1.1)  # revocation reaches the ingest cache within one second
    mount("revoked device (stolen)", "revoked", revoked.device_id,
          revoked.seal_json({"temp_c": 23.0}))
    return results


class _Paho:
    """A bare MQTT 3.1.1 client for the demo's eavesdropper and attacker (not the SDK)."""

    def __init__(self, host: str, port: int, username: str, password: str | None) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"demo-{secrets.token_hex(4)}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic,
                                                                         bytes(m.payload)))
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._connected.wait(5):
            raise RuntimeError("the demo could not connect to its MQTT broker")

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        self._subscribed.wait(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _MqttFleet:
    """The demo's MQTT side: devices on the embedded broker, a command/RPC caller, and a
    broker-side eavesdropper (what a hostile broker sees: ciphertext only)."""

    def __init__(self, service: MqttService, datadir: DataDir, registry: Registry,
                 store: Store, devices: list[Device]) -> None:
        _, self.host, self.port = service.endpoint
        self.service = service
        self.devices: list[MqttDevice] = []
        self.sent = 0
        self._commands: list[bytes] = []
        self._started = time.monotonic()
        rpc = RpcDispatcher()
        for d in devices:
            md = MqttDevice(d, self.host, self.port,
                            outbox_path=datadir.path / "demo-devices" / f"{d.device_id}.outbox",
                            on_command=self._on_command, rpc=rpc,
                            protocol=mqtt.MQTTv311)  # the embedded broker speaks MQTT 3.1.1
            self.devices.append(md.start())
        rpc.register("status", lambda: {"uptime_s": round(time.monotonic() - self._started, 1),
                                        "firmware": "1.4.2"})
        user, password = service.service_account()
        self.spy = _Paho(self.host, self.port, user, password)
        self.spy.subscribe(f"{topics.PREFIX}/+/telemetry")
        self._counter = DownlinkCounter(datadir.path / COUNTER_FILE)
        self.link = CloudLink(registry, self._counter)
        self._store = store
        for md in self.devices:
            md.wait_connected(10)

    def _on_command(self, body: bytes) -> bytes:
        self._commands.append(body)
        return b"interval set to " + body.partition(b"=")[2]

    def publish(self, rng: random.Random, n: int) -> None:
        for i, md in enumerate(self.devices):
            md.publish_telemetry(json.dumps(_reading(rng, n + i)).encode())
            self.sent += 1

    def stored(self) -> int:
        return sum(self._store.count_telemetry(md.device.device_id) for md in self.devices)

    def settle(self, timeout: float = 10.0) -> int:
        """Wait until the broker took every reading and the worker stored them."""
        for md in self.devices:
            md.flush(timeout)
        deadline = time.monotonic() + timeout
        while self.stored() < self.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stored()

    def round_trips(self, console: Console) -> bool:
        """One sealed command and one sealed RPC call to the first MQTT device."""
        target = self.devices[0].device.device_id
        user, password = self.service.service_account()
        ok = True
        sender = CommandSender(self.link, self.host, self.port, username=user,
                               password=password, audit=self._store, protocol=mqtt.MQTTv311)
        with sender:
            t0 = time.perf_counter()
            ack = sender.send_command(target, b"interval=5s", timeout=10)
            ms = (time.perf_counter() - t0) * 1000
        ok &= ack.ok
        console.print(f"command round trip  {target}: 'interval=5s' -> ack "
                      f"{'ok' if ack.ok else 'FAILED'} {ack.result.decode(errors='replace')!r} "
                      f"({ms:.0f} ms, sealed both ways)", markup=False)
        client = RpcClient(self.link, self.host, self.port, username=user, password=password,
                           audit=self._store, protocol=mqtt.MQTTv311)
        with client:
            t0 = time.perf_counter()
            result: Any = client.call(target, "status", None, timeout=10)
            ms = (time.perf_counter() - t0) * 1000
        ok &= isinstance(result, dict) and result.get("firmware") == "1.4.2"
        console.print(f"rpc round trip      {target}: status() -> {json.dumps(result)} "
                      f"({ms:.0f} ms, sealed JSON-RPC 2.0)", markup=False)
        return ok

    def attacks(self, victim: DeviceId) -> list[Attack]:
        """A device's credentials used on another device's topic; a captured publish replayed
        (by the hostile broker, which knows each device's broker password)."""
        thief = self.devices[0].device
        captured = next(p for t, p in self.spy.received
                        if t == topics.telemetry(thief.device_id))
        cred = thief.credential
        attacker = _Paho(self.host, self.port, thief.device_id.hex(),
                         broker_password(cred.secret, thief.device_id, cred.epoch))
        results: list[Attack] = []
        try:
            wrong_topic = topics.telemetry(victim)
            seen = len(self.spy.received)
            acl = Attack("MQTT publish on another device's topic", "broker_acl", str(victim),
                         via="MQTT")
            attacker.publish(wrong_topic, thief.seal(b'{"temp_c": -40}', route=wrong_topic))
            time.sleep(0.5)
            delivered = any(t == wrong_topic for t, _ in self.spy.received[seen:])
            acl.answer = "MQTT: delivered" if delivered else "MQTT: dropped by broker"
            acl.reason = "-" if delivered else "broker_acl"
            results.append(acl)

            before = int(time.time() * 1000) - 1
            replay = Attack("replayed MQTT publish (hostile broker)", "replay",
                            str(thief.device_id), via="MQTT", answer="MQTT: delivered")
            attacker.publish(topics.telemetry(thief.device_id), captured)
            deadline = time.monotonic() + 5
            while replay.reason == "-" and time.monotonic() < deadline:
                time.sleep(0.05)
                replay.reason = _last_reason(self._store, str(thief.device_id), before)
            results.append(replay)
        finally:
            attacker.close()
        return results

    def close(self) -> None:
        self.spy.close()
        for md in self.devices:
            md.stop()
        self._counter.close()


def _demo_admin(web: WebConsole) -> tuple[str, str]:
    """A fresh admin for this demo run, with a random password shown once on the console."""
    name = f"demo-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    web.operators.add(name, password, Role.ADMIN, actor="demo")
    return name, password


def run_demo(datadir: DataDir | None, *, duration: float, n_devices: int, port: int,
             keep: bool, console: Console, rng_seed: int | None = None) -> bool:
    """Run the demo; True if every attack was refused with its expected reason."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if datadir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sensorseal-demo-")
        datadir = DataDir(Path(tmp.name) / "data")
    try:
        return _run(datadir, duration=duration, n_devices=n_devices, port=port, keep=keep,
                    console=console,
                    rng=random.Random(rng_seed))  # noqa: S311 - simulated readings, not keys
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(datadir: DataDir, *, duration: float, n_devices: int, port: int, keep: bool,
         console: Console, rng: random.Random) -> bool:
    token = datadir.init() if not datadir.is_initialized() else None
    store, keystore = datadir.open()
    registry = Registry(store, keystore)
    pipeline = Pipeline(registry, store)
    web = WebConsole(pipeline, registry, store, token_check=datadir.check_token)
    app = create_app(pipeline, registry, store, token_check=datadir.check_token, console=web)
    admin_name, admin_password = _demo_admin(web)
    server = _ServerThread(app, port)
    server.start()
    broker: MqttService | None = None
    fleet: _MqttFleet | None = None
    try:
        # A free port: the demo must work where 1883 is taken (a system Mosquitto, say).
        broker = MqttService(MqttOptions(port=0), registry=registry, pipeline=pipeline,
                             store=store, data_dir=datadir.path).start()
        console.rule("[bold]sensorseal demo")
        console.print(f"data dir      {datadir.path}")
        console.print(f"ingest API    {server.url}/v1/messages")
        console.print(f"operator API  {server.url}/v1/devices  (Authorization: Bearer <token>)")
        if token is not None:
            console.print(f"operator token {token}", markup=False, soft_wrap=True)
        console.print(f"MQTT broker   {broker.url}  (embedded; devices log in as themselves, "
                      "their topics only)", markup=False)
        console.print(f"web console   {server.url}/console/", markup=False)
        console.print(f"  sign in as  {admin_name} / {admin_password}  (one-time demo admin)",
                      markup=False, soft_wrap=True)
        creds: list[DeviceCredential] = [
            registry.add_device(f"sensor-{i + 1:02d}", "standard", actor="demo")
            for i in range(n_devices)]
        state = datadir.path / "demo-devices"
        devices = [Device(c, state / str(c.device_id)) for c in creds]
        # Every second device talks MQTT; the first (the victim of the HTTP attacks) and the
        # last (revoked below) stay on HTTP.
        on_mqtt = {i for i in range(1, n_devices - 1, 2)}
        http_devices = [d for i, d in enumerate(devices) if i not in on_mqtt]
        fleet = _MqttFleet(broker, datadir, registry, store,
                           [d for i, d in enumerate(devices) if i in on_mqtt])
        console.print(f"provisioned   {n_devices} devices (policy standard: sealed, fresh): "
                      f"{len(http_devices)} over HTTP, {len(on_mqtt)} over MQTT")
        sent = accepted = 0
        first_accepted: bytes | None = None
        with HttpSender(server.url, max_retries=3) as sender:
            start = time.monotonic()
            progress = Progress(TextColumn("streaming readings"), BarColumn(),
                                TextColumn("{task.fields[accepted]} accepted"),
                                TimeRemainingColumn(), console=console, transient=False)
            with progress:
                task = progress.add_task("stream", total=duration, accepted=0)
                while (elapsed := time.monotonic() - start) < duration:
                    batch = [d.seal_json(_reading(rng, sent + i))
                             for i, d in enumerate(http_devices)]
                    sent += len(batch)
                    verdicts = sender.send_batch(batch)
                    accepted += sum(verdicts)
                    if first_accepted is None and verdicts and verdicts[0]:
                        first_accepted = batch[0]
                    fleet.publish(rng, sent)
                    progress.update(task, completed=min(elapsed, duration),
                                    accepted=accepted + fleet.stored())
                    time.sleep(0.2)
                progress.update(task, completed=duration, accepted=accepted + fleet.stored())
            sent += fleet.sent
            accepted += fleet.settle()
            if first_accepted is None:
                console.print("[red]no reading was accepted: the demo cannot continue[/]")
                return False
            trips_ok = True
            if fleet.devices:
                trips_ok = fleet.round_trips(console)
            attacks = _attacks(registry, store, sender, devices, first_accepted, console)
            if fleet.devices:
                attacks += fleet.attacks(devices[0].device_id)
        _summary(console, store, sent, accepted, attacks)
        if not keep:
            console.print("The server stops with the demo; `scripts/demo --keep` keeps it (and "
                          "the console) running.")
        if keep:
            console.print(f"Serving on {server.url} until Ctrl-C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        fleet.close()
        fleet = None
        for d in devices:
            d.close()
        return accepted == sent and trips_ok and all(a.refused for a in attacks)
    finally:
        if fleet is not None:
            fleet.close()
        if broker is not None:
            broker.stop()
        server.stop()
        store.close()


def _summary(console: Console, store: Store, sent: int, accepted: int,
             attacks: list[Attack]) -> None:
    console.rule("[bold]summary")
    console.print(f"readings sent {sent}, accepted {accepted}; messages stored "
                  f"{store.count_telemetry()} (readings, and the sealed acks of commands)")
    table = Table("attack", "answer", "reason (audit log, or broker)", "expected", "refused")
    for a in attacks:
        table.add_row(a.name, a.answer or f"HTTP {a.status}", a.reason, a.expected,
                      "[green]yes[/]" if a.refused else "[red]NO[/]")
    console.print(table)
    counts = store.count_events_by_reason()
    console.print("audit log by reason: " + json.dumps(counts, sort_keys=True))
