"""Valarm-style signed HTTP messages: HMAC over the raw JSON body, key never sent.

Valarm's public documentation describes devices keyed by a 24-hex ObjectId and a per-device API
key, with messages signed by HMAC-MD5, but it does not publish an exact wire format. This module
therefore *defines* one (docs/compat.md, "Valarm"), chosen so that an old hub only needs an HMAC
routine and a JSON writer::

    POST /v1/compat/valarm
    Content-Type: application/json
    X-Valarm-Signature: <alg>=<hex MAC>         alg: "md5" (old hubs) or "sha256" (new devices)

    {"device_id": "<24 hex>", "seq": <uint>, "ts": <ms since epoch>, "readings": {...}}

* The MAC is HMAC-<alg>(api_key, raw body bytes), over the bytes exactly as received: the server
  never re-serializes before checking, so whitespace and key order are the device's business.
* At least one of `seq` (a counter that never repeats for this device) and `ts` (Unix time in
  milliseconds) is required; without either a message could be replayed forever.
* `readings` maps names to scalars (number, string, boolean or null).
* No other top-level key is accepted.

HMAC-MD5 stays allowed for hubs that cannot be re-flashed: RFC 6151 section 2.3 finds the known
MD5 collision attacks do not carry over to HMAC-MD5 as a MAC. It is still legacy; new devices use
HMAC-SHA256, and `ValarmMessage.legacy` lets the pipeline count and restrict MD5 senders.

Order in `verify`, as in the native envelope: size -> signature header -> body shape -> key lookup
-> MAC (constant time) -> timestamp skew. Replay of `seq` is the pipeline's job (window + the
store's unique key), like for native messages; for devices that only send `ts`, `replay_seq`
is the timestamp, which must then strictly increase.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from sensorseal.compat._json import loads_bounded
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId

__all__ = [
    "ALGS",
    "API_KEY_LEN",
    "DEFAULT_MAX_SIZE",
    "SIGNATURE_HEADER",
    "ValarmMessage",
    "check_mac",
    "compute_mac",
    "generate_api_key",
    "sign",
    "verify",
]

SIGNATURE_HEADER: Final = "X-Valarm-Signature"
API_KEY_LEN: Final = 20
API_KEY_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_MAX_SIZE: Final = 16 * 1024
MAX_READINGS: Final = 256
MAX_SEQ: Final = 2**63 - 1  # fits the store's signed 64-bit column
MAX_TS: Final = 2**53  # exact in every JSON implementation
_MAX_DEPTH = 3  # body -> readings -> scalar

# alg name -> (hash factory, MAC length in bytes)
ALGS: Final[Mapping[str, tuple[Callable[[], hashes.HashAlgorithm], int]]] = MappingProxyType({
    "md5": (hashes.MD5, 16),
    "sha256": (hashes.SHA256, 32),
})

_FIELDS = frozenset({"device_id", "seq", "ts", "readings"})
# Largest multiple of the alphabet size below 256: bytes at or above it are drawn again, so
# every character is equally likely (no modulo bias).
_ACCEPT_BELOW = 256 - 256 % len(API_KEY_ALPHABET)
_MAX_DRAWS = 64


def generate_api_key(random: Callable[[int], bytes]) -> str:
    """A 20-character alphanumeric API key from a CSPRNG (e.g. `os.urandom`).

    Rejection sampling keeps the 62 characters uniform: ~119 bits of entropy per key.
    """
    out: list[str] = []
    for _ in range(_MAX_DRAWS):
        chunk = random(2 * API_KEY_LEN)
        if not isinstance(chunk, bytes) or len(chunk) != 2 * API_KEY_LEN:
            raise ConfigError("random source returned the wrong number of bytes")
        for b in chunk:
            if b < _ACCEPT_BELOW:
                out.append(API_KEY_ALPHABET[b % len(API_KEY_ALPHABET)])
                if len(out) == API_KEY_LEN:
                    return "".join(out)
    raise ConfigError("random source looks broken (too many rejected bytes)")


def compute_mac(alg: str, key: bytes, data: bytes) -> bytes:
    """HMAC-<alg>(key, data) via `cryptography`. The one MAC routine `sign` and `verify` share."""
    try:
        factory, _ = ALGS[alg]
    except KeyError:
        raise ConfigError(f"unknown Valarm MAC algorithm {alg!r:.20}") from None
    h = crypto_hmac.HMAC(key, factory())
    h.update(data)
    return h.finalize()


def check_mac(alg: str, key: bytes, data: bytes, tag: bytes) -> bool:
    """Constant-time comparison of `tag` with HMAC-<alg>(key, data)."""
    return _stdlib_hmac.compare_digest(compute_mac(alg, key, data), tag)


def sign(body: bytes, key: bytes, alg: str = "sha256") -> str:
    """The `X-Valarm-Signature` header value for `body` (for devices, gateways and tests)."""
    if not key:
        raise ConfigError("empty API key")
    return f"{alg}={compute_mac(alg, bytes(key), bytes(body)).hex()}"


@dataclass(frozen=True, slots=True)
class ValarmMessage:
    """A verified Valarm message. At least one of `seq` and `ts_ms` is set."""

    device_id: DeviceId
    seq: int | None
    ts_ms: int | None
    readings: Mapping[str, Any]
    alg: str

    @property
    def legacy(self) -> bool:
        """True for HMAC-MD5: authentic, but only acceptable under a legacy policy."""
        return self.alg == "md5"

    @property
    def replay_seq(self) -> int:
        """The number the replay window and the store's unique key use: seq, else ts."""
        return self.seq if self.seq is not None else (self.ts_ms or 0)


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, detail)


def parse_signature_header(value: str) -> tuple[str, bytes]:
    """`<alg>=<hex>` -> (alg, tag). Rejected(MALFORMED | UNSUPPORTED) when it is not that."""
    if not isinstance(value, str) or len(value) > 200:
        raise _malformed("signature header missing or too long")
    alg, sep, hexmac = value.strip().partition("=")
    alg = alg.strip().lower()
    if not sep:
        raise _malformed("signature header is not <alg>=<hex>")
    if alg not in ALGS:
        raise Rejected(RejectReason.UNSUPPORTED, f"signature algorithm {alg!r:.20}")
    hexmac = hexmac.strip()
    if len(hexmac) != 2 * ALGS[alg][1] or not all(c in "0123456789abcdefABCDEF" for c in hexmac):
        raise _malformed(f"{alg} signature must be {2 * ALGS[alg][1]} hex digits")
    return alg, bytes.fromhex(hexmac)


def _uint(body: Mapping[str, Any], name: str, limit: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= limit:  # bool is not a counter
        raise _malformed(f"{name} must be an integer between 0 and {limit}")
    return value


def _readings(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _malformed("readings must be a JSON object")
    if len(value) > MAX_READINGS:
        raise _malformed(f"more than {MAX_READINGS} readings")
    for name, reading in value.items():
        if not name or len(name) > 64:
            raise _malformed("reading names are 1-64 characters")
        if reading is not None and not isinstance(reading, bool | int | float | str):
            raise _malformed(f"reading {name!r:.40} is not a scalar")
    return MappingProxyType(value)


def _parse_body(raw_body: bytes, max_size: int) -> tuple[DeviceId, int | None, int | None,
                                                          Mapping[str, Any]]:
    body = loads_bounded(raw_body, max_size=max_size, max_depth=_MAX_DEPTH)
    if not isinstance(body, dict):
        raise _malformed("body is not a JSON object")
    if not _FIELDS.issuperset(body):
        raise _malformed("unknown top-level key")
    raw_id = body.get("device_id")
    if not isinstance(raw_id, str):
        raise _malformed("device_id must be 24 hex characters")
    try:
        device_id = DeviceId.parse(raw_id)
    except ConfigError:
        raise _malformed("device_id must be 24 hex characters") from None
    seq = _uint(body, "seq", MAX_SEQ)
    ts = _uint(body, "ts", MAX_TS)
    if seq is None and ts is None:
        raise _malformed("a counter (seq) or a timestamp (ts) is required")
    if "readings" not in body:
        raise _malformed("readings missing")
    return device_id, seq, ts, _readings(body["readings"])


def verify(raw_body: bytes, signature_header: str,
           key_for: Callable[[DeviceId], bytes | None], *, now_ms: int,
           max_skew_s: int | None = None, max_size: int = DEFAULT_MAX_SIZE) -> ValarmMessage:
    """Check a Valarm message and return it, or raise Rejected with the reason.

    `key_for(device_id)` returns the device's API key (its ASCII bytes) or None if the device is
    unknown; it may itself raise Rejected (SUSPENDED, REVOKED). With `max_skew_s`, a message whose
    `ts` is further than that from `now_ms` is STALE (checked after the MAC, so an unauthenticated
    timestamp never decides anything).
    """
    if max_skew_s is not None and max_skew_s <= 0:
        raise ConfigError("max_skew_s must be positive")
    if isinstance(raw_body, bytes | bytearray | memoryview) and len(raw_body) > max_size:
        raise Rejected(RejectReason.OVERSIZE, f"{len(raw_body)} bytes > limit {max_size}")
    alg, tag = parse_signature_header(signature_header)
    device_id, seq, ts, readings = _parse_body(raw_body, max_size)
    key = key_for(device_id)
    if key is None:
        raise Rejected(RejectReason.UNKNOWN_DEVICE, f"device {device_id}")
    if not check_mac(alg, bytes(key), bytes(raw_body), tag):
        raise Rejected(RejectReason.BAD_MAC, f"device {device_id} ({alg})")
    if max_skew_s is not None and ts is not None and abs(now_ms - ts) > max_skew_s * 1000:
        raise Rejected(RejectReason.STALE,
                       f"timestamp off by {(now_ms - ts) // 1000}s (allowed {max_skew_s}s)")
    return ValarmMessage(device_id, seq, ts, readings, alg)
