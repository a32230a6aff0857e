"""Fixtures for the server tests; the helpers live in server_support (a unique module name,
so that several test folders' helpers never shadow each other)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import Clock, Env

from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.sqlite import SQLiteStore


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    path = tmp_path / "sensorseal.db"
    store = SQLiteStore(path)
    store.migrate()
    kek = os.urandom(32)
    keystore = SoftwareKeystore(kek)
    clock = Clock()
    registry = Registry(store, keystore, clock_ms=clock)
    pipeline = Pipeline(registry, store, clock_ms=clock)
    yield Env(path, store, keystore, registry, clock, pipeline, kek)
    store.close()
