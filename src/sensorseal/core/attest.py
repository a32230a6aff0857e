"""Level "attested": a device signature (COSE_Sign1, RFC 9052 section 4.2) that anyone can check.

The device signs the reading with its own private key and then seals the Sign1 bytes as the
plaintext of the usual envelope: the envelope keeps the reading confidential and fresh, the
signature inside lets a third party check, years later and with only the device's public key,
that the device produced it (non-repudiation; a MAC cannot do that because the cloud holds the
same key).

Wire format::

    signed = #6.18([ protected: bstr .cbor { 1: alg, ? 4: kid }, unprotected: {},
                     payload: bstr, signature: bstr ])
    Sig_structure = ["Signature1", protected, external_aad, payload]
    alg  -8  EdDSA (Ed25519), signature 64 bytes
    alg  -7  ES256 (ECDSA P-256 + SHA-256), signature r||s, 32 bytes each (RFC 9053 section 2.1),
             *not* the DER form that `cryptography` and many HSM APIs produce: we convert.

Signing goes through a `Signer`, a callable from the bytes to be signed to the COSE signature,
so a key inside a PKCS#11 token or a secure element signs exactly like a software key
(`software_signer` wraps a `cryptography` key; `sensorseal.keystore.pkcs11` wraps a token key).

Verification is strict where it matters and liberal where COSE allows: the algorithm comes from
the *key* (an Ed25519 key verifies only alg -8, a P-256 key only -7), and the message must say the
same, in the protected header (or, for messages that carry no protected alg, the unprotected one,
as the COSE WG example sign-pass-01 does). Untagged Sign1 is accepted (RFC 9052 section 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from sensorseal.core.errors import ConfigError, Rejected, RejectReason

__all__ = [
    "ALG_EDDSA",
    "ALG_ES256",
    "ArchiveResult",
    "PublicKey",
    "Signed1",
    "Signer",
    "der_to_raw",
    "parse_sign1",
    "raw_to_der",
    "sign1",
    "software_signer",
    "verify_archive",
    "verify_sign1",
]

ALG_EDDSA = -8
ALG_ES256 = -7
HDR_ALG, HDR_KID = 1, 4
TAG_SIGN1 = 18
MAX_SIGN1_SIZE = 64 * 1024
_P256_LEN = 32

Signer = Callable[[bytes], bytes]
"""Signs the Sig_structure bytes; returns the COSE signature (raw r||s for ES256)."""

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

_CONTEXT = "Signature1"


def der_to_raw(der: bytes) -> bytes:
    """DER ECDSA-Sig-Value (SEQUENCE {r, s}) -> r||s, each left-padded to 32 bytes (P-256)."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(_P256_LEN, "big") + s.to_bytes(_P256_LEN, "big")


def raw_to_der(raw: bytes) -> bytes:
    """r||s (64 bytes) -> DER, for `cryptography`'s verify()."""
    if len(raw) != 2 * _P256_LEN:
        raise ValueError("an ES256 signature is 64 bytes")
    return encode_dss_signature(int.from_bytes(raw[:_P256_LEN], "big"),
                                int.from_bytes(raw[_P256_LEN:], "big"))


def _alg_of(key: PublicKey) -> int:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ES256
    raise ConfigError("attestation keys are Ed25519 or EC P-256")


def software_signer(private_key: PrivateKey) -> Signer:
    """A Signer over a `cryptography` private key (Ed25519, or P-256 for ES256)."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign
    if isinstance(private_key, ec.EllipticCurvePrivateKey) \
            and isinstance(private_key.curve, ec.SECP256R1):
        key = private_key

        def sign_es256(tbs: bytes) -> bytes:
            return der_to_raw(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        return sign_es256
    raise ConfigError("attestation keys are Ed25519 or EC P-256")


def _sig_structure(protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    return cbor2.dumps([_CONTEXT, protected, external_aad, payload])


def sign1(payload: bytes, signer: Signer, kid: bytes | None, alg: int, *,
          external_aad: bytes = b"", extra_protected: Mapping[int, Any] | None = None,
          unprotected: Mapping[int, Any] | None = None) -> bytes:
    """A tagged COSE_Sign1 over `payload`. `kid` (the device id) goes in the protected header,
    so the signature also binds who claims to have signed."""
    if alg not in (ALG_EDDSA, ALG_ES256):
        raise ConfigError(f"alg {alg} is not EdDSA (-8) or ES256 (-7)")
    hdr: dict[int, Any] = {HDR_ALG: alg}
    if kid is not None:
        hdr[HDR_KID] = bytes(kid)
    if extra_protected:
        if HDR_ALG in extra_protected or HDR_KID in extra_protected:
            raise ConfigError("alg and kid are set by their own arguments")
        hdr.update(extra_protected)
    protected = cbor2.dumps(hdr)
    signature = signer(_sig_structure(protected, external_aad, payload))
    if len(signature) != 64:
        raise ConfigError("the signer returned a signature of the wrong size (DER?)")
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN1, [protected, dict(unprotected or {}),
                                                 bytes(payload), signature]))


@dataclass(frozen=True, slots=True)
class Signed1:
    """A parsed, not yet verified, COSE_Sign1."""

    alg: int | None
    kid: bytes | None
    protected: bytes
    payload: bytes
    signature: bytes

    @property
    def signed_protected(self) -> bytes:
        """The protected bucket as it enters the Sig_structure: an encoded empty map (h'a0')
        counts as the zero-length bstr (RFC 9052 sections 3 and 4.4; COSE WG sign-pass-01)."""
        return b"" if self.protected == b"\xa0" else self.protected


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, detail)


def _map(data: bytes) -> Mapping[Any, Any]:
    if data == b"":
        return {}  # RFC 9052 section 3: an empty protected header may be a zero-length bstr
    try:
        hdr = cbor2.loads(data, max_depth=4, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types
        raise _malformed("protected header is not CBOR") from exc
    if not isinstance(hdr, Mapping):
        raise _malformed("protected header is not a map")
    return hdr


def parse_sign1(data: bytes) -> Signed1:
    """Parse a COSE_Sign1 (tagged or not). Raises Rejected(MALFORMED)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_SIGN1_SIZE:
        raise _malformed("not bytes or too large")
    try:
        item = cbor2.loads(bytes(data), max_depth=6, allow_indefinite=False)
    except Exception as exc:
        raise _malformed("not CBOR") from exc
    if isinstance(item, cbor2.CBORTag):
        if item.tag != TAG_SIGN1:
            raise _malformed("CBOR tag is not COSE_Sign1")
        item = item.value
    if type(item) not in (list, tuple) or len(item) != 4:
        raise _malformed("not a COSE_Sign1 array")
    protected, unprotected, payload, signature = item
    if type(protected) is not bytes or type(payload) is not bytes \
            or type(signature) is not bytes or not isinstance(unprotected, Mapping):
        raise _malformed("COSE_Sign1 fields have the wrong types")
    hdr = _map(protected)
    if set(hdr) & set(unprotected):
        raise _malformed("a label is in both header buckets")  # RFC 9052 section 3
    alg = hdr.get(HDR_ALG, unprotected.get(HDR_ALG))
    kid = hdr.get(HDR_KID, unprotected.get(HDR_KID))
    if alg is not None and type(alg) is not int:
        alg = None  # a text alg is one we do not know; verify rejects it below
    return Signed1(alg if type(alg) is int else None, kid if type(kid) is bytes else None,
                   protected, payload, signature)


def verify_sign1(data: bytes, public_key: PublicKey, *, external_aad: bytes = b"") -> bytes:
    """Verify a COSE_Sign1 under `public_key`; return its payload.

    Raises Rejected(MALFORMED) for bytes that are not a Sign1, Rejected(BAD_SIGNATURE) when the
    algorithm does not match the key or the signature does not verify.
    """
    msg = parse_sign1(data)
    want = _alg_of(public_key)
    if msg.alg != want:
        raise Rejected(RejectReason.BAD_SIGNATURE, f"alg {msg.alg} does not match the key")
    tbs = _sig_structure(msg.signed_protected, external_aad, msg.payload)
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(msg.signature, tbs)
        else:
            public_key.verify(raw_to_der(msg.signature), tbs, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise Rejected(RejectReason.BAD_SIGNATURE) from None
    return msg.payload


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    """The verdict on one archived record: `reason` is None when the signature holds."""

    index: int
    kid: bytes | None
    reason: RejectReason | None
    payload: bytes | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def verify_archive(records: Iterable[bytes],
                   public_keys: Mapping[bytes, PublicKey | Sequence[PublicKey]],
                   ) -> list[ArchiveResult]:
    """Check archived Sign1 records offline, with public keys only (`sensorseal verify-archive`).

    Each record names its device in the protected `kid`; `public_keys` maps that kid to the
    device's key, or to every key it ever had (a record verifies if any of them accepts it, so a
    device whose key pair was replaced keeps its old records provable). A record without a kid,
    or with a kid that has no key, fails with UNKNOWN_DEVICE. Nothing is raised for a bad record:
    the caller gets one result per record and decides.
    """
    results: list[ArchiveResult] = []
    for index, record in enumerate(records):
        try:
            kid = parse_sign1(record).kid
        except Rejected as exc:
            results.append(ArchiveResult(index, None, exc.reason, None))
            continue
        keys = public_keys.get(kid) if kid is not None else None
        if keys is None:
            results.append(ArchiveResult(index, kid, RejectReason.UNKNOWN_DEVICE, None))
            continue
        candidates = [keys] if isinstance(keys, PublicKey) else list(keys)
        reason: RejectReason | None = RejectReason.BAD_SIGNATURE
        payload = None
        for key in candidates:
            try:
                payload = verify_sign1(record, key)
            except Rejected as exc:
                reason = exc.reason
                continue
            reason = None
            break
        results.append(ArchiveResult(index, kid, reason, payload))
    return results
