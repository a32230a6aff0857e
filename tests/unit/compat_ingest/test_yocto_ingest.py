"""Yoctopuce callbacks through the legacy ingest path: signature, readings, replay rules,
policy for password-less hubs, queued commands in the reply."""

from __future__ import annotations

import hashlib
import json

import pytest
from compat_helpers import HUB, METEO, SOURCE, UA, Env, hub_sign, yocto_body

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.server.compat_ingest import check_uptime

PASSWORD = "s3cret-hub-pass"
JSON = "application/json"


def add(env: Env, password: str | None = PASSWORD, policy: str = "legacy") -> DeviceId:
    return env.registry.add_legacy_device("hub", "yoctopuce", external_id=HUB, secret=password,
                                          policy=policy).device_id


def post(env: Env, body: bytes, ua: str | None = UA, ctype: str | None = JSON):  # type: ignore[no-untyped-def]
    return env.compat.yoctopuce(body, ua, ctype, source=SOURCE)


@pytest.mark.parametrize("registered", [PASSWORD, hashlib.md5(PASSWORD.encode()).hexdigest()])
def test_signed_callback_accepted_readings_stored(env: Env, registered: str) -> None:
    did = add(env, registered)
    out = post(env, hub_sign(yocto_body(temp="22.4"), PASSWORD))
    assert out.ok and out.weak and out.reply == b""
    [row] = env.store.telemetry(device_id=did)
    doc = json.loads(row.payload)
    assert row.level == "legacy:yoctopuce-md5" and doc["signed"] is True
    assert {"serial": METEO, "function": "temperature", "value": "22.4"} in doc["readings"]
    assert env.store.hub_uptime(did) is not None


def test_refusals_audited(env: Env) -> None:
    add(env)
    good = hub_sign(yocto_body(uptime=100_000), PASSWORD)
    assert post(env, good).ok
    env.clock.now_ms += 5_000
    later = yocto_body(uptime=105_000)
    cases = [
        (hub_sign(later, "wrong-password"), UA, JSON, "bad_mac"),
        (hub_sign(later, PASSWORD).replace(b"21.7", b"21.8"), UA, JSON, "bad_mac"),
        (good, UA, JSON, "replay"),  # the same body again
        (hub_sign(yocto_body(uptime=50_000, temp="1"), PASSWORD), UA, JSON, "replay"),  # older
        (later.replace(b'"sign":"' + b"0" * 32 + b'"', b'"x":1'), UA, JSON,
         "policy_violation"),  # signature stripped: the hub has a password
        (hub_sign(yocto_body(hub="YHUBETH1-99999"), PASSWORD), UA, JSON, "unknown_device"),
        (hub_sign(later, PASSWORD), "curl/8", JSON, "malformed"),
        (hub_sign(later, PASSWORD), UA, "text/plain", "wrong_content_type"),
        (b"not json", UA, JSON, "malformed"),
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, UA, JSON, "malformed"),  # JSON bomb
        (b" " * 300_000, UA, JSON, "oversize"),
    ]
    for body, ua, ctype, reason in cases:
        out = post(env, body, ua, ctype)
        assert out.reason == reason, (reason, out)
    assert env.reasons() == [c[3] for c in cases]
    assert all(PASSWORD not in e.detail for e in env.store.events(limit=100))
    assert post(env, hub_sign(later, PASSWORD)).ok


def test_reboot_accepted_replay_of_old_boot_refused(env: Env) -> None:
    did = add(env)
    assert post(env, hub_sign(yocto_body(uptime=900_000), PASSWORD)).ok
    env.clock.now_ms += 20_000  # the hub rebooted 15 s ago
    assert post(env, hub_sign(yocto_body(uptime=15_000), PASSWORD)).ok
    assert env.store.hub_uptime(did) == (15_000, env.clock.now_ms)
    # A body from the previous boot, captured at uptime 850 s, replayed now:
    env.clock.now_ms += 1_000
    assert post(env, hub_sign(yocto_body(uptime=850_000, temp="9"), PASSWORD)).reason \
        is RejectReason.REPLAY


def test_check_uptime_rule() -> None:
    check_uptime(None, 5, 1000)
    check_uptime((100, 1000), None, 2000)
    check_uptime((100_000, 1_000_000), 160_000, 1_060_000)  # same boot, 60 s later
    check_uptime((100_000, 1_000_000), 165_000, 1_060_000)  # within the slack
    check_uptime((100_000, 1_000_000), 500, 1_002_000)  # implied boot after the last callback
    check_uptime((100_000, 1_000_000), 400_000, 2_000_000)  # offline, rebooted, ran 400 s
    for up, now in ((100_000, 1_000_500),  # same upTime: the same moment again
                    (60_000, 1_001_000),  # older moment of the same boot
                    (900_000, 1_060_000)):  # an earlier boot's body with a larger upTime
        with pytest.raises(Rejected):
            check_uptime((100_000, 1_000_000), up, now)


def test_digest_window_expires(env: Env) -> None:
    """A body without upTime is refused as a replay only within the digest window."""
    did = add(env)
    body = hub_sign(yocto_body().replace(b',"upTime":100000', b""), PASSWORD)
    assert post(env, body).ok
    assert post(env, body).reason is RejectReason.REPLAY
    env.clock.now_ms += 24 * 3600 * 1000 + 1
    assert post(env, body).ok
    assert env.store.count_telemetry(did) == 2


def test_hub_without_password(env: Env) -> None:
    add(env, None, policy="legacy")
    unsigned = yocto_body(sign=False)
    assert post(env, unsigned).reason is RejectReason.POLICY_VIOLATION
    assert env.reasons() == ["policy_violation"]


def test_hub_without_password_allowed_by_legacy_unsigned(env: Env) -> None:
    did = add(env, None, policy="legacy-unsigned")
    assert post(env, yocto_body(sign=False)).ok
    [row] = env.store.telemetry(device_id=did)
    assert row.level == "legacy:yoctopuce-unsigned"
    # a signed body for a hub with no password cannot be checked: unknown key
    assert post(env, hub_sign(yocto_body(uptime=200_000), "x")).reason \
        is RejectReason.UNKNOWN_DEVICE


@pytest.mark.parametrize("policy", ["lax", "standard"])
def test_callbacks_need_a_legacy_policy(env: Env, policy: str) -> None:
    add(env, policy=policy)
    assert post(env, hub_sign(yocto_body(), PASSWORD)).reason is RejectReason.POLICY_VIOLATION


def test_queued_commands_delivered_once_and_audited(env: Env) -> None:
    did = add(env)
    url = "/bySerial/RELAYLO1-XXXX/api/relay1?state=1"
    env.registry.queue_legacy_command(did, url)
    env.registry.queue_legacy_command(did, "/api/module?luminosity=10")
    out = post(env, hub_sign(yocto_body(uptime=1_000), PASSWORD))
    assert out.reply == (b"\n@YoctoAPI:GET " + url.encode() + b"\n"
                         b"\n@YoctoAPI:GET /api/module?luminosity=10\n")
    delivered = env.store.events(reason="yocto_command_delivered")
    assert sorted(e.detail for e in delivered) == sorted([url, "/api/module?luminosity=10"])
    env.clock.now_ms += 5_000
    assert post(env, hub_sign(yocto_body(uptime=6_000), PASSWORD)).reply == b""
    assert env.compat.stats.commands_delivered == 2


def test_refused_callback_gets_no_commands(env: Env) -> None:
    did = add(env)
    env.registry.queue_legacy_command(did, "/api/relay1?state=1")
    assert post(env, hub_sign(yocto_body(), "wrong")).reply == b""
    assert post(env, hub_sign(yocto_body(), PASSWORD)).reply != b""


@pytest.mark.parametrize("url", ["/api/module?userPassword=abc",
                                 "/api/network?callbackCredentials=x", "relative/path",
                                 "/api/x?a=b\r\nInjected: 1", "//evil/path"])
def test_bad_commands_refused_at_queue_time(env: Env, url: str) -> None:
    did = add(env)
    with pytest.raises(ConfigError):
        env.registry.queue_legacy_command(did, url)
