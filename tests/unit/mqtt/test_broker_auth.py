"""Broker auth rules and the HTTP endpoints that third-party brokers call.

The rules (`RegistryAuth` over a real SQLite registry, `device_topic_allowed`,
`service_topic_allowed`) are exercised directly, then through the Starlette routes in each
request shape that brokers send: JSON, form, query string; `action` (EMQX) or `acc`
(mosquitto-go-auth, amqtt). Also the pieces of the Mosquitto config that must never regress.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from starlette.applications import Starlette
from starlette.testclient import TestClient

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import broker_password
from sensorseal.keystore import SoftwareKeystore
from sensorseal.mqtt import topics
from sensorseal.mqtt.broker_auth import MAX_BODY, broker_auth_routes
from sensorseal.mqtt.dynsec import device_acls, ingest_acls, password_fingerprint
from sensorseal.mqtt.embedded import (
    RegistryAuth,
    TopicAction,
    device_topic_allowed,
    registry_auth,
    service_topic_allowed,
)
from sensorseal.mqtt.mosquitto import TlsListener, dynsec_file_content, render_config
from sensorseal.registry import Registry
from sensorseal.store import SQLiteStore

P, S, R = TopicAction.PUBLISH, TopicAction.SUBSCRIBE, TopicAction.RECEIVE


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    store = SQLiteStore(str(tmp_path / "r.db"))
    store.migrate()
    yield Registry(store, SoftwareKeystore(os.urandom(32)))
    store.close()


def _pw(cred: DeviceCredential) -> str:
    return broker_password(cred.secret, cred.device_id, cred.epoch)


# --------------------------------------------------------------------------- login rules


def test_registry_login(registry: Registry) -> None:
    a, b = registry.add_device("a"), registry.add_device("b")
    auth = registry_auth(registry)
    assert auth.check_login(a.device_id.hex(), _pw(a))
    assert not auth.check_login(a.device_id.hex(), _pw(b))
    assert not auth.check_login(a.device_id.hex(), "")
    assert not auth.check_login(a.device_id.hex().upper(), _pw(a))  # ids are lowercase hex
    assert not auth.check_login(DeviceId(os.urandom(12)).hex(), _pw(a))
    # the password of another epoch is not this one
    assert not auth.check_login(a.device_id.hex(),
                                broker_password(a.secret, a.device_id, a.epoch + 1))
    registry.suspend(a.device_id)
    assert not auth.check_login(a.device_id.hex(), _pw(a))
    registry.resume(a.device_id)
    assert auth.check_login(a.device_id.hex(), _pw(a))
    registry.revoke(a.device_id)
    assert not auth.check_login(a.device_id.hex(), _pw(a))
    assert auth.check_login(b.device_id.hex(), _pw(b))


def test_service_account(registry: Registry) -> None:
    auth = registry_auth(registry)
    other = registry_auth(registry)
    assert len(auth.service_password) >= 40 and auth.service_password != other.service_password
    assert auth.check_login(auth.service_username, auth.service_password)
    assert not auth.check_login(auth.service_username, other.service_password)
    assert auth.service_password not in repr(auth)
    fixed = registry_auth(registry, service_username="workers", service_password="s3")
    assert fixed.check_login("workers", "s3") and not fixed.check_login("sensorseal-ingest", "s3")
    with pytest.raises(ConfigError):
        RegistryAuth(registry, service_username="0" * 24)


# --------------------------------------------------------------------------- topic rules

A = DeviceId(bytes(range(12)))
B = DeviceId(bytes(range(1, 13)))


@pytest.mark.parametrize(("topic", "action", "allowed"), [
    (topics.telemetry(A), P, True),
    (topics.state(A), P, True),
    (topics.acks(A), P, True),
    (topics.rpc_response(A, "ff01"), P, True),
    (topics.commands(A), P, False),
    (topics.rpc_request(A), P, False),
    (topics.telemetry(B), P, False),
    (topics.rpc_response(B, "ff01"), P, False),
    (f"sensorseal/{A.hex()}/telemetry/extra", P, False),
    (f"sensorseal/{A.hex()}/+", P, False),
    ("sensorseal/x", P, False),
    (topics.commands(A), S, True),
    (topics.rpc_request(A), S, True),
    (topics.commands(A), R, True),
    (topics.commands(B), S, False),
    ("sensorseal/+/commands", S, False),
    (f"sensorseal/{A.hex()}/#", S, False),
    (topics.telemetry(A), S, False),
    ("#", S, False),
])
def test_device_topics(topic: str, action: TopicAction, allowed: bool) -> None:
    assert device_topic_allowed(A.hex(), topic, action) is allowed


def test_device_topics_need_a_device_username() -> None:
    assert not device_topic_allowed("admin", topics.telemetry(A), P)
    assert not device_topic_allowed(A.hex().upper(), topics.telemetry(A), P)


@pytest.mark.parametrize(("topic", "action", "allowed"), [
    ("$share/workers/sensorseal/+/telemetry", S, True),
    ("sensorseal/+/telemetry", S, True),
    ("sensorseal/+/state", S, True),
    ("sensorseal/+/acks", S, True),
    ("sensorseal/+/rpc/response/#", S, True),
    ("sensorseal/+/commands", S, False),
    ("sensorseal/#", S, False),
    ("#", S, False),
    ("$share/a/b/sensorseal/+/telemetry", S, False),
    (topics.commands(A), P, True),
    (topics.rpc_request(A), P, True),
    (topics.telemetry(A), P, False),
    ("sensorseal/+/commands", P, False),
    (topics.telemetry(A), R, True),
    (topics.rpc_response(A, "01"), R, True),
    (topics.commands(A), R, False),
])
def test_service_topics(topic: str, action: TopicAction, allowed: bool) -> None:
    assert service_topic_allowed(topic, action) is allowed


def test_dynsec_roles_match_the_layout() -> None:
    acls = device_acls(A)
    sends = {a.topic for a in acls if a.acltype == "publishClientSend"}
    assert sends == {topics.telemetry(A), topics.state(A), topics.acks(A),
                     f"sensorseal/{A.hex()}/rpc/response/+"}
    subs = {a.topic for a in acls if a.acltype == "subscribeLiteral"}
    assert subs == {topics.commands(A), topics.rpc_request(A)}
    assert all(a.allow and A.hex() in a.topic for a in acls)
    ingest = {(a.acltype, a.topic) for a in ingest_acls()}
    assert ("subscribePattern", "$share/+/sensorseal/+/telemetry") in ingest
    assert ("publishClientSend", "sensorseal/+/commands") in ingest
    assert not any(t == "#" for _k, t in ingest)
    fp = password_fingerprint("pw")
    assert fp.startswith("pwfp:") and "pw" not in fp[5:] and fp != password_fingerprint("pw2")


# --------------------------------------------------------------------------- HTTP routes


class Calls:
    def __init__(self, registry: Registry) -> None:
        self.auth = registry_auth(registry)
        self.logins: list[str] = []

    def check_login(self, username: str, password: str) -> bool:
        self.logins.append(username)
        return self.auth.check_login(username, password)


@pytest.fixture
def setup(registry: Registry) -> tuple[TestClient, DeviceCredential, Calls]:
    cred = registry.add_device("dev")
    calls = Calls(registry)
    app = Starlette(routes=broker_auth_routes(calls.check_login, calls.auth.check_topic))
    return TestClient(app), cred, calls


def test_user_check_in_every_shape(setup: tuple[TestClient, DeviceCredential, Calls]) -> None:
    client, cred, _ = setup
    user, pw = cred.device_id.hex(), _pw(cred)
    ok = client.post("/mqtt/auth/user", json={"username": user, "password": pw, "clientid": "c"})
    assert ok.status_code == 200 and ok.json()["result"] == "allow" and ok.json()["ok"] is True
    form = client.post("/mqtt/auth/user", data={"username": user, "password": pw,
                                                "client_id": "c"})
    assert form.status_code == 200
    query = client.get("/mqtt/auth/user", params={"username": user, "password": pw})
    assert query.status_code == 200
    bad = client.post("/mqtt/auth/user", json={"username": user, "password": pw + "x"})
    assert bad.status_code == 403 and bad.json() == {"result": "deny", "ok": False,
                                                     "error": "denied"}
    assert pw not in bad.text
    assert client.post("/mqtt/auth/user", json={"password": pw}).status_code == 403


def test_acl_check_with_action_and_acc(setup: tuple[TestClient, DeviceCredential, Calls]) -> None:
    client, cred, _ = setup
    user, d = cred.device_id.hex(), cred.device_id
    cases = [
        ({"action": "publish", "topic": topics.telemetry(d)}, 200),
        ({"action": "subscribe", "topic": topics.commands(d)}, 200),
        ({"action": "publish", "topic": topics.commands(d)}, 403),
        ({"action": "subscribe", "topic": "sensorseal/+/commands"}, 403),
        ({"acc": 2, "topic": topics.telemetry(d)}, 200),
        ({"acc": "4", "topic": topics.rpc_request(d)}, 200),
        ({"acc": 1, "topic": topics.commands(d)}, 200),
        ({"acc": 1, "topic": topics.telemetry(B)}, 403),
        ({"acc": 3, "topic": topics.commands(d)}, 403),  # read+write: it may not write there
        ({"acc": 4, "topic": topics.commands(B)}, 403),
    ]
    for params, status in cases:
        r = client.post("/mqtt/auth/acl", json={"username": user, "clientid": "c", **params})
        assert r.status_code == status, params
        assert r.json()["result"] == ("allow" if status == 200 else "deny")
    form = client.post("/mqtt/auth/acl", data={"username": user, "topic": topics.telemetry(d),
                                               "acc": "2"})
    assert form.status_code == 200
    query = client.get("/mqtt/auth/acl", params={"username": user, "topic": topics.acks(d),
                                                 "action": "pub"})
    assert query.status_code == 200


def test_malformed_requests_are_denied(setup: tuple[TestClient, DeviceCredential, Calls]) -> None:
    client, cred, calls = setup
    user = cred.device_id.hex()
    for body in [{"username": user, "topic": "t", "acc": 9},
                 {"username": user, "topic": "t", "acc": "x"},
                 {"username": user, "topic": "t", "action": "delete"},
                 {"username": user, "topic": "t"},
                 {"username": ["x"], "topic": "t", "acc": 1}]:
        r = client.post("/mqtt/auth/acl", json=body)
        assert r.status_code == 400 and r.json()["result"] == "deny", body
    assert client.post("/mqtt/auth/user", content=b"[1]",
                       headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/mqtt/auth/user", content=b"{not json").status_code == 400
    big = json.dumps({"username": user, "password": "x" * (MAX_BODY + 1)})
    assert client.post("/mqtt/auth/user", content=big).status_code == 400
    assert client.post("/mqtt/auth/superuser", json={"username": user}).status_code == 403
    assert calls.logins == []  # none of these reached the login check


def test_a_failing_login_check_denies(registry: Registry) -> None:
    def broken(_u: str, _p: str) -> bool:
        raise RuntimeError("store down")

    auth = registry_auth(registry)
    client = TestClient(Starlette(routes=broker_auth_routes(broken, auth.check_topic,
                                                            prefix="/auth/")))
    r = client.post("/auth/user", json={"username": "u", "password": "p"})
    assert r.status_code == 503 and r.json()["result"] == "deny"


# --------------------------------------------------------------------------- mosquitto config


def test_rendered_config_never_drops_acknowledged_messages(tmp_path: Path) -> None:
    tls = TlsListener(8883, tmp_path / "ca", tmp_path / "crt", tmp_path / "key")
    text = render_config(port=None, bind="0.0.0.0", tls=tls,
                         dynsec_plugin="/x/mosquitto_dynamic_security.so",
                         dynsec_file=tmp_path / "d.json")
    lines = text.splitlines()
    for line in ["max_queued_messages 0", "per_listener_settings false", "allow_anonymous false",
                 "persistence false", "tls_version tlsv1.2", "listener 8883 0.0.0.0"]:
        assert line in lines, line
    assert not any(line.startswith("listener 1883") for line in lines)
    with pytest.raises(ConfigError):
        render_config(port=1, dynsec_plugin="x", dynsec_file=None)
    with pytest.raises(ConfigError):
        render_config(port=1, dynsec_plugin=None, dynsec_file=None, max_queued_messages=-1)


def test_dynsec_file_hashes_the_admin_password_like_mosquitto() -> None:
    content = dynsec_file_content("admin", "s3cret")
    client = content["clients"][0]
    salt = base64.b64decode(client["salt"])
    kdf = PBKDF2HMAC(algorithm=hashes.SHA512(), length=64, salt=salt,
                     iterations=client["iterations"])
    kdf.verify(b"s3cret", base64.b64decode(client["password"]))
    assert "s3cret" not in json.dumps(content)
    assert content["defaultACLAccess"]["publishClientSend"] is False
