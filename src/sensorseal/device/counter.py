"""A persistent sequence counter that never hands out the same number twice.

The uplink AEAD nonce is derived from the sequence number (base IV XOR Partial IV, RFC 9052
section 3.1), so a number used twice under one key is a nonce reuse: with AES-GCM that leaks the
XOR of two plaintexts and lets an attacker forge tags. The counter must therefore survive crashes,
power loss and reboots without ever going back.

Technique (RFC 8613 appendix B.1.1, as OSCORE implementations do): the file does not store the
last number used but a high-water mark *ahead* of use, ``next_unreserved``. Numbers are reserved
in blocks: before handing out a number at or above the mark, the counter durably writes
``mark + block_size`` and only then hands the number out. After a crash the counter resumes at
the stored mark, skipping whatever was left of the last block (at most ``block_size - 1``
numbers lost per crash; at 1,000 per block, 2**40 numbers last a billion crashes). A graceful
``close()`` writes back the exact next number, so clean restarts lose nothing.

One file per (device, epoch, direction). Numbers start at 1 and stop at 2**40 - 1, the largest
Partial IV the envelope carries; past that the device must move to a new key epoch.

A missing file is never read as "start at 1" unless the caller says this is a first start
(``create=True``); a damaged file is refused (see `_statefile`). An exclusive ``flock`` on
``<file>.lock`` keeps a second process, or a second object in this one, from running the same
counter concurrently. POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from types import TracebackType

from sensorseal.core.errors import ConfigError
from sensorseal.core.replay import MAX_SEQ
from sensorseal.device._statefile import read_state, write_state

__all__ = ["DEFAULT_BLOCK", "FIRST_SEQ", "SequenceCounter"]

DEFAULT_BLOCK = 1000
FIRST_SEQ = 1
_KIND = "seq-next-unreserved"
_LIMIT = MAX_SEQ + 1  # the largest value the file may hold: everything below is usable


class SequenceCounter:
    """Thread-safe, crash-safe source of sequence numbers for one (device, epoch, direction).

    Use as a context manager, or call `close()`: closing returns the unused rest of the current
    block and releases the lock. Not closing (a crash) is safe, it only costs numbers.
    """

    __slots__ = ("_block", "_lock", "_lock_fd", "_next", "_reserved", "path")

    def __init__(self, path: Path | str, *, block_size: int = DEFAULT_BLOCK,
                 create: bool = False) -> None:
        if not 1 <= block_size <= 2**24:
            raise ConfigError("block_size must be between 1 and 2**24")
        self.path = Path(path)
        self._block = block_size
        self._lock = threading.Lock()
        self._lock_fd = self._acquire_file_lock()
        try:
            stored = read_state(self.path, _KIND)
            if stored is None:
                if not create:
                    raise ConfigError(
                        f"sequence counter file {self.path} is missing; if this is the first "
                        "start of this key epoch pass create=True, otherwise provision a new key "
                        "epoch (starting over at 1 would reuse nonces)")
                stored = FIRST_SEQ
                write_state(self.path, _KIND, stored)
            if not FIRST_SEQ <= stored <= _LIMIT:
                raise ConfigError(f"sequence counter file {self.path} holds an impossible value")
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = -1  # so that __del__ does not close a reused descriptor number
            raise
        self._next = stored  # next number to hand out
        self._reserved = stored  # numbers < _reserved are durably reserved (file holds this)

    def _acquire_file_lock(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"sequence counter {self.path} is in use by another process "
                              "or object; two users of one counter would reuse nonces") from None
        return fd

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    @property
    def remaining(self) -> int:
        """How many numbers are left before the key epoch must change (for alerting)."""
        with self._lock:
            return _LIMIT - self._next

    def peek(self) -> int:
        """The number `next()` would return (for diagnostics; it is not reserved by this)."""
        with self._lock:
            return self._next

    def next(self) -> int:
        """Hand out the next number; it is durably reserved before this returns."""
        with self._lock:
            if self._lock_fd < 0:
                raise ConfigError("sequence counter is closed")
            if self._next >= _LIMIT:
                raise ConfigError(
                    f"sequence numbers exhausted (max {MAX_SEQ}): rotate this device's key epoch")
            if self._next >= self._reserved:
                mark = min(self._next + self._block, _LIMIT)
                # If this raises (disk full, I/O error) nothing is handed out and nothing changes.
                write_state(self.path, _KIND, mark)
                self._reserved = mark
            seq = self._next
            self._next += 1
            return seq

    def close(self) -> None:
        """Give back the unused rest of the block (durably), then release the lock. Idempotent."""
        with self._lock:
            if self._lock_fd < 0:
                return
            try:
                if self._next < self._reserved:
                    # Safe: every number handed out is < _next. If this write fails the file still
                    # holds the larger mark, which is also safe.
                    write_state(self.path, _KIND, self._next)
                    self._reserved = self._next
            finally:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __del__(self) -> None:
        # Dropped without close(): behave like a crash (keep the file's mark, free the lock).
        fd = getattr(self, "_lock_fd", -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> SequenceCounter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SequenceCounter({str(self.path)!r}, next={self._next}, reserved<{self._reserved})"
