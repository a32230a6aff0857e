"""/metrics, /openapi.json, JSON logs, and no secret in any log line of a full run."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from console_helpers import MACHINE_TOKEN, PASSWORD, Env, csrf_of, page_csrf, sealed

from sensorseal.operators import Role
from sensorseal.server.metrics import JsonLogFormatter, redact
from sensorseal.server.openapi import SPEC


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_metrics_count_accepted_rejected_and_latency(env: Env) -> None:
    cred = env.device("d")
    c = env.new_client()
    ok = c.post("/v1/messages", content=sealed(cred, 1),
                headers={"Content-Type": "application/cose"})
    assert ok.status_code == 202
    c.post("/v1/messages", content=sealed(cred, 1), headers={"Content-Type": "application/cose"})
    c.post("/v1/messages", content=b"junk", headers={"Content-Type": "text/plain"})
    text = c.get("/metrics").text
    assert "sensorseal_messages_accepted_total 1.0" in text
    assert 'sensorseal_messages_rejected_total{reason="replay"} 1.0' in text
    assert 'sensorseal_messages_rejected_total{reason="wrong_content_type"} 1.0' in text
    assert re.search(r'sensorseal_http_request_duration_seconds_count\{method="POST",'
                     r'route="/v1/messages"\} 3\.0', text)
    assert cred.device_id.hex() not in text  # aggregates only
    env.console.metrics.register_queue("outbox", lambda: 7)
    assert 'sensorseal_queue_depth{queue="outbox"} 7.0' in c.get("/metrics").text


def test_openapi_spec_is_served_and_lists_every_route(env: Env) -> None:
    c = env.new_client()
    spec = c.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and spec == json.loads(json.dumps(SPEC))
    app_paths = {getattr(r, "path", "") for r in c.app.routes}  # type: ignore[attr-defined]
    for path in ("/v1/messages", "/v1/devices", "/v1/events", "/console/api/devices"):
        assert path in spec["paths"] and path in app_paths
    assert "/console/api/events" in c.get("/docs").text


def test_json_formatter_and_redaction() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent %s", ("ss1." + "a" * 24 +
                               ".1.c2VjcmV0c2VjcmV0",), None)
    record.operator = "alice"
    line = json.loads(JsonLogFormatter().format(record))
    assert line["msg"] == "sent [redacted]" and line["operator"] == "alice"
    assert redact("Authorization: Bearer abc.def") == "Authorization: [redacted]"
    assert redact("sst_0123456789ab_" + "Z" * 43) == "[redacted]"


def test_no_secret_in_the_logs_of_a_full_run(env: Env, log_lines: io.StringIO) -> None:
    secrets: list[str] = [MACHINE_TOKEN, PASSWORD]
    env.add_operator("root", Role.ADMIN)
    c = env.new_client()
    # a failed login (the wrong password is a secret too), then a good one
    page = c.get("/console/login")
    secrets += [csrf_of(page.text), c.cookies["ss_prelogin"]]
    c.post("/console/login", data={"name": "root", "password": "wrong-but-secret-pw",
                                   "csrf": csrf_of(page.text)})
    secrets.append("wrong-but-secret-pw")
    page = c.get("/console/login")
    c.post("/console/login", data={"name": "root", "password": PASSWORD,
                                   "csrf": csrf_of(page.text)})
    secrets.append(c.cookies["ss_session"])
    csrf = page_csrf(c)
    secrets.append(csrf)
    # provision, send, operate, create and use an API token, add an operator
    r = c.post("/console/devices", data={"csrf": csrf, "name": "d", "group": "A"})
    credential = re.search(r'id="credential"[^>]*>([^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    secrets.append(credential)
    from sensorseal.core.credential import DeviceCredential

    cred = DeviceCredential.parse(credential)
    secrets.append(cred.secret.hex())
    for seq in (1, 2, 2):
        c.post("/v1/messages", content=sealed(cred, seq),
               headers={"Content-Type": "application/cose"})
    r = c.post("/console/admin/token-create", data={"csrf": csrf, "name": "ci",
                                                    "role": "viewer"})
    token = re.search(r'id="token"[^>]*>([^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    secrets.append(token)
    c.get("/console/api/devices", headers={"Authorization": f"Bearer {token}"})
    c.get("/v1/devices", headers={"Authorization": f"Bearer {MACHINE_TOKEN}"})
    c.get("/v1/devices", headers={"Authorization": "Bearer wrong-machine-token-guess"})
    c.post("/console/admin/operator-add", data={"csrf": csrf, "name": "bob",
                                                "password": "bobs-new-password",
                                                "role": "viewer", "groups": "A"})
    secrets.append("bobs-new-password")
    c.post(f"/console/devices/{cred.device_id}/revoke", data={"csrf": csrf})
    c.post("/v1/messages", content=sealed(cred, 3), headers={"Content-Type": "application/cose"})
    c.post("/console/logout", data={"csrf": csrf})

    output = log_lines.getvalue()
    assert "console login" in output and "device provisioned" in output  # the log is real
    for line in output.splitlines():
        json.loads(line)  # every line is JSON
    for secret in secrets:
        assert secret not in output, "a secret reached the log"
    # and the audit log holds none either
    details = " ".join(e.detail + e.source for e in env.store.events(limit=1000))
    for secret in secrets:
        assert secret not in details
