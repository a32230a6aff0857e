"""Manifest signing and verification: every refusal reason, both vendor algorithms, both COSE
forms (Sign1 for the vendor alone, COSE_Sign for vendor + operator)."""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from updates_support import DEVICE_CLASS, HOUR, NOW, Key, build_manifest, make_key

from sensorseal.core.attest import ALG_EDDSA, ALG_ES256, sign1, verify_sign1
from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import seal, unseal
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.updates.manifest import (
    EXTERNAL_AAD,
    IMAGE_KEY_ROUTE,
    ImageEncryption,
    TrustAnchors,
    UpdateReason,
    UpdateRejected,
    approve_manifest,
    decode_image_key,
    encode_image_key,
    encode_manifest,
    encrypt_image,
    sign_manifest,
    verify_manifest,
)

IMAGE = b"firmware image v2 " * 100


def _mutable(data: bytes) -> Any:
    """The COSE structure as nested lists (cbor2 decodes a tagged array as a tuple)."""
    item = cbor2.loads(data)
    value = [list(x) if isinstance(x, tuple | list) else x for x in item.value]
    if item.tag == 98:
        value[3] = [list(s) for s in value[3]]
    return cbor2.CBORTag(item.tag, value)


def verify(data: bytes, trust: TrustAnchors, **kw: Any) -> Any:
    args: dict[str, Any] = {"device_class": DEVICE_CLASS, "installed_version": 1,
                            "last_manifest_seq": 4, "now_ms": NOW, "require_operator": False}
    args.update(kw)
    return verify_manifest(data, trust, **args)


def reason_of(data: bytes, trust: TrustAnchors, **kw: Any) -> UpdateReason:
    with pytest.raises(UpdateRejected) as info:
        verify(data, trust, **kw)
    return info.value.reason


def signed(vendor: Key, **kw: Any) -> bytes:
    return sign_manifest(build_manifest(IMAGE, **kw), vendor.signer, vendor.kid, vendor.alg)


def test_sign1_round_trip(vendor: Key, trust: TrustAnchors) -> None:
    data = signed(vendor)
    assert cbor2.loads(data).tag == 18
    m = verify(data, trust)
    assert (m.sequence, m.image_version, m.size, m.device_class) == (5, 2, len(IMAGE), DEVICE_CLASS)
    assert m.digest == hashlib.sha256(IMAGE).digest()
    assert m.signers == (vendor.kid,) and not m.approved
    assert m.manifest_id == hashlib.sha256(data).digest()
    # It is a standard COSE_Sign1: core.attest verifies it with the documented external AAD.
    assert verify_sign1(data, vendor.public, external_aad=EXTERNAL_AAD) \
        == encode_manifest(build_manifest(IMAGE))


def test_approved_cose_sign_round_trip(vendor: Key, operator: Key, trust: TrustAnchors) -> None:
    pending = sign_manifest(build_manifest(IMAGE), vendor.signer, vendor.kid, vendor.alg,
                            for_approval=True)
    data = approve_manifest(pending, operator.signer, operator.kid, operator.alg, trust=trust)
    assert cbor2.loads(data).tag == 98
    assert len(cbor2.loads(data).value[3]) == 2
    m = verify(data, trust, require_operator=True)
    assert m.approved and m.signers == (vendor.kid, operator.kid)
    # Before approval the same manifest is fine where no approval is required...
    assert verify(pending, trust).approved is False
    # ...and refused where it is.
    assert reason_of(pending, trust, require_operator=True) is UpdateReason.MISSING_APPROVAL


def test_missing_operator_approval_for_sign1(vendor: Key, trust: TrustAnchors) -> None:
    assert reason_of(signed(vendor), trust, require_operator=True) \
        is UpdateReason.MISSING_APPROVAL


def test_approval_by_an_untrusted_operator_is_missing_approval(vendor: Key,
                                                                trust: TrustAnchors) -> None:
    rogue = make_key(ALG_ES256, b"operator-rogue")
    pending = sign_manifest(build_manifest(IMAGE), vendor.signer, vendor.kid, vendor.alg,
                            for_approval=True)
    data = approve_manifest(pending, rogue.signer, rogue.kid, rogue.alg, trust=trust)
    assert reason_of(data, trust, require_operator=True) is UpdateReason.MISSING_APPROVAL


def test_operator_cannot_approve_what_the_vendor_did_not_sign(vendor: Key, operator: Key,
                                                              trust: TrustAnchors) -> None:
    forger = make_key(vendor.alg, vendor.kid)  # claims the vendor's kid, holds another key
    pending = sign_manifest(build_manifest(IMAGE), forger.signer, forger.kid, forger.alg,
                            for_approval=True)
    with pytest.raises(UpdateRejected) as info:
        approve_manifest(pending, operator.signer, operator.kid, operator.alg, trust=trust)
    assert info.value.reason is UpdateReason.BAD_SIGNATURE
    with pytest.raises(ConfigError):  # a Sign1 cannot take a second signature
        approve_manifest(signed(vendor), operator.signer, operator.kid, operator.alg, trust=trust)


def test_operator_signature_alone_is_not_a_vendor_signature(operator: Key,
                                                            trust: TrustAnchors) -> None:
    data = sign_manifest(build_manifest(IMAGE), operator.signer, operator.kid, operator.alg)
    assert reason_of(data, trust) is UpdateReason.BAD_SIGNATURE


def test_wrong_signature(vendor: Key, trust: TrustAnchors) -> None:
    item = _mutable(signed(vendor))
    sig = bytearray(item.value[3])
    sig[10] ^= 0x01
    item.value[3] = bytes(sig)
    assert reason_of(cbor2.dumps(item), trust) is UpdateReason.BAD_SIGNATURE


def test_tampered_payload_fails_the_signature(vendor: Key, trust: TrustAnchors) -> None:
    item = _mutable(signed(vendor))
    body = cbor2.loads(item.value[2])
    body[4] = 99  # a higher image version
    item.value[2] = cbor2.dumps(body, canonical=True)
    assert reason_of(cbor2.dumps(item), trust) is UpdateReason.BAD_SIGNATURE


def test_tampered_operator_signature_rejects(vendor: Key, operator: Key,
                                             trust: TrustAnchors) -> None:
    pending = sign_manifest(build_manifest(IMAGE), vendor.signer, vendor.kid, vendor.alg,
                            for_approval=True)
    item = _mutable(approve_manifest(pending, operator.signer, operator.kid, operator.alg,
                                     trust=trust))
    sig = bytearray(item.value[3][1][2])
    sig[0] ^= 0x80
    item.value[3][1][2] = bytes(sig)
    assert reason_of(cbor2.dumps(item), trust) is UpdateReason.BAD_SIGNATURE


def test_untrusted_key(vendor: Key, trust: TrustAnchors) -> None:
    stranger = make_key(vendor.alg, b"someone-else")
    assert reason_of(signed(stranger), trust) is UpdateReason.BAD_SIGNATURE
    impostor = make_key(vendor.alg, vendor.kid)  # right kid, wrong key
    assert reason_of(signed(impostor), trust) is UpdateReason.BAD_SIGNATURE


def test_algorithm_comes_from_the_key(trust: TrustAnchors, vendor: Key) -> None:
    other = ALG_ES256 if vendor.alg == ALG_EDDSA else ALG_EDDSA
    wrong_alg = make_key(other, vendor.kid)
    assert reason_of(signed(wrong_alg), trust) is UpdateReason.BAD_SIGNATURE


def test_signature_without_the_manifest_domain_is_refused(vendor: Key,
                                                          trust: TrustAnchors) -> None:
    payload = encode_manifest(build_manifest(IMAGE))
    other_use = sign1(payload, vendor.signer, vendor.kid, vendor.alg)  # no external AAD
    assert reason_of(other_use, trust) is UpdateReason.BAD_SIGNATURE


def test_wrong_device_class(vendor: Key, trust: TrustAnchors) -> None:
    assert reason_of(signed(vendor, device_class="pump-v1"), trust) \
        is UpdateReason.WRONG_DEVICE_CLASS


@pytest.mark.parametrize("version", [0, 1], ids=["older", "equal"])
def test_rollback(vendor: Key, trust: TrustAnchors, version: int) -> None:
    exc_reason = reason_of(signed(vendor, version=version), trust, installed_version=1)
    assert exc_reason is UpdateReason.ROLLBACK


@pytest.mark.parametrize("seq", [3, 4], ids=["older", "same"])
def test_replayed_manifest(vendor: Key, trust: TrustAnchors, seq: int) -> None:
    assert reason_of(signed(vendor, seq=seq, version=7), trust, last_manifest_seq=4) \
        is UpdateReason.REPLAYED_MANIFEST


def test_expired(vendor: Key, trust: TrustAnchors) -> None:
    data = signed(vendor, created_ms=NOW - 2 * HOUR, expires_ms=NOW - 1)
    assert reason_of(data, trust) is UpdateReason.EXPIRED
    assert reason_of(signed(vendor, expires_ms=NOW), trust) is UpdateReason.EXPIRED
    assert verify(signed(vendor, expires_ms=NOW + 1), trust).expires_ms == NOW + 1


def _resign(vendor: Key, body: Any, canonical: bool = True) -> bytes:
    return sign1(cbor2.dumps(body, canonical=canonical), vendor.signer, vendor.kid, vendor.alg,
                 external_aad=EXTERNAL_AAD)


def test_malformed_but_signed_payloads(vendor: Key, trust: TrustAnchors) -> None:
    good = cbor2.loads(encode_manifest(build_manifest(IMAGE)))
    unknown = {**good, 11: "surprise"}
    missing = {k: v for k, v in good.items() if k != 6}
    future = {**good, 1: 2}
    bad_digest = {**good, 5: [-44, b"\x00" * 64]}
    negative = {**good, 6: -1}
    for body in (unknown, missing, future, bad_digest, negative, [1, 2, 3], "text"):
        assert reason_of(_resign(vendor, body), trust) is UpdateReason.MALFORMED, body
    # The same fields in a non-canonical order: one encoding only.
    reordered = cbor2.dumps(dict(reversed(list(good.items()))))
    assert reordered != encode_manifest(build_manifest(IMAGE))
    data = sign1(reordered, vendor.signer, vendor.kid, vendor.alg, external_aad=EXTERNAL_AAD)
    assert reason_of(data, trust) is UpdateReason.MALFORMED


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xd2\x80", cbor2.dumps(cbor2.CBORTag(98, [])),
                                  cbor2.dumps(cbor2.CBORTag(16, [b"", {}, b""])),
                                  b"\xd2" + b"\xff" * 40, b"x" * 20_000])
def test_garbage_is_malformed(data: bytes, trust: TrustAnchors) -> None:
    assert reason_of(data, trust) is UpdateReason.MALFORMED


def test_texts_carry_no_key_material(vendor: Key, trust: TrustAnchors) -> None:
    stranger = make_key(vendor.alg, b"someone-else")
    data = signed(stranger)
    with pytest.raises(UpdateRejected) as info:
        verify(data, trust)
    text = str(info.value) + repr(info.value)
    sig = cbor2.loads(data).value[3]
    assert sig.hex() not in text and "someone-else" not in text


def test_local_misuse_is_config_error(vendor: Key) -> None:
    with pytest.raises(ConfigError):
        build_manifest(IMAGE, created_ms=NOW, expires_ms=NOW)
    with pytest.raises(ConfigError):
        build_manifest(IMAGE, kind="bootloader")
    with pytest.raises(ConfigError):
        TrustAnchors(vendor={})
    with pytest.raises(ConfigError):
        TrustAnchors(vendor={b"k": vendor.public}, operator={b"k": vendor.public})
    with pytest.raises(ConfigError):
        sign_manifest(build_manifest(IMAGE), lambda tbs: b"\x30" + b"\x00" * 70, vendor.kid,
                      vendor.alg, for_approval=True)


def test_image_key_travels_in_a_downlink_envelope(vendor: Key, trust: TrustAnchors) -> None:
    """The CEK reaches one device sealed under its E3 downlink key (core.envelope)."""
    cek, iv = AESGCM.generate_key(bit_length=256), bytes(range(12))
    wire = encrypt_image(IMAGE, cek, iv)
    manifest = build_manifest(wire, encryption=ImageEncryption(iv))
    data = sign_manifest(manifest, vendor.signer, vendor.kid, vendor.alg)
    m = verify(data, trust)
    assert m.encryption == ImageEncryption(iv) and m.plain_size == len(IMAGE)

    device = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f601020304"))
    root = bytes(range(32))
    sealed = seal(encode_image_key(m.sequence, cek),
                  keys=derive(root, device, 1, Direction.DOWN), seq=1, route=IMAGE_KEY_ROUTE,
                  timestamp_ms=NOW)
    ctx = SecurityContext.from_secret(root, device, 1, Direction.DOWN)
    opened = unseal(sealed, route=IMAGE_KEY_ROUTE, contexts=lambda _d, _e: ctx, now_ms=NOW)
    assert cek not in sealed
    got = decode_image_key(opened.payload, m)
    assert AESGCM(got).decrypt(iv, wire, None) == IMAGE
    other = build_manifest(wire, seq=6, encryption=ImageEncryption(iv))
    with pytest.raises(UpdateRejected) as info:
        decode_image_key(opened.payload, other)
    assert info.value.reason is UpdateReason.MALFORMED
