"""The sans-IO core: envelope, keys, replay window, policy, rejection reasons.

Nothing in this package opens a socket, touches a database, reads a clock or draws randomness on
its own: callers pass time, sequence numbers and secrets in.
"""

from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import Envelope, Opened, parse, seal, unseal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason, SensorsealError
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import ROOT_SECRET_LEN, Alg, KeyContext, derive
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.core.replay import ReplayWindow

__all__ = [
    "PRESETS",
    "ROOT_SECRET_LEN",
    "Alg",
    "ConfigError",
    "DeviceId",
    "Direction",
    "Envelope",
    "KeyContext",
    "Level",
    "Opened",
    "Policy",
    "RejectReason",
    "Rejected",
    "ReplayWindow",
    "SecurityContext",
    "SensorsealError",
    "derive",
    "parse",
    "seal",
    "unseal",
]
