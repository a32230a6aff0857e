"""Signed security updates (firmware and configuration) with rollback protection.

- `manifest`: the signed manifest (CBOR in COSE_Sign1 / COSE_Sign), trust roles, verification.
- `device_updater`: the device side: resumable download, A/B slots, health check, fallback.
- `rollout`: the server side: which devices get an update and where each one is.

See docs/updates.md.
"""

from sensorseal.updates.device_updater import DeviceUpdater, UpdateResult, UpdateStatus
from sensorseal.updates.manifest import (
    Manifest,
    TrustAnchors,
    UpdateReason,
    UpdateRejected,
    approve_manifest,
    sign_manifest,
    verify_manifest,
)
from sensorseal.updates.rollout import Rollout, Rollouts, Target

__all__ = [
    "DeviceUpdater",
    "Manifest",
    "Rollout",
    "Rollouts",
    "Target",
    "TrustAnchors",
    "UpdateReason",
    "UpdateRejected",
    "UpdateResult",
    "UpdateStatus",
    "approve_manifest",
    "sign_manifest",
    "verify_manifest",
]
