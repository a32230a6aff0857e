"""Small integer state files that survive crashes: atomic replace, fsync, and a checksum.

A device keeps two numbers per key epoch on disk: the uplink counter's high-water mark and the
downlink replay window's top. Losing or silently corrupting either is a security bug (nonce reuse
or replay acceptance), so both are written the same careful way:

1. write ``<name>.tmp`` in the same directory, ``fsync`` it;
2. ``os.replace`` it over ``<name>`` (atomic on POSIX: a reader sees the old or the new file);
3. ``fsync`` the directory, so that the rename itself is durable before the caller relies on it.

The content is one line, ``sensorseal-state/1 <kind> <value> <crc32>``. The CRC is not security
(anyone who can write the file can fix the CRC); it catches torn writes and flipped bits, which a
plain number would not: a bit flip can turn a ``5`` into a ``4`` and a counter would go back.
Anything that does not parse exactly is refused with a ConfigError, never read as "start over".
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

from sensorseal.core.errors import ConfigError

__all__ = ["fsync_dir", "read_state", "write_state"]

_MAGIC = "sensorseal-state/1"
_LINE = re.compile(r"sensorseal-state/1 ([a-z][a-z0-9-]{0,40}) (-?[0-9]{1,20}) ([0-9a-f]{8})\n")
_MAX_FILE = 256  # a valid file is well under 100 bytes


def _crc(kind: str, value: int) -> str:
    return f"{zlib.crc32(f'{_MAGIC} {kind} {value}'.encode()):08x}"


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside `directory` durable (POSIX: fsync on the directory fd)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(path: Path, kind: str, value: int) -> None:
    """Atomically and durably replace `path` with `value`. Returns only once it is on disk."""
    tmp = path.with_name(path.name + ".tmp")
    line = f"{_MAGIC} {kind} {value} {_crc(kind, value)}\n".encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_state(path: Path, kind: str) -> int | None:
    """The value stored in `path`; None if the file does not exist; ConfigError if it is damaged.

    The caller decides what a missing file means: only it knows whether this is a first start.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read state file {path.name}: {exc.strerror}") from exc
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    m = _LINE.fullmatch(text) if len(raw) <= _MAX_FILE else None
    if m is None or m.group(1) != kind or m.group(3) != _crc(kind, int(m.group(2))):
        raise ConfigError(
            f"state file {path} is damaged or not a {kind!r} file; refusing to guess a value "
            "(restarting from scratch could reuse a nonce). Restore it from a backup or "
            "provision a new key epoch for this device."
        )
    return int(m.group(2))
