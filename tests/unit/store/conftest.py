"""The `store` fixture: every back end the contract suite runs against.

To add a back end (PostgreSQL), add a param here whose factory returns a fresh, migrated, empty
store; test_store_contract.py then runs unchanged against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sensorseal.store import SQLiteStore, Store


def _sqlite_file(tmp_path: Path) -> Store:
    store = SQLiteStore(tmp_path / "contract.db")
    store.migrate()
    return store


def _sqlite_memory(tmp_path: Path) -> Store:
    store = SQLiteStore(":memory:")
    store.migrate()
    return store


BACKENDS: dict[str, Callable[[Path], Store]] = {
    "sqlite-file": _sqlite_file,
    "sqlite-memory": _sqlite_memory,
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = BACKENDS[request.param](tmp_path)
    try:
        yield s
    finally:
        s.close()
