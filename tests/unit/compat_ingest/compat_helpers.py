"""Helpers and the `env` fixture (re-exported by conftest.py): a real SQLite store in a tmp
dir, a KEK keystore, the registry and the legacy ingest path driven by a clock the test moves."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sensorseal.compat import valarm
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import Registry
from sensorseal.server.compat_ingest import CompatIngest
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.sqlite import SQLiteStore

T0 = 1_750_000_000_000  # a fixed "now" in ms
SOURCE = "198.51.100.7:40000"
HUB = "YHUBETH1-12345"
METEO = "METEOMK2-1A2B3"
UA = "YoctoHub-Ethernet (v2.1)"
PLACEHOLDER = "0" * 32


class Clock:
    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class Env:
    path: Path
    store: SQLiteStore
    registry: Registry
    clock: Clock
    compat: CompatIngest

    def reasons(self) -> list[str]:
        """Audit reasons of refusals, oldest first."""
        return [e.reason for e in reversed(self.store.events(limit=1000))
                if not e.reason.startswith(("legacy_", "device_", "yocto_command"))]

    def pipeline(self) -> Pipeline:
        return Pipeline(self.registry, self.store, clock_ms=self.clock)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    path = tmp_path / "sensorseal.db"
    store = SQLiteStore(path)
    store.migrate()
    clock = Clock()
    registry = Registry(store, SoftwareKeystore(os.urandom(32)), clock_ms=clock)
    yield Env(path, store, registry, clock, CompatIngest(registry, store, clock_ms=clock))
    store.close()


def valarm_body(device_id: str, *, seq: int | None = 1, ts: int | None = T0,
                readings: dict[str, object] | None = None) -> bytes:
    doc: dict[str, object] = {"device_id": device_id}
    if seq is not None:
        doc["seq"] = seq
    if ts is not None:
        doc["ts"] = ts
    doc["readings"] = {"temp_c": 21.5} if readings is None else readings
    return json.dumps(doc).encode()


def valarm_sig(body: bytes, key: str, alg: str = "sha256") -> str:
    return valarm.sign(body, key.encode(), alg)


def yocto_body(*, uptime: int = 100_000, temp: str = "21.7", sign: bool = True,
               hub: str = HUB) -> bytes:
    """A callback body as a hub writes it, with the sign placeholder."""
    parts = [f'"serial":"{hub}"',
             f'"/api.json":{{"module":{{"serialNumber":"{hub}","upTime":{uptime}}}}}',
             f'"/bySerial/{METEO}/api.json":{{"module":{{"serialNumber":"{METEO}"}},'
             f'"temperature":{{"unit":"C","advertisedValue":"{temp}"}}}}']
    if sign:
        parts.append(f'"sign":"{PLACEHOLDER}"')
    return ("{" + ",".join(parts) + "}").encode()


def hub_sign(raw: bytes, password: str) -> bytes:
    """The hub's algorithm, written out with hashlib (independent of the module)."""
    salt = password if len(password) == 32 else hashlib.md5(password.encode()).hexdigest()
    marker = f'"sign":"{PLACEHOLDER}"'.encode()
    digest = hashlib.md5(raw.replace(marker, f'"sign":"{salt}"'.encode())).hexdigest()
    return raw.replace(marker, f'"sign":"{digest}"'.encode())
