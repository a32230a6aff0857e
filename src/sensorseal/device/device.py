"""The device side of sensorseal: seal uplink messages, open downlink ones.

A `Device` holds one credential (device id, key epoch, root secret) and a state directory. Per key
epoch it keeps, in ``<state_dir>/<device id>-<epoch>/``:

- ``up.seq``: the uplink `SequenceCounter` (nonces come from it; it never goes back);
- ``down.top``: the highest downlink sequence number accepted, so that a command replayed after a
  reboot is refused.

The epoch directory is created atomically (built under a temporary name, then renamed), so after
a crash it either does not exist (a first start) or holds both files. A directory without its
files is refused rather than restarted at 1; so is a damaged file. Deleting the whole state
directory while keeping the credential *would* restart the counter: the state directory must live
on storage that survives what the credential survives.

E5 renewal (`accept_renewal`): an HPKE offer that arrived inside an authenticated downlink
moves the uplink to epoch N+1 at once (its first message is the proof of possession), while the
epoch-N credential stays loaded for the downlink until a downlink under N+1 arrives: the cloud
keeps sealing under N, and may re-deliver or supersede the offer, until it has seen N+1.

Adapters (HTTP, MQTT) move the bytes; this module decides nothing about transport.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import DEFAULT_MAX_SIZE, Opened, seal, unseal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import AEAD_ALGS, Alg, derive
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.core.renewal import DeviceKemKey, accept_offer
from sensorseal.core.replay import ReplayWindow
from sensorseal.device._statefile import fsync_dir, read_state, write_state
from sensorseal.device.counter import DEFAULT_BLOCK, SequenceCounter

__all__ = ["DEFAULT_ROUTE", "Device", "wall_clock_ms"]

DEFAULT_ROUTE = "/v1/messages"
_UP_FILE = "up.seq"
_DOWN_FILE = "down.top"
_DOWN_KIND = "downlink-top"


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (the default device clock)."""
    return time.time_ns() // 1_000_000


def _resumed_window(top: int, size: int) -> ReplayWindow:
    """A downlink window after a reboot that refuses every number up to `top`.

    `ReplayWindow.resume` marks only `top` itself as seen, leaving the rest of the window to the
    server store's unique key. A device has no such store, so here the whole window is struck:
    a few late, reordered commands may be refused after a reboot; no replayed one is accepted.
    """
    window = ReplayWindow(size)
    for seq in range(max(0, top - size + 1), top + 1):
        window.strike(seq)
    return window


class Device:
    """One provisioned device: seals uplink messages and opens downlink ones. Thread-safe."""

    def __init__(self, credential: DeviceCredential, state_dir: Path | str, *,
                 clock_ms: Callable[[], int] | None = wall_clock_ms,
                 level: Level = Level.SEALED, alg: Alg = Alg.A256GCM,
                 downlink_policy: Policy = PRESETS["lax"],
                 block_size: int = DEFAULT_BLOCK,
                 previous: DeviceCredential | None = None) -> None:
        """`clock_ms=None` sends no timestamp (and checks none on the downlink).

        `alg` is the AEAD used at level `sealed`; level `signed` always uses HMAC 256/256.
        `previous`: after a renewal not yet confirmed by a downlink under the new epoch, the
        old credential (its downlink is still accepted; see `accept_renewal`).
        """
        if level is Level.SEALED and alg not in AEAD_ALGS:
            raise ConfigError(f"level sealed needs an AEAD algorithm, not {alg!r}")
        if clock_ms is None and downlink_policy.max_skew_s is not None:
            raise ConfigError("a downlink policy that checks time needs a device clock")
        if previous is not None and (previous.device_id != credential.device_id
                                     or previous.epoch != credential.epoch - 1):
            raise ConfigError("the previous credential must be this device's epoch before")
        self.credential = credential
        self.previous = previous
        self.level = level
        self.alg = alg
        self._clock_ms = clock_ms
        self._state_dir = Path(state_dir)
        self._block_size = block_size
        self._downlink_policy = downlink_policy
        self._up_lock = threading.Lock()
        self._uplink = derive(credential.secret, credential.device_id, credential.epoch,
                              Direction.UP)
        self.state_path = self._epoch_dir(self._state_dir, credential)
        self._counter = SequenceCounter(self.state_path / _UP_FILE, block_size=block_size)
        self._down_lock = threading.Lock()
        # Downlink contexts by epoch, with the directory holding each one's window top.
        self._down: dict[int, tuple[SecurityContext, Path]] = {}
        try:
            self._down[credential.epoch] = self._load_downlink(credential, self.state_path)
            if previous is not None:
                self._down[previous.epoch] = self._load_downlink(
                    previous, self._epoch_dir(self._state_dir, previous))
        except BaseException:
            self._counter.close()
            raise
        self._downlink = self._down[credential.epoch][0]

    def _load_downlink(self, cred: DeviceCredential, path: Path) -> tuple[SecurityContext, Path]:
        top = read_state(path / _DOWN_FILE, _DOWN_KIND)
        if top is None:
            raise ConfigError(f"downlink state {path / _DOWN_FILE} is missing; "
                              "refusing to forget which commands were already executed")
        if top < -1:
            raise ConfigError(f"downlink state {path / _DOWN_FILE} is impossible")
        policy = self._downlink_policy
        ctx = SecurityContext(derive(cred.secret, cred.device_id, cred.epoch, Direction.DOWN),
                              policy, _resumed_window(top, policy.replay_window))
        return ctx, path

    @classmethod
    def from_credential_string(cls, text: str, state_dir: Path | str, **kwargs: Any) -> Device:
        """Build a device from its one-line ``ss1....`` credential (see DeviceCredential)."""
        return cls(DeviceCredential.parse(text), state_dir, **kwargs)

    @staticmethod
    def _epoch_dir(state_dir: Path, cred: DeviceCredential) -> Path:
        """The per-epoch state directory; created with its initial files in one atomic rename."""
        final = state_dir / f"{cred.device_id}-{cred.epoch}"
        if final.is_dir():
            return final
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".{final.name}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir(mode=0o700)
        try:
            SequenceCounter(tmp / _UP_FILE, create=True).close()
            os.unlink(tmp / (_UP_FILE + ".lock"))
            write_state(tmp / _DOWN_FILE, _DOWN_KIND, -1)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not "someone else created it first"
                    raise
            else:
                fsync_dir(state_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    @property
    def device_id(self) -> DeviceId:
        return self.credential.device_id

    @property
    def epoch(self) -> int:
        return self.credential.epoch

    @property
    def counter(self) -> SequenceCounter:
        return self._counter

    def seal(self, payload: bytes, *, route: str = DEFAULT_ROUTE,
             level: Level | None = None) -> bytes:
        """Protect `payload` for `route` with the next uplink sequence number, at the device's
        level or at `level` (the same keys and counter serve both levels).

        Every call consumes a number, even if the bytes are never sent. To retry a send, resend
        the same bytes; never seal the same payload again expecting the same result.
        """
        with self._up_lock:  # a renewal swaps keys and counter together
            seq = self._counter.next()
            keys = self._uplink
        ts = self._clock_ms() if self._clock_ms is not None else None
        if (level or self.level) is Level.SEALED:
            return seal(payload, keys=keys, seq=seq, route=route, timestamp_ms=ts,
                        level=Level.SEALED, alg=self.alg)
        return seal(payload, keys=keys, seq=seq, route=route, timestamp_ms=ts,
                    level=Level.SIGNED)

    def seal_json(self, obj: object, *, route: str = DEFAULT_ROUTE) -> bytes:
        """Seal `obj` as compact UTF-8 JSON (no spaces, non-ASCII kept as UTF-8)."""
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return self.seal(text.encode("utf-8"), route=route)

    def _context_for(self, device_id: DeviceId, epoch: int) -> SecurityContext:
        if device_id != self.device_id:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, "downlink for another device")
        found = self._down.get(epoch)
        if found is None:
            raise Rejected(RejectReason.UNKNOWN_EPOCH, f"downlink for epoch {epoch}")
        return found[0]

    def open_downlink(self, data: bytes, route: str, *,
                      max_size: int = DEFAULT_MAX_SIZE) -> Opened:
        """Open a downlink message or raise Rejected (replay, forgery, wrong device/epoch, ...).

        The new window top is written to disk before the number is struck and the message
        returned, so a command is never executed twice, even across a reboot.
        """
        with self._down_lock:
            now = self._clock_ms() if self._clock_ms is not None else 0
            opened = unseal(data, route=route, contexts=self._context_for, now_ms=now,
                            max_size=max_size, strike=False)
            ctx, path = self._down[opened.epoch]
            window = ctx.window
            if opened.seq > window.top:
                write_state(path / _DOWN_FILE, _DOWN_KIND, opened.seq)
            window.strike(opened.seq)
            if opened.epoch == self.epoch and self.previous is not None:
                # The cloud seals under the new epoch: the renewal is confirmed; the old
                # secret is no longer needed.
                self._down.pop(self.previous.epoch, None)
                self.previous = None
            return opened

    def accept_renewal(self, offer: bytes, kem_key: DeviceKemKey) -> DeviceCredential:
        """Take an E5 renewal offer and move the uplink to its epoch; return the new credential,
        which the caller must persist (with `previous`, until confirmed) before sending.

        `offer` must be the payload of a downlink this device opened (`open_downlink`): HPKE
        base mode does not authenticate the cloud, the downlink envelope does. The same offer
        delivered again is a no-op; a newer offer for the same epoch (superseding) replaces the
        pending secret. Raises Rejected (MALFORMED, UNKNOWN_EPOCH, DECRYPT_FAILED).
        """
        base = self.previous if self.previous is not None else self.credential
        new_epoch, secret = accept_offer(offer, kem_key, self.device_id, base.epoch)
        with self._down_lock:
            if self.previous is not None and secrets.compare_digest(secret,
                                                                    self.credential.secret):
                return self.credential  # re-delivered: already switched
            new = DeviceCredential(self.device_id, new_epoch, secret)
            path = self._epoch_dir(self._state_dir, new)
            down = self._load_downlink(new, path)
            counter = (self._counter if path == self.state_path else
                       SequenceCounter(path / _UP_FILE, block_size=self._block_size))
            with self._up_lock:
                old_counter, self._counter = self._counter, counter
                self._uplink = derive(secret, self.device_id, new_epoch, Direction.UP)
            if old_counter is not counter:
                old_counter.close()
            self._down[new_epoch] = down
            self._downlink = down[0]
            self.previous = base
            self.credential = new
            self.state_path = path
            return new

    def close(self) -> None:
        """Release the counter (returning its unused reservation). Idempotent."""
        self._counter.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Device({self.device_id}, epoch={self.epoch}, level={self.level.value}, "
                f"state={str(self.state_path)!r})")
