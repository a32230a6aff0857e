"""The store interface: registry, key material (wrapped), telemetry, audit.

One interface, several back ends (SQLite by default, PostgreSQL to scale). Implementations are
synchronous and thread-safe; async adapters call them from a worker thread. Secrets only ever
arrive here already wrapped under the key-encryption key (see sensorseal.keystore): a copy of the
database alone yields no key.

The unique key (device_id, epoch, seq) on telemetry is the replay truth that several workers and
restarts share: `record()` reports a duplicate instead of storing it twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol

from sensorseal.core.ids import DeviceId

__all__ = [
    "AuditEvent",
    "DeviceExists",
    "DeviceRecord",
    "DeviceStatus",
    "Store",
    "TelemetryRow",
]


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"  # refused for now; can be re-activated
    REVOKED = "revoked"  # refused forever; the id is never reused


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: DeviceId
    name: str
    status: DeviceStatus
    epoch: int  # current key epoch
    policy: str  # name of the policy (see sensorseal.core.policy.PRESETS)
    created_ms: int
    last_seen_ms: int | None = None


class TelemetryRow(NamedTuple):
    """One accepted message. (A NamedTuple: ingest builds one per message, ~3x cheaper.)"""

    device_id: DeviceId
    epoch: int
    seq: int
    received_ms: int
    device_ts_ms: int | None
    level: str
    route: str
    transport: str
    payload: bytes


class AuditEvent(NamedTuple):
    """A security event: every rejection, and operator actions on devices."""

    at_ms: int
    reason: str  # a RejectReason value, or an action such as "device_revoked"
    transport: str  # http, mqtt, cli, ...
    source: str  # peer address, or operator name
    device_id: str | None = None  # as claimed by the message (24 hex) or None if unparseable
    detail: str = ""  # never contains secret material


class DeviceExists(Exception):
    """add_device() with an id that exists (or existed: revoked ids are never reused)."""


class Store(Protocol):
    """What every back end provides. All methods are blocking and thread-safe."""

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns that version."""
        ...

    def close(self) -> None: ...

    # registry
    def add_device(self, record: DeviceRecord, wrapped_secret: bytes) -> None:
        """Insert device and its first epoch's wrapped secret atomically. Raises DeviceExists."""
        ...

    def get_device(self, device_id: DeviceId) -> DeviceRecord | None: ...

    def list_devices(self, *, limit: int = 1000, offset: int = 0) -> list[DeviceRecord]: ...

    def rename_device(self, device_id: DeviceId, name: str) -> bool:
        """False if there is no such device."""
        ...

    def set_status(self, device_id: DeviceId, status: DeviceStatus) -> bool:
        """False if there is no such device. A revoked device cannot change status again."""
        ...

    def get_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        """The wrapped root secret of one epoch, or None."""
        ...

    # telemetry and replay truth
    def record(self, rows: Sequence[TelemetryRow], events: Sequence[AuditEvent] = ()) -> list[bool]:
        """Store rows and events in ONE transaction. Returns, per row, True if stored and False
        if (device_id, epoch, seq) was already there (a replay). Also updates last_seen_ms."""
        ...

    def max_seq(self, device_id: DeviceId, epoch: int) -> int | None:
        """Highest stored seq of (device, epoch), to resume a replay window after a restart."""
        ...

    def telemetry(self, *, device_id: DeviceId | None = None,
                  limit: int = 100) -> list[TelemetryRow]:
        """Newest first."""
        ...

    def count_telemetry(self, device_id: DeviceId | None = None) -> int: ...

    # audit
    def add_events(self, events: Sequence[AuditEvent]) -> None: ...

    def events(self, *, reason: str | None = None, device_id: str | None = None,
               since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        """Newest first, filtered."""
        ...

    def count_events_by_reason(self) -> dict[str, int]: ...

    # small key/value settings (operator token hash, schema facts)
    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...
