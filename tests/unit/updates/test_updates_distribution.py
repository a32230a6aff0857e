"""The distribution service over HTTP (Starlette TestClient, a real SQLite store, registry and
pipeline): create -> sign -> rollout -> sealed offer -> Range chunks -> sealed reports, and what
the server and the device refuse on the way."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from starlette.testclient import TestClient
from updates_support import DEVICE_CLASS, Key

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import Direction, Level
from sensorseal.core.keys import derive
from sensorseal.device.device import Device
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.mqtt.commands import CloudLink, DownlinkCounter
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import UpdateDeviceRow
from sensorseal.store.sqlite import SQLiteStore
from sensorseal.updates.device_updater import DeviceUpdater, UpdateStatus
from sensorseal.updates.manifest import TrustAnchors, sign_manifest
from sensorseal.updates.rollout import Target
from sensorseal.updates.server import UpdateService, manifest_from_payload, signed_payload
from sensorseal.updates.transport import (
    REPORT_ROUTE,
    HttpUpdateClient,
    encode_report,
    offer_route,
)

IMAGE = os.urandom(40_000)


@dataclass
class Env:
    store: SQLiteStore
    registry: Registry
    service: UpdateService
    client: TestClient
    tmp: Path

    def device(self, name: str, group: str | None = "lab") -> DeviceCredential:
        cred = self.registry.add_device(name, actor="test")
        if group is not None:
            self.store.set_device_group(cred.device_id, group)
        return cred

    def updater(self, cred: DeviceCredential, trust: TrustAnchors, *,
                healthy: bool = True, device_class: str = DEVICE_CLASS) -> DeviceUpdater:
        return DeviceUpdater.provision(self.tmp / f"upd-{cred.device_id}", image=b"factory",
                                       version=1, device_class=device_class, trust=trust,
                                       health_check=lambda _p: healthy)

    def http_device(self, cred: DeviceCredential, updater: DeviceUpdater,
                    chunk: int = 8192) -> HttpUpdateClient:
        dev = Device(cred, self.tmp / f"state-{cred.device_id}")
        return HttpUpdateClient(dev, updater, "http://testserver", client=self.client,
                                chunk_size=chunk)

    def signed(self, vendor: Key, version: int = 2, image: bytes = IMAGE) -> bytes:
        row = self.service.create_manifest(image, device_class=DEVICE_CLASS, version=version)
        return sign_manifest(manifest_from_payload(row.payload), vendor.signer, vendor.kid,
                             vendor.alg)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = SQLiteStore(tmp_path / "sensorseal.db")
    store.migrate()
    registry = Registry(store, SoftwareKeystore(os.urandom(32)))
    pipeline = Pipeline(registry, store)
    link = CloudLink(registry, DownlinkCounter(tmp_path / "downlink.db"))
    service = UpdateService(store, sealer=link)
    app = create_app(pipeline, registry, store, token_check=lambda _t: False, updates=service)
    with TestClient(app, base_url="http://testserver") as client:
        yield Env(store, registry, service, client, tmp_path)
    store.close()


def test_store_round_trip_and_compare_and_set(env: Env, vendor: Key) -> None:
    cred = env.device("a")
    signed = env.signed(vendor)
    rid, chosen = env.service.start_rollout(signed, Target.devices([cred.device_id]),
                                            rollout_id="r1", label="devices")
    assert (rid, chosen) == ("r1", (cred.device_id,))
    [row] = env.store.rollout_devices("r1")
    assert row.state == "pending" and row.revision == 0
    moved = UpdateDeviceRow(cred.device_id, "offered", None, 0, 1, 5, 1)
    assert env.store.replace_rollout_device("r1", moved, expect_revision=0)
    assert not env.store.replace_rollout_device("r1", moved, expect_revision=0)  # stale
    assert env.store.open_rollouts_of(cred.device_id) == ["r1"]
    assert env.store.get_rollout("r1").target == "devices"  # type: ignore[union-attr]
    assert env.store.get_image(hashlib.sha256(IMAGE).digest()) == IMAGE
    with pytest.raises(ConfigError):  # the id is taken
        env.service.start_rollout(signed, Target.devices([cred.device_id]), rollout_id="r1")


def test_http_rollout_installs_and_reports(env: Env, vendor: Key, trust: TrustAnchors) -> None:
    creds = [env.device(f"d{i}") for i in range(3)]
    signed = env.signed(vendor)
    rid, chosen = env.service.start_rollout(
        signed, Target.whole_group("lab", env.service.group_members("lab")))
    assert len(chosen) == 3
    for cred in creds:
        upd = env.updater(cred, trust)
        client = env.http_device(cred, upd)
        result = client.run_once()
        assert result is not None and result.status is UpdateStatus.INSTALLED  # type: ignore
        assert upd.installed_version == 2 and upd.active_image.read_bytes() == IMAGE
        assert client.last_fetcher is not None and client.last_fetcher.requests == 5
        assert client.run_once() is None  # installed: no offer any more
    summary = env.service.summary(rid)
    assert summary.complete and summary.as_dict()["states"]["installed"] == 3
    # the reports went through the ingest pipeline: stored like telemetry, on their own route
    assert {r.route for r in env.store.telemetry(limit=10)} == {REPORT_ROUTE}


def test_failures_are_recorded_with_their_reason(env: Env, vendor: Key,
                                                 trust: TrustAnchors) -> None:
    sick, other = env.device("sick"), env.device("other-class")
    rid, _ = env.service.start_rollout(env.signed(vendor), Target.whole_group(
        "lab", env.service.group_members("lab")))
    for cred, upd in ((sick, env.updater(sick, trust, healthy=False)),
                      (other, env.updater(other, trust, device_class="pump-v1"))):
        env.http_device(cred, upd).run_once()
        assert upd.installed_version == 1  # still running what it had
    summary = env.service.summary(rid).as_dict()
    assert summary["complete"] and summary["failures"] == {"health_check_failed": 1,
                                                           "wrong_device_class": 1}


def test_forged_replayed_and_misdirected_offers_are_refused(env: Env, vendor: Key,
                                                           trust: TrustAnchors) -> None:
    cred, neighbour = env.device("victim"), env.device("neighbour")
    env.service.start_rollout(env.signed(vendor), Target.devices([cred.device_id,
                                                                  neighbour.device_id]))
    upd = env.updater(cred, trust)
    client = env.http_device(cred, upd)
    route = offer_route(cred.device_id)
    genuine = env.client.get(route)
    assert genuine.status_code == 200 and b"manifest" not in genuine.content  # sealed
    device = client.device
    device.open_downlink(genuine.content, route)  # the device reads it once ...
    with pytest.raises(Rejected) as replay:  # ... and never again
        device.open_downlink(genuine.content, route)
    assert replay.value.reason is RejectReason.REPLAY
    attacker = derive(os.urandom(32), cred.device_id, cred.epoch, Direction.DOWN)
    forged = seal(b"anything", keys=attacker, seq=10**6, route=route, timestamp_ms=None,
                  level=Level.SEALED)
    with pytest.raises(Rejected):
        device.open_downlink(forged, route)
    theirs = env.client.get(offer_route(neighbour.device_id)).content
    with pytest.raises(Rejected):  # sealed for the neighbour: not ours, whatever the route
        device.open_downlink(theirs, route)
    assert upd.installed_version == 1


def test_import_refuses_what_create_did_not_produce(env: Env, vendor: Key) -> None:
    row = env.service.create_manifest(IMAGE, device_class=DEVICE_CLASS, version=2)
    m = manifest_from_payload(row.payload)
    other = sign_manifest(type(m)(m.sequence, m.device_class, 9, m.digest, m.size,
                                  m.created_ms, m.expires_ms), vendor.signer, vendor.kid,
                          vendor.alg)
    with pytest.raises(ConfigError, match="not created here"):
        env.service.import_signed(other)
    assert signed_payload(sign_manifest(m, vendor.signer, vendor.kid, vendor.alg)) == row.payload
    with pytest.raises(ConfigError):
        env.service.add_image(b"x" * (env.service.max_image + 1))


def test_image_ranges(env: Env) -> None:
    sha = env.service.add_image(IMAGE).hex()
    url = f"/v1/updates/images/{sha}"
    r = env.client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == IMAGE[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(IMAGE)}"
    r = env.client.get(url, headers={"Range": "bytes=39990-"})
    assert r.status_code == 206 and r.content == IMAGE[39990:]
    for bad in ("bytes=40000-", "bytes=5-1", "bytes=0-1,5-6", "items=0-1", "bytes=-5"):
        r = env.client.get(url, headers={"Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{len(IMAGE)}"
    assert env.client.get(url).content == IMAGE  # small: whole image without Range
    assert env.client.get("/v1/updates/images/" + "0" * 64).status_code == 404


def test_reports_must_be_sealed_and_fit_the_rollout(env: Env, vendor: Key) -> None:
    cred = env.device("d")
    rid, _ = env.service.start_rollout(env.signed(vendor), Target.devices([cred.device_id]))
    dev = Device(cred, env.tmp / "state")
    headers = {"Content-Type": "application/cose"}
    # a report about another rollout: the envelope is authentic (stored), the report refused
    data = dev.seal(encode_report("no-such-rollout", {"status": "installed", "manifest": "x"}),
                    route=REPORT_ROUTE)
    assert env.client.post(REPORT_ROUTE, content=data, headers=headers).status_code == 202
    assert env.store.count_events_by_reason().get("update_report_refused") == 1
    # a report sealed for another route is refused by the pipeline (route binding)
    data = dev.seal(encode_report(rid, {"status": "installed", "manifest_seq": 1}),
                    route="/v1/messages")
    assert env.client.post(REPORT_ROUTE, content=data, headers=headers).status_code == 403
    # garbage and wrong content types
    assert env.client.post(REPORT_ROUTE, content=b"\x00" * 10,
                           headers=headers).status_code == 403
    assert env.client.post(REPORT_ROUTE, content=cbor2.dumps({}),
                           headers={"Content-Type": "application/cbor"}).status_code == 415
    assert env.service.summary(rid).as_dict()["states"]["pending"] == 1


def test_console_rollout_page_counts_only_the_operators_groups(env: Env, vendor: Key) -> None:
    import re

    from argon2 import PasswordHasher

    from sensorseal.operators import OperatorService, Role
    from sensorseal.server.console import Console

    lab = [env.device(f"lab{i}") for i in range(3)]
    field = [env.device(f"field{i}", group="field") for i in range(2)]
    env.service.start_rollout(env.signed(vendor), Target.devices(
        [c.device_id for c in lab + field]), rollout_id="mixed", label="5 devices")
    env.service.apply_report(field[0].device_id, {"rollout": "mixed", "status": "rejected",
                                                  "reason": "rollback", "manifest_seq": 1})
    pipeline = Pipeline(env.registry, env.store)
    operators = OperatorService(env.store, hasher=PasswordHasher(time_cost=1, memory_cost=1024,
                                                                 parallelism=1))
    operators.add("fiona", "correct horse battery", Role.VIEWER, frozenset({"field"}),
                  actor="test")
    operators.add("lara", "correct horse battery", Role.VIEWER, frozenset({"nowhere"}),
                  actor="test")
    app = create_app(pipeline, env.registry, env.store, token_check=lambda _t: False,
                     console=Console(pipeline, env.registry, env.store,
                                     token_check=lambda _t: False, operators=operators),
                     updates=env.service)

    def page_as(name: str) -> str:
        with TestClient(app, base_url="http://testserver", follow_redirects=False) as web:
            login = web.get("/console/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf is not None
            assert web.post("/console/login", data={"name": name,
                                                    "password": "correct horse battery",
                                                    "csrf": csrf.group(1)}).status_code == 303
            r = web.get("/console/updates")
            assert r.status_code == 200
            return r.text

    fiona = page_as("fiona")
    assert 'data-rollout="mixed"' in fiona
    assert '<td class="num" data-state="pending">1</td>' in fiona  # her 2 field devices only
    assert '<td class="num" data-state="failed">1</td>' in fiona and "rollback" in fiona
    assert lab[0].device_id.hex() not in fiona
    assert 'data-rollout="mixed"' not in page_as("lara")  # no device of hers: not listed
