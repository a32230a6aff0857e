"""Drop-in endpoints, end to end over real sockets on 127.0.0.1.

* Cloud IoT Core: a device written with paho-mqtt and PyJWT the way Google's public sample
  (`cloudiot_mqtt_example.py`) behaves — TLS 1.2 with CA verification against a test CA whose
  server certificate has a `localhost` SAN, client id = device path, JWT as the password,
  events/state publish, config (QoS 1) and commands/# subscriptions, JWT refresh by
  reconnecting — against an amqtt broker carrying `IotCoreBrokerPlugin`; and the HTTP bridge
  served by uvicorn over TLS.
* EVA ICS v3: an EVA-style client calls sensorseal's EVA server role through a private
  Mosquitto; a forged and a tampered request get no response and an audit entry each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from paho.mqtt.enums import CallbackAPIVersion
from starlette.applications import Starlette

from sensorseal.compat import eva, gcp_bridge, gcp_iot
from sensorseal.compat.gcp_iot import DevicePath
from sensorseal.mqtt.mosquitto import find_binary, make_ca_and_cert
from sensorseal.store.base import AuditEvent

pytestmark = pytest.mark.e2e

PROJECT, REGION, REGISTRY = "my-project", "europe-west1", "my-registry"
DEV = DevicePath(PROJECT, REGION, REGISTRY, "dev-1")
DEV2 = DEV.sibling("dev-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pem(key: Any) -> bytes:
    out: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return out


def pub_pem(key: Any) -> bytes:
    out: bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


def create_jwt(project_id: str, private_key: bytes, algorithm: str, minutes: float = 20) -> str:
    """Google sample's create_jwt(): iat now, exp now + minutes, aud = project id."""
    now = int(time.time())
    token = {"iat": now, "exp": now + int(minutes * 60), "aud": project_id}
    return jwt.encode(token, private_key, algorithm=algorithm)


def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tls = make_ca_and_cert(tmp / "tls", hosts=("localhost",))
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ec2 = ec.generate_private_key(ec.SECP256R1())
        self.registry = gcp_iot.InMemoryKeyRegistry()
        self.registry.add_key(DEV, pub_pem(self.rsa))
        self.registry.add_key(DEV, pub_pem(self.ec))
        self.registry.add_key(DEV2, pub_pem(self.ec2))
        self.audit: list[AuditEvent] = []
        self.telemetry: list[gcp_bridge.GcpMessage] = []
        self.gate = gcp_bridge.IotCoreGate(self.registry, clock=time.time,
                                           audit=self.audit.append,
                                           telemetry=self.telemetry.append)

    def wait_for(self, cond: Any, timeout: float = 5.0) -> bool:
        return wait_for(cond, timeout)


class BrokerThread:
    """An amqtt broker with the Cloud IoT Core plugin, TLS only, on its own event loop."""

    def __init__(self, env: Env) -> None:
        from amqtt.broker import Broker

        self.port = free_port()
        self.name = f"gcp-{self.port}"
        gcp_bridge.register_gate(self.name, env.gate)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}",
                                      "ssl": True, "certfile": str(env.tls.server_cert),
                                      "keyfile": str(env.tls.server_key)}},
            "plugins": {"sensorseal.compat.gcp_bridge.IotCoreBrokerPlugin":
                        {"gate": self.name, "check_interval_s": 0.2}},
        }
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def boot() -> None:
                self.broker = Broker(config)
                await self.broker.start()

            self.loop.run_until_complete(boot())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    @property
    def plugin(self) -> gcp_bridge.IotCoreBrokerPlugin:
        return gcp_bridge.IotCoreBrokerPlugin.instances[self.name]

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.call(self.broker.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture()
def broker(env: Env) -> Iterator[BrokerThread]:
    b = BrokerThread(env)
    try:
        yield b
    finally:
        b.stop()


class SampleDevice:
    """What Google's sample device does, with paho-mqtt's current API."""

    def __init__(self, env: Env, port: int, device: DevicePath, private_key: bytes,
                 algorithm: str, *, jwt_token: str | None = None, minutes: float = 20) -> None:
        self.connack: list[Any] = []
        self.disconnects = 0
        self.messages: list[tuple[str, bytes, int]] = []
        self.granted: list[Any] = []
        self.device = device
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=str(device),
                                  protocol=mqtt.MQTTv311)
        # username ignored by the server; the JWT is the password
        self.client.username_pw_set(username="unused",
                                    password=jwt_token or create_jwt(PROJECT, private_key,
                                                                     algorithm, minutes))
        self.client.tls_set(ca_certs=str(env.tls.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
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


def test_google_sample_device_full_flow(env: Env, broker: BrokerThread) -> None:
    # An operator sets a config before the device connects: delivered on subscribe.
    assert broker.call(broker.plugin.push_config(DEV, b'{"rate": 5}')) == 1
    dev = SampleDevice(env, broker.port, DEV, pem(env.rsa), "RS256", minutes=0.05)  # 3 s JWT
    try:
        assert env.wait_for(lambda: dev.connack)
        assert dev.connack[0] == 0
        dev.client.subscribe(f"/devices/{DEV.device}/config", qos=1)
        dev.client.subscribe(f"/devices/{DEV.device}/commands/#", qos=0)
        assert env.wait_for(lambda: any(t.endswith("/config") for t, _, _ in dev.messages))
        assert (f"/devices/{DEV.device}/config", b'{"rate": 5}', 1) in dev.messages
        # telemetry and state
        dev.client.publish(f"/devices/{DEV.device}/events", b"t=21.5", qos=1).wait_for_publish(5)
        dev.client.publish(f"/devices/{DEV.device}/events/alerts", b"hot", qos=1)
        dev.client.publish(f"/devices/{DEV.device}/state", b"ok", qos=1).wait_for_publish(5)
        assert env.wait_for(lambda: len(env.telemetry) == 3)
        kinds = {(m.device, m.kind, m.subfolder, m.payload) for m in env.telemetry}
        assert (DEV, gcp_iot.TopicKind.EVENTS, None, b"t=21.5") in kinds
        assert (DEV, gcp_iot.TopicKind.EVENTS, "alerts", b"hot") in kinds
        assert env.gate.configs.state(DEV) == b"ok"
        # config update and a command while connected
        assert broker.call(broker.plugin.push_config(DEV, b'{"rate": 1}')) == 2
        broker.call(broker.plugin.send_command(DEV, b"reboot", "system"))
        assert env.wait_for(lambda: (f"/devices/{DEV.device}/commands/system", b"reboot", 1)
                            in dev.messages)
        assert env.wait_for(lambda: (f"/devices/{DEV.device}/config", b'{"rate": 1}', 1)
                            in dev.messages)
        # expiry: the broker closes the session a moment after exp
        session = env.gate.session(str(DEV))
        assert session is not None
        assert env.wait_for(lambda: dev.disconnects >= 1, timeout=8)
        assert time.time() >= session.exp
    finally:
        dev.client.loop_stop()
    # the device reconnects with a fresh JWT (ES256 this time) and goes on
    dev2 = SampleDevice(env, broker.port, DEV, pem(env.ec), "ES256")
    try:
        assert env.wait_for(lambda: dev2.connack) and dev2.connack[0] == 0
        dev2.client.publish(f"/devices/{DEV.device}/events", b"again", qos=1).wait_for_publish(5)
        assert env.wait_for(lambda: any(m.payload == b"again" for m in env.telemetry))
    finally:
        dev2.close()


@pytest.mark.parametrize("case", ["none", "hs256-public-key", "wrong-aud", "future-iat",
                                  "expired", "other-device-key"])
def test_wrong_jwts_refused_at_connect_and_audited(env: Env, broker: BrokerThread,
                                                   case: str) -> None:
    now = int(time.time())
    claims = {"iat": now, "exp": now + 600, "aud": PROJECT}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    if case == "none":
        token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(
            f'{{"iat":{now},"exp":{now + 600},"aud":"{PROJECT}"}}'.encode()) + "."
        reason = "unsupported"
    elif case == "hs256-public-key":
        import hashlib
        import hmac
        head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(
            f'{{"iat":{now},"exp":{now + 600},"aud":"{PROJECT}"}}'.encode())
        sig = hmac.new(pub_pem(env.rsa), head.encode(), hashlib.sha256).digest()
        token, reason = head + "." + b64(sig), "unsupported"
    elif case == "wrong-aud":
        token = jwt.encode({**claims, "aud": "someone-else"}, pem(env.rsa), "RS256")
        reason = "policy_violation"
    elif case == "future-iat":
        token = jwt.encode({**claims, "iat": now + 1200, "exp": now + 1800}, pem(env.rsa),
                           "RS256")
        reason = "stale"
    elif case == "expired":
        token = jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, pem(env.rsa),
                           "RS256")
        reason = "stale"
    else:
        token = jwt.encode(claims, pem(env.ec2), "ES256")  # dev-2's key, dev-1's client id
        reason = "bad_signature"
    dev = SampleDevice(env, broker.port, DEV, b"", "RS256", jwt_token=token)
    try:
        assert env.wait_for(lambda: dev.connack or dev.disconnects)
        assert dev.connack and dev.connack[0] != 0  # CONNACK refused
        assert env.wait_for(lambda: any(e.reason == reason for e in env.audit))
        event = next(e for e in env.audit if e.reason == reason)
        assert event.transport == "mqtt-gcp" and event.device_id == str(DEV)
        assert token not in repr(event)
        assert env.gate.session(str(DEV)) is None
    finally:
        dev.close()


def test_acl_and_qos2_publish(env: Env, broker: BrokerThread) -> None:
    dev = SampleDevice(env, broker.port, DEV, pem(env.ec), "ES256")
    try:
        assert env.wait_for(lambda: dev.connack) and dev.connack[0] == 0
        dev.client.subscribe([(f"/devices/{DEV2.device}/config", 1),
                              (f"/devices/{DEV.device}/config", 2)])
        assert env.wait_for(lambda: dev.granted)
        codes = [getattr(rc, "value", rc) for rc in dev.granted[0]]
        assert codes[0] == 0x80  # another device's config: refused
        assert codes[1] in (1, 2)  # amqtt grants 2 in the SUBACK; deliveries are QoS 1
        dev.client.publish(f"/devices/{DEV2.device}/events", b"spoof", qos=1).wait_for_publish(5)
        dev.client.publish(f"/devices/{DEV.device}/events", b"mine", qos=1).wait_for_publish(5)
        assert env.wait_for(lambda: any(m.payload == b"mine" for m in env.telemetry))
        assert not any(m.payload == b"spoof" for m in env.telemetry)
        assert any(e.reason == "policy_violation" and "dev-2/events" in e.detail
                   for e in env.audit)
        # QoS 2 publish: connection closed, nothing ingested
        dev.client.publish(f"/devices/{DEV.device}/events", b"q2", qos=2)
        assert env.wait_for(lambda: dev.disconnects >= 1)
        time.sleep(0.2)
        assert not any(m.payload == b"q2" for m in env.telemetry)
        assert any(e.reason == "unsupported" and "QoS 2" in e.detail for e in env.audit)
    finally:
        dev.close()


# --- HTTP bridge --------------------------------------------------------------------------

@pytest.fixture()
def http_bridge(env: Env) -> Iterator[str]:
    port = free_port()
    app = Starlette(routes=gcp_bridge.http_routes(env.gate))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            ssl_certfile=str(env.tls.server_cert),
                            ssl_keyfile=str(env.tls.server_key))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert env.wait_for(lambda: server.started, timeout=10)
    try:
        yield f"https://localhost:{port}/v1/projects/{PROJECT}/locations/{REGION}" \
              f"/registries/{REGISTRY}/devices"
    finally:
        server.should_exit = True
        thread.join(10)


def test_http_bridge(env: Env, http_bridge: str) -> None:
    env.gate.configs.set_config(DEV, b"cfg-1")
    good = {"authorization": f"Bearer {create_jwt(PROJECT, pem(env.rsa), 'RS256')}"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(env.tls.ca_cert)),
                      timeout=10) as http:
        r = http.post(f"{http_bridge}/dev-1:publishEvent", headers=good,
                      json={"binary_data": base64.b64encode(b"t=20").decode()})
        assert r.status_code == 200
        r = http.post(f"{http_bridge}/dev-1:setState", headers=good,
                      json={"state": {"binary_data": base64.b64encode(b"st").decode()}})
        assert r.status_code == 200
        r = http.get(f"{http_bridge}/dev-1/config?local_version=0", headers=good)
        assert r.status_code == 200
        assert r.json() == {"version": "1", "binaryData": base64.b64encode(b"cfg-1").decode()}
        assert [(m.kind, m.payload, m.transport) for m in env.telemetry] == [
            (gcp_iot.TopicKind.EVENTS, b"t=20", "http"), (gcp_iot.TopicKind.STATE, b"st", "http")]
        # dev-1's JWT does not open dev-2 (no RSA key there); bad body 400; no token 401;
        # every refusal audited
        n = len(env.audit)
        assert http.post(f"{http_bridge}/dev-2:publishEvent", headers=good,
                         json={"binary_data": "AA=="}).status_code == 403
        assert http.post(f"{http_bridge}/dev-1:publishEvent", headers=good,
                         json={"binary_data": "***"}).status_code == 400
        assert http.get(f"{http_bridge}/dev-1/config").status_code == 401
        expired = jwt.encode({"iat": 1, "exp": 2, "aud": PROJECT}, pem(env.rsa), "RS256")
        assert http.get(f"{http_bridge}/dev-1/config",
                        headers={"authorization": f"Bearer {expired}"}).status_code == 403
        assert [e.reason for e in env.audit[n:]] == ["unknown_epoch", "malformed", "malformed",
                                                      "stale"]
        assert len(env.telemetry) == 2


# --- EVA ICS over a real Mosquitto --------------------------------------------------------

@contextlib.contextmanager
def anonymous_mosquitto(tmp: Path) -> Iterator[int]:
    """A private Mosquitto that lets anyone in: EVA's frames, not the broker, protect content."""
    binary = find_binary()
    assert binary is not None
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join([
        "per_listener_settings false", "allow_anonymous true", "persistence false",
        "max_queued_messages 0", f"user {getpass.getuser()}",
        f"log_dest file {tmp / 'mosquitto.log'}", f"listener {port} 127.0.0.1", ""]))
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


@pytest.mark.skipif(find_binary() is None, reason="mosquitto not installed")
def test_eva_client_calls_sensorseal_over_mosquitto(tmp_path: Path) -> None:
    api_key, key_id = "eva-e2e-" + os.urandom(8).hex(), "ops"
    audit: list[AuditEvent] = []
    values = {"sensor:env/temp": "21.5"}

    def item_state(kid: str, params: Any) -> Any:
        oid = params.get("i") if isinstance(params, dict) else None
        if oid not in values:
            raise eva.EvaRpcError(eva.ERR_NOT_FOUND, "no such item")
        return {"oid": oid, "status": 1, "value": values[oid]}

    server = eva.EvaServer(api_key_for={key_id: api_key}.get,
                           handlers={"test": lambda k, p: {"ok": True},
                                     "item.state": item_state},
                           rng=os.urandom, clock=time.time, audit=audit.append)
    req_topic = eva.request_topic("uc", "plant1")
    with anonymous_mosquitto(tmp_path) as mq_port:
        # sensorseal's EVA endpoint: subscribe requests, publish replies and discovery
        ctl = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sensorseal-eva")
        ready = threading.Event()

        def on_request(c: Any, u: Any, m: Any) -> None:
            reply = server.handle(m.payload, source=f"mqtt:{m.topic}")
            if reply is not None:
                c.publish(eva.response_topic("uc", "plant1", reply.request_id), reply.frame, 1)

        ctl.on_message = on_request
        ctl.on_subscribe = lambda *a: ready.set()
        ctl.connect("127.0.0.1", mq_port)
        ctl.subscribe(req_topic, 1)
        ctl.loop_start()
        assert ready.wait(5)
        ctl.publish(eva.discovery_topic(), eva.discovery_payload("uc", "plant1"), 1, retain=True)

        # the EVA-style caller (CoreAPIClient's framing)
        responses: dict[str, bytes] = {}
        discovered: list[bytes] = []
        cli = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="eva-client")

        def on_msg(c: Any, u: Any, m: Any) -> None:
            if m.topic == eva.discovery_topic():
                discovered.append(m.payload)
            else:
                responses[m.topic.rsplit("/", 1)[1]] = m.payload

        cli.on_message = on_msg
        sub_ready = threading.Event()
        cli.on_subscribe = lambda *a: sub_ready.set()
        cli.connect("127.0.0.1", mq_port)
        cli.subscribe([("controller/uc/plant1/api/response/+", 1),
                       (eva.discovery_topic(), 1)])
        cli.loop_start()
        try:
            assert sub_ready.wait(5)
            client = eva.EvaClient(key_id, api_key, os.urandom)
            rid, frame = client.call("item.state", {"i": "sensor:env/temp"})
            cli.publish(req_topic, frame, 1)
            assert wait_for(lambda: rid in responses)
            assert client.open(responses[rid])["result"]["value"] == "21.5"
            assert wait_for(lambda: discovered == [b"uc/plant1"])
            # zlib-compressed request
            zclient = eva.EvaClient(key_id, api_key, os.urandom,
                                    encoding=eva.FrameEncoding.ZLIB_MSGPACK)
            zrid, zframe = zclient.call("test")
            cli.publish(req_topic, zframe, 1)
            assert wait_for(lambda: zrid in responses)
            assert zclient.open(responses[zrid])["result"] == {"ok": True}
            # forged (wrong key) and tampered (bit flip) requests: no response, audited
            frid, forged = eva.EvaClient(key_id, "wrong", os.urandom).call("test")
            trid, tframe = client.call("test")
            tampered = tframe[:-40] + bytes([tframe[-40] ^ 1]) + tframe[-39:]
            cli.publish(req_topic, forged, 1)
            cli.publish(req_topic, tampered, 1)
            cli.publish(req_topic, frame, 1)  # and a replay of the first request
            assert wait_for(lambda: len(audit) >= 3)
            time.sleep(0.3)
            assert frid not in responses and trid not in responses
            assert [e.reason for e in audit] == ["bad_mac", "bad_mac", "replay"]
            assert all(e.transport == "mqtt-eva" and api_key not in repr(e) for e in audit)
        finally:
            cli.loop_stop()
            cli.disconnect()
            ctl.loop_stop()
            ctl.disconnect()

