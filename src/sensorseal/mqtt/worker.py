"""The MQTT ingest worker: broker -> pipeline -> store, acknowledging only what was committed.

Several workers share the load through an MQTT 5 shared subscription
(`$share/<group>/sensorseal/+/telemetry`, and the same for `state` and `acks`): the broker hands
each message to one of them. The broker is not trusted: everything it delivers goes through the
pipeline, which opens, checks and stores it. What the worker adds is delivery discipline:

- QoS 1 messages are acknowledged (PUBACK, paho `manual_ack=True`) only after the pipeline's
  store transaction committed them or committed their rejection to the audit log. A worker that
  dies before that leaves them unacknowledged, and the broker delivers them again (persistent
  session, `clean_start=False`); the store's unique (device, epoch, seq) turns a second delivery
  into a recorded replay, never a second row.
- Messages are batched (up to `batch_max`, waiting at most `batch_wait_ms` for more): one
  `Pipeline.ingest` call, so one transaction, per batch.
- A topic outside the layout, an envelope whose key id names another device than its topic, and
  a device over its rate limit are rejected here, audited, counted and acknowledged. A message
  that is rejected is acknowledged too: a poison message must not come back forever.
- If the store is unavailable, nothing is acknowledged; the batch is retried with backoff.
- No single message can stop the worker: every failure is turned into a rejection or a retry.

`shared=False` is for brokers without MQTT 5 (the embedded amqtt broker speaks 3.1.1 only and
has no shared subscriptions): the worker then connects with MQTT 3.1.1 (a persistent session,
clean_session=False, and no MQTT 5 properties) and subscribes to the plain
`sensorseal/+/<kind>` filters, so exactly ONE such worker may run per broker.

The client is paho-mqtt, chosen by measurement (benchmarks/mqtt_clients.py: plain subscribers
against one Mosquitto, 100-byte payloads, CPU per message of the subscriber process on the
loaded 2-core machine): paho's own receive path costs 124-237 us a message, aiomqtt (which
wraps paho) 225-297 us, gmqtt 18-41 us; paho with the worker's `_PublishReader`, which parses
PUBLISH packets in bulk on paho's socket, 6 us at QoS 0 and 19 us at QoS 1 (acks included).
paho keeps what it does well: the connection, MQTT 5 session properties, reconnects, TLS and
`ack()` for the PUBACK after commit, a manual ack gmqtt only offers by running one asyncio task
per message. The network loop runs in paho's thread, handing over one list per socket read (not
one queue operation per message); the pipeline runs in a second thread, so the connection
(keep-alive, PUBACKs) is served while a batch commits.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.mqtt import topics
from sensorseal.mqtt.commands import set_nodelay
from sensorseal.server.pipeline import IngestResult, IngestUnavailable, Pipeline
from sensorseal.store.base import AuditEvent, Store

__all__ = ["IngestWorker", "RateLimit", "WorkerStats"]

log = logging.getLogger(__name__)

TRANSPORT = "mqtt"
DEFAULT_KINDS = ("telemetry", "state", "acks")
_READ_CHUNK = 65536
_RECEIVE_MAXIMUM = 2000  # QoS 1 messages the broker may have in flight to us (MQTT 5)
_TOPIC_CACHE = 10_000  # topics -> parsed device id, so that each is checked once


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket per device: `per_s` messages a second on average, bursts up to `burst`."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_s <= 0 or self.burst < 1:
            raise ConfigError("rate limit needs per_s > 0 and burst >= 1")


class _Buckets:
    """Token buckets keyed by device id hex; bounded so that forged ids cannot grow it forever."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float], max_devices: int = 100_000):
        self._limit = limit
        self._clock = clock
        self._max = max_devices
        self._state: dict[str, tuple[float, float]] = {}  # id -> (tokens, updated_s)

    def take(self, device: str) -> bool:
        now = self._clock()
        tokens, updated = self._state.get(device, (self._limit.burst, now))
        tokens = min(self._limit.burst, tokens + (now - updated) * self._limit.per_s)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        if device not in self._state and len(self._state) >= self._max:
            self._state.pop(next(iter(self._state)))
        self._state[device] = (tokens, now)
        return ok


@dataclass(slots=True)
class WorkerStats:
    """Counters for metrics. `acked` counts PUBACKs sent after a commit."""

    received: int = 0
    batches: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    acked: int = 0
    store_retries: int = 0
    connects: int = 0


@dataclass(slots=True)
class _Item:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int = 0  # which connection delivered it: a PUBACK is only valid on that one


def _claimed_kid(data: bytes) -> bytes | None:
    """The key id in an envelope's protected header, or None if it cannot be read cheaply.

    Only used to compare with the topic; the pipeline parses and verifies everything itself.
    (cbor2's C decoder takes about 3 us here; a regex over seal()'s layout was measured no
    faster, so there is no second path to keep in step.)
    """
    if len(data) < 4 or data[0] not in (0xD0, 0xD1):
        return None
    head = data[2]
    if 0x40 <= head < 0x58:
        start, size = 3, head - 0x40
    elif head == 0x58:
        start, size = 4, data[3]
    else:
        return None
    try:
        hdr = cbor2.loads(data[start:start + size])
    except Exception:
        return None
    kid = hdr.get(4) if isinstance(hdr, dict) else None
    return kid if isinstance(kid, bytes) else None


class _PublishReader:
    """paho's socket, with incoming PUBLISH packets taken out and parsed here, in bulk.

    paho reads a packet with three recv() calls, builds MQTT 5 Properties, an MQTTMessage and a
    condition variable for it, and calls back once per message: 120-240 us of CPU per message
    on the loaded 2-core benchmark machine, against 18-41 us for gmqtt's bulk parser
    (benchmarks/mqtt_clients.py). This wrapper reads up to 64 KiB at a time, splits the
    stream into packets, turns every QoS 0/1 PUBLISH into an `_Item` and hands each read's items
    to `sink` in one call; every other packet (CONNACK, SUBACK, PINGRESP, DISCONNECT, a QoS 2 or
    unparsable PUBLISH) is passed to paho unchanged, so paho still runs the connection,
    keep-alive, reconnects and the PUBACKs the worker sends with `ack()` after a commit. With
    `manual_ack=True` paho does nothing for a QoS 0/1 PUBLISH but call on_message, so nothing
    of its state is skipped. paho's loop does not wait in select() while `pending()` is
    non-zero (its hook for TLS sockets), so buffered packets are handed over without delay.
    """

    __slots__ = ("_connection", "_eof", "_in", "_out", "_passive", "_sink", "_sock", "_v5")

    def __init__(self, sock: Any, sink: Callable[[list[_Item]], None], *, v5: bool,
                 connection: int) -> None:
        self._sock = sock
        self._sink = sink
        self._v5 = v5
        self._connection = connection
        self._in = b""  # an incomplete packet at the end of the last read
        self._out = bytearray()  # complete non-PUBLISH packets for paho
        self._eof = False
        self._passive = False  # after a framing error: everything goes to paho, which closes

    def recv(self, bufsize: int) -> bytes:
        if not self._out:
            if self._eof:
                return b""
            self._fill()  # raises BlockingIOError when the socket has nothing (paho expects it)
            if not self._out:
                if self._eof:
                    return b""
                # Only PUBLISH packets in this read: back to paho's loop (to write PUBACKs and
                # keep-alives) before reading more; select() sees the socket still readable.
                raise BlockingIOError
        chunk = bytes(self._out[:bufsize])
        del self._out[:bufsize]
        return chunk

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._out) + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:  # fileno, send, close, setsockopt, ...
        return getattr(self._sock, name)

    def _fill(self) -> None:
        data = self._sock.recv(_READ_CHUNK)
        if not data:
            self._eof = True
            self._out += self._in  # a truncated packet: paho reports the lost connection
            self._in = b""
            return
        if self._passive:
            self._out += data
            return
        buf = self._in + data if self._in else data
        items = split_packets(buf, self._out, self._v5, self._connection)
        if items is None:  # malformed framing: paho gets the bytes and closes the connection
            self._passive = True
            self._out += buf
            self._in = b""
            return
        consumed, batch = items
        self._in = buf[consumed:]
        if batch:
            self._sink(batch)


def split_packets(buf: bytes, out: bytearray, v5: bool,
                  connection: int = 0) -> tuple[int, list[_Item]] | None:
    """Split `buf` into MQTT packets: QoS 0/1 PUBLISH packets become items, every other
    complete packet is appended to `out` unchanged. Returns (bytes consumed, items); None if
    the fixed header is malformed (a remaining length over four bytes)."""
    items: list[_Item] = []
    n = len(buf)
    pos = 0
    while n - pos >= 2:
        first = buf[pos]
        i = pos + 1
        length = 0
        shift = 0
        while True:
            if i >= n:
                return pos, items
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 21:
                return None
        end = i + length
        if end > n:
            break
        item = _parse_publish(first, buf, i, end, v5, connection) if first >> 4 == 3 else None
        if item is None:
            out += buf[pos:end]
        else:
            items.append(item)
        pos = end
    return pos, items


def _parse_publish(first: int, buf: bytes, i: int, end: int, v5: bool,
                   connection: int) -> _Item | None:
    """A QoS 0/1 PUBLISH body at buf[i:end] as an item; None (left to paho) otherwise."""
    qos = (first >> 1) & 3
    if qos > 1 or end - i < 2:
        return None
    p = i + 2 + ((buf[i] << 8) | buf[i + 1])
    if p > end:
        return None
    topic_b = buf[i + 2:p]
    mid = 0
    if qos:
        if p + 2 > end:
            return None
        mid = (buf[p] << 8) | buf[p + 1]
        p += 2
    if v5:  # skip the properties (a varint length, then that many bytes)
        plen = shift = 0
        while True:
            if p >= end or shift > 21:
                return None
            byte = buf[p]
            p += 1
            plen |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        p += plen
        if p > end:
            return None
    try:
        topic = topic_b.decode()
    except UnicodeDecodeError:
        topic = ""  # not UTF-8: off-layout, rejected as malformed
    return _Item(topic, buf[p:end], mid, qos, connection)


class IngestWorker:
    """One member of the shared ingest subscription. `start()`/`run()`, then `stop()`."""

    def __init__(self, pipeline: Pipeline, host: str, port: int, *,
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None,
                 group: str = "sensorseal-ingest", kinds: Sequence[str] = DEFAULT_KINDS,
                 qos: int = 1, batch_max: int = 500, batch_wait_ms: float = 5,
                 rate_limit: RateLimit | None = RateLimit(per_s=100.0, burst=1000.0),
                 store: Store | None = None, client_id: str | None = None,
                 session_expiry_s: int = 3600, keepalive_s: int = 30,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 shared: bool = True,
                 ) -> None:
        if qos not in (0, 1):
            raise ConfigError("the worker subscribes at QoS 0 or 1")
        if batch_max < 1 or batch_wait_ms < 0:
            raise ConfigError("batch_max >= 1 and batch_wait_ms >= 0")
        for kind in kinds:
            if kind not in DEFAULT_KINDS:
                raise ConfigError(f"cannot ingest topic kind {kind!r}")
        if not group or any(c in group for c in "/+#"):
            raise ConfigError("share group must be a non-empty name without / + #")
        self.pipeline = pipeline
        # Worker-side rejections go to the same store as the pipeline's.
        self._store: Store = store if store is not None else pipeline.store
        self.host, self.port = host, port
        self.group, self.kinds, self.qos = group, tuple(kinds), qos
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_ms / 1000
        self._buckets = _Buckets(rate_limit, clock) if rate_limit is not None else None
        self._wall_ms = wall_clock_ms
        self.source = f"mqtt://{host}:{port}"
        self.stats = WorkerStats()
        # Lists of items, one per socket read (or per on_message); None asks the processor to stop.
        self._inbox: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self._carry: list[_Item] = []  # items past batch_max from the last read, next batch's
        self._topics: dict[str, tuple[DeviceId, str, str] | None] = {}  # topic -> id, kind, hex
        self._connection = 0  # bumped on every CONNACK (paho network thread)
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._processor: threading.Thread | None = None
        self._session_expiry = session_expiry_s
        self._keepalive = keepalive_s
        self.shared = shared

        cid = client_id or f"{group}-{uuid.uuid4().hex[:12]}"
        if shared:
            self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                       protocol=mqtt.MQTTv5, manual_ack=True)
        else:  # MQTT 3.1.1: a persistent session keeps unacknowledged messages across reconnects
            self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                       protocol=mqtt.MQTTv311, clean_session=False,
                                       manual_ack=True)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls_ca is not None:
            ctx = ssl.create_default_context(cafile=tls_ca)
            if tls_cert is not None:
                ctx.load_cert_chain(tls_cert, tls_key)
            self._client.tls_set_context(ctx)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("ingest worker: broker refused the connection (%s)", reason)
            return
        self.stats.connects += 1
        # Without a resumed session, messages still in hand from the previous connection are
        # processed (copies are idempotent) but not acknowledged on this one: their packet ids
        # belonged to a session the broker no longer has. A resumed session keeps its ids.
        if not getattr(_flags, "session_present", False):
            self._connection += 1
        set_nodelay(client)
        # paho has read exactly the CONNACK: no byte of what follows is in a buffer yet.
        sock = getattr(client, "_sock", None)
        if sock is not None and not isinstance(sock, _PublishReader):
            client._sock = _PublishReader(sock, self._inbox.put, v5=self.shared,
                                          connection=self._connection)
        # Subscribe on every connect, resumed session or not: Mosquitto 2.0.11 restores a
        # persistent session after a restart (session_present=1, unacknowledged messages
        # re-sent) but not its shared subscriptions. Until this SUBSCRIBE arrives, the
        # broker answers publishers "no matching subscribers" (PUBACK 0x10) and drops the
        # message; without it the worker would never receive again.
        client.subscribe([(self._filter(kind), self.qos) for kind in self.kinds])
        self._connected.set()

    def _filter(self, kind: str) -> str:
        if self.shared:
            return topics.shared(self.group, kind)
        return f"{topics.PREFIX}/+/{kind}"

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason: Any, _props: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("ingest worker: disconnected (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""  # not UTF-8: off-layout, rejected as malformed
        self._inbox.put([_Item(topic, bytes(msg.payload), msg.mid, msg.qos, self._connection)])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, *, wait_s: float = 10.0) -> None:
        """Connect, subscribe and start processing in background threads."""
        self._stopping.clear()
        if self.shared:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry
            props.ReceiveMaximum = _RECEIVE_MAXIMUM
            self._client.connect(self.host, self.port, keepalive=self._keepalive,
                                 clean_start=False, properties=props)
        else:
            self._client.connect(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._processor = threading.Thread(target=self._process_forever,
                                           name=f"ingest-{self.group}", daemon=True)
        self._processor.start()
        if not self._connected.wait(wait_s):
            log.warning("ingest worker: not connected after %.1fs; still trying", wait_s)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def run(self) -> None:
        """Start and block until `stop()` is called (from a signal handler or another thread)."""
        self.start()
        self._stopping.wait()
        self._join()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then disconnect. Unprocessed messages stay unacknowledged
        and the broker keeps them for this session (or hands them to another worker)."""
        self._stopping.set()
        self._join(timeout)

    def _join(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        if self._processor is not None and self._processor is not threading.current_thread():
            self._processor.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    # -- processing (worker thread) ------------------------------------------------------------

    def _next_batch(self) -> list[_Item] | None:
        """Up to batch_max items: whatever has arrived, waiting at most batch_wait for more.
        Items come in lists (one per socket read), so the hand-off costs one queue operation
        per read, not per message."""
        batch, self._carry = self._carry, []
        if not batch:
            first = self._inbox.get()
            if first is None:
                return None
            batch = first  # the lists are the processor's once handed over
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            try:
                more = self._inbox.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    more = self._inbox.get(timeout=remaining)
                except queue.Empty:
                    break
            if more is None:
                self._inbox.put(None)  # let the outer loop see the stop after this batch
                break
            batch.extend(more)
        if len(batch) > self.batch_max:
            self._carry = batch[self.batch_max:]
            del batch[self.batch_max:]
        return batch

    def _process_forever(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if batch is None or self._stopping.is_set():
                return
            try:
                self._process(batch)
            except Exception:  # never let the thread die; the batch stays unacknowledged
                log.exception("ingest worker: unexpected error on a batch of %d", len(batch))

    def _screen(self, item: _Item, now_ms: int, events: list[AuditEvent],
                limited: Counter[str]) -> bool:
        """Worker-side checks before the pipeline; False (and an audit event) if refused."""
        known = self._topics.get(item.topic)
        if known is None:
            try:
                device_id, kind = topics.device_of(item.topic)
            except Rejected as exc:
                self._reject(events, now_ms, exc, None)
                return False
            known = (device_id, kind, device_id.hex())
            if len(self._topics) >= _TOPIC_CACHE:  # forged topics must not grow it forever
                self._topics.clear()
            self._topics[item.topic] = known
        device_id, kind, hex_id = known
        if kind not in self.kinds:
            self._reject(events, now_ms, Rejected(RejectReason.MALFORMED,
                                                  f"topic kind {kind} not ingested"), None)
            return False
        kid = _claimed_kid(item.payload)
        if kid is not None and kid != device_id:
            self._reject(events, now_ms, Rejected(
                RejectReason.MALFORMED, f"envelope kid {kid.hex()[:24]} differs from topic"),
                hex_id)
            return False
        if self._buckets is not None and not self._buckets.take(hex_id):
            limited[hex_id] += 1
            return False
        return True

    def _reject(self, events: list[AuditEvent], now_ms: int, exc: Rejected,
                hex_id: str | None) -> None:
        self.stats.rejected[exc.reason.value] += 1
        events.append(AuditEvent(now_ms, exc.reason.value, TRANSPORT, self.source, hex_id,
                                 exc.detail))

    def _process(self, batch: list[_Item]) -> None:
        self.stats.received += len(batch)
        self.stats.batches += 1
        now_ms = self._wall_ms()
        events: list[AuditEvent] = []
        limited: Counter[str] = Counter()
        passed = [it for it in batch if self._screen(it, now_ms, events, limited)]
        for hex_id, n in limited.items():
            self.stats.rejected[RejectReason.RATE_LIMITED.value] += n
            events.append(AuditEvent(now_ms, RejectReason.RATE_LIMITED.value, TRANSPORT,
                                     self.source, hex_id, f"{n} message(s) over the rate limit"))
        results = self._ingest_until_committed([(it.payload, it.topic) for it in passed])
        if results is None:
            return  # stopping while the store is down: leave everything unacknowledged
        for res in results:
            if res.ok:
                self.stats.accepted += 1
            elif res.reason is not None:
                self.stats.rejected[res.reason.value] += 1
        if events and not self._commit_events(events):
            return
        self._ack(batch)

    def _ingest_until_committed(self, items: list[tuple[bytes, str]],
                                ) -> list[IngestResult] | None:
        if not items:
            return []
        delay = 0.05
        while True:
            try:
                return self.pipeline.ingest(items, transport=TRANSPORT, source=self.source)
            except IngestUnavailable:
                self.stats.store_retries += 1
                log.warning("ingest worker: store unavailable; retrying in %.2fs", delay)
            except Exception:
                log.exception("ingest worker: pipeline failed on a batch; retrying one by one")
                return self._ingest_one_by_one(items)
            if self._stopping.wait(delay):
                return None
            delay = min(delay * 2, 5.0)

    def _ingest_one_by_one(self, items: list[tuple[bytes, str]]) -> list[IngestResult] | None:
        results: list[IngestResult] = []
        for item in items:
            try:
                results.extend(self.pipeline.ingest([item], transport=TRANSPORT,
                                                    source=self.source))
            except IngestUnavailable:
                return None
            except Exception:
                log.exception("ingest worker: a message broke the pipeline; audited")
                ev = AuditEvent(self._wall_ms(), RejectReason.MALFORMED.value, TRANSPORT,
                                self.source, None, "internal error")
                if not self._commit_events([ev]):
                    return None
                results.append(IngestResult(False, RejectReason.MALFORMED, None, None))
        return results

    def _commit_events(self, events: list[AuditEvent]) -> bool:
        delay = 0.05
        while True:
            try:
                self._store.add_events(events)
                return True
            except Exception:
                self.stats.store_retries += 1
                log.exception("ingest worker: could not record %d audit events", len(events))
            if self._stopping.wait(delay):
                return False
            delay = min(delay * 2, 5.0)

    def _ack(self, batch: list[_Item]) -> None:
        ack = self._client.ack
        current = self._connection
        n = 0
        for it in batch:
            if it.qos and it.connection == current:
                ack(it.mid, it.qos)
                n += 1
        self.stats.acked += n

    def __repr__(self) -> str:
        return f"IngestWorker(group={self.group!r}, {self.host}:{self.port})"
