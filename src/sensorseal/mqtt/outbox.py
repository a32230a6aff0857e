"""A bounded, persistent outbox: sealed envelopes a device still owes the broker.

A device seals a message once (the sequence number is spent at that moment) and must then get
those exact bytes to the broker, across disconnects and restarts. The outbox is a small SQLite
file: `append` writes an envelope and its topic, the sender reads them oldest-first, and an entry
is removed only when the broker acknowledged it (PUBACK). Re-sending the same bytes is harmless:
the server keeps (device, epoch, seq) unique, so a duplicate is recognised as a replay.

The outbox is bounded and its overflow policy is explicit (aiomqtt's silent drop from a full
queue is the counter-example): `REFUSE` (the default) turns new messages away and counts them,
`DROP_OLDEST` evicts the oldest entry and counts that. Both counters are persisted, so a loss is
never silent, even across restarts.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sensorseal.core.errors import ConfigError

__all__ = ["Outbox", "OutboxEntry", "OutboxFull", "Overflow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos     INTEGER NOT NULL CHECK (qos IN (0, 1))
);
CREATE TABLE IF NOT EXISTS outbox_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


class Overflow(StrEnum):
    """What a full outbox does with one more message."""

    REFUSE = "refuse"  # keep what is queued, refuse the new message (counted in `refused`)
    DROP_OLDEST = "drop_oldest"  # evict the oldest queued message (counted in `dropped`)


class OutboxFull(Exception):
    """The outbox is full and its policy is REFUSE. The message was not queued."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int  # increasing: the delivery order
    topic: str
    payload: bytes
    qos: int


class Outbox:
    """A bounded FIFO of (topic, sealed envelope) persisted in one SQLite file. Thread-safe.

    `durable=True` syncs every append to disk (survives power loss); the default survives a
    crash or restart of the process (SQLite WAL with synchronous=NORMAL).
    """

    def __init__(self, path: str | Path, *, capacity: int = 10_000,
                 overflow: Overflow = Overflow.REFUSE, durable: bool = False) -> None:
        if capacity < 1:
            raise ConfigError("outbox capacity must be at least 1")
        self.capacity = capacity
        self.overflow = Overflow(overflow)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._count = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    # counters ----------------------------------------------------------------------------------
    def _bump(self, name: str) -> None:
        self._db.execute("INSERT INTO outbox_counters (name, value) VALUES (?, 1) "
                         "ON CONFLICT (name) DO UPDATE SET value = value + 1", (name,))

    def bump(self, name: str) -> None:
        """Count an event that cost a message elsewhere (e.g. `broker_refused`), persistently."""
        with self._lock:
            self._bump(name)

    def counter(self, name: str) -> int:
        """`refused`, `dropped` (overflow policy) or a bumped name: how many, ever."""
        with self._lock:
            row = self._db.execute("SELECT value FROM outbox_counters WHERE name = ?",
                                   (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def refused(self) -> int:
        return self.counter("refused")

    @property
    def dropped(self) -> int:
        return self.counter("dropped")

    # queue ---------------------------------------------------------------------------------------
    def append(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Queue one envelope; returns its id. Raises OutboxFull (and counts it) under REFUSE."""
        if qos not in (0, 1):
            raise ConfigError("the outbox carries QoS 0 or 1")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._count >= self.capacity:
                    if self.overflow is Overflow.REFUSE:
                        self._bump("refused")
                        self._db.execute("COMMIT")
                        raise OutboxFull(f"outbox full ({self.capacity} messages)")
                    cur = self._db.execute(
                        "DELETE FROM outbox WHERE id IN "
                        "(SELECT id FROM outbox ORDER BY id LIMIT ?)",
                        (self._count - self.capacity + 1,))
                    for _ in range(cur.rowcount):
                        self._bump("dropped")
                    self._count -= cur.rowcount
                cur = self._db.execute("INSERT INTO outbox (topic, payload, qos) VALUES (?, ?, ?)",
                                       (topic, bytes(payload), qos))
                self._db.execute("COMMIT")
            except OutboxFull:
                raise
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += 1
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def pending(self, *, after_id: int = 0, limit: int = 1000) -> list[OutboxEntry]:
        """Queued entries with id > after_id, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [OutboxEntry(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def remove(self, ids: list[int] | tuple[int, ...]) -> int:
        """Remove delivered entries (after PUBACK). Unknown ids are ignored; returns how many."""
        if not ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany("DELETE FROM outbox WHERE id = ?",
                                           [(i,) for i in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            removed = max(cur.rowcount, 0)
            self._count -= removed
            return removed

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"Outbox(capacity={self.capacity}, overflow={self.overflow.value})"
