"""The server-side rollout state machine, and a simulated rollout to 100 in-process devices on
real files, 10 of them offline for the first rounds."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from updates_support import NOW, Key, Server, build_manifest

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.updates.device_updater import DeviceUpdater
from sensorseal.updates.manifest import TrustAnchors, UpdateReason, manifest_ref, sign_manifest
from sensorseal.updates.rollout import (
    TRANSITIONS,
    DeviceRecord,
    DeviceState,
    InMemoryRolloutStore,
    ReportRefused,
    Rollout,
    Rollouts,
    Target,
    select,
)

MID = "ab" * 16


def ids(n: int, salt: int = 0) -> list[DeviceId]:
    return [DeviceId(hashlib.sha256(f"{salt}/{i}".encode()).digest()[:12]) for i in range(n)]


def new_rollout(devices: list[DeviceId], rid: str = "r1") -> tuple[Rollouts, str]:
    planner = Rollouts(InMemoryRolloutStore())
    planner.create(Rollout(rid, MID, 5, 2, "thermo-v2", NOW), Target.devices(devices))
    return planner, rid


def test_selection_is_deterministic_and_grows_monotonically() -> None:
    group = ids(2000)
    ten = select("fw-7", Target.percentage("field", group, 10))
    assert ten == select("fw-7", Target.percentage("field", group, 10))
    assert 140 <= len(ten) <= 260  # 10 % of 2000, binomial spread
    fifty = select("fw-7", Target.percentage("field", group, 50))
    assert set(ten) < set(fifty)  # raising the percentage only adds devices
    assert set(ten) != set(select("fw-8", Target.percentage("field", group, 10)))
    assert select("fw-7", Target.percentage("field", group, 0)) == ()
    assert select("fw-7", Target.whole_group("field", group)) == tuple(group)
    assert select("fw-7", Target.devices(group[:3])) == tuple(group[:3])
    with pytest.raises(ConfigError):
        Target.percentage("field", group, 101)
    with pytest.raises(ConfigError):
        Target.devices([group[0], group[0]])


def test_happy_transitions_and_summary() -> None:
    devs = ids(3)
    planner, rid = new_rollout(devs)
    assert planner.summary(rid).by_state[DeviceState.PENDING] == 3
    d = devs[0]
    planner.offer(rid, d, now_ms=NOW)
    rec = planner.report(rid, d, {"status": "downloading", "manifest": MID, "offset": 4096},
                         now_ms=NOW + 1)
    assert (rec.state, rec.offset, rec.attempts) == (DeviceState.DOWNLOADING, 4096, 1)
    planner.report(rid, d, {"status": "verified", "manifest": MID}, now_ms=NOW + 2)
    rec = planner.report(rid, d, {"status": "installed", "manifest": MID}, now_ms=NOW + 3)
    assert (rec.state, rec.updated_ms, rec.revision) == (DeviceState.INSTALLED, NOW + 3, 4)
    planner.offer(rid, devs[1], now_ms=NOW)
    rec = planner.report(rid, devs[1], {"status": "rolled_back", "manifest": MID,
                                        "reason": "health_check_failed"}, now_ms=NOW)
    assert (rec.state, rec.reason) == (DeviceState.FAILED, UpdateReason.HEALTH_CHECK_FAILED)
    s = planner.summary(rid)
    assert not s.complete and planner.to_offer(rid) == [devs[2]]
    assert s.as_dict() == {"total": 3, "complete": False,
                           "states": {"pending": 1, "offered": 0, "downloading": 0,
                                      "verified": 0, "installed": 1, "failed": 1},
                           "failures": {"health_check_failed": 1}}
    planner.fail(rid, devs[2], UpdateReason.INSTALL_FAILED, now_ms=NOW)
    assert planner.summary(rid).complete


@pytest.mark.parametrize("report", [
    {"status": "installed", "manifest": "cd" * 16},  # another manifest
    {"status": "installed", "manifest_seq": 4},  # another manifest, by sequence
    {"status": "installed", "manifest": MID, "manifest_seq": 4},  # the sequence decides
    {"status": "rejected", "reason": "malformed"},  # names no manifest at all
    {"status": "bricked", "manifest": MID},  # unknown status
    {"status": "rejected", "manifest": MID},  # failure without reason
    {"status": "rejected", "manifest": MID, "reason": "gremlins"},  # unknown reason
])
def test_reports_that_do_not_fit_are_refused(report: dict[str, Any]) -> None:
    devs = ids(1)
    planner, rid = new_rollout(devs)
    planner.offer(rid, devs[0], now_ms=NOW)
    with pytest.raises(ReportRefused):
        planner.report(rid, devs[0], report, now_ms=NOW)
    assert planner.summary(rid).by_state[DeviceState.OFFERED] == 1


def test_final_states_are_final_and_order_is_enforced() -> None:
    devs = ids(2)
    planner, rid = new_rollout(devs)
    with pytest.raises(ReportRefused, match="pending -> installed"):  # never offered
        planner.report(rid, devs[0], {"status": "installed", "manifest": MID}, now_ms=NOW)
    planner.offer(rid, devs[0], now_ms=NOW)
    planner.report(rid, devs[0], {"status": "installed", "manifest": MID}, now_ms=NOW)
    for late in ("downloading", "verified", "rejected"):
        with pytest.raises(ReportRefused):
            planner.report(rid, devs[0], {"status": late, "manifest": MID, "reason": "rollback"},
                           now_ms=NOW)
    with pytest.raises(ReportRefused):
        planner.offer(rid, devs[0], now_ms=NOW)
    with pytest.raises(ReportRefused, match="not in rollout"):
        planner.report(rid, ids(1, salt=9)[0], {"status": "installed", "manifest": MID},
                       now_ms=NOW)
    assert all(not TRANSITIONS[s] for s in (DeviceState.INSTALLED, DeviceState.FAILED))
    with pytest.raises(ConfigError):
        planner.summary("nope")


class FlakyStore(InMemoryRolloutStore):
    """Another worker wins the compare-and-set `conflicts` times."""

    def __init__(self, conflicts: int) -> None:
        super().__init__()
        self.conflicts = conflicts

    def replace_device(self, rollout_id: str, record: DeviceRecord, *,
                       expect_revision: int) -> bool:
        if self.conflicts:
            self.conflicts -= 1
            return False
        return super().replace_device(rollout_id, record, expect_revision=expect_revision)


def test_compare_and_set_retries_then_gives_up() -> None:
    devs = ids(1)
    store = FlakyStore(0)
    planner = Rollouts(store)
    planner.create(Rollout("r", MID, 5, 2, "thermo-v2", NOW), Target.devices(devs))
    store.conflicts = 3
    assert planner.offer("r", devs[0], now_ms=NOW).state is DeviceState.OFFERED
    store.conflicts = 100
    with pytest.raises(ReportRefused, match="concurrent"):
        planner.report("r", devs[0], {"status": "installed", "manifest": MID}, now_ms=NOW)
    with pytest.raises(ConfigError):
        store.add_rollout(Rollout("r", MID, 5, 2, "thermo-v2", NOW), [])


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """100 devices fsync a lot; tmpfs keeps that fast. Falls back to tmp_path."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    if base is None:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="sensorseal-rollout-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_rollout_to_100_devices_with_10_percent_offline(fast_dir: Path, vendor: Key,
                                                        trust: TrustAnchors) -> None:
    image = os.urandom(6000)
    factory = b"factory v1"
    manifest = sign_manifest(build_manifest(image, seq=5, version=2), vendor.signer, vendor.kid,
                             vendor.alg)
    fleet = ids(100)
    offline = set(fleet[:10])  # unreachable for the first 3 rounds
    flaky = set(fleet[10:15])  # transport drops once mid-download
    sick, ahead = fleet[20], fleet[30]  # fails its health check / already runs version 3

    store = InMemoryRolloutStore()
    planner = Rollouts(store)
    rid = "fw-2-field"
    rollout = Rollout(rid, manifest_ref(manifest), 5, 2, "thermo-v2", NOW)
    assert planner.create(rollout, Target.whole_group("field", fleet)) == tuple(fleet)

    clock = [NOW]
    devices: dict[DeviceId, DeviceUpdater] = {}
    servers: dict[DeviceId, Server] = {}
    for i, d in enumerate(fleet):
        def forward(report: dict[str, Any], d: DeviceId = d) -> None:
            planner.report(rid, d, report, now_ms=clock[0])
        devices[d] = DeviceUpdater.provision(
            fast_dir / f"dev{i:03d}", image=factory, version=3 if d == ahead else 1,
            device_class="thermo-v2", trust=trust, health_check=lambda _p, d=d: d != sick,
            notify=forward)
        servers[d] = Server(image, chunk=2048)
        if d in flaky:
            servers[d].fail_at = 2048

    rounds = 0
    while not planner.summary(rid).complete and rounds < 10:
        for d in planner.to_offer(rid):
            if rounds < 3 and d in offline:
                continue
            planner.offer(rid, d, now_ms=clock[0])
            result = devices[d].install(manifest, servers[d], now_ms=clock[0])
            planner.report(rid, d, result.as_dict(), now_ms=clock[0])
        rounds += 1
        clock[0] += 60_000

    summary = planner.summary(rid)
    assert summary.complete, summary.as_dict()
    assert summary.by_state[DeviceState.INSTALLED] == 98
    assert dict(summary.failures) == {UpdateReason.HEALTH_CHECK_FAILED: 1,
                                      UpdateReason.ROLLBACK: 1}
    for d in fleet:
        dev = devices[d]
        running = dev.active_image.read_bytes()
        if d in (sick, ahead):
            assert running == factory
        else:
            assert running == image and dev.installed_version == 2
    records = {r.device_id: r for r in store.devices(rid)}
    assert all(records[d].attempts == 1 for d in offline)  # offered once they came online
    assert all(records[d].attempts == 2 for d in flaky)  # resumed on the second offer
    assert all(servers[d].offsets.count(0) == 1 for d in flaky)  # never restarted from 0
    assert records[sick].reason is UpdateReason.HEALTH_CHECK_FAILED
    # round 0: 88 install, 5 flaky stop mid-download; round 1: the flaky ones resume;
    # round 2: only the offline ones are left; round 3: they are back and install.
    assert rounds == 4
