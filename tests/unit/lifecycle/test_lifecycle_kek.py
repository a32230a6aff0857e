"""KEK rotation: every secret re-wrapped under a new KEK while a server keeps ingesting, the old
KEK useless afterwards (a stolen database plus the old KEK yields no key), and a rotation that
was interrupted resumes."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from lifecycle_support import ROUTE, sealed

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.renewal import DeviceKemKey
from sensorseal.datadir import DataDir
from sensorseal.keystore.software import SoftwareKeystore, load_kek
from sensorseal.lifecycle import KEK_NEXT_FILE, KEK_OLD_FILE, KeyLifecycle, open_keyring, rotate_kek
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.sqlite import SQLiteStore

NO_ENV: dict[str, str] = {}


def installation(tmp_path: Path) -> tuple[Path, list[DeviceCredential], bytes]:
    """A data dir with 3 devices, one rotated (2 epochs) and one with a pending renewal."""
    path = tmp_path / "data"
    datadir = DataDir(path, env=NO_ENV)
    datadir.init()
    store, keystore = datadir.open()
    try:
        registry = Registry(store, keystore)
        creds = [registry.add_device(f"d{i}", "lax") for i in range(3)]
        creds.append(KeyLifecycle(registry, store, keystore).rotate(creds[0].device_id))
        registry.register_renewal_key(creds[1].device_id, DeviceKemKey.generate().public_key())
        KeyLifecycle(registry, store, keystore).renew(creds[1].device_id)
    finally:
        store.close()
    return path, creds, load_kek(path, NO_ENV)


def all_blobs(db: Path) -> list[tuple[bytes, int, bytes]]:
    store = SQLiteStore(db)
    try:
        return [(bytes(d), e, b) for d, e, b in store.wrapped_secrets(limit=10_000)]
    finally:
        store.close()


def test_rotation_rewraps_everything_and_the_old_kek_opens_nothing(tmp_path: Path) -> None:
    path, creds, old_kek = installation(tmp_path)
    store = SQLiteStore(path / "sensorseal.db")
    try:
        result = rotate_kek(path, store, env=NO_ENV)
    finally:
        store.close()
    assert result.rewrapped == 5 and not result.resumed
    assert result.old_kek_id == SoftwareKeystore(old_kek).kek_id != result.new_kek_id
    assert not (path / KEK_NEXT_FILE).exists() and not (path / KEK_OLD_FILE).exists()
    assert stat.S_IMODE((path / "kek").stat().st_mode) == 0o600
    new_kek = load_kek(path, NO_ENV)
    assert new_kek != old_kek
    # The thief: a copy of the database file, and even the OLD KEK (leaked before rotation).
    stolen = tmp_path / "stolen.db"
    shutil.copy(path / "sensorseal.db", stolen)
    raw = stolen.read_bytes()
    old = SoftwareKeystore(old_kek)
    blobs = all_blobs(stolen)
    assert len(blobs) == 5
    for dev, epoch, blob in blobs:
        with pytest.raises(ConfigError):
            old.unwrap(dev, epoch, blob)  # type: ignore[arg-type]
    assert all(c.secret not in raw for c in creds)
    # The operator's side: the data dir opens with the new KEK and every secret is intact.
    store2, keystore = DataDir(path, env=NO_ENV).open()
    try:
        registry = Registry(store2, keystore)
        for cred in creds:
            assert registry.root_secret(cred.device_id, cred.epoch) == cred.secret
        assert store2.events(reason="kek_rotated")
    finally:
        store2.close()


def test_ingest_keeps_working_during_rotation(tmp_path: Path) -> None:
    """A server that opened its keystore before the rotation (old KEK only in memory) follows
    it through the Keyring: no message refused before, during or after."""
    path, creds, _ = installation(tmp_path)
    server_store = SQLiteStore(path / "sensorseal.db")
    ring = open_keyring(path, NO_ENV)
    pipeline = Pipeline(Registry(server_store, ring), server_store)
    live = [creds[1], creds[2], creds[3]]  # current epochs
    seqs = iter(range(1, 1000))

    def ingest_all() -> list[bool]:
        pipeline.invalidate()  # nothing cached: every secret is unwrapped again
        n = next(seqs)
        items = [(sealed(c, n, now_ms=pipeline.now_ms()), ROUTE) for c in live]
        return [r.ok for r in pipeline.ingest(items, transport="http", source="t")]

    assert ingest_all() == [True] * 3
    rot_store = SQLiteStore(path / "sensorseal.db")
    try:
        seen: list[list[bool]] = []
        rotate_kek(path, rot_store, env=NO_ENV, between=lambda: seen.append(ingest_all()))
    finally:
        rot_store.close()
    assert seen == [[True] * 3]  # mid-rotation: blobs under the new KEK, files not swapped
    assert ingest_all() == [True] * 3
    assert len(ring.kek_ids) == 2
    server_store.close()


def test_interrupted_rotation_resumes(tmp_path: Path) -> None:
    path, creds, old_kek = installation(tmp_path)
    store = SQLiteStore(path / "sensorseal.db")
    try:
        def crash() -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            rotate_kek(path, store, env=NO_ENV, between=crash)
        assert (path / KEK_NEXT_FILE).exists() and load_kek(path, NO_ENV) == old_kek
        # Meanwhile the old-KEK server renews a device: a blob under the old KEK again.
        keystore = SoftwareKeystore(old_kek)
        registry = Registry(store, keystore)
        fresh = KeyLifecycle(registry, store, keystore).rotate(creds[2].device_id)
        result = rotate_kek(path, store, env=NO_ENV)
        assert result.resumed and result.rewrapped == 1
        ring = open_keyring(path, NO_ENV)
        assert ring.kek_ids == [result.new_kek_id]
        assert Registry(store, ring).root_secret(fresh.device_id, fresh.epoch) == fresh.secret
    finally:
        store.close()


def test_rotation_refuses_a_kek_from_the_environment(tmp_path: Path) -> None:
    path, _, _ = installation(tmp_path)
    store = SQLiteStore(path / "sensorseal.db")
    try:
        with pytest.raises(ConfigError, match="SENSORSEAL_KEK"):
            rotate_kek(path, store, env={"SENSORSEAL_KEK": "x"})
    finally:
        store.close()
