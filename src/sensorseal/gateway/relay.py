"""The gateway's decisions, sans-IO: one radio frame in, a verdict out.

Order of checks, cheapest and most anonymous first, so that junk costs as little as possible and
nothing unauthenticated reaches state that others depend on:

1. size against the radio MTU (before any decoding)                        -> "oversize"
2. link frame structure (core.link.parse_frame)                           -> "garbage"
3. a network this gateway serves                                          -> "unknown_network"
   and a key epoch of it that the gateway holds, its grace not over        -> "link_epoch"
4. E1 replay window per (network, sender), shared by the key epochs (a device's link counter
   runs on across a network key rotation) -- a seen number that verifies is re-acked
   (the device lost our ack), never forwarded twice                       -> "link_replay"
5. E1 AEAD under the network's per-sender key                             -> "link_auth"
6. the sender is a device this gateway serves, in that network            -> "unknown_device"
7. per-device rate limit (token bucket), on the *authenticated* sender, so a stranger cannot
   spend a victim's budget by claiming its id                             -> "rate_limited"
8. by the device's mode: E3 pass-through (kid must be the sender), or E2 opened with the
   device's gateway key and its own replay window                         -> "e2_failed"/"e2_replay"

A frame that passes yields a `Forward` holding the upstream item. The caller makes it durable
(gateway/buffer.py) and only then calls `commit()`, which strikes the sequence numbers and
returns the ack to send: a frame we acked is on disk; a frame we did not ack will be resent.
Every drop is counted per label in `counts`; nothing dropped is forwarded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import cbor2

from sensorseal.core.envelope import parse, verify
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.core.layers import Layer, Mode, Vouched, e2_route, envelope_item, vouched_item
from sensorseal.core.link import (
    DEFAULT_MTU,
    NetworkKey,
    NetworkKeyring,
    open_frame,
    parse_frame,
    wrap,
)
from sensorseal.core.replay import DEFAULT_WINDOW, ReplayWindow
from sensorseal.gateway.config import DeviceEntry

__all__ = ["DROP_REASONS", "Forward", "RateLimit", "Reack", "Relay", "ack_payload"]

# Each drop label, and the RejectReason it is audited under.
DROP_REASONS: dict[str, RejectReason] = {
    "oversize": RejectReason.OVERSIZE,
    "garbage": RejectReason.MALFORMED,
    "unsupported": RejectReason.UNSUPPORTED,
    "unknown_network": RejectReason.UNKNOWN_NETWORK,
    "link_epoch": RejectReason.UNKNOWN_EPOCH,
    "link_replay": RejectReason.REPLAY,
    "link_auth": RejectReason.DECRYPT_FAILED,
    "unknown_device": RejectReason.UNKNOWN_DEVICE,
    "rate_limited": RejectReason.RATE_LIMITED,
    "e2_failed": RejectReason.DECRYPT_FAILED,
    "e2_replay": RejectReason.REPLAY,
    "buffer_full": RejectReason.RATE_LIMITED,
}
_E1 = frozenset({Layer.E1})
_E1_E2 = frozenset({Layer.E1, Layer.E2})


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket per device: `per_s` frames a second on average, bursts of `burst`."""

    per_s: float = 50.0
    burst: float = 100.0


class Forward(NamedTuple):
    """A frame that passed every check; its `item` goes upstream once it is durable."""

    network_id: bytes
    sender: bytes
    link_seq: int
    item: bytes
    e2_window: ReplayWindow | None
    e2_seq: int
    link_epoch: int = 0  # the network key epoch of the frame; its ack uses the same


class Reack(NamedTuple):
    """An authentic frame we already buffered: answer with the ack again, forward nothing."""

    network_id: bytes
    sender: bytes
    link_seq: int
    link_epoch: int = 0


def ack_payload(sender: bytes, link_seq: int) -> bytes:
    """What a gateway's ack frame carries (inside E1): [0, sender id, link seq]."""
    return cbor2.dumps([0, bytes(sender), link_seq])


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at_ms: int


@dataclass(slots=True, eq=False)
class Relay:
    """The gateway core (see the module docstring). Not thread-safe: one event loop owns it."""

    gateway_id: bytes
    networks: Mapping[bytes, NetworkKeyring | NetworkKey]  # a bare key: that epoch only
    devices: dict[DeviceId, DeviceEntry]
    mtu: int = DEFAULT_MTU
    rate: RateLimit = field(default_factory=RateLimit)
    window: int = DEFAULT_WINDOW
    counts: Counter[str] = field(default_factory=Counter)
    _links: dict[tuple[bytes, bytes], ReplayWindow] = field(default_factory=dict)
    _e2: dict[tuple[bytes, int], ReplayWindow] = field(default_factory=dict)
    _buckets: dict[bytes, _Bucket] = field(default_factory=dict)
    _rings: dict[bytes, NetworkKeyring] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rings = {nid: k if isinstance(k, NetworkKeyring) else NetworkKeyring.of(k)
                       for nid, k in self.networks.items()}

    def resume(self, tops: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Restore the E1 windows after a restart from the tops the buffer persisted."""
        for network_id, sender, top in tops:
            self._links[(network_id, sender)] = ReplayWindow.resume(top, self.window)

    def _drop(self, label: str) -> None:
        self.counts[label] += 1

    def receive(self, frame: bytes, now_ms: int) -> Forward | Reack | None:
        """Judge one frame. None: dropped (and counted)."""
        try:
            hdr = parse_frame(frame, mtu=self.mtu)
        except Rejected as exc:
            self._drop("oversize" if exc.reason is RejectReason.OVERSIZE else
                       "unsupported" if exc.reason is RejectReason.UNSUPPORTED else "garbage")
            return None
        ring = self._rings.get(hdr.network_id)
        if ring is None:
            self._drop("unknown_network")
            return None
        network = ring.usable(hdr.epoch, now_ms)
        if network is None:
            self._drop("link_epoch")  # never held, or its grace after a rotation is over
            return None
        window = self._links.get((hdr.network_id, hdr.sender))
        seen = window is not None and window.seen(hdr.seq)
        if seen and window is not None and hdr.seq <= window.top - window.size:
            self._drop("link_replay")  # left of the window: we cannot tell; refuse
            return None
        try:
            payload = open_frame(hdr, network)
        except Rejected:
            self._drop("link_auth")
            return None
        if seen:
            self.counts["reacked"] += 1
            return Reack(hdr.network_id, hdr.sender, hdr.seq, hdr.epoch)
        entry = self.devices.get(DeviceId.trusted(hdr.sender))
        if entry is None or entry.network_id != hdr.network_id:
            self._drop("unknown_device")
            return None
        if not self._allow(hdr.sender, now_ms):
            self._drop("rate_limited")
            return None
        fwd = self._by_mode(entry, hdr.network_id, hdr.sender, hdr.seq, payload)
        return None if fwd is None else fwd._replace(link_epoch=hdr.epoch)

    def _allow(self, sender: bytes, now_ms: int) -> bool:
        b = self._buckets.get(sender)
        if b is None:
            b = self._buckets[sender] = _Bucket(self.rate.burst, now_ms)
        b.tokens = min(self.rate.burst, b.tokens + (now_ms - b.at_ms) * self.rate.per_s / 1000)
        b.at_ms = now_ms
        if b.tokens < 1:
            return False
        b.tokens -= 1
        return True

    def _by_mode(self, entry: DeviceEntry, network_id: bytes, sender: bytes, link_seq: int,
                 payload: bytes) -> Forward | None:
        if entry.mode is Mode.E3:
            try:
                inner = parse(payload, max_size=self.mtu)
            except Rejected:
                self._drop("garbage")
                return None
            if inner.device_id != sender:
                self._drop("garbage")  # a member may not relay another device's envelope
                return None
            return Forward(network_id, sender, link_seq, envelope_item(_E1, payload), None, 0)
        try:
            outer = parse(payload, max_size=self.mtu)
            if outer.device_id != sender:
                raise Rejected(RejectReason.MALFORMED, "E2 kid is not the sender")
            keys = entry.e2.get(outer.epoch)
            if keys is None:
                raise Rejected(RejectReason.UNKNOWN_EPOCH, "no gateway key for this epoch")
        except Rejected:
            self._drop("e2_failed")
            return None
        e2w = self._e2.get((sender, outer.epoch))
        if e2w is None:
            e2w = self._e2[(sender, outer.epoch)] = ReplayWindow(self.window)
        if e2w.seen(outer.seq):
            self._drop("e2_replay")
            return None
        try:
            inner_bytes = verify(outer, keys, e2_route(network_id))
        except Rejected:
            self._drop("e2_failed")
            return None
        if entry.mode is Mode.E2:
            v = Vouched(outer.device_id, outer.epoch, outer.seq, outer.timestamp_ms, outer.level,
                        inner_bytes)
            item = vouched_item(_E1_E2, v)
        else:
            item = envelope_item(_E1_E2, inner_bytes)
        return Forward(network_id, sender, link_seq, item, e2w, outer.seq)

    def commit(self, fwd: Forward) -> None:
        """The frame is durable: strike its numbers so that a resend is only re-acked."""
        key = (fwd.network_id, fwd.sender)
        window = self._links.get(key)
        if window is None:
            window = self._links[key] = ReplayWindow(self.window)
        window.strike(fwd.link_seq)
        if fwd.e2_window is not None:
            fwd.e2_window.strike(fwd.e2_seq)

    def ack(self, verdict: Forward | Reack, seq: int) -> bytes:
        """The ack frame for a committed or re-acked frame, wrapped under E1 as the gateway,
        with the key epoch of the frame it answers (the one the device holds)."""
        network = self._rings[verdict.network_id].get(verdict.link_epoch)
        if network is None:  # cannot happen: the verdict came from a key of this ring
            raise KeyError(f"no key epoch {verdict.link_epoch}")
        return wrap(ack_payload(verdict.sender, verdict.link_seq),
                    network=network, sender=self.gateway_id, seq=seq)
