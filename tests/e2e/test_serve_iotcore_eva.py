"""`sensorseal serve` with the drop-in endpoints, as a real process on 127.0.0.1.

* Cloud IoT Core: `serve --iotcore-port 0` with a test CA whose server certificate has a
  `localhost` SAN; a device written with paho-mqtt and PyJWT the way Google's public sample
  (`cloudiot_mqtt_example.py`) behaves — TLS 1.2 with CA verification, client id = device path,
  JWT as the password, events and state, config (QoS 1) and commands/# subscriptions, a new
  JWT by reconnecting — registered with `sensorseal device add-key`. Its events are read back
  through `GET /v1/telemetry`; wrong JWTs are refused at CONNECT and read back through
  `sensorseal events`; configs set with `sensorseal iotcore config` (before and while the
  device is connected) reach it; the HTTP bridge's publishEvent and config work.
* EVA ICS v3: the server's MQTT broker is a private anonymous Mosquitto (`--mqtt-url`); an
  EVA-style client calls `test` and `item.state` through it and gets answers; a forged request
  gets none and is audited.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from paho.mqtt.enums import CallbackAPIVersion
from server_process import SERVING, ServerProcess

from sensorseal.compat import eva
from sensorseal.datadir import DataDir
from sensorseal.mqtt.mosquitto import TlsFiles, find_binary, make_ca_and_cert

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

PROJECT, REGION, REGISTRY = "my-project", "europe-west1", "my-registry"
BASE = f"projects/{PROJECT}/locations/{REGION}/registries/{REGISTRY}/devices"
DEV, DEV2, DEV3 = f"{BASE}/dev-1", f"{BASE}/dev-2", f"{BASE}/dev-3"
EVA_KEY_ID, EVA_PRODUCT, EVA_SYSTEM = "ops", "uc", "plant1"
START_TIMEOUT_S = 30


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("SENSORSEAL_KEK", "SENSORSEAL_MQTT_PASSWORD")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(cond: Callable[[], Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def private_pem(key: Any) -> bytes:
    out: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return out


def public_pem(key: Any) -> bytes:
    out: bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


def create_jwt(project_id: str, private_key: bytes, algorithm: str, seconds: int = 1200) -> str:
    """Google sample's create_jwt(): iat now, exp later, aud = project id."""
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + seconds, "aud": project_id}, private_key,
                      algorithm=algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- processes --------------------------------------------------------------------------------

@dataclass
class Setup:
    path: Path
    token: str
    tls: TlsFiles
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    ec2_key: ec.EllipticCurvePrivateKey
    eva_api_key: str


def cli(setup: Setup, *args: str, stdin: str = "") -> str:
    r = subprocess.run([sys.executable, "-m", "sensorseal", "--data-dir", str(setup.path),
                        *args], input=stdin, capture_output=True, text=True, env=_env(),
                       timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    base = tmp_path_factory.mktemp("dropin")
    path = base / "data"
    token = DataDir(path, env=_env()).init()
    keys = Setup(path, token, make_ca_and_cert(base / "tls", hosts=("localhost",)),
                 rsa.generate_private_key(public_exponent=65537, key_size=2048),
                 ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()),
                 "eva-e2e-" + os.urandom(12).hex())
    for name, key, device in (("rsa", keys.rsa_key, DEV), ("ec", keys.ec_key, DEV),
                              ("ec2", keys.ec2_key, DEV2)):
        (base / f"{name}.pub").write_bytes(public_pem(key))
        cli(keys, "device", "add-key", device, "--iotcore", str(base / f"{name}.pub"))
    # dev-3 (ec2's key too) must number its events: a replay window checks the counter
    cli(keys, "device", "add-key", DEV3, "--iotcore", str(base / "ec2.pub"),
        "--counter-field", "seq")
    (base / "cfg1.json").write_bytes(b'{"rate": 5}')
    assert "version 1" in cli(keys, "iotcore", "config", DEV, str(base / "cfg1.json"))
    cli(keys, "eva", "key", "add", EVA_KEY_ID, "--key-stdin", stdin=keys.eva_api_key + "\n")
    return keys


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A private Mosquitto that lets anyone in: EVA's frames, not the broker, protect content."""
    binary = find_binary()
    if binary is None:
        pytest.skip("mosquitto not installed")
    tmp = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join([
        "per_listener_settings false", "allow_anonymous true", "persistence false",
        f"user {getpass.getuser()}", f"log_dest file {tmp / 'mosquitto.log'}",
        f"listener {port} 127.0.0.1", ""]))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _port_open(port) or proc.poll() is not None, 10)
        assert proc.poll() is None, "mosquitto did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Server(ServerProcess):
    """`sensorseal serve` over HTTPS with the IoT Core listener and the EVA endpoint."""

    def __init__(self, setup: Setup, mqtt_port: int) -> None:
        super().__init__(
            [sys.executable, "-m", "sensorseal", "--data-dir", str(setup.path), "serve",
             "--http-port", "0", "--certfile", str(setup.tls.server_cert),
             "--keyfile", str(setup.tls.server_key), "--iotcore-port", "0",
             "--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}",
             "--eva-product", EVA_PRODUCT, "--eva-system", EVA_SYSTEM], _env(), START_TIMEOUT_S)
        found = self.wait_for({"http": SERVING, "iotcore": "Cloud IoT Core MQTT on ",
                               "eva": "EVA ICS API on "})
        # The certificate names localhost only: reach both listeners by that name.
        self.url = "https://localhost:" + found["http"].rsplit(":", 1)[1]
        self.iotcore_port = int(found["iotcore"].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def server(setup: Setup, mosquitto: int) -> Iterator[Server]:
    srv = Server(setup, mosquitto)
    try:
        yield srv
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, "".join(srv.output)
    assert "Traceback" not in "".join(srv.output), "".join(srv.output)


def operator_get(setup: Setup, server: Server, path: str) -> Any:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(setup.tls.ca_cert)),
                      timeout=10) as http:
        r = http.get(server.url + path, headers={"Authorization": f"Bearer {setup.token}"})
    assert r.status_code == 200, r.text
    return r.json()


def events(setup: Setup, reason: str | None = None) -> list[dict[str, Any]]:
    """The audit log as `sensorseal events --json` prints it."""
    args = ["events", "--json", "--limit", "500"] + (["--reason", reason] if reason else [])
    return [json.loads(line) for line in cli(setup, *args).splitlines() if line.strip()]


def api_events(setup: Setup, server: Server) -> list[dict[str, Any]]:
    """The audit log through `GET /v1/events` (faster than a CLI process), same keys."""
    found = operator_get(setup, server, "/v1/events?limit=1000")["events"]
    return [{**e, "device_id": e["device"]} for e in found]


# --- the Google sample device -----------------------------------------------------------------

class SampleDevice:
    """What Google's sample device does (paho-mqtt, PyJWT), pointed at sensorseal."""

    def __init__(self, setup: Setup, port: int, device: str, token: str) -> None:
        self.connack: list[Any] = []
        self.disconnects = 0
        self.messages: list[tuple[str, bytes, int]] = []
        self.granted: list[Any] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username="unused", password=token)  # username ignored
        self.client.tls_set(ca_certs=str(setup.tls.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        ctx = self.client._ssl_context
        assert ctx is not None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the sample pinned TLS 1.2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        self.client.on_connect = lambda c, u, f, rc, p=None: self.connack.append(rc)
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, bytes(m.payload), m.qos))
        self.client.on_subscribe = lambda c, u, mid, rcs, p=None: self.granted.append(rcs)
        self.client.connect("localhost", port, keepalive=30)
        self.client.loop_start()

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnects += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_google_sample_device_end_to_end(setup: Setup, server: Server) -> None:
    short = DEV.rsplit("/", 1)[1]
    token = create_jwt(PROJECT, private_pem(setup.rsa_key), "RS256", seconds=4)
    dev = SampleDevice(setup, server.iotcore_port, DEV, token)
    try:
        assert wait_for(lambda: dev.connack) and dev.connack[0] == 0
        dev.client.subscribe(f"/devices/{short}/config", qos=1)
        dev.client.subscribe(f"/devices/{short}/commands/#", qos=0)
        # the config set with the CLI before the server started: delivered on subscribe
        assert wait_for(lambda: (f"/devices/{short}/config", b'{"rate": 5}', 1) in dev.messages)
        dev.client.publish(f"/devices/{short}/events", b"t=21.5", qos=1).wait_for_publish(5)
        dev.client.publish(f"/devices/{short}/events/alerts", b"hot", qos=1).wait_for_publish(5)
        dev.client.publish(f"/devices/{short}/state", b"ok", qos=1).wait_for_publish(5)
        # a config set from another process while the device is connected
        cli(setup, "iotcore", "config", DEV, "-", stdin='{"rate": 1}')
        assert wait_for(lambda: (f"/devices/{short}/config", b'{"rate": 1}', 1) in dev.messages)
        # the JWT expires: the server closes the session
        assert wait_for(lambda: dev.disconnects >= 1, timeout=8)
    finally:
        dev.client.loop_stop()
    # the device reconnects with a fresh JWT (ES256 this time) and goes on
    dev2 = SampleDevice(setup, server.iotcore_port, DEV,
                        create_jwt(PROJECT, private_pem(setup.ec_key), "ES256"))
    try:
        assert wait_for(lambda: dev2.connack) and dev2.connack[0] == 0
        dev2.client.publish(f"/devices/{short}/events", b"again", qos=1).wait_for_publish(5)
        # another device's topics: refused and audited
        dev2.client.publish("/devices/dev-2/events", b"spoof", qos=1).wait_for_publish(5)

        def stored() -> list[dict[str, Any]]:
            rows = operator_get(setup, server, "/v1/telemetry?limit=50")["telemetry"]
            return [r for r in rows if r["level"] == "iotcore-jwt"]

        assert wait_for(lambda: len(stored()) >= 4)
        rows = stored()
        got = {(r["route"], r["payload"], r["transport"]) for r in rows}
        assert (f"/devices/{short}/events", "t=21.5", "mqtt-gcp") in got
        assert (f"/devices/{short}/events/alerts", "hot", "mqtt-gcp") in got
        assert (f"/devices/{short}/state", "ok", "mqtt-gcp") in got
        assert (f"/devices/{short}/events", "again", "mqtt-gcp") in got
        assert not any(r["payload"] == "spoof" for r in rows)
        assert len({r["device"] for r in rows}) == 1
        seqs = [r["seq"] for r in rows]
        assert len(set(seqs)) == len(seqs)  # server-assigned, one per PUBLISH
    finally:
        dev2.close()
    assert any(e["transport"] == "mqtt-gcp" and "dev-2/events" in e["detail"]
               for e in api_events(setup, server) if e["reason"] == "policy_violation")


def test_wrong_jwts_refused_at_connect_and_audited(setup: Setup, server: Server) -> None:
    now = int(time.time())
    claims = {"iat": now, "exp": now + 600, "aud": PROJECT}
    body = b64url(json.dumps(claims).encode())
    rsa_pem = private_pem(setup.rsa_key)
    hs_head = b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + body
    cases = {
        "none": (b64url(b'{"alg":"none","typ":"JWT"}') + "." + body + ".", "unsupported"),
        "hs256-public-key": (hs_head + "." + b64url(hmac.new(public_pem(setup.rsa_key),
                                                             hs_head.encode(),
                                                             hashlib.sha256).digest()),
                             "unsupported"),
        "wrong-aud": (jwt.encode({**claims, "aud": "someone-else"}, rsa_pem, "RS256"),
                      "policy_violation"),
        "future-iat": (jwt.encode({**claims, "iat": now + 1200, "exp": now + 1800}, rsa_pem,
                                  "RS256"), "stale"),
        "expired": (jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, rsa_pem,
                               "RS256"), "stale"),
        "other-device-key": (jwt.encode(claims, private_pem(setup.ec2_key), "ES256"),
                             "bad_signature"),
    }
    before = {(e["at_ms"], e["reason"], e["detail"]) for e in events(setup)}
    for token, _ in cases.values():
        dev = SampleDevice(setup, server.iotcore_port, DEV, token)
        try:
            assert wait_for(lambda d=dev: d.connack or d.disconnects)  # type: ignore[misc]
            assert dev.connack and dev.connack[0] != 0, "CONNECT should be refused"
        finally:
            dev.close()
    new = [e for e in events(setup) if e["transport"] == "mqtt-gcp"
           and (e["at_ms"], e["reason"], e["detail"]) not in before]
    reasons = sorted(e["reason"] for e in new)
    assert reasons == sorted(reason for _, reason in cases.values())
    assert all(e["device_id"] == DEV for e in new)
    for token, _ in cases.values():  # no token in any audit detail
        assert not any(token in e["detail"] or token[-20:] in e["detail"] for e in new)


def test_http_bridge_against_the_server(setup: Setup, server: Server) -> None:
    base = f"{server.url}/v1/{BASE}"
    good = {"authorization": f"Bearer {create_jwt(PROJECT, private_pem(setup.ec_key), 'ES256')}"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(setup.tls.ca_cert)),
                      timeout=10) as http:
        r = http.post(f"{base}/dev-1:publishEvent", headers=good,
                      json={"binary_data": base64.b64encode(b"via-http").decode()})
        assert r.status_code == 200, r.text
        r = http.get(f"{base}/dev-1/config?local_version=0", headers=good)
        assert r.status_code == 200
        latest = r.json()
        assert int(latest["version"]) >= 1
        assert base64.b64decode(latest["binaryData"]) in (b'{"rate": 5}', b'{"rate": 1}')
        # dev-1's JWT does not open dev-2; no token at all: refused and audited
        assert http.post(f"{base}/dev-2:publishEvent", headers=good,
                         json={"binary_data": "AA=="}).status_code == 403
        assert http.get(f"{base}/dev-1/config").status_code == 401
    rows = operator_get(setup, server, "/v1/telemetry?limit=50")["telemetry"]
    assert any(r["payload"] == "via-http" and r["transport"] == "http-gcp"
               and r["route"] == "/devices/dev-1/events" for r in rows)
    assert any(e["transport"] == "http-gcp" and e["reason"] == "bad_signature"
               for e in api_events(setup, server))


def test_payload_counters_and_suspension(setup: Setup, server: Server) -> None:
    """dev-3 was registered with --counter-field seq: a replayed or missing counter is refused
    and audited; a suspended device's JWT no longer opens anything."""
    base = f"{server.url}/v1/{BASE}"
    auth = {"authorization": f"Bearer {create_jwt(PROJECT, private_pem(setup.ec2_key), 'ES256')}"}

    def publish(http: httpx.Client, body: bytes) -> int:
        return http.post(f"{base}/dev-3:publishEvent", headers=auth,
                         json={"binary_data": base64.b64encode(body).decode()}).status_code

    with httpx.Client(verify=ssl.create_default_context(cafile=str(setup.tls.ca_cert)),
                      timeout=10) as http:
        for body in (b'{"seq": 7, "t": 1}', b'{"seq": 8, "t": 2}', b'{"seq": 7, "t": 1}',
                     b"t=3"):
            assert publish(http, body) == 200  # the bridge answers like Cloud IoT Core did
        device_id = next(r["id"] for r in operator_get(setup, server, "/v1/devices")["devices"]
                         if r["name"] == "dev-3")
        rows = operator_get(setup, server, f"/v1/telemetry?device={device_id}")["telemetry"]
        assert sorted((r["seq"], r["payload"]) for r in rows) == [
            (7, '{"seq": 7, "t": 1}'), (8, '{"seq": 8, "t": 2}')]
        mine = [e for e in api_events(setup, server) if e["device_id"] == DEV3]
        assert {"replay", "malformed"} <= {e["reason"] for e in mine}
        cli(setup, "device", "suspend", device_id)
        assert publish(http, b'{"seq": 9}') == 403
    assert any(e["reason"] == "suspended" and e["transport"] == "http-gcp"
               for e in api_events(setup, server) if e["device_id"] == DEV3)


def test_eva_client_over_the_servers_broker(setup: Setup, server: Server,
                                            mosquitto: int) -> None:
    req_topic = eva.request_topic(EVA_PRODUCT, EVA_SYSTEM)
    responses: dict[str, bytes] = {}
    caller = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="eva-e2e-client")
    caller.on_message = lambda c, u, m: responses.__setitem__(m.topic.rsplit("/", 1)[1],
                                                             bytes(m.payload))
    subscribed = threading.Event()
    caller.on_subscribe = lambda *a: subscribed.set()
    caller.connect("127.0.0.1", mosquitto)
    caller.subscribe(f"controller/{EVA_PRODUCT}/{EVA_SYSTEM}/api/response/+", 1)
    caller.loop_start()
    try:
        assert subscribed.wait(5)
        client = eva.EvaClient(EVA_KEY_ID, setup.eva_api_key, os.urandom)
        rid, frame = client.call("test")
        caller.publish(req_topic, frame, 1)
        assert wait_for(lambda: rid in responses)
        answer = client.open(responses[rid])["result"]
        assert answer["ok"] is True and answer["product"] == EVA_PRODUCT
        # the IoT Core device's latest reading, by its sensorseal id
        device_id = next(r["id"] for r in operator_get(setup, server, "/v1/devices")["devices"]
                         if r["name"] == "dev-1")
        rid2, frame2 = client.call("item.state", {"i": f"sensor:{device_id}"})
        caller.publish(req_topic, frame2, 1)
        assert wait_for(lambda: rid2 in responses)
        [item] = client.open(responses[rid2])["result"]
        assert item["oid"] == f"sensor:{device_id}" and item["status"] == 1
        assert item["value"] is not None
        # forged (wrong key) and replayed requests: no answer, audited
        frid, forged = eva.EvaClient(EVA_KEY_ID, "not-the-key-123", os.urandom).call("test")
        caller.publish(req_topic, forged, 1)
        caller.publish(req_topic, frame, 1)  # a replay of the first request
        assert wait_for(lambda: {"bad_mac", "replay"} <= {
            e["reason"] for e in api_events(setup, server) if e["transport"] == "mqtt-eva"},
            timeout=10)
        time.sleep(0.3)
        assert frid not in responses
        logged = events(setup)  # as the operator sees them
        assert any(e["reason"] == "bad_mac" and e["transport"] == "mqtt-eva" for e in logged)
        assert all(setup.eva_api_key not in e["detail"] for e in logged)
    finally:
        caller.loop_stop()
        caller.disconnect()
