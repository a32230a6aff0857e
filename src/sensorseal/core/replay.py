"""Sliding-window replay protection (after RFC 8613 section 7.4 and aiocoap's window).

One window per (device, epoch, direction). The window remembers the highest sequence number
accepted (`top`) and a bitmap of which of the `size` numbers below it were seen. Checking and
striking are separate steps so that a number is struck out only after the message it came with
verified and was durably stored: a message that fails later leaves no trace here.

After a restart the window is rebuilt from the store (`ReplayWindow.resume(top)`): the stored top
counts as seen, and for the numbers inside the window the store's unique key (device, epoch, seq)
decides, as it does between several workers.

What happens left of the window depends on who holds it. A device has no other memory, so there
the window is the truth and refuses everything to its left (`store_decides_left=False`). A server
worker is one of several that share a store: another worker may have moved this worker's view
far ahead while a genuine, never-stored message was still in flight, so refusing it would lose
data. There (`store_decides_left=True`) numbers left of the window pass the window and the store's
unique key decides them; the window remains a fast filter for the numbers it knows were seen.
"""

from __future__ import annotations

from sensorseal.core.errors import ConfigError, Rejected, RejectReason

__all__ = ["DEFAULT_WINDOW", "MAX_SEQ", "ReplayWindow"]

DEFAULT_WINDOW = 64
MAX_SEQ = 2**40 - 1  # a Partial IV is at most 5 bytes (as in OSCORE)


class ReplayWindow:
    """A sliding bitmap of seen sequence numbers."""

    __slots__ = ("_bits", "_full", "size", "store_decides_left", "top")

    def __init__(self, size: int = DEFAULT_WINDOW, *, store_decides_left: bool = False) -> None:
        if not 1 <= size <= 4096:
            raise ConfigError("replay window size must be between 1 and 4096")
        self.size = size
        self.store_decides_left = store_decides_left
        self.top = -1  # nothing seen yet
        self._bits = 0  # bit i set <=> top - i was seen (bit 0 is top itself)
        self._full = (1 << size) - 1

    @classmethod
    def resume(cls, top: int | None, size: int = DEFAULT_WINDOW, *,
               store_decides_left: bool = False) -> ReplayWindow:
        """A window after a restart, from the highest number the store holds."""
        w = cls(size, store_decides_left=store_decides_left)
        if top is not None:
            w.top = top
            w._bits = 1
        return w

    def check(self, seq: int) -> None:
        """Raise Rejected(REPLAY) if `seq` was seen or is left of the window; change nothing."""
        if seq > self.top:
            return
        offset = self.top - seq
        if offset >= self.size:
            if self.store_decides_left:
                return
            raise Rejected(RejectReason.REPLAY, f"seq {seq} left of window (top {self.top})")
        if self._bits >> offset & 1:
            raise Rejected(RejectReason.REPLAY, f"seq {seq} already seen")

    def seen(self, seq: int) -> bool:
        """True if `check(seq)` would refuse."""
        if seq > self.top:
            return False
        offset = self.top - seq
        if offset >= self.size:
            return not self.store_decides_left
        return bool(self._bits >> offset & 1)

    def strike(self, seq: int) -> None:
        """Record `seq` as seen. Call only after the message verified (and was stored)."""
        if seq > self.top:
            shift = seq - self.top
            self._bits = ((self._bits << shift) | 1) & self._full if shift < self.size else 1
            self.top = seq
        else:
            offset = self.top - seq
            if offset < self.size:
                self._bits |= 1 << offset
