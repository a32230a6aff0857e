"""Provisioning networks and gateways: keys generated here, stored wrapped, shown once.

- A *network* gets a random AES-128 link key (E1), wrapped under the KEK bound to the network id
  (the keystore binds a blob to a 12-byte id and an epoch; networks use epoch 0), and the layers
  its devices must use (e.g. e1+e3+e4), which the cloud enforces.
- A *gateway* gets an id and a random root secret like a device: it seals its upstream batches
  with it, so the cloud knows which gateway vouched for what.
- A device is *assigned* to one network with a mode (e3, e2, e2+e3).

`gateway_config()` builds what a gateway process needs: its credential, the link keys of the
networks it serves and, for devices in mode e2 or e2+e3, their *gateway secrets* (never their
root secrets). It is the second and last place secrets leave the registry: write it to a file
only the gateway can read.
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
from sensorseal.core.link import NETWORK_KEY_LEN, LinkAlg, NetworkKey
from sensorseal.keystore.base import Keystore
from sensorseal.store.base import (
    Assignment,
    AuditEvent,
    DeviceStatus,
    GatewayRecord,
    GatewayStore,
    NetworkRecord,
    Store,
)

__all__ = ["NETWORK_EPOCH", "GatewayRegistry", "network_key_text", "parse_network_key"]

NETWORK_EPOCH = 0  # the keystore AAD epoch of a network key (a network has one key)
GATEWAY_EPOCH = 1
_KEY_PREFIX = "ssn1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ConfigError("not base64url") from None


def network_key_text(key: NetworkKey, raw: bytes) -> str:
    """`ssn1.<network id hex>.<alg>.<key b64url>`: what a device is provisioned with."""
    return f"{_KEY_PREFIX}.{key.network_id.hex()}.{int(key.alg)}.{_b64(raw)}"


def parse_network_key(text: str) -> NetworkKey:
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != _KEY_PREFIX or not parts[2].isdigit():
        raise ConfigError("a network key looks like ssn1.<id>.<alg>.<key>")
    try:
        network_id = bytes.fromhex(parts[1])
    except ValueError:
        raise ConfigError("network id is not hex") from None
    return NetworkKey(network_id, _unb64(parts[3]), int(parts[2]))


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

    def network_key(self, network_id: bytes) -> NetworkKey:
        record = self.network(network_id)
        blob = self._gw.network_key(network_id)
        if blob is None:
            raise ConfigError(f"network {bytes(network_id).hex()} has no key")
        raw = self._keystore.unwrap(DeviceId(bytes(network_id)), NETWORK_EPOCH, blob)
        return NetworkKey(network_id, raw, record.alg)

    def network_key_text(self, network_id: bytes) -> str:
        """The key text again (for provisioning another device of the network)."""
        key = self.network_key(network_id)
        raw = self._keystore.unwrap(DeviceId(bytes(network_id)), NETWORK_EPOCH,
                                    cast(bytes, self._gw.network_key(network_id)))
        return network_key_text(key, raw)

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
        blob = self._gw.gateway_secret(gateway_id, epoch)
        return None if blob is None else self._keystore.unwrap(gateway_id, epoch, blob)

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
        networks, devices = [], []
        for network_id in sorted(self.serves(gateway_id)):
            key = self.network_key(network_id)
            raw = self._keystore.unwrap(DeviceId(network_id), NETWORK_EPOCH,
                                        cast(bytes, self._gw.network_key(network_id)))
            networks.append({"id": network_id.hex(), "alg": int(key.alg), "key": _b64(raw)})
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
