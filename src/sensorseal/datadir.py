"""The data directory: everything one sensorseal installation keeps on disk.

    <data dir>/            mode 0700
        kek                32 random bytes, mode 0600 (absent when SENSORSEAL_KEK is set)
        sensorseal.db      the SQLite store (+ -wal, -shm); absent when SENSORSEAL_DATABASE_URL
                           names another store (PostgreSQL)

`init()` creates it once and returns the operator API token, which is shown once and stored only
as its SHA-256 (a leaked database does not leak the token). `open()` checks that the KEK found now
is the one the directory was initialized with, so a wrong `SENSORSEAL_KEK` fails at start-up with
a clear message instead of as "decrypt failed" on every device.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from sensorseal.core.errors import ConfigError
from sensorseal.keystore.base import Keystore
from sensorseal.keystore.software import (
    KEK_ENV,
    KEK_FILE,
    SoftwareKeystore,
    create_kek_file,
    load_kek,
)
from sensorseal.store import open_store
from sensorseal.store.base import Store

__all__ = ["DATABASE_URL_ENV", "DATA_DIR_ENV", "DB_FILE", "DEFAULT_DIR", "DataDir"]

DATA_DIR_ENV = "SENSORSEAL_DATA_DIR"
DATABASE_URL_ENV = "SENSORSEAL_DATABASE_URL"
DEFAULT_DIR = "sensorseal-data"
DB_FILE = "sensorseal.db"
TOKEN_LEN = 32
META_TOKEN = "operator_token_sha256"  # noqa: S105 (a meta key name, not a secret)
META_KEK_ID = "kek_id"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class DataDir:
    """One installation's directory. Cheap to construct; touches the disk only when asked."""

    def __init__(self, path: str | Path, *, env: Mapping[str, str] = os.environ) -> None:
        self.path = Path(path)
        self._env = env
        self._token_sha256: str | None = None

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @staticmethod
    def default_path(env: Mapping[str, str] = os.environ) -> Path:
        """`$SENSORSEAL_DATA_DIR`, else `./sensorseal-data`."""
        value = env.get(DATA_DIR_ENV, "").strip()
        return Path(value) if value else Path(DEFAULT_DIR)

    @property
    def db_path(self) -> Path:
        return self.path / DB_FILE

    @property
    def database_url(self) -> str | None:
        """`$SENSORSEAL_DATABASE_URL` (e.g. postgresql://...) when set: the store lives there
        and the directory keeps only the KEK (or nothing, with SENSORSEAL_KEK)."""
        value = self._env.get(DATABASE_URL_ENV, "").strip()
        return value or None

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path.resolve()}"

    def is_initialized(self) -> bool:
        if self.database_url is not None:
            # An external database is initialized once `init` has recorded the KEK id there.
            store = open_store(self.database_url)
            try:
                return store.get_meta(META_KEK_ID) is not None
            finally:
                store.close()
        return self.db_path.is_file()

    def init(self) -> str:
        """Create the directory, KEK, database and operator token; return the token (shown
        once, never stored in clear). Refuses an already initialized directory."""
        if self.is_initialized():
            raise ConfigError(f"{self.path} is already initialized; refusing to overwrite it")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} exists and is not a directory")
        kek_path = self.path / KEK_FILE
        if KEK_ENV not in self._env and kek_path.exists():
            raise ConfigError(f"{kek_path} exists without a database; move it away first "
                              "(it may protect secrets of another installation)")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # With SENSORSEAL_KEK set, the KEK is managed outside (a secret manager): no file.
        kek = load_kek(self.path, self._env) if KEK_ENV in self._env else create_kek_file(kek_path)
        keystore = SoftwareKeystore(kek)
        token = base64.urlsafe_b64encode(os.urandom(TOKEN_LEN)).rstrip(b"=").decode("ascii")
        store = open_store(self.store_url)
        try:
            store.set_meta(META_KEK_ID, keystore.kek_id)
            store.set_meta(META_TOKEN, _token_hash(token))
        finally:
            store.close()
        self._token_sha256 = None
        return token

    def open(self) -> tuple[Store, Keystore]:
        """The migrated store and the keystore. The caller closes the store."""
        if not self.is_initialized():
            raise ConfigError(f"{self.path} is not a sensorseal data directory; "
                              "run `sensorseal init` first")
        # A keyring, not a single KEK: during `sensorseal kek rotate` blobs under the old and
        # the new KEK coexist, and a running server must open both. (Lazy import: lifecycle
        # imports the registry.)
        from sensorseal.lifecycle import open_keyring

        keystore = open_keyring(self.path, self._env)
        store = open_store(self.store_url)
        expected = store.get_meta(META_KEK_ID)
        if expected is not None and expected not in keystore.kek_ids:
            store.close()
            raise ConfigError(f"the KEK found (id {keystore.kek_id}) is not the one {self.path} "
                              f"was initialized with (id {expected}); check {KEK_ENV}")
        return store, keystore

    def check_token(self, token: str) -> bool:
        """True iff `token` is the operator token. Compares hashes in constant time; the
        stored hash is read once and cached."""
        if self._token_sha256 is None:
            store, _ = self.open()
            try:
                self._token_sha256 = store.get_meta(META_TOKEN)
            finally:
                store.close()
        if not self._token_sha256 or not isinstance(token, str) or not token:
            return False
        return hmac.compare_digest(_token_hash(token), self._token_sha256)
