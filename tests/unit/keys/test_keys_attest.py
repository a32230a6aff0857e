"""Level "attested": COSE_Sign1 round trips, tampering, archive verification, COSE WG vectors.

Known answers from the COSE WG examples (shared/test-vectors/cose-wg-examples, public domain):
sign1-tests/sign-pass-*, sign-fail-*; ecdsa-examples/ecdsa-sig-01 (ES256);
eddsa-examples/eddsa-sig-01 (Ed25519, RFC 8032 section 7.1 TEST 1 key), whose deterministic
signature we also reproduce byte for byte.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sensorseal.core.attest import (
    ALG_EDDSA,
    ALG_ES256,
    der_to_raw,
    parse_sign1,
    raw_to_der,
    sign1,
    software_signer,
    verify_archive,
    verify_sign1,
)
from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import seal, unseal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive

DEV = bytes.fromhex("65f0a1b2c3d4e5f601020304")
PAYLOAD = b'{"temp":21.5,"ts":1718000000}'


def _keys(alg: int) -> tuple[Any, Any]:
    if alg == ALG_EDDSA:
        k: Any = ed25519.Ed25519PrivateKey.generate()
    else:
        k = ec.generate_private_key(ec.SECP256R1())
    return k, k.public_key()


@pytest.mark.parametrize("alg", [ALG_EDDSA, ALG_ES256])
def test_round_trip(alg: int) -> None:
    priv, pub = _keys(alg)
    data = sign1(PAYLOAD, software_signer(priv), DEV, alg)
    assert verify_sign1(data, pub) == PAYLOAD
    msg = parse_sign1(data)
    assert (msg.alg, msg.kid, len(msg.signature)) == (alg, DEV, 64)
    assert cbor2.loads(data).tag == 18


@pytest.mark.parametrize("alg", [ALG_EDDSA, ALG_ES256])
def test_every_bit_flip_rejected(alg: int) -> None:
    priv, pub = _keys(alg)
    data = sign1(PAYLOAD, software_signer(priv), DEV, alg)
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(Rejected) as info:
                verify_sign1(bytes(bad), pub)
            assert info.value.reason in (RejectReason.BAD_SIGNATURE, RejectReason.MALFORMED)


@pytest.mark.parametrize("alg", [ALG_EDDSA, ALG_ES256])
def test_other_key_and_alg_confusion_rejected(alg: int) -> None:
    priv, _ = _keys(alg)
    _, other = _keys(alg)
    data = sign1(PAYLOAD, software_signer(priv), DEV, alg)
    with pytest.raises(Rejected) as info:
        verify_sign1(data, other)
    assert info.value.reason is RejectReason.BAD_SIGNATURE
    _, wrong_type = _keys(ALG_ES256 if alg == ALG_EDDSA else ALG_EDDSA)
    with pytest.raises(Rejected) as info:
        verify_sign1(data, wrong_type)
    assert info.value.reason is RejectReason.BAD_SIGNATURE


def test_external_aad_is_bound() -> None:
    priv, pub = _keys(ALG_EDDSA)
    data = sign1(PAYLOAD, software_signer(priv), DEV, ALG_EDDSA, external_aad=b"route")
    assert verify_sign1(data, pub, external_aad=b"route") == PAYLOAD
    with pytest.raises(Rejected):
        verify_sign1(data, pub)


def test_es256_signature_is_raw_not_der() -> None:
    priv, pub = _keys(ALG_ES256)
    data = sign1(PAYLOAD, software_signer(priv), DEV, ALG_ES256)
    sig = parse_sign1(data).signature
    assert len(sig) == 64
    der = raw_to_der(sig)
    assert der[0] == 0x30 and der_to_raw(der) == sig
    tbs = cbor2.dumps(["Signature1", parse_sign1(data).protected, b"", PAYLOAD])
    pub.verify(der, tbs, ec.ECDSA(hashes.SHA256()))  # an independent check of the conversion


def test_der_signer_is_refused() -> None:
    priv, _ = _keys(ALG_ES256)
    with pytest.raises(ConfigError):
        sign1(PAYLOAD, lambda tbs: priv.sign(tbs, ec.ECDSA(hashes.SHA256())) + b"\0" * 10, DEV,
              ALG_ES256)
    with pytest.raises(ConfigError):
        sign1(PAYLOAD, software_signer(priv), DEV, -35)  # ES384 is not offered
    with pytest.raises(ConfigError):
        software_signer(ec.generate_private_key(ec.SECP384R1()))


def test_attested_inside_sealed_envelope() -> None:
    """The Sign1 bytes are the plaintext of the sealed envelope; the archive keeps them."""
    priv, pub = _keys(ALG_ES256)
    root = bytes(range(32))
    dev = DeviceId(DEV)
    signed = sign1(PAYLOAD, software_signer(priv), DEV, ALG_ES256)
    wire = seal(signed, keys=derive(root, dev, 1, Direction.UP), seq=9, route="d/up",
                timestamp_ms=None)
    assert PAYLOAD not in wire
    opened = unseal(wire, route="d/up", now_ms=0,
                    contexts=lambda d, e: SecurityContext.from_secret(root, d, e, Direction.UP))
    assert verify_sign1(opened.payload, pub) == PAYLOAD
    assert verify_archive([opened.payload], {DEV: pub})[0].ok


def test_verify_archive() -> None:
    old_priv, old_pub = _keys(ALG_ES256)
    new_priv, new_pub = _keys(ALG_EDDSA)
    other = bytes.fromhex("65f0a1b2c3d4e5f6aabbccdd")
    good_old = sign1(b"r1", software_signer(old_priv), DEV, ALG_ES256)
    good_new = sign1(b"r2", software_signer(new_priv), DEV, ALG_EDDSA)
    forged = bytearray(sign1(b"r3", software_signer(new_priv), DEV, ALG_EDDSA))
    forged[-1] ^= 1
    stranger = sign1(b"r4", software_signer(new_priv), other, ALG_EDDSA)
    results = verify_archive([good_old, good_new, bytes(forged), stranger, b"\x00"],
                             {DEV: [old_pub, new_pub]})
    assert [r.ok for r in results] == [True, True, False, False, False]
    assert [r.payload for r in results[:2]] == [b"r1", b"r2"]
    assert [r.reason for r in results[2:]] == [RejectReason.BAD_SIGNATURE,
                                              RejectReason.UNKNOWN_DEVICE, RejectReason.MALFORMED]
    # A single key (not a list) works too, and the wrong one fails.
    assert verify_archive([good_new], {DEV: new_pub})[0].ok
    assert not verify_archive([good_new], {DEV: old_pub})[0].ok


# --- COSE WG examples -----------------------------------------------------------------------

COSE_WG = Path(__file__).resolve().parents[4] / "shared" / "test-vectors" / "cose-wg-examples"
if not COSE_WG.is_dir():  # CI checks out main with shared/ beside it; a work tree may sit elsewhere
    COSE_WG = Path("/work/shared/test-vectors/cose-wg-examples")


def _b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _vector(rel: str) -> dict[str, Any]:
    path = COSE_WG / rel
    if not path.is_file():
        pytest.skip(f"COSE WG examples not found at {COSE_WG}")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _public_key(jwk: dict[str, str]) -> Any:
    if jwk["kty"] == "OKP":
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(jwk["x_hex"]))
    nums = ec.EllipticCurvePublicNumbers(int.from_bytes(_b64(jwk["x"]), "big"),
                                         int.from_bytes(_b64(jwk["y"]), "big"), ec.SECP256R1())
    return nums.public_key()


@pytest.mark.parametrize("rel", [
    "sign1-tests/sign-pass-01.json", "sign1-tests/sign-pass-02.json",
    "sign1-tests/sign-pass-03.json", "ecdsa-examples/ecdsa-sig-01.json",
    "eddsa-examples/eddsa-sig-01.json",
])
def test_cose_wg_pass(rel: str) -> None:
    v = _vector(rel)
    data = bytes.fromhex(v["output"]["cbor"])
    key = _public_key(v["input"]["sign0"]["key"])
    aad = bytes.fromhex(v["input"]["sign0"].get("external", ""))
    assert verify_sign1(data, key, external_aad=aad) == v["input"]["plaintext"].encode()
    tbs = cbor2.dumps(["Signature1", parse_sign1(data).signed_protected, aad,
                       v["input"]["plaintext"].encode()])
    assert tbs == bytes.fromhex(v["intermediates"]["ToBeSign_hex"])


@pytest.mark.parametrize("rel", [
    "sign1-tests/sign-fail-01.json", "sign1-tests/sign-fail-02.json",
    "sign1-tests/sign-fail-03.json", "sign1-tests/sign-fail-04.json",
    "sign1-tests/sign-fail-06.json", "sign1-tests/sign-fail-07.json",
])
def test_cose_wg_fail(rel: str) -> None:
    v = _vector(rel)
    key = _public_key(v["input"]["sign0"]["key"])
    with pytest.raises(Rejected) as info:
        verify_sign1(bytes.fromhex(v["output"]["cbor"]), key)
    assert info.value.reason in (RejectReason.BAD_SIGNATURE, RejectReason.MALFORMED)


def test_cose_wg_eddsa_reproduced_byte_for_byte() -> None:
    """Ed25519 is deterministic (RFC 8032): our sign1 must rebuild eddsa-sig-01 exactly."""
    v = _vector("eddsa-examples/eddsa-sig-01.json")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(v["input"]["sign0"]["key"]["d_hex"]))
    out = sign1(v["input"]["plaintext"].encode(), software_signer(key), None, ALG_EDDSA,
                extra_protected={3: 0}, unprotected={4: b"11"})
    assert out == bytes.fromhex(v["output"]["cbor"])


def test_cose_wg_es256_resigned_verifies() -> None:
    """ECDSA is randomized, so sign-pass-02's message is re-signed with its private key and
    checked against the vector's ToBeSign bytes and by `cryptography` directly."""
    v = _vector("sign1-tests/sign-pass-02.json")
    jwk = v["input"]["sign0"]["key"]
    priv = ec.derive_private_key(int.from_bytes(_b64(jwk["d"]), "big"), ec.SECP256R1())
    aad = bytes.fromhex(v["input"]["sign0"]["external"])
    out = sign1(v["input"]["plaintext"].encode(), software_signer(priv), None, ALG_ES256,
                external_aad=aad, unprotected={4: b"11"})
    assert cbor2.dumps(["Signature1", parse_sign1(out).protected, aad,
                        v["input"]["plaintext"].encode()]) == bytes.fromhex(
        v["intermediates"]["ToBeSign_hex"])
    assert verify_sign1(out, _public_key(jwk), external_aad=aad) == b"This is the content."
