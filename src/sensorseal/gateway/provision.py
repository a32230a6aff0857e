"""Provisioning networks and gateways: keys generated here, stored wrapped, shown once.

- A *network* gets a random AES-128 link key (E1) per key epoch (0 at creation, N+1 at each
  `rotate_network`), wrapped under the KEK bound to (network id, epoch), and the layers its
  devices must use (e.g. e1+e3+e4), which the cloud enforces.
- A *gateway* gets an id and a random root secret like a device, per key epoch (1 at creation,
  N+1 at each `rotate_gateway`): it seals its upstream batches with it, so the cloud knows which
  gateway vouched for what.
- After a rotation the old epoch stays valid for a grace period (`not_after_ms`), then is
  refused (`unknown_epoch` at the cloud, `link_epoch` at a gateway).
- A device is *assigned* to one network with a mode (e3, e2, e2+e3).

`gateway_config()` builds what a gateway process needs: its current credential, the link keys
of every still-valid epoch of the networks it serves and, for devices in mode e2 or e2+e3,
their *gateway secrets* (never their root secrets). It is the second and last place secrets
leave the registry: write it to a file only the gateway can read.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from typing import Any, cast

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import ROOT_SECRET_LEN
from sensorseal.core.layers import Layer, Mode, format_layers, gateway_secret, parse_layers
from sensorseal.core.link import NETWORK_KEY_LEN, LinkAlg, NetworkKey, NetworkKeyring
from sensorseal.keystore.base import Keystore
from sensorseal.store.base import (
    Assignment,
    AuditEvent,
    DeviceStatus,
    GatewayRecord,
    GatewayStore,
    KeyEpochRow,
    NetworkRecord,
    Store,
)

__all__ = ["DEFAULT_KEY_GRACE_MS", "NETWORK_EPOCH", "GatewayRegistry", "network_key_text",
           "parse_network_key"]

NETWORK_EPOCH = 0  # the first key epoch of a network (and its keystore AAD epoch)
GATEWAY_EPOCH = 1  # the first key epoch of a gateway
DEFAULT_KEY_GRACE_MS = 7 * 86_400_000  # old network/gateway epoch after a rotation: 7 days
_KEY_PREFIX = "ssn1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ConfigError("not base64url") from None


def network_key_text(key: NetworkKey, raw: bytes) -> str:
    """`ssn1.<network id hex>.<epoch>.<alg>.<key b64url>`: what a device is provisioned with."""
    return f"{_KEY_PREFIX}.{key.network_id.hex()}.{key.epoch}.{int(key.alg)}.{_b64(raw)}"


def parse_network_key(text: str) -> NetworkKey:
    """Read a key text; the older `ssn1.<id>.<alg>.<key>` (no epoch) means epoch 0."""
    parts = text.strip().split(".")
    if len(parts) == 4 and parts[0] == _KEY_PREFIX:
        parts.insert(2, "0")
    if (len(parts) != 5 or parts[0] != _KEY_PREFIX or not parts[2].isdigit()
            or not parts[3].isdigit() or (parts[2] != "0" and parts[2].startswith("0"))):
        raise ConfigError("a network key looks like ssn1.<id>.<epoch>.<alg>.<key>")
    try:
        network_id = bytes.fromhex(parts[1])
    except ValueError:
        raise ConfigError("network id is not hex") from None
    return NetworkKey(network_id, _unb64(parts[4]), int(parts[3]), epoch=int(parts[2]))


def _live(row: KeyEpochRow, now_ms: int) -> bool:
    return row.not_after_ms is None or now_ms < row.not_after_ms


class GatewayRegistry:
    """Networks, gateways and device assignments on top of a store and a keystore."""

    def __init__(self, store: Store, keystore: Keystore, *,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        if not hasattr(store, "add_network"):
            raise ConfigError("this store back end has no gateway support (migration 0004)")
        self._store = store
        self._gw = cast(GatewayStore, store)
        self._keystore = keystore
        self._clock_ms = clock_ms
        self._random = random

    # -- networks ----------------------------------------------------------------------------

    def add_network(self, name: str, *, alg: int = LinkAlg.AES_CCM_16_64_128,
                    required: str = "e1+e3", actor: str = "cli") -> tuple[NetworkRecord, str]:
        """A new network; returns its record and its key text (shown once)."""
        layers = parse_layers(required)
        if alg not in {int(a) for a in LinkAlg}:
            raise ConfigError(f"link alg must be one of {[int(a) for a in LinkAlg]}")
        if not 1 <= len(name) <= 64 or not name.isprintable():
            raise ConfigError("a network name is 1 to 64 printable characters")
        network_id = DeviceId.generate(now_s=self._clock_ms() // 1000, random12=self._random(8))
        raw = self._random(NETWORK_KEY_LEN)
        record = NetworkRecord(bytes(network_id), name, int(alg), format_layers(layers),
                               self._clock_ms())
        self._gw.add_network(record, self._keystore.wrap(network_id, NETWORK_EPOCH, raw))
        self._audit("network_added", actor, f"network={network_id} name={name!r} "
                    f"alg={int(alg)} required={record.required_layers}")
        return record, network_key_text(NetworkKey(network_id, raw, alg), raw)

    def network(self, network_id: bytes) -> NetworkRecord:
        record = self._gw.get_network(network_id)
        if record is None:
            raise ConfigError(f"no network {bytes(network_id).hex()}")
        return record

    def _network_rows(self, network_id: bytes) -> list[KeyEpochRow]:
        rows = self._gw.network_keys(network_id)
        if not rows:
            raise ConfigError(f"network {bytes(network_id).hex()} has no key")
        return rows

    def _network_key(self, record: NetworkRecord, row: KeyEpochRow) -> tuple[NetworkKey, bytes]:
        raw = self._keystore.unwrap(DeviceId(record.network_id), row.epoch, row.wrapped)
        return NetworkKey(record.network_id, raw, record.alg, epoch=row.epoch), raw

    def network_key(self, network_id: bytes, epoch: int | None = None) -> NetworkKey:
        """The key of `epoch` (default: the newest), whether its grace is over or not."""
        record = self.network(network_id)
        rows = self._network_rows(network_id)
        row = rows[-1] if epoch is None else next((r for r in rows if r.epoch == epoch), None)
        if row is None:
            raise ConfigError(f"network {bytes(network_id).hex()} has no key epoch {epoch}")
        return self._network_key(record, row)[0]

    def network_keyring(self, network_id: bytes, now_ms: int | None = None) -> NetworkKeyring:
        """Every epoch still valid at `now_ms` (default: now), each with its grace end."""
        now = self._clock_ms() if now_ms is None else now_ms
        record = self.network(network_id)
        return NetworkKeyring((self._network_key(record, r)[0], r.not_after_ms)
                              for r in self._network_rows(network_id) if _live(r, now))

    def network_key_text(self, network_id: bytes) -> str:
        """The newest epoch's key text again (for provisioning another device)."""
        record = self.network(network_id)
        return network_key_text(*self._network_key(record, self._network_rows(network_id)[-1]))

    def rotate_network(self, network_id: bytes, *, grace_ms: int = DEFAULT_KEY_GRACE_MS,
                       actor: str = "cli") -> tuple[NetworkKey, str]:
        """Start key epoch N+1 (fresh random key; its text is returned once). Epoch N and any
        older one still in grace stay valid until now + `grace_ms` (an earlier end is kept),
        then gateways and the cloud refuse them. Gateways need their configuration exported
        again to learn N+1."""
        if grace_ms < 0:
            raise ConfigError("the grace period cannot be negative")
        record = self.network(network_id)
        old = self._network_rows(network_id)[-1].epoch
        new_epoch = old + 1
        raw = self._random(NETWORK_KEY_LEN)
        if len(raw) != NETWORK_KEY_LEN:
            raise ConfigError("the random source returned too few bytes")
        key = NetworkKey(record.network_id, raw, record.alg, epoch=new_epoch)  # checks range
        now = self._clock_ms()
        wrapped = self._keystore.wrap(DeviceId(record.network_id), new_epoch, raw)
        if not self._gw.rotate_network_key(record.network_id, new_epoch, wrapped, now,
                                           now + grace_ms):
            raise ConfigError(f"network {record.network_id.hex()} changed while rotating; "
                              "try again")
        self._audit("network_key_rotated", actor, f"network={record.network_id.hex()} epoch "
                    f"{old} -> {new_epoch}, grace {grace_ms // 1000}s")
        return key, network_key_text(key, raw)

    # -- gateways ----------------------------------------------------------------------------

    def add_gateway(self, name: str, networks: list[bytes], *,
                    actor: str = "cli") -> DeviceCredential:
        """A new gateway serving `networks`; its credential is returned once."""
        if not networks:
            raise ConfigError("a gateway serves at least one network")
        for n in networks:
            self.network(n)
        gateway_id = DeviceId.generate(now_s=self._clock_ms() // 1000, random12=self._random(8))
        secret = self._random(ROOT_SECRET_LEN)
        record = GatewayRecord(gateway_id, name, DeviceStatus.ACTIVE, GATEWAY_EPOCH,
                               self._clock_ms())
        self._gw.add_gateway(record, self._keystore.wrap(gateway_id, GATEWAY_EPOCH, secret),
                             [bytes(n) for n in networks])
        self._audit("gateway_added", actor, f"gateway={gateway_id} name={name!r} networks="
                    + ",".join(bytes(n).hex() for n in networks))
        return DeviceCredential(gateway_id, GATEWAY_EPOCH, secret)

    def gateway_secret(self, gateway_id: DeviceId, epoch: int) -> bytes | None:
        """The gateway's secret of `epoch`, whether its grace is over or not."""
        blob = self._gw.gateway_secret(gateway_id, epoch)
        return None if blob is None else self._keystore.unwrap(gateway_id, epoch, blob)

    def gateway_epoch(self, gateway_id: DeviceId, epoch: int) -> KeyEpochRow | None:
        """One epoch of the gateway (still wrapped) with the end of its grace, or None."""
        return self._gw.gateway_epoch(gateway_id, epoch)

    def rotate_gateway(self, gateway_id: DeviceId, *, grace_ms: int = DEFAULT_KEY_GRACE_MS,
                       actor: str = "cli") -> DeviceCredential:
        """Start the gateway's epoch N+1 with a fresh secret (the new credential is returned;
        `gateway_config` carries it). Batches sealed under N are accepted for `grace_ms`
        (a gateway still running the old configuration), then refused as `unknown_epoch`."""
        if grace_ms < 0:
            raise ConfigError("the grace period cannot be negative")
        record = self.gateway_record(gateway_id)
        if record is None:
            raise ConfigError(f"no gateway {gateway_id}")
        if record.status is DeviceStatus.REVOKED:
            raise ConfigError(f"gateway {gateway_id} is revoked; revocation is final")
        secret = self._random(ROOT_SECRET_LEN)
        if len(secret) != ROOT_SECRET_LEN:
            raise ConfigError("the random source returned too few bytes")
        new_epoch = record.epoch + 1
        now = self._clock_ms()
        if not self._gw.rotate_gateway(gateway_id, record.epoch,
                                       self._keystore.wrap(gateway_id, new_epoch, secret), now,
                                       now + grace_ms):
            raise ConfigError(f"gateway {gateway_id} changed while rotating; try again")
        self._audit("gateway_key_rotated", actor, f"gateway={gateway_id} epoch {record.epoch} "
                    f"-> {new_epoch}, grace {grace_ms // 1000}s")
        return DeviceCredential(gateway_id, new_epoch, secret)

    def gateway_record(self, gateway_id: DeviceId) -> GatewayRecord | None:
        return self._gw.get_gateway(gateway_id)

    def serves(self, gateway_id: DeviceId) -> frozenset[bytes]:
        return frozenset(self._gw.gateway_networks(gateway_id))

    # -- devices -----------------------------------------------------------------------------

    def assign(self, device_id: DeviceId, network_id: bytes, mode: str, *,
               actor: str = "cli") -> Assignment:
        mode = Mode(mode).value if mode in {m.value for m in Mode} else _bad_mode(mode)
        self.network(network_id)
        if self._store.get_device(device_id) is None:
            raise ConfigError(f"no device {device_id}")
        a = Assignment(device_id, bytes(network_id), mode, self._clock_ms())
        self._gw.assign_device(a)
        self._audit("device_assigned", actor, f"network={bytes(network_id).hex()} mode={mode}",
                    device_id)
        return a

    def assignment(self, device_id: DeviceId) -> Assignment | None:
        return self._gw.device_assignment(device_id)

    def required_layers(self, device_id: DeviceId) -> frozenset[Layer]:
        """What the device's network requires; nothing for a device in no network."""
        a = self._gw.device_assignment(device_id)
        if a is None:
            return frozenset()
        record = self._gw.get_network(a.network_id)
        if record is None:  # a dangling assignment: refuse rather than guess
            raise Rejected(RejectReason.POLICY_VIOLATION, "device's network is unknown")
        return parse_layers(record.required_layers)

    def gateway_config(self, gateway_id: DeviceId) -> dict[str, Any]:
        """The gateway's configuration document (secrets inside: store it 0600)."""
        record = self.gateway_record(gateway_id)
        if record is None:
            raise ConfigError(f"no gateway {gateway_id}")
        secret = self.gateway_secret(gateway_id, record.epoch)
        if secret is None:
            raise ConfigError(f"gateway {gateway_id} has no secret for epoch {record.epoch}")
        credential = DeviceCredential(gateway_id, record.epoch, secret)
        now = self._clock_ms()
        networks, devices = [], []
        for network_id in sorted(self.serves(gateway_id)):
            network = self.network(network_id)
            for row in self._network_rows(network_id):
                if not _live(row, now):
                    continue  # its grace is over: the gateway must not accept it any more
                key, raw = self._network_key(network, row)
                networks.append({"id": network_id.hex(), "epoch": row.epoch,
                                 "alg": int(key.alg), "key": _b64(raw),
                                 "not_after_ms": row.not_after_ms})
            for a in self._gw.network_assignments(network_id):
                entry: dict[str, Any] = {"id": str(a.device_id), "network": network_id.hex(),
                                         "mode": a.mode, "e2": {}}
                if a.mode != Mode.E3.value:
                    dev = self._store.get_device(a.device_id)
                    if dev is None or dev.status is not DeviceStatus.ACTIVE:
                        continue
                    for epoch in (dev.epoch - 1, dev.epoch, dev.epoch + 1):
                        blob = self._store.get_secret(a.device_id, epoch) if epoch >= 0 else None
                        if blob is not None:
                            root = self._keystore.unwrap(a.device_id, epoch, blob)
                            entry["e2"][str(epoch)] = _b64(
                                gateway_secret(root, a.device_id, epoch))
                devices.append(entry)
        return {"gateway": credential.encode(), "networks": networks, "devices": devices}

    def _audit(self, reason: str, actor: str, detail: str,
               device_id: DeviceId | None = None) -> None:
        self._store.add_events([AuditEvent(self._clock_ms(), reason, "cli", actor,
                                           None if device_id is None else str(device_id),
                                           detail)])


def _bad_mode(mode: str) -> str:
    raise ConfigError(f"mode must be one of {[m.value for m in Mode]}, not {mode!r:.20}")
