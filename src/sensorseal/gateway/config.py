"""The gateway's configuration document, as `GatewayRegistry.gateway_config` writes it.

    { "gateway":  "ss1.<gateway id>.<epoch>.<secret>",
      "networks": [ {"id": hex, "epoch": 0, "alg": 10, "key": b64url,
                     "not_after_ms": null | ms} ],      one entry per still-valid key epoch
      "devices":  [ {"id": hex, "network": hex, "mode": "e3" | "e2" | "e2+e3",
                     "e2": {"<epoch>": b64url gateway secret}} ] }

An entry without "epoch" (files written before key epochs existed) is epoch 0 without an end.
While a network key rotates the document holds the old epoch (with the end of its grace) and
the new one, so the gateway accepts frames of both until the old one's grace is over.

It holds secrets, so it is written 0600 and never logged; `repr()` of every object built from it
is redacted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import KeyContext
from sensorseal.core.layers import Mode, gateway_keys
from sensorseal.core.link import NetworkKey, NetworkKeyring
from sensorseal.gateway.provision import _unb64

__all__ = ["DeviceEntry", "GatewayConfig", "load_config", "write_config"]


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """A device behind this gateway: its network, its mode and its E2 keys per epoch."""

    device_id: DeviceId
    network_id: bytes
    mode: Mode
    e2: dict[int, KeyContext] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    credential: DeviceCredential = field(repr=False)
    networks: dict[bytes, NetworkKeyring]  # network id -> its keys by epoch
    devices: dict[DeviceId, DeviceEntry]

    @property
    def gateway_id(self) -> DeviceId:
        return self.credential.device_id


def _parse(doc: Any) -> GatewayConfig:
    if not isinstance(doc, dict):
        raise ConfigError("gateway config must be a JSON object")
    try:
        cred = DeviceCredential.parse(doc["gateway"])
        networks: dict[bytes, NetworkKeyring] = {}
        for n in doc["networks"]:
            key = NetworkKey(bytes.fromhex(n["id"]), _unb64(n["key"]), int(n["alg"]),
                             epoch=int(n.get("epoch", 0)))
            end = n.get("not_after_ms")
            not_after = None if end is None else int(end)
            ring = networks.get(key.network_id)
            if ring is None:
                networks[key.network_id] = NetworkKeyring([(key, not_after)])
            else:
                ring.add(key, not_after)
        devices = {}
        for d in doc["devices"]:
            did = DeviceId.parse(d["id"])
            e2 = {int(epoch): gateway_keys(_unb64(secret), did, int(epoch))
                  for epoch, secret in d.get("e2", {}).items()}
            devices[did] = DeviceEntry(did, bytes.fromhex(d["network"]), Mode(d["mode"]), e2)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"gateway config is incomplete or invalid ({type(exc).__name__})") \
            from None
    return GatewayConfig(cred, networks, devices)


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"gateway config {path} is not JSON") from None
    return _parse(doc)


def write_config(path: str | Path, doc: dict[str, Any]) -> None:
    """Write the document with mode 0600, never over an existing file."""
    _parse(doc)  # refuse to write something the gateway could not load
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; refusing to overwrite it") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
