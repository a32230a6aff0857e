"""YoctoHub / VirtualHub callbacks: the salted-MD5 signature both ways, readings, refusals."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorseal.compat import yoctopuce
from sensorseal.core.errors import ConfigError, Rejected, RejectReason

HUB = "YHUBETH1-12345"
METEO = "METEOMK2-1A2B3"
PASSWORD = "s3cret-hub-pass"
UA = "YoctoHub-Ethernet (v2.1)"
PLACEHOLDER = "0" * 32


def unsigned_body(*, sign: bool = True, uptime: int = 123456, extra: str = "") -> bytes:
    """A callback body as a hub writes it: compact JSON, paths as keys, sign placeholder last."""
    parts = [
        f'"serial":"{HUB}"',
        f'"/api.json":{{"module":{{"productName":"YoctoHub-Ethernet","serialNumber":"{HUB}",'
        f'"upTime":{uptime}}},"network":{{"readiness":"4","advertisedValue":"4"}}}}',
        f'"/bySerial/{METEO}/api.json":{{"module":{{"serialNumber":"{METEO}"}},'
        '"temperature":{"unit":"\'C","advertisedValue":"21.7"},'
        '"humidity":{"unit":"% RH","advertisedValue":"48"},'
        '"pressure":{"unit":"mbar","advertisedValue":1013.2}}',
        '"tRepBuf":[]',
    ]
    if extra:
        parts.append(extra)
    if sign:
        parts.append(f'"sign":"{PLACEHOLDER}"')
    return ("{" + ",".join(parts) + "}").encode()


def hub_sign(raw: bytes, password: str) -> bytes:
    """The hub's algorithm, written out independently of the module (hashlib, str.replace)."""
    salt = password if len(password) == 32 else hashlib.md5(password.encode()).hexdigest()
    marker = f'"sign":"{PLACEHOLDER}"'.encode()
    assert raw.count(marker) == 1
    digest = hashlib.md5(raw.replace(marker, f'"sign":"{salt}"'.encode())).hexdigest()
    return raw.replace(marker, f'"sign":"{digest}"'.encode())


def pw(password: str | None) -> Callable[[str], str | None]:
    return lambda serial: password if serial == HUB else None


def check(raw: bytes, password: str | None = PASSWORD, *, ua: str | None = UA,
          allow_unsigned: bool = False, **kw: object) -> yoctopuce.YoctoCallback:
    return yoctopuce.verify_callback(raw, ua, pw(password), allow_unsigned=allow_unsigned,
                                     **kw)  # type: ignore[arg-type]


def refused(raw: bytes, why: RejectReason, **kw: object) -> Rejected:
    with pytest.raises(Rejected) as exc:
        check(raw, **kw)  # type: ignore[arg-type]
    assert exc.value.reason is why, exc.value
    return exc.value


def test_signed_callback_accepted_and_readings_extracted() -> None:
    raw = hub_sign(unsigned_body(), PASSWORD)
    cb = check(raw, content_type="application/json; charset=utf-8")
    assert cb.hub_serial == HUB and cb.signed
    assert cb.uptime_ms == 123456
    assert cb.readings == (
        yoctopuce.Reading(HUB, "network", "4"),
        yoctopuce.Reading(METEO, "temperature", "21.7"),
        yoctopuce.Reading(METEO, "humidity", "48"),
        yoctopuce.Reading(METEO, "pressure", "1013.2"),
    )
    assert cb.digest == hashlib.sha256(raw).digest() == yoctopuce.body_digest(raw)


def test_module_signer_matches_independent_signer() -> None:
    raw = unsigned_body()
    assert yoctopuce.sign_body(raw, PASSWORD) == hub_sign(raw, PASSWORD)
    md5_form = hashlib.md5(PASSWORD.encode()).hexdigest()
    assert yoctopuce.sign_body(raw, md5_form) == hub_sign(raw, PASSWORD)


def test_md5_form_of_the_password_is_accepted() -> None:
    raw = hub_sign(unsigned_body(), PASSWORD)
    md5_form = hashlib.md5(PASSWORD.encode()).hexdigest()
    assert check(raw, password=md5_form).signed


def test_32_character_password_is_its_own_salt() -> None:
    thirty_two = "abcdefghijklmnopqrstuvwxyz012345"
    raw = hub_sign(unsigned_body(), thirty_two)
    assert check(raw, password=thirty_two).signed
    # ... and is not hashed first: a body salted with md5(password) must fail.
    wrong = hub_sign(unsigned_body(), hashlib.md5(thirty_two.encode()).hexdigest())
    refused(wrong, RejectReason.BAD_MAC, password=thirty_two)


def test_whitespace_around_sign_member() -> None:
    raw = unsigned_body(sign=False)[:-1] + f', "sign" : "{PLACEHOLDER}"}}'.encode()
    signed = yoctopuce.sign_body(raw, PASSWORD)
    assert check(signed).signed


def test_wrong_password() -> None:
    raw = hub_sign(unsigned_body(), PASSWORD)
    refused(raw, RejectReason.BAD_MAC, password="not-the-password")


def test_every_altered_byte_is_refused() -> None:
    raw = hub_sign(unsigned_body(), PASSWORD)
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] ^= 0x01
        with pytest.raises(Rejected) as exc:
            check(bytes(altered))
        assert exc.value.reason in {RejectReason.MALFORMED, RejectReason.BAD_MAC,
                                    RejectReason.UNKNOWN_DEVICE,
                                    RejectReason.POLICY_VIOLATION}, (i, exc.value)


def test_signature_hex_case_is_not_significant() -> None:
    raw = hub_sign(unsigned_body(), PASSWORD)
    start = raw.index(b'"sign":"') + 8
    upper = raw[:start] + raw[start:start + 32].upper() + raw[start + 32:]
    assert check(upper).signed


def test_unsigned_refused_unless_allowed() -> None:
    raw = unsigned_body(sign=False)
    refused(raw, RejectReason.POLICY_VIOLATION, password=None)
    cb = check(raw, password=None, allow_unsigned=True)
    assert not cb.signed and cb.hub_serial == HUB and len(cb.readings) == 4


def test_stripping_the_signature_is_no_downgrade() -> None:
    # The hub has a password: an unsigned copy is refused even where unsigned hubs are allowed.
    refused(unsigned_body(sign=False), RejectReason.POLICY_VIOLATION, allow_unsigned=True)


def test_signed_callback_from_unknown_hub() -> None:
    refused(hub_sign(unsigned_body(), PASSWORD), RejectReason.UNKNOWN_DEVICE, password=None)


@pytest.mark.parametrize("ua", [None, "", "curl/8.0", "Mozilla/5.0 yoctohub", "xVirtualHub"])
def test_wrong_user_agent(ua: str | None) -> None:
    refused(hub_sign(unsigned_body(), PASSWORD), RejectReason.MALFORMED, ua=ua)


@pytest.mark.parametrize("ua", ["VirtualHub/2.0", "virtualhub", "YOCTOHUB-Wireless-n"])
def test_user_agents_case_insensitive(ua: str) -> None:
    assert check(hub_sign(unsigned_body(), PASSWORD), ua=ua).signed


def test_wrong_content_type() -> None:
    refused(hub_sign(unsigned_body(), PASSWORD), RejectReason.WRONG_CONTENT_TYPE,
            content_type="text/plain")


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe{}",
    b'{"serial": "' + HUB.encode() + b'", "serial": "X"}',
    b'{"/api.json": {"module": {}}}',  # no hub serial anywhere
    b'{"serial": "bad serial!"}',
    b'{"serial": "' + HUB.encode() + b'", "/api.json": {"module": {"serialNumber": "OTHER-1"}}}',
    b'{"serial": "' + HUB.encode() + b'", "/api.json": []}',
    b'{"serial": "' + HUB.encode() + b'", "/api.json": {"t": {"advertisedValue": {"x": 1}}}}',
    b'{"serial": "' + HUB.encode() + b'", "sign": 5}',
    b'{"serial": "' + HUB.encode() + b'", "sign": "abc"}',
    # the sign value appears twice in the bytes (once hidden in a sub-tree key)
    b'{"serial": "' + HUB.encode() + b'", "/x": {"sign": "' + b"1" * 32 + b'"}, "sign": "'
    + b"1" * 32 + b'"}',
    # the top-level sign is escaped, so the only literal "sign" member is a nested one
    b'{"serial": "' + HUB.encode() + b'", "/x": {"sign": "' + b"1" * 32 + b'"}, "\\u0073ign": "'
    + b"2" * 32 + b'"}',
])
def test_malformed_bodies(raw: bytes) -> None:
    refused(raw, RejectReason.MALFORMED, allow_unsigned=True, password=None)


def test_deeply_nested_json_is_refused() -> None:
    deep = b'{"serial":"' + HUB.encode() + b'","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    refused(deep, RejectReason.MALFORMED, allow_unsigned=True, password=None)
    medium = b'{"serial":"' + HUB.encode() + b'","x":' + b"[" * 40 + b"]" * 40 + b"}"
    refused(medium, RejectReason.MALFORMED, allow_unsigned=True, password=None)


def test_json_bomb_of_many_small_members_is_bounded_by_size() -> None:
    members = ",".join(f'"k{i}":[[[[0]]]]' for i in range(40_000))
    bomb = ('{"serial":"' + HUB + '",' + members + "}").encode()
    refused(bomb, RejectReason.OVERSIZE, allow_unsigned=True, password=None)


def test_huge_number_is_refused() -> None:
    raw = b'{"serial":"' + HUB.encode() + b'","n":' + b"9" * 50_000 + b"}"
    refused(raw, RejectReason.MALFORMED, allow_unsigned=True, password=None)


def test_huge_body_bounded_by_max_size() -> None:
    raw = hub_sign(unsigned_body(extra='"pad":"' + "x" * 5000 + '"'), PASSWORD)
    assert check(raw).signed
    refused(raw, RejectReason.OVERSIZE, max_size=4096)


def test_replay_digest_differs_per_body() -> None:
    a = hub_sign(unsigned_body(uptime=1000), PASSWORD)
    b = hub_sign(unsigned_body(uptime=2000), PASSWORD)
    assert check(a).digest != check(b).digest
    assert check(a).digest == check(a).digest


def test_render_commands() -> None:
    out = yoctopuce.render_commands([
        "/bySerial/RELAYLO1-12345/api/relay1.json?state=1",
        "/api/module.json?persistentSettings=1",
    ])
    assert out == (b"\n@YoctoAPI:GET /bySerial/RELAYLO1-12345/api/relay1.json?state=1\n"
                   b"\n@YoctoAPI:GET /api/module.json?persistentSettings=1\n")
    assert yoctopuce.render_commands([]) == b""


@pytest.mark.parametrize("url", [
    "http://evil.example/x", "//evil.example/x", "relative/path", "/a\r\n@YoctoAPI:GET /b",
    "/a\nb", "/a b", "/a#frag", "/ä", "/" + "a" * 2000, "",
])
def test_render_commands_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        yoctopuce.render_commands([url])


def test_sign_body_needs_one_placeholder() -> None:
    with pytest.raises(ConfigError):
        yoctopuce.sign_body(unsigned_body(sign=False), PASSWORD)
    with pytest.raises(ConfigError):
        yoctopuce.salt_for("")


def test_password_not_in_refusal_texts() -> None:
    raw = hub_sign(unsigned_body(), PASSWORD)
    exc = refused(raw, RejectReason.BAD_MAC, password="other")
    salt = hashlib.md5(PASSWORD.encode()).hexdigest()
    assert PASSWORD not in str(exc) and salt not in str(exc)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=600), ua=st.sampled_from([UA, "curl", None]),
       allow=st.booleans())
def test_fuzz_bytes_only_return_or_reject(raw: bytes, ua: str | None, allow: bool) -> None:
    with contextlib.suppress(Rejected):
        check(raw, ua=ua, allow_unsigned=allow)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(
    st.sampled_from(["serial", "/api.json", f"/bySerial/{METEO}/api.json", "sign", "x"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=33),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.sampled_from(["module", "serialNumber", "advertisedValue",
                                                    "upTime", "t"]), inner, max_size=3),
                 max_leaves=12),
    max_size=5), allow=st.booleans())
def test_fuzz_json_shapes_only_return_or_reject(doc: dict[str, object], allow: bool) -> None:
    raw = json.dumps(doc).encode()
    try:
        cb = check(raw, allow_unsigned=allow)
    except Rejected:
        return
    assert cb.hub_serial == HUB
