"""The `store` fixture: every back end the contract suite runs against.

To add a back end (PostgreSQL), add a param here whose factory returns a fresh, migrated, empty
store; test_store_contract.py then runs unchanged against it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
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


# -- PostgreSQL: one fresh database (random name) per test session, emptied between tests --------

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for pg_support


class _PostgresSession:
    """Creates the session's database on first use and drops it at the end of the run."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._url: str | None = None

    def url(self) -> str:
        if self._url is None:
            import pg_support

            pg_support.require_postgres()
            self._url = self._stack.enter_context(pg_support.fresh_database())
        return self._url

    def close(self) -> None:
        self._stack.close()


_PG = _PostgresSession()


def _postgres(tmp_path: Path, insert_mode: str = "unnest") -> Store:
    from sensorseal.store.postgres import PostgresStore

    store = PostgresStore(_PG.url(), pool_size=4, insert_mode=insert_mode)  # type: ignore[arg-type]
    store.migrate()
    with store._tx() as conn:  # every test starts from empty tables (the schema stays)
        conn.execute("TRUNCATE telemetry, device_secrets, devices, audit, meta"
                     " RESTART IDENTITY CASCADE")
    return store


BACKENDS["postgresql"] = _postgres
BACKENDS["postgresql-copy"] = lambda tmp_path: _postgres(tmp_path, "copy")


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_database() -> Iterator[None]:
    yield
    _PG.close()


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = BACKENDS[request.param](tmp_path)
    try:
        yield s
    finally:
        s.close()
