"""Per-device key derivation: one random root secret, one key per purpose and direction.

Every device gets a 32-byte random root secret per key epoch. Working keys are never stored:
HKDF-SHA256 (RFC 5869) derives them, each bound to the device id, epoch, direction, purpose and
algorithm through the `info` argument, so that two purposes never share a key and a device's keys
say nothing about another device's (see docs/protocol.md, "Key derivation").

Objects that wrap secrets never show them: `repr()` is redacted.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from enum import IntEnum

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId, Direction

__all__ = [
    "NONCE_LEN",
    "ROOT_SECRET_LEN",
    "Alg",
    "KeyContext",
    "broker_password",
    "derive",
    "hkdf_info",
]

ROOT_SECRET_LEN = 32
NONCE_LEN = 12
PROTOCOL_LABEL = "sensorseal/1"


class Alg(IntEnum):
    """COSE algorithm identifiers (IANA "COSE Algorithms") that sensorseal speaks."""

    A256GCM = 3
    CHACHA20_POLY1305 = 24
    HMAC_256_256 = 5


AEAD_ALGS = frozenset({Alg.A256GCM, Alg.CHACHA20_POLY1305})
_KEY_LEN = {Alg.A256GCM: 32, Alg.CHACHA20_POLY1305: 32, Alg.HMAC_256_256: 32}


def hkdf_info(device_id: bytes, epoch: int, direction: Direction, purpose: str, length: int,
              alg: int | None) -> bytes:
    """The HKDF `info`: CBOR ["sensorseal/1", kid, epoch, direction, purpose, alg, length]."""
    return cbor2.dumps([PROTOCOL_LABEL, bytes(device_id), epoch, direction.value, purpose, alg,
                        length])


def _hkdf(root: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(root)


@dataclass(slots=True, eq=False)
class KeyContext:
    """Derived keys of one (device, epoch, direction). Cheap to use, derived lazily, cached.

    AEAD objects are cached because constructing one costs about 2.6x a reused one.
    """

    device_id: DeviceId
    epoch: int
    direction: Direction
    _root: bytes = field(repr=False)
    base_iv: bytes = field(init=False, repr=False)
    _base_iv_int: int = field(init=False, repr=False)
    _aeads: dict[int, AESGCM | ChaCha20Poly1305] = field(init=False, repr=False,
                                                          default_factory=dict)
    _mac_key: bytes | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if len(self._root) != ROOT_SECRET_LEN:
            raise ConfigError(f"a root secret is {ROOT_SECRET_LEN} bytes")
        if not 0 <= self.epoch < 2**32:
            raise ConfigError("epoch out of range")
        self.base_iv = self._derive("iv", NONCE_LEN, None)
        self._base_iv_int = int.from_bytes(self.base_iv, "big")

    def _derive(self, purpose: str, length: int, alg: int | None) -> bytes:
        info = hkdf_info(self.device_id, self.epoch, self.direction, purpose, length, alg)
        return _hkdf(self._root, info, length)

    def aead(self, alg: int) -> AESGCM | ChaCha20Poly1305:
        """The AEAD object for `alg`, derived on first use."""
        obj = self._aeads.get(alg)
        if obj is None:
            if alg == Alg.A256GCM:
                obj = AESGCM(self._derive("enc", 32, alg))
            elif alg == Alg.CHACHA20_POLY1305:
                obj = ChaCha20Poly1305(self._derive("enc", 32, alg))
            else:
                raise ConfigError(f"not an AEAD algorithm: {alg}")
            self._aeads[alg] = obj
        return obj

    @property
    def mac_key(self) -> bytes:
        """The HMAC-SHA256 key for COSE_Mac0 at level `signed`."""
        if self._mac_key is None:
            self._mac_key = self._derive("mac", _KEY_LEN[Alg.HMAC_256_256], Alg.HMAC_256_256)
        return self._mac_key

    def nonce_int(self, seq: int) -> bytes:
        """The nonce for sequence number `seq` (the integer value of its Partial IV)."""
        return (self._base_iv_int ^ seq).to_bytes(NONCE_LEN, "big")

    def nonce(self, partial_iv: bytes) -> bytes:
        """RFC 9052 section 3.1: left-pad the Partial IV to 12 bytes and XOR it with the base IV."""
        return (self._base_iv_int ^ int.from_bytes(partial_iv, "big")).to_bytes(NONCE_LEN, "big")


def broker_password(root_secret: bytes, device_id: DeviceId, epoch: int) -> str:
    """The device's MQTT password: HKDF(root, purpose "broker-auth"), base64url, 43 chars.

    A separate derived value (not the root secret) so that a broker, which must be able to check
    it, learns nothing that opens or forges envelopes.
    """
    info = hkdf_info(device_id, epoch, Direction.UP, "broker-auth", 32, None)
    raw = _hkdf(bytes(root_secret), info, 32)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def derive(root_secret: bytes, device_id: DeviceId, epoch: int, direction: Direction) -> KeyContext:
    """Derive the key context for one direction of one device epoch."""
    return KeyContext(device_id, epoch, direction, bytes(root_secret))
