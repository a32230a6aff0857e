"""Libelium Waspmote frames, so that a sensorseal gateway can stand in for a Meshlium.

Layouts (from Libelium's WaspFrame/WaspAES sources, API v12 and v15; docs/compat.md has the
tables and what could not be confirmed)::

    ASCII   '<=>' | type|0x80 | n_fields | '#' serial '#' id '#' seq '#' (TAG ':' value '#')*
    binary  '<=>' | type | n = len-5 | serial (8 B v15, 4 B v12) | id | '#' | seq (1 B) | fields
    AES v15 '<=>' | 96 or 100 | n = 8 + len(ct) | serial (8 B) | ct
    AES v12 '<=>' | 97/98/99 or 101 | n = 4 + len(id) + 1 + len(ct) | serial (4 B) | id '#' | ct

    ct = AES-ECB(key, plain frame zero-padded to a multiple of 16)
    key = the ASCII password zero-padded to 16, 24 or 32 bytes (AES-128/192/256)

Plain-frame types 0-5 are v12 (4-byte serial, shown in decimal) and 6-7 are v15 (8-byte serial,
shown as 16 uppercase hex digits); the same serial text comes out of ASCII and binary frames.
Binary *fields* are returned undecoded (`payload`): their sizes come from Libelium's per-sensor
type tables, which this module does not carry.

None of these formats authenticates anything. ECB leaks equal blocks, the key is a password and
there is no MAC, so a result is always `weak=True`: the pipeline accepts it only under a
`legacy` policy and counts it. The only "integrity" is that a wrong key almost never decrypts
to a frame that starts with '<=>', has zero padding and repeats the outer serial.

Every refusal is Rejected(MALFORMED | OVERSIZE | UNKNOWN_DEVICE | DECRYPT_FAILED |
POLICY_VIOLATION); bad arguments to the builders are ConfigError.
"""

from __future__ import annotations

import binascii
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sensorseal.core.errors import ConfigError, Rejected, RejectReason

__all__ = [
    "AES_ECB_END_TO_END_V12",
    "AES_ECB_END_TO_END_V15",
    "AES_ECB_FRAME_V15",
    "DEFAULT_MAX_SIZE",
    "ENCRYPTED_TYPES",
    "INFORMATION_FRAME_V12",
    "INFORMATION_FRAME_V15",
    "Field",
    "WaspFrame",
    "WaspmoteKey",
    "build_ascii",
    "build_binary",
    "build_encrypted",
    "from_hex",
    "open_frame",
    "parse_plain",
    "serial_text",
]

DELIMITER: Final = b"<=>"
ASCII_FLAG: Final = 0x80
DEFAULT_MAX_SIZE: Final = 1024
BLOCK: Final = 16

# Plain frame types (WaspFrame.h). setFrameType() ORs bits 0-5 into the information type.
INFORMATION_FRAME_V12: Final = 0
INFORMATION_FRAME_V15: Final = 6
_MAX_PLAIN_TYPE = 7  # 7 = INFORMATION_FRAME_AGR_XTR, a v15 type
# Encrypted frame types (WaspFrame.h).
AES_ECB_FRAME_V15: Final = 96
AES128_ECB_FRAME_V12: Final = 97
AES192_ECB_FRAME_V12: Final = 98
AES256_ECB_FRAME_V12: Final = 99
AES_ECB_END_TO_END_V15: Final = 100
AES_ECB_END_TO_END_V12: Final = 101
ENCRYPTED_TYPES: Final = frozenset(range(96, 102))
_V15_ENCRYPTED = frozenset({AES_ECB_FRAME_V15, AES_ECB_END_TO_END_V15})
_BITS_OF_TYPE = {AES128_ECB_FRAME_V12: 128, AES192_ECB_FRAME_V12: 192, AES256_ECB_FRAME_V12: 256}

_MAX_ID = 16  # the mote id buffer holds 16 characters
_TAG = re.compile(r"[A-Za-z0-9_]{1,20}")
_HEX16 = re.compile(r"[0-9A-F]{16}")
_DEC = re.compile(r"0|[1-9][0-9]{0,9}")


class Field(NamedTuple):
    """One ASCII sensor field: `tag` from Libelium's sensor table, `value` as sent."""

    tag: str
    value: str

    @property
    def values(self) -> tuple[str, ...]:
        """Multi-value sensors (accelerometer, GPS...) separate their values with ';'."""
        return tuple(self.value.split(";"))


@dataclass(frozen=True, slots=True)
class WaspFrame:
    """A parsed frame. Nothing in it is authenticated: `weak` is always True."""

    mode: Literal["ascii", "binary"]
    frame_type: int  # the type byte without the ASCII flag
    serial: str  # 16 hex digits (v15) or decimal (v12)
    waspmote_id: str
    seq: int  # 0-255, wraps: a loss detector, not a replay counter
    fields: tuple[Field, ...] = ()  # ASCII frames
    payload: bytes = b""  # binary frames: the sensor fields, undecoded
    encrypted: bool = False
    key_bits: int | None = None
    outer_type: int | None = None  # the encrypted frame's type (96-101)
    weak: bool = True


@dataclass(frozen=True, slots=True)
class WaspmoteKey:
    """A node's AES password and key size, as configured on the Meshlium."""

    password: str = field(repr=False)
    bits: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (128, 192, 256):
            raise ConfigError("AES key size is 128, 192 or 256 bits")
        if (not isinstance(self.password, str) or not self.password.isascii()
                or "\0" in self.password or not 1 <= len(self.password) <= self.bits // 8):
            raise ConfigError(f"password must be 1-{self.bits // 8} ASCII characters")

    def aes_key(self, bits: int | None = None) -> bytes:
        """The password zero-padded to the key size (what WaspAES.init does)."""
        size = (bits or self.bits) // 8
        if len(self.password) > size:
            raise ConfigError("password longer than the key")
        return self.password.encode("ascii").ljust(size, b"\0")


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, detail)


def serial_text(serial: bytes) -> str:
    """How a serial is shown: 8 bytes (v15) as 16 uppercase hex, 4 bytes (v12) in decimal."""
    if len(serial) == 8:
        return serial.hex().upper()
    if len(serial) == 4:
        return str(int.from_bytes(serial, "big"))
    raise ConfigError("a Waspmote serial is 8 (v15) or 4 (v12) bytes")


def from_hex(text: str | bytes) -> bytes:
    """Frames relayed as hex text (as Waspmote HTTP uploads send them) -> bytes."""
    try:
        return binascii.unhexlify(text.strip() if isinstance(text, bytes | str) else text)
    except (binascii.Error, ValueError, TypeError):
        raise _malformed("frame is not hex") from None


def _check_bytes(data: bytes, max_size: int) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed("frame is not bytes")
    if len(data) > max_size:
        raise Rejected(RejectReason.OVERSIZE, f"{len(data)} bytes > limit {max_size}")
    data = bytes(data)
    if len(data) < 5:
        raise _malformed("shorter than a frame header")
    if data[:3] != DELIMITER:
        raise _malformed("no '<=>' start delimiter")
    return data


def _printable(raw: bytes, what: str) -> str:
    if not all(0x20 <= b <= 0x7E for b in raw):
        raise _malformed(f"{what} is not printable ASCII")
    return raw.decode("ascii")


def _check_serial(serial: str, v15: bool) -> None:
    if not (_HEX16 if v15 else _DEC).fullmatch(serial) or (not v15 and int(serial) >= 2**32):
        raise _malformed("serial is not 16 hex digits (v15) or a 32-bit decimal (v12)")


def _parse_ascii(data: bytes, ftype: int) -> WaspFrame:
    n_fields = data[4]
    text = _printable(data[5:], "ASCII frame")
    if len(text) < 2 or text[0] != "#" or text[-1] != "#":
        raise _malformed("ASCII frame must be '#'-delimited")
    parts = text[1:-1].split("#")
    if len(parts) < 3:
        raise _malformed("ASCII header needs serial, id and sequence")
    serial, wasp_id, seq_text, *raw_fields = parts
    _check_serial(serial, ftype >= INFORMATION_FRAME_V15)
    if len(wasp_id) > _MAX_ID:
        raise _malformed(f"mote id longer than {_MAX_ID}")
    if not _DEC.fullmatch(seq_text) or int(seq_text) > 255:
        raise _malformed("sequence is not 0-255")
    if len(raw_fields) != n_fields:
        raise _malformed(f"header says {n_fields} fields, frame has {len(raw_fields)}")
    fields: list[Field] = []
    for raw_field in raw_fields:
        tag, sep, value = raw_field.partition(":")
        if not sep or not _TAG.fullmatch(tag):
            raise _malformed("a field is not TAG:value")
        fields.append(Field(tag, value))
    return WaspFrame("ascii", ftype, serial, wasp_id, int(seq_text), tuple(fields))


def _read_id(data: bytes, start: int) -> tuple[str, int]:
    """The mote id from `start` up to '#'; returns (id, index after '#')."""
    end = data.find(b"#", start, start + _MAX_ID + 1)
    if end < 0:
        raise _malformed("mote id not terminated by '#' within 16 bytes")
    return _printable(data[start:end], "mote id"), end + 1


def _check_length(data: bytes) -> None:
    if len(data) != 5 + data[4]:
        raise _malformed(f"length byte says {5 + data[4]} bytes, frame has {len(data)}")


def _parse_binary(data: bytes, ftype: int) -> WaspFrame:
    _check_length(data)
    serial_len = 8 if ftype >= INFORMATION_FRAME_V15 else 4
    if len(data) < 5 + serial_len:
        raise _malformed("truncated serial")
    serial = serial_text(data[5:5 + serial_len])
    wasp_id, pos = _read_id(data, 5 + serial_len)
    if pos >= len(data):
        raise _malformed("truncated before the sequence byte")
    return WaspFrame("binary", ftype, serial, wasp_id, data[pos], payload=data[pos + 1:])


def parse_plain(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> WaspFrame:
    """Parse an unencrypted ASCII or binary frame. Rejected(MALFORMED | OVERSIZE) otherwise."""
    data = _check_bytes(data, max_size)
    type_byte = data[3]
    if type_byte in ENCRYPTED_TYPES:
        raise _malformed("encrypted frame: use open_frame()")
    ftype = type_byte & ~ASCII_FLAG
    if ftype > _MAX_PLAIN_TYPE:
        raise _malformed(f"unknown frame type {type_byte}")
    if type_byte & ASCII_FLAG:
        return _parse_ascii(data, ftype)
    return _parse_binary(data, ftype)


def _ecb_decrypt(key: bytes, ct: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305 -- the wire format
    return dec.update(ct) + dec.finalize()


def _strip_padding(plain: bytes) -> bytes:
    """Remove the zero padding using the inner frame's own framing, and check it."""
    if plain[:3] != DELIMITER:
        raise Rejected(RejectReason.DECRYPT_FAILED, "wrong key or corrupt frame")
    if plain[3] & ASCII_FLAG:  # an ASCII frame ends with '#', never with a zero byte
        inner = plain.rstrip(b"\0")
    else:
        inner = plain[:5 + plain[4]]
        if len(inner) != 5 + plain[4]:
            raise Rejected(RejectReason.DECRYPT_FAILED, "inner length beyond the ciphertext")
    pad = plain[len(inner):]
    if len(pad) >= BLOCK or any(pad):
        raise Rejected(RejectReason.DECRYPT_FAILED, "bad zero padding")
    return inner


def open_frame(data: bytes, key_for: Callable[[str], WaspmoteKey | None], *,
               max_size: int = DEFAULT_MAX_SIZE, allow_plain: bool = False) -> WaspFrame:
    """Decrypt and parse an AES frame (types 96-101); plain frames only with `allow_plain`.

    `key_for(serial)` returns the node's WaspmoteKey or None (UNKNOWN_DEVICE); it may raise
    Rejected itself. For types 97-99 the key size comes from the type, else from the key.
    """
    data = _check_bytes(data, max_size)
    ftype = data[3]
    if ftype not in ENCRYPTED_TYPES:
        if not allow_plain:
            raise Rejected(RejectReason.POLICY_VIOLATION, "unencrypted Waspmote frame")
        return parse_plain(data, max_size=max_size)
    _check_length(data)
    outer_id: str | None = None
    if ftype in _V15_ENCRYPTED:
        if len(data) < 13:
            raise _malformed("truncated serial")
        serial, ct = serial_text(data[5:13]), data[13:]
    else:
        if len(data) < 9:
            raise _malformed("truncated serial")
        serial = serial_text(data[5:9])
        outer_id, pos = _read_id(data, 9)
        ct = data[pos:]
    if not ct or len(ct) % BLOCK:
        raise _malformed(f"ciphertext of {len(ct)} bytes is not whole AES blocks")
    key = key_for(serial)
    if key is None:
        raise Rejected(RejectReason.UNKNOWN_DEVICE, f"no AES key for Waspmote {serial}")
    bits = _BITS_OF_TYPE.get(ftype, key.bits)
    if len(key.password) > bits // 8:
        raise Rejected(RejectReason.DECRYPT_FAILED, f"password too long for AES-{bits}")
    inner_bytes = _strip_padding(_ecb_decrypt(key.aes_key(bits), ct))
    try:
        inner = parse_plain(inner_bytes, max_size=max_size)
    except Rejected as exc:
        raise Rejected(RejectReason.DECRYPT_FAILED, f"inner frame: {exc.detail}") from None
    if inner.serial != serial or (outer_id is not None and inner.waspmote_id != outer_id):
        raise Rejected(RejectReason.DECRYPT_FAILED, "inner frame names another node")
    return dataclasses.replace(inner, encrypted=True, key_bits=bits, outer_type=ftype)


# --- builders (devices, simulators, tests) ---------------------------------------------------


def _check_id(waspmote_id: str) -> bytes:
    if not isinstance(waspmote_id, str) or len(waspmote_id) > _MAX_ID or "#" in waspmote_id:
        raise ConfigError("mote id is at most 16 characters, without '#'")
    if not all(0x20 <= ord(c) <= 0x7E for c in waspmote_id):
        raise ConfigError("mote id is printable ASCII")
    return waspmote_id.encode("ascii")


def _check_serial_bytes(serial: bytes, frame_type: int) -> None:
    if len(serial) != (8 if frame_type >= INFORMATION_FRAME_V15 else 4):
        raise ConfigError("serial is 8 bytes for v15 types (6-7), 4 bytes for v12 (0-5)")


def build_ascii(*, serial: bytes, waspmote_id: str, seq: int, fields: Sequence[tuple[str, str]],
                frame_type: int = INFORMATION_FRAME_V15) -> bytes:
    """An ASCII frame, laid out as the module docstring shows."""
    if not 0 <= frame_type <= _MAX_PLAIN_TYPE or not 0 <= seq <= 255 or len(fields) > 255:
        raise ConfigError("frame type 0-7, seq 0-255, at most 255 fields")
    _check_serial_bytes(serial, frame_type)
    parts = [serial_text(serial), _check_id(waspmote_id).decode(), str(seq)]
    for tag, value in fields:
        if not _TAG.fullmatch(tag) or "#" in value or not all(0x20 <= ord(c) <= 0x7E
                                                                 for c in value):
            raise ConfigError(f"bad field {tag!r:.20}")
        parts.append(f"{tag}:{value}")
    text = "#" + "#".join(parts) + "#"
    return DELIMITER + bytes((frame_type | ASCII_FLAG, len(fields))) + text.encode("ascii")


def build_binary(*, serial: bytes, waspmote_id: str, seq: int, payload: bytes = b"",
                 frame_type: int = INFORMATION_FRAME_V15) -> bytes:
    """A binary frame; `payload` is the already-encoded sensor fields."""
    if not 0 <= frame_type <= _MAX_PLAIN_TYPE or not 0 <= seq <= 255:
        raise ConfigError("frame type 0-7, seq 0-255")
    _check_serial_bytes(serial, frame_type)
    body = bytes(serial) + _check_id(waspmote_id) + b"#" + bytes((seq,)) + bytes(payload)
    if len(body) > 255:
        raise ConfigError("binary frame longer than its length byte allows")
    return DELIMITER + bytes((frame_type, len(body))) + body


def build_encrypted(plain_frame: bytes, key: WaspmoteKey, *, serial: bytes,
                    waspmote_id: str = "", frame_type: int = AES_ECB_FRAME_V15) -> bytes:
    """Encrypt a plain frame as `WaspFrame::encryptFrame` does (ECB, zero padding)."""
    if frame_type not in ENCRYPTED_TYPES:
        raise ConfigError("encrypted frame types are 96-101")
    bits = _BITS_OF_TYPE.get(frame_type, key.bits)
    if bits != key.bits:
        raise ConfigError(f"frame type {frame_type} means AES-{bits}")
    padded = bytes(plain_frame) + b"\0" * (-len(plain_frame) % BLOCK)
    enc = Cipher(algorithms.AES(key.aes_key()), modes.ECB()).encryptor()  # noqa: S305
    ct = enc.update(padded) + enc.finalize()
    if frame_type in _V15_ENCRYPTED:
        if len(serial) != 8:
            raise ConfigError("v15 encrypted frames carry an 8-byte serial")
        body = bytes(serial) + ct
    else:
        if len(serial) != 4:
            raise ConfigError("v12 encrypted frames carry a 4-byte serial")
        body = bytes(serial) + _check_id(waspmote_id) + b"#" + ct
    if len(body) > 255:
        raise ConfigError("encrypted frame longer than its length byte allows")
    return DELIMITER + bytes((frame_type, len(body))) + body
