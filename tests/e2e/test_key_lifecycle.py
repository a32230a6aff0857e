"""Key lifecycle against the real server process and the real `sensorseal` command:
rotation with messages on both epochs and grace expiry, E5 renewal delivered as a sealed
downlink (hybrid post-quantum suite), revocation refused within one second, KEK rotation, and
`verify-archive` run as a separate process with nothing but a database copy and public keys."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from server_process import ServerProcess

from sensorseal.core.attest import ALG_EDDSA, sign1, software_signer
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.renewal import DeviceKemKey, RenewalSuite
from sensorseal.datadir import DataDir
from sensorseal.device.device import Device
from sensorseal.lifecycle import renewal_offer_of
from sensorseal.mqtt import topics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

ROUTE = "/v1/messages"
COSE = {"Content-Type": "application/cose"}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}


def cli(data: Path, *args: str, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sensorseal.cli", "--data-dir", str(data),
                           *args], capture_output=True, text=True, timeout=30,
                          env=env or clean_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"sensorseal {' '.join(args)} -> {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


class Server(ServerProcess):
    """`python -m sensorseal.server` on a free port; `url` once it serves."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__([sys.executable, "-m", "sensorseal.server", "--data-dir",
                          str(data_dir), "--http-port", "0"], clean_env())
        self.url = self.wait_for_url()


@dataclass
class Site:
    path: Path
    token: str

    def add(self, name: str, policy: str = "standard") -> DeviceCredential:
        out = cli(self.path, "device", "add", name, "--policy", policy, "--json").stdout
        return DeviceCredential.parse(json.loads(out)["credential"])


@pytest.fixture
def site(tmp_path: Path) -> Site:
    path = tmp_path / "data"
    return Site(path, DataDir(path, env=clean_env()).init())


@pytest.fixture
def server(site: Site) -> Iterator[Server]:
    s = Server(site.path)
    yield s
    s.stop()


def post(client: httpx.Client, data: bytes) -> int:
    return client.post(ROUTE, content=data, headers=COSE).status_code


def test_rotation_both_epochs_then_grace_expiry(site: Site, server: Server,
                                                tmp_path: Path) -> None:
    cred = site.add("rotor")
    with Device(cred, tmp_path / "dev") as old_dev, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        assert post(client, old_dev.seal(b"e1 #1")) == 202
        in_flight = [old_dev.seal(b"e1 buffered %d" % i) for i in range(3)]
        out = cli(site.path, "device", "rotate", str(cred.device_id), "--grace", "2",
                  "--json").stdout
        rotated_at = time.monotonic()
        new = DeviceCredential.parse(json.loads(out)["credential"])
        assert new.epoch == 2
        with Device(new, tmp_path / "dev") as new_dev:
            time.sleep(1.1)  # past the server's 1 s status TTL: it knows epoch 2 now
            assert [post(client, m) for m in (new_dev.seal(b"e2 #1"), in_flight[0],
                                              new_dev.seal(b"e2 #2"), in_flight[1])] == [202] * 4
            time.sleep(max(0.0, rotated_at + 3.2 - time.monotonic()))  # grace 2 s + TTL
            assert post(client, in_flight[2]) == 403
            assert post(client, new_dev.seal(b"e2 #3")) == 202
        events = client.get("/v1/events", params={"reason": "unknown_epoch"},
                            headers={"Authorization": f"Bearer {site.token}"}).json()["events"]
        assert [e["device"] for e in events] == [cred.device_id.hex()]


def test_renewal_over_hybrid_hpke_via_cli(site: Site, server: Server, tmp_path: Path) -> None:
    cred = site.add("pq")
    keys_file = tmp_path / "device-keys.json"
    cli(site.path, "device", "enroll-keys", str(cred.device_id), "--suite", "mlkem768-x25519",
        "--signing", "none", "--out", str(keys_file))
    assert keys_file.stat().st_mode & 0o077 == 0
    doc = json.loads(keys_file.read_text())
    kem = DeviceKemKey.from_private_bytes(RenewalSuite.MLKEM768_X25519,
                                          base64.b64decode(doc["renewal_private"]))
    first, again = tmp_path / "offer1.bin", tmp_path / "offer2.bin"
    cli(site.path, "device", "renew", str(cred.device_id), "--out", str(first))
    cli(site.path, "device", "renew", str(cred.device_id), "--resend", "--out", str(again))
    route = topics.commands(cred.device_id)
    with Device(cred, tmp_path / "dev") as dev, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        offers = [renewal_offer_of(dev.open_downlink(p.read_bytes(), route).payload)
                  for p in (first, again)]
        assert offers[0] is not None and offers[0] == offers[1]  # same offer, resent
        assert len(offers[0]) > 1100  # the hybrid suite's encapsulated key
        dev.accept_renewal(offers[0], kem)
        assert post(client, dev.seal(b"proof of possession")) == 202
        shown = cli(site.path, "device", "show", str(cred.device_id)).stdout
        assert "epoch: 2" in shown
        assert cli(site.path, "device", "renew", str(cred.device_id), "--resend",
                   check=False).returncode == 1  # nothing pending once confirmed


def test_revocation_refused_within_one_second(site: Site, server: Server,
                                              tmp_path: Path) -> None:
    cred = site.add("to-revoke")
    with Device(cred, tmp_path / "dev") as dev, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        assert post(client, dev.seal(b"ok")) == 202
        cli(site.path, "device", "revoke", str(cred.device_id))
        revoked_at = time.monotonic()
        while post(client, dev.seal(b"after revoke")) != 403:
            assert time.monotonic() - revoked_at < 1.0, "still accepted 1 s after revocation"
            time.sleep(0.05)
        assert cli(site.path, "device", "resume", str(cred.device_id), check=False).returncode
        reasons = {e["reason"] for e in client.get(
            "/v1/events", params={"device": cred.device_id.hex()},
            headers={"Authorization": f"Bearer {site.token}"}).json()["events"]}
        assert {"device_revoked", "revoked"} <= reasons


def test_kek_rotation_via_cli_then_restart(site: Site, tmp_path: Path) -> None:
    cred = site.add("kek")
    old_kek = (site.path / "kek").read_bytes()
    out = cli(site.path, "kek", "rotate").stdout
    assert "1 secrets re-wrapped" in out
    assert (site.path / "kek").read_bytes() != old_kek
    server = Server(site.path)
    try:
        with Device(cred, tmp_path / "dev") as dev, \
                httpx.Client(base_url=server.url, timeout=10) as client:
            assert post(client, dev.seal(b"after kek rotation")) == 202
    finally:
        server.stop()


def test_verify_archive_in_a_separate_process_with_public_keys_only(
        site: Site, server: Server, tmp_path: Path) -> None:
    cred = site.add("notary", "attested")
    keys_file, pub = tmp_path / "keys.json", tmp_path / "device.pem"
    cli(site.path, "device", "enroll-keys", str(cred.device_id), "--signing", "ed25519",
        "--out", str(keys_file), "--public-out", str(pub))
    private = serialization.load_pem_private_key(
        json.loads(keys_file.read_text())["signing_private_pem"].encode(), password=None)
    signer = software_signer(private)  # type: ignore[arg-type]
    time.sleep(1.1)  # the server's cached view of the device picks up its signing key
    with Device(cred, tmp_path / "dev") as dev, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(3):
            reading = sign1(b'{"kwh": %d}' % i, signer, kid=cred.device_id, alg=ALG_EDDSA)
            assert post(client, dev.seal(reading)) == 202
        assert post(client, dev.seal(b'{"kwh": 99}')) in (400, 403)  # unsigned: refused
    server.stop()
    # The third party: a copy of the database, no KEK anywhere, only the public key.
    third = tmp_path / "auditor"
    third.mkdir()
    for name in ("sensorseal.db", "sensorseal.db-wal", "sensorseal.db-shm"):
        if (site.path / name).exists():
            shutil.copy(site.path / name, third / name)
    assert not (third / "kek").exists()
    ok = cli(third, "verify-archive", "--device", str(cred.device_id), "--public-key", str(pub),
             "--json", check=False)
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(x) for x in ok.stdout.splitlines()]
    assert [x["ok"] for x in lines] == [True] * 3
    assert base64.b64decode(lines[0]["payload_b64"]) == b'{"kwh": 0}'
    # Someone edits a stored reading: the check fails for that reading.
    db = sqlite3.connect(third / "sensorseal.db")
    with db:
        (payload,) = db.execute("SELECT payload FROM telemetry WHERE seq = 2").fetchone()
        db.execute("UPDATE telemetry SET payload = ? WHERE seq = 2",
                   (bytes(payload).replace(b"kwh", b"KWH"),))
    db.close()
    bad = cli(third, "verify-archive", "--device", str(cred.device_id), "--public-key", str(pub),
              check=False)
    assert bad.returncode == 1 and "2 verified, 1 failed" in bad.stdout
