"""The data directory: init once, open many times, the operator token shown once."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from sensorseal.core.errors import ConfigError
from sensorseal.datadir import DataDir
from sensorseal.keystore.software import KEK_ENV
from sensorseal.registry import Registry
from sensorseal.store.sqlite import migrations


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_everything(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "nested" / "data", env={})
    assert not data.is_initialized()
    token = data.init()
    assert data.is_initialized()
    assert mode(data.path) == 0o700
    assert mode(data.path / "kek") == 0o600
    assert (data.path / "kek").stat().st_size == 32
    assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == 32
    store, keystore = data.open()
    try:
        assert store.get_meta("operator_token_sha256") == hashlib.sha256(token.encode()).hexdigest()
        assert store.get_meta("kek_id") == keystore.kek_id
        newest = max(v for v, _, _ in migrations())
        assert store.migrate() == newest  # already migrated
    finally:
        store.close()
    raw = b"".join(p.read_bytes() for p in data.path.glob("sensorseal.db*"))
    assert token.encode() not in raw  # only its hash is kept


def test_init_refuses_an_initialized_dir(tmp_path: Path) -> None:
    data = DataDir(tmp_path, env={})
    data.init()
    kek = (tmp_path / "kek").read_bytes()
    with pytest.raises(ConfigError, match="already initialized"):
        DataDir(tmp_path, env={}).init()
    assert (tmp_path / "kek").read_bytes() == kek


def test_init_refuses_a_stray_kek(tmp_path: Path) -> None:
    (tmp_path / "kek").write_bytes(b"k" * 32)
    with pytest.raises(ConfigError, match="exists without a database"):
        DataDir(tmp_path, env={}).init()
    assert (tmp_path / "kek").read_bytes() == b"k" * 32


def test_init_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        DataDir(tmp_path / "f", env={}).init()


def test_open_before_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `sensorseal init` first"):
        DataDir(tmp_path / "none", env={}).open()
    with pytest.raises(ConfigError, match="run `sensorseal init` first"):
        DataDir(tmp_path / "none", env={}).check_token("x")


def test_open_gives_a_working_registry_across_restarts(tmp_path: Path) -> None:
    data = DataDir(tmp_path, env={})
    data.init()
    store, keystore = data.open()
    cred = Registry(store, keystore).add_device("d")
    store.close()
    store, keystore = DataDir(tmp_path, env={}).open()
    try:
        assert Registry(store, keystore).root_secret(cred.device_id, cred.epoch) == cred.secret
    finally:
        store.close()


def test_check_token(tmp_path: Path) -> None:
    data = DataDir(tmp_path, env={})
    token = data.init()
    assert data.check_token(token)
    assert DataDir(tmp_path, env={}).check_token(token)  # a fresh instance reads the hash
    for wrong in ["", token[:-1], token + "x", token.upper(),
                  hashlib.sha256(token.encode()).hexdigest()]:
        assert not data.check_token(wrong)


def test_a_group_readable_kek_blocks_open(tmp_path: Path) -> None:
    data = DataDir(tmp_path, env={})
    data.init()
    (tmp_path / "kek").chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        data.open()


def test_kek_from_the_environment(tmp_path: Path) -> None:
    kek = os.urandom(32)
    env = {KEK_ENV: base64.b64encode(kek).decode()}
    data = DataDir(tmp_path / "d", env=env)
    token = data.init()
    assert not (tmp_path / "d" / "kek").exists()  # managed outside: no file
    store, keystore = data.open()
    cred = Registry(store, keystore).add_device("d")
    store.close()
    assert data.check_token(token)

    wrong = DataDir(tmp_path / "d", env={KEK_ENV: base64.b64encode(os.urandom(32)).decode()})
    with pytest.raises(ConfigError, match="not the one") as info:
        wrong.open()
    assert cred.secret.hex() not in str(info.value)
    with pytest.raises(ConfigError, match="no KEK"):
        DataDir(tmp_path / "d", env={}).open()


def test_default_path() -> None:
    assert DataDir.default_path({}) == Path("sensorseal-data")
    assert DataDir.default_path({"SENSORSEAL_DATA_DIR": "/srv/ss"}) == Path("/srv/ss")
    assert DataDir.default_path({"SENSORSEAL_DATA_DIR": ""}) == Path("sensorseal-data")


def test_default_path_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("SENSORSEAL_DATA_DIR", str(tmp_path))
    assert DataDir.default_path() == tmp_path
    monkeypatch.delenv("SENSORSEAL_DATA_DIR")
    assert DataDir.default_path() == Path("sensorseal-data")


def test_repr_holds_no_secret(tmp_path: Path) -> None:
    data = DataDir(tmp_path, env={})
    token = data.init()
    assert token not in repr(data) and str(tmp_path) in repr(data)
