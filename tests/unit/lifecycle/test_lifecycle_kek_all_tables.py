"""KEK rotation moves every KEK-wrapped blob, not only device root secrets: E1 network keys and
gateway secrets of every key epoch, legacy-device secrets and EVA API keys each stay readable
(same value, same keystore binding) under the new KEK, and a copy of the database with only the
old KEK opens none of them. Runs on SQLite and on PostgreSQL (a fresh database on the
machine's server)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.link import wrap
from sensorseal.datadir import DataDir
from sensorseal.gateway.provision import GatewayRegistry, parse_network_key
from sensorseal.keystore.software import SoftwareKeystore, load_kek
from sensorseal.lifecycle import KeyLifecycle, rotate_kek
from sensorseal.registry import EVA_KEY_SLOT, LEGACY_KEY_SLOT, Registry, eva_key_slot
from sensorseal.store.base import WrappedBlob, WrappedKind
from sensorseal.store.sqlite import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for pg_support

NO_ENV: dict[str, str] = {}
EVA_KEY_ID = "operator@site-1"
EVA_API_KEY = "eva-api-key-0123456789"


def _sqlite(path: Path, stack: ExitStack) -> Any:
    store = SQLiteStore(path / "sensorseal.db")
    store.migrate()
    stack.callback(store.close)
    return store


def _postgres(path: Path, stack: ExitStack) -> Any:
    import pg_support
    from sensorseal.store.postgres import PostgresStore

    pg_support.require_postgres()
    url = stack.enter_context(pg_support.fresh_database(prefix="sensorseal_kek"))
    store = PostgresStore(url, pool_size=2)
    stack.callback(store.close)
    store.migrate()
    return store


BACKENDS: dict[str, Callable[[Path, ExitStack], Any]] = {
    "sqlite": _sqlite, "postgresql": _postgres}


@dataclass
class Secrets:
    """Each kind of KEK-wrapped secret and its clear value before the rotation."""

    device: DeviceCredential
    rotated: DeviceCredential
    legacy_id: DeviceId
    legacy: str
    network_id: bytes
    network_text: str
    old_network_text: str
    gateway: DeviceCredential
    old_gateway: DeviceCredential


@pytest.fixture(params=sorted(BACKENDS))
def install(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A data dir (its KEK file) and a migrated, empty store of the back end."""
    path = tmp_path / "data"
    DataDir(path, env=NO_ENV).init()
    with ExitStack() as stack:
        yield path, BACKENDS[request.param](path, stack)


def provision(store: Any, keystore: SoftwareKeystore) -> Secrets:
    registry = Registry(store, keystore)
    device = registry.add_device("d0", "lax")
    rotated = KeyLifecycle(registry, store, keystore).rotate(device.device_id)
    legacy = registry.add_legacy_device("valarm-0", "valarm")
    if hasattr(store, "add_eva_key"):
        registry.add_eva_key(EVA_KEY_ID, EVA_API_KEY)
    else:  # PostgresStore has the eva_keys table but no IotCoreStore port: write the row
        blob = keystore.wrap(eva_key_slot(EVA_KEY_ID), EVA_KEY_SLOT,
                             b"sensorseal-eva-key/1\0" + EVA_API_KEY.encode("ascii"))
        with store._tx() as conn:
            conn.execute("INSERT INTO eva_keys (key_id, wrapped, created_ms)"
                         " VALUES (%s, %s, 1)", (EVA_KEY_ID, blob))
    gateways = GatewayRegistry(store, keystore)
    network, old_network_text = gateways.add_network("field-a")
    old_gateway = gateways.add_gateway("gw-a", [network.network_id])
    # a second key epoch of each: the rotation must move the old epoch (still in grace) too
    _, network_text = gateways.rotate_network(network.network_id)
    gateway = gateways.rotate_gateway(old_gateway.device_id)
    cred = registry.legacy_of(legacy.device_id)
    assert cred is not None
    secret = registry.legacy_secret(cred)
    assert secret is not None and secret == legacy.generated_secret
    return Secrets(device, rotated, legacy.device_id, secret, network.network_id, network_text,
                   old_network_text, gateway, old_gateway)


def eva_api_key(store: Any, keystore: SoftwareKeystore) -> str:
    blob = store.kek_blobs(WrappedKind.EVA)[0].wrapped
    plain = keystore.unwrap(eva_key_slot(EVA_KEY_ID), EVA_KEY_SLOT, blob)
    return plain.removeprefix(b"sensorseal-eva-key/1\0").decode("ascii")


def every_blob(store: Any) -> list[tuple[DeviceId, int, bytes]]:
    """Every KEK-wrapped blob in the store with the keystore binding its feature uses."""
    found = list(store.wrapped_secrets(limit=10_000))
    bindings: dict[WrappedKind, Callable[[WrappedBlob], tuple[DeviceId, int]]] = {
        WrappedKind.NETWORK: lambda b: (DeviceId(bytes(b.row)), b.epoch),  # type: ignore[arg-type]
        WrappedKind.GATEWAY: lambda b: (DeviceId(bytes(b.row)), b.epoch),  # type: ignore[arg-type]
        WrappedKind.LEGACY: lambda b: (DeviceId(bytes(b.row)), LEGACY_KEY_SLOT),  # type: ignore[arg-type]
        WrappedKind.EVA: lambda b: (eva_key_slot(str(b.row)), EVA_KEY_SLOT),
    }
    for kind, bind in bindings.items():
        for blob in store.kek_blobs(kind, limit=10_000):
            found.append((*bind(blob), blob.wrapped))
    return found


def test_rotation_moves_every_table_and_the_old_kek_opens_nothing(
        install: tuple[Path, Any]) -> None:
    path, store = install
    old_kek = load_kek(path, NO_ENV)
    old = SoftwareKeystore(old_kek)
    before = provision(store, old)
    # 2 device epochs, legacy, EVA, 2 network key epochs, 2 gateway epochs
    assert len(every_blob(store)) == 8

    result = rotate_kek(path, store, env=NO_ENV)

    assert result.rewrapped == 8 and result.old_kek_id == old.kek_id != result.new_kek_id
    new = SoftwareKeystore(load_kek(path, NO_ENV))  # the old KEK is retired: kek only
    assert new.kek_id == result.new_kek_id
    assert not (path / "kek.old").exists() and not (path / "kek.next").exists()
    # every blob is under the new KEK, and each feature reads back the same value through it
    blobs = every_blob(store)
    assert len(blobs) == 8 and all(b[1:5].hex() == new.kek_id for _, _, b in blobs)
    registry, gateways = Registry(store, new), GatewayRegistry(store, new)
    for cred in (before.device, before.rotated):
        assert registry.root_secret(cred.device_id, cred.epoch) == cred.secret
    cred = registry.legacy_of(before.legacy_id)
    assert cred is not None and registry.legacy_secret(cred) == before.legacy
    assert eva_api_key(store, new) == EVA_API_KEY
    if hasattr(store, "eva_key"):
        assert registry.eva_api_key(EVA_KEY_ID) == EVA_API_KEY
    assert gateways.network_key_text(before.network_id) == before.network_text
    ring = gateways.network_keyring(before.network_id)
    assert [k.epoch for k, _ in ring] == [0, 1]  # the old epoch, still in grace, opens too
    old_key, stored_old = parse_network_key(before.old_network_text), ring.get(0)
    assert stored_old is not None
    assert wrap(b"x", network=stored_old, sender=bytes(12), seq=1) == \
        wrap(b"x", network=old_key, sender=bytes(12), seq=1)
    gw, old_gw = before.gateway, before.old_gateway
    assert gateways.gateway_secret(gw.device_id, gw.epoch) == gw.secret
    assert gateways.gateway_secret(old_gw.device_id, old_gw.epoch) == old_gw.secret
    assert gateways.gateway_config(gw.device_id)["gateway"] == gw.encode()

    # the database with only the old KEK: not one blob opens, and the features refuse
    for bound_id, slot, blob in blobs:
        with pytest.raises(ConfigError):
            old.unwrap(bound_id, slot, blob)
    stale, stale_gw = Registry(store, old), GatewayRegistry(store, old)
    cred = stale.legacy_of(before.legacy_id)
    assert cred is not None
    for attempt in (lambda: stale.root_secret(before.device.device_id, before.device.epoch),
                    lambda: stale.legacy_secret(cred),
                    lambda: eva_api_key(store, old),
                    lambda: stale_gw.network_key_text(before.network_id),
                    lambda: stale_gw.network_key(before.network_id, 0),
                    lambda: stale_gw.gateway_secret(gw.device_id, gw.epoch),
                    lambda: stale_gw.gateway_secret(old_gw.device_id, old_gw.epoch)):
        with pytest.raises(ConfigError):
            attempt()


def test_kek_blob_paging_and_compare_and_swap(install: tuple[Path, Any]) -> None:
    path, store = install
    keystore = SoftwareKeystore(load_kek(path, NO_ENV))
    gateways = GatewayRegistry(store, keystore)
    ids = sorted(gateways.add_network(f"n{i}")[0].network_id for i in range(5))
    for _ in range(2):  # epochs 0, 1, 2 of the second network: a page ends inside a network
        gateways.rotate_network(ids[1])
    seen: list[WrappedBlob] = []
    after: tuple[bytes | str, int] | None = None
    while page := store.kek_blobs(WrappedKind.NETWORK, after=after, limit=2):
        assert len(page) <= 2
        seen.extend(page)
        after = (page[-1].row, page[-1].epoch)
    assert [(b.row, b.epoch) for b in seen] == \
        [(ids[0], 0), (ids[1], 0), (ids[1], 1), (ids[1], 2), *((i, 0) for i in ids[2:])]
    first = seen[0]
    assert not store.replace_kek_blob(WrappedKind.NETWORK, first.row, 0, b"not it", b"x")
    assert not store.replace_kek_blob(WrappedKind.NETWORK, first.row, 1, first.wrapped, b"x")
    assert store.replace_kek_blob(WrappedKind.NETWORK, first.row, 0, first.wrapped, b"new")
    assert store.kek_blobs(WrappedKind.NETWORK, limit=1)[0].wrapped == b"new"
    assert not store.replace_kek_blob(WrappedKind.NETWORK, first.row, 0, first.wrapped, b"y")
    gw = gateways.add_gateway("gw", [ids[1]])
    (row,) = store.kek_blobs(WrappedKind.GATEWAY)
    assert row.row == bytes(gw.device_id) and row.epoch == gw.epoch
    assert store.kek_blobs(WrappedKind.LEGACY) == [] == store.kek_blobs(WrappedKind.EVA)


class _RacingStore(SQLiteStore):
    """Rewrites the network key's blob (old KEK, same value) right after the rotation read it,
    like another process re-wrapping concurrently: the compare-and-swap must lose, and the next
    pass must move the new blob."""

    keystore: SoftwareKeystore
    raced = 0

    def kek_blobs(self, kind: WrappedKind, *, after: tuple[bytes | str, int] | None = None,
                  limit: int = 500) -> list[WrappedBlob]:
        page = super().kek_blobs(kind, after=after, limit=limit)
        if kind is WrappedKind.NETWORK and page and not self.raced:
            self.raced += 1
            row = page[0]
            network_id = DeviceId(bytes(row.row))  # type: ignore[arg-type]
            clear = self.keystore.unwrap(network_id, row.epoch, row.wrapped)
            again = self.keystore.wrap(network_id, row.epoch, clear)
            assert self.replace_kek_blob(kind, row.row, 0, row.wrapped, again)
        return page


def test_a_blob_changed_during_the_rotation_is_moved_by_the_next_pass(tmp_path: Path) -> None:
    path = tmp_path / "data"
    DataDir(path, env=NO_ENV).init()
    store = _RacingStore(path / "sensorseal.db")
    try:
        store.migrate()
        store.keystore = SoftwareKeystore(load_kek(path, NO_ENV))
        network, text = GatewayRegistry(store, store.keystore).add_network("field-a")
        result = rotate_kek(path, store, env=NO_ENV)
        assert store.raced == 1 and result.rewrapped == 1
        new = SoftwareKeystore(load_kek(path, NO_ENV))
        assert GatewayRegistry(store, new).network_key_text(network.network_id) == text
    finally:
        store.close()
