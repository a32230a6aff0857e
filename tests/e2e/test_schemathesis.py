"""schemathesis against the real app over real HTTP: the OpenAPI spec the server publishes at
/openapi.json drives generated requests (at most 30 per operation); none may get a 5xx.

The server runs on a free 127.0.0.1 port with the console mounted, a provisioned device and a
scoped API token, so authenticated routes are exercised beyond their 401.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from sensorseal.datadir import DataDir
from sensorseal.operators import OperatorService, Role
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.openapi import SPEC
from sensorseal.server.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# Envelopes and batches are opaque bytes to the spec; generate bytes for them.
schemathesis.openapi.media_type("application/cose", st.binary(max_size=512))
schemathesis.openapi.media_type("application/cbor", st.binary(max_size=512))

schema = schemathesis.openapi.from_dict(SPEC)


class _Server:
    def __init__(self, tmp: Path) -> None:
        datadir = DataDir(tmp / "data")
        self.machine_token = datadir.init()
        self.store, keystore = datadir.open()
        registry = Registry(self.store, keystore)
        pipeline = Pipeline(registry, self.store)
        app = create_app(pipeline, registry, self.store, token_check=datadir.check_token,
                         console=True)
        cred = registry.add_device("fuzzed", actor="test")
        self.device = cred.device_id.hex()
        ops = OperatorService(self.store)
        _, self.viewer_token = ops.create_token("fuzz", Role.OPERATOR, None, actor="test")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", access_log=False,
                                                    log_level="warning"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        self.store.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    server = _Server(tmp_path_factory.mktemp("schemathesis"))
    yield server
    server.stop()


def test_spec_served_is_the_spec_tested(live: _Server) -> None:
    assert httpx.get(live.url + "/openapi.json").json()["paths"].keys() == SPEC["paths"].keys()


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, live: _Server) -> None:
    token = live.machine_token if case.path.startswith("/v1/") else live.viewer_token
    # about half the time aim at the real device, so the success paths run too
    if case.path_parameters and "device_id" in case.path_parameters and \
            len(repr(case.query)) % 2 == 0:
        case.path_parameters["device_id"] = live.device
    case.call_and_validate(base_url=live.url, headers={"Authorization": f"Bearer {token}"},
                           checks=[not_a_server_error])
