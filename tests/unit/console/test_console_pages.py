"""Console pages: provisioning reveals the secret once, escaping, validation, live data."""

from __future__ import annotations

import re

from console_helpers import Env, login, page_csrf, sealed

from sensorseal.core.credential import DeviceCredential
from sensorseal.operators import Role

EVIL = '<script>alert(1)</script>'


def test_provision_reveals_credential_once_with_qr(env: Env) -> None:
    env.add_operator("op", Role.OPERATOR)
    c = login(env.new_client(), "op")
    r = c.post("/console/devices", data={"csrf": page_csrf(c), "name": "pump-1",
                                         "group": "plant", "policy": "industrial-controller"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    secret = re.search(r'id="credential"[^>]*>([^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    cred = DeviceCredential.parse(secret)
    assert 'src="data:image/svg+xml' in r.text
    record = env.store.get_device(cred.device_id)
    assert record is not None and record.policy == "industrial-controller"
    assert env.console.policies.group_of(cred.device_id) == "plant"
    # never again: not on the device page, not in the API, not in the audit log
    for path in (f"/console/devices/{cred.device_id}", "/console/",
                 f"/console/api/devices/{cred.device_id}", "/console/events"):
        assert secret not in c.get(path).text
    assert not any(secret in e.detail for e in env.store.events(limit=100))


def test_hostile_names_and_payloads_are_escaped(env: Env) -> None:
    env.add_operator("root", Role.ADMIN)
    cred = env.registry.add_device(EVIL, actor="t")
    env.pipeline.ingest([(sealed(cred, 1, payload=b'{"note": "' + EVIL.encode() + b'"}'),
                          "/v1/messages")], transport="t", source="t")
    c = login(env.new_client(), "root")
    for path in ("/console/", f"/console/devices/{cred.device_id}", "/console/events"):
        r = c.get(path)
        assert EVIL not in r.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
    # JSON carries it as data (the page inserts it with textContent)
    rows = c.get(f"/console/api/devices/{cred.device_id}/telemetry").json()["telemetry"]
    assert EVIL in rows[0]["payload"]


def test_form_validation_messages(env: Env) -> None:
    env.add_operator("root", Role.ADMIN)
    c = login(env.new_client(), "root")
    csrf = page_csrf(c)
    cases = [
        ({"name": ""}, "1 to 64 characters"),
        ({"name": "x" * 65}, "1 to 64 characters"),
        ({"name": "ok", "group": "bad group!"}, "a group name is"),
        ({"name": "ok", "policy": "nope"}, "choose a policy"),
    ]
    for data, message in cases:
        r = c.post("/console/devices", data={"csrf": csrf, **data})
        assert r.status_code == 400 and message in r.text, (data, r.text[-500:])
    r = c.post("/console/admin/operator-add", data={"csrf": csrf, "name": "bob",
                                                   "password": "short", "role": "viewer"})
    assert r.status_code == 400 and "a password is 10 to 256 characters" in r.text
    r = c.post("/console/admin/operator-add", data={"csrf": csrf, "name": "bob",
                                                   "password": "long enough pw",
                                                   "role": "king"})
    assert r.status_code == 400 and "a role is viewer, operator or admin" in r.text
    r = c.get("/console/events?device=zz")
    assert r.status_code == 400 and "24 hexadecimal" in r.text
    assert c.get("/console/api/events?limit=0").status_code == 400
    assert c.get("/console/devices/not-an-id").status_code == 404


def test_device_actions_and_live_feed(env: Env) -> None:
    env.add_operator("root", Role.ADMIN)
    cred = env.device("d1", "A")
    c = login(env.new_client(), "root")
    csrf = page_csrf(c)
    assert env.pipeline.ingest([(sealed(cred, 1), "/v1/messages")], transport="t",
                               source="t")[0].ok
    rows = c.get(f"/console/api/devices/{cred.device_id}/telemetry").json()["telemetry"]
    assert rows[0]["values"] == {"temp_c": 21.5}
    base = f"/console/devices/{cred.device_id}"
    assert c.post(base + "/suspend", data={"csrf": csrf}).headers["location"].endswith(
        "ok=suspended")
    assert c.post(base + "/resume", data={"csrf": csrf}).status_code == 303
    assert c.post(base + "/revoke", data={"csrf": csrf}).status_code == 303
    r = c.post(base + "/resume", data={"csrf": csrf})
    assert r.status_code == 400 and "revocation is final" in r.text
    [res] = env.pipeline.ingest([(sealed(cred, 2), "/v1/messages")], transport="t", source="t")
    assert res.reason is not None and res.reason.value == "revoked"
    events = c.get(f"/console/api/events?reason=revoked&device={cred.device_id}").json()
    assert len(events["events"]) == 1
    assert "Device revoked" in c.get(base + "?ok=revoked").text


def test_api_token_shown_once(env: Env) -> None:
    env.add_operator("root", Role.ADMIN)
    c = login(env.new_client(), "root")
    r = c.post("/console/admin/token-create", data={"csrf": page_csrf(c), "name": "ci",
                                                    "role": "viewer", "groups": "A, B"})
    token = re.search(r'id="token"[^>]*>([^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    assert token.startswith("sst_")
    assert token not in c.get("/console/admin").text
    who = c.get("/console/api/whoami", headers={"Authorization": f"Bearer {token}"}).json()
    assert who == {"name": "token:ci", "role": "viewer", "kind": "token", "groups": ["A", "B"]}
