"""Security policies: what an authentic message must also satisfy to be accepted.

A policy is data (it will live in the store and be edited by operators); this module only knows
how to evaluate one against an opened message. Checks run after verification, because until then
nothing in the header can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import Level
from sensorseal.core.replay import DEFAULT_WINDOW

__all__ = ["PRESETS", "Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Rules for one device, group or network. `levels` lists the levels accepted."""

    name: str
    levels: frozenset[Level]
    max_skew_s: int | None = None  # None: the device timestamp is not checked
    require_timestamp: bool = False
    replay_window: int = DEFAULT_WINDOW
    # Level "attested": the plaintext must be a COSE_Sign1 by the device's registered signing
    # key (checked by the server pipeline, which archives the signed bytes).
    require_attestation: bool = False

    def __post_init__(self) -> None:
        if not self.levels:
            raise ConfigError(f"policy {self.name!r} accepts no level")
        if self.max_skew_s is not None and self.max_skew_s <= 0:
            raise ConfigError("max_skew_s must be positive")

    def check(self, level: Level, timestamp_ms: int | None, now_ms: int) -> None:
        """Raise Rejected(POLICY_VIOLATION or STALE) naming the rule that failed."""
        if level not in self.levels:
            wanted = "|".join(sorted(lv.value for lv in self.levels))
            raise Rejected(RejectReason.POLICY_VIOLATION,
                           f"level {level.value} not allowed by policy {self.name} ({wanted})")
        if timestamp_ms is None:
            if self.require_timestamp:
                raise Rejected(RejectReason.POLICY_VIOLATION,
                               f"policy {self.name} requires a timestamp")
            return
        if self.max_skew_s is not None and abs(now_ms - timestamp_ms) > self.max_skew_s * 1000:
            raise Rejected(RejectReason.STALE,
                           f"timestamp off by {(now_ms - timestamp_ms) // 1000}s "
                           f"(policy {self.name} allows {self.max_skew_s}s)")


PRESETS: dict[str, Policy] = {
    p.name: p
    for p in (
        # A public weather station: readable but authentic readings.
        Policy("lax", frozenset({Level.SIGNED, Level.SEALED})),
        # The default: payloads hidden from every hop; clocks may drift a lot.
        Policy("standard", frozenset({Level.SEALED}), max_skew_s=24 * 3600),
        # Sealed, with a clock that must be right within two minutes.
        Policy("stringent", frozenset({Level.SEALED}), max_skew_s=120, require_timestamp=True),
        # Sealed, and signed by the device inside the envelope (non-repudiation).
        Policy("attested", frozenset({Level.SEALED}), max_skew_s=24 * 3600,
               require_attestation=True),
    )
}

# Legacy formats (docs/compat.md): HMAC-MD5 Valarm messages, signed Yoctopuce callbacks and
# AES-ECB Waspmote frames are accepted only under these names (sensorseal.server.compat_ingest
# holds which format each allows). Native levels stay allowed so that a device can migrate.
# "legacy-unsigned" also lets password-less Yoctopuce hubs and plain Waspmote frames in.
for _legacy in (
    Policy("legacy", frozenset({Level.SIGNED, Level.SEALED}), max_skew_s=3600),
    Policy("legacy-unsigned", frozenset({Level.SIGNED, Level.SEALED}), max_skew_s=3600),
):
    PRESETS.setdefault(_legacy.name, _legacy)
del _legacy
