"""The gateway process: radio transport in, durable buffer, sealed batches up.

    UDP datagram ─► Relay.receive (E1, rate, E2/E3) ─► Buffer.put (fsync) ─► ack to the device
                                                            │
                       forwarder task: oldest items ─► seal as the gateway ─► Upstream (TLS)
                                                   ◄── delete once the cloud answered

Datagrams that arrive together are judged and made durable in one transaction (group commit),
then acked. The forwarder runs the blocking HTTP call in a thread; while upstream is down it
retries with capped exponential backoff and the buffer grows up to its bound.

Transports are pluggable: anything that calls `Gateway.on_frame(data, reply)` on the event loop
and awaits `Gateway.run_forever()` works. Shipped: `run_udp` here (loopback UDP standing in for
the radio) and `run_mqtt` in gateway/mqtt_radio.py (a local MQTT broker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from sensorseal.core.envelope import seal
from sensorseal.core.ids import Direction
from sensorseal.core.keys import derive
from sensorseal.core.layers import GATEWAY_BATCH_ROUTE, encode_batch
from sensorseal.gateway.buffer import Buffer
from sensorseal.gateway.config import GatewayConfig
from sensorseal.gateway.relay import Forward, RateLimit, Reack, Relay
from sensorseal.gateway.upstream import Upstream, UpstreamError

__all__ = ["Gateway", "GatewaySettings", "Reply", "run_udp"]

log = logging.getLogger(__name__)

Reply = Callable[[bytes], None]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_DEFAULT_RATE = RateLimit()


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    mtu: int = 255
    rate: RateLimit = _DEFAULT_RATE
    batch_size: int = 256
    backoff_min_s: float = 0.05
    backoff_max_s: float = 1.0
    drops_every_s: float = 1.0
    commit_delay_s: float = 0.002  # group-commit window: latency added to each ack


class Gateway:
    """Wires relay, buffer and upstream together on one asyncio loop."""

    def __init__(self, config: GatewayConfig, buffer: Buffer, upstream: Upstream,
                 settings: GatewaySettings | None = None,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        self.config = config
        self.buffer = buffer
        self.upstream = upstream
        self.settings = settings = settings or GatewaySettings()
        self._clock_ms = clock_ms
        self.relay = Relay(bytes(config.gateway_id), config.networks, config.devices,
                           mtu=settings.mtu, rate=settings.rate)
        self.relay.resume(buffer.link_tops())
        self._keys = derive(config.credential.secret, config.gateway_id,
                            config.credential.epoch, Direction.UP)
        self._pending: list[tuple[bytes, Reply]] = []
        self._wake = asyncio.Event()
        self._reported: Counter[str] = Counter()
        self.delivered = 0
        self.upstream_failures = 0

    # -- inbound -----------------------------------------------------------------------------

    def on_frame(self, data: bytes, reply: Reply) -> None:
        """Called by a transport for each frame; judged with the others of this loop turn."""
        if not self._pending:
            # Group commit: asyncio hands us one datagram per loop turn, so wait a moment for
            # the others of a burst and make them durable with one fsync.
            asyncio.get_running_loop().call_later(self.settings.commit_delay_s, self._flush)
        self._pending.append((data, reply))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        now = self._clock_ms()
        forwards: list[tuple[Forward, Reply]] = []
        for data, reply in pending:
            verdict = self.relay.receive(data, now)
            if isinstance(verdict, Reack):
                reply(self.relay.ack(verdict, self.buffer.next_seq()))
            elif verdict is not None:
                forwards.append((verdict, reply))
        if not forwards:
            return
        try:
            stored = self.buffer.put([f.item for f, _ in forwards],
                                     [(f.network_id, f.sender, f.link_seq) for f, _ in forwards],
                                     now)
        except Exception:
            log.exception("buffer write failed; %d frames not acked", len(forwards))
            self.relay.counts["buffer_error"] += len(forwards)
            return
        for fwd, reply in forwards[:stored]:
            self.relay.commit(fwd)
            reply(self.relay.ack(fwd, self.buffer.next_seq()))
        if stored < len(forwards):
            self.relay.counts["buffer_full"] += len(forwards) - stored
        self._wake.set()

    # -- outbound ----------------------------------------------------------------------------

    def _batch(self) -> tuple[bytes, int, int, int] | None:
        """(sealed envelope, last frame id, last drop id, item count) or None if idle."""
        rows = self.buffer.oldest(self.settings.batch_size)
        drops = self.buffer.pending_drops()
        if not rows and not drops:
            return None
        payload = encode_batch([item for _, item in rows], [d[1:] for d in drops])
        envelope = seal(payload, keys=self._keys, seq=self.buffer.next_seq(),
                        route=GATEWAY_BATCH_ROUTE, timestamp_ms=self._clock_ms())
        return (envelope, rows[-1][0] if rows else 0, drops[-1][0] if drops else 0, len(rows))

    async def forward_forever(self) -> None:
        backoff = self.settings.backoff_min_s
        while True:
            batch = self._batch()
            if batch is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            envelope, last_id, last_drop, n = batch
            try:
                await asyncio.to_thread(self.upstream.send, envelope)
            except UpstreamError as exc:
                self.upstream_failures += 1
                if not exc.retry:
                    log.error("upstream refused the batch (%s); keeping it", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.backoff_max_s)
                continue
            backoff = self.settings.backoff_min_s
            self.buffer.delete_through(last_id, last_drop)
            self.delivered += n

    async def run_forever(self) -> None:
        """Forward and report drops until cancelled: every transport's main task. The last drop
        counts are recorded on the way out, so they reach the cloud on the next start."""
        try:
            await asyncio.gather(self.forward_forever(), self.report_drops_forever())
        finally:
            self.record_drops()

    async def report_drops_forever(self) -> None:
        """Move the relay's drop counters into the buffer (and so to the cloud's audit log)."""
        while True:
            await asyncio.sleep(self.settings.drops_every_s)
            self.record_drops()

    def record_drops(self) -> None:
        now = self._clock_ms()
        delta = [(label, n - self._reported[label], now)
                 for label, n in self.relay.counts.items()
                 if n > self._reported[label] and label != "reacked"]
        if delta:
            self.buffer.add_drops(delta)
            for label, n, _ in delta:
                self._reported[label] += n
            self._wake.set()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self._transport
        if transport is None:
            return

        def reply(frame: bytes) -> None:
            transport.sendto(frame, addr)

        self._gateway.on_frame(data, reply)


async def run_udp(gateway: Gateway, host: str = "127.0.0.1", port: int = 0,
                  ready: Callable[[tuple[str, int]], None] | None = None) -> None:
    """Serve the radio on UDP until cancelled."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(gateway),
                                                       local_addr=(host, port))
    try:
        addr = transport.get_extra_info("sockname")[:2]
        if ready is not None:
            ready(addr)
        await gateway.run_forever()
    finally:
        transport.close()
