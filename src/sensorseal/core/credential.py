"""The string a device is provisioned with: id, key epoch and root secret in one copyable line.

Format: ``ss1.<device id, 24 hex>.<epoch>.<root secret, base64url without padding>``. It is shown
once, at provisioning, and never logged; `repr()` hides the secret.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import ROOT_SECRET_LEN

__all__ = ["DeviceCredential"]

_PREFIX = "ss1"


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    device_id: DeviceId
    epoch: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != ROOT_SECRET_LEN:
            raise ConfigError(f"a root secret is {ROOT_SECRET_LEN} bytes")
        if not 0 <= self.epoch < 2**32:
            raise ConfigError("epoch out of range")

    def encode(self) -> str:
        b64 = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode()
        return f"{_PREFIX}.{self.device_id.hex()}.{self.epoch}.{b64}"

    @classmethod
    def parse(cls, text: str) -> DeviceCredential:
        """Parse the one-line form; ConfigError (without echoing the secret) when it is wrong."""
        parts = text.strip().split(".")
        if len(parts) != 4 or parts[0] != _PREFIX:
            raise ConfigError("not a device credential (expected ss1.<id>.<epoch>.<key>)")
        device_id = DeviceId.parse(parts[1])
        if not parts[2].isdigit():
            raise ConfigError("credential epoch is not a number")
        try:
            secret = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4))
        except (binascii.Error, ValueError):
            raise ConfigError("credential key is not base64url") from None
        return cls(device_id, int(parts[2]), secret)
