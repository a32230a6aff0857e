"""Waspmote frames: layouts built by hand, AES-ECB known answers computed here, every refusal."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorseal.compat import waspmote
from sensorseal.compat.waspmote import WaspmoteKey
from sensorseal.core.errors import ConfigError, Rejected, RejectReason

SERIAL8 = bytes.fromhex("0123456789abcdef")
SERIAL4 = bytes.fromhex("075bcd15")  # 123456789
SERIAL8_TEXT = "0123456789ABCDEF"

# An ASCII v15 frame written byte by byte from the layout in docs/compat.md.
ASCII_V15 = (b"<=>" + bytes([0x80 | 6, 3])
             + b"#0123456789ABCDEF#node_01#7#BAT:93#TC:21.50#ACC:-12;40;1003#")
# A binary v15 frame: type 6, length byte = len - 5, 8-byte serial, id '#', seq, fields.
BINARY_FIELDS = bytes([52, 93, 74]) + bytes.fromhex("0000ac41")
BINARY_V15 = (b"<=>" + bytes([6, 8 + 8 + 1 + len(BINARY_FIELDS)]) + SERIAL8 + b"node_01#"
              + bytes([200]) + BINARY_FIELDS)


def ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """The known answer, computed here with `cryptography` (not with the module's builder)."""
    padded = data + b"\0" * (-len(data) % 16)
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(padded) + enc.finalize()


def keys(**by_serial: WaspmoteKey) -> Callable[[str], WaspmoteKey | None]:
    return lambda serial: by_serial.get("k" + serial)


def test_parse_ascii_v15() -> None:
    f = waspmote.parse_plain(ASCII_V15)
    assert (f.mode, f.frame_type, f.serial, f.waspmote_id, f.seq) == (
        "ascii", 6, SERIAL8_TEXT, "node_01", 7)
    assert f.fields == (("BAT", "93"), ("TC", "21.50"), ("ACC", "-12;40;1003"))
    assert f.fields[2].values == ("-12", "40", "1003")
    assert f.weak and not f.encrypted


def test_parse_ascii_v12_decimal_serial() -> None:
    raw = b"<=>" + bytes([0x80, 1]) + b"#123456789#mote#255#BAT:50#"
    f = waspmote.parse_plain(raw)
    assert (f.frame_type, f.serial, f.seq, f.fields) == (0, "123456789", 255, (("BAT", "50"),))


def test_parse_binary_v15_header() -> None:
    f = waspmote.parse_plain(BINARY_V15)
    assert (f.mode, f.frame_type, f.serial, f.waspmote_id, f.seq) == (
        "binary", 6, SERIAL8_TEXT, "node_01", 200)
    assert f.payload == BINARY_FIELDS and f.fields == ()


def test_binary_v12_serial_reads_like_the_ascii_one() -> None:
    raw = b"<=>" + bytes([0, 4 + 1 + 1 + 2]) + SERIAL4 + b"#" + bytes([9]) + b"\x34\x5d"
    f = waspmote.parse_plain(raw)
    assert (f.serial, f.waspmote_id, f.seq, f.payload) == ("123456789", "", 9, b"\x34\x5d")


def test_builders_reproduce_the_hand_written_frames() -> None:
    assert waspmote.build_ascii(serial=SERIAL8, waspmote_id="node_01", seq=7, fields=[
        ("BAT", "93"), ("TC", "21.50"), ("ACC", "-12;40;1003")]) == ASCII_V15
    assert waspmote.build_binary(serial=SERIAL8, waspmote_id="node_01", seq=200,
                                 payload=BINARY_FIELDS) == BINARY_V15


PASSWORDS = [
    (128, "libeliumlibelium"), (128, "short"),
    (192, "a" * 24), (192, "twelve-chars"),
    (256, "0123456789abcdef0123456789abcdef"), (256, "x"),
]


@pytest.mark.parametrize(("bits", "password"), PASSWORDS)
@pytest.mark.parametrize("plain", [ASCII_V15, BINARY_V15], ids=["ascii", "binary"])
def test_v15_encrypted_known_answer(bits: int, password: str, plain: bytes) -> None:
    key = password.encode().ljust(bits // 8, b"\0")
    ct = ecb_encrypt(key, plain)
    frame = b"<=>" + bytes([96, 8 + len(ct)]) + SERIAL8 + ct
    k = WaspmoteKey(password, bits)
    assert waspmote.build_encrypted(plain, k, serial=SERIAL8) == frame
    f = waspmote.open_frame(frame, keys(**{"k" + SERIAL8_TEXT: k}))
    assert f == dataclasses.replace(waspmote.parse_plain(plain), encrypted=True, key_bits=bits,
                                    outer_type=96)
    assert f.weak and f.encrypted


@pytest.mark.parametrize(("ftype", "bits", "password"), [
    (97, 128, "libeliumlibelium"), (98, 192, "b" * 20), (99, 256, "c" * 32), (101, 128, "k"),
])
def test_v12_encrypted_known_answer(ftype: int, bits: int, password: str) -> None:
    plain = b"<=>" + bytes([0x80, 1]) + b"#123456789#mote#3#BAT:50#"
    ct = ecb_encrypt(password.encode().ljust(bits // 8, b"\0"), plain)
    frame = b"<=>" + bytes([ftype, 4 + 4 + 1 + len(ct)]) + SERIAL4 + b"mote#" + ct
    k = WaspmoteKey(password, bits)
    assert waspmote.build_encrypted(plain, k, serial=SERIAL4, waspmote_id="mote",
                                    frame_type=ftype) == frame
    f = waspmote.open_frame(frame, keys(k123456789=k))
    assert (f.serial, f.waspmote_id, f.seq, f.fields) == ("123456789", "mote", 3, (("BAT", "50"),))
    assert (f.key_bits, f.outer_type, f.encrypted) == (bits, ftype, True)


def test_ecb_leaks_equal_blocks() -> None:
    """Why results are weak: equal 16-byte plaintext blocks give equal ciphertext blocks."""
    plain = waspmote.build_ascii(serial=SERIAL8, waspmote_id="n", seq=1,
                                 fields=[("STR", "A" * 64)])
    ct = waspmote.build_encrypted(plain, WaspmoteKey("pw"), serial=SERIAL8)[13:]
    blocks = [ct[i:i + 16] for i in range(0, len(ct), 16)]
    assert len(set(blocks)) < len(blocks)


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_wrong_key_fails_to_decrypt(bits: int) -> None:
    frame = waspmote.build_encrypted(ASCII_V15, WaspmoteKey("right", bits), serial=SERIAL8)
    with pytest.raises(Rejected) as exc:
        waspmote.open_frame(frame, keys(**{"k" + SERIAL8_TEXT: WaspmoteKey("wrong", bits)}))
    assert exc.value.reason is RejectReason.DECRYPT_FAILED


def test_wrong_key_size_fails_to_decrypt() -> None:
    frame = waspmote.build_encrypted(ASCII_V15, WaspmoteKey("pw", 128), serial=SERIAL8)
    with pytest.raises(Rejected) as exc:
        waspmote.open_frame(frame, keys(**{"k" + SERIAL8_TEXT: WaspmoteKey("pw", 256)}))
    assert exc.value.reason is RejectReason.DECRYPT_FAILED


def test_unknown_node() -> None:
    frame = waspmote.build_encrypted(ASCII_V15, WaspmoteKey("pw"), serial=SERIAL8)
    with pytest.raises(Rejected) as exc:
        waspmote.open_frame(frame, keys())
    assert exc.value.reason is RejectReason.UNKNOWN_DEVICE


def _raw_encrypted(plain_padded: bytes, key: bytes = b"pw".ljust(16, b"\0")) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    ct = enc.update(plain_padded) + enc.finalize()
    return b"<=>" + bytes([96, 8 + len(ct)]) + SERIAL8 + ct


@pytest.mark.parametrize("padded", [
    ASCII_V15 + b"\x01" * (-len(ASCII_V15) % 16),  # non-zero padding
    ASCII_V15 + b"\0" * (-len(ASCII_V15) % 16 + 16),  # a whole extra block of padding
    BINARY_V15 + b"\x07" * (-len(BINARY_V15) % 16),
    (BINARY_V15[:4] + bytes([250]) + BINARY_V15[5:]).ljust(48, b"\0"),  # inner length too big
    b"\0" * 32,  # not a frame at all
    waspmote.build_ascii(serial=bytes(8), waspmote_id="node_01", seq=7,
                         fields=[]).ljust(48, b"\0"),  # inner frame names another serial
    (b"<=>" + bytes([0x86, 9]) + b"#0123456789ABCDEF#n#1#").ljust(32, b"\0"),  # inner malformed
])
def test_bad_plaintext_is_decrypt_failed(padded: bytes) -> None:
    with pytest.raises(Rejected) as exc:
        waspmote.open_frame(_raw_encrypted(padded), keys(**{"k" + SERIAL8_TEXT:
                                                             WaspmoteKey("pw")}))
    assert exc.value.reason is RejectReason.DECRYPT_FAILED


def test_plain_frames_need_allow_plain() -> None:
    with pytest.raises(Rejected) as exc:
        waspmote.open_frame(ASCII_V15, keys())
    assert exc.value.reason is RejectReason.POLICY_VIOLATION
    assert waspmote.open_frame(ASCII_V15, keys(), allow_plain=True).seq == 7


@pytest.mark.parametrize("frame", [ASCII_V15, BINARY_V15,
                                   waspmote.build_encrypted(ASCII_V15, WaspmoteKey("pw"),
                                                            serial=SERIAL8)])
def test_every_truncation_is_refused(frame: bytes) -> None:
    k = keys(**{"k" + SERIAL8_TEXT: WaspmoteKey("pw")})
    for n in range(len(frame)):
        with pytest.raises(Rejected) as exc:
            waspmote.open_frame(frame[:n], k, allow_plain=True)
        assert exc.value.reason in {RejectReason.MALFORMED, RejectReason.DECRYPT_FAILED}


@pytest.mark.parametrize(("raw", "why"), [
    (b"", RejectReason.MALFORMED),
    (b"<=>", RejectReason.MALFORMED),
    (b"<=?" + ASCII_V15[3:], RejectReason.MALFORMED),
    (ASCII_V15[:3] + bytes([0x80 | 9]) + ASCII_V15[4:], RejectReason.MALFORMED),  # type 9
    (ASCII_V15[:4] + bytes([2]) + ASCII_V15[5:], RejectReason.MALFORMED),  # field count
    (ASCII_V15.replace(b"node_01", b"n\xc3\xa9ud"), RejectReason.MALFORMED),  # non-ASCII
    (ASCII_V15.replace(b"node_01", b"n\x00de"), RejectReason.MALFORMED),  # control byte
    (ASCII_V15.replace(b"#7#", b"#256#"), RejectReason.MALFORMED),
    (ASCII_V15.replace(b"#7#", b"#07#"), RejectReason.MALFORMED),
    (ASCII_V15.replace(b"BAT:93", b"BAT=93"), RejectReason.MALFORMED),
    (ASCII_V15.replace(b"0123456789ABCDEF", b"0123456789abcdef"), RejectReason.MALFORMED),
    (ASCII_V15.replace(b"node_01", b"n" * 17), RejectReason.MALFORMED),
    (ASCII_V15[:-1], RejectReason.MALFORMED),
    (BINARY_V15[:4] + bytes([255]) + BINARY_V15[5:], RejectReason.MALFORMED),  # huge length
    (BINARY_V15 + b"x", RejectReason.MALFORMED),  # trailing byte
    (b"<=>" + bytes([6, 8 + 18 + 1]) + SERIAL8 + b"n" * 17 + b"#\x01", RejectReason.MALFORMED),
    (b"<=>" + bytes([96, 8 + 15]) + SERIAL8 + b"\0" * 15, RejectReason.MALFORMED),  # not blocks
    (b"<=>" + bytes([96, 8]) + SERIAL8, RejectReason.MALFORMED),  # no ciphertext
    (b"<=>" + bytes([97, 4 + 20]) + SERIAL4 + b"x" * 20, RejectReason.MALFORMED),  # no '#'
    (b"<=>" + bytes([102, 8 + 16]) + SERIAL8 + bytes(16), RejectReason.MALFORMED),
    (b"<=>" + bytes([96 | 0x80, 8 + 16]) + SERIAL8 + bytes(16), RejectReason.MALFORMED),
    (b"<=>" + b"\x86\x00#" + b"A" * 2000 + b"#", RejectReason.OVERSIZE),
])
def test_malformed_frames(raw: bytes, why: RejectReason) -> None:
    k = keys(**{"k" + SERIAL8_TEXT: WaspmoteKey("pw")})
    with pytest.raises(Rejected) as exc:
        waspmote.open_frame(raw, k, allow_plain=True)
    assert exc.value.reason is why, exc.value


def test_parse_plain_refuses_encrypted_types() -> None:
    frame = waspmote.build_encrypted(ASCII_V15, WaspmoteKey("pw"), serial=SERIAL8)
    with pytest.raises(Rejected) as exc:
        waspmote.parse_plain(frame)
    assert exc.value.reason is RejectReason.MALFORMED


def test_from_hex() -> None:
    assert waspmote.from_hex(ASCII_V15.hex().upper()) == ASCII_V15
    for bad in ("3C3D3", "zz", "3c\u00e9"):
        with pytest.raises(Rejected) as exc:
            waspmote.from_hex(bad)
        assert exc.value.reason is RejectReason.MALFORMED


def test_key_validation_and_redaction() -> None:
    for password, bits in [("", 128), ("x" * 17, 128), ("p\u00e4ss", 128), ("a\0b", 128),
                           ("ok", 64)]:
        with pytest.raises(ConfigError):
            WaspmoteKey(password, bits)
    assert "hunter2" not in repr(WaspmoteKey("hunter2"))
    assert WaspmoteKey("abc", 192).aes_key() == b"abc" + b"\0" * 21


def test_builder_misuse() -> None:
    with pytest.raises(ConfigError):
        waspmote.build_ascii(serial=SERIAL4, waspmote_id="n", seq=1, fields=[])  # v15 type
    with pytest.raises(ConfigError):
        waspmote.build_ascii(serial=SERIAL8, waspmote_id="a#b", seq=1, fields=[])
    with pytest.raises(ConfigError):
        waspmote.build_ascii(serial=SERIAL8, waspmote_id="n", seq=256, fields=[])
    with pytest.raises(ConfigError):
        waspmote.build_binary(serial=SERIAL8, waspmote_id="n", seq=1, payload=bytes(300))
    with pytest.raises(ConfigError):
        waspmote.build_encrypted(ASCII_V15, WaspmoteKey("pw", 128), serial=SERIAL4,
                                 frame_type=99)
    with pytest.raises(ConfigError):
        waspmote.build_encrypted(bytes(300), WaspmoteKey("pw"), serial=SERIAL8)


K = keys(**{"k" + SERIAL8_TEXT: WaspmoteKey("pw"), "k123456789": WaspmoteKey("pw", 256)})


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    with contextlib.suppress(Rejected):
        waspmote.parse_plain(raw)
    with contextlib.suppress(Rejected):
        waspmote.open_frame(raw, K, allow_plain=True)


@settings(max_examples=500, deadline=None)
@given(ftype=st.sampled_from([0, 6, 0x80, 0x86, 96, 97, 99, 100, 101]),
       length=st.integers(0, 255), tail=st.binary(max_size=120))
def test_fuzz_frames_with_a_valid_start(ftype: int, length: int, tail: bytes) -> None:
    raw = b"<=>" + bytes([ftype, length]) + tail
    with contextlib.suppress(Rejected):
        waspmote.open_frame(raw, K, allow_plain=True)


@settings(max_examples=300, deadline=None)
@given(ct=st.binary(min_size=1, max_size=10).map(lambda b: (b * 16)[: 16 * len(b)]))
def test_fuzz_ciphertexts_under_the_right_key(ct: bytes) -> None:
    raw = b"<=>" + bytes([96, 8 + len(ct)]) + SERIAL8 + ct
    try:
        waspmote.open_frame(raw, K)
    except Rejected as exc:
        assert exc.reason in {RejectReason.DECRYPT_FAILED, RejectReason.MALFORMED}
