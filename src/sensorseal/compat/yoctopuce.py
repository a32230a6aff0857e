"""YoctoHub / VirtualHub "Yocto-API" HTTP callbacks: MD5 signature check and reading extraction.

What a hub sends (as Yoctopuce's own callback verifiers read it)::

    POST <callback URL>                      here: POST /v1/compat/yoctopuce
    Content-Type: application/json
    User-Agent: YoctoHub-... | VirtualHub-...  (checked case-insensitively)

    {"serial": "<hub serial>",                                  (optional)
     "/api.json": {"module": {"serialNumber": ..., ...}, "<function>": {"advertisedValue": ...}},
     "/bySerial/<SERIAL>/api.json": {...},                      one per sub-device
     "tRepBuf": ...,                                            (optional, not interpreted)
     "sign": "<32 hex>"}                                        (only when a password is set)

Signature, as the hub computes it: it writes the body with a *salt* where the signature goes,
hashes those bytes with MD5, and puts the hex digest in place of the salt::

    salt  = password if len(password) == 32 else md5_hex(password)
    valid = md5_hex(raw body with the sign value replaced by salt) == sign

So the check runs on the RAW body bytes; re-serializing the JSON would change them. The hub's
password is therefore a shared secret stored (or its MD5 stored) on our side too, and the
"MAC" is a salted MD5 hash, not an HMAC: legacy strength (docs/compat.md, "Weaknesses").

Replay: a callback carries no counter. The pure part here is `body_digest` (SHA-256 of the raw
body): the pipeline stores it under a unique key for a window (24 h by default) and refuses a
second copy, and `YoctoCallback.uptime_ms` (the hub's `module.upTime`, when sent) lets it refuse
a callback older than the newest one seen from the same hub boot. See docs/compat.md.

Commands go back in the response body: `render_commands` writes `@YoctoAPI:GET <url>` lines.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from cryptography.hazmat.primitives import hashes

from sensorseal.compat._json import loads_bounded
from sensorseal.core.errors import ConfigError, Rejected, RejectReason

__all__ = [
    "DEFAULT_MAX_SIZE",
    "Reading",
    "YoctoCallback",
    "body_digest",
    "md5_hex",
    "render_commands",
    "salt_for",
    "sign_body",
    "verify_callback",
]

DEFAULT_MAX_SIZE: Final = 256 * 1024
MAX_DEPTH: Final = 12  # body -> path -> function -> attribute (+ room for nested attributes)
MAX_COMMANDS: Final = 64
MAX_URL_LEN: Final = 1024
_USER_AGENTS = ("virtualhub", "yoctohub")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")
_BY_SERIAL = re.compile(r"/bySerial/([A-Za-z0-9][A-Za-z0-9-]{0,31})/api\.json")
_HEX32 = re.compile(r"[0-9A-Fa-f]{32}")
# The sign member in the raw bytes; JSON whitespace only. Group 1 is the value to replace.
_SIGN_MEMBER = re.compile(rb'"sign"[ \t\r\n]*:[ \t\r\n]*"([0-9A-Fa-f]{32})"')
# A command URL: a path on the hub (leading "/", not "//"), RFC 3986 characters, no fragment.
_URL = re.compile(r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")


class Reading(NamedTuple):
    """One function's advertised value, as the hub reported it (a string, e.g. "21.5")."""

    serial: str
    function: str
    value: str


@dataclass(frozen=True, slots=True)
class YoctoCallback:
    """A checked callback. `signed` is False only when unsigned callbacks were allowed."""

    hub_serial: str
    readings: tuple[Reading, ...]
    signed: bool
    digest: bytes  # SHA-256 of the raw body: the replay key for the store
    uptime_ms: int | None  # the hub's module.upTime, if sent


def md5_hex(data: bytes) -> str:
    """Lowercase hex MD5, via `cryptography` (the hub's primitive; not for anything new)."""
    h = hashes.Hash(hashes.MD5())  # noqa: S303 -- the deployed hubs fix this hash
    h.update(data)
    return h.finalize().hex()


def body_digest(raw_body: bytes) -> bytes:
    """SHA-256 of the raw body: what the store keeps unique to refuse a replayed callback."""
    h = hashes.Hash(hashes.SHA256())
    h.update(bytes(raw_body))
    return h.finalize()


def salt_for(password: str) -> str:
    """The hub's salt: a 32-character password is used as is (an MD5 form), else its MD5 hex."""
    if not isinstance(password, str) or not password:
        raise ConfigError("a hub password is a non-empty string")
    return password if len(password) == 32 else md5_hex(password.encode("utf-8"))


def _splice(raw: bytes, start: int, end: int, value: str) -> bytes:
    return raw[:start] + value.encode("ascii") + raw[end:]


def sign_body(unsigned_body: bytes, password: str) -> bytes:
    """What a hub does (for tests and simulators): the body must hold `"sign":"<32 hex>"` once
    as a placeholder; it is replaced by the salt, hashed, and the hash put in its place."""
    matches = list(_SIGN_MEMBER.finditer(unsigned_body))
    if len(matches) != 1:
        raise ConfigError('body needs exactly one "sign":"<32 hex>" placeholder')
    start, end = matches[0].span(1)
    digest = md5_hex(_splice(unsigned_body, start, end, salt_for(password)))
    return _splice(unsigned_body, start, end, digest)


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, detail)


def _check_headers(user_agent: str | None, content_type: str | None) -> None:
    if not isinstance(user_agent, str) or not user_agent.strip().lower().startswith(_USER_AGENTS):
        raise _malformed("user agent is not a YoctoHub or VirtualHub")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise Rejected(RejectReason.WRONG_CONTENT_TYPE, "expected application/json")


def _hub_serial(body: Mapping[str, Any]) -> str:
    declared = body.get("serial")
    tree = body.get("/api.json")
    from_tree = None
    if isinstance(tree, dict) and isinstance(tree.get("module"), dict):
        from_tree = tree["module"].get("serialNumber")
    serial = declared if declared is not None else from_tree
    if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
        raise _malformed("hub serial missing or invalid")
    if from_tree is not None and from_tree != serial:
        raise _malformed("serial and /api.json module serialNumber differ")
    return serial


def _uptime(body: Mapping[str, Any]) -> int | None:
    tree = body.get("/api.json")
    if not isinstance(tree, dict) or not isinstance(tree.get("module"), dict):
        return None
    up = tree["module"].get("upTime")
    return up if type(up) is int and 0 <= up < 2**63 else None


def _trees(body: Mapping[str, Any], hub_serial: str) -> Iterable[tuple[str, Any]]:
    for path, tree in body.items():
        if path == "/api.json":
            yield hub_serial, tree
        elif (m := _BY_SERIAL.fullmatch(path)) is not None:
            yield m.group(1), tree


def _readings(body: Mapping[str, Any], hub_serial: str) -> tuple[Reading, ...]:
    out: list[Reading] = []
    for serial, tree in _trees(body, hub_serial):
        if not isinstance(tree, dict):
            raise _malformed(f"API tree of {serial} is not an object")
        module = tree.get("module")
        if isinstance(module, dict) and module.get("serialNumber", serial) != serial:
            raise _malformed(f"API tree of {serial} names another serialNumber")
        for function, attrs in tree.items():
            if not isinstance(attrs, dict) or "advertisedValue" not in attrs:
                continue
            value = attrs["advertisedValue"]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise _malformed(f"advertisedValue of {serial}.{function:.40} is not a scalar")
            out.append(Reading(serial, function, str(value)))
    return tuple(out)


def _locate_sign(raw: bytes, body: Mapping[str, Any]) -> tuple[int, int, str] | None:
    """Where the top-level sign value sits in the raw bytes, or None for an unsigned body."""
    if "sign" not in body:
        return None
    sign = body["sign"]
    if not isinstance(sign, str) or not _HEX32.fullmatch(sign):
        raise _malformed("sign is not 32 hex digits")
    matches = list(_SIGN_MEMBER.finditer(raw))
    if len(matches) != 1:
        raise _malformed('the body must hold exactly one "sign" member')
    start, end = matches[0].span(1)
    if raw[start:end].decode("ascii") != sign:
        raise _malformed("sign member in the bytes is not the top-level one")
    return start, end, sign


def _check_signature(raw: bytes, where: tuple[int, int, str], password: str) -> None:
    start, end, sign = where
    check = md5_hex(_splice(raw, start, end, salt_for(password)))
    if not _stdlib_hmac.compare_digest(check.encode(), sign.lower().encode()):
        raise Rejected(RejectReason.BAD_MAC, "callback signature")


def verify_callback(raw_body: bytes, user_agent: str | None,
                    password_for: Callable[[str], str | None], *, allow_unsigned: bool,
                    max_size: int = DEFAULT_MAX_SIZE,
                    content_type: str | None = None) -> YoctoCallback:
    """Check a hub callback and extract its readings, or raise Rejected with the reason.

    `password_for(hub_serial)` returns the hub's callback password (plain, or its 32-hex MD5)
    or None when none is registered; it may raise Rejected (UNKNOWN_DEVICE, REVOKED...). A signed
    callback needs a password (else UNKNOWN_DEVICE). An unsigned one is POLICY_VIOLATION unless
    `allow_unsigned` *and* no password is registered: a hub that has a password must sign, so
    stripping the signature is no downgrade. `content_type` is checked only when given.
    """
    if isinstance(raw_body, bytes | bytearray | memoryview) and len(raw_body) > max_size:
        raise Rejected(RejectReason.OVERSIZE, f"{len(raw_body)} bytes > limit {max_size}")
    _check_headers(user_agent, content_type)
    body = loads_bounded(raw_body, max_size=max_size, max_depth=MAX_DEPTH)
    if not isinstance(body, dict):
        raise _malformed("body is not a JSON object")
    raw = bytes(raw_body)
    hub_serial = _hub_serial(body)
    readings = _readings(body, hub_serial)
    where = _locate_sign(raw, body)
    password = password_for(hub_serial)
    if where is not None:
        if password is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, f"no password for hub {hub_serial}")
        _check_signature(raw, where, password)
        signed = True
    elif password is not None:
        raise Rejected(RejectReason.POLICY_VIOLATION,
                       f"hub {hub_serial} has a password but sent an unsigned callback")
    elif not allow_unsigned:
        raise Rejected(RejectReason.POLICY_VIOLATION, "unsigned callbacks are not allowed")
    else:
        signed = False
    return YoctoCallback(hub_serial, readings, signed, body_digest(raw), _uptime(body))


def render_commands(cmds: list[str]) -> bytes:
    """The response body that makes the hub run `cmds`: one `@YoctoAPI:GET <url>` line each.

    Each URL is a path on the hub ("/bySerial/RELAYLO1-12345/api/relay1.json?state=1"): it must
    start with one "/", use only RFC 3986 characters (so no space, CR, LF or fragment) and stay
    short. Anything else is local misuse (ConfigError): commands come from our operators.
    """
    if len(cmds) > MAX_COMMANDS:
        raise ConfigError(f"at most {MAX_COMMANDS} commands per callback")
    out: list[bytes] = []
    for url in cmds:
        if not isinstance(url, str) or len(url) > MAX_URL_LEN or not _URL.fullmatch(url):
            raise ConfigError(f"not a hub-relative command URL: {url!r:.60}")
        out.append(b"\n@YoctoAPI:GET " + url.encode("ascii") + b"\n")
    return b"".join(out)
