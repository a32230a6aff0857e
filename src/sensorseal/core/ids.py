"""Value types that validate on construction: device ids, directions, levels.

A `DeviceId` is 12 bytes, laid out like a BSON ObjectId (4-byte big-endian seconds, 8 random
bytes) so that systems that already key devices by ObjectId (Valarm and others) can keep them.
It is shown as 24 lowercase hex characters.
"""

from __future__ import annotations

import re
from enum import StrEnum

from sensorseal.core.errors import ConfigError

__all__ = ["DEVICE_ID_LEN", "DeviceId", "Direction", "Level"]

DEVICE_ID_LEN = 12
_HEX24 = re.compile(r"[0-9a-fA-F]{24}")


class Direction(StrEnum):
    """Which way a message travels; each direction has its own keys and counters."""

    UP = "up"  # device -> cloud (telemetry, RPC requests, acks)
    DOWN = "down"  # cloud -> device (commands, RPC replies, key renewal, updates)


class Level(StrEnum):
    """Protection a message carries (see docs/protocol.md)."""

    SIGNED = "signed"  # COSE_Mac0: authentic, payload readable
    SEALED = "sealed"  # COSE_Encrypt0: authentic and confidential


class DeviceId(bytes):
    """A 12-byte device identifier; `str()` gives its 24-hex form."""

    __slots__ = ()

    def __new__(cls, value: bytes) -> DeviceId:
        if not isinstance(value, bytes | bytearray) or len(value) != DEVICE_ID_LEN:
            raise ConfigError(f"a device id is {DEVICE_ID_LEN} bytes")
        return super().__new__(cls, value)

    @classmethod
    def trusted(cls, value: bytes) -> DeviceId:
        """Construct from bytes whose length the caller has already checked (hot path)."""
        return bytes.__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> DeviceId:
        """Parse the 24-hex form; raises ConfigError with a clear message otherwise."""
        if not isinstance(text, str) or not _HEX24.fullmatch(text):
            raise ConfigError(f"not a device id (24 hex characters expected): {text!r:.40}")
        return cls(bytes.fromhex(text))

    @classmethod
    def generate(cls, *, now_s: int, random12: bytes) -> DeviceId:
        """An ObjectId-shaped id from the caller's clock and randomness (the core reads neither)."""
        if len(random12) < 8:
            raise ConfigError("need at least 8 random bytes")
        return cls((now_s & 0xFFFFFFFF).to_bytes(4, "big") + bytes(random12[:8]))

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"DeviceId({self.hex()!r})"
