"""What a receiver holds per (device, epoch, direction): keys, replay window and policy.

OSCORE calls this a security context. The server keeps one per device epoch in its registry cache;
a device keeps one for the downlink. Building one is the caller's job (it reads the store or the
device's own files); the core only uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import KeyContext, derive
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.core.replay import ReplayWindow

__all__ = ["SecurityContext"]


@dataclass(slots=True, eq=False)
class SecurityContext:
    """Receiver state of one (device, epoch, direction)."""

    keys: KeyContext
    policy: Policy = PRESETS["lax"]
    window: ReplayWindow = field(default_factory=ReplayWindow)

    @classmethod
    def from_secret(cls, root_secret: bytes, device_id: DeviceId, epoch: int,
                    direction: Direction, policy: Policy = PRESETS["lax"],
                    top_seq: int | None = None, *,
                    store_decides_left: bool = False) -> SecurityContext:
        """Derive keys and resume the replay window at `top_seq` (None: nothing seen yet).

        `store_decides_left`: the caller records accepted numbers in a store with a unique key
        (a server worker), which then decides numbers left of the window (see core.replay)."""
        return cls(derive(root_secret, device_id, epoch, direction), policy,
                   ReplayWindow.resume(top_seq, policy.replay_window,
                                       store_decides_left=store_decides_left))
