"""E5 key renewal: a new root secret for epoch N+1, sealed with HPKE (RFC 9180) to the device.

At provisioning a device makes a KEM key pair and hands the cloud its public key; the private key
never leaves the device. To renew, the cloud draws a new 32-byte root secret, seals it to that
public key and sends the *offer*. The device opens it, checks that it is meant for this device and
for the epoch after the current one, and starts using the new epoch. Its first message under the
new epoch that the server verifies is the proof of possession: only then does the server switch
the device's current epoch (`RenewalState`).

Two HPKE suites (base mode, single shot)::

    X25519           DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + AES-256-GCM     (default)
    MLKEM768_X25519  ML-KEM-768 + X25519 hybrid KEM + HKDF-SHA256 + AES-256-GCM (post-quantum)

Wire format: the offer is a COSE_Encrypt0 (RFC 9052) carrying the HPKE encapsulated key in its
unprotected header, in the shape of draft-ietf-cose-hpke "integrated encryption"::

    offer = #6.16([ protected: bstr .cbor P, unprotected: { -4: enc }, ciphertext: bstr ])
    P     = { 1: alg (-65600 X25519 suite | -65601 hybrid suite),
              4: kid (device id, 12 bytes), -65537: new epoch, -65539: old epoch }
    enc   = HPKE encapsulated key (32 bytes X25519; 1120 bytes hybrid)
    ciphertext = HPKE ciphertext of the new root secret (32 bytes + 16-byte tag)
    info  = CBOR ["sensorseal/1 renewal", device id, old epoch, new epoch, P as bytes]

The protected header is bound through HPKE `info` (the public `cryptography` API has no AAD
argument), so any change to P, the device id or the epochs makes decryption fail; a changed `enc`
changes the KEM shared secret and fails as well.

Sender authentication: HPKE base mode proves nothing about who sealed the offer (anyone holding
the device's public key can make one). The offer must therefore travel as the payload of a
downlink envelope sealed under the *current* epoch (`envelope.seal(..., Direction.DOWN)`), which
authenticates the cloud; `accept_offer` is the step after `unseal`.

Nothing here reads a clock; the new secret is passed in. HPKE encapsulation draws its ephemeral
key from the operating system's RNG inside `cryptography` (the library offers no seam for it).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DEVICE_ID_LEN, DeviceId
from sensorseal.core.keys import ROOT_SECRET_LEN

__all__ = [
    "HDR_EK",
    "HDR_OLD_EPOCH",
    "DeviceKemKey",
    "DeviceKemPublicKey",
    "OfferHeader",
    "Phase",
    "RenewalState",
    "RenewalSuite",
    "accept_offer",
    "make_offer",
    "parse_offer",
    "renewal_body",
    "renewal_info",
    "renewal_offer_of",
]

INFO_LABEL = "sensorseal/1 renewal"
MAX_EPOCH = 2**32 - 1

# COSE labels: 1 alg, 4 kid (RFC 9052); -4 "ek" (draft-ietf-cose-hpke, encapsulated key);
# -65537 key epoch (shared with the envelope); -65539 the epoch the renewal starts from.
HDR_ALG, HDR_KID, HDR_EK = 1, 4, -4
HDR_EPOCH, HDR_OLD_EPOCH = -65537, -65539
TAG_ENCRYPT0 = 16
MAX_OFFER_SIZE = 4096  # the hybrid offer is ~1.2 kB; refuse anything far larger before parsing

_X25519_LEN = 32
_MLKEM768_PUBLIC_LEN = 1184
_MLKEM_SEED_LEN = 64
_HPKE_TAG_LEN = 16
_MAP_TYPES = (dict, cbor2.frozendict)  # exact types: cheaper than isinstance(x, Mapping)


class RenewalSuite(IntEnum):
    """The HPKE suites of an offer; the value is the COSE `alg` (private-use range, < -65536)."""

    X25519 = -65600  # KEM 0x0020 DHKEM(X25519, HKDF-SHA256), KDF 0x0001, AEAD 0x0002
    MLKEM768_X25519 = -65601  # hybrid ML-KEM-768 + X25519 KEM, KDF 0x0001, AEAD 0x0002

    @property
    def enc_len(self) -> int:
        """Length of the HPKE encapsulated key (RFC 9180 `Nenc`)."""
        return 32 if self is RenewalSuite.X25519 else 1088 + 32

    def hpke_suite(self) -> hpke.Suite:
        suite = _SUITES.get(self)
        if suite is None:
            kem = hpke.KEM.X25519 if self is RenewalSuite.X25519 else hpke.KEM.MLKEM768_X25519
            suite = _SUITES[self] = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        return suite


_SUITES: dict[RenewalSuite, hpke.Suite] = {}


# --- device key pairs ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class DeviceKemPublicKey:
    """A device's renewal public key. `raw` is what the registry stores next to the suite.

    Encoding: X25519 suite: the 32-byte X25519 key. Hybrid: ML-KEM-768 public key (1184 bytes)
    followed by the X25519 key (32 bytes), the component order of the hybrid KEM.
    """

    suite: RenewalSuite
    raw: bytes
    _key: x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey = field(
        init=False, repr=False)

    def __post_init__(self) -> None:
        want = _X25519_LEN if self.suite is RenewalSuite.X25519 else (
            _MLKEM768_PUBLIC_LEN + _X25519_LEN)
        if len(self.raw) != want:
            raise ConfigError(f"a {self.suite.name} public key is {want} bytes")
        # Parsed and validated once: loading an ML-KEM key costs ~90 us, a sixth of a renewal.
        xpub = x25519.X25519PublicKey.from_public_bytes(self.raw[-_X25519_LEN:])
        key: x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey = xpub
        if self.suite is RenewalSuite.MLKEM768_X25519:
            try:
                mpub = mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM768_PUBLIC_LEN])
            except ValueError as exc:
                raise ConfigError("not an ML-KEM-768 public key") from exc
            key = hpke.MLKEM768X25519PublicKey(mpub, xpub)
        object.__setattr__(self, "_key", key)

    def key(self) -> x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey:
        return self._key


@dataclass(frozen=True, slots=True, eq=False)
class DeviceKemKey:
    """A device's renewal private key. It stays on the device; `repr()` shows only the suite."""

    suite: RenewalSuite
    _x25519: x25519.X25519PrivateKey = field(repr=False)
    _mlkem: mlkem.MLKEM768PrivateKey | None = field(repr=False, default=None)

    @classmethod
    def generate(cls, suite: RenewalSuite = RenewalSuite.X25519) -> DeviceKemKey:
        """A fresh key pair (made on the device at provisioning, from the OS RNG)."""
        x = x25519.X25519PrivateKey.generate()
        m = mlkem.MLKEM768PrivateKey.generate() if suite is RenewalSuite.MLKEM768_X25519 else None
        return cls(suite, x, m)

    @classmethod
    def from_private_bytes(cls, suite: RenewalSuite, data: bytes) -> DeviceKemKey:
        """Load what `private_bytes()` wrote: X25519 key (32) or ML-KEM seed (64) + X25519 (32)."""
        want = _X25519_LEN if suite is RenewalSuite.X25519 else _MLKEM_SEED_LEN + _X25519_LEN
        if len(data) != want:
            raise ConfigError(f"a {suite.name} private key is {want} bytes")
        x = x25519.X25519PrivateKey.from_private_bytes(data[-_X25519_LEN:])
        m = (mlkem.MLKEM768PrivateKey.from_seed_bytes(data[:_MLKEM_SEED_LEN])
             if suite is RenewalSuite.MLKEM768_X25519 else None)
        return cls(suite, x, m)

    def private_bytes(self) -> bytes:
        """The device's own persistence form. Never send it anywhere."""
        x = self._x25519.private_bytes_raw()
        return x if self._mlkem is None else self._mlkem.private_bytes_raw() + x

    def public_key(self) -> DeviceKemPublicKey:
        x = self._x25519.public_key().public_bytes_raw()
        raw = x if self._mlkem is None else self._mlkem.public_key().public_bytes_raw() + x
        return DeviceKemPublicKey(self.suite, raw)

    def _hpke_key(self) -> x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey:
        if self._mlkem is None:
            return self._x25519
        return hpke.MLKEM768X25519PrivateKey(self._mlkem, self._x25519)


# --- the offer ----------------------------------------------------------------------------------

def renewal_info(device_id: bytes, old_epoch: int, new_epoch: int, protected: bytes) -> bytes:
    """HPKE `info`: CBOR ["sensorseal/1 renewal", device id, old epoch, new epoch, protected]."""
    return cbor2.dumps([INFO_LABEL, bytes(device_id), old_epoch, new_epoch, protected])


@dataclass(frozen=True, slots=True)
class OfferHeader:
    """The parsed, not yet authenticated, fields of an offer."""

    suite: RenewalSuite
    device_id: DeviceId
    old_epoch: int
    new_epoch: int
    protected: bytes
    enc: bytes
    ciphertext: bytes


def make_offer(device_id: DeviceId, public_key: DeviceKemPublicKey, current_epoch: int,
               new_secret: bytes) -> bytes:
    """Seal `new_secret` for epoch `current_epoch + 1` to the device's public key (cloud side)."""
    if len(new_secret) != ROOT_SECRET_LEN:
        raise ConfigError(f"a root secret is {ROOT_SECRET_LEN} bytes")
    if not 0 <= current_epoch < MAX_EPOCH:
        raise ConfigError("epoch out of range (or no epoch left to renew to)")
    device_id = DeviceId(bytes(device_id))
    new_epoch = current_epoch + 1
    suite = public_key.suite
    protected = cbor2.dumps({HDR_ALG: int(suite), HDR_KID: bytes(device_id),
                             HDR_EPOCH: new_epoch, HDR_OLD_EPOCH: current_epoch})
    info = renewal_info(device_id, current_epoch, new_epoch, protected)
    sealed = suite.hpke_suite().encrypt(bytes(new_secret), public_key.key(), info=info)
    enc, ct = sealed[:suite.enc_len], sealed[suite.enc_len:]
    return cbor2.dumps(cbor2.CBORTag(TAG_ENCRYPT0, [protected, {HDR_EK: enc}, ct]))


def _malformed(detail: str) -> Rejected:
    return Rejected(RejectReason.MALFORMED, detail)


def _loads(data: bytes, depth: int) -> Any:
    try:
        return cbor2.loads(data, max_depth=depth, allow_indefinite=False,
                           allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types; all mean "not our CBOR"
        raise _malformed("offer is not CBOR") from exc


def parse_offer(data: bytes) -> OfferHeader:
    """Check the offer's shape and header. Raises Rejected(MALFORMED | UNSUPPORTED)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_OFFER_SIZE:
        raise _malformed("offer is not bytes or too large")
    data = bytes(data)
    item = _loads(data, 3)
    if not isinstance(item, cbor2.CBORTag) or item.tag != TAG_ENCRYPT0 \
            or type(item.value) not in (list, tuple) or len(item.value) != 3:
        raise _malformed("offer is not a COSE_Encrypt0")
    protected, unprotected, ct = item.value
    if type(protected) is not bytes or type(ct) is not bytes:
        raise _malformed("protected header and ciphertext must be byte strings")
    if type(unprotected) not in _MAP_TYPES or set(unprotected) != {HDR_EK}:
        raise _malformed("unprotected header must hold exactly the encapsulated key")
    # One encoding only: re-encoding must give the same bytes, so no byte is unauthenticated
    # framing that an attacker could vary (shortest heads, definite lengths, nothing trailing).
    enc = unprotected[HDR_EK]
    if type(enc) is not bytes or cbor2.dumps(cbor2.CBORTag(
            TAG_ENCRYPT0, [protected, {HDR_EK: enc}, ct])) != data:
        raise _malformed("non-canonical offer encoding")
    hdr = _loads(protected, 1)
    if type(hdr) not in _MAP_TYPES or set(hdr) != {HDR_ALG, HDR_KID, HDR_EPOCH, HDR_OLD_EPOCH}:
        raise _malformed("offer header must hold alg, kid, epoch and old epoch")
    alg, kid, new_epoch, old_epoch = (hdr[HDR_ALG], hdr[HDR_KID], hdr[HDR_EPOCH],
                                      hdr[HDR_OLD_EPOCH])
    if type(alg) is not int:
        raise _malformed("alg must be an integer")
    try:
        suite = RenewalSuite(alg)
    except ValueError:
        raise Rejected(RejectReason.UNSUPPORTED, f"renewal alg {alg}") from None
    if type(kid) is not bytes or len(kid) != DEVICE_ID_LEN:
        raise _malformed("kid must be a 12-byte device id")
    for epoch in (new_epoch, old_epoch):
        if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
            raise _malformed("epoch out of range")
    if len(enc) != suite.enc_len or len(ct) != ROOT_SECRET_LEN + _HPKE_TAG_LEN:
        raise _malformed("encapsulated key or ciphertext has the wrong length")
    return OfferHeader(suite, DeviceId(kid), old_epoch, new_epoch, protected, enc, ct)


def accept_offer(offer: bytes, private_key: DeviceKemKey, device_id: DeviceId,
                 current_epoch: int) -> tuple[int, bytes]:
    """Open an offer on the device: returns (new epoch, new root secret) or raises Rejected.

    MALFORMED: not an offer, meant for another device, or sealed for another suite than this
    device's key. UNKNOWN_EPOCH: it does not renew `current_epoch` to `current_epoch + 1` (an old
    offer re-delivered after the device already moved on lands here too). DECRYPT_FAILED: HPKE did
    not authenticate (tampered, or sealed to another key). The check order does the cheap,
    public checks before the KEM work.
    """
    hdr = parse_offer(offer)
    if not hmac.compare_digest(hdr.device_id, bytes(device_id)):
        raise _malformed("offer is for another device")
    if hdr.suite is not private_key.suite:
        raise _malformed("offer suite does not match the device key")
    if hdr.old_epoch != current_epoch or hdr.new_epoch != current_epoch + 1:
        raise Rejected(RejectReason.UNKNOWN_EPOCH,
                       f"offer renews {hdr.old_epoch}->{hdr.new_epoch}, device is at "
                       f"{current_epoch}")
    info = renewal_info(hdr.device_id, hdr.old_epoch, hdr.new_epoch, hdr.protected)
    try:
        secret = hdr.suite.hpke_suite().decrypt(hdr.enc + hdr.ciphertext,
                                                private_key._hpke_key(), info=info)
    except (InvalidTag, ValueError):
        raise Rejected(RejectReason.DECRYPT_FAILED, "renewal offer did not open") from None
    if len(secret) != ROOT_SECRET_LEN:
        raise _malformed("offer does not hold a root secret")
    return hdr.new_epoch, secret


# --- server-side state machine ------------------------------------------------------------------

class Phase(Enum):
    """Where a device's renewal stands on the server."""

    IDLE = "idle"  # no renewal open; only the current epoch is accepted
    PENDING = "pending"  # an offer is out; current and pending epoch are both accepted
    CONFIRMED = "confirmed"  # the last renewal was proven; like IDLE, remembers it happened


@dataclass(frozen=True, slots=True)
class RenewalState:
    """Server view of one device's renewal, as an immutable value; each event returns a new one.

    Transitions (all others raise ConfigError, or Rejected for network input)::

        IDLE | CONFIRMED --offer()--> PENDING
        PENDING --offer()--> PENDING              the new offer supersedes the old one
        PENDING --verified(pending epoch)--> CONFIRMED   proof of possession
        any --verified(current epoch)--> unchanged

    The state holds the offer bytes (ciphertext only, safe to store) so that an offline device
    can be sent the very same offer when it comes back (`delivery()`), across restarts
    (`to_cbor`/`from_cbor`). It never holds a secret: the registry keeps the pending root
    secret wrapped under the KEK, found by (device, pending epoch).
    """

    device_id: DeviceId
    current_epoch: int
    phase: Phase = Phase.IDLE
    offer: bytes | None = None
    offers_made: int = 0  # how many offers were issued for the pending epoch (supersede count)

    @property
    def pending_epoch(self) -> int | None:
        return self.current_epoch + 1 if self.phase is Phase.PENDING else None

    def accepted_epochs(self) -> tuple[int, ...]:
        """Epochs under which the server should try to open this device's messages now."""
        if self.phase is Phase.PENDING:
            return (self.current_epoch, self.current_epoch + 1)
        return (self.current_epoch,)

    def with_offer(self, offer: bytes) -> RenewalState:
        """Record a freshly made offer (it must renew the current epoch of this device)."""
        try:
            hdr = parse_offer(offer)
        except Rejected as exc:
            raise ConfigError(f"not a renewal offer: {exc.reason.value}") from None
        if hdr.device_id != self.device_id:
            raise ConfigError("offer is for another device")
        if hdr.old_epoch != self.current_epoch or hdr.new_epoch != self.current_epoch + 1:
            raise ConfigError("offer does not renew the current epoch")
        made = self.offers_made + 1 if self.phase is Phase.PENDING else 1
        return replace(self, phase=Phase.PENDING, offer=bytes(offer), offers_made=made)

    def delivery(self) -> bytes:
        """The offer to (re)send: the same bytes until it is superseded or confirmed."""
        if self.phase is not Phase.PENDING or self.offer is None:
            raise ConfigError("no renewal is pending")
        return self.offer

    def verified(self, epoch: int) -> RenewalState:
        """A message under `epoch` has verified. Under the pending epoch it proves possession."""
        if epoch == self.current_epoch:
            return self
        if self.phase is Phase.PENDING and epoch == self.current_epoch + 1:
            return replace(self, current_epoch=epoch, phase=Phase.CONFIRMED, offer=None,
                           offers_made=0)
        raise Rejected(RejectReason.UNKNOWN_EPOCH, f"epoch {epoch} for device {self.device_id}")

    def to_cbor(self) -> bytes:
        return cbor2.dumps([bytes(self.device_id), self.current_epoch, self.phase.value,
                            self.offer, self.offers_made])

    @classmethod
    def from_cbor(cls, data: bytes) -> RenewalState:
        try:
            dev, epoch, phase, offer, made = cbor2.loads(data)
            state = cls(DeviceId(dev), int(epoch), Phase(phase), offer, int(made))
        except (ValueError, TypeError, ConfigError, cbor2.CBORDecodeError) as exc:
            raise ConfigError("stored renewal state is corrupt") from exc
        if (state.phase is Phase.PENDING) != (state.offer is not None):
            raise ConfigError("stored renewal state is corrupt")
        return state


# -- the downlink body that carries an offer (the envelope around it is the caller's) ----------

RENEWAL_KEY = "renewal"  # the downlink body is CBOR {"renewal": offer}


def renewal_body(offer: bytes) -> bytes:
    """The downlink body that carries an offer: CBOR {"renewal": offer}."""
    return cbor2.dumps({RENEWAL_KEY: bytes(offer)})


def renewal_offer_of(body: bytes) -> bytes | None:
    """The offer inside an (already authenticated) downlink body, or None if it is another
    kind of command. The device passes the offer to `Device.accept_renewal`."""
    try:
        item = cbor2.loads(body, max_depth=2, allow_indefinite=False)
    except Exception:
        return None
    if type(item) is not dict or set(item) != {RENEWAL_KEY}:
        return None
    offer = item[RENEWAL_KEY]
    return offer if type(offer) is bytes else None
