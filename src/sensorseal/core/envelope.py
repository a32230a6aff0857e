"""The sensorseal envelope: COSE_Encrypt0 (level `sealed`) or COSE_Mac0 (level `signed`).

Bytes in, bytes out: nothing here reads a clock, a socket, a file or the RNG. The wire format is
specified in docs/protocol.md; in short::

    sealed = #6.16([ protected: bstr .cbor H, unprotected: {}, ciphertext: bstr ])
    signed = #6.17([ protected: bstr .cbor H, unprotected: {}, payload: bstr, tag: bstr ])
    H      = { 1: alg, 4: kid (device id, 12 bytes), 6: Partial IV (seq),
               -65537: key epoch, ? -65538: device timestamp (ms) }
    external_aad = CBOR ["sensorseal/1", direction, route]

`unseal()` works in the order parse -> look up context -> replay check -> verify/decrypt ->
policy -> strike the sequence number, so nothing is recorded for a message that failed. It
returns an `Opened` or raises `Rejected` with a reason: never anything else.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from sensorseal.core.context import SecurityContext
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DEVICE_ID_LEN, DeviceId, Direction, Level
from sensorseal.core.keys import AEAD_ALGS, PROTOCOL_LABEL, Alg, KeyContext
from sensorseal.core.replay import MAX_SEQ

__all__ = [
    "DEFAULT_MAX_SIZE",
    "HDR_EPOCH",
    "HDR_TIMESTAMP",
    "Envelope",
    "Opened",
    "external_aad",
    "parse",
    "seal",
    "unseal",
]

# COSE header labels (RFC 9052 section 3.1) and our two private-use labels (< -65536).
HDR_ALG, HDR_KID, HDR_PIV = 1, 4, 6
HDR_EPOCH = -65537
HDR_TIMESTAMP = -65538
_KNOWN_LABELS = frozenset({HDR_ALG, HDR_KID, HDR_PIV, HDR_EPOCH, HDR_TIMESTAMP})

TAG_ENCRYPT0, TAG_MAC0 = 16, 17
DEFAULT_MAX_SIZE = 64 * 1024
_MAX_TS = 2**53
_TAG_LEN = 16  # AES-GCM and ChaCha20-Poly1305 tag
_MAC_LEN = 32  # HMAC 256/256


def _bstr_head(n: int) -> bytes:
    """The shortest CBOR head of a byte string of length n (RFC 8949 section 3)."""
    if n < 24:
        return bytes((0x40 | n,))
    if n < 0x100:
        return bytes((0x58, n))
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    return b"\x5a" + n.to_bytes(4, "big")


def _bstr(b: bytes) -> bytes:
    return _bstr_head(len(b)) + b


_ENC0_CONTEXT = cbor2.dumps("Encrypt0")
_MAC0_CONTEXT = cbor2.dumps("MAC0")
_aad_cache: dict[tuple[Direction, str], bytes] = {}


def external_aad(direction: Direction, route: str) -> bytes:
    """CBOR ["sensorseal/1", direction, route]: binds a message to its direction and route."""
    key = (direction, route)
    aad = _aad_cache.get(key)
    if aad is None:
        aad = cbor2.dumps([PROTOCOL_LABEL, direction.value, route])
        if len(_aad_cache) < 4096:  # routes are few; never let this grow without bound
            _aad_cache[key] = aad
    return aad


def partial_iv(seq: int) -> bytes:
    """Sequence number -> Partial IV: big-endian, fewest bytes, 0 as one zero byte (RFC 8613)."""
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed but not yet verified envelope. Nothing in it is trustworthy yet."""

    level: Level
    alg: int
    device_id: DeviceId
    epoch: int
    seq: int
    timestamp_ms: int | None
    protected: bytes  # the serialized protected header, as received
    partial_iv: bytes
    body: bytes  # ciphertext+tag (sealed) or payload (signed)
    tag: bytes  # MAC tag (signed); empty for sealed


@dataclass(frozen=True, slots=True)
class Opened:
    """An accepted message: authentic, fresh and within policy."""

    device_id: DeviceId
    epoch: int
    seq: int
    timestamp_ms: int | None
    level: Level
    alg: int
    direction: Direction
    route: str
    payload: bytes


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, detail)


def _header(protected: bytes, level: Level) -> tuple[int, DeviceId, int, bytes, int | None]:
    try:
        hdr = cbor2.loads(protected, max_depth=2, allow_indefinite=False,
                          allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types; all mean the same here
        raise _malformed("protected header is not CBOR") from exc
    if not isinstance(hdr, dict):
        raise _malformed("protected header is not a map")
    if not _KNOWN_LABELS.issuperset(hdr):
        raise _malformed("unknown label in protected header")
    alg = hdr.get(HDR_ALG)
    kid = hdr.get(HDR_KID)
    piv = hdr.get(HDR_PIV)
    epoch = hdr.get(HDR_EPOCH)
    ts = hdr.get(HDR_TIMESTAMP)
    if type(alg) is not int:
        raise _malformed("alg missing or not an integer")
    if level is Level.SEALED and alg not in AEAD_ALGS:
        raise Rejected(RejectReason.UNSUPPORTED, f"alg {alg} not accepted for Encrypt0")
    if level is Level.SIGNED and alg != Alg.HMAC_256_256:
        raise Rejected(RejectReason.UNSUPPORTED, f"alg {alg} not accepted for Mac0")
    if type(kid) is not bytes or len(kid) != DEVICE_ID_LEN:
        raise _malformed("kid must be a 12-byte device id")
    if type(piv) is not bytes or not 1 <= len(piv) <= 5 or (len(piv) > 1 and piv[0] == 0):
        raise _malformed("Partial IV must be 1-5 bytes, shortest form")
    if type(epoch) is not int or not 0 <= epoch < 2**32:
        raise _malformed("epoch missing or out of range")
    if ts is not None and (type(ts) is not int or not 0 <= ts < _MAX_TS):
        raise _malformed("timestamp out of range")
    return alg, DeviceId(kid), epoch, piv, ts


def parse(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Parse the outer structure and header. Raises Rejected(MALFORMED|OVERSIZE|UNSUPPORTED)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed("not bytes")
    if len(data) > max_size:
        raise Rejected(RejectReason.OVERSIZE, f"{len(data)} bytes > limit {max_size}")
    data = bytes(data)
    try:
        item = cbor2.loads(data, max_depth=3, allow_indefinite=False)
    except Exception as exc:
        raise _malformed("not CBOR") from exc
    # cbor2 6 decodes the contents of a tag as immutable values (tuple, frozendict).
    if not isinstance(item, cbor2.CBORTag) or type(item.value) not in (list, tuple):
        raise _malformed("not a tagged COSE array")
    parts: Sequence[Any] = item.value
    if item.tag == TAG_ENCRYPT0 and len(parts) == 3:
        level, expected = Level.SEALED, 3
    elif item.tag == TAG_MAC0 and len(parts) == 4:
        level, expected = Level.SIGNED, 4
    else:
        raise _malformed("not COSE_Encrypt0 or COSE_Mac0")
    protected, unprotected, body = parts[0], parts[1], parts[2]
    tag = parts[3] if expected == 4 else b""
    if type(protected) is not bytes or type(body) is not bytes or type(tag) is not bytes:
        raise _malformed("protected, body and tag must be byte strings")
    if not isinstance(unprotected, Mapping) or len(unprotected) != 0:
        raise _malformed("unprotected header must be empty")
    # Exactly one encoding is accepted: shortest heads, nothing after the item. With the
    # authenticated fields fixed this leaves no unauthenticated byte to flip.
    size = (3 + len(_bstr_head(len(protected))) + len(protected)
            + len(_bstr_head(len(body))) + len(body))
    if expected == 4:
        size += len(_bstr_head(len(tag))) + len(tag)
    if size != len(data):
        raise _malformed("non-canonical framing or trailing bytes")
    alg, device_id, epoch, piv, ts = _header(protected, level)
    if level is Level.SEALED and len(body) < _TAG_LEN:
        raise _malformed("ciphertext shorter than its tag")
    if level is Level.SIGNED and len(tag) != _MAC_LEN:
        raise _malformed("MAC tag must be 32 bytes")
    return Envelope(level, alg, device_id, epoch, int.from_bytes(piv, "big"), ts, protected, piv,
                    body, tag)


def _protected(alg: int, device_id: bytes, seq: int, epoch: int, timestamp_ms: int | None) -> bytes:
    hdr: dict[int, Any] = {HDR_ALG: alg, HDR_KID: bytes(device_id), HDR_PIV: partial_iv(seq),
                           HDR_EPOCH: epoch}
    if timestamp_ms is not None:
        hdr[HDR_TIMESTAMP] = timestamp_ms
    return cbor2.dumps(hdr)


def _enc_structure(protected: bytes, aad: bytes) -> bytes:
    # ["Encrypt0", protected, external_aad], built without a CBOR encoder call (hot path).
    return b"\x83" + _ENC0_CONTEXT + _bstr(protected) + _bstr(aad)


def _mac_structure(protected: bytes, aad: bytes, payload: bytes) -> bytes:
    return b"\x84" + _MAC0_CONTEXT + _bstr(protected) + _bstr(aad) + _bstr(payload)


def _hmac(key: bytes, data: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def seal(payload: bytes, *, keys: KeyContext, seq: int, route: str, timestamp_ms: int | None,
         level: Level = Level.SEALED, alg: int | None = None) -> bytes:
    """Protect `payload` for `route`. The caller owns `seq`: it must never repeat for `keys`."""
    if not 0 <= seq <= MAX_SEQ:
        raise ConfigError(f"seq must be between 0 and {MAX_SEQ}")
    if timestamp_ms is not None and not 0 <= timestamp_ms < _MAX_TS:
        raise ConfigError("timestamp out of range")
    aad = external_aad(keys.direction, route)
    if level is Level.SEALED:
        alg = Alg.A256GCM if alg is None else alg
        if alg not in AEAD_ALGS:
            raise ConfigError(f"not an AEAD algorithm: {alg}")
        protected = _protected(alg, keys.device_id, seq, keys.epoch, timestamp_ms)
        ct = keys.aead(alg).encrypt(keys.nonce(partial_iv(seq)), payload,
                                    _enc_structure(protected, aad))
        return b"\xd0\x83" + _bstr(protected) + b"\xa0" + _bstr(ct)
    if alg not in (None, Alg.HMAC_256_256):
        raise ConfigError("level signed uses HMAC 256/256")
    protected = _protected(Alg.HMAC_256_256, keys.device_id, seq, keys.epoch, timestamp_ms)
    tag = _hmac(keys.mac_key, _mac_structure(protected, aad, payload))
    return b"\xd1\x84" + _bstr(protected) + b"\xa0" + _bstr(payload) + _bstr(tag)


def verify(env: Envelope, keys: KeyContext, route: str) -> bytes:
    """Check the envelope's MAC or AEAD tag under `keys`; return the payload."""
    aad = external_aad(keys.direction, route)
    if env.level is Level.SEALED:
        try:
            return keys.aead(env.alg).decrypt(keys.nonce(env.partial_iv), env.body,
                                              _enc_structure(env.protected, aad))
        except InvalidTag:
            raise Rejected(RejectReason.DECRYPT_FAILED) from None
    expected = _hmac(keys.mac_key, _mac_structure(env.protected, aad, env.body))
    if not _stdlib_hmac.compare_digest(expected, env.tag):
        raise Rejected(RejectReason.BAD_MAC)
    return env.body


def unseal(data: bytes, *, route: str, contexts: Callable[[DeviceId, int], SecurityContext],
           now_ms: int, max_size: int = DEFAULT_MAX_SIZE, strike: bool = True) -> Opened:
    """Open a message: parse, find its context, check replay, verify, apply policy, strike.

    `contexts(device_id, epoch)` returns the receiver's SecurityContext or raises Rejected
    (unknown_device, revoked, ...). With `strike=False` the sequence number is not recorded: the
    caller strikes it (`ctx.window.strike(seq)`) once the message is durably stored.
    """
    env = parse(data, max_size=max_size)
    ctx = contexts(env.device_id, env.epoch)
    ctx.window.check(env.seq)
    payload = verify(env, ctx.keys, route)
    ctx.policy.check(env.level, env.timestamp_ms, now_ms)
    if strike:
        ctx.window.strike(env.seq)
    return Opened(env.device_id, env.epoch, env.seq, env.timestamp_ms, env.level, env.alg,
                  ctx.keys.direction, route, payload)
