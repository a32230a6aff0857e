"""The gateway for real: a gateway process (`sensorseal gateway run`) on loopback UDP, the cloud
app on HTTPS (uvicorn, a CA and certificates made by the test), devices in modes e3, e2, e2+e3.

- kill -9 of the gateway during a stream, and an upstream outage (SENSORSEAL_GATEWAY_OUTAGE_S,
  default 5 s): every frame the gateway acked is stored in the cloud exactly once;
- a stranger without the network key: never acked, never forwarded, counted and audited;
- TLS: a server whose certificate another CA signed is refused; mutual TLS works with a client
  certificate and fails without one.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "gateway"))
from gateway_world import World, make_world, sealed_batch

from sensorseal.core.link import NetworkKey, wrap
from sensorseal.gateway.config import write_config
from sensorseal.gateway.node import UdpRadio
from sensorseal.gateway.upstream import Upstream, UpstreamError
from sensorseal.server.app import create_app

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

OUTAGE_S = float(os.environ.get("SENSORSEAL_GATEWAY_OUTAGE_S", "5"))


# -- certificates ------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(d: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = d / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def issue(d: Path, ca: tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate], cn: str,
          *, server: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[2].subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = b.sign(ca[1], hashes.SHA256())
    cp, kp = d / f"{cn}.crt", d / f"{cn}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "cloud-ca")
    wrong = make_ca(d, "wrong-ca")
    server = issue(d, ca, "cloud", server=True)
    rogue = issue(d, wrong, "rogue", server=True)
    client = issue(d, ca, "gateway", server=False)
    return {"ca": ca[0], "wrong_ca": wrong[0], "server_cert": server[0], "server_key": server[1],
            "rogue_cert": rogue[0], "rogue_key": rogue[1], "client_cert": client[0],
            "client_key": client[1]}


# -- the cloud in a thread ---------------------------------------------------------------------

def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cloud:
    """The real app on uvicorn with TLS, stoppable and restartable on the same port."""

    def __init__(self, world: World, cert: Path, key: Path, *, client_ca: Path | None = None,
                 port: int | None = None) -> None:
        self.world, self.cert, self.key, self.client_ca = world, cert, key, client_ca
        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        app = create_app(self.world.pipeline, self.world.registry, self.world.store,
                         token_check=lambda _t: False)
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                                ssl_certfile=str(self.cert), ssl_keyfile=str(self.key),
                                ssl_ca_certs=None if self.client_ca is None else
                                str(self.client_ca),
                                ssl_cert_reqs=ssl.CERT_REQUIRED if self.client_ca else
                                ssl.CERT_NONE)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.close()


# -- the gateway process -----------------------------------------------------------------------

class GatewayProcess:
    def __init__(self, config: Path, buffer: Path, upstream: str, ca: Path, port: int) -> None:
        self.args = [sys.executable, "-m", "sensorseal", "gateway", "run", "--config",
                     str(config), "--buffer", str(buffer), "--upstream", upstream, "--ca",
                     str(ca), "--listen", f"127.0.0.1:{port}", "--rate", "1000",
                     "--burst", "1000"]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on udp://" in line, line

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def test_kill9_and_outage_lose_nothing_acked(world: World, pki: dict[str, Path],
                                             tmp_path: Path) -> None:
    net, key = world.network("e1+e4")
    devices = [world.device(net, mode)[1] for mode in ("e3", "e2", "e2+e3")]
    cfg_doc = None
    gw_cred = world.gateways.add_gateway("street-7", [net])
    cfg_doc = world.gateways.gateway_config(gw_cred.device_id)
    write_config(tmp_path / "gw.json", cfg_doc)
    cloud = Cloud(world, pki["server_cert"], pki["server_key"])
    cloud.start()
    uport = free_port(socket.SOCK_DGRAM)
    gw = GatewayProcess(tmp_path / "gw.json", tmp_path / "buffer.db", cloud.url, pki["ca"],
                        uport)
    gw.start()
    radio = UdpRadio(("127.0.0.1", uport), key, timeout_s=0.2)
    acked: list[bytes] = []
    stranger = NetworkKey(net, os.urandom(16), key.alg)
    try:
        def stream(start: int, rounds: int) -> None:
            for i in range(start, start + rounds):
                for n, dev in enumerate(devices):
                    assert dev is not None
                    payload = json.dumps({"dev": n, "i": i}).encode()
                    frame, seq = dev.frame(payload)
                    deadline = time.monotonic() + 20
                    while not radio.send(frame, dev.sender, seq, attempts=3):
                        assert time.monotonic() < deadline, "gateway never acked"
                        time.sleep(0.05)  # gateway down: keep the frame, resend the same bytes
                    acked.append(payload)

        stream(0, 10)
        # a stranger: never acked, never forwarded
        strange = UdpRadio(("127.0.0.1", uport), stranger, timeout_s=0.1)
        for s in range(5):
            frame = wrap(b'{"evil":1}', network=stranger, sender=devices[0].sender,  # type: ignore[union-attr]
                         seq=10_000 + s)
            assert not strange.send(frame, devices[0].sender, 10_000 + s, attempts=1)  # type: ignore[union-attr]
        strange.close()

        cloud.stop()  # upstream outage starts; the gateway keeps acking into its buffer
        outage_started = time.monotonic()
        sender = threading.Thread(target=stream, args=(10, 20))
        sender.start()
        time.sleep(0.3)
        gw.kill9()  # mid-stream
        time.sleep(0.2)
        gw.start()
        sender.join(60)
        assert not sender.is_alive()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        cloud.start()  # upstream is back
        deadline = time.monotonic() + 20
        while world.store.count_telemetry() < len(acked) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # anything extra (a duplicate) would show up now
    finally:
        radio.close()
        gw.stop()
        cloud.stop()
    stored = [r.payload for r in world.store.telemetry(limit=10_000)]
    assert len(stored) == len(acked) == 90
    assert sorted(stored) == sorted(acked)  # every acked frame, exactly once
    assert all(b"evil" not in p for p in stored)
    events = world.store.events(reason="decrypt_failed")
    assert any(e.transport == "gateway" and "link_auth" in e.detail for e in events)
    transports = {r.transport.rsplit(":", 1)[1] for r in world.store.telemetry(limit=10_000)}
    assert transports == {"e1+e3+e4", "e1+e2+e4", "e1+e2+e3+e4"}


def test_wrong_ca_is_refused_and_mutual_tls(world: World, pki: dict[str, Path]) -> None:
    net, _ = world.network("e1+e3+e4")
    cfg = world.gateway([net])
    rogue = Cloud(world, pki["rogue_cert"], pki["rogue_key"])
    rogue.start()
    try:
        up = Upstream(rogue.url, ca_file=pki["ca"])
        with pytest.raises(UpstreamError) as exc:
            up.send(sealed_batch(cfg, [], 1))
        assert exc.value.retry  # kept and retried later, never sent to the impostor
        up.close()
    finally:
        rogue.stop()
    mtls = Cloud(world, pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    mtls.start()
    try:
        anonymous = Upstream(mtls.url, ca_file=pki["ca"])
        with pytest.raises(UpstreamError):
            anonymous.send(sealed_batch(cfg, [], 2))
        anonymous.close()
        up = Upstream(mtls.url, ca_file=pki["ca"], client_cert=pki["client_cert"],
                      client_key=pki["client_key"])
        assert up.send(sealed_batch(cfg, [], 3, drops=[("garbage", 2, 1)])) == []
        up.close()
    finally:
        mtls.stop()
    assert any("2 frames" in e.detail for e in world.store.events(reason="malformed"))
