"""The cloud side of the gateway route: check who vouched, open the items, enforce the layers.

`POST /v1/gateway/batch` carries one native envelope sealed under a *gateway's* credential.
Per batch, in order:

1. parse, look up the gateway (unknown / suspended / revoked / unknown epoch refused; after a
   `gateway rotate` the old epoch is accepted until its grace ends, then refused as
   `unknown_epoch`), replay window on the gateway's sequence number per epoch, verify: nothing
   of the batch is read before this;
2. record the gateway's drop reports in the audit log;
3. hand the items to the pipeline (one transaction per kind of item and set of layers), with an
   opener that, after the item itself is authentic and fresh, enforces:
   - the device belongs to a network this gateway serves (a gateway vouches for its own
     networks only), and
   - the layers present -- E1/E2 as the gateway vouched, E3 if the cloud itself opened a
     sealed device envelope, E4 if the batch came over TLS -- include everything the device's
     network requires; anything weaker is `policy_violation`.

The same check guards the direct routes (`direct_opener`): a device whose network requires E1
cannot bypass its gateway by posting to /v1/messages.

The telemetry row records who vouched and which layers were present in its `transport` column:
``gateway:<gateway id>:<layers>`` (e.g. ``gateway:66..ab:e1+e3+e4``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import DEFAULT_MAX_SIZE, Opened, parse, unseal, verify
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.layers import (
    E3_ROUTE,
    GATEWAY_BATCH_ROUTE,
    ITEM_ENVELOPE,
    Layer,
    check_layers,
    decode_batch,
    decode_vouched,
    format_layers,
)
from sensorseal.core.policy import Policy
from sensorseal.gateway.provision import GatewayRegistry
from sensorseal.gateway.relay import DROP_REASONS
from sensorseal.server.pipeline import Opener, Pipeline
from sensorseal.store.base import Assignment, AuditEvent, DeviceStatus, Store

__all__ = ["MAX_BATCH_BYTES", "VOUCHED_ROUTE", "GatewayIngest"]

MAX_BATCH_BYTES = 1 << 20
VOUCHED_ROUTE = "/e2"  # the route recorded for items a gateway opened and vouched for
TRANSPORT = "gateway"
_GATEWAY_POLICY = Policy("gateway", frozenset({Level.SEALED}))
_NONE: frozenset[Layer] = frozenset()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_grace(epoch: int, not_after_ms: int | None, now_ms: int) -> None:
    """An older gateway epoch is accepted while now < the end of its grace (docs/keys.md)."""
    if not_after_ms is not None and now_ms >= not_after_ms:
        raise Rejected(RejectReason.UNKNOWN_EPOCH, f"gateway epoch {epoch}: grace period over")


class GatewayIngest:
    """Thread-safe; one per server process, next to the pipeline."""

    def __init__(self, gateways: GatewayRegistry, pipeline: Pipeline, store: Store, *,
                 clock_ms: Callable[[], int] = _now_ms, ttl_ms: int = 1_000) -> None:
        self._gateways = gateways
        self._pipeline = pipeline
        self._store = store
        self._clock_ms = clock_ms
        self._ttl_ms = ttl_ms
        self._lock = threading.Lock()
        # (gateway, epoch) -> (checked at, context, end of the epoch's grace or None)
        self._contexts: dict[tuple[DeviceId, int], tuple[int, SecurityContext, int | None]] = {}
        self._rules: dict[DeviceId, tuple[int, Assignment | None, frozenset[Layer]]] = {}
        self._serves: dict[DeviceId, tuple[int, frozenset[bytes]]] = {}

    # -- rules -------------------------------------------------------------------------------

    def _rule(self, device_id: DeviceId, now: int) -> tuple[Assignment | None, frozenset[Layer]]:
        cached = self._rules.get(device_id)
        if cached is not None and now - cached[0] < self._ttl_ms:
            return cached[1], cached[2]
        assignment = self._gateways.assignment(device_id)
        required = self._gateways.required_layers(device_id) if assignment else _NONE
        with self._lock:
            if len(self._rules) > 100_000:
                self._rules.clear()
            self._rules[device_id] = (now, assignment, required)
        return assignment, required

    def enforce(self, device_id: DeviceId, present: frozenset[Layer],
                served: frozenset[bytes] | None) -> None:
        """Rejected(POLICY_VIOLATION) unless `present` meets the device's network's needs and,
        via a gateway (`served` given), the gateway serves that network."""
        assignment, required = self._rule(device_id, self._clock_ms())
        if served is not None and (assignment is None or assignment.network_id not in served):
            raise Rejected(RejectReason.POLICY_VIOLATION,
                           "gateway does not serve the device's network")
        check_layers(required, present)

    def direct_opener(self, e4: bool) -> Opener:
        """For /v1/messages: the native envelope is E3 if sealed; E4 if the request was TLS."""
        e3 = self._envelope_opener(frozenset({Layer.E3, Layer.E4}) if e4 else
                                   frozenset({Layer.E3}), None)
        signed = self._envelope_opener(frozenset({Layer.E4}) if e4 else _NONE, None)

        def open_(data: bytes, **kw: Any) -> Opened:
            return (e3 if data[:1] == b"\xd0" else signed)(data, **kw)
        return open_

    def _envelope_opener(self, present: frozenset[Layer], served: frozenset[bytes] | None
                         ) -> Opener:
        def open_(data: bytes, *, route: str,
                  contexts: Callable[[DeviceId, int], SecurityContext], now_ms: int,
                  max_size: int = DEFAULT_MAX_SIZE, strike: bool = False) -> Opened:
            msg = unseal(data, route=route, contexts=contexts, now_ms=now_ms, max_size=max_size,
                         strike=False)
            if (msg.level is Level.SEALED) != (Layer.E3 in present):
                raise Rejected(RejectReason.MALFORMED, "envelope level is not the one grouped")
            self.enforce(msg.device_id, present, served)
            return msg
        return open_

    def _vouched_opener(self, present: frozenset[Layer], served: frozenset[bytes]) -> Opener:
        def open_(data: bytes, *, route: str,
                  contexts: Callable[[DeviceId, int], SecurityContext], now_ms: int,
                  max_size: int = DEFAULT_MAX_SIZE, strike: bool = False) -> Opened:
            v = decode_vouched(data)
            ctx = contexts(v.device_id, v.epoch)
            ctx.window.check(v.seq)
            ctx.policy.check(v.level, v.timestamp_ms, now_ms)
            self.enforce(v.device_id, present, served)
            return Opened(v.device_id, v.epoch, v.seq, v.timestamp_ms, v.level, 0, Direction.UP,
                          route, v.payload)
        return open_

    # -- the batch ---------------------------------------------------------------------------

    def _gateway_context(self, gateway_id: DeviceId, epoch: int, now: int) -> SecurityContext:
        key = (gateway_id, epoch)
        cached = self._contexts.get(key)
        if cached is not None and now - cached[0] < self._ttl_ms:
            _check_grace(epoch, cached[2], now)  # the grace ends on time, not at the next TTL
            return cached[1]
        record = self._gateways.gateway_record(gateway_id)
        if record is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, "no such gateway")
        if record.status is not DeviceStatus.ACTIVE:
            reason = RejectReason.REVOKED if record.status is DeviceStatus.REVOKED \
                else RejectReason.SUSPENDED
            raise Rejected(reason, f"gateway {record.status.value}")
        info = self._gateways.gateway_epoch(gateway_id, epoch)
        if info is None:
            raise Rejected(RejectReason.UNKNOWN_EPOCH, f"gateway has no epoch {epoch}")
        _check_grace(epoch, info.not_after_ms, now)
        with self._lock:
            if cached is not None:  # still valid: keep the window, refresh the check time
                self._contexts[key] = (now, cached[1], info.not_after_ms)
                return cached[1]
        secret = self._gateways.gateway_secret(gateway_id, epoch)
        if secret is None:
            raise Rejected(RejectReason.UNKNOWN_EPOCH, f"gateway has no epoch {epoch}")
        ctx = SecurityContext.from_secret(secret, gateway_id, epoch, Direction.UP,
                                          _GATEWAY_POLICY)
        with self._lock:
            return self._contexts.setdefault(key, (now, ctx, info.not_after_ms))[1]

    def handle(self, body: bytes, *, e4: bool, source: str) -> tuple[str, list[int]]:
        """(gateway id, per-item codes 0 stored / 1 refused). Rejected: the batch as a whole
        is refused (audit it); IngestUnavailable from the pipeline: retry later."""
        now = self._clock_ms()
        env = parse(body, max_size=MAX_BATCH_BYTES)
        ctx = self._gateway_context(env.device_id, env.epoch, now)
        with self._lock:
            ctx.window.check(env.seq)
        payload = verify(env, ctx.keys, GATEWAY_BATCH_ROUTE)
        ctx.policy.check(env.level, env.timestamp_ms, now)
        with self._lock:
            ctx.window.check(env.seq)  # another thread may have taken it meanwhile
            ctx.window.strike(env.seq)
        gateway = env.device_id.hex()
        batch = decode_batch(payload)
        if batch.drops:
            self._store.add_events([
                AuditEvent(at, DROP_REASONS.get(label, RejectReason.MALFORMED).value, TRANSPORT,
                           gateway, None, f"{count} frames dropped at gateway ({label:.32})")
                for label, count, at in batch.drops if count > 0])
        served = self._gateways.serves(env.device_id)
        # Grouped by kind and layers, so that each group's telemetry rows can name the layers
        # in their transport column; an inner envelope is E3 if sealed (tag 16 in its first
        # byte, which unseal() authenticates with the rest).
        groups: dict[tuple[int, frozenset[Layer]], list[int]] = defaultdict(list)
        for i, (kind, facts, data) in enumerate(batch.items):
            if e4:
                facts = facts | {Layer.E4}
            if kind == ITEM_ENVELOPE and data[:1] == b"\xd0":
                facts = facts | {Layer.E3}
            groups[(kind, facts)].append(i)
        codes = [1] * len(batch.items)
        for (kind, present), indexes in groups.items():
            transport = f"{TRANSPORT}:{gateway}:{format_layers(present)}"
            opener: Any
            if kind == ITEM_ENVELOPE:
                opener, route = self._envelope_opener(present, served), E3_ROUTE
            else:
                opener, route = self._vouched_opener(present, served), VOUCHED_ROUTE
            results = self._pipeline.ingest([(batch.items[i][2], route) for i in indexes],
                                            transport=transport, source=source, opener=opener)
            for i, r in zip(indexes, results, strict=True):
                codes[i] = 0 if r.ok else 1
        return gateway, codes
