"""Server-side rollout of one signed manifest to many devices: who gets it, and where each is.

Pure: no clock (callers pass `now_ms`), no network, no database. Persistence is behind the small
`RolloutStore` protocol (`InMemoryRolloutStore` here; the registry store can implement it later),
with a compare-and-set on a per-record revision so that several workers can apply device reports
without losing one.

Selection is deterministic: a device is in a percentage rollout when
SHA-256("sensorseal/rollout/1" || rollout id || 0x00 || device id), read as a number, falls below
the percentage. The same rollout id always picks the same devices, and raising the percentage
only adds devices (never swaps one out), which is what a staged 1% -> 10% -> 100% rollout needs.

Per-device states and the only transitions allowed (one table, `TRANSITIONS`)::

    pending ──offer──> offered ──> downloading ──> verified ──> installed
                          ^  \\          |  ^          |
                          |   \\         v  |          v
                          +---- (re-offer after a timeout or crash) ; any non-final ──> failed

installed and failed are final: a late or replayed report cannot move a device out of them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from sensorseal.core.errors import ConfigError, SensorsealError
from sensorseal.core.ids import DeviceId
from sensorseal.updates.manifest import UpdateReason

__all__ = [
    "TRANSITIONS",
    "DeviceRecord",
    "DeviceState",
    "InMemoryRolloutStore",
    "ReportRefused",
    "Rollout",
    "RolloutStore",
    "RolloutSummary",
    "Rollouts",
    "Target",
    "select",
]

_SELECT_LABEL = b"sensorseal/rollout/1"
_BASIS = 10_000  # percentages are kept in basis points: 0.01 % steps
_CAS_RETRIES = 8
_REASONS = frozenset(r.value for r in UpdateReason)


class DeviceState(StrEnum):
    PENDING = "pending"  # selected, not offered yet (e.g. offline)
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"  # image complete, digest and size hold
    INSTALLED = "installed"  # final
    FAILED = "failed"  # final, with a reason


_S = DeviceState
TRANSITIONS: Mapping[DeviceState, frozenset[DeviceState]] = {
    _S.PENDING: frozenset({_S.OFFERED, _S.FAILED}),
    _S.OFFERED: frozenset({_S.OFFERED, _S.DOWNLOADING, _S.VERIFIED, _S.INSTALLED, _S.FAILED}),
    _S.DOWNLOADING: frozenset({_S.OFFERED, _S.DOWNLOADING, _S.VERIFIED, _S.INSTALLED,
                               _S.FAILED}),
    _S.VERIFIED: frozenset({_S.OFFERED, _S.INSTALLED, _S.FAILED}),
    _S.INSTALLED: frozenset(),
    _S.FAILED: frozenset(),
}

# Device report status (updates.device_updater.UpdateStatus values) -> state it moves to.
_REPORTED: Mapping[str, DeviceState] = {
    "downloading": _S.DOWNLOADING, "incomplete": _S.DOWNLOADING, "verified": _S.VERIFIED,
    "installed": _S.INSTALLED, "rejected": _S.FAILED, "rolled_back": _S.FAILED,
}


class ReportRefused(SensorsealError):
    """A device report that does not fit (other manifest, unknown device, illegal transition,
    bad shape). Adapters log it with the device id and drop it; the rollout is unchanged."""


@dataclass(frozen=True, slots=True)
class Target:
    """Which devices: an explicit list, a whole group, or a percentage of a group. Group
    membership is resolved by the caller (from the registry) and passed in."""

    members: tuple[DeviceId, ...]
    group: str = ""
    basis_points: int = _BASIS

    def __post_init__(self) -> None:
        if not 0 <= self.basis_points <= _BASIS:
            raise ConfigError("a percentage is between 0 and 100")
        if len(set(self.members)) != len(self.members):
            raise ConfigError("a device is listed twice")

    @classmethod
    def devices(cls, ids: Iterable[DeviceId]) -> Target:
        return cls(tuple(ids))

    @classmethod
    def whole_group(cls, name: str, members: Iterable[DeviceId]) -> Target:
        return cls(tuple(members), name)

    @classmethod
    def percentage(cls, name: str, members: Iterable[DeviceId], percent: float) -> Target:
        return cls(tuple(members), name, round(percent * 100))


def _bucket(rollout_id: str, device_id: bytes) -> int:
    h = hashlib.sha256(_SELECT_LABEL + rollout_id.encode() + b"\x00" + bytes(device_id)).digest()
    return int.from_bytes(h[:8], "big") % _BASIS


def select(rollout_id: str, target: Target) -> tuple[DeviceId, ...]:
    """The devices a rollout covers, deterministically (see the module docstring)."""
    if target.basis_points >= _BASIS:
        return target.members
    return tuple(d for d in target.members if _bucket(rollout_id, d) < target.basis_points)


@dataclass(frozen=True, slots=True)
class Rollout:
    rollout_id: str
    manifest_id: str  # manifest.manifest_ref(signed manifest)
    manifest_seq: int
    image_version: int
    device_class: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: DeviceId
    state: DeviceState = DeviceState.PENDING
    reason: UpdateReason | None = None
    offset: int = 0
    attempts: int = 0  # offers made
    updated_ms: int = 0
    revision: int = 0  # bumped on every write; the store's compare-and-set key


@dataclass(frozen=True, slots=True)
class RolloutSummary:
    total: int
    by_state: Mapping[DeviceState, int]
    failures: Mapping[UpdateReason, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every device is installed or failed with a recorded reason."""
        return self.by_state.get(_S.INSTALLED, 0) + self.by_state.get(_S.FAILED, 0) == self.total

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "complete": self.complete,
                "states": {s.value: self.by_state.get(s, 0) for s in DeviceState},
                "failures": {r.value: n for r, n in sorted(self.failures.items())}}


class RolloutStore(Protocol):
    """What rollouts need from persistence. `replace_device` is a compare-and-set: it writes
    only if the stored record's revision is still `expect_revision`, and says whether it did."""

    def add_rollout(self, rollout: Rollout, devices: Sequence[DeviceRecord]) -> None: ...
    def rollout(self, rollout_id: str) -> Rollout | None: ...
    def device(self, rollout_id: str, device_id: DeviceId) -> DeviceRecord | None: ...
    def devices(self, rollout_id: str) -> list[DeviceRecord]: ...
    def replace_device(self, rollout_id: str, record: DeviceRecord, *,
                       expect_revision: int) -> bool: ...


class InMemoryRolloutStore:
    """A `RolloutStore` in dicts, for tests and single-process demos."""

    def __init__(self) -> None:
        self._rollouts: dict[str, Rollout] = {}
        self._devices: dict[str, dict[bytes, DeviceRecord]] = {}

    def add_rollout(self, rollout: Rollout, devices: Sequence[DeviceRecord]) -> None:
        if rollout.rollout_id in self._rollouts:
            raise ConfigError(f"rollout {rollout.rollout_id!r:.60} exists")
        self._rollouts[rollout.rollout_id] = rollout
        self._devices[rollout.rollout_id] = {bytes(r.device_id): r for r in devices}

    def rollout(self, rollout_id: str) -> Rollout | None:
        return self._rollouts.get(rollout_id)

    def device(self, rollout_id: str, device_id: DeviceId) -> DeviceRecord | None:
        return self._devices.get(rollout_id, {}).get(bytes(device_id))

    def devices(self, rollout_id: str) -> list[DeviceRecord]:
        return list(self._devices.get(rollout_id, {}).values())

    def replace_device(self, rollout_id: str, record: DeviceRecord, *,
                       expect_revision: int) -> bool:
        table = self._devices.get(rollout_id, {})
        current = table.get(bytes(record.device_id))
        if current is None or current.revision != expect_revision:
            return False
        table[bytes(record.device_id)] = record
        return True


class Rollouts:
    """The rollout state machine over a `RolloutStore`."""

    def __init__(self, store: RolloutStore) -> None:
        self._store = store

    def create(self, rollout: Rollout, target: Target) -> tuple[DeviceId, ...]:
        """Select the devices and record them all as pending; returns the selection."""
        chosen = select(rollout.rollout_id, target)
        self._store.add_rollout(rollout, [DeviceRecord(d, updated_ms=rollout.created_ms)
                                          for d in chosen])
        return chosen

    def _rollout(self, rollout_id: str) -> Rollout:
        r = self._store.rollout(rollout_id)
        if r is None:
            raise ConfigError(f"no rollout {rollout_id!r:.60}")
        return r

    def to_offer(self, rollout_id: str) -> list[DeviceId]:
        """Devices that still need an offer (or a new one): everything not final."""
        self._rollout(rollout_id)
        return [r.device_id for r in self._store.devices(rollout_id)
                if r.state not in (_S.INSTALLED, _S.FAILED)]

    def _move(self, rollout_id: str, device_id: DeviceId, to: DeviceState, now_ms: int,
              **changes: Any) -> DeviceRecord:
        for _ in range(_CAS_RETRIES):
            cur = self._store.device(rollout_id, device_id)
            if cur is None:
                raise ReportRefused(f"device {device_id} is not in rollout {rollout_id!r:.60}")
            if to not in TRANSITIONS[cur.state]:
                raise ReportRefused(f"device {device_id}: {cur.state.value} -> {to.value} "
                                    "is not a valid transition")
            new = replace(cur, state=to, updated_ms=now_ms, revision=cur.revision + 1, **changes)
            if self._store.replace_device(rollout_id, new, expect_revision=cur.revision):
                return new
        raise ReportRefused(f"device {device_id}: too many concurrent updates")

    def offer(self, rollout_id: str, device_id: DeviceId, *, now_ms: int) -> DeviceRecord:
        """Record that the manifest was (re)sent to the device."""
        self._rollout(rollout_id)
        cur = self._store.device(rollout_id, device_id)
        attempts = (cur.attempts if cur else 0) + 1
        return self._move(rollout_id, device_id, _S.OFFERED, now_ms, attempts=attempts)

    def fail(self, rollout_id: str, device_id: DeviceId, reason: UpdateReason, *,
             now_ms: int) -> DeviceRecord:
        """Give up on a device on the server's own decision (e.g. too many attempts)."""
        return self._move(rollout_id, device_id, _S.FAILED, now_ms, reason=reason)

    def report(self, rollout_id: str, device_id: DeviceId, report: Mapping[str, Any], *,
               now_ms: int) -> DeviceRecord:
        """Apply one device report (`UpdateResult.as_dict()`, already unsealed and authentic).
        Raises ReportRefused when it does not fit this rollout."""
        rollout = self._rollout(rollout_id)
        status = report.get("status")
        to = _REPORTED.get(status) if isinstance(status, str) else None
        if to is None:
            raise ReportRefused(f"device {device_id}: unknown report status")
        # The sequence comes from a verified manifest and names it; the manifest reference is
        # only there for refusals that happened before verification (see manifest_ref).
        mid, seq = report.get("manifest"), report.get("manifest_seq")
        if not (seq == rollout.manifest_seq if type(seq) is int else
                bool(mid) and mid == rollout.manifest_id):
            raise ReportRefused(f"device {device_id}: report is for another manifest")
        changes: dict[str, Any] = {}
        if to is _S.FAILED:
            reason = report.get("reason")
            if not isinstance(reason, str) or reason not in _REASONS:
                raise ReportRefused(f"device {device_id}: failure without a known reason")
            changes["reason"] = UpdateReason(reason)
        offset = report.get("offset")
        if to is _S.DOWNLOADING and type(offset) is int and offset >= 0:
            changes["offset"] = offset
        return self._move(rollout_id, device_id, to, now_ms, **changes)

    def summary(self, rollout_id: str) -> RolloutSummary:
        self._rollout(rollout_id)
        records = self._store.devices(rollout_id)
        return RolloutSummary(len(records), Counter(r.state for r in records),
                              Counter(r.reason for r in records
                                      if r.state is _S.FAILED and r.reason is not None))
