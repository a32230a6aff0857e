"""Level "attested": the plaintext must be a COSE_Sign1 by a registered key of the device itself;
the Sign1 bytes are what the store keeps, so the archive verifies later with public keys only."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from lifecycle_support import Env, reasons, sealed

from sensorseal.core.attest import ALG_EDDSA, ALG_ES256, sign1, software_signer, verify_archive
from sensorseal.core.errors import RejectReason
from sensorseal.device.device import Device

KEYS = {"ed25519": (ed25519.Ed25519PrivateKey.generate, ALG_EDDSA),
        "es256": (lambda: ec.generate_private_key(ec.SECP256R1()), ALG_ES256)}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_signed_readings_accepted_archived_and_verifiable(env: Env, tmp_path: Path,
                                                          kind: str) -> None:
    make, alg = KEYS[kind]
    key = make()
    cred = env.registry.add_device("notary", "attested")
    env.registry.register_signing_key(cred.device_id, key.public_key())
    signer = software_signer(key)
    with Device(cred, tmp_path / "d", clock_ms=env.clock) as dev:
        readings = [sign1(b"t=%d" % i, signer, kid=cred.device_id, alg=alg) for i in range(3)]
        assert reasons(env.ingest(*(dev.seal(r) for r in readings))) == [None] * 3
        rows = env.store.telemetry(device_id=cred.device_id)
        assert {r.level for r in rows} == {"attested"}
        assert sorted(r.payload for r in rows) == sorted(readings)
        results = verify_archive([r.payload for r in rows], {bytes(cred.device_id):
                                                             key.public_key()})
        assert all(r.ok for r in results)


def test_unsigned_wrong_key_and_foreign_kid_refused(env: Env, tmp_path: Path) -> None:
    key, thief = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    cred = env.registry.add_device("strict-notary", "attested")
    other = env.registry.add_device("other", "attested")
    env.registry.register_signing_key(cred.device_id, key.public_key())
    env.registry.register_signing_key(other.device_id, thief.public_key())
    with Device(cred, tmp_path / "d", clock_ms=env.clock) as dev:
        msgs = [dev.seal(b"plain reading"),
                dev.seal(sign1(b"x", software_signer(thief), kid=cred.device_id,
                               alg=ALG_EDDSA)),
                # A valid signature, but it names another device (a relabelled reading).
                dev.seal(sign1(b"x", software_signer(key), kid=other.device_id, alg=ALG_EDDSA)),
                dev.seal(sign1(b"ok", software_signer(key), kid=cred.device_id, alg=ALG_EDDSA))]
        assert reasons(env.ingest(*msgs)) == [RejectReason.MALFORMED,
                                              RejectReason.BAD_SIGNATURE,
                                              RejectReason.BAD_SIGNATURE, None]


def test_attested_policy_without_a_registered_key_refuses(env: Env) -> None:
    cred = env.registry.add_device("keyless", "attested")
    assert reasons(env.ingest(sealed(cred, 1))) == [RejectReason.POLICY_VIOLATION]
