"""Migration of legacy devices to the native envelope, and the legacy secrets at rest."""

from __future__ import annotations

import os

import pytest
from compat_helpers import SOURCE, T0, Env, valarm_body, valarm_sig

from sensorseal.core.envelope import seal
from sensorseal.core.errors import ConfigError, RejectReason
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import LEGACY_EPOCH, Registry

DEV = "5f1a2b3c4d5e6f7081928374"


def valarm_ok(env: Env, key: str, seq: int) -> bool:
    body = valarm_body(DEV, seq=seq)
    return env.compat.valarm(body, valarm_sig(body, key), source=SOURCE).ok


def test_migrate_valarm_device_to_native(env: Env) -> None:
    key = env.registry.add_legacy_device("hub", "valarm", external_id=DEV).generated_secret
    assert key is not None
    did = DeviceId.parse(DEV)
    assert valarm_ok(env, key, 1)
    native = env.registry.start_migration(did, target_policy="standard")
    assert native.device_id == did and native.epoch == 1
    assert env.registry.get(did).epoch == 1
    assert valarm_ok(env, key, 2)  # the legacy format works until the native keys are used
    with pytest.raises(ConfigError):
        env.registry.start_migration(did)  # issued once
    # The first native message: accepted (the legacy policy allows the native levels)...
    keys = derive(native.secret, did, native.epoch, Direction.UP)
    msg = seal(b'{"t":21}', keys=keys, seq=1, route="/v1/messages", timestamp_ms=T0)
    [result] = env.pipeline().ingest([(msg, "/v1/messages")], transport="http", source="t")
    assert result.ok
    # ... and the next legacy message finishes the migration and is refused.
    body = valarm_body(DEV, seq=3)
    out = env.compat.valarm(body, valarm_sig(body, key), source=SOURCE)
    assert out.reason is RejectReason.POLICY_VIOLATION
    record = env.registry.get(did)
    assert record.policy == "standard"
    legacy = env.registry.legacy_of(did)
    assert legacy is not None and legacy.state == "migrated"
    assert [e.reason for e in env.store.events(reason="legacy_migrated")] == ["legacy_migrated"]
    # legacy telemetry stays in its own epoch, native rows in theirs
    assert env.store.max_seq(did, LEGACY_EPOCH) == 2 and env.store.max_seq(did, 1) == 1


def test_sweep_finishes_migrations_without_legacy_traffic(env: Env) -> None:
    did = env.registry.add_legacy_device("hub", "yoctopuce", external_id="YHUBETH1-00001",
                                         secret="pw").device_id
    native = env.registry.start_migration(did, target_policy="lax")
    assert env.compat.migrating() == [did.hex()]
    assert env.compat.sweep_migrations() == 0  # not used yet
    keys = derive(native.secret, did, native.epoch, Direction.UP)
    msg = seal(b"x", keys=keys, seq=5, route="/v1/messages", timestamp_ms=T0)
    assert env.pipeline().ingest([(msg, "/v1/messages")], transport="http", source="t")[0].ok
    assert env.compat.sweep_migrations() == 1
    assert env.registry.get(did).policy == "lax" and env.compat.migrating() == []


def test_migration_refused_for_native_and_to_legacy(env: Env) -> None:
    native = env.registry.add_device("n", "standard")
    with pytest.raises(ConfigError):
        env.registry.start_migration(native.device_id)
    did = env.registry.add_legacy_device("hub", "valarm").device_id
    with pytest.raises(ConfigError):
        env.registry.start_migration(did, target_policy="legacy")


def test_native_message_refused_before_migration(env: Env) -> None:
    """A legacy device has no native key: a forged native message under epoch 0 or 1 fails."""
    did = env.registry.add_legacy_device("hub", "valarm", external_id=DEV).device_id
    for epoch in (0, 1):
        keys = derive(os.urandom(32), did, epoch, Direction.UP)
        msg = seal(b"x", keys=keys, seq=1, route="/v1/messages", timestamp_ms=T0)
        [r] = env.pipeline().ingest([(msg, "/v1/messages")], transport="http", source="t")
        assert r.reason is RejectReason.UNKNOWN_EPOCH


def test_legacy_secret_bound_to_device_and_kind(env: Env) -> None:
    a = env.registry.add_legacy_device("a", "valarm", secret="ApiKeyOfDeviceA12345")
    b = env.registry.add_legacy_device("b", "yoctopuce", external_id="YHUBETH1-1",
                                       secret="hub-pass")
    cred_a, cred_b = env.registry.legacy_of(a.device_id), env.registry.legacy_of(b.device_id)
    assert cred_a is not None and cred_b is not None and cred_a.wrapped is not None
    assert env.registry.legacy_secret(cred_a) == "ApiKeyOfDeviceA12345"
    assert "ApiKey" not in repr(cred_a) and "wrapped" not in repr(cred_a)
    swapped = type(cred_b)(cred_b.device_id, cred_b.kind, cred_b.external_id, cred_a.wrapped,
                           cred_b.options, cred_b.state, None, 0)
    with pytest.raises(ConfigError):
        env.registry.legacy_secret(swapped)  # another device's blob does not unwrap
    other_kek = Registry(env.store, SoftwareKeystore(os.urandom(32)))
    with pytest.raises(ConfigError):
        other_kek.legacy_secret(cred_a)


@pytest.mark.parametrize(("kind", "kw"), [
    ("valarm", {"external_id": "not-hex"}),
    ("valarm", {"secret": "short"}),
    ("valarm", {"secret": "has space in it 123"}),
    ("yoctopuce", {}),
    ("yoctopuce", {"external_id": "bad serial!"}),
    ("waspmote", {"external_id": "12345678901234567"}),
    ("waspmote", {"external_id": "0123456789ABCDEF", "secret": "x" * 17}),
    ("waspmote", {"external_id": "0123456789ABCDEF", "secret": "x", "aes_bits": 100}),
    ("modbus", {"external_id": "1"}),
])
def test_bad_registrations_refused(env: Env, kind: str, kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        env.registry.add_legacy_device("x", kind, **kw)  # type: ignore[arg-type]


def test_legacy_id_unique(env: Env) -> None:
    env.registry.add_legacy_device("a", "yoctopuce", external_id="YHUBETH1-1", secret="p")
    with pytest.raises(ConfigError, match="already registered"):
        env.registry.add_legacy_device("b", "yoctopuce", external_id="YHUBETH1-1", secret="q")
