"""Helpers for the key-lifecycle tests: a real SQLite store file, registry, pipeline and
lifecycle service on one clock the test moves, and a cloud downlink (the MQTT command link's
sealer and its persistent downlink counter)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.errors import RejectReason
from sensorseal.core.ids import Direction, Level
from sensorseal.core.keys import derive
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.lifecycle import KeyLifecycle
from sensorseal.mqtt.commands import CloudLink, DownlinkCounter
from sensorseal.registry import Registry
from sensorseal.server.pipeline import IngestResult, Pipeline
from sensorseal.store.sqlite import SQLiteStore

ROUTE = "/v1/messages"
T0 = 1_750_000_000_000
HOUR_MS = 3_600_000


class Clock:
    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def sealed(cred: DeviceCredential, seq: int, payload: bytes = b"21.5C", *,
           now_ms: int = T0, level: Level = Level.SEALED) -> bytes:
    keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    return seal(payload, keys=keys, seq=seq, route=ROUTE, timestamp_ms=now_ms, level=level)


def reasons(results: list[IngestResult]) -> list[RejectReason | None]:
    return [r.reason for r in results]


@dataclass
class Env:
    path: Path
    store: SQLiteStore
    keystore: SoftwareKeystore
    registry: Registry
    clock: Clock
    pipeline: Pipeline
    counter: DownlinkCounter
    link: CloudLink
    life: KeyLifecycle
    kek: bytes = field(repr=False, default=b"")

    def ingest(self, *msgs: bytes, pipeline: Pipeline | None = None) -> list[IngestResult]:
        return (pipeline or self.pipeline).ingest([(m, ROUTE) for m in msgs], transport="http",
                                                  source="127.0.0.1:1")

    def restart(self) -> Env:
        """Every server-side object anew on the same files (a process restart)."""
        store = SQLiteStore(self.path / "db.sqlite")
        keystore = SoftwareKeystore(self.kek)
        registry = Registry(store, keystore, clock_ms=self.clock)
        pipeline = Pipeline(registry, store, clock_ms=self.clock)
        counter = DownlinkCounter(self.path / "downlink.db")
        link = CloudLink(registry, counter, clock_ms=self.clock)
        life = KeyLifecycle(registry, store, keystore, seal_down=link.seal_down,
                            invalidate=[pipeline.invalidate], clock_ms=self.clock)
        return Env(self.path, store, keystore, registry, self.clock, pipeline, counter, link,
                   life, self.kek)

    def close(self) -> None:
        self.counter.close()
        self.store.close()


def make_env(tmp_path: Path) -> Env:
    store = SQLiteStore(tmp_path / "db.sqlite")
    store.migrate()
    store.close()
    boot = Env(tmp_path, None, None, None, Clock(), None, None, None, None,  # type: ignore[arg-type]
               os.urandom(32))
    return boot.restart()
