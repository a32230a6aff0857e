"""Keys inside a PKCS#11 token: the server KEK, device signing keys, and the KEM's DH step.

The module path, token label and PIN are configuration (environment, see `Pkcs11Config`), so the
same code drives SoftHSM2 in tests and an HSM or a secure element's PKCS#11 module in the field.
Only standard PKCS#11 v2.40 mechanisms are used, each one checked against the token's mechanism
list at start so a token that lacks one fails with a clear ConfigError, not mid-request.

What lives where:

* KEK (server): an AES-256 secret key object, CKA_SENSITIVE true, CKA_EXTRACTABLE false, used
  only for CKM_AES_GCM encrypt/decrypt (SoftHSM2 2.6 supports CKM_AES_GCM; no key-wrap
  fallback is needed). `Pkcs11Keystore` implements the `Keystore` protocol with it; its blob
  layout is the software keystore's (version byte, kek id, nonce, ciphertext+tag) with the same
  AAD, so the two are drop-in replacements.
* Device signing key (device, ES256): an EC P-256 key pair generated *inside* the token
  (CKA_SENSITIVE true, CKA_EXTRACTABLE false). `Pkcs11Signer` is an `attest.Signer`: SHA-256 is
  computed here and the token signs the digest with CKM_ECDSA, because CKM_ECDSA_SHA256 is
  missing on SoftHSM2 and on many secure elements; the token returns r||s, COSE's own form.
* Renewal KEM (device): HPKE decapsulation is DH + a key schedule. Only the DH step can run in a
  token: CKM_ECDH1_DERIVE with an EC key (`token_ecdh`). For DHKEM(P-256) that works on
  SoftHSM2; X25519 needs CKM_EC_MONTGOMERY_KEY_PAIR_GEN, which SoftHSM2 2.6 lacks, and no
  PKCS#11 v2.40/v3.0 token offers ML-KEM. The HPKE key schedule (RFC 9180 LabeledExtract /
  LabeledExpand) and the AEAD run outside, because SoftHSM2 has no CKM_HKDF_DERIVE: the DH
  output (one offer's shared secret, never the private key) must therefore leave the token.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DEVICE_ID_LEN, DeviceId

__all__ = [
    "ENV_KEK_LABEL",
    "ENV_MODULE",
    "ENV_PIN",
    "ENV_TOKEN",
    "Pkcs11Config",
    "Pkcs11Keystore",
    "Pkcs11Signer",
    "ensure_kek",
    "generate_ec_key",
    "hpke_open_p256",
    "open_session",
    "token_ecdh",
]

ENV_MODULE = "SENSORSEAL_PKCS11_MODULE"
ENV_TOKEN = "SENSORSEAL_PKCS11_TOKEN"  # noqa: S105 (a variable name, not a secret)
ENV_PIN = "SENSORSEAL_PKCS11_PIN"
ENV_KEK_LABEL = "SENSORSEAL_PKCS11_KEK_LABEL"
DEFAULT_KEK_LABEL = "sensorseal-kek"

BLOB_VERSION = 0x01
_AAD_LABEL = b"sensorseal-kek/1"
_ID_LABEL = b"sensorseal-kek-id/1"
_KEK_ID_LEN = 4
_NONCE_LEN = 12
_TAG_LEN = 16
_HEADER_LEN = 1 + _KEK_ID_LEN + _NONCE_LEN
_P256_OID = "1.2.840.10045.3.1.7"  # secp256r1 / prime256v1

# python-pkcs11 builds its key classes from mixins at run time (EncryptMixin, SignMixin, ...),
# which its stubs do not express; a token key handle is therefore typed as Any here.
TokenKey = Any


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the token is. `repr()` hides the PIN."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    kek_label: str = DEFAULT_KEK_LABEL

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Pkcs11Config:
        env = os.environ if env is None else env
        missing = [k for k in (ENV_MODULE, ENV_TOKEN, ENV_PIN) if not env.get(k)]
        if missing:
            raise ConfigError(f"PKCS#11 keystore needs {', '.join(missing)}")
        return cls(env[ENV_MODULE], env[ENV_TOKEN], env[ENV_PIN],
                   env.get(ENV_KEK_LABEL) or DEFAULT_KEK_LABEL)


def open_session(config: Pkcs11Config, *, rw: bool = True) -> pkcs11.Session:
    """Load the module, find the token by label and log in. ConfigError if any step fails."""
    try:
        lib = pkcs11.lib(config.module)
        token = lib.get_token(token_label=config.token_label)
        try:
            return token.open(rw=rw, user_pin=config.pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # PKCS#11 login state belongs to the application, not the session (v2.40 section
            # 5.5): a second session of this process is already authenticated.
            return token.open(rw=rw)
    except (PKCS11Error, RuntimeError, OSError) as exc:
        # The PIN is never part of the text; the exception type says what failed.
        raise ConfigError(f"cannot open PKCS#11 token {config.token_label!r}: "
                          f"{type(exc).__name__}") from None


def _require(session: pkcs11.Session, *mechanisms: Mechanism) -> None:
    have = session.token.slot.get_mechanisms()
    lacking = [m.name for m in mechanisms if m not in have]
    if lacking:
        raise ConfigError(f"PKCS#11 token lacks {', '.join(lacking)}")


# --- KEK -------------------------------------------------------------------------------------

def ensure_kek(session: pkcs11.Session, label: str = DEFAULT_KEK_LABEL) -> TokenKey:
    """Find the KEK by label, or generate it in the token: AES-256, sensitive, non-extractable,
    usable for encrypt/decrypt only (no wrap/unwrap/sign/derive)."""
    _require(session, Mechanism.AES_KEY_GEN, Mechanism.AES_GCM)
    try:
        return session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=label)
    except pkcs11.NoSuchKey:
        pass
    return session.generate_key(
        KeyType.AES, 256, label=label, store=True,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                  Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: False,
                  Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False,
                  Attribute.DERIVE: False, Attribute.PRIVATE: True, Attribute.MODIFIABLE: False})


def _aad(device_id: DeviceId, epoch: int) -> bytes:
    if len(device_id) != DEVICE_ID_LEN:
        raise ConfigError(f"a device id is {DEVICE_ID_LEN} bytes")
    if not 0 <= epoch < 2**32:
        raise ConfigError("epoch out of range")
    return _AAD_LABEL + bytes(device_id) + epoch.to_bytes(4, "big")


class Pkcs11Keystore:
    """`Keystore` whose KEK never leaves the token: AES-256-GCM computed by the token.

    Thread-safe: a PKCS#11 session runs one operation at a time, so calls are serialized.
    Nonces are 96 random bits from the token's RNG; the zero nonce is reserved for the key check
    value that makes `kek_id`.
    """

    __slots__ = ("_kek", "_kek_id", "_lock", "_session")

    def __init__(self, session: pkcs11.Session, label: str = DEFAULT_KEK_LABEL) -> None:
        self._session = session
        self._lock = threading.Lock()
        self._kek = ensure_kek(session, label)
        # Key check value: GCM tag of nothing under the zero nonce and our label. It tells KEKs
        # apart without reading the key (which the token refuses anyway).
        kcv = self._kek.encrypt(b"", mechanism=Mechanism.AES_GCM,
                                mechanism_param=GCMParams(bytes(_NONCE_LEN), _ID_LABEL))
        self._kek_id = hashlib.sha256(_ID_LABEL + kcv).digest()[:_KEK_ID_LEN]

    @classmethod
    def from_config(cls, config: Pkcs11Config) -> Pkcs11Keystore:
        return cls(open_session(config), config.kek_label)

    def __repr__(self) -> str:
        return f"Pkcs11Keystore(kek_id={self.kek_id!r})"

    @property
    def kek_id(self) -> str:
        return self._kek_id.hex()

    def wrap(self, device_id: DeviceId, epoch: int, secret: bytes) -> bytes:
        aad = _aad(device_id, epoch)
        with self._lock:
            try:
                nonce = bytes(_NONCE_LEN)
                while nonce == bytes(_NONCE_LEN):
                    nonce = self._session.generate_random(_NONCE_LEN * 8)
                ct: bytes = self._kek.encrypt(bytes(secret), mechanism=Mechanism.AES_GCM,
                                       mechanism_param=GCMParams(nonce, aad))
            except PKCS11Error as exc:
                raise ConfigError(f"token could not wrap: {type(exc).__name__}") from None
        return bytes((BLOB_VERSION,)) + self._kek_id + nonce + ct

    def unwrap(self, device_id: DeviceId, epoch: int, blob: bytes) -> bytes:
        aad = _aad(device_id, epoch)
        if len(blob) < _HEADER_LEN + _TAG_LEN or blob[0] != BLOB_VERSION:
            raise ConfigError("not a wrapped secret")
        if blob[1:1 + _KEK_ID_LEN] != self._kek_id:
            raise ConfigError(f"secret was wrapped under KEK {blob[1:5].hex()}, "
                              f"this token holds {self.kek_id}")
        nonce = blob[1 + _KEK_ID_LEN:_HEADER_LEN]
        with self._lock:
            try:
                return bytes(self._kek.decrypt(blob[_HEADER_LEN:], mechanism=Mechanism.AES_GCM,
                                               mechanism_param=GCMParams(nonce, aad)))
            except PKCS11Error:
                raise ConfigError("wrapped secret does not open here (wrong device, epoch or "
                                  "tampered)") from None


# --- EC keys in the token: ES256 signing and ECDH ------------------------------------------------

def generate_ec_key(session: pkcs11.Session, label: str, *, usage: str = "sign",
                    key_id: bytes | None = None,
                    ) -> tuple[TokenKey, ec.EllipticCurvePublicKey]:
    """Generate a P-256 key pair inside the token; return the token's private key handle and the
    public key as a `cryptography` object (for the registry and for verification).

    `usage` is "sign" (ES256 attestation) or "derive" (ECDH for the renewal KEM): one key, one
    purpose. The private key is CKA_SENSITIVE and not CKA_EXTRACTABLE: it cannot be read or
    wrapped out, not even by the token's user.
    """
    if usage not in ("sign", "derive"):
        raise ConfigError("usage is 'sign' or 'derive'")
    _require(session, Mechanism.EC_KEY_PAIR_GEN,
             Mechanism.ECDSA if usage == "sign" else Mechanism.ECDH1_DERIVE)
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_P256_OID)}, local=True)
    key_id = key_id if key_id is not None else session.generate_random(64)
    try:
        public, private = params.generate_keypair(
            store=True, label=label, id=key_id,
            public_template={Attribute.VERIFY: usage == "sign", Attribute.DERIVE: False,
                             Attribute.ENCRYPT: False, Attribute.WRAP: False},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.PRIVATE: True, Attribute.SIGN: usage == "sign",
                              Attribute.DERIVE: usage == "derive", Attribute.DECRYPT: False,
                              Attribute.UNWRAP: False})
    except PKCS11Error as exc:
        raise ConfigError(f"token could not generate a P-256 key: {type(exc).__name__}") from None
    pub = load_der_public_key(encode_ec_public_key(public))
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ConfigError("token returned a public key that is not EC")
    return private, pub


class Pkcs11Signer:
    """An `attest.Signer` for ES256 with the private key in the token.

    Hashing happens here (SHA-256 over the Sig_structure); the token does CKM_ECDSA over the
    32-byte digest and returns the 64-byte r||s that COSE wants.
    """

    __slots__ = ("_key", "_lock")

    def __init__(self, private_key: TokenKey, lock: threading.Lock | None = None) -> None:
        self._key = private_key
        self._lock = lock or threading.Lock()

    def __repr__(self) -> str:
        return "Pkcs11Signer(ES256)"

    def __call__(self, to_be_signed: bytes) -> bytes:
        h = hashes.Hash(hashes.SHA256())
        h.update(to_be_signed)
        digest = h.finalize()
        with self._lock:
            try:
                return bytes(self._key.sign(digest, mechanism=Mechanism.ECDSA))
            except PKCS11Error as exc:
                raise ConfigError(f"token could not sign: {type(exc).__name__}") from None


def token_ecdh(private_key: TokenKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """ECDH(P-256) with the private key in the token: the x coordinate of d*Q (SEC 1, 3.3.1).

    This is DHKEM's `DH(skR, pkE)` step (RFC 9180 section 4.1), and the only part of HPKE a
    v2.40 token can do. The result is derived into a short-lived session object that must be
    extractable so the software key schedule can use it; it is destroyed right after reading.
    """
    point = peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    if not hasattr(private_key, "derive_key"):  # python-pkcs11 omits the mixin: CKA_DERIVE false
        raise ConfigError("this token key is not allowed to derive (CKA_DERIVE is false)")
    try:
        secret = private_key.derive_key(
            KeyType.GENERIC_SECRET, 256, store=False,
            mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(pkcs11.KDF.NULL, None, point),
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        try:
            value = bytes(secret[Attribute.VALUE])
        finally:
            secret.destroy()
    except PKCS11Error as exc:
        raise ConfigError(f"token ECDH failed: {type(exc).__name__}") from None
    return value



# --- HPKE base mode, DHKEM(P-256) with the DH step in the token (RFC 9180) ---------------------

_KEM_P256, _KDF_SHA256, _AEAD_AES256GCM = 0x0010, 0x0001, 0x0002
_P256_ENC_LEN = 65


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    h = hmac.HMAC(salt or bytes(32), hashes.SHA256())  # RFC 5869: empty salt = HashLen zeros
    h.update(b"HPKE-v1" + suite_id + label + ikm)
    return h.finalize()


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled).derive(prk)


def hpke_open_p256(private_key: TokenKey, recipient: ec.EllipticCurvePublicKey, sealed: bytes,
                   info: bytes) -> bytes:
    """Open single-shot HPKE base mode, DHKEM(P-256, HKDF-SHA256) + HKDF-SHA256 + AES-256-GCM,
    whose recipient private key is an ECDH key in the token (RFC 9180 sections 4.1, 5.1, 6.1).

    `sealed` is enc || ciphertext as `cryptography`'s `hpke.Suite.encrypt` returns it. Only
    `DH(skR, pkE)` runs in the token; ExtractAndExpand, the key schedule and AES-GCM run here.
    Raises ConfigError when the token refuses and cryptography.exceptions.InvalidTag when the
    ciphertext does not open.
    """
    if len(sealed) < _P256_ENC_LEN + 16:
        raise ConfigError("HPKE ciphertext too short")
    enc, ct = sealed[:_P256_ENC_LEN], sealed[_P256_ENC_LEN:]
    try:
        pk_e = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)
    except ValueError:
        raise ConfigError("HPKE encapsulated key is not a P-256 point") from None
    dh = token_ecdh(private_key, pk_e)
    kem_id = b"KEM" + _KEM_P256.to_bytes(2, "big")
    kem_context = enc + recipient.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    eae_prk = _labeled_extract(kem_id, b"", b"eae_prk", dh)
    shared_secret = _labeled_expand(kem_id, eae_prk, b"shared_secret", kem_context, 32)
    suite_id = b"HPKE" + b"".join(i.to_bytes(2, "big")
                                  for i in (_KEM_P256, _KDF_SHA256, _AEAD_AES256GCM))
    context = (b"\x00" + _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
               + _labeled_extract(suite_id, b"", b"info_hash", info))
    secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
    key = _labeled_expand(suite_id, secret, b"key", context, 32)
    base_nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, 12)
    return AESGCM(key).decrypt(base_nonce, ct, b"")  # sequence 0: nonce = base_nonce
