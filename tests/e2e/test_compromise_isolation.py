"""One device is stolen and everything is extracted from it: its credential (root secret), its
renewal KEM private key, its signing key and its counter/state files. Against the real server
over HTTP, the thief can neither read another device's captured traffic or renewal offer, nor
forge a message that lands as another device, nor replay anything of another device."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from server_process import ServerProcess

from sensorseal.core.attest import ALG_EDDSA, sign1, software_signer
from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal, unseal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import Direction
from sensorseal.core.keys import derive
from sensorseal.core.renewal import DeviceKemKey, accept_offer
from sensorseal.datadir import DataDir
from sensorseal.device.device import Device
from sensorseal.lifecycle import KeyLifecycle
from sensorseal.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

ROUTE = "/v1/messages"
COSE = {"Content-Type": "application/cose"}


class Server(ServerProcess):
    def __init__(self, data_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}
        super().__init__([sys.executable, "-m", "sensorseal.server", "--data-dir",
                          str(data_dir), "--http-port", "0"], env)
        self.url = self.wait_for_url()


@dataclass
class Loot:
    """Everything extracted from the stolen device A."""

    cred: DeviceCredential
    kem: DeviceKemKey
    signing: ed25519.Ed25519PrivateKey
    state_dir: Path


@dataclass
class World:
    data: Path
    token: str
    loot: Loot
    victim: DeviceCredential  # device B (the thief does NOT have this)
    victim_kem: DeviceKemKey
    victim_offer: bytes  # B's renewal offer, as captured on the wire
    victim_signing: ed25519.Ed25519PrivateKey  # B's signing key (only B has it)


@pytest.fixture
def world(tmp_path: Path) -> World:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}
    datadir = DataDir(data, env=env)
    token = datadir.init()
    store, keystore = datadir.open()
    try:
        registry = Registry(store, keystore)
        a = registry.add_device("stolen", "attested")
        b = registry.add_device("victim", "attested")
        keys = {}
        for cred in (a, b):
            kem, sk = DeviceKemKey.generate(), ed25519.Ed25519PrivateKey.generate()
            registry.register_renewal_key(cred.device_id, kem.public_key())
            registry.register_signing_key(cred.device_id, sk.public_key())
            keys[cred.device_id] = (kem, sk)
        offer = KeyLifecycle(registry, store, keystore).renew(b.device_id)
    finally:
        store.close()
    kem_a, sk_a = keys[a.device_id]
    return World(data, token, Loot(a, kem_a, sk_a, tmp_path / "dev-a"), b,
                 keys[b.device_id][0], offer, keys[b.device_id][1])


@pytest.fixture
def server(world: World) -> Iterator[Server]:
    s = Server(world.data)
    yield s
    s.stop()


def test_stolen_device_cannot_read_forge_or_replay_another(world: World, server: Server,
                                                           tmp_path: Path) -> None:
    loot, b = world.loot, world.victim
    sk_b = world.victim_signing
    with httpx.Client(base_url=server.url, timeout=10) as client, \
            Device(loot.cred, loot.state_dir) as dev_a, Device(b, tmp_path / "dev-b") as dev_b:
        def post(data: bytes) -> int:
            return client.post(ROUTE, content=data, headers=COSE).status_code

        # Normal life: both devices send signed, sealed readings; the thief captures B's.
        sign_a, sign_b = software_signer(loot.signing), software_signer(sk_b)
        assert post(dev_a.seal(sign1(b"a=1", sign_a, kid=loot.cred.device_id,
                                     alg=ALG_EDDSA))) == 202
        captured = [dev_b.seal(sign1(b"b=%d secret" % i, sign_b, kid=b.device_id,
                                     alg=ALG_EDDSA)) for i in range(3)]
        assert [post(m) for m in captured] == [202] * 3
        shutil.copytree(loot.state_dir, tmp_path / "stolen-state")  # counters as extracted

        # READ: A's root secret, under every identity it could claim, opens none of B's
        # messages; A's KEM private key opens none of B's renewal offers.
        for claimed_id, epoch in ((b.device_id, b.epoch), (loot.cred.device_id, 1)):
            ctx = SecurityContext.from_secret(loot.cred.secret, claimed_id, epoch, Direction.UP)
            for msg in captured:
                with pytest.raises(Rejected) as err:
                    unseal(msg, route=ROUTE, contexts=lambda _d, _e, c=ctx: c, now_ms=0)
                assert err.value.reason in (RejectReason.DECRYPT_FAILED,
                                            RejectReason.UNKNOWN_DEVICE)
        with pytest.raises(Rejected) as offer_err:
            accept_offer(world.victim_offer, loot.kem, b.device_id, b.epoch)
        assert offer_err.value.reason is RejectReason.DECRYPT_FAILED
        assert accept_offer(world.victim_offer, world.victim_kem, b.device_id, 1)[0] == 2

        # FORGE: an envelope that claims to be B, keyed from A's secret, with a valid Sign1 by
        # A's key or a Sign1 relabelled to B; and A's own envelope carrying a reading signed
        # "as B". All refused; B's telemetry does not move.
        forged_keys = derive(loot.cred.secret, b.device_id, b.epoch, Direction.UP)
        for i, inner in enumerate((
                sign1(b"b=999", sign_a, kid=b.device_id, alg=ALG_EDDSA),
                sign1(b"b=999", sign_a, kid=loot.cred.device_id, alg=ALG_EDDSA))):
            forged = seal(inner, keys=forged_keys, seq=10_000 + i, route=ROUTE,
                          timestamp_ms=None)
            assert post(forged) == 403
        assert post(dev_a.seal(sign1(b"b=999", sign_a, kid=b.device_id, alg=ALG_EDDSA))) == 403

        # REPLAY: B's captured messages, singly and in a batch, and after the thief rewinds
        # A's counter files to the extracted copy (A's own numbers come back; still nothing).
        assert [post(m) for m in captured] == [403] * 3
        batch = client.post(ROUTE + ":batch", content=cbor2.dumps(captured),
                            headers={"Content-Type": "application/cbor"})
        assert cbor2.loads(batch.content) == [1, 1, 1]
    shutil.rmtree(loot.state_dir)
    shutil.copytree(tmp_path / "stolen-state", loot.state_dir)
    with Device(loot.cred, loot.state_dir) as rewound, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        again = rewound.seal(sign1(b"b=1", software_signer(loot.signing), kid=b.device_id,
                                   alg=ALG_EDDSA))
        assert client.post(ROUTE, content=again, headers=COSE).status_code == 403
        auth = {"Authorization": f"Bearer {world.token}"}
        rows = client.get("/v1/telemetry", params={"device": b.device_id.hex()},
                          headers=auth).json()["telemetry"]
        assert sorted(r["seq"] for r in rows) == [1, 2, 3]  # exactly B's own three readings
        found = {e["reason"] for e in client.get("/v1/events", params={"limit": 1000},
                                                 headers=auth).json()["events"]}
        assert {"decrypt_failed", "replay", "bad_signature"} <= found
