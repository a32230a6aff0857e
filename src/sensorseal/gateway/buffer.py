"""Store-and-forward: the gateway's durable queue (one SQLite file).

Why these choices:

- `synchronous = FULL` in WAL mode: a commit is on disk when `put()` returns, and the gateway
  acks a frame only after that, so a kill -9 or a power cut never loses an acked frame.
- Frames keep their arrival order (`AUTOINCREMENT` ids are never reused) and leave the buffer
  only when the cloud answered the batch that carried them: delivery is in order and at least
  once; the cloud's unique key (device, epoch, seq) makes it exactly once in storage.
- Bounded: at most `max_frames`. The overflow policy is *refuse new*: a frame that does not fit is
  not acked (the device keeps it and resends later) and counted as "buffer_full". Dropping the
  oldest instead would silently lose frames we had already acked.
- The link replay tops are written in the same transaction as the frames, so after a restart a
  recorded frame is still refused at the first hop.
- The gateway's own sequence counter (its E1 acks and its upstream envelopes) reserves blocks
  here, like the device SDK's counter: after a crash the rest of a block is skipped, never reused.
- Drop counts are written here too ("drops") and forwarded with the next batch for the cloud's
  audit log, so the record of what was refused survives outages like the frames do.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sensorseal.core.errors import ConfigError
from sensorseal.core.replay import MAX_SEQ

__all__ = ["Buffer"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item BLOB NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS link_tops (
    network BLOB NOT NULL, sender BLOB NOT NULL, top INTEGER NOT NULL,
    PRIMARY KEY (network, sender)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drops (
    id INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT NOT NULL, count INTEGER NOT NULL,
    at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
_SEQ_KEY = "seq_reserved"


class Buffer:
    """The durable, bounded, ordered queue of upstream items. Thread-safe (one lock)."""

    def __init__(self, path: str | Path, *, max_frames: int = 100_000,
                 seq_block: int = 1000) -> None:
        if max_frames < 1 or seq_block < 1:
            raise ConfigError("max_frames and seq_block must be positive")
        self.max_frames = max_frames
        self._block = seq_block
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(path), isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open gateway buffer {path}: {exc}") from None
        (self._count,) = self._conn.execute("SELECT count(*) FROM frames").fetchone()
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (_SEQ_KEY,)).fetchone()
        # Resume at the reserved mark: numbers handed out before a crash lie below it.
        self._next = self._reserved = 1 if row is None else int(row[0])

    def __repr__(self) -> str:
        return f"Buffer(frames={self._count}, max={self.max_frames})"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        return int(self._count)

    def put(self, items: Sequence[bytes], tops: Sequence[tuple[bytes, bytes, int]],
            at_ms: int) -> int:
        """Append as many items as fit (in order) and their link tops, durably, in one
        transaction. Returns how many were stored: items[:n]; the rest must not be acked."""
        with self._tx() as conn:
            room = max(0, self.max_frames - int(self._count))
            n = min(room, len(items))
            conn.executemany("INSERT INTO frames (item, at_ms) VALUES (?, ?)",
                             [(i, at_ms) for i in items[:n]])
            conn.executemany("INSERT INTO link_tops (network, sender, top) VALUES (?, ?, ?)"
                             " ON CONFLICT (network, sender) DO UPDATE"
                             " SET top = max(top, excluded.top)", tops[:n])
        self._count += n
        return n

    def oldest(self, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._conn.execute("SELECT id, item FROM frames ORDER BY id LIMIT ?",
                                      (limit,)).fetchall()
        return [(int(i), bytes(b)) for i, b in rows]

    def delete_through(self, last_id: int, drops_through: int = 0) -> None:
        """Forget the frames (and drop reports) up to these ids: the cloud has them."""
        with self._tx() as conn:
            n = conn.execute("DELETE FROM frames WHERE id <= ?", (last_id,)).rowcount
            conn.execute("DELETE FROM drops WHERE id <= ?", (drops_through,))
        self._count -= n

    def link_tops(self) -> list[tuple[bytes, bytes, int]]:
        with self._lock:
            rows = self._conn.execute("SELECT network, sender, top FROM link_tops").fetchall()
        return [(bytes(n), bytes(s), int(t)) for n, s, t in rows]

    def add_drops(self, drops: Sequence[tuple[str, int, int]]) -> None:
        if drops:
            with self._tx() as conn:
                conn.executemany("INSERT INTO drops (label, count, at_ms) VALUES (?, ?, ?)",
                                 drops)

    def pending_drops(self, limit: int = 64) -> list[tuple[int, str, int, int]]:
        with self._lock:
            rows = self._conn.execute("SELECT id, label, count, at_ms FROM drops ORDER BY id"
                                      " LIMIT ?", (limit,)).fetchall()
        return [(int(i), str(lb), int(c), int(a)) for i, lb, c, a in rows]

    def drop_totals(self) -> dict[str, int]:
        """Every drop recorded and not yet delivered, by label (for operators and tests)."""
        with self._lock:
            rows = self._conn.execute("SELECT label, sum(count) FROM drops GROUP BY label")
            return {str(lb): int(c) for lb, c in rows.fetchall()}

    def next_seq(self) -> int:
        """The gateway's next sequence number, durably reserved before it is handed out."""
        with self._lock:
            if self._next >= self._reserved:
                mark = self._next + self._block
                if mark > MAX_SEQ:
                    raise ConfigError("gateway sequence numbers exhausted: re-provision it")
                self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT"
                                   " (key) DO UPDATE SET value = excluded.value",
                                   (_SEQ_KEY, mark))
                self._reserved = mark
            seq = self._next
            self._next += 1
            return seq

    def close(self) -> None:
        with self._lock:
            self._conn.close()
