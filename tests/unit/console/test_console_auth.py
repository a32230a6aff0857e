"""Login, sessions, CSRF, session fixation, rate limiting and the authorization matrix."""

from __future__ import annotations

import itertools

import pytest
from console_helpers import MACHINE_TOKEN, PASSWORD, Env, csrf_of, login, page_csrf

from sensorseal.operators import Role
from sensorseal.store.base import DeviceStatus


def test_pages_need_a_session(env: Env) -> None:
    c = env.new_client()
    for path in ("/console/", "/console/events", "/console/policies", "/console/admin"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert c.get("/console/api/devices").status_code == 401


def test_session_cookie_flags_and_logout(env: Env) -> None:
    env.add_operator("alice", Role.VIEWER)
    c = env.new_client()
    page = c.get("/console/login")
    r = c.post("/console/login", data={"name": "alice", "password": PASSWORD,
                                        "csrf": csrf_of(page.text)})
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("ss_session="))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http here; https sets Secure (next test)
    assert c.get("/console/").status_code == 200
    r = c.post("/console/logout", data={"csrf": page_csrf(c)})
    assert r.status_code == 303
    assert c.get("/console/").status_code == 303


def test_secure_cookie_over_https(env: Env) -> None:
    env.add_operator("alice", Role.VIEWER)
    c = env.new_client()
    c.base_url = "https://testserver"  # type: ignore[assignment]
    page = c.get("https://testserver/console/login")
    r = c.post("https://testserver/console/login",
               data={"name": "alice", "password": PASSWORD, "csrf": csrf_of(page.text)})
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("ss_session="))
    assert "secure" in cookie.lower()


def _login_with_cookie(env: Env, name: str, planted: str) -> str:
    """Log in while the browser holds `planted` as its session id; the id set after login."""
    scout = env.new_client()
    page = scout.get("/console/login")
    pre = scout.cookies.get("ss_prelogin")
    raw = env.new_client()
    r = raw.post("/console/login", data={"name": name, "password": PASSWORD,
                                          "csrf": csrf_of(page.text)},
                 headers={"Cookie": f"ss_session={planted}; ss_prelogin={pre}"})
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("ss_session="))
    return cookie.split(";")[0].split("=", 1)[1]


def _opens(env: Env, sid: str) -> bool:
    r = env.new_client().get("/console/", headers={"Cookie": f"ss_session={sid}"})
    return r.status_code == 200


def test_session_fixation_id_is_rotated(env: Env) -> None:
    env.add_operator("alice", Role.ADMIN)
    # an attacker plants a session id before the victim logs in: it is never promoted
    planted = "attacker-chosen-session-id"
    sid = _login_with_cookie(env, "alice", planted)
    assert sid != planted and _opens(env, sid) and not _opens(env, planted)
    # logging in again while holding a valid session rotates it, and the old one dies
    sid2 = _login_with_cookie(env, "alice", sid)
    assert sid2 != sid and _opens(env, sid2) and not _opens(env, sid)


def test_csrf_required_on_every_post(env: Env) -> None:
    env.add_operator("alice", Role.ADMIN)
    c = login(env.new_client(), "alice")
    cred = env.device("d1")
    posts = [
        ("/console/devices", {"name": "x"}),
        (f"/console/devices/{cred.device_id}/rename", {"name": "y"}),
        (f"/console/devices/{cred.device_id}/revoke", {"confirm": "1"}),
        ("/console/policies/save", {"name": "p", "levels": "sealed"}),
        ("/console/policies/attach", {"kind": "network", "policy": "stringent"}),
        ("/console/admin/operator-add", {"name": "bob", "password": "x" * 12,
                                         "role": "viewer"}),
        ("/console/admin/token-create", {"name": "t", "role": "viewer"}),
    ]
    for path, data in posts:
        for csrf in (None, "wrong-token"):
            body = dict(data) if csrf is None else {**data, "csrf": csrf}
            r = c.post(path, data=body)
            assert r.status_code == 403, (path, r.status_code)
    # nothing happened
    assert env.store.get_device(cred.device_id).name == "d1"  # type: ignore[union-attr]
    assert env.store.get_device(cred.device_id).status is DeviceStatus.ACTIVE  # type: ignore[union-attr]
    assert [name for name, *_ in env.operators.accounts()] == ["alice"]
    assert env.operators.list_tokens() == []
    # a login form without its token is refused too
    fresh = env.new_client()
    fresh.get("/console/login")
    r = fresh.post("/console/login", data={"name": "alice", "password": PASSWORD})
    assert r.status_code == 400 and "ss_session" not in r.headers.get("set-cookie", "")


def test_login_rate_limit(env: Env) -> None:
    env.add_operator("alice", Role.VIEWER)
    c = env.new_client()
    for _ in range(5):
        page = c.get("/console/login")
        r = c.post("/console/login", data={"name": "alice", "password": "wrong-password!",
                                            "csrf": csrf_of(page.text)})
        assert r.status_code == 401
    page = c.get("/console/login")
    r = c.post("/console/login", data={"name": "alice", "password": PASSWORD,
                                        "csrf": csrf_of(page.text)})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    env.clock.now_ms += 301_000
    login(c, "alice")
    assert any(e.reason == "login_failed" for e in env.store.events(limit=20))


def test_disabled_operator_loses_sessions(env: Env) -> None:
    env.add_operator("admin", Role.ADMIN)
    env.add_operator("bob", Role.VIEWER)
    bob = login(env.new_client(), "bob")
    env.operators.set_disabled("bob", True, actor="test")
    assert bob.get("/console/").status_code == 303


# -- the authorization matrix ----------------------------------------------------------------

ROLES = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
SCOPES: dict[str, frozenset[str] | None] = {"A": frozenset({"A"}), "all": None}


@pytest.mark.parametrize(("role", "scope"), [
    (r, s) for r, s in itertools.product(ROLES, SCOPES) if not (r is Role.ADMIN and s == "A")])
def test_role_and_scope_matrix(env: Env, role: Role, scope: str) -> None:
    in_a, in_b, loose = env.device("in-a", "A"), env.device("in-b", "B"), env.device("none")
    env.add_operator("me", role, SCOPES[scope])
    c = login(env.new_client(), "me")
    fleet = c.get("/console/").text
    sees_all = scope == "all"
    assert ("in-a" in fleet) and (("in-b" in fleet) is sees_all) and (("none" in fleet) is sees_all)
    # reads of an out-of-scope device are 404 (existence not revealed), pages and API alike
    for cred, visible in ((in_a, True), (in_b, sees_all), (loose, sees_all)):
        did = cred.device_id
        want = 200 if visible else 404
        assert c.get(f"/console/devices/{did}").status_code == want
        assert c.get(f"/console/api/devices/{did}").status_code == want
        assert c.get(f"/console/api/devices/{did}/telemetry").status_code == want
    ids = {d["id"] for d in c.get("/console/api/devices").json()["devices"]}
    assert (in_b.device_id.hex() in ids) is sees_all
    events = c.get("/console/api/events").json()["events"]
    assert all(e["device"] == in_a.device_id.hex() for e in events) or sees_all
    assert any(e["device"] == in_a.device_id.hex() for e in events)
    # writes: operators and admins may act on what they see; viewers on nothing
    csrf = page_csrf(c)
    for cred, visible in ((in_a, True), (in_b, sees_all)):
        did = cred.device_id
        r = c.post(f"/console/devices/{did}/rename", data={"name": f"renamed-{role.label}",
                                                           "csrf": csrf})
        if role is Role.VIEWER:
            assert r.status_code == 403
        elif visible:
            assert r.status_code == 303
        else:
            assert r.status_code == 404
        renamed = env.store.get_device(did).name.startswith("renamed")  # type: ignore[union-attr]
        assert renamed is (role is not Role.VIEWER and visible)
    # a scoped operator cannot move a device into another group, nor provision outside scope
    if role is Role.OPERATOR and scope == "A":
        r = c.post(f"/console/devices/{in_a.device_id}/group", data={"group": "B", "csrf": csrf})
        assert r.status_code == 400 and env.console.policies.group_of(in_a.device_id) == "A"
        r = c.post("/console/devices", data={"name": "sneaky", "group": "B", "csrf": csrf})
        assert r.status_code == 400
        assert not any(d.name == "sneaky" for d in env.store.list_devices())
    # admin-only pages and actions
    admin_ok = role is Role.ADMIN
    assert (c.get("/console/admin").status_code == 200) is admin_ok
    r = c.post("/console/policies/attach", data={"kind": "network", "policy": "stringent",
                                                 "csrf": csrf})
    assert (r.status_code == 303) is admin_ok
    assert (("network", "") in env.console.policies.attachments()) is admin_ok


def test_api_tokens_scoped_and_revocable(env: Env) -> None:
    in_a, in_b = env.device("in-a", "A"), env.device("in-b", "B")
    token_id, token = env.operators.create_token("grafana", Role.VIEWER, frozenset({"A"}),
                                                 actor="test")
    auth = {"Authorization": f"Bearer {token}"}
    c = env.new_client()
    assert c.get(f"/console/api/devices/{in_a.device_id}", headers=auth).status_code == 200
    assert c.get(f"/console/api/devices/{in_b.device_id}", headers=auth).status_code == 404
    # a scoped token may not use the unscoped /v1 reads; a viewer token may not change state
    assert c.get("/v1/devices", headers=auth).status_code == 401
    r = c.post(f"/console/api/devices/{in_a.device_id}/status", headers=auth,
               json={"action": "suspend"})
    assert r.status_code == 403
    # an unscoped operator token may, and works on /v1 too
    _, op_token = env.operators.create_token("ops", Role.OPERATOR, None, actor="test")
    op = {"Authorization": f"Bearer {op_token}"}
    assert c.get("/v1/devices", headers=op).status_code == 200
    r = c.post(f"/console/api/devices/{in_b.device_id}/status", headers=op,
               json={"action": "suspend"})
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    # revoked: refused everywhere
    env.operators.revoke_token(token_id, actor="test")
    assert c.get(f"/console/api/devices/{in_a.device_id}", headers=auth).status_code == 401
    # tampered token: refused
    assert c.get("/console/api/devices", headers={
        "Authorization": f"Bearer {op_token[:-2]}xx"}).status_code == 401
    # the installation's operator token stays an admin machine token
    machine = {"Authorization": f"Bearer {MACHINE_TOKEN}"}
    assert c.get("/v1/devices", headers=machine).status_code == 200
    assert len(c.get("/console/api/devices", headers=machine).json()["devices"]) == 2


def test_session_post_to_api_needs_csrf_header(env: Env) -> None:
    env.add_operator("alice", Role.ADMIN)
    cred = env.device("d")
    c = login(env.new_client(), "alice")
    url = f"/console/api/devices/{cred.device_id}/status"
    assert c.post(url, json={"action": "suspend"}).status_code == 403
    r = c.post(url, json={"action": "suspend"}, headers={"X-CSRF-Token": page_csrf(c)})
    assert r.status_code == 200
