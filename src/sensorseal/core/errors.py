"""Why a message was refused, and the one exception that carries it.

The exception tree, drawn once::

    SensorsealError                 base of everything sensorseal raises on purpose
    ├── Rejected                    a peer sent something we refuse; carries a RejectReason
    │                               (the *remote* side's fault; adapters answer a generic failure)
    └── ConfigError                 local misuse: bad argument, missing key, bad setting
                                    (our side's fault; never caused by network input)

Every `Rejected` carries exactly one `RejectReason` (a StrEnum, stable strings that land in the
audit log and in metrics) and a `status` hint that adapters map to their own codes with one table.
Texts never contain secret material: only ids, counters, sizes and reason names.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ConfigError", "RejectReason", "Rejected", "SensorsealError"]


class RejectReason(StrEnum):
    """Machine-readable reasons; the value is what the audit log and metrics record."""

    MALFORMED = "malformed"  # not a sensorseal envelope: bad CBOR, wrong tag, bad header
    OVERSIZE = "oversize"  # larger than the configured limit
    UNSUPPORTED = "unsupported"  # well formed, but an algorithm/version we do not accept
    UNKNOWN_DEVICE = "unknown_device"  # no such device id
    UNKNOWN_EPOCH = "unknown_epoch"  # device known, key epoch not (or grace expired)
    UNKNOWN_NETWORK = "unknown_network"  # a gateway got a frame of a network it does not serve
    SUSPENDED = "suspended"  # device temporarily disabled by an operator
    REVOKED = "revoked"  # device permanently revoked
    BAD_MAC = "bad_mac"  # COSE_Mac0 tag did not verify
    DECRYPT_FAILED = "decrypt_failed"  # COSE_Encrypt0 AEAD did not authenticate
    BAD_SIGNATURE = "bad_signature"  # COSE_Sign1 did not verify
    REPLAY = "replay"  # sequence number already seen, or left of the replay window
    STALE = "stale"  # device timestamp outside the policy's allowed skew
    POLICY_VIOLATION = "policy_violation"  # authentic, but below the device's required level
    RATE_LIMITED = "rate_limited"  # the device sends faster than allowed
    WRONG_CONTENT_TYPE = "wrong_content_type"  # transport-level: not application/cose


# What an HTTP adapter should answer for each reason. Peers only ever see the status and a
# generic text; the reason itself goes to the audit log.
_STATUS: dict[RejectReason, int] = {
    RejectReason.MALFORMED: 400,
    RejectReason.OVERSIZE: 413,
    RejectReason.UNSUPPORTED: 400,
    RejectReason.WRONG_CONTENT_TYPE: 415,
    RejectReason.RATE_LIMITED: 429,
}


class SensorsealError(Exception):
    """Base class for every error sensorseal raises on purpose."""


class ConfigError(SensorsealError):
    """Local misuse (bad argument, missing setting). Never raised because of network input."""


class Rejected(SensorsealError):
    """A message was refused. `reason` is precise; `str()` is safe to log (no secrets)."""

    __slots__ = ("detail", "reason")

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)

    @property
    def status(self) -> int:
        """HTTP-style status hint: 400/413/415/429 for shape problems, else 403."""
        return _STATUS.get(self.reason, 403)
