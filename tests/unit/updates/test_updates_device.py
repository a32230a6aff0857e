"""The device updater on real files: every refusal and every crash point leaves the device running
the version it had, and the durable state (version floor, manifest sequence, slot pointer) says
so after a restart."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from updates_support import HOUR, NOW, Key, PowerLoss, Server, build_manifest, make_key

from sensorseal.core.errors import ConfigError
from sensorseal.updates.device_updater import DeviceUpdater, UpdateResult, UpdateStatus
from sensorseal.updates.manifest import (
    ImageEncryption,
    TrustAnchors,
    UpdateReason,
    approve_manifest,
    encrypt_image,
    sign_manifest,
)

FACTORY = b"factory image v1\n" * 64


class Health:
    """A health check that records what it saw and answers as told."""

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.seen: list[bytes] = []

    def __call__(self, image: Path) -> bool:
        self.seen.append(image.read_bytes())
        return self.healthy


def provision(root: Path, trust: TrustAnchors, health: Health | None = None,
              **kw: Any) -> DeviceUpdater:
    return DeviceUpdater.provision(root, image=FACTORY, version=1, device_class="thermo-v2",
                                   trust=trust, health_check=health or Health(), **kw)


def restart(root: Path, trust: TrustAnchors, health: Health | None = None,
            **kw: Any) -> DeviceUpdater:
    """A new process on the same files (what survives is only what is on disk)."""
    return DeviceUpdater(root, device_class="thermo-v2", trust=trust,
                         health_check=health or Health(), **kw)


def signed(vendor: Key, image: bytes, **kw: Any) -> bytes:
    return sign_manifest(build_manifest(image, **kw), vendor.signer, vendor.kid, vendor.alg)


def assert_still_factory(dev: DeviceUpdater) -> None:
    assert dev.active_image.read_bytes() == FACTORY
    assert dev.installed_version == 1 and dev.state.active == "a"


def test_install_happy_path(tmp_path: Path, vendor: Key, trust: TrustAnchors,
                            image: bytes) -> None:
    health = Health()
    reports: list[dict[str, Any]] = []
    dev2 = provision(tmp_path, trust, health, notify=reports.append)
    result = dev2.install(signed(vendor, image), Server(image), now_ms=NOW)
    assert result.status is UpdateStatus.INSTALLED and result.reason is None
    assert result.as_dict()["running_version"] == 2 and result.manifest_seq == 5
    assert dev2.active_image.read_bytes() == image and health.seen == [image]
    assert [r["status"] for r in reports] == ["downloading"] * 3 + ["verified"]
    assert [r["offset"] for r in reports[:3]] == [4096, 8192, 10_000]
    after = restart(tmp_path, trust)
    assert (after.installed_version, after.last_manifest_seq, after.state.active) == (2, 5, "b")
    assert after.recovered is None and after.pending_manifest() is None


@pytest.mark.parametrize("case", ["wrong_signature", "untrusted_key", "wrong_class", "older",
                                  "equal", "replayed", "expired", "missing_approval"])
def test_refused_manifests_keep_the_current_version(tmp_path: Path, vendor: Key,
                                                    trust: TrustAnchors, image: bytes,
                                                    case: str) -> None:
    dev = provision(tmp_path, trust, require_operator=case == "missing_approval")
    if case == "replayed":  # install seq 5 / v2 first, then replay an older manifest (seq 3, v3)
        assert dev.install(signed(vendor, image), Server(image), now_ms=NOW).status \
            is UpdateStatus.INSTALLED
    manifests = {
        "wrong_signature": flip_last(signed(vendor, image)),
        "untrusted_key": signed(make_key(vendor.alg, b"stranger"), image),
        "wrong_class": signed(vendor, image, device_class="pump-v1"),
        "older": signed(vendor, image, version=0),
        "equal": signed(vendor, image, version=1),
        "replayed": signed(vendor, image, seq=3, version=3),
        "expired": signed(vendor, image, created_ms=NOW - 2 * HOUR, expires_ms=NOW - 1),
        "missing_approval": signed(vendor, image),
    }
    expected = {"wrong_signature": "bad_signature", "untrusted_key": "bad_signature",
                "wrong_class": "wrong_device_class", "older": "rollback", "equal": "rollback",
                "replayed": "replayed_manifest", "expired": "expired",
                "missing_approval": "missing_approval"}
    before = (dev.installed_version, dev.last_manifest_seq, dev.active_image.read_bytes())
    server = Server(image)
    result = dev.install(manifests[case], server, now_ms=NOW)
    assert result.status is UpdateStatus.REJECTED
    assert result.as_dict()["reason"] == expected[case]
    assert server.offsets == []  # nothing downloaded for a refused manifest
    after = restart(tmp_path, trust)
    assert (after.installed_version, after.last_manifest_seq,
            after.active_image.read_bytes()) == before


def test_operator_approved_update_installs(tmp_path: Path, vendor: Key, operator: Key,
                                           trust: TrustAnchors, image: bytes) -> None:
    dev = provision(tmp_path, trust, require_operator=True)
    pending = sign_manifest(build_manifest(image), vendor.signer, vendor.kid, vendor.alg,
                            for_approval=True)
    data = approve_manifest(pending, operator.signer, operator.kid, operator.alg, trust=trust)
    assert dev.install(data, Server(image), now_ms=NOW).status is UpdateStatus.INSTALLED


def test_truncated_image(tmp_path: Path, vendor: Key, trust: TrustAnchors, image: bytes) -> None:
    dev = provision(tmp_path, trust)
    result = dev.install(signed(vendor, image), Server(image[:-100]), now_ms=NOW)
    assert (result.status, result.reason) == (UpdateStatus.REJECTED, UpdateReason.SIZE_MISMATCH)
    assert_still_factory(dev)
    assert dev.last_manifest_seq == 0  # not burned: the genuine image can still be served
    assert dev.install(signed(vendor, image), Server(image), now_ms=NOW).status \
        is UpdateStatus.INSTALLED


def test_longer_image_than_declared(tmp_path: Path, vendor: Key, trust: TrustAnchors,
                                    image: bytes) -> None:
    dev = provision(tmp_path, trust)
    result = dev.install(signed(vendor, image), Server(image + b"extra"), now_ms=NOW)
    assert result.reason is UpdateReason.SIZE_MISMATCH
    assert_still_factory(dev)


def test_altered_image_byte(tmp_path: Path, vendor: Key, trust: TrustAnchors,
                            image: bytes) -> None:
    dev = provision(tmp_path, trust)
    altered = bytearray(image)
    altered[5000] ^= 0x01
    health = Health()
    dev = restart(tmp_path, trust, health)
    result = dev.install(signed(vendor, image), Server(bytes(altered)), now_ms=NOW)
    assert (result.status, result.reason) == (UpdateStatus.REJECTED, UpdateReason.DIGEST_MISMATCH)
    assert_still_factory(dev)
    assert health.seen == []  # the bad image never reached a slot
    assert not (tmp_path / "slot_b" / "image").exists()


def test_health_check_failure_rolls_back(tmp_path: Path, vendor: Key, trust: TrustAnchors,
                                         image: bytes) -> None:
    health = Health(healthy=False)
    dev = provision(tmp_path, trust, health)
    result = dev.install(signed(vendor, image), Server(image), now_ms=NOW)
    assert (result.status, result.reason) == (UpdateStatus.ROLLED_BACK,
                                              UpdateReason.HEALTH_CHECK_FAILED)
    assert health.seen == [image]  # the check ran on the new slot
    assert_still_factory(dev)
    after = restart(tmp_path, trust)
    assert_still_factory(after)
    assert after.last_manifest_seq == 5  # burned: the same bad image is not retried
    assert after.install(signed(vendor, image), Server(image), now_ms=NOW).reason \
        is UpdateReason.REPLAYED_MANIFEST


def test_health_check_that_raises_is_a_failure(tmp_path: Path, vendor: Key, trust: TrustAnchors,
                                               image: bytes) -> None:
    def explode(_image: Path) -> bool:
        raise RuntimeError("watchdog")
    dev = DeviceUpdater.provision(tmp_path, image=FACTORY, version=1, device_class="thermo-v2",
                                  trust=trust, health_check=explode)
    result = dev.install(signed(vendor, image), Server(image), now_ms=NOW)
    assert result.reason is UpdateReason.HEALTH_CHECK_FAILED and "RuntimeError" in result.detail
    assert_still_factory(dev)


def test_crash_mid_download_resumes_from_the_offset(tmp_path: Path, vendor: Key,
                                                    trust: TrustAnchors, image: bytes) -> None:
    dev = provision(tmp_path, trust)
    manifest = signed(vendor, image)
    server = Server(image, chunk=1000)
    server.crash_at = 4000
    with pytest.raises(PowerLoss):
        dev.install(manifest, server, now_ms=NOW)
    assert server.offsets == [0, 1000, 2000, 3000, 4000]
    dev = restart(tmp_path, trust)
    assert_still_factory(dev)
    assert dev.pending_manifest() == manifest
    server.offsets.clear()
    result = dev.install(manifest, server, now_ms=NOW)
    assert result.status is UpdateStatus.INSTALLED
    assert server.offsets[0] == 4000  # resumed, not restarted
    assert dev.active_image.read_bytes() == image


def test_resumed_download_is_still_digest_checked(tmp_path: Path, vendor: Key,
                                                  trust: TrustAnchors, image: bytes) -> None:
    dev = provision(tmp_path, trust)
    manifest = signed(vendor, image)
    server = Server(image, chunk=1000)
    server.crash_at = 4000
    with pytest.raises(PowerLoss):
        dev.install(manifest, server, now_ms=NOW)
    part = tmp_path / "download" / "image.part"
    data = bytearray(part.read_bytes())
    data[1234] ^= 0xFF  # the partial file is damaged while the power is off
    part.write_bytes(bytes(data))
    dev = restart(tmp_path, trust)
    result = dev.install(manifest, server, now_ms=NOW)
    assert result.reason is UpdateReason.DIGEST_MISMATCH
    assert_still_factory(dev)


def test_torn_bytes_past_the_durable_offset_are_dropped(tmp_path: Path, vendor: Key,
                                                        trust: TrustAnchors,
                                                        image: bytes) -> None:
    dev = provision(tmp_path, trust)
    manifest = signed(vendor, image)
    server = Server(image, chunk=1000)
    server.crash_at = 3000
    with pytest.raises(PowerLoss):
        dev.install(manifest, server, now_ms=NOW)
    with open(tmp_path / "download" / "image.part", "ab") as fh:
        fh.write(b"half a chunk of garbage")  # written, but the offset never recorded it
    server.offsets.clear()
    assert restart(tmp_path, trust).install(manifest, server, now_ms=NOW).status \
        is UpdateStatus.INSTALLED
    assert server.offsets[0] == 3000


def test_transport_error_is_incomplete_then_resumes(tmp_path: Path, vendor: Key,
                                                    trust: TrustAnchors, image: bytes) -> None:
    dev = provision(tmp_path, trust)
    manifest = signed(vendor, image)
    server = Server(image)
    server.fail_at = 8192
    first = dev.install(manifest, server, now_ms=NOW)
    assert (first.status, first.offset, first.reason) == (UpdateStatus.INCOMPLETE, 8192, None)
    assert "ConnectionResetError" in first.detail and "broker" not in first.detail
    assert_still_factory(dev)
    assert dev.install(manifest, server, now_ms=NOW).status is UpdateStatus.INSTALLED
    assert server.offsets == [0, 4096, 8192, 8192]


def test_crash_between_slot_write_and_pointer_switch(tmp_path: Path, vendor: Key,
                                                     trust: TrustAnchors, image: bytes) -> None:
    def crash(name: str) -> None:
        if name == "slot-written":
            raise PowerLoss
    dev = provision(tmp_path, trust, checkpoint=crash)
    manifest = signed(vendor, image)
    with pytest.raises(PowerLoss):
        dev.install(manifest, Server(image), now_ms=NOW)
    assert (tmp_path / "slot_b" / "image").read_bytes() == image  # written...
    dev = restart(tmp_path, trust)
    assert_still_factory(dev)  # ...but never switched to
    assert dev.last_manifest_seq == 0 and dev.recovered is None
    server = Server(image)
    assert dev.install(manifest, server, now_ms=NOW).status is UpdateStatus.INSTALLED
    assert server.offsets == []  # the verified download was kept and re-checked, not re-fetched


def test_crash_during_trial_falls_back_on_restart(tmp_path: Path, vendor: Key,
                                                  trust: TrustAnchors, image: bytes) -> None:
    def crash(name: str) -> None:
        if name == "pointer-switched":
            raise PowerLoss
    dev = provision(tmp_path, trust, checkpoint=crash)
    with pytest.raises(PowerLoss):
        dev.install(signed(vendor, image), Server(image), now_ms=NOW)
    dev = restart(tmp_path, trust)
    assert_still_factory(dev)
    assert dev.recovered is not None
    assert dev.recovered.as_dict()["reason"] == "install_failed"
    assert dev.recovered.status is UpdateStatus.ROLLED_BACK
    assert restart(tmp_path, trust).recovered is None  # the fallback itself was durable


def test_encrypted_image(tmp_path: Path, vendor: Key, trust: TrustAnchors, image: bytes) -> None:
    cek, iv = AESGCM.generate_key(bit_length=256), b"\x07" * 12
    wire = encrypt_image(image, cek, iv)
    manifest = sign_manifest(build_manifest(wire, encryption=ImageEncryption(iv)),
                             vendor.signer, vendor.kid, vendor.alg)
    dev = provision(tmp_path, trust)
    no_key = dev.install(manifest, Server(wire), now_ms=NOW)
    assert no_key.reason is UpdateReason.INSTALL_FAILED
    wrong = dev.install(manifest, Server(wire), now_ms=NOW, image_key=b"\x00" * 32)
    assert wrong.reason is UpdateReason.INSTALL_FAILED and "key" in wrong.detail
    assert_still_factory(dev)
    assert not (tmp_path / "slot_b" / "image").exists()
    server = Server(wire)
    ok = dev.install(manifest, server, now_ms=NOW, image_key=cek)
    assert ok.status is UpdateStatus.INSTALLED
    assert server.offsets == []  # the ciphertext was already complete and verified
    assert dev.active_image.read_bytes() == image


def test_two_updates_alternate_slots(tmp_path: Path, vendor: Key, trust: TrustAnchors) -> None:
    dev = provision(tmp_path, trust)
    v2, v3 = b"two" * 1000, b"three" * 1000
    assert dev.install(signed(vendor, v2, seq=5, version=2), Server(v2), now_ms=NOW).status \
        is UpdateStatus.INSTALLED
    assert dev.install(signed(vendor, v3, seq=6, version=3), Server(v3), now_ms=NOW).status \
        is UpdateStatus.INSTALLED
    assert (dev.state.active, dev.active_image.read_bytes()) == ("a", v3)
    assert hashlib.sha256((tmp_path / "slot_b" / "image").read_bytes()).digest() \
        == hashlib.sha256(v2).digest()


def test_damaged_state_is_refused(tmp_path: Path, trust: TrustAnchors) -> None:
    provision(tmp_path, trust)
    active = tmp_path / "active"
    active.write_bytes(active.read_bytes().replace(b'"version":1', b'"version":0'))
    with pytest.raises(ConfigError, match="damaged"):
        restart(tmp_path, trust)
    with pytest.raises(ConfigError, match="not provisioned"):
        restart(tmp_path / "nowhere", trust)
    with pytest.raises(ConfigError, match="already"):
        DeviceUpdater.provision(tmp_path, image=FACTORY, version=1, device_class="x",
                                trust=trust, health_check=Health())


def test_result_dict_is_small_and_plain() -> None:
    r = UpdateResult(UpdateStatus.ROLLED_BACK, 1, UpdateReason.HEALTH_CHECK_FAILED, "ab" * 16,
                     5, 2, None, "health check returned false")
    assert r.as_dict() == {"status": "rolled_back", "running_version": 1, "manifest": "ab" * 16,
                           "reason": "health_check_failed", "manifest_seq": 5,
                           "image_version": 2, "detail": "health check returned false"}


def flip_last(data: bytes) -> bytes:
    """The last byte (inside the signature) changed: always a different byte."""
    return data[:-1] + bytes([data[-1] ^ 1])
