"""The registry service: provisioning, validation, state changes and their audit trail."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator

import pytest

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.policy import PRESETS
from sensorseal.keystore import SoftwareKeystore
from sensorseal.registry import FIRST_EPOCH, Registry
from sensorseal.store import AuditEvent, DeviceStatus, SQLiteStore

NOW_MS = 1_700_000_000_123


class Clock:
    def __init__(self) -> None:
        self.now = NOW_MS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:")
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(store: SQLiteStore, clock: Clock) -> Registry:
    return Registry(store, SoftwareKeystore(bytes(32)), clock_ms=clock)


def counting_random() -> Callable[[int], bytes]:
    """Deterministic distinct bytes, so a test can predict ids and secrets."""
    counter = itertools.count(1)
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


def test_add_device(registry: Registry, store: SQLiteStore) -> None:
    cred = registry.add_device("boiler room", "stringent")
    assert isinstance(cred, DeviceCredential) and cred.epoch == FIRST_EPOCH
    assert cred.device_id[:4] == (NOW_MS // 1000).to_bytes(4, "big")  # ObjectId-shaped
    rec = registry.get(cred.device_id)
    assert (rec.name, rec.policy, rec.status, rec.epoch, rec.created_ms) == (
        "boiler room", "stringent", DeviceStatus.ACTIVE, FIRST_EPOCH, NOW_MS)
    assert registry.root_secret(cred.device_id, FIRST_EPOCH) == cred.secret
    assert registry.root_secret(cred.device_id, FIRST_EPOCH + 1) is None
    wrapped = store.get_secret(cred.device_id, FIRST_EPOCH)
    assert wrapped is not None and cred.secret not in wrapped
    assert DeviceCredential.parse(cred.encode()) == cred


def test_add_device_uses_the_injected_randomness(store: SQLiteStore, clock: Clock) -> None:
    registry = Registry(store, SoftwareKeystore(bytes(32)), clock_ms=clock,
                        random=counting_random())
    cred = registry.add_device("d")
    assert cred.secret == bytes(range(1, 33))
    assert cred.device_id[4:] == bytes(range(33, 41))


def test_secrets_and_ids_differ_between_devices(registry: Registry, clock: Clock) -> None:
    creds = []
    for n in range(20):
        clock.now += 1
        creds.append(registry.add_device(f"d{n}"))
    assert len({c.secret for c in creds}) == 20
    assert len({c.device_id for c in creds}) == 20
    assert [d.name for d in registry.list()] == [f"d{n}" for n in range(20)]
    assert [d.name for d in registry.list(limit=2, offset=3)] == ["d3", "d4"]


def test_an_id_collision_is_retried(store: SQLiteStore, clock: Clock) -> None:
    fixed = iter([b"S" * 32, b"A" * 8,   # first device
                  b"T" * 32, b"A" * 8,   # second: same id bytes -> DeviceExists -> retry
                  b"B" * 8])
    registry = Registry(store, SoftwareKeystore(bytes(32)), clock_ms=clock,
                        random=lambda n: next(fixed))
    first = registry.add_device("first")
    second = registry.add_device("second")
    assert first.device_id != second.device_id and second.device_id.endswith(b"B" * 8)
    assert registry.root_secret(second.device_id, FIRST_EPOCH) == b"T" * 32
    assert registry.root_secret(first.device_id, FIRST_EPOCH) == b"S" * 32


def test_a_broken_random_source_gives_up(store: SQLiteStore, clock: Clock) -> None:
    registry = Registry(store, SoftwareKeystore(bytes(32)), clock_ms=clock,
                        random=lambda n: b"\x00" * n)
    registry.add_device("first")
    with pytest.raises(ConfigError, match="random source"):
        registry.add_device("second")
    assert len(registry.list()) == 1


@pytest.mark.parametrize("name", ["", "x" * 65, "line\nbreak", "nul\x00", "tab\there", "\u200b"])
def test_bad_names_are_refused(registry: Registry, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        registry.add_device(name)
    cred = registry.add_device("ok")
    with pytest.raises(ConfigError, match="name"):
        registry.rename(cred.device_id, name)
    assert registry.get(cred.device_id).name == "ok"


@pytest.mark.parametrize("name", ["x", "x" * 64, "Kühlhaus 3 / Süd", "a b"])
def test_good_names(registry: Registry, name: str) -> None:
    assert registry.get(registry.add_device(name).device_id).name == name


def test_policy_must_be_a_preset(registry: Registry) -> None:
    for policy in PRESETS:
        assert registry.get(registry.add_device("d", policy).device_id).policy == policy
    with pytest.raises(ConfigError, match="unknown policy") as info:
        registry.add_device("d", "paranoid")
    assert "standard" in str(info.value)
    assert len(registry.list()) == len(PRESETS)


def test_default_policy_is_standard(registry: Registry) -> None:
    assert registry.get(registry.add_device("d").device_id).policy == "standard"


def test_unknown_device(registry: Registry) -> None:
    ghost = DeviceId(b"\x42" * 12)
    assert registry.find(ghost) is None
    for call in (registry.get, registry.suspend, registry.resume, registry.revoke):
        with pytest.raises(ConfigError, match=str(ghost)):
            call(ghost)
    with pytest.raises(ConfigError, match="no device"):
        registry.rename(ghost, "x")
    assert registry.root_secret(ghost, 1) is None
    assert registry.find(registry.add_device("d").device_id) is not None


def test_lifecycle_and_audit_trail(registry: Registry, store: SQLiteStore, clock: Clock) -> None:
    cred = registry.add_device("pump", actor="alice", transport="http")
    did = cred.device_id
    clock.now += 1
    assert registry.rename(did, "pump 2", actor="bob").name == "pump 2"
    clock.now += 1
    assert registry.suspend(did, actor="bob").status is DeviceStatus.SUSPENDED
    clock.now += 1
    assert registry.resume(did).status is DeviceStatus.ACTIVE
    clock.now += 1
    assert registry.suspend(did).status is DeviceStatus.SUSPENDED
    clock.now += 1
    assert registry.revoke(did, actor="carol").status is DeviceStatus.REVOKED

    trail = list(reversed(store.events(device_id=str(did))))
    assert [(e.reason, e.source, e.transport, e.at_ms) for e in trail] == [
        ("device_added", "alice", "http", NOW_MS),
        ("device_renamed", "bob", "cli", NOW_MS + 1),
        ("device_suspended", "bob", "cli", NOW_MS + 2),
        ("device_resumed", "cli", "cli", NOW_MS + 3),
        ("device_suspended", "cli", "cli", NOW_MS + 4),
        ("device_revoked", "carol", "cli", NOW_MS + 5),
    ]
    assert "pump" in trail[1].detail and "pump 2" in trail[1].detail
    assert "standard" in trail[0].detail
    for e in trail:
        assert cred.secret.hex() not in e.detail and cred.encode() not in e.detail
    # the secret is kept after revocation (old data stays verifiable), the id stays taken
    assert registry.root_secret(did, FIRST_EPOCH) == cred.secret


def test_revocation_is_final(registry: Registry, store: SQLiteStore) -> None:
    did = registry.add_device("d").device_id
    registry.revoke(did)
    for call in (registry.revoke, registry.resume, registry.suspend):
        with pytest.raises(ConfigError, match="revoked; revocation is final"):
            call(did)
    assert registry.get(did).status is DeviceStatus.REVOKED
    assert [e.reason for e in store.events()] == ["device_revoked", "device_added"]


def test_pointless_transitions_are_refused(registry: Registry, store: SQLiteStore) -> None:
    did = registry.add_device("d").device_id
    with pytest.raises(ConfigError, match="is active; cannot make it active"):
        registry.resume(did)
    registry.suspend(did)
    with pytest.raises(ConfigError, match="is suspended; cannot make it suspended"):
        registry.suspend(did)
    assert store.count_events_by_reason() == {"device_added": 1, "device_suspended": 1}


def test_suspended_device_can_be_revoked(registry: Registry) -> None:
    did = registry.add_device("d").device_id
    registry.suspend(did)
    assert registry.revoke(did).status is DeviceStatus.REVOKED


def test_wall_clock_by_default(store: SQLiteStore) -> None:
    before = time.time_ns() // 1_000_000
    cred = Registry(store, SoftwareKeystore(os.urandom(32))).add_device("d")
    after = time.time_ns() // 1_000_000
    rec = Registry(store, SoftwareKeystore(os.urandom(32))).get(cred.device_id)
    assert before <= rec.created_ms <= after
    ev: AuditEvent = store.events(reason="device_added")[0]
    assert before <= ev.at_ms <= after
