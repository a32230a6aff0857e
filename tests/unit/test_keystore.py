"""The software keystore: AES-256-GCM wrapping under a KEK, and where the KEK comes from."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.keystore import Keystore, SoftwareKeystore, create_kek_file, load_kek
from sensorseal.keystore.software import KEK_ENV
from sensorseal.registry import Registry
from sensorseal.store import SQLiteStore

DEV = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f601020304"))
OTHER = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f6aabbccdd"))
SECRET = bytes(range(100, 132))
KEK = bytes(range(32))


def assert_no_secret(text: str, secret: bytes = SECRET) -> None:
    for form in (secret.hex(), base64.b64encode(secret).decode(),
                 base64.urlsafe_b64encode(secret).decode().rstrip("="), repr(secret)):
        assert form not in text


def test_is_a_keystore() -> None:
    ks: Keystore = SoftwareKeystore(KEK)
    assert ks.unwrap(DEV, 1, ks.wrap(DEV, 1, SECRET)) == SECRET


def test_blob_layout_and_fresh_nonces() -> None:
    ks = SoftwareKeystore(KEK)
    one, two = ks.wrap(DEV, 7, SECRET), ks.wrap(DEV, 7, SECRET)
    assert len(one) == 1 + 4 + 12 + len(SECRET) + 16
    assert one[0] == 0x01
    assert one[1:5].hex() == ks.kek_id
    assert one[5:17] != two[5:17]  # random 96-bit nonce per wrap
    assert one != two
    assert SECRET not in one
    assert ks.unwrap(DEV, 7, one) == ks.unwrap(DEV, 7, two) == SECRET


def test_kek_id_is_a_stable_public_fingerprint() -> None:
    ks = SoftwareKeystore(KEK)
    assert ks.kek_id == SoftwareKeystore(KEK).kek_id
    assert len(ks.kek_id) == 8 and int(ks.kek_id, 16) >= 0
    assert ks.kek_id != SoftwareKeystore(bytes(32)).kek_id
    assert ks.kek_id not in KEK.hex()
    assert KEK.hex() not in repr(ks) and ks.kek_id in repr(ks)


def test_wrong_kek_fails_without_leaking() -> None:
    blob = SoftwareKeystore(KEK).wrap(DEV, 1, SECRET)
    with pytest.raises(ConfigError, match="not this KEK") as info:
        SoftwareKeystore(os.urandom(32)).unwrap(DEV, 1, blob)
    assert_no_secret(str(info.value))


def test_wrong_kek_with_a_forged_kek_id_still_fails() -> None:
    """The kek_id is only a hint; authentication is the AEAD tag."""
    other = SoftwareKeystore(os.urandom(32))
    blob = bytearray(SoftwareKeystore(KEK).wrap(DEV, 1, SECRET))
    blob[1:5] = bytes.fromhex(other.kek_id)
    with pytest.raises(ConfigError, match="does not authenticate"):
        other.unwrap(DEV, 1, bytes(blob))


@pytest.mark.parametrize("index", [5, 16, 17, 30, 48, -1])  # nonce, ciphertext, tag
def test_tampered_blob_fails(index: int) -> None:
    ks = SoftwareKeystore(KEK)
    blob = bytearray(ks.wrap(DEV, 1, SECRET))
    blob[index] ^= 0x01
    with pytest.raises(ConfigError, match="does not authenticate") as info:
        ks.unwrap(DEV, 1, bytes(blob))
    assert_no_secret(str(info.value))


@pytest.mark.parametrize("blob", [b"", b"\x01" + b"\x00" * 10, b"\x02" + b"\x00" * 60])
def test_malformed_blob_fails(blob: bytes) -> None:
    with pytest.raises(ConfigError, match="version-1 blob"):
        SoftwareKeystore(KEK).unwrap(DEV, 1, blob)


def test_aad_binds_device_and_epoch() -> None:
    ks = SoftwareKeystore(KEK)
    blob = ks.wrap(DEV, 3, SECRET)
    with pytest.raises(ConfigError, match="does not authenticate"):
        ks.unwrap(OTHER, 3, blob)  # moved to another device's row
    with pytest.raises(ConfigError, match="does not authenticate"):
        ks.unwrap(DEV, 4, blob)  # moved to another epoch
    assert ks.unwrap(DEV, 3, blob) == SECRET


def test_blob_moved_to_another_device_in_the_store_fails() -> None:
    ks = SoftwareKeystore(KEK)
    store = SQLiteStore(":memory:")
    store.migrate()
    registry = Registry(store, ks)
    a, b = registry.add_device("a"), registry.add_device("b")
    blob_a = store.get_secret(a.device_id, a.epoch)
    assert blob_a is not None
    # an attacker with write access to the database swaps a's blob onto b's row
    store._writer.execute("UPDATE device_secrets SET wrapped = ? WHERE device_id = ?",
                          (blob_a, bytes(b.device_id)))
    with pytest.raises(ConfigError, match="does not authenticate"):
        registry.root_secret(b.device_id, b.epoch)
    assert registry.root_secret(a.device_id, a.epoch) == a.secret
    store.close()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        SoftwareKeystore(b"short")
    ks = SoftwareKeystore(KEK)
    with pytest.raises(ConfigError, match="epoch"):
        ks.wrap(DEV, 2**32, SECRET)
    with pytest.raises(ConfigError, match="epoch"):
        ks.wrap(DEV, -1, SECRET)
    with pytest.raises(ConfigError, match="nothing"):
        ks.wrap(DEV, 1, b"")


def test_stolen_database_without_the_kek_yields_no_secret(tmp_path: Path) -> None:
    kek = create_kek_file(tmp_path / "kek")
    store = SQLiteStore(tmp_path / "stolen.db")
    store.migrate()
    registry = Registry(store, SoftwareKeystore(kek))
    creds = [registry.add_device(f"marker-device-{n}") for n in range(5)]
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("stolen.db*"))
    assert b"marker-device-3" in raw  # the search does look at the right bytes
    for cred in creds:
        assert cred.secret not in raw
        assert cred.secret.hex().encode() not in raw
        assert base64.b64encode(cred.secret) not in raw
        assert bytes(cred.device_id) in raw
    # the thief's own guess at a KEK unwraps nothing
    loot = SQLiteStore(tmp_path / "stolen.db")
    thief = Registry(loot, SoftwareKeystore(os.urandom(32)))
    with pytest.raises(ConfigError):
        thief.root_secret(creds[0].device_id, creds[0].epoch)
    loot.close()


# -- KEK files and the environment -----------------------------------------------------------

def test_create_kek_file_is_0600_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        kek = create_kek_file(tmp_path / "kek")
    finally:
        os.umask(old)
    info = (tmp_path / "kek").stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (tmp_path / "kek").read_bytes() == kek and len(kek) == 32
    assert load_kek(tmp_path, env={}) == kek


def test_create_kek_file_never_overwrites(tmp_path: Path) -> None:
    first = create_kek_file(tmp_path / "kek")
    with pytest.raises(ConfigError, match="exists"):
        create_kek_file(tmp_path / "kek")
    assert (tmp_path / "kek").read_bytes() == first


def test_create_kek_file_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "kek").symlink_to(target)
    with pytest.raises(ConfigError, match="exists"):
        create_kek_file(tmp_path / "kek")
    assert not target.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_load_kek_refuses_a_file_others_can_reach(tmp_path: Path, mode: int) -> None:
    create_kek_file(tmp_path / "kek")
    (tmp_path / "kek").chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load_kek(tmp_path, env={})
    assert oct(mode)[2:] in str(info.value)


def test_load_kek_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SENSORSEAL_KEK"):
        load_kek(tmp_path, env={})  # no file, no variable
    fd = os.open(tmp_path / "kek", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 31)
    os.close(fd)
    with pytest.raises(ConfigError, match="exactly 32 bytes"):
        load_kek(tmp_path, env={})
    (tmp_path / "kek").unlink()
    (tmp_path / "kek").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="regular file"):
        load_kek(tmp_path, env={})


def test_load_kek_prefers_the_environment(tmp_path: Path) -> None:
    create_kek_file(tmp_path / "kek")
    env_kek = os.urandom(32)
    env = {KEK_ENV: base64.b64encode(env_kek).decode() + "\n"}
    assert load_kek(tmp_path, env=env) == env_kek
    assert load_kek(tmp_path / "missing", env=env) == env_kek  # no file needed


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"x" * 31).decode(), ""])
def test_load_kek_refuses_a_bad_variable(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=KEK_ENV) as info:
        load_kek(tmp_path, env={KEK_ENV: value})
    assert value.strip() == "" or value not in str(info.value)
