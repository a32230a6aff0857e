"""Signed update manifests (after IETF SUIT, RFC 9019, and TUF's roles): build, sign, verify.

Sans-IO: bytes in, a verified `Manifest` out; no clock, file or socket. The device updater and the
server's rollout code both build on it.

Wire format (one encoding only: the payload must be canonical CBOR, RFC 8949 section 4.2.1)::

    manifest = {  1: format version (1)          2: manifest sequence number (uint, monotonic)
                  3: device class (tstr)          4: image version (uint, monotonic)
                  5: [ -16 (SHA-256), bstr 32 ]   6: image size in bytes as transferred
                  7: kind ("firmware"|"config")   8: created (ms since the epoch)
                  9: expires (ms since the epoch)
                 ?10: { 1: 3 (A256GCM), 5: IV (bstr 12) }   image encryption }

    signed by the vendor alone:     COSE_Sign1  #6.18 (RFC 9052 section 4.2, via core.attest)
    vendor + operator approval:     COSE_Sign   #6.98 [ h'', {}, payload,
                                        [ [ sig_protected {1: alg, 4: kid}, {}, sig ]+ ] ]
    external_aad = "sensorseal/update-manifest/1"  (domain separation: a vendor key that also
                   signed anything else can never have that signature read as a manifest)

Digest and size describe the bytes *as transferred*: the ciphertext followed by its 16-byte GCM
tag when the image is encrypted, so a device checks what it downloads before it decrypts a byte.

Roles are told apart by key id: `TrustAnchors` maps each vendor kid and each operator kid to a
public key (Ed25519 -> alg -8, P-256 -> ES256 -7; the key decides the algorithm). A kid may belong
to one role only.

`verify_manifest` checks, in this order: structure -> signatures (vendor, then operator approval if
required) -> content -> format version -> device class -> manifest sequence (anti-replay) ->
expiry -> image version (anti-rollback). It raises `UpdateRejected(reason)`; texts carry ids,
counters and sizes only, never key material.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sensorseal.core.attest import (
    ALG_EDDSA,
    ALG_ES256,
    PublicKey,
    Signer,
    parse_sign1,
    raw_to_der,
    sign1,
    verify_sign1,
)
from sensorseal.core.errors import ConfigError, Rejected, SensorsealError

__all__ = [
    "EXTERNAL_AAD",
    "FORMAT_VERSION",
    "IMAGE_KEY_ROUTE",
    "ImageEncryption",
    "Manifest",
    "TrustAnchors",
    "UpdateReason",
    "UpdateRejected",
    "approve_manifest",
    "decode_image_key",
    "encode_image_key",
    "encode_manifest",
    "encrypt_image",
    "manifest_ref",
    "sign_manifest",
    "verify_manifest",
]

FORMAT_VERSION = 1
EXTERNAL_AAD = b"sensorseal/update-manifest/1"
IMAGE_KEY_ROUTE = "updates/image-key"
"""Route of the downlink envelope (sealed under the device's E3 downlink key) carrying a CEK."""

MAX_MANIFEST_SIZE = 16 * 1024
MAX_SIGNATURES = 4
COSE_ALG_SHA256 = -16  # IANA COSE Algorithms, as SUIT's suit-digest uses it
COSE_ALG_A256GCM = 3
GCM_IV_LEN, GCM_TAG_LEN, CEK_LEN = 12, 16, 32
TAG_SIGN1, TAG_SIGN = 18, 98
_HDR_ALG, _HDR_KID, _HDR_IV = 1, 4, 5
_MAX_UINT = 2**63 - 1
KINDS = frozenset({"firmware", "config"})

# Manifest map labels.
_K_FORMAT, _K_SEQ, _K_CLASS, _K_VERSION, _K_DIGEST, _K_SIZE = 1, 2, 3, 4, 5, 6
_K_KIND, _K_CREATED, _K_EXPIRES, _K_ENC = 7, 8, 9, 10
_REQUIRED = frozenset({_K_FORMAT, _K_SEQ, _K_CLASS, _K_VERSION, _K_DIGEST, _K_SIZE, _K_KIND,
                       _K_CREATED, _K_EXPIRES})
_KNOWN = _REQUIRED | {_K_ENC}


class UpdateReason(StrEnum):
    """Device-side outcomes of an update; the value is what a device reports and the server
    records. Separate from the core RejectReason: these are not envelope rejections."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"  # no trusted vendor signature, or a trusted kid's fails
    MISSING_APPROVAL = "missing_approval"  # policy requires an operator signature; none verifies
    WRONG_DEVICE_CLASS = "wrong_device_class"
    ROLLBACK = "rollback"  # image version <= installed version
    REPLAYED_MANIFEST = "replayed_manifest"  # manifest sequence <= last one seen
    EXPIRED = "expired"
    DIGEST_MISMATCH = "digest_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    HEALTH_CHECK_FAILED = "health_check_failed"
    INSTALL_FAILED = "install_failed"


class UpdateRejected(SensorsealError):
    """An update was refused or rolled back. `str()` is safe to log (no secrets)."""

    __slots__ = ("detail", "reason")

    def __init__(self, reason: UpdateReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


@dataclass(frozen=True, slots=True)
class ImageEncryption:
    """AES-256-GCM over the image; the 32-byte CEK reaches each device separately (see
    `encode_image_key`). The IV is per image: a CEK is used for one image only."""

    iv: bytes
    alg: int = COSE_ALG_A256GCM

    def __post_init__(self) -> None:
        if self.alg != COSE_ALG_A256GCM or type(self.iv) is not bytes or len(self.iv) != GCM_IV_LEN:
            raise ConfigError("image encryption is A256GCM (alg 3) with a 12-byte IV")


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the vendor vouches for. Built by the signer; returned verified by `verify_manifest`."""

    sequence: int
    device_class: str
    image_version: int
    digest: bytes  # SHA-256 of the image as transferred
    size: int  # bytes as transferred (ciphertext + tag when encrypted)
    created_ms: int
    expires_ms: int
    kind: str = "firmware"
    encryption: ImageEncryption | None = None
    format_version: int = FORMAT_VERSION
    # Filled in by verify_manifest: which kids' signatures held, and the manifest's own hash.
    signers: tuple[bytes, ...] = field(default=(), compare=False)
    approved: bool = field(default=False, compare=False)
    manifest_id: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ConfigError(f"bad manifest: {problem}")

    @property
    def plain_size(self) -> int:
        """Size of the image once decrypted (the transferred size without the GCM tag)."""
        return self.size - GCM_TAG_LEN if self.encryption else self.size


def _is_uint(v: object) -> bool:
    return type(v) is int and 0 <= v <= _MAX_UINT


def _problem(m: Manifest) -> str:
    """Why `m` is not a valid manifest, or "" if it is."""
    if m.format_version != FORMAT_VERSION:
        return f"format version {m.format_version} not supported"
    if not all(_is_uint(v) for v in (m.sequence, m.image_version, m.size, m.created_ms,
                                     m.expires_ms)):
        return "sequence, version, size and times are unsigned integers"
    if type(m.device_class) is not str or not 0 < len(m.device_class) <= 64:
        return "device class is 1-64 characters"
    if type(m.digest) is not bytes or len(m.digest) != 32:
        return "digest is 32 bytes (SHA-256)"
    if m.kind not in KINDS:
        return "kind is firmware or config"
    if m.expires_ms <= m.created_ms:
        return "expires before it was created"
    if m.encryption is not None and m.size < GCM_TAG_LEN:
        return "an encrypted image is at least its 16-byte tag"
    return ""


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """Public keys a device trusts, by role and key id (provisioned at manufacture)."""

    vendor: Mapping[bytes, PublicKey]
    operator: Mapping[bytes, PublicKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vendor:
            raise ConfigError("at least one vendor key is required")
        if set(self.vendor) & set(self.operator):
            raise ConfigError("a key id belongs to one role only")
        for key in (*self.vendor.values(), *self.operator.values()):
            _alg_of(key)


def _alg_of(key: PublicKey) -> int:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ES256
    raise ConfigError("manifest keys are Ed25519 or EC P-256")


# --- encoding and signing (vendor and operator side) ------------------------------------------

def encode_manifest(m: Manifest) -> bytes:
    """The canonical CBOR payload that gets signed."""
    body: dict[int, Any] = {
        _K_FORMAT: m.format_version, _K_SEQ: m.sequence, _K_CLASS: m.device_class,
        _K_VERSION: m.image_version, _K_DIGEST: [COSE_ALG_SHA256, m.digest], _K_SIZE: m.size,
        _K_KIND: m.kind, _K_CREATED: m.created_ms, _K_EXPIRES: m.expires_ms,
    }
    if m.encryption is not None:
        body[_K_ENC] = {_HDR_ALG: m.encryption.alg, _HDR_IV: m.encryption.iv}
    return cbor2.dumps(body, canonical=True)


def _sig_structure(body_protected: bytes, sign_protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 section 4.4, COSE_Sign: ["Signature", body, sign, external_aad, payload]."""
    return cbor2.dumps(["Signature", body_protected, sign_protected, EXTERNAL_AAD, payload])


def _cose_signature(payload: bytes, body_protected: bytes, signer: Signer, kid: bytes,
                    alg: int) -> list[Any]:
    if alg not in (ALG_EDDSA, ALG_ES256):
        raise ConfigError(f"alg {alg} is not EdDSA (-8) or ES256 (-7)")
    sign_protected = cbor2.dumps({_HDR_ALG: alg, _HDR_KID: bytes(kid)})
    signature = signer(_sig_structure(body_protected, sign_protected, payload))
    if len(signature) != 64:
        raise ConfigError("the signer returned a signature of the wrong size (DER?)")
    return [sign_protected, {}, signature]


def sign_manifest(m: Manifest, signer: Signer, kid: bytes, alg: int, *,
                  for_approval: bool = False) -> bytes:
    """Vendor signature. `signer` may be a software key (`attest.software_signer`) or a token
    key (`keystore.pkcs11.Pkcs11Signer`). With `for_approval` the result is a COSE_Sign with one
    signature, to which an operator adds its own (`approve_manifest`); else a COSE_Sign1."""
    payload = encode_manifest(m)
    if not for_approval:
        return sign1(payload, signer, kid, alg, external_aad=EXTERNAL_AAD)
    body_protected = b""  # nothing shared: alg and kid are per signature
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN, [
        body_protected, {}, payload, [_cose_signature(payload, body_protected, signer, kid, alg)],
    ]))


def approve_manifest(data: bytes, signer: Signer, kid: bytes, alg: int, *,
                     trust: TrustAnchors) -> bytes:
    """Operator approval: check the vendor signature first (an operator never approves what
    the vendor did not sign), then append the operator's signature over the same payload."""
    parsed = _parse(data)
    if parsed.tag != TAG_SIGN:
        raise ConfigError("only a manifest signed with for_approval=True can be approved")
    # An operator never approves what the vendor did not sign.
    if _verify_role(parsed, trust.vendor, "vendor") is None:
        raise UpdateRejected(UpdateReason.BAD_SIGNATURE, "no trusted vendor signature")
    sig = _cose_signature(parsed.payload, parsed.body_protected, signer, kid, alg)
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN, [
        parsed.body_protected, {}, parsed.payload,
        [[s.protected, {}, s.signature] for s in parsed.signatures] + [sig],
    ]))


def manifest_ref(data: bytes) -> str:
    """How reports and rollouts name a signed manifest: the first 16 bytes of its SHA-256, hex.
    (A reference, not an identity: an ES256 signature can be re-encoded into another valid one,
    so rollouts match verified reports by sequence number and use this only as a fallback.)"""
    return hashlib.sha256(data).hexdigest()[:32]


# --- image key delivery -----------------------------------------------------------------------

def encode_image_key(manifest_sequence: int, cek: bytes) -> bytes:
    """Plaintext of the downlink envelope that gives one device the image's CEK.

    The server seals it with `core.envelope.seal(..., keys=<device's DOWN KeyContext>,
    route=IMAGE_KEY_ROUTE)` (COSE_Encrypt0, the device's E3 downlink key), so only that device
    and the cloud can read it; binding the manifest sequence stops a CEK being applied to
    another image."""
    if len(cek) != CEK_LEN or not _is_uint(manifest_sequence):
        raise ConfigError("a CEK is 32 bytes; the sequence is an unsigned integer")
    return cbor2.dumps({1: manifest_sequence, 2: bytes(cek)}, canonical=True)


def encrypt_image(image: bytes, cek: bytes, iv: bytes) -> bytes:
    """Server side: AES-256-GCM(cek, iv) over the image, no AAD; returns ciphertext || tag, the
    bytes that the manifest's digest and size describe. Use a fresh CEK per image."""
    if len(cek) != CEK_LEN or len(iv) != GCM_IV_LEN:
        raise ConfigError("a CEK is 32 bytes and an IV 12")
    return AESGCM(cek).encrypt(iv, image, None)


def decode_image_key(payload: bytes, manifest: Manifest) -> bytes:
    """The CEK for `manifest` from an opened image-key envelope; UpdateRejected(malformed)."""
    try:
        item = cbor2.loads(payload, max_depth=2, allow_indefinite=False,
                           allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types
        raise UpdateRejected(UpdateReason.MALFORMED, "image key is not CBOR") from exc
    if not isinstance(item, dict) or set(item) != {1, 2} or type(item[2]) is not bytes \
            or len(item[2]) != CEK_LEN:
        raise UpdateRejected(UpdateReason.MALFORMED, "image key has the wrong shape")
    if item[1] != manifest.sequence:
        raise UpdateRejected(UpdateReason.MALFORMED, "image key is for another manifest")
    return bytes(item[2])


# --- parsing and verification (device side) ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Signature:
    protected: bytes
    alg: int | None
    kid: bytes | None
    signature: bytes


@dataclass(frozen=True, slots=True)
class _Parsed:
    tag: int
    body_protected: bytes
    payload: bytes
    signatures: tuple[_Signature, ...]
    raw: bytes


def _malformed(detail: str) -> UpdateRejected:
    return UpdateRejected(UpdateReason.MALFORMED, detail)


def _header(data: bytes) -> Mapping[Any, Any]:
    if data == b"":
        return {}
    try:
        hdr = cbor2.loads(data, max_depth=2, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as exc:
        raise _malformed("protected header is not CBOR") from exc
    if not isinstance(hdr, Mapping):
        raise _malformed("protected header is not a map")
    return hdr


def _parse(data: bytes) -> _Parsed:
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_MANIFEST_SIZE:
        raise _malformed("not bytes, empty or too large")
    if data[:1] == b"\xd2":  # tag 18: COSE_Sign1, parsed by core.attest
        try:
            s1 = parse_sign1(data)
        except Rejected as exc:
            raise _malformed(exc.detail or "bad COSE_Sign1") from None
        sig = _Signature(s1.protected, s1.alg, s1.kid, s1.signature)
        return _Parsed(TAG_SIGN1, b"", s1.payload, (sig,), data)
    try:
        item = cbor2.loads(data, max_depth=6, allow_indefinite=False)
    except Exception as exc:
        raise _malformed("not CBOR") from exc
    if not isinstance(item, cbor2.CBORTag) or item.tag != TAG_SIGN:
        raise _malformed("not a COSE_Sign1 (tag 18) or COSE_Sign (tag 98)")
    value = item.value
    if type(value) not in (list, tuple) or len(value) != 4:
        raise _malformed("not a COSE_Sign array")
    body_protected, unprotected, payload, sigs = value
    if type(body_protected) is not bytes or not isinstance(unprotected, Mapping) \
            or type(payload) is not bytes or type(sigs) not in (list, tuple):
        raise _malformed("COSE_Sign fields have the wrong types")
    if _header(body_protected) or unprotected:
        raise _malformed("unexpected body headers")
    if not 1 <= len(sigs) <= MAX_SIGNATURES:
        raise _malformed("1-4 signatures expected")
    parsed: list[_Signature] = []
    for entry in sigs:
        if type(entry) not in (list, tuple) or len(entry) != 3 or type(entry[0]) is not bytes \
                or not isinstance(entry[1], Mapping) or type(entry[2]) is not bytes:
            raise _malformed("COSE_Signature has the wrong shape")
        hdr = _header(entry[0])
        alg, kid = hdr.get(_HDR_ALG), hdr.get(_HDR_KID)
        parsed.append(_Signature(entry[0], alg if type(alg) is int else None,
                                 kid if type(kid) is bytes else None, entry[2]))
    return _Parsed(TAG_SIGN, body_protected, payload, tuple(parsed), data)


def _check_one(parsed: _Parsed, sig: _Signature, key: PublicKey) -> bool:
    """Does `sig` hold under `key`? The key fixes the algorithm; the header must agree."""
    if parsed.tag == TAG_SIGN1:
        try:
            verify_sign1(parsed.raw, key, external_aad=EXTERNAL_AAD)
        except Rejected:
            return False
        return True
    if sig.alg != _alg_of(key):
        return False
    tbs = _sig_structure(parsed.body_protected, sig.protected, parsed.payload)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig.signature, tbs)
        else:
            key.verify(raw_to_der(sig.signature), tbs, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _verify_role(parsed: _Parsed, keys: Mapping[bytes, PublicKey], role: str) -> bytes | None:
    """The kid of the first signature of `role` that holds; None if the role did not sign.

    A signature that names a trusted kid of this role and does not verify is tampering, so it
    rejects the whole manifest (bad_signature) rather than being skipped."""
    found: bytes | None = None
    for sig in parsed.signatures:
        if sig.kid is None or sig.kid not in keys:
            continue
        if not _check_one(parsed, sig, keys[sig.kid]):
            raise UpdateRejected(UpdateReason.BAD_SIGNATURE, f"{role} signature does not verify")
        found = found or sig.kid
    return found


def _decode(payload: bytes) -> Manifest:
    try:
        body = cbor2.loads(payload, max_depth=3, allow_indefinite=False,
                           allow_duplicate_keys=False)
    except Exception as exc:
        raise _malformed("manifest is not CBOR") from exc
    if type(body) is not dict or not _KNOWN.issuperset(body) or not _REQUIRED.issubset(body):
        raise _malformed("manifest fields missing or unknown")
    if body[_K_FORMAT] != FORMAT_VERSION:
        raise _malformed(f"format version {body[_K_FORMAT]!r:.12} not supported")
    digest = body[_K_DIGEST]
    if type(digest) not in (list, tuple) or len(digest) != 2 or digest[0] != COSE_ALG_SHA256:
        raise _malformed("digest must be [-16, bstr] (SHA-256)")
    enc = body.get(_K_ENC)
    try:
        encryption = None
        if enc is not None:
            if type(enc) is not dict or set(enc) != {_HDR_ALG, _HDR_IV}:
                raise _malformed("encryption must be {1: alg, 5: iv}")
            encryption = ImageEncryption(enc[_HDR_IV], enc[_HDR_ALG])
        m = Manifest(body[_K_SEQ], body[_K_CLASS], body[_K_VERSION], digest[1], body[_K_SIZE],
                     body[_K_CREATED], body[_K_EXPIRES], body[_K_KIND], encryption,
                     body[_K_FORMAT])
    except ConfigError as exc:
        raise _malformed(str(exc)) from None
    if encode_manifest(m) != payload:
        raise _malformed("manifest is not in canonical CBOR")
    return m


def verify_manifest(data: bytes, trust: TrustAnchors, *, device_class: str,
                    installed_version: int, last_manifest_seq: int, now_ms: int,
                    require_operator: bool) -> Manifest:
    """Verify a signed manifest for one device; return it, with signers and approval filled in.

    Raises UpdateRejected with malformed, bad_signature, missing_approval, wrong_device_class,
    replayed_manifest, expired or rollback (checked in that order; the module docstring says
    why the order is what it is: nothing from the payload is believed before the signatures).
    """
    parsed = _parse(data)
    vendor_kid = _verify_role(parsed, trust.vendor, "vendor")
    if vendor_kid is None:
        raise UpdateRejected(UpdateReason.BAD_SIGNATURE, "no trusted vendor signature")
    operator_kid = _verify_role(parsed, trust.operator, "operator") if trust.operator else None
    if require_operator and operator_kid is None:
        raise UpdateRejected(UpdateReason.MISSING_APPROVAL, "operator approval required")
    m = _decode(parsed.payload)
    if m.device_class != device_class:
        raise UpdateRejected(UpdateReason.WRONG_DEVICE_CLASS,
                             f"manifest for class {m.device_class!r:.70}")
    if m.sequence <= last_manifest_seq:
        raise UpdateRejected(UpdateReason.REPLAYED_MANIFEST,
                             f"manifest seq {m.sequence} <= last seen {last_manifest_seq}")
    if now_ms >= m.expires_ms:
        raise UpdateRejected(UpdateReason.EXPIRED, f"expired at {m.expires_ms}")
    if m.image_version <= installed_version:
        raise UpdateRejected(UpdateReason.ROLLBACK,
                             f"version {m.image_version} <= installed {installed_version}")
    signers = (vendor_kid,) if operator_kid is None else (vendor_kid, operator_kid)
    return Manifest(m.sequence, m.device_class, m.image_version, m.digest, m.size, m.created_ms,
                    m.expires_ms, m.kind, m.encryption, m.format_version, signers,
                    operator_kid is not None, hashlib.sha256(data).digest())
