"""Fixtures for the server tests: a real SQLite store in a tmp dir, a registry and a pipeline
driven by a clock the test controls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import Direction, Level
from sensorseal.core.keys import derive
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.sqlite import SQLiteStore

ROUTE = "/v1/messages"
T0 = 1_750_000_000_000  # a fixed "now" in ms


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def sealed(cred: DeviceCredential, seq: int, payload: bytes = b"21.5C", *,
           route: str = ROUTE, timestamp_ms: int | None = T0, level: Level = Level.SEALED,
           epoch: int | None = None) -> bytes:
    """A message as the device would send it."""
    keys = derive(cred.secret, cred.device_id, cred.epoch if epoch is None else epoch,
                  Direction.UP)
    return seal(payload, keys=keys, seq=seq, route=route, timestamp_ms=timestamp_ms, level=level)


@dataclass
class Env:
    path: Path
    store: SQLiteStore
    keystore: SoftwareKeystore
    registry: Registry
    clock: Clock
    pipeline: Pipeline
    kek: bytes = field(repr=False, default=b"")

    def new_pipeline(self, **kw: object) -> Pipeline:
        return Pipeline(self.registry, self.store, clock_ms=self.clock, **kw)  # type: ignore[arg-type]
