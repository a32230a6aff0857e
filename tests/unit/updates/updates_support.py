"""Helpers for the update tests: signing identities, a manifest factory pinned to a fixed clock,
and a chunk server over an in-memory image that can fail or "lose power" on cue."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sensorseal.core.attest import ALG_EDDSA, PublicKey, Signer, software_signer
from sensorseal.updates.manifest import ImageEncryption, Manifest

NOW = 1_750_000_000_000  # the fixed "now" every test passes in (ms)
DEVICE_CLASS = "thermo-v2"
HOUR = 3_600_000


@dataclass(frozen=True)
class Key:
    """A signing identity: what the signer holds and what the device is provisioned with."""

    kid: bytes
    alg: int
    signer: Signer
    public: PublicKey


def make_key(alg: int, kid: bytes) -> Key:
    priv: Any = (ed25519.Ed25519PrivateKey.generate() if alg == ALG_EDDSA
                 else ec.generate_private_key(ec.SECP256R1()))
    return Key(kid, alg, software_signer(priv), priv.public_key())


def build_manifest(image: bytes, *, seq: int = 5, version: int = 2,
                   device_class: str = DEVICE_CLASS, created_ms: int = NOW - 1000,
                   expires_ms: int = NOW + HOUR, kind: str = "firmware",
                   encryption: ImageEncryption | None = None) -> Manifest:
    """A manifest describing `image` exactly as it will be transferred."""
    return Manifest(seq, device_class, version, hashlib.sha256(image).digest(), len(image),
                    created_ms, expires_ms, kind, encryption)


class Server:
    """Serves an image in chunks, counting requests; optionally fails or crashes on cue."""

    def __init__(self, image: bytes, chunk: int = 4096) -> None:
        self.image = image
        self.chunk = chunk
        self.offsets: list[int] = []
        self.fail_at: int | None = None  # offset that raises a transport error once
        self.crash_at: int | None = None  # offset that "pulls the power" (BaseException)

    def __call__(self, offset: int) -> bytes:
        self.offsets.append(offset)
        if self.crash_at is not None and offset >= self.crash_at:
            self.crash_at = None
            raise PowerLoss
        if self.fail_at is not None and offset >= self.fail_at:
            self.fail_at = None
            raise ConnectionResetError("broker went away")
        return self.image[offset:offset + self.chunk]


class PowerLoss(BaseException):
    """Simulated crash. A BaseException, so the updater's `except Exception` never sees it."""
