"""`sensorseal serve` with MQTT, as a user runs it: a real server process with its embedded
broker on a free port, devices on real MQTT connections, the CLI in other processes.

Covers: sealed telemetry over MQTT stored by the server's ingest worker; a command and an RPC
round trip through `sensorseal command` / `sensorseal rpc`; a revocation made by another process
reaching HTTP ingest, MQTT login and the live MQTT session within one second; `--no-mqtt`; a
taken MQTT port; and the demo, whose MQTT attacks must be refused too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.keys import broker_password
from sensorseal.datadir import DataDir
from sensorseal.device import Device, HttpSender
from sensorseal.mqtt.client import MqttDevice
from sensorseal.mqtt.rpc import RpcDispatcher
from sensorseal.server.mqtt_service import SERVICE_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mqtt_support  # tests/ helpers, as in test_brokers.py

CMD = [sys.executable, "-m", "sensorseal"]


def run(data: Path, *args: str, check: int | None = 0,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SENSORSEAL_DATA_DIR": str(data), "COLUMNS": "200"}
    proc = subprocess.run([*CMD, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    if check is not None:
        assert proc.returncode == check, (proc.stdout, proc.stderr)
    return proc


@dataclass
class Server:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    http: str = ""
    mqtt_host: str = ""
    mqtt_port: int = 0

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in {''.join(self.lines)}")


def start_server(data: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    env = {**os.environ, "SENSORSEAL_DATA_DIR": str(data), **(env or {})}
    proc = subprocess.Popen([*CMD, "serve", "--http-port", "0", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    server = Server(proc)
    threading.Thread(target=server.read, daemon=True).start()
    server.http = server.wait_for(r"serving on (http://127\.0\.0\.1:\d+)").group(1)
    return server


def stop_server(server: Server) -> None:
    server.proc.terminate()
    server.proc.wait(timeout=15)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    run(d, "init")
    return d


@pytest.fixture
def server(data: Path) -> Iterator[Server]:
    srv = start_server(data, "--mqtt-port", "0")
    m = srv.wait_for(r"MQTT on mqtt://(127\.0\.0\.1):(\d+)")
    srv.mqtt_host, srv.mqtt_port = m.group(1), int(m.group(2))
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, "".join(srv.lines)
    assert not (data / SERVICE_FILE).exists(), "the service file outlived the server"


def add_device(data: Path, name: str) -> DeviceCredential:
    out = json.loads(run(data, "device", "add", name, "--json").stdout)
    return DeviceCredential.parse(out["credential"])


def mqtt_device(cred: DeviceCredential, server: Server, state: Path,
                **kw: object) -> MqttDevice:
    # the embedded broker speaks MQTT 3.1.1 only
    return MqttDevice(Device(cred, state), server.mqtt_host, server.mqtt_port,
                      outbox_path=state / "outbox.db", protocol=mqtt.MQTTv311,
                      **kw)  # type: ignore[arg-type]


def wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def stored(data: Path, cred: DeviceCredential) -> int:
    store, _ = DataDir(data).open()
    try:
        return store.count_telemetry(cred.device_id)
    finally:
        store.close()


def connect_as(server: Server, cred: DeviceCredential) -> list[object]:
    """A fresh MQTT 3.1.1 login with the device's credentials: the CONNACK reason codes."""
    outcome: list[object] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(cred.device_id.hex(),
                      broker_password(cred.secret, cred.device_id, cred.epoch))
    c.on_connect = lambda *a: outcome.append(a[3])
    c.connect(server.mqtt_host, server.mqtt_port)
    c.loop_start()
    wait(lambda: bool(outcome), 5)
    c.disconnect()
    c.loop_stop()
    return outcome


# --------------------------------------------------------------------------------------------


def test_telemetry_command_and_rpc_over_mqtt(data: Path, server: Server,
                                              tmp_path: Path) -> None:
    cred = add_device(data, "pump")
    info_file = data / SERVICE_FILE
    assert oct(info_file.stat().st_mode & 0o777) == "0o600"
    password = json.loads(info_file.read_text())["password"]
    assert password and password not in "".join(server.lines)

    rpc = RpcDispatcher()
    rpc.register("add", lambda a, b: a + b)
    commands: list[bytes] = []

    def on_command(body: bytes) -> bytes:
        commands.append(body)
        return b"valve " + body

    dev = mqtt_device(cred, server, tmp_path / "dev", on_command=on_command, rpc=rpc)
    with dev:
        assert dev.wait_connected(10)
        for i in range(20):
            dev.publish_telemetry(json.dumps({"n": i}).encode())
        assert dev.flush(10)
        assert wait(lambda: stored(data, cred) == 20, 10), stored(data, cred)

        out = run(data, "command", str(cred.device_id), "open", "--timeout", "10")
        assert commands == [b"open"]
        assert "ack from" in out.stdout and "valve open" in out.stdout

        out = run(data, "rpc", str(cred.device_id), "add", "[2, 3]", "--timeout", "10")
        assert json.loads(out.stdout) == 5
        bad = run(data, "rpc", str(cred.device_id), "nope", check=1)
        assert "-32601" in bad.stderr
        assert dev.stats.downlink_rejected == {}
    assert password not in "".join(server.lines)


def test_revocation_from_another_process_reaches_mqtt_within_one_second(
        data: Path, server: Server, tmp_path: Path) -> None:
    cred, other = add_device(data, "stolen"), add_device(data, "bystander")
    dev = mqtt_device(cred, server, tmp_path / "dev")
    bystander = mqtt_device(other, server, tmp_path / "other")
    with dev, bystander, HttpSender(server.http, max_retries=0) as http:
        assert dev.wait_connected(10) and bystander.wait_connected(10)
        http_dev = dev.device  # one device, one sequence counter, two transports
        dev.publish_telemetry(b'{"before": 1}')
        assert wait(lambda: stored(data, cred) == 1, 10)
        assert http.send(http_dev.seal_json({"before": 2})).accepted

        run(data, "device", "revoke", str(cred.device_id))
        revoked_at = time.monotonic()
        assert wait(lambda: not dev.connected, 1.0), "MQTT session not dropped within 1 s"
        print(f"embedded: session dropped {time.monotonic() - revoked_at:.3f} s after revoke")
        assert wait(lambda: not http.send(http_dev.seal_json({"after": 1})).accepted,
                    1.0 - (time.monotonic() - revoked_at)), "HTTP still accepts after 1 s"
        assert time.monotonic() - revoked_at <= 1.0
        # A reconnect with the device's credentials is refused (by the broker's login check).
        assert dev.stats.connects == 1
        [reason] = connect_as(server, cred)
        assert getattr(reason, "is_failure", False), reason
        time.sleep(1.2)  # paho's own reconnect attempts (1 s backoff) are refused too
        assert not dev.connected and dev.stats.connects == 1
        assert stored(data, cred) == 2
        assert bystander.connected  # only the revoked device was cut
    events = [json.loads(line) for line in run(
        data, "events", "--json", "--reason", "revoked", "--device",
        str(cred.device_id)).stdout.splitlines()]
    assert events and all(e["transport"] == "http" for e in events)


def test_external_mosquitto_with_dynsec(data: Path, tmp_path: Path) -> None:
    """--mqtt-url + --dynsec: devices provisioned in Mosquitto at start-up and when added later,
    a shared-subscription worker, the CLI downlink, and a revocation kicking the session."""
    with mqtt_support.mosquitto(tmp_path) as broker:
        early = add_device(data, "early")
        srv = start_server(
            data, "--mqtt-url", f"mqtt://127.0.0.1:{broker.port}", "--dynsec",
            env={"SENSORSEAL_DYNSEC_USERNAME": broker.admin_username,
                 "SENSORSEAL_DYNSEC_PASSWORD": broker.admin_password})
        try:
            srv.wait_for(rf"MQTT on mqtt://127\.0\.0\.1:{broker.port} \(broker\)")
            srv.mqtt_host, srv.mqtt_port = "127.0.0.1", broker.port
            late = add_device(data, "late")  # reaches dynsec through the status watcher
            rpc = RpcDispatcher()
            rpc.register("ping", lambda: "pong")
            devs = [MqttDevice(Device(c, tmp_path / n), srv.mqtt_host, srv.mqtt_port,
                               outbox_path=tmp_path / f"{n}.db", rpc=rpc,
                               on_command=lambda b: b.upper())
                    for c, n in ((early, "early"), (late, "late"))]
            with devs[0], devs[1]:
                assert all(d.wait_connected(10) for d in devs)
                for d in devs:
                    d.publish_telemetry(b'{"t": 1}')
                assert wait(lambda: stored(data, early) == stored(data, late) == 1, 10)
                assert "HI" in run(data, "command", str(late.device_id), "hi").stdout
                assert json.loads(run(data, "rpc", str(early.device_id), "ping").stdout) \
                    == "pong"
                run(data, "device", "revoke", str(late.device_id))
                revoked_at = time.monotonic()
                assert wait(lambda: not devs[1].connected, 1.0), "dynsec did not kick in 1 s"
                print(f"dynsec: session dropped {time.monotonic() - revoked_at:.3f} s after "
                      "revoke")
                assert devs[0].connected
        finally:
            stop_server(srv)


def test_no_mqtt_and_a_taken_port(data: Path) -> None:
    srv = start_server(data, "--no-mqtt")
    try:
        time.sleep(0.3)
        assert not any("MQTT on" in line for line in srv.lines)
        assert not (data / SERVICE_FILE).exists()
        cred = add_device(data, "d")
        no_server = run(data, "command", str(cred.device_id), "x", check=4)
        assert "no server with MQTT" in no_server.stderr
    finally:
        stop_server(srv)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run(data, "serve", "--http-port", "0", "--mqtt-port", str(port), check=3)
    assert "already in use" in proc.stderr and "--mqtt-port 0" in proc.stderr


def test_demo_streams_over_mqtt_and_refuses_every_attack(tmp_path: Path) -> None:
    proc = run(tmp_path / "demo", "demo", "--duration", "2", "--devices", "4", check=0,
               timeout=90)
    out = proc.stdout
    assert "command round trip" in out and "rpc round trip" in out, out
    assert "another device's topic" in out and "replayed MQTT publish" in out, out
    assert " NO " not in out and "NO\n" not in out, out
