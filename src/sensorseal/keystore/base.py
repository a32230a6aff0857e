"""The keystore interface: how device root secrets are protected at rest.

The store only ever sees *wrapped* secrets. A keystore wraps a secret under a key-encryption key
(KEK) that lives outside the database (a file with 0600 permissions, an environment variable, or
a PKCS#11 token), so a stolen database alone yields no device key. Each wrapped blob is bound to
its (device id, epoch): a blob copied onto another device's row does not unwrap.
"""

from __future__ import annotations

from typing import Protocol

from sensorseal.core.ids import DeviceId

__all__ = ["Keystore"]


class Keystore(Protocol):
    """Wraps and unwraps device root secrets. Implementations are thread-safe."""

    @property
    def kek_id(self) -> str:
        """A short public fingerprint of the KEK (not secret), to tell KEKs apart in messages
        and to detect a data directory opened with the wrong KEK."""
        ...

    def wrap(self, device_id: DeviceId, epoch: int, secret: bytes) -> bytes:
        """Encrypt `secret` for storage, bound to (device_id, epoch)."""
        ...

    def unwrap(self, device_id: DeviceId, epoch: int, blob: bytes) -> bytes:
        """The secret back; ConfigError (with no secret in its text) on a wrong KEK, a blob of
        another device or epoch, or a tampered blob."""
        ...
