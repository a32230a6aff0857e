"""Fixtures for the console tests: a real SQLite store, registry, pipeline and console app,
driven through Starlette's TestClient (in-process HTTP), with a clock the test controls."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from starlette.testclient import TestClient

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import Direction, Level
from sensorseal.core.keys import derive
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.operators import LoginLimiter, OperatorService, Role
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.console import Console
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.sqlite import SQLiteStore

T0 = 1_750_000_000_000
MACHINE_TOKEN = "machine-token-" + "x" * 30
PASSWORD = "correct horse battery"
# cheap argon2 for tests (the production defaults cost ~50 ms per hash)
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class Clock:
    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def sealed(cred: DeviceCredential, seq: int, payload: bytes = b'{"temp_c": 21.5}', *,
           timestamp_ms: int | None = T0, level: Level = Level.SEALED) -> bytes:
    keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    return seal(payload, keys=keys, seq=seq, route="/v1/messages", timestamp_ms=timestamp_ms,
                level=level)


@dataclass
class Env:
    store: SQLiteStore
    registry: Registry
    pipeline: Pipeline
    console: Console
    clock: Clock
    client: TestClient

    @property
    def operators(self) -> OperatorService:
        return self.console.operators

    def add_operator(self, name: str, role: Role, groups: frozenset[str] | None = None) -> None:
        self.operators.add(name, PASSWORD, role, groups, actor="test")

    def device(self, name: str, group: str | None = None) -> DeviceCredential:
        cred = self.registry.add_device(name, actor="test")
        if group is not None:
            self.console.policies.set_group(cred.device_id, group, actor="test")
        return cred

    def new_client(self) -> TestClient:
        return TestClient(self.client.app, base_url="http://testserver",
                          follow_redirects=False)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD) -> TestClient:
    page = client.get("/console/login")
    assert page.status_code == 200
    r = client.post("/console/login", data={"name": name, "password": password,
                                            "csrf": csrf_of(page.text)})
    assert r.status_code == 303, r.text
    return client


def page_csrf(client: TestClient, path: str = "/console/") -> str:
    r = client.get(path)
    assert r.status_code == 200, r.text
    return csrf_of(r.text)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = SQLiteStore(tmp_path / "sensorseal.db")
    store.migrate()
    clock = Clock()
    registry = Registry(store, SoftwareKeystore(os.urandom(32)), clock_ms=clock)
    pipeline = Pipeline(registry, store, clock_ms=clock)

    def machine(token: str) -> bool:
        return token == MACHINE_TOKEN

    console = Console(pipeline, registry, store, token_check=machine,
                      operators=OperatorService(store, clock_ms=clock, hasher=FAST_HASHER),
                      limiter=LoginLimiter(clock_ms=clock))
    app = create_app(pipeline, registry, store, token_check=machine, console=console)
    client = TestClient(app, base_url="http://testserver", follow_redirects=False)
    yield Env(store, registry, pipeline, console, clock, client)
    client.close()
    store.close()
