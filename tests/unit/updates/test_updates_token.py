"""The vendor key in a PKCS#11 token (SoftHSM2): a manifest signed by `Pkcs11Signer` installs on a
device that trusts only the token key's public half.

The signing runs in its own process with a private SoftHSM2 config and token (SoftHSM reads
SOFTHSM2_CONF once per process, so this cannot share a process with other token tests). Without
SoftHSM2 or python-pkcs11 it fails under CI=true and skips locally, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from updates_support import NOW, Server

from sensorseal.updates.device_updater import DeviceUpdater, UpdateStatus
from sensorseal.updates.manifest import TrustAnchors, UpdateReason

pytestmark = pytest.mark.e2e

MODULE = os.environ.get("SENSORSEAL_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
UTIL = shutil.which("softhsm2-util")

SIGNING_CEREMONY = textwrap.dedent("""
    import hashlib, json, sys
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from sensorseal.core.attest import ALG_ES256
    from sensorseal.keystore.pkcs11 import (Pkcs11Config, Pkcs11Signer, generate_ec_key,
                                            open_session)
    from sensorseal.updates.manifest import Manifest, sign_manifest
    image = bytes.fromhex(sys.argv[1])
    config = Pkcs11Config.from_env({"SENSORSEAL_PKCS11_MODULE": sys.argv[2],
                                    "SENSORSEAL_PKCS11_TOKEN": "vendor-offline",
                                    "SENSORSEAL_PKCS11_PIN": "4321"})
    session = open_session(config)
    private, public = generate_ec_key(session, "vendor-manifest-2025", usage="sign")
    m = Manifest(7, "thermo-v2", 2, hashlib.sha256(image).digest(), len(image), int(sys.argv[3]),
                 int(sys.argv[3]) + 3_600_000)
    signed = sign_manifest(m, Pkcs11Signer(private), b"vendor-hsm", ALG_ES256)
    print(json.dumps({"manifest": signed.hex(), "public": public.public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()}))
    session.close()
""")


def test_manifest_signed_in_a_token_installs(tmp_path: Path) -> None:
    try:
        import pkcs11  # noqa: F401
    except ImportError as exc:
        _unavailable(f"python-pkcs11 missing: {exc}")
    if not Path(MODULE).is_file() or UTIL is None:
        _unavailable(f"SoftHSM2 not installed ({MODULE} / softhsm2-util missing)")
    assert UTIL is not None
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run([UTIL, "--init-token", "--free", "--label", "vendor-offline", "--pin", "4321",
                    "--so-pin", "87654321"], check=True, capture_output=True, timeout=30, env=env)
    image = os.urandom(5000)
    out = subprocess.run([sys.executable, "-c", SIGNING_CEREMONY, image.hex(), MODULE, str(NOW)],
                         check=True, capture_output=True, timeout=60, env=env, text=True)
    result = json.loads(out.stdout)
    public = load_pem_public_key(result["public"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    trust = TrustAnchors(vendor={b"vendor-hsm": public})
    dev = DeviceUpdater.provision(tmp_path / "dev", image=b"v1", version=1,
                                  device_class="thermo-v2", trust=trust,
                                  health_check=lambda _p: True)
    manifest = bytes.fromhex(result["manifest"])
    assert dev.install(manifest, Server(image), now_ms=NOW).status is UpdateStatus.INSTALLED
    assert dev.active_image.read_bytes() == image
    tampered = manifest[:-1] + bytes([manifest[-1] ^ 1])
    assert dev.install(tampered, Server(image), now_ms=NOW).reason is UpdateReason.BAD_SIGNATURE


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SoftHSM2 is required in CI: {reason}")
    pytest.skip(reason)
