"""Update rollouts end to end, over a real Mosquitto (dynsec ACLs on) and a real HTTP server.

- 100 devices over MQTT, each a real `MqttDevice` (its own paho connection, broker login and
  ACL, persistent session) with a `DeviceUpdater` on disk, all as threads of this one process.
  10 are offline for part of the rollout (the broker kicks and refuses them): 5 before their
  offer, 5 in the middle of their download. One device fails its health check. After a second
  pass every device is installed or failed with its reason; the CLI (a real `sensorseal`
  process) and the console (Starlette TestClient, operator login) show it.
- An HTTP download interrupted by a server stop resumes at the durable offset.
- A forged offer, served by a hostile server in place of the real one, is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mqtt_support
from sensorseal.core.attest import ALG_EDDSA, software_signer
from sensorseal.core.envelope import seal
from sensorseal.core.errors import Rejected
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import broker_password, derive
from sensorseal.datadir import DataDir
from sensorseal.device.device import Device
from sensorseal.mqtt.client import MqttDevice
from sensorseal.mqtt.commands import CloudLink, DownlinkCounter
from sensorseal.mqtt.dynsec import DynsecAdmin
from sensorseal.mqtt.rpc import RpcClient
from sensorseal.operators import OperatorService, Role
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.console import Console
from sensorseal.server.pipeline import Pipeline
from sensorseal.updates.device_updater import DeviceUpdater, UpdateStatus
from sensorseal.updates.manifest import TrustAnchors, sign_manifest
from sensorseal.updates.rollout import Target
from sensorseal.updates.server import (
    MqttRolloutDriver,
    UpdateService,
    manifest_from_payload,
)
from sensorseal.updates.transport import (
    HttpChunkFetcher,
    HttpUpdateClient,
    MqttUpdateAgent,
    Offer,
    encode_offer,
    offer_route,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
CLASS = "thermo-v2"
IMAGE = os.urandom(64 * 1024)
CHUNK = 4096
N_DEVICES = 100
SICK = 0  # fails its health check
OFFLINE_EARLY = range(1, 6)  # kicked before the rollout starts
OFFLINE_MID = range(6, 11)  # kicked after 4 chunks
KICK_AT = 4 * CHUNK
SERVICE = "sensorseal-updates"
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class Vendor:
    def __init__(self) -> None:
        self.private = ed25519.Ed25519PrivateKey.generate()
        self.kid = b"vendor-2025"
        self.trust = TrustAnchors(vendor={self.kid: self.private.public_key()})

    def sign(self, payload: bytes) -> bytes:
        return sign_manifest(manifest_from_payload(payload), software_signer(self.private),
                             self.kid, ALG_EDDSA)


@contextlib.contextmanager
def data_dir(tmp_path: Path) -> Iterator[tuple[DataDir, Any, Registry]]:
    datadir = DataDir(tmp_path / "data", env={})
    datadir.init()
    store, keystore = datadir.open()
    try:
        yield datadir, store, Registry(store, keystore)
    finally:
        store.close()


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_rollout_to_100_devices_over_mqtt_with_10_offline(tmp_path: Path) -> None:
    vendor = Vendor()
    with mqtt_support.mosquitto(tmp_path) as broker, \
            DynsecAdmin(HOST, broker.port, broker.admin_username,
                        broker.admin_password) as admin, \
            data_dir(tmp_path) as (datadir, store, registry):
        service_pw = os.urandom(16).hex()
        admin.ensure_service_account(SERVICE, service_pw)
        creds = [registry.add_device(f"thermo-{i:03}") for i in range(N_DEVICES)]
        t_sync = time.perf_counter()
        for cred in creds:
            store.set_device_group(cred.device_id, "field")
            admin.sync_device(cred.device_id, "active",
                              broker_password(cred.secret, cred.device_id, cred.epoch))
        sync_s = time.perf_counter() - t_sync

        # -- 100 devices: Device + DeviceUpdater + MqttUpdateAgent + MqttDevice, as threads
        updaters: list[DeviceUpdater] = []
        clients: list[MqttDevice] = []
        agents: list[MqttUpdateAgent] = []
        try:
            for i, cred in enumerate(creds):
                upd = DeviceUpdater.provision(tmp_path / "dev" / f"{i}" / "updater",
                                              image=b"factory image", version=1,
                                              device_class=CLASS, trust=vendor.trust,
                                              health_check=lambda _p, i=i: i != SICK)
                agent = MqttUpdateAgent(upd, chunk_timeout_s=3.0, answer_timeout_s=5.0)
                dev = Device(cred, tmp_path / "dev" / f"{i}" / "state")
                mdev = MqttDevice(dev, HOST, broker.port,
                                  outbox_path=tmp_path / "dev" / f"{i}" / "outbox.db",
                                  reconnect_max_s=1.0)
                agent.register(mdev.rpc)
                updaters.append(upd)
                agents.append(agent)
                clients.append(mdev.start())
            for mdev in clients:
                assert mdev.wait_connected(15), f"{mdev} did not connect"

            # -- server side: create, sign (vendor), roll out to the whole group
            link = CloudLink(registry, DownlinkCounter(tmp_path / "downlink.db"))
            service = UpdateService(store, sealer=link)
            row = service.create_manifest(IMAGE, device_class=CLASS, version=2)
            rid, chosen = service.start_rollout(vendor.sign(row.payload), Target.whole_group(
                "field", service.group_members("field")), rollout_id="fw-2", label="group field")
            assert len(chosen) == N_DEVICES

            cut_mid_download = {creds[i].device_id for i in OFFLINE_MID}
            for i in OFFLINE_EARLY:
                admin.disable_client(creds[i].device_id.hex())  # kicked, and refused
            wait_for(lambda: not any(clients[i].connected for i in OFFLINE_EARLY), 10,
                     "the early devices to go offline")
            kicked: set[DeviceId] = set()
            kick_lock = threading.Lock()

            def on_chunk(device_id: DeviceId, offset: int) -> None:
                if offset >= KICK_AT and device_id in cut_mid_download:
                    with kick_lock:
                        if device_id in kicked:
                            return
                        kicked.add(device_id)
                    admin.disable_client(device_id.hex())

            with RpcClient(link, HOST, broker.port, username=SERVICE,
                           password=service_pw) as rpc:
                driver = MqttRolloutDriver(service, rpc, chunk_size=CHUNK, timeout_s=2.0,
                                           parallel=32, on_chunk=on_chunk)
                first = driver.drive(rid)
                after_first = service.summary(rid).as_dict()
                assert first.outcomes["unreachable"] == 10, first.outcomes
                assert after_first["states"]["installed"] == N_DEVICES - 11
                assert after_first["failures"] == {"health_check_failed": 1}
                assert not after_first["complete"]
                for i in OFFLINE_MID:  # they got part of the image before they were cut off
                    rec = store.rollout_device(rid, creds[i].device_id)
                    assert rec.state == "downloading" and rec.offset >= KICK_AT, rec

                # -- the 10 come back; the second pass finishes them, resuming mid-image
                for i in (*OFFLINE_EARLY, *OFFLINE_MID):
                    admin.enable_client(creds[i].device_id.hex())
                wait_for(lambda: all(c.connected for c in clients), 20,
                         "the offline devices to reconnect")
                second = driver.drive(rid)
            final = service.summary(rid).as_dict()
            assert final["complete"], final
            assert final["states"]["installed"] == N_DEVICES - 1
            assert final["failures"] == {"health_check_failed": 1}
            for i in OFFLINE_MID:
                assert second.first_need[creds[i].device_id.hex()] >= KICK_AT  # resumed
            for i in OFFLINE_EARLY:
                assert second.first_need[creds[i].device_id.hex()] == 0
            for i, upd in enumerate(updaters):
                assert upd.installed_version == (1 if i == SICK else 2)
                if i != SICK:
                    assert upd.active_image.read_bytes() == IMAGE
            assert sum(a.chunks_received for a in agents) >= (N_DEVICES - 1) * len(IMAGE) // CHUNK
            rejected = sum(sum(c.stats.downlink_rejected.values()) for c in clients)
            assert rejected == 0  # stale requests after a reconnect are answered, not refused
        finally:
            for mdev in clients:
                mdev.stop()

        total_s = first.seconds + second.seconds
        figures = {
            "devices": N_DEVICES, "image_bytes": len(IMAGE), "chunk_bytes": CHUNK,
            "pass1_s": round(first.seconds, 2), "pass1_chunks": first.chunks,
            "pass2_s": round(second.seconds, 2), "pass2_chunks": second.chunks,
            "chunks_per_s_pass1": round(first.chunks / first.seconds),
            "kib_per_s_pass1": round(first.bytes_sent / 1024 / first.seconds),
            "rollout_s": round(total_s, 2), "dynsec_sync_100_s": round(sync_s, 2),
        }
        print("\nupdate rollout figures:", json.dumps(figures))

        # -- status in the CLI: a real `sensorseal` process on the same data directory
        cli = subprocess.run([sys.executable, "-m", "sensorseal", "--data-dir",
                              str(datadir.path), "update", "status", rid],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "160"})
        assert cli.returncode == 0, cli.stderr
        assert "100 devices - complete" in cli.stdout
        assert re.search(r"\b0\s+│\s+0\s+│\s+0\s+│\s+0\s+│\s+99\s+│\s+1\b", cli.stdout), cli.stdout
        assert creds[SICK].device_id.hex() in cli.stdout and "health_check_failed" in cli.stdout
        as_json = subprocess.run([sys.executable, "-m", "sensorseal", "--data-dir",
                                  str(datadir.path), "update", "status", rid, "--json"],
                                 capture_output=True, text=True, timeout=60)
        assert json.loads(as_json.stdout)["states"]["installed"] == 99

        # -- and in the console: a viewer signs in and reads the rollouts page
        pipeline = Pipeline(registry, store)
        operators = OperatorService(store, hasher=FAST_HASHER)
        operators.add("vera", "correct horse battery", Role.VIEWER, None, actor="test")
        console = Console(pipeline, registry, store, token_check=datadir.check_token,
                          operators=operators)
        app = create_app(pipeline, registry, store, token_check=datadir.check_token,
                         console=console, updates=service)
        with TestClient(app, base_url="http://testserver", follow_redirects=False) as web:
            assert web.get("/console/updates").status_code == 303  # sign in first
            login = web.get("/console/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf is not None
            r = web.post("/console/login", data={"name": "vera",
                                                 "password": "correct horse battery",
                                                 "csrf": csrf.group(1)})
            assert r.status_code == 303
            page = web.get("/console/updates")
            assert page.status_code == 200
            assert 'data-rollout="fw-2"' in page.text
            assert '<td class="num" data-state="installed">99</td>' in page.text
            assert '<td class="num" data-state="failed">1</td>' in page.text
            assert "health_check_failed" in page.text and "complete" in page.text


# --- HTTP: resume after the server went away, and a forged offer -------------------------------

class Server:
    """uvicorn serving an app on a fixed 127.0.0.1 port in a thread; stop() and start again."""

    def __init__(self, app: Any, port: int) -> None:
        self.app, self.port = app, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Server:
        config = uvicorn.Config(self.app, host=HOST, port=self.port, lifespan="off",
                                log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server is not None and self._server.started, 10, "uvicorn")
        return self

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _http_setup(tmp_path: Path, store: Any, registry: Registry) -> tuple[UpdateService, Any]:
    link = CloudLink(registry, DownlinkCounter(tmp_path / "downlink.db"))
    service = UpdateService(store, sealer=link)
    app = create_app(Pipeline(registry, store), registry, store, token_check=lambda _t: False,
                     updates=service)
    return service, app


def test_http_download_resumes_after_the_server_went_away(tmp_path: Path) -> None:
    vendor = Vendor()
    with data_dir(tmp_path) as (_datadir, store, registry):
        cred = registry.add_device("thermo")
        service, app = _http_setup(tmp_path, store, registry)
        row = service.create_manifest(IMAGE, device_class=CLASS, version=2)
        rid, _ = service.start_rollout(vendor.sign(row.payload),
                                       Target.devices([cred.device_id]))
        server = Server(app, free_port()).start()
        upd = DeviceUpdater.provision(tmp_path / "updater", image=b"factory", version=1,
                                      device_class=CLASS, trust=vendor.trust,
                                      health_check=lambda _p: True)
        client = HttpUpdateClient(Device(cred, tmp_path / "state"), upd, server.url,
                                  chunk_size=CHUNK)
        offer = client.fetch_offer()
        assert offer is not None
        served: list[int] = []

        def fetch_then_lose_the_server(offset: int) -> bytes:
            assert client.last_fetcher is not None
            if len(served) == 7:  # 7 chunks durable, then the server goes away
                server.stop()
            served.append(offset)
            return client.last_fetcher(offset)

        client.last_fetcher = HttpChunkFetcher(client.client, server.url, offer.image, CHUNK)
        t0 = time.perf_counter()
        first = upd.install(offer.manifest, fetch_then_lose_the_server, now_ms=service.now_ms())
        assert first.status is UpdateStatus.INCOMPLETE and first.offset == 7 * CHUNK
        assert "ConnectError" in first.detail and upd.installed_version == 1

        server.start()  # back, same port; the device asks again and resumes
        result = client.run_once()
        elapsed = time.perf_counter() - t0
        assert isinstance(result, type(first)) and result.status is UpdateStatus.INSTALLED
        assert client.last_fetcher is not None
        assert client.last_fetcher.ranges[0] == 7 * CHUNK  # resumed, not restarted
        assert client.last_fetcher.received == len(IMAGE) - 7 * CHUNK
        assert upd.active_image.read_bytes() == IMAGE
        assert service.summary(rid).as_dict()["states"]["installed"] == 1
        server.stop()
        client.close()
        print(f"\nhttp resume: {len(IMAGE)} bytes in {CHUNK}-byte ranges, "
              f"{(len(IMAGE) / 1024) / elapsed:.0f} KiB/s including a server restart")


def test_forged_offer_from_a_hostile_server_is_refused(tmp_path: Path) -> None:
    vendor = Vendor()
    with data_dir(tmp_path) as (_datadir, store, registry):
        cred = registry.add_device("thermo")
        service, app = _http_setup(tmp_path, store, registry)
        row = service.create_manifest(IMAGE, device_class=CLASS, version=2)
        genuine = vendor.sign(row.payload)
        service.start_rollout(genuine, Target.devices([cred.device_id]))
        route = offer_route(cred.device_id)
        real = Server(app, free_port()).start()
        captured = TestClient(app).get(route).content  # a real offer, recorded on the path
        real.stop()
        # The attacker holds a genuinely signed manifest (manifests are public), but not the
        # device's downlink keys: it seals its offer with a key of its own.
        body = encode_offer(Offer("evil", genuine, hashlib.sha256(IMAGE).hexdigest(),
                                  len(IMAGE)))
        forged = seal(body, keys=derive(os.urandom(32), cred.device_id, cred.epoch,
                                        Direction.DOWN),
                      seq=10**6, route=route, timestamp_ms=None, level=Level.SEALED)
        answers = iter([forged, captured, captured])

        async def hostile(_request: Any) -> Response:
            return Response(next(answers), media_type="application/cose")

        evil = Server(Starlette(routes=[Route(route, hostile)]), free_port()).start()
        upd = DeviceUpdater.provision(tmp_path / "updater", image=b"factory", version=1,
                                      device_class=CLASS, trust=vendor.trust,
                                      health_check=lambda _p: True)
        client = HttpUpdateClient(Device(cred, tmp_path / "state"), upd, evil.url)
        outcomes: list[str] = []
        for _ in range(3):
            try:
                result = client.run_once()
                outcomes.append(str(getattr(result, "status", result)))
            except Rejected as exc:
                outcomes.append(exc.reason.value)
        evil.stop()
        client.close()
        # 1. forged: no key of the device opens it. 2. the captured genuine offer opens (the
        # hostile server cannot serve the image: nothing installs). 3. its replay is refused.
        assert outcomes[0] in ("decrypt_failed", "bad_mac"), outcomes
        assert outcomes[1:] == ["incomplete", "replay"], outcomes
        assert upd.installed_version == 1
