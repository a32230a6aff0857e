"""The real HTTP server as its own process (`python -m sensorseal.server`) on a free port:
sealed messages over HTTP and HTTPS (a CA and certificate made by the test), storage, replay
refused across a server restart, and a huge declared body refused before it is read."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_process import ServerProcess

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import Direction
from sensorseal.core.keys import derive
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

ROUTE = "/v1/messages"
COSE = {"Content-Type": "application/cose"}
START_TIMEOUT_S = 20


def now_ms() -> int:
    return int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)


def sealed(cred: DeviceCredential, seq: int, payload: bytes) -> bytes:
    keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    return seal(payload, keys=keys, seq=seq, route=ROUTE, timestamp_ms=now_ms())


@dataclass
class Installation:
    path: Path
    token: str
    cred: DeviceCredential

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def installation(tmp_path: Path) -> Installation:
    path = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}
    datadir = DataDir(path, env=env)
    token = datadir.init()
    store, keystore = datadir.open()
    try:
        cred = Registry(store, keystore).add_device("e2e-sensor", "standard")
    finally:
        store.close()
    return Installation(path, token, cred)


class Server(ServerProcess):
    """A server process; `url` once it announced that it serves."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}
        super().__init__([sys.executable, "-m", "sensorseal.server", "--data-dir",
                          str(data_dir), "--http-port", "0", *extra], env, START_TIMEOUT_S)
        self.url = self.wait_for_url()


@pytest.fixture
def server(installation: Installation) -> Iterator[Server]:
    s = Server(installation.path)
    yield s
    s.stop()


def test_messages_stored_and_replay_refused_after_restart(installation: Installation) -> None:
    cred = installation.cred
    first = Server(installation.path)
    try:
        with httpx.Client(base_url=first.url, timeout=10) as client:
            msg = sealed(cred, 1, b"t=20.5")
            assert client.post(ROUTE, content=msg, headers=COSE).status_code == 202
            batch = cbor2.dumps([sealed(cred, s, b"t=%d" % s) for s in range(2, 12)])
            r = client.post(ROUTE + ":batch", content=batch,
                            headers={"Content-Type": "application/cbor"})
            assert r.status_code == 200 and cbor2.loads(r.content) == [0] * 10
            r = client.get("/v1/telemetry", params={"device": cred.device_id.hex()},
                           headers=installation.auth)
            rows = r.json()["telemetry"]
            assert len(rows) == 11 and rows[-1]["payload"] == "t=20.5"
            assert client.post(ROUTE, content=msg, headers=COSE).status_code == 403
    finally:
        first.stop()
    assert first.proc.returncode == 0, "".join(first.output)

    second = Server(installation.path)
    try:
        with httpx.Client(base_url=second.url, timeout=10) as client:
            # Replays of the last number (the resumed window top) and of one inside the window
            # (refused by the store's unique key) are both refused after the restart.
            for seq in (11, 5):
                again = sealed(cred, seq, b"t=%d" % seq)  # the same number, sealed again
                r = client.post(ROUTE, content=again, headers=COSE)
                assert (r.status_code, r.json()) == (403, {"status": "rejected"})
            assert client.post(ROUTE, content=sealed(cred, 12, b"t=12"),
                               headers=COSE).status_code == 202
            events = client.get("/v1/events", params={"reason": "replay"},
                                headers=installation.auth).json()["events"]
            assert len(events) == 3
            assert client.get("/v1/events", headers={"Authorization": "Bearer nope"}
                              ).status_code == 401
    finally:
        second.stop()


def test_huge_declared_body_refused_before_reading(server: Server) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages:batch HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/cbor\r\nContent-Length: 1000000000\r\n\r\n"
                     + b"\x00" * 65536)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def make_pki(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensorseal test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def test_https_with_ca_verification(installation: Installation, tmp_path: Path) -> None:
    ca, cert, key = make_pki(tmp_path)
    server = Server(installation.path, "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(ca))
        for base in (server.url, server.url.replace("127.0.0.1", "localhost")):
            with httpx.Client(base_url=base, verify=trust, timeout=10) as client:
                seq = 1 if base == server.url else 2
                r = client.post(ROUTE, content=sealed(installation.cred, seq, b"tls"),
                                headers=COSE)
                assert r.status_code == 202
                assert r.extensions["network_stream"].get_extra_info(
                    "ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        # Without our CA the certificate is not trusted; plain HTTP is not answered.
        with httpx.Client(base_url=server.url, timeout=10) as client, \
                pytest.raises(httpx.ConnectError):
            client.get("/healthz")
        with httpx.Client(base_url=server.url.replace("https", "http"), timeout=10) as client, \
                pytest.raises(httpx.HTTPError):
            client.get("/healthz")
    finally:
        server.stop()
