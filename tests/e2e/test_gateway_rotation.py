"""Key rotation through a real gateway process (`sensorseal gateway run`, loopback UDP) and the
cloud's gateway route on HTTPS (uvicorn, the real routes.py/cloud.py code, its clock injected):

1. `network rotate` + `gateway rotate` while devices stream: a gateway still on its old
   configuration keeps delivering under the old gateway epoch; restarted with the exported
   configuration it acks frames of BOTH network key epochs and delivers under the new gateway
   epoch. Every acked frame is stored exactly once.
2. The grace period ends (the cloud's clock is moved, nothing sleeps): a batch sealed under the
   old gateway epoch is refused and audited as unknown_epoch; a gateway restarted with a
   configuration exported now no longer acks the old network epoch, counts the frames as
   `link_epoch` and the cloud audits them as unknown_epoch.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "gateway"))
sys.path.insert(0, str(Path(__file__).parent))
from gateway_world import Clock, World, make_world, sealed_batch
from test_gateway import GatewayProcess, free_port, issue, make_ca

from sensorseal.gateway.cloud import GatewayIngest
from sensorseal.gateway.config import _parse, write_config
from sensorseal.gateway.node import LayeredDevice, UdpRadio
from sensorseal.gateway.provision import parse_network_key
from sensorseal.gateway.routes import gateway_routes
from sensorseal.gateway.upstream import Upstream, UpstreamError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HOUR = 3_600_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "cloud-ca")
    cert, key = issue(d, ca, "cloud", server=True)
    return {"ca": ca[0], "cert": cert, "key": key}


class GatewayCloud:
    """The gateway route (routes.py + GatewayIngest) on uvicorn with TLS, on the world's
    clock, so that a grace period can end without waiting for it."""

    def __init__(self, world: World, cert: Path, key: Path) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ingest = GatewayIngest(world.gateways, world.pipeline, world.store,
                                    clock_ms=world.clock)
        app = Starlette(routes=gateway_routes(self.ingest, world.pipeline))
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                                ssl_certfile=str(cert), ssl_keyfile=str(key),
                                ssl_cert_reqs=ssl.CERT_NONE)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    # wall-clock start: the gateway process judges network key grace on its own (real) clock
    w = make_world(tmp_path, Clock(time.time_ns() // 1_000_000))
    yield w
    w.close()


def wait_for(check: object, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def link_epoch_drops(world: World) -> int:
    """Frames the gateway reported as dropped under an expired or unknown network epoch."""
    return sum(int(e.detail.split()[0]) for e in world.store.events(reason="unknown_epoch")
               if "link_epoch" in e.detail)


def test_network_and_gateway_rotation_end_to_end(world: World, pki: dict[str, Path],
                                                 tmp_path: Path) -> None:
    net, _ = world.network("e1+e4")
    cred_a, dev_a, _ = world.device(net, "e3")
    cred_b, dev_b, _ = world.device(net, "e2")
    assert dev_a is not None and dev_b is not None
    gw_cred = world.gateways.add_gateway("street-7", [net])
    write_config(tmp_path / "v1.json", world.gateways.gateway_config(gw_cred.device_id))
    cloud = GatewayCloud(world, pki["cert"], pki["key"])
    uport = free_port(socket.SOCK_DGRAM)
    buffer = tmp_path / "buffer.db"
    gw = GatewayProcess(tmp_path / "v1.json", buffer, cloud.url, pki["ca"], uport)
    radios = {id(d): UdpRadio(("127.0.0.1", uport), d.network, timeout_s=0.2)
              for d in (dev_a, dev_b)}
    acked: list[bytes] = []

    def send(dev: LayeredDevice, payload: bytes, attempts: int = 25) -> bool:
        frame, seq = dev.frame(payload)
        ok = radios[id(dev)].send(frame, dev.sender, seq, attempts=attempts)
        if ok:
            acked.append(payload)
        return ok

    def stored() -> list[bytes]:
        return [r.payload for r in world.store.telemetry(limit=10_000)]

    try:
        gw.start()
        for i in range(3):
            assert send(dev_a, b'{"a":%d}' % i) and send(dev_b, b'{"b":%d}' % i)
        wait_for(lambda: len(stored()) == 6, "first frames not delivered")

        # the operator rotates the network key and the gateway key (grace 1 h)
        key1, text = world.gateways.rotate_network(net, grace_ms=HOUR)
        new_gw = world.gateways.rotate_gateway(gw_cred.device_id, grace_ms=HOUR)
        write_config(tmp_path / "v2.json", world.gateways.gateway_config(gw_cred.device_id))
        # the running gateway still has the old configuration: old gateway epoch, in grace
        for i in range(3, 5):
            assert send(dev_a, b'{"a":%d}' % i) and send(dev_b, b'{"b":%d}' % i)
        wait_for(lambda: len(stored()) == 10, "old gateway epoch not accepted in grace")

        # restart with the new configuration; device a takes the new key, device b not yet
        gw.stop()
        gw = GatewayProcess(tmp_path / "v2.json", buffer, cloud.url, pki["ca"], uport)
        gw.start()
        dev_a.rekey(parse_network_key(text))
        radios[id(dev_a)].rekey(key1)
        for i in range(5, 8):
            assert send(dev_a, b'{"a":%d}' % i)  # network epoch 1
            assert send(dev_b, b'{"b":%d}' % i)  # network epoch 0, in grace
        wait_for(lambda: len(stored()) == 16, "both network epochs not delivered")
        assert sorted(stored()) == sorted(acked)  # every acked frame, exactly once
        assert world.store.count_telemetry(cred_a.device_id) == 8
        assert world.store.count_telemetry(cred_b.device_id) == 8

        # the grace period ends (cloud clock moved on; nothing sleeps)
        world.clock.now_ms += HOUR + 1
        old_cfg = _parse(json.loads((tmp_path / "v1.json").read_text()))
        up = Upstream(cloud.url, ca_file=pki["ca"])
        with pytest.raises(UpstreamError) as exc:
            up.send(sealed_batch(old_cfg, [], 10_000, ts=world.clock.now_ms))
        assert not exc.value.retry  # refused for good (403), not an outage
        up.close()
        assert any("gateway epoch" in e.detail and "grace period over" in e.detail
                   for e in world.store.events(reason="unknown_epoch"))
        doc = world.gateways.gateway_config(gw_cred.device_id)
        assert [n["epoch"] for n in doc["networks"]] == [1]
        assert doc["gateway"] == new_gw.encode()
        write_config(tmp_path / "v3.json", doc)
        gw.stop()
        gw = GatewayProcess(tmp_path / "v3.json", buffer, cloud.url, pki["ca"], uport)
        gw.start()
        for i in range(8, 10):
            assert not send(dev_b, b'{"b":%d}' % i, attempts=2)  # old epoch: never acked
            assert send(dev_a, b'{"a":%d}' % i)                  # new epoch flows
        wait_for(lambda: link_epoch_drops(world) == 4,  # 2 frames x 2 attempts each
                 "link_epoch drops not reported")
        wait_for(lambda: len(stored()) == 18, "new epoch after grace not delivered")
    finally:
        for r in radios.values():
            r.close()
        gw.stop()
        cloud.stop()
    assert sorted(stored()) == sorted(acked) and len(acked) == 18
    assert all(b'"b":8' not in p and b'"b":9' not in p for p in stored())
    drops = [e for e in world.store.events(reason="unknown_epoch") if "link_epoch" in e.detail]
    assert drops and all(e.transport == "gateway" for e in drops)
    assert link_epoch_drops(world) == 4
    events = {e.reason for e in world.store.events(limit=1000)}
    assert {"network_key_rotated", "gateway_key_rotated"} <= events
