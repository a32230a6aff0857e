"""A whole installation in one process for the gateway tests: store, registry, pipeline, the
cloud's gateway route logic, networks, gateways and layered devices. (Imported by the unit tests
and by tests/e2e/test_gateway.py.)"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.core.layers import GATEWAY_BATCH_ROUTE, encode_batch
from sensorseal.core.link import NetworkKey
from sensorseal.device.device import Device
from sensorseal.gateway.cloud import GatewayIngest
from sensorseal.gateway.config import GatewayConfig, _parse
from sensorseal.gateway.node import LayeredDevice
from sensorseal.gateway.provision import GatewayRegistry
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.sqlite import SQLiteStore

T0 = 1_750_000_000_000


class Clock:
    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class World:
    root: Path
    store: SQLiteStore
    registry: Registry
    gateways: GatewayRegistry
    pipeline: Pipeline
    ingest: GatewayIngest
    clock: Clock
    devices: list[Device] = field(default_factory=list)

    def network(self, required: str = "e1+e3", alg: int = 10) -> tuple[bytes, NetworkKey]:
        record, _ = self.gateways.add_network(f"net{len(self.gateways._gw.list_networks())}",
                                              alg=alg, required=required)
        return record.network_id, self.gateways.network_key(record.network_id)

    def device(self, network_id: bytes | None, mode: str = "e3", policy: str = "standard",
               ) -> tuple[DeviceCredential, LayeredDevice | None, Device]:
        cred = self.registry.add_device(f"dev{len(self.devices)}", policy)
        dev = Device(cred, self.root / "devices", clock_ms=self.clock)
        self.devices.append(dev)
        if network_id is None:
            return cred, None, dev
        self.gateways.assign(cred.device_id, network_id, mode)
        layered = LayeredDevice(dev, self.gateways.network_key(network_id), mode,
                                clock_ms=self.clock)
        return cred, layered, dev

    def gateway(self, networks: list[bytes]) -> GatewayConfig:
        cred = self.gateways.add_gateway(f"gw{os.urandom(2).hex()}", networks)
        return _parse(self.gateways.gateway_config(cred.device_id))

    def gateway_config_doc(self, gateway_id: DeviceId) -> dict[str, object]:
        return self.gateways.gateway_config(gateway_id)

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.store.close()


def sealed_batch(config: GatewayConfig, items: list[bytes], seq: int,
                 drops: list[tuple[str, int, int]] | None = None, ts: int = T0) -> bytes:
    """What a gateway sends upstream, built by hand (for hostile-gateway tests)."""
    keys = derive(config.credential.secret, config.gateway_id, config.credential.epoch,
                  Direction.UP)
    return seal(encode_batch(items, drops or []), keys=keys, seq=seq, route=GATEWAY_BATCH_ROUTE,
                timestamp_ms=ts)


def make_world(root: Path, clock: Clock | None = None, db: str = "cloud.db") -> World:
    clock = clock or Clock()
    store = SQLiteStore(root / db)
    store.migrate()
    keystore = SoftwareKeystore(os.urandom(32))
    registry = Registry(store, keystore, clock_ms=clock)
    gateways = GatewayRegistry(store, keystore, clock_ms=clock)
    pipeline = Pipeline(registry, store, clock_ms=clock)
    ingest = GatewayIngest(gateways, pipeline, store, clock_ms=clock, ttl_ms=0)
    return World(root, store, registry, gateways, pipeline, ingest, clock)
