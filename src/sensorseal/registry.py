"""The device registry service: the one place where devices are created and change state.

Every adapter (CLI, HTTP console, demo) goes through `Registry`, so validation, secret wrapping
and the audit trail are the same whoever asks. The store keeps rows; the keystore keeps secrets
wrapped; this layer decides what is allowed:

    active <-> suspended      (suspend / resume)
    active | suspended -> revoked   (final: the id is never reused, its rows never deleted)

Each change is recorded as an audit event whose `source` is the acting operator (`actor`) and
whose `transport` names the adapter ("cli", "http", ...). Clock and randomness are injected so
tests can pin them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import ROOT_SECRET_LEN
from sensorseal.core.policy import PRESETS
from sensorseal.keystore.base import Keystore
from sensorseal.store.base import AuditEvent, DeviceExists, DeviceRecord, DeviceStatus, Store

__all__ = ["FIRST_EPOCH", "MAX_NAME_LEN", "Registry"]

FIRST_EPOCH = 1
MAX_NAME_LEN = 64
_ID_ATTEMPTS = 3  # a 64-bit random id collides essentially never; retry a little, then fail


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LEN:
        raise ConfigError(f"a device name is 1 to {MAX_NAME_LEN} characters")
    if not name.isprintable():
        raise ConfigError("a device name may only hold printable characters")
    return name


def _check_policy(policy: str) -> str:
    if policy not in PRESETS:
        raise ConfigError(f"unknown policy {policy!r:.40} (known: {', '.join(sorted(PRESETS))})")
    return policy


class Registry:
    """Devices: provisioning, naming, suspension, revocation, and their root secrets."""

    def __init__(self, store: Store, keystore: Keystore, *,
                 clock_ms: Callable[[], int] = _wall_clock_ms,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self._store = store
        self._keystore = keystore
        self._clock_ms = clock_ms
        self._random = random

    # -- reads -----------------------------------------------------------------------------

    def find(self, device_id: DeviceId) -> DeviceRecord | None:
        """The device, or None (for callers where "unknown" is an answer, like ingest)."""
        return self._store.get_device(device_id)

    def get(self, device_id: DeviceId) -> DeviceRecord:
        """The device; ConfigError if there is none."""
        record = self._store.get_device(device_id)
        if record is None:
            raise ConfigError(f"no device {device_id}")
        return record

    def list(self, *, limit: int = 1000, offset: int = 0) -> list[DeviceRecord]:
        return self._store.list_devices(limit=limit, offset=offset)

    def root_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        """The unwrapped root secret of (device, epoch), or None if that epoch has none.
        ConfigError if the stored blob does not unwrap (wrong KEK, tampering)."""
        blob = self._store.get_secret(device_id, epoch)
        return None if blob is None else self._keystore.unwrap(device_id, epoch, blob)

    # -- changes ---------------------------------------------------------------------------

    def add_device(self, name: str, policy: str = "standard", *, actor: str = "cli",
                   transport: str = "cli") -> DeviceCredential:
        """Provision a device: a fresh id and root secret, stored wrapped. The credential
        returned is the only time the secret leaves the registry in clear: show it once."""
        _check_name(name)
        _check_policy(policy)
        secret = self._random(ROOT_SECRET_LEN)
        if len(secret) != ROOT_SECRET_LEN:
            raise ConfigError("the random source returned too few bytes")
        for _ in range(_ID_ATTEMPTS):
            now_ms = self._clock_ms()
            device_id = DeviceId.generate(now_s=now_ms // 1000, random12=self._random(8))
            record = DeviceRecord(device_id, name, DeviceStatus.ACTIVE, FIRST_EPOCH, policy,
                                  now_ms)
            wrapped = self._keystore.wrap(device_id, FIRST_EPOCH, secret)
            try:
                self._store.add_device(record, wrapped)
            except DeviceExists:
                continue
            self._audit("device_added", device_id, actor, transport,
                        f"name={name!r} policy={policy} epoch={FIRST_EPOCH}")
            return DeviceCredential(device_id, FIRST_EPOCH, secret)
        raise ConfigError("could not allocate a fresh device id; is the random source broken?")

    def rename(self, device_id: DeviceId, name: str, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        _check_name(name)
        old = self.get(device_id)
        if not self._store.rename_device(device_id, name):
            raise ConfigError(f"no device {device_id}")
        self._audit("device_renamed", device_id, actor, transport,
                    f"name={old.name!r} -> {name!r}")
        return self.get(device_id)

    def suspend(self, device_id: DeviceId, *, actor: str = "cli",
                transport: str = "cli") -> DeviceRecord:
        """Refuse the device's messages until `resume`."""
        return self._transition(device_id, DeviceStatus.SUSPENDED, "device_suspended",
                                frozenset({DeviceStatus.ACTIVE}), actor, transport)

    def resume(self, device_id: DeviceId, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        return self._transition(device_id, DeviceStatus.ACTIVE, "device_resumed",
                                frozenset({DeviceStatus.SUSPENDED}), actor, transport)

    def revoke(self, device_id: DeviceId, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        """Refuse the device forever. Its id is never reused; its telemetry is kept."""
        return self._transition(device_id, DeviceStatus.REVOKED, "device_revoked",
                                frozenset({DeviceStatus.ACTIVE, DeviceStatus.SUSPENDED}),
                                actor, transport)

    def _transition(self, device_id: DeviceId, target: DeviceStatus, reason: str,
                    allowed_from: frozenset[DeviceStatus], actor: str,
                    transport: str) -> DeviceRecord:
        current = self.get(device_id).status
        if current not in allowed_from:
            if current is DeviceStatus.REVOKED:
                raise ConfigError(f"device {device_id} is revoked; revocation is final")
            raise ConfigError(f"device {device_id} is {current.value}; cannot make it "
                              f"{target.value} ({reason.removeprefix('device_')} needs "
                              f"{' or '.join(sorted(s.value for s in allowed_from))})")
        if not self._store.set_status(device_id, target):
            raise ConfigError(f"no device {device_id}")
        self._audit(reason, device_id, actor, transport, f"status={current.value} -> {target}")
        return self.get(device_id)

    def _audit(self, reason: str, device_id: DeviceId, actor: str, transport: str,
               detail: str) -> None:
        self._store.add_events([AuditEvent(self._clock_ms(), reason, transport, actor,
                                           str(device_id), detail)])
