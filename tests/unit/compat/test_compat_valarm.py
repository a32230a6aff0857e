"""Valarm signed HTTP messages: RFC HMAC vectors, sign/verify, and every refusal."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorseal.compat import valarm
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId

# RFC 2202 section 2: HMAC-MD5 test cases 1-7 (key, data, digest).
RFC2202_MD5 = [
    (b"\x0b" * 16, b"Hi There", "9294727a3638bb1c13f48ef8158bfc9d"),
    (b"Jefe", b"what do ya want for nothing?", "750c783e6ab0b503eaa86e310a5db738"),
    (b"\xaa" * 16, b"\xdd" * 50, "56be34521d144c88dbb8c733f0e8b3f6"),
    (bytes(range(1, 26)), b"\xcd" * 50, "697eaf0aca3a3aea3a75164746ffaa79"),
    (b"\x0c" * 16, b"Test With Truncation", "56461ef2342edc00f9bab995690efd4c"),
    (b"\xaa" * 80, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd"),
    (b"\xaa" * 80,
     b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
     "6f630fad67cda0ee1fb1f562db3aa53e"),
]

# RFC 4231 section 4: HMAC-SHA-256 of test cases 1-7. Case 5 publishes only 128 bits.
RFC4231_SHA256 = [
    (b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\x0c" * 20, b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131,
     b"This is a test using a larger than block-size key and a larger than block-size data."
     b" The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]

DEV = DeviceId.parse("5f1a2b3c4d5e6f7081928374")
OTHER = DeviceId.parse("5f1a2b3c4d5e6f7081928375")
KEY = b"A1b2C3d4E5f6G7h8I9j0"
NOW = 1_700_000_000_000


def key_for(device_id: DeviceId) -> bytes | None:
    return KEY if device_id == DEV else None


def body(**fields: object) -> bytes:
    doc: dict[str, object] = {"device_id": str(DEV), "readings": {"temp_c": 21.5, "door": "open"}}
    doc.update(fields)
    return json.dumps(doc, separators=(",", ":")).encode()


def reason(exc: pytest.ExceptionInfo[Rejected]) -> RejectReason:
    return exc.value.reason


@pytest.mark.parametrize(("key", "data", "digest"), RFC2202_MD5)
def test_rfc2202_hmac_md5(key: bytes, data: bytes, digest: str) -> None:
    assert valarm.compute_mac("md5", key, data).hex() == digest
    assert valarm.check_mac("md5", key, data, bytes.fromhex(digest))
    assert not valarm.check_mac("md5", key, data + b"x", bytes.fromhex(digest))


@pytest.mark.parametrize(("key", "data", "digest"), RFC4231_SHA256)
def test_rfc4231_hmac_sha256(key: bytes, data: bytes, digest: str) -> None:
    mac = valarm.compute_mac("sha256", key, data)
    assert mac.hex()[: len(digest)] == digest
    if len(digest) == 64:
        assert valarm.check_mac("sha256", key, data, bytes.fromhex(digest))


@pytest.mark.parametrize(("key", "data", "digest"), RFC2202_MD5[:1] + RFC2202_MD5[5:])
def test_rfc_vector_as_signature_header(key: bytes, data: bytes, digest: str) -> None:
    """sign() and verify()'s header parser carry the RFC MAC unchanged."""
    assert valarm.sign(data, key, "md5") == f"md5={digest}"
    assert valarm.parse_signature_header(f"MD5={digest.upper()}") == ("md5", bytes.fromhex(digest))


@pytest.mark.parametrize("alg", ["md5", "sha256"])
@pytest.mark.parametrize("counter", [{"seq": 7}, {"ts": NOW - 5000}, {"seq": 8, "ts": NOW}])
def test_sign_verify_roundtrip(alg: str, counter: dict[str, int]) -> None:
    raw = body(**counter)
    msg = valarm.verify(raw, valarm.sign(raw, KEY, alg), key_for, now_ms=NOW, max_skew_s=60)
    assert msg.device_id == DEV
    assert msg.alg == alg
    assert msg.legacy is (alg == "md5")
    assert msg.seq == counter.get("seq")
    assert msg.ts_ms == counter.get("ts")
    assert msg.replay_seq == counter.get("seq", counter.get("ts"))
    assert dict(msg.readings) == {"temp_c": 21.5, "door": "open"}


def test_mac_is_over_raw_bytes_not_reserialized_json() -> None:
    raw = b'{ "readings" : {"t": 1.50},\n  "seq": 3, "device_id": "' + str(DEV).encode() + b'" }'
    msg = valarm.verify(raw, valarm.sign(raw, KEY, "sha256"), key_for, now_ms=NOW)
    assert msg.seq == 3
    # The same JSON value, written differently, does not carry the signature over.
    other = json.dumps(json.loads(raw)).encode()
    with pytest.raises(Rejected) as exc:
        valarm.verify(other, valarm.sign(raw, KEY, "sha256"), key_for, now_ms=NOW)
    assert reason(exc) is RejectReason.BAD_MAC


@pytest.mark.parametrize("alg", ["md5", "sha256"])
def test_wrong_key(alg: str) -> None:
    raw = body(seq=1)
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, b"B1b2C3d4E5f6G7h8I9j0", alg), key_for, now_ms=NOW)
    assert reason(exc) is RejectReason.BAD_MAC


@pytest.mark.parametrize("alg", ["md5", "sha256"])
def test_every_altered_byte_is_refused(alg: str) -> None:
    raw = body(seq=42, ts=NOW)
    header = valarm.sign(raw, KEY, alg)
    reasons: Counter[RejectReason] = Counter()
    for i in range(len(raw)):
        for flip in (0x01, 0x20):
            altered = bytearray(raw)
            altered[i] ^= flip
            with pytest.raises(Rejected) as exc:
                valarm.verify(bytes(altered), header, key_for, now_ms=NOW)
            reasons[reason(exc)] += 1
    # Nothing is accepted; each alteration is refused as unparseable, unknown or unauthentic.
    assert set(reasons) <= {RejectReason.MALFORMED, RejectReason.BAD_MAC,
                            RejectReason.UNKNOWN_DEVICE}
    assert reasons[RejectReason.BAD_MAC] > 0


@pytest.mark.parametrize("alg", ["md5", "sha256"])
def test_every_altered_signature_digit_is_refused(alg: str) -> None:
    raw = body(seq=1)
    header = valarm.sign(raw, KEY, alg)
    name, _, digits = header.partition("=")
    for i in range(len(digits)):
        swapped = digits[:i] + ("0" if digits[i] != "0" else "1") + digits[i + 1:]
        with pytest.raises(Rejected) as exc:
            valarm.verify(raw, f"{name}={swapped}", key_for, now_ms=NOW)
        assert reason(exc) is RejectReason.BAD_MAC


def test_missing_counter_and_timestamp() -> None:
    raw = json.dumps({"device_id": str(DEV), "readings": {}}).encode()
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW)
    assert reason(exc) is RejectReason.MALFORMED
    assert "seq" in exc.value.detail


@pytest.mark.parametrize("ts", [NOW - 61_000, NOW + 61_000])
def test_stale_timestamp(ts: int) -> None:
    raw = body(ts=ts)
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW, max_skew_s=60)
    assert reason(exc) is RejectReason.STALE
    # Without a skew limit the same message is accepted (the policy decides).
    assert valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW).ts_ms == ts


def test_stale_is_only_decided_after_the_mac() -> None:
    raw = body(ts=0)
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, b"wrong"), key_for, now_ms=NOW, max_skew_s=60)
    assert reason(exc) is RejectReason.BAD_MAC


def test_unknown_device() -> None:
    raw = body(seq=1, device_id=str(OTHER))
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW)
    assert reason(exc) is RejectReason.UNKNOWN_DEVICE


def test_key_lookup_may_refuse_itself() -> None:
    def revoked(_: DeviceId) -> bytes | None:
        raise Rejected(RejectReason.REVOKED, "device revoked")

    raw = body(seq=1)
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, KEY), revoked, now_ms=NOW)
    assert reason(exc) is RejectReason.REVOKED


@pytest.mark.parametrize(("header", "why"), [
    ("", RejectReason.MALFORMED),
    ("sha256", RejectReason.MALFORMED),
    ("sha1=" + "00" * 20, RejectReason.UNSUPPORTED),
    ("sha256=" + "00" * 31, RejectReason.MALFORMED),
    ("md5=" + "zz" * 16, RejectReason.MALFORMED),
    ("md5=" + "00" * 200, RejectReason.MALFORMED),
])
def test_bad_signature_headers(header: str, why: RejectReason) -> None:
    with pytest.raises(Rejected) as exc:
        valarm.verify(body(seq=1), header, key_for, now_ms=NOW)
    assert reason(exc) is why


@pytest.mark.parametrize("raw", [
    b"", b"[]", b"not json", b'{"device_id": "xyz", "seq": 1, "readings": {}}',
    b'{"device_id": 5, "seq": 1, "readings": {}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": -1, "readings": {}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": true, "readings": {}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1.5, "readings": {}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1, "readings": []}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1, "readings": {"a": {"b": 1}}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1, "readings": {}, "extra": 1}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1, "seq": 2, "readings": {}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1, "readings": {"a": NaN}}',
    b'{"device_id": "5f1a2b3c4d5e6f7081928374", "seq": 1, "readings": {"a": 1}}\xff',
    b"[" * 100_00 + b"]" * 100_00,
])
def test_malformed_bodies(raw: bytes) -> None:
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW, max_size=64 * 1024)
    assert reason(exc) is RejectReason.MALFORMED


def test_oversize_body() -> None:
    raw = body(seq=1, readings={f"r{i}": i for i in range(2000)})
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW)
    assert reason(exc) is RejectReason.OVERSIZE


def test_generate_api_key_is_alphanumeric_and_uses_randomness() -> None:
    keys = {valarm.generate_api_key(os.urandom) for _ in range(200)}
    assert len(keys) == 200
    for k in keys:
        assert len(k) == valarm.API_KEY_LEN
        assert k.isascii() and k.isalnum()


def test_generate_api_key_rejects_biased_bytes() -> None:
    # Bytes 248-255 would bias the first 8 characters if taken modulo 62; they must be skipped.
    stream = iter([bytes([255] * 20 + list(range(20))), bytes(range(40))])
    key = valarm.generate_api_key(lambda n: next(stream)[:n])
    assert key == valarm.API_KEY_ALPHABET[:20]


def test_generate_api_key_is_uniform() -> None:
    counts: Counter[str] = Counter()
    for _ in range(300):
        counts.update(valarm.generate_api_key(os.urandom))
    assert set(counts) == set(valarm.API_KEY_ALPHABET)
    expected = 300 * 20 / 62
    # Chi-square with 61 degrees of freedom; 120 is far beyond p = 0.0001 (~ 106).
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 120


def test_generate_api_key_broken_randomness() -> None:
    with pytest.raises(ConfigError):
        valarm.generate_api_key(lambda n: b"\xff" * n)
    with pytest.raises(ConfigError):
        valarm.generate_api_key(lambda n: b"\x00")


def test_no_key_material_in_refusal_texts() -> None:
    raw = body(seq=1)
    with pytest.raises(Rejected) as exc:
        valarm.verify(raw, valarm.sign(raw, b"other-key"), key_for, now_ms=NOW)
    assert KEY.decode() not in str(exc.value)
    assert valarm.compute_mac("sha256", KEY, raw).hex() not in str(exc.value)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=400), header=st.text(max_size=80))
def test_fuzz_verify_only_returns_or_rejects(raw: bytes, header: str) -> None:
    with contextlib.suppress(Rejected):
        valarm.verify(raw, header, key_for, now_ms=NOW, max_skew_s=60)


@settings(max_examples=300, deadline=None)
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=10))
def test_fuzz_json_shapes_signed_with_the_right_key(doc: object) -> None:
    raw = json.dumps({"device_id": str(DEV), "seq": 1, "readings": doc}).encode()
    try:
        msg = valarm.verify(raw, valarm.sign(raw, KEY), key_for, now_ms=NOW)
    except Rejected as exc:
        assert exc.reason is RejectReason.MALFORMED
    else:
        assert isinstance(doc, dict) and dict(msg.readings) == doc
