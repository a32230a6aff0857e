"""`sensorseal update create|sign|approve|rollout|status` in process (click's CliRunner) on a real
data directory: the signing steps need no data directory, keys come from PEM files, nothing
secret is printed, and the status reflects the devices' reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sensorseal.cli import main
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry
from sensorseal.updates.manifest import TrustAnchors, verify_manifest
from sensorseal.updates.rollout import Target, select
from sensorseal.updates.server import UpdateService

PASSWORD = "pem password 123"


def _pem(tmp: Path, name: str, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
         password: bytes | None = None) -> Path:
    enc: serialization.KeySerializationEncryption = (
        serialization.NoEncryption() if password is None
        else serialization.BestAvailableEncryption(password))
    path = tmp / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8, enc))
    return path


def test_create_sign_approve_rollout_status(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    datadir = DataDir(data, env={})
    datadir.init()
    store, keystore = datadir.open()
    registry = Registry(store, keystore)
    creds = [registry.add_device(f"d{i}") for i in range(6)]
    for cred in creds:
        store.set_device_group(cred.device_id, "lab")
    store.close()
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(5000))
    vendor = ed25519.Ed25519PrivateKey.generate()
    operator = ec.generate_private_key(ec.SECP256R1())
    vendor_pem = _pem(tmp_path, "vendor.pem", vendor, PASSWORD.encode())
    operator_pem = _pem(tmp_path, "operator.pem", operator)
    vendor_pub = tmp_path / "vendor.pub.pem"
    vendor_pub.write_bytes(vendor.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    base = ["--data-dir", str(data), "update"]

    r = runner.invoke(main, [*base, "create", str(image), "--class", "thermo-v2", "--version",
                             "3", "-o", str(tmp_path / "m.cbor")])
    assert r.exit_code == 0, r.output
    assert "manifest #1" in r.output
    # sign and approve run without any data directory (the offline signing machine)
    r = runner.invoke(main, ["--data-dir", str(tmp_path / "nowhere"), "update", "sign",
                             str(tmp_path / "m.cbor"), "--kid", "vendor-1", "--key",
                             str(vendor_pem), "--for-approval", "-o", str(tmp_path / "m.cose")],
                      env={"SENSORSEAL_SIGNING_KEY_PASSWORD": PASSWORD})
    assert r.exit_code == 0, r.output
    assert PASSWORD not in r.output and "PRIVATE" not in r.output
    r = runner.invoke(main, [*base, "sign", str(tmp_path / "m.cbor"), "--kid", "v",
                             "--key", str(vendor_pem), "-o", str(tmp_path / "x")])
    assert r.exit_code == 3 and PASSWORD not in r.output  # no password: refused, nothing shown
    r = runner.invoke(main, [*base, "approve", str(tmp_path / "m.cose"), "--kid", "ops-1",
                             "--key", str(operator_pem), "--vendor-key", str(vendor_pub),
                             "--vendor-kid", "vendor-1", "-o", str(tmp_path / "a.cose")])
    assert r.exit_code == 0, r.output
    approved = (tmp_path / "a.cose").read_bytes()
    trust = TrustAnchors(vendor={b"vendor-1": vendor.public_key()},
                         operator={b"ops-1": operator.public_key()})
    m = verify_manifest(approved, trust, device_class="thermo-v2", installed_version=1,
                        last_manifest_seq=0, now_ms=_now(),
                        require_operator=True)
    assert m.approved and m.image_version == 3
    # the vendor signature is checked before approving: a wrong vendor key refuses
    r = runner.invoke(main, [*base, "approve", str(tmp_path / "m.cose"), "--kid", "ops-1",
                             "--key", str(operator_pem), "--vendor-key", str(vendor_pub),
                             "--vendor-kid", "someone-else", "-o", str(tmp_path / "b.cose")])
    assert r.exit_code == 1

    r = runner.invoke(main, [*base, "rollout", str(tmp_path / "a.cose"), "--group", "lab",
                             "--percent", "50", "--id", "fw-3"])
    assert r.exit_code == 0, r.output
    chosen = int(r.output.split(": ")[1].split()[0])
    expected = select("fw-3", Target.percentage("lab", [c.device_id for c in creds], 50))
    assert chosen == len(expected)  # the deterministic share of the six
    r = runner.invoke(main, [*base, "status", "fw-3", "--json"])
    status = json.loads(r.output)
    assert status["total"] == chosen and status["states"]["pending"] == chosen
    assert status["manifest_seq"] == 1
    # a report arrives (as the transports apply it) and the table shows it
    store, _ = datadir.open()
    service = UpdateService(store)
    assert {d.device_id for d in store.rollout_devices("fw-3")} == set(expected)
    first = expected[0]
    service.apply_report(first, {"rollout": "fw-3", "status": "rolled_back",
                                 "reason": "health_check_failed", "manifest_seq": 1})
    store.close()
    r = runner.invoke(main, [*base, "status", "fw-3"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "health_check_failed" in r.output and first.hex() in r.output
    r = runner.invoke(main, [*base, "status"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "fw-3" in r.output and "group lab 50%" in r.output
    # a manifest that `create` did not produce is not rolled out
    r = runner.invoke(main, [*base, "rollout", str(tmp_path / "m.cbor"), "--group", "lab"])
    assert r.exit_code == 3
    r = runner.invoke(main, [*base, "status", "nope"])
    assert r.exit_code == 1


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000
