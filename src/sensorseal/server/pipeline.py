"""The ingest pipeline: where bytes from any transport become telemetry or recorded rejections.

Every adapter (HTTP route, MQTT worker, ...) hands its envelopes here and renders the results
with one table; nothing else decides security. Per batch the order is:

1. `unseal()` each item with `strike=False` (parse -> context -> replay check -> verify ->
   policy), collecting accepted rows and rejection audit events;
2. ONE `store.record(rows, events)` call: one transaction, where the store's unique key
   (device, epoch, seq) is the replay truth shared by restarts and several workers. A row the
   store reports as already present becomes a REPLAY rejection (and its own audit event);
3. only after that commit, strike each stored seq in its replay window: if the write fails,
   nothing is struck and the sender may simply retry.

The pipeline is synchronous and transport-free; async adapters call it from a worker thread.
It is safe to call from several threads at once: the context cache and the windows are guarded
by one lock, held only for dictionary work and strikes, never while decrypting or writing.

Security contexts are cached per device and epoch. The device's status (active, suspended,
revoked), current epoch and policy are re-read from the registry when the cached copy is older
than `status_ttl_ms` (1 s by default), so an operator's change is visible within that time in
every process; `invalidate()` makes it immediate in this one.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from sensorseal.core.attest import PublicKey, parse_sign1, verify_sign1
from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import DEFAULT_MAX_SIZE, Opened, unseal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.store.base import AuditEvent, DeviceRecord, DeviceStatus, Store, TelemetryRow

__all__ = ["IngestResult", "IngestUnavailable", "Opener", "Pipeline", "PipelineStats",
           "RegistryView"]

log = logging.getLogger(__name__)

DEFAULT_STATUS_TTL_MS = 1_000
ATTESTED = "attested"  # telemetry level of a verified COSE_Sign1 payload (stored as signed)
DEFAULT_CACHE_SIZE = 100_000


class RegistryView(Protocol):
    """The two registry calls the pipeline needs (sensorseal.registry.Registry provides them)."""

    def find(self, device_id: DeviceId) -> DeviceRecord | None: ...

    def root_secret(self, device_id: DeviceId, epoch: int) -> bytes | None: ...


def _database_down(exc: BaseException) -> bool:
    """True for the errors a store raises while its database is unreachable or restarting
    (sqlite3 operational errors, any psycopg/psycopg_pool error, OS-level errors)."""
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError | OSError | TimeoutError):
        return True
    return type(exc).__module__.split(".")[0] in ("psycopg", "psycopg_pool")


class IngestUnavailable(Exception):
    """The store could not record a batch. Nothing was accepted or struck; the sender may retry.

    Raised from the store's own exception (`__cause__`), whose text stays in the server log.
    """


class IngestResult(NamedTuple):
    """The outcome of one item. `reason` is for the audit log and operators, never for peers.

    (Immutable like a frozen dataclass; a NamedTuple because one is built per message and
    builds about 3x faster.)
    """

    ok: bool
    reason: RejectReason | None
    device_id: str | None  # 24 hex, as claimed by the message (None if it did not parse)
    seq: int | None


_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)
_PENDING = IngestResult(False, None, None, None)  # placeholder until the store has answered


@dataclass(slots=True)
class PipelineStats:
    """Counters for metrics: messages accepted, and rejected by reason."""

    accepted: int = 0
    rejected: Counter[RejectReason] = field(default_factory=Counter)
    internal_errors: int = 0
    store_failures: int = 0


@dataclass(slots=True, eq=False)
class _DeviceEntry:
    """What the cache holds per device: its record (status, epoch, policy) and its contexts."""

    record: DeviceRecord
    checked_ms: int
    contexts: dict[int, SecurityContext] = field(default_factory=dict)
    # Epochs other than the current one: grace expiry (ms) of an older epoch, or None for the
    # pending epoch of an E5 renewal. Re-read with the record (every status TTL).
    expires: dict[int, int | None] = field(default_factory=dict)
    signing_keys: list[PublicKey] | None = None  # level "attested"; loaded on first use


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Opener(Protocol):
    """What `ingest` calls to open one item: `sensorseal.core.envelope.unseal` by default."""

    def __call__(self, data: bytes, *, route: str,
                 contexts: Callable[[DeviceId, int], SecurityContext], now_ms: int,
                 max_size: int = ..., strike: bool = ...) -> Opened: ...


def preset_policy(record: DeviceRecord) -> Policy:
    """The default policy hook: the built-in preset the device names, or a refusal."""
    policy = PRESETS.get(record.policy)
    if policy is None:
        # A registry entry naming a policy this server does not know: refuse rather than
        # guess a weaker one.
        raise Rejected(RejectReason.POLICY_VIOLATION, "device policy unknown to the server")
    return policy


class Pipeline:
    """Turns envelopes into stored telemetry and audited rejections (see the module docstring)."""

    def __init__(self, registry: RegistryView, store: Store, *,
                 clock_ms: Callable[[], int] = _wall_clock_ms,
                 max_size: int = DEFAULT_MAX_SIZE,
                 status_ttl_ms: int = DEFAULT_STATUS_TTL_MS,
                 cache_size: int = DEFAULT_CACHE_SIZE,
                 policy_resolver: Callable[[DeviceRecord], Policy] | None = None) -> None:
        self._registry = registry
        # Which policy a device's messages must satisfy (stored policies: sensorseal.policies).
        # It may raise Rejected (an unknown or contradictory policy refuses the device).
        self._resolve_policy = preset_policy if policy_resolver is None else policy_resolver
        self._store = store
        self._clock_ms = clock_ms
        self.max_size = max_size
        self._ttl_ms = status_ttl_ms
        self._cache_size = cache_size
        self._devices: dict[DeviceId, _DeviceEntry] = {}
        self._lock = threading.Lock()
        self.stats = PipelineStats()

    def set_policy_resolver(self, resolver: Callable[[DeviceRecord], Policy]) -> None:
        """Install the policy hook (e.g. the console's stored policies); forgets the cache."""
        self._resolve_policy = resolver
        self.invalidate()

    def now_ms(self) -> int:
        """The pipeline's clock, for adapters that stamp their own audit events."""
        return self._clock_ms()

    # -- security contexts -------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store this pipeline records into (adapters audit their own refusals there)."""
        return self._store

    def invalidate(self, device_id: DeviceId | None = None) -> None:
        """Forget the cached state of one device (or all): the next message re-reads it."""
        with self._lock:
            if device_id is None:
                self._devices.clear()
            else:
                self._devices.pop(device_id, None)

    def _entry(self, device_id: DeviceId, now_ms: int) -> _DeviceEntry:
        """The device's cache entry, re-read from the registry when older than the TTL."""
        entry = self._devices.get(device_id)
        if entry is not None and now_ms - entry.checked_ms < self._ttl_ms:
            return entry
        record = self._registry.find(device_id)
        if record is None:
            with self._lock:
                self._devices.pop(device_id, None)
            raise Rejected(RejectReason.UNKNOWN_DEVICE, "no such device")
        # Re-resolved on every refresh (outside the lock: a custom hook may read the store), so
        # that a policy attached to a group or the network reaches cached contexts too.
        try:
            resolved: Policy | None = self._resolve_policy(record)
        except Rejected:
            resolved = None
        with self._lock:
            current = self._devices.get(device_id)
            if current is None:
                if len(self._devices) >= self._cache_size:
                    # Evict the oldest entry: its window is rebuilt from the store on return,
                    # whose unique key stays the replay truth.
                    self._devices.pop(next(iter(self._devices)))
                current = _DeviceEntry(record, now_ms)
                self._devices[device_id] = current
            else:
                if record.epoch != current.record.epoch:
                    current.contexts.clear()  # an epoch changed: re-check which secrets exist
                elif resolved is not None:
                    for ctx in current.contexts.values():
                        ctx.policy = resolved
                else:
                    current.contexts.clear()
                # Other epochs (grace, pending renewal) are re-checked at every refresh: a
                # grace may have been cut, a pending secret superseded by another process.
                for other in [e for e in current.contexts if e != record.epoch]:
                    del current.contexts[other]
                current.expires.clear()
                current.signing_keys = None
                current.record = record
                current.checked_ms = now_ms
            return current

    def _context(self, device_id: DeviceId, epoch: int,
                 now_ms: int | None = None) -> SecurityContext:
        """The receiver context of (device, epoch, up), or Rejected with why there is none."""
        entry = self._entry(device_id, self._clock_ms() if now_ms is None else now_ms)
        record = entry.record
        if record.status is not DeviceStatus.ACTIVE:
            if record.status is DeviceStatus.REVOKED:
                raise Rejected(RejectReason.REVOKED, "device revoked")
            raise Rejected(RejectReason.SUSPENDED, "device suspended")
        now = self._clock_ms() if now_ms is None else now_ms
        ctx = entry.contexts.get(epoch)
        if ctx is not None:
            if epoch == record.epoch:
                return ctx
            if epoch in entry.expires:  # else a refresh raced the build: check again below
                self._check_epoch(epoch, entry.expires[epoch], now)
                return ctx
        policy = self._resolve_policy(record)
        if epoch == record.epoch:
            secret = self._registry.root_secret(device_id, epoch)
        else:
            secret = self._other_epoch(entry, device_id, epoch, now)
        if secret is None:
            raise Rejected(RejectReason.UNKNOWN_EPOCH, f"no key for epoch {epoch}")
        top = self._store.max_seq(device_id, epoch)
        ctx = SecurityContext.from_secret(secret, device_id, epoch, Direction.UP, policy, top,
                                          store_decides_left=True)
        with self._lock:
            # Another thread may have built the same context meanwhile: keep the first one, so
            # that strikes all land in one window.
            ctx = entry.contexts.setdefault(epoch, ctx)
        return ctx

    @staticmethod
    def _check_epoch(epoch: int, expires_ms: int | None, now_ms: int) -> None:
        """An older epoch is accepted until its grace expiry (None marks the pending one)."""
        if expires_ms is not None and now_ms >= expires_ms:
            raise Rejected(RejectReason.UNKNOWN_EPOCH, f"grace of epoch {epoch} is over")

    def _other_epoch(self, entry: _DeviceEntry, device_id: DeviceId, epoch: int,
                     now_ms: int) -> bytes | None:
        """The secret of a non-current epoch if the epoch rules accept it (docs/keys.md):
        an older epoch inside its grace period, or current + 1 while a renewal is pending.
        Registries without epoch support (`epoch_secret`) accept the current epoch only."""
        lookup = getattr(self._registry, "epoch_secret", None)
        current = entry.record.epoch
        if lookup is None or not (epoch < current or epoch == current + 1):
            return None
        found = lookup(device_id, epoch)
        if found is None:
            return None
        secret, info = found
        if epoch < current:
            if info.expires_ms is None:
                raise Rejected(RejectReason.UNKNOWN_EPOCH, f"epoch {epoch} is retired")
            self._check_epoch(epoch, info.expires_ms, now_ms)
        with self._lock:
            entry.expires[epoch] = info.expires_ms if epoch < current else None
        return bytes(secret)

    def _attest(self, msg: Opened) -> None:
        """Level "attested": the plaintext must be a COSE_Sign1 by one of the device's
        registered signing keys, naming the device as its kid. The Sign1 bytes are then stored
        as they are: the archive a third party checks later (`sensorseal verify-archive`)."""
        entry = self._devices.get(msg.device_id)
        keys = None if entry is None else entry.signing_keys
        if keys is None:
            lookup = getattr(self._registry, "signing_keys", None)
            keys = [] if lookup is None else list(lookup(msg.device_id))
            if entry is not None:
                entry.signing_keys = keys
        if not keys:
            raise Rejected(RejectReason.POLICY_VIOLATION, "attestation required, no signing key")
        kid = parse_sign1(msg.payload).kid
        if kid is None or not hmac.compare_digest(kid, bytes(msg.device_id)):
            raise Rejected(RejectReason.BAD_SIGNATURE, "signed for another device")
        for key in keys:
            try:
                verify_sign1(msg.payload, key)
            except Rejected:
                continue
            return
        raise Rejected(RejectReason.BAD_SIGNATURE, "no registered key verifies the signature")

    def _confirm(self, device_id: DeviceId, epoch: int) -> None:
        """The first stored message under a pending epoch proves possession: switch."""
        confirm = getattr(self._registry, "confirm_epoch", None)
        if confirm is None:
            return
        try:
            confirm(device_id, epoch)
        except Exception:
            # The message is stored; the next one under the new epoch tries again.
            log.exception("could not confirm epoch %d of device %s", epoch, device_id)
        self.invalidate(device_id)

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, items: Sequence[tuple[bytes, str]], *, transport: str,
               source: str, opener: Opener | None = None) -> list[IngestResult]:
        """Open, store and audit a batch of (envelope, route) items; one result per item.

        `opener` replaces `unseal` (same signature) for adapters that must check more, or that
        open another item format: the gateway route (sensorseal.gateway.cloud) checks the
        layers a device's network requires and opens items a gateway vouched for.

        Raises IngestUnavailable (and strikes nothing) if the store write fails. The device
        status is read once per device and batch (and at most `status_ttl_ms` old).
        """
        now = self._clock_ms()
        context = self._context
        # Contexts already looked up in this batch, and the last one handed to unseal() (to
        # name the claimed device in an audit event, and to strike without a second lookup).
        batch: dict[tuple[DeviceId, int], SecurityContext] = {}
        last: list[Any] = [None, None]  # [device id, context]

        def contexts(device_id: DeviceId, epoch: int) -> SecurityContext:
            last[0] = device_id
            ctx = batch.get((device_id, epoch))
            if ctx is None:
                ctx = batch[(device_id, epoch)] = context(device_id, epoch, now)
            last[1] = ctx
            return ctx

        results: list[IngestResult] = []
        opened: list[tuple[int, Opened, SecurityContext]] = []  # (index in results, msg, ctx)
        rows: list[TelemetryRow] = []
        events: list[AuditEvent] = []
        rejected: list[RejectReason] = []
        internal = 0
        max_size = self.max_size
        open_: Opener = unseal if opener is None else opener
        for data, route in items:
            last[0] = None
            try:
                msg = open_(data, route=route, contexts=contexts, now_ms=now,
                            max_size=max_size, strike=False)
            except Rejected as exc:
                hex_id = None if last[0] is None else last[0].hex()
                results.append(IngestResult(False, exc.reason, hex_id, None))
                events.append(AuditEvent(now, exc.reason.value, transport, source, hex_id,
                                         exc.detail))
                rejected.append(exc.reason)
                continue
            except Exception as exc:
                if _database_down(exc):
                    # The registry could not be read: nothing is wrong with the message. Fail
                    # the whole batch (nothing was recorded) so the sender retries it later.
                    self.stats.store_failures += 1
                    raise IngestUnavailable("the store could not be read") from exc
                # Not a rejection: a bug in the core or a failing keystore. Never let one item
                # take the batch down; the traceback stays in our log only.
                log.exception("internal error while opening a message from %s (%s)",
                              source, transport)
                hex_id = None if last[0] is None else last[0].hex()
                results.append(IngestResult(False, RejectReason.MALFORMED, hex_id, None))
                events.append(AuditEvent(now, RejectReason.MALFORMED.value, transport, source,
                                         hex_id, "internal"))
                rejected.append(RejectReason.MALFORMED)
                internal += 1
                continue
            level = msg.level._value_
            if last[1].policy.require_attestation:
                try:
                    self._attest(msg)
                except Rejected as exc:
                    hex_id = msg.device_id.hex()
                    results.append(IngestResult(False, exc.reason, hex_id, msg.seq))
                    events.append(AuditEvent(now, exc.reason.value, transport, source, hex_id,
                                             exc.detail))
                    rejected.append(exc.reason)
                    continue
                level = ATTESTED
            opened.append((len(results), msg, last[1]))
            results.append(_PENDING)
            rows.append(_new_tuple(TelemetryRow, (msg.device_id, msg.epoch, msg.seq, now,
                                                  msg.timestamp_ms, level, route, transport,
                                                  msg.payload)))

        stored = self._record(rows, events)

        replays: list[AuditEvent] = []
        struck: list[tuple[SecurityContext, int]] = []
        for (index, msg, ctx), ok in zip(opened, stored, strict=True):
            if ok:
                results[index] = _new_tuple(IngestResult, (True, None, msg.device_id.hex(),
                                                           msg.seq))
                struck.append((ctx, msg.seq))
            else:
                hex_id = msg.device_id.hex()
                results[index] = IngestResult(False, RejectReason.REPLAY, hex_id, msg.seq)
                replays.append(AuditEvent(now, RejectReason.REPLAY.value, transport, source,
                                          hex_id, f"seq {msg.seq} already stored"))
                rejected.append(RejectReason.REPLAY)
        if replays:
            try:
                self._store.add_events(replays)
            except Exception:
                # The telemetry is committed and the replays refused either way; losing their
                # audit lines is logged loudly rather than failing the whole batch.
                log.exception("could not record %d replay audit events", len(replays))

        pending: set[tuple[DeviceId, int]] = set()
        with self._lock:
            # A context evicted or invalidated meanwhile is struck anyway: harmless, and its
            # successor was resumed from the store, which already holds these rows.
            for ctx, seq in struck:
                ctx.window.strike(seq)
            self.stats.accepted += len(struck)
            self.stats.rejected.update(rejected)
            self.stats.internal_errors += internal
            # A message under epoch current + 1 confirms a renewal. Checked per context used
            # in this batch first (few), then per message only for those (rare).
            renewing = set()
            for device_id, epoch in batch:
                entry = self._devices.get(device_id)
                if entry is not None and epoch == entry.record.epoch + 1:
                    renewing.add((device_id, epoch))
            if renewing:
                for (_index, msg, _ctx), ok in zip(opened, stored, strict=True):
                    if ok and (msg.device_id, msg.epoch) in renewing:
                        pending.add((msg.device_id, msg.epoch))
        for device_id, epoch in pending:
            self._confirm(device_id, epoch)
        return results

    def reject(self, reason: RejectReason, *, transport: str, source: str,
               detail: str = "", count: int = 1) -> None:
        """Audit a refusal the transport made before any envelope reached `ingest`.

        For example a wrong content type, a body over the limit or a batch that is not a CBOR
        array: the sender still learns only a generic failure, the log gets the reason.
        `count` is how many messages it stands for (1 when unknown). Never raises: a failing
        audit write is logged, since the sender is refused either way.
        """
        event = AuditEvent(self._clock_ms(), reason.value, transport, source, None, detail)
        with self._lock:
            self.stats.rejected[reason] += count
        try:
            self._store.add_events([event])
        except Exception:
            log.exception("could not record a %s audit event", reason.value)

    def _record(self, rows: list[TelemetryRow], events: list[AuditEvent]) -> list[bool]:
        if not rows and not events:
            return []
        try:
            stored = self._store.record(rows, events)
        except Exception as exc:
            with self._lock:
                self.stats.store_failures += 1
            log.exception("store write failed for a batch of %d rows and %d events",
                          len(rows), len(events))
            raise IngestUnavailable("the store could not record the batch") from exc
        if len(stored) != len(rows):
            raise IngestUnavailable(f"store answered {len(stored)} results for {len(rows)} rows")
        return stored
