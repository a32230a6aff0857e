"""A software keystore: AES-256-GCM under a 32-byte KEK held in memory.

Blob layout (version 1)::

    0x01 || kek_id (4 bytes) || nonce (12 random bytes) || AES-256-GCM(secret) with its 16-byte tag

AAD = b"sensorseal-kek/1" || device id (12 bytes) || epoch (4 bytes, big-endian), so a blob only
unwraps on the row it was written for. Random 96-bit nonces are safe here: a KEK wraps one secret
per device epoch, far below the 2**32 messages at which random GCM nonces become a concern
(NIST SP 800-38D, section 8.3).

The KEK comes from the environment (`SENSORSEAL_KEK`, base64 of 32 bytes; for containers and
secret managers) or from `<data dir>/kek`, a file that must not be readable by group or others.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DEVICE_ID_LEN, DeviceId

__all__ = [
    "BLOB_VERSION",
    "KEK_ENV",
    "KEK_FILE",
    "KEK_LEN",
    "SoftwareKeystore",
    "create_kek_file",
    "load_kek",
]

KEK_LEN = 32
KEK_ENV = "SENSORSEAL_KEK"
KEK_FILE = "kek"
BLOB_VERSION = 0x01
_AAD_LABEL = b"sensorseal-kek/1"
_ID_LABEL = b"sensorseal-kek-id/1"
_KEK_ID_LEN = 4
_NONCE_LEN = 12
_TAG_LEN = 16
_HEADER_LEN = 1 + _KEK_ID_LEN + _NONCE_LEN


def _aad(device_id: DeviceId, epoch: int) -> bytes:
    if len(device_id) != DEVICE_ID_LEN:
        raise ConfigError(f"a device id is {DEVICE_ID_LEN} bytes")
    if not 0 <= epoch < 2**32:
        raise ConfigError("epoch out of range")
    return _AAD_LABEL + bytes(device_id) + epoch.to_bytes(4, "big")


class SoftwareKeystore:
    """`Keystore` with the KEK in process memory."""

    __slots__ = ("_aead", "_kek_id")

    def __init__(self, kek: bytes) -> None:
        if not isinstance(kek, bytes) or len(kek) != KEK_LEN:
            raise ConfigError(f"a KEK is {KEK_LEN} bytes")
        self._aead = AESGCM(kek)
        # A hash under its own label: says which KEK, reveals nothing usable about it.
        self._kek_id = hashlib.sha256(_ID_LABEL + kek).digest()[:_KEK_ID_LEN]

    def __repr__(self) -> str:
        return f"SoftwareKeystore(kek_id={self.kek_id!r})"

    @property
    def kek_id(self) -> str:
        return self._kek_id.hex()

    def wrap(self, device_id: DeviceId, epoch: int, secret: bytes) -> bytes:
        if not secret:
            raise ConfigError("nothing to wrap")
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aead.encrypt(nonce, bytes(secret), _aad(device_id, epoch))
        return bytes([BLOB_VERSION]) + self._kek_id + nonce + sealed

    def unwrap(self, device_id: DeviceId, epoch: int, blob: bytes) -> bytes:
        aad = _aad(device_id, epoch)
        if len(blob) < _HEADER_LEN + _TAG_LEN or blob[0] != BLOB_VERSION:
            raise ConfigError(f"wrapped secret of device {device_id} epoch {epoch} is not a "
                              f"version-{BLOB_VERSION} blob")
        blob_kek = blob[1:1 + _KEK_ID_LEN]
        if blob_kek != self._kek_id:
            raise ConfigError(f"secret of device {device_id} epoch {epoch} was wrapped under KEK "
                              f"{blob_kek.hex()}, not this KEK ({self.kek_id})")
        nonce = blob[1 + _KEK_ID_LEN:_HEADER_LEN]
        try:
            return self._aead.decrypt(nonce, blob[_HEADER_LEN:], aad)
        except InvalidTag:
            raise ConfigError(f"wrapped secret of device {device_id} epoch {epoch} does not "
                              "authenticate (tampered, or copied from another row)") from None


def create_kek_file(path: str | Path) -> bytes:
    """Write a new random KEK to `path` (created with 0600, never over an existing file)."""
    kek = os.urandom(KEK_LEN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    except FileExistsError:
        raise ConfigError(f"KEK file {path} exists; refusing to overwrite it") from None
    try:
        # The umask may have cleared bits but never adds any; chmod makes 0600 exact.
        os.fchmod(fd, 0o600)
        view = memoryview(kek)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return kek


def load_kek(data_dir: str | Path, env: Mapping[str, str] = os.environ) -> bytes:
    """The KEK from `SENSORSEAL_KEK` (base64 of 32 bytes) if set, else from `<data_dir>/kek`."""
    text = env.get(KEK_ENV)
    if text is not None:
        try:
            kek = base64.b64decode(text.strip().encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise ConfigError(f"{KEK_ENV} is not base64") from None
        if len(kek) != KEK_LEN:
            raise ConfigError(f"{KEK_ENV} must be the base64 of {KEK_LEN} bytes")
        return kek
    path = Path(data_dir) / KEK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(f"no KEK: set {KEK_ENV} or create {path} (`sensorseal init`)") from None
    except OSError as exc:
        raise ConfigError(f"cannot open KEK file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"KEK file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"KEK file {path} is accessible by group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`")
        kek = os.read(fd, KEK_LEN + 1)
    finally:
        os.close(fd)
    if len(kek) != KEK_LEN:
        raise ConfigError(f"KEK file {path} must hold exactly {KEK_LEN} bytes")
    return kek
