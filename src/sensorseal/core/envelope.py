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
import re
from collections.abc import Callable
from typing import NamedTuple

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


_ENC0_PREFIX = b"\x83" + cbor2.dumps("Encrypt0")
_MAC0_PREFIX = b"\x84" + cbor2.dumps("MAC0")
# External AADs as CBOR byte strings, per direction and keyed by route (an enum in the key
# would cost a Python-level hash on every message).
_aad_up: dict[str, bytes] = {}
_aad_down: dict[str, bytes] = {}


def external_aad(direction: Direction, route: str) -> bytes:
    """CBOR ["sensorseal/1", direction, route]: binds a message to its direction and route."""
    return cbor2.dumps([PROTOCOL_LABEL, direction.value, route])


def _aad_bstr(direction: Direction, route: str) -> bytes:
    """The external AAD wrapped as a CBOR byte string, cached: routes are few."""
    cache = _aad_up if direction is Direction.UP else _aad_down
    aad = cache.get(route)
    if aad is None:
        aad = _bstr(external_aad(direction, route))
        if len(cache) < 2048:  # never let the cache grow without bound (4,096 in all)
            cache[route] = aad
    return aad


def partial_iv(seq: int) -> bytes:
    """Sequence number -> Partial IV: big-endian, fewest bytes, 0 as one zero byte (RFC 8613)."""
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


class Envelope(NamedTuple):
    """A parsed but not yet verified envelope. Nothing in it is trustworthy yet.

    (NamedTuples, not frozen dataclasses, on the hot path: they build about 5x faster.)
    """

    level: Level
    alg: int
    device_id: DeviceId
    epoch: int
    seq: int
    timestamp_ms: int | None
    protected: bytes  # the protected header as a CBOR bstr (head + bytes), as received
    partial_iv: bytes
    body: bytes  # ciphertext+tag (sealed) or payload (signed)
    tag: bytes  # MAC tag (signed); empty for sealed


class Opened(NamedTuple):
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


_SEALED, _SIGNED = Level.SEALED, Level.SIGNED  # enum attribute lookups cost ~0.2 us each
_HMAC = int(Alg.HMAC_256_256)
_AEAD_INTS = frozenset(int(a) for a in AEAD_ALGS)
_MAX_EPOCH = 2**32


# map head (1) + alg label (1) + kid label and 12-byte bstr (1+1+12) + Partial IV label and
# bstr head (1+1) + epoch label (-65537: 5 bytes). Values of variable size are added per header.
_HDR_FIXED = 1 + 1 + 14 + 2 + 5


def _uint_len(n: int) -> int:
    """Bytes of the shortest CBOR encoding of the unsigned integer n (head included)."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    return 5 if n < 0x100000000 else 9


def _header(protected: bytes, level: Level) -> tuple[int, DeviceId, int, bytes, int | None]:
    try:
        hdr = cbor2.loads(protected)
    except Exception as exc:  # cbor2 raises several types; all mean the same here
        raise _malformed("protected header is not CBOR") from exc
    if type(hdr) is not dict:
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
    if (alg != _HMAC) if level is _SIGNED else (alg not in _AEAD_INTS):
        raise Rejected(RejectReason.UNSUPPORTED, f"alg {alg} not accepted for {level.value}")
    if type(kid) is not bytes or len(kid) != DEVICE_ID_LEN:
        raise _malformed("kid must be a 12-byte device id")
    if type(piv) is not bytes or not 1 <= len(piv) <= 5 or (len(piv) > 1 and piv[0] == 0):
        raise _malformed("Partial IV must be 1-5 bytes, shortest form")
    if type(epoch) is not int or not 0 <= epoch < _MAX_EPOCH:
        raise _malformed("epoch missing or out of range")
    if ts is not None and (type(ts) is not int or not 0 <= ts < _MAX_TS):
        raise _malformed("timestamp out of range")
    # Preferred serialization is the shortest one, so its size follows from the values. A
    # header of any other size had trailing bytes (cbor2.loads ignores them), duplicate labels
    # (they collapse), indefinite lengths or longer heads: all refused. (Re-encoding with
    # cbor2.dumps would check the same at ~5 us; this costs well under 1 us.)
    size = (_HDR_FIXED + _uint_len(alg) + len(piv) + _uint_len(epoch)
            + (0 if ts is None else 5 + _uint_len(ts)))
    if size != len(protected):
        raise _malformed("protected header not in preferred serialization")
    return alg, DeviceId.trusted(kid), epoch, piv, ts


def _bstr_at(data: bytes, off: int) -> tuple[int, int]:
    """Locate the definite-length byte string whose head is at `off`: (start, end) of its
    content. Only the shortest head is accepted (RFC 8949 section 4.2.1)."""
    if off >= len(data):
        raise _malformed("truncated")
    head = data[off]
    if head >> 5 != 2:
        raise _malformed("byte string expected")
    info = head & 0x1F
    if info < 24:
        start, length = off + 1, info
    elif info == 24:
        if off + 1 >= len(data):
            raise _malformed("truncated")
        start, length, floor = off + 2, data[off + 1], 24
    elif info == 25:
        start, length, floor = off + 3, int.from_bytes(data[off + 1:off + 3], "big"), 0x100
    elif info == 26:
        start, length, floor = off + 5, int.from_bytes(data[off + 1:off + 5], "big"), 0x10000
    else:
        raise _malformed("byte string length form not accepted")
    if start > len(data):
        raise _malformed("truncated")
    if info >= 24 and length < floor:
        raise _malformed("non-canonical length")
    end = start + length
    if end > len(data):
        raise _malformed("truncated")
    return start, end


def parse(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Parse the outer structure and header. Raises Rejected(MALFORMED|OVERSIZE|UNSUPPORTED).

    Exactly one encoding of the outer structure is accepted: the tag, a definite array head,
    byte strings with their shortest heads, an empty unprotected map, nothing after the item.
    That is all a byte-level reader needs, so the outer layer is read without a CBOR decoder,
    and with the authenticated fields fixed no unauthenticated byte is left to flip.
    """
    if not isinstance(data, bytes):
        if not isinstance(data, bytearray | memoryview):
            raise _malformed("not bytes")
        data = bytes(data)
    if len(data) > max_size:
        raise Rejected(RejectReason.OVERSIZE, f"{len(data)} bytes > limit {max_size}")
    lead = data[:2]
    if lead == b"\xd0\x83":
        level = _SEALED
    elif lead == b"\xd1\x84":
        level = _SIGNED
    else:
        raise _malformed("not COSE_Encrypt0 (tag 16) or COSE_Mac0 (tag 17)")
    p_start, p_end = _bstr_at(data, 2)
    if data[p_end:p_end + 1] != b"\xa0":
        raise _malformed("unprotected header must be an empty map")
    b_start, b_end = _bstr_at(data, p_end + 1)
    if level is _SIGNED:
        t_start, t_end = _bstr_at(data, b_end)
        tag = data[t_start:t_end]
        if len(tag) != _MAC_LEN:
            raise _malformed("MAC tag must be 32 bytes")
    else:
        t_end, tag = b_end, b""
        if b_end - b_start < _TAG_LEN:
            raise _malformed("ciphertext shorter than its tag")
    if t_end != len(data):
        raise _malformed("trailing bytes")
    protected = data[p_start:p_end]
    alg, device_id, epoch, piv, ts = _header(protected, level)
    return Envelope(level, alg, device_id, epoch, int.from_bytes(piv, "big"), ts, data[2:p_end],
                    piv, data[b_start:b_end], tag)


def _uint(n: int) -> bytes:
    """The shortest CBOR encoding of the unsigned integer n (RFC 8949 section 4.2.1)."""
    if n < 24:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x18, n))
    if n < 0x10000:
        return b"\x19" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x1a" + n.to_bytes(4, "big")
    return b"\x1b" + n.to_bytes(8, "big")


def _protected(alg: int, device_id: bytes, seq: int, epoch: int, timestamp_ms: int | None) -> bytes:
    """The protected header in the layout the fast path of `unseal` recognises, built from
    bytes (a third of cbor2.dumps' time on a device); equal to cbor2.dumps of the same map in
    the same order, which tests/unit/core/test_envelope_fastpath.py checks."""
    piv = partial_iv(seq)
    if len(device_id) != DEVICE_ID_LEN:
        raise ConfigError(f"a device id is {DEVICE_ID_LEN} bytes")
    head = (b"\xa4" if timestamp_ms is None else b"\xa5") + b"\x01" + _uint(alg) + b"\x04\x4c" \
        + bytes(device_id) + bytes((0x06, 0x40 | len(piv))) + piv + b"\x3a\x00\x01\x00\x00" \
        + _uint(epoch)
    if timestamp_ms is None:
        return head
    return head + b"\x3a\x00\x01\x00\x01" + _uint(timestamp_ms)


def _enc_structure(protected_bstr: bytes, aad_bstr: bytes) -> bytes:
    """Enc_structure ["Encrypt0", protected, external_aad] (RFC 9052 section 5.3), from parts
    that are already CBOR byte strings: no encoder call on the hot path."""
    return _ENC0_PREFIX + protected_bstr + aad_bstr


def _mac_structure(protected_bstr: bytes, aad_bstr: bytes, payload: bytes) -> bytes:
    """MAC_structure ["MAC0", protected, external_aad, payload] (RFC 9052 section 6.3)."""
    return _MAC0_PREFIX + protected_bstr + aad_bstr + _bstr(payload)


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
    aad = _aad_bstr(keys.direction, route)
    if level is Level.SEALED:
        alg = Alg.A256GCM if alg is None else alg
        if alg not in AEAD_ALGS:
            raise ConfigError(f"not an AEAD algorithm: {alg}")
        protected = _protected(alg, keys.device_id, seq, keys.epoch, timestamp_ms)
        prot = _bstr(protected)
        ct = keys.aead(alg).encrypt(keys.nonce(partial_iv(seq)), payload, _enc_structure(prot, aad))
        return b"\xd0\x83" + prot + b"\xa0" + _bstr(ct)
    if alg not in (None, Alg.HMAC_256_256):
        raise ConfigError("level signed uses HMAC 256/256")
    protected = _protected(Alg.HMAC_256_256, keys.device_id, seq, keys.epoch, timestamp_ms)
    prot = _bstr(protected)
    tag = _hmac(keys.mac_key, _mac_structure(prot, aad, payload))
    return b"\xd1\x84" + prot + b"\xa0" + _bstr(payload) + _bstr(tag)


def verify(env: Envelope, keys: KeyContext, route: str) -> bytes:
    """Check the envelope's MAC or AEAD tag under `keys`; return the payload."""
    aad = _aad_bstr(keys.direction, route)
    if env.level is _SEALED:
        try:
            return keys.aead(env.alg).decrypt(keys.nonce(env.partial_iv), env.body,
                                              _enc_structure(env.protected, aad))
        except InvalidTag:
            raise Rejected(RejectReason.DECRYPT_FAILED) from None
    expected = _hmac(keys.mac_key, _mac_structure(env.protected, aad, env.body))
    if not _stdlib_hmac.compare_digest(expected, env.tag):
        raise Rejected(RejectReason.BAD_MAC)
    return env.body


# The fast path. `seal()` writes one layout: tag 16, the protected header as a bstr with a one-byte
# length, labels in the order 1, 4, 6, -65537 and optionally -65538, every value in its shortest
# form, then an empty unprotected map and a ciphertext with a one- or two-byte length. This pattern
# matches exactly that layout and nothing else (each alternative below is the shortest CBOR form
# of its value, so a match is always something `parse()` accepts with the same values: the
# differential tests in tests/unit/test_envelope_fastpath.py hold the two to that). Everything
# that does not match (other label orders, Mac0, short payloads, malformed input) takes the
# general path, which gives every rejection its reason.
_FAST_UINT32 = (rb"[\x00-\x17]|\x18[\x18-\xff]|\x19[\x01-\xff].|"
                rb"\x1a(?:[\x01-\xff].|\x00[\x01-\xff])..")
_FAST_TS = _FAST_UINT32 + rb"|\x1b\x00(?:[\x01-\x1f]..|\x00[\x01-\xff].|\x00\x00[\x01-\xff])...."
_FAST_SEALED = re.compile(
    rb"\xd0\x83"  # tag 16, array of 3
    rb"(\x58(.)([\xa4\xa5])\x01(\x03|\x18\x18)"  # protected: bstr of 24-255 bytes: a map of
    # 4 or 5 (with the timestamp), alg A256GCM or ChaCha20/Poly1305,
    rb"\x04\x4c(.{12})"  # kid: the 12-byte device id,
    rb"\x06(\x41.|\x42[^\x00].|\x43[^\x00]..|\x44[^\x00]...|\x45[^\x00]....)"  # Partial IV,
    rb"\x3a\x00\x01\x00\x00(" + _FAST_UINT32 + rb")"  # -65537: epoch < 2**32,
    rb"(?:\x3a\x00\x01\x00\x01(" + _FAST_TS + rb"))?)"  # -65538: timestamp < 2**53
    rb"\xa0(\x58.|\x59..)",  # empty unprotected map; the ciphertext's head
    re.S)


_from_bytes = int.from_bytes  # big-endian by default; bound once (the attribute lookup costs)
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (~0.4 us less)
_UP = Direction.UP
_id_cache: dict[bytes, DeviceId] = {}


def _device_id(kid: bytes) -> DeviceId:
    """The DeviceId for a 12-byte kid, from a bounded cache: a receiver sees the same few ids
    again and again, and building one costs more than looking it up."""
    device_id = _id_cache.get(kid)
    if device_id is None:
        if len(_id_cache) >= 65_536:  # random kids from an attacker must not grow it forever
            _id_cache.clear()
        device_id = _id_cache[kid] = DeviceId.trusted(kid)
    return device_id


def unseal(data: bytes, *, route: str, contexts: Callable[[DeviceId, int], SecurityContext],
           now_ms: int, max_size: int = DEFAULT_MAX_SIZE, strike: bool = True) -> Opened:
    """Open a message: parse, find its context, check replay, verify, apply policy, strike.

    `contexts(device_id, epoch)` returns the receiver's SecurityContext or raises Rejected
    (unknown_device, revoked, ...). With `strike=False` the sequence number is not recorded: the
    caller strikes it (`ctx.window.strike(seq)`) once the message is durably stored.
    """
    m = _FAST_SEALED.match(data) if type(data) is bytes else None
    if m is not None:  # the layout seal() writes: same checks in the same order, in half the time
        prot, plen, nmap, alg_b, kid, piv, epoch_b, ts_b, body_head = m.groups()
        start = m.end()
        body_len = body_head[1] if len(body_head) == 2 else _from_bytes(body_head[1:])
        if (plen[0] + 2 == len(prot) and start + body_len == len(data) <= max_size
                and body_len >= (24 if len(body_head) == 2 else 0x100)
                and (nmap == b"\xa5") is (ts_b is not None)):
            # (Inline on purpose: every Python call here costs as much as a tenth of the AEAD.)
            seq = _from_bytes(piv[1:])
            epoch = epoch_b[0] if len(epoch_b) == 1 else _from_bytes(epoch_b[1:])
            ts = (None if ts_b is None else
                  ts_b[0] if len(ts_b) == 1 else _from_bytes(ts_b[1:]))
            device_id = _id_cache.get(kid) or _device_id(kid)
            ctx = contexts(device_id, epoch)
            window = ctx.window
            window.check(seq)
            keys = ctx.keys
            direction = keys.direction
            aad = (_aad_up if direction is _UP else _aad_down).get(route) \
                or _aad_bstr(direction, route)
            alg = alg_b[-1]
            try:
                payload = (keys._aeads.get(alg) or keys.aead(alg)).decrypt(
                    (keys._base_iv_int ^ seq).to_bytes(12), data[start:],
                    _ENC0_PREFIX + prot + aad)
            except InvalidTag:
                raise Rejected(RejectReason.DECRYPT_FAILED) from None
            ctx.policy.check(_SEALED, ts, now_ms)
            if strike:
                window.strike(seq)
            return _new_tuple(Opened, (device_id, epoch, seq, ts, _SEALED, alg, direction, route,
                                       payload))
    env = parse(data, max_size=max_size)
    ctx = contexts(env.device_id, env.epoch)
    ctx.window.check(env.seq)
    payload = verify(env, ctx.keys, route)
    ctx.policy.check(env.level, env.timestamp_ms, now_ms)
    if strike:
        ctx.window.strike(env.seq)
    return Opened(env.device_id, env.epoch, env.seq, env.timestamp_ms, env.level, env.alg,
                  ctx.keys.direction, route, payload)
