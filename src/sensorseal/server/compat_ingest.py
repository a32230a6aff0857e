"""The legacy ingest path: Valarm, Yoctopuce and Waspmote messages through the same checks.

`sensorseal.compat` holds the pure format code (parse, verify, decrypt). This module is what the
pipeline is for native envelopes: per message, in this order,

    parse + key lookup (registry: status, migration state, policy, the unwrapped legacy secret)
    -> verify (the format's MAC / signature / decryption)
    -> policy gate (is this legacy format allowed for the device's policy?)
    -> replay rules (per format, below)
    -> store (telemetry row marked `legacy:<format>`, epoch LEGACY_EPOCH) -> commit replay state

and every refusal becomes an audit event with its `RejectReason`; the sender only learns a
generic failure (rendered by the adapter, `compat_routes`).

Which legacy format a policy allows is data, here (`LEGACY_FORMATS`): `legacy` allows HMAC-MD5
Valarm messages, signed Yoctopuce callbacks and AES-ECB Waspmote frames; `legacy-unsigned` also
allows password-less hubs and plain frames. Valarm HMAC-SHA256 is as strong as the native
`signed` level, so it is also accepted wherever the policy accepts `signed` (e.g. `lax`).

Replay rules, since only Valarm has a counter:
* Valarm: `seq` (else `ts`) goes through a replay window per device (resumed from the store)
  and the store's unique key (device, LEGACY_EPOCH, seq), exactly like native messages.
* Yoctopuce: the SHA-256 of the raw body is claimed in the store for `yocto_window_ms` (24 h);
  a second copy is a replay. The hub's `module.upTime` must follow the last one in step with
  our clock (same boot), or imply a boot after the last accepted callback (a reboot); see
  `check_uptime`. The row's seq is assigned here (monotonic ms).
* Waspmote: the frame has only an 8-bit sequence; identical frames are refused for
  `waspmote_window_ms` (1 h). Nothing stronger is possible with ECB and no MAC: weak, counted.

Migration: a device whose native keys were issued (`Registry.start_migration`) keeps its legacy
format until its first native message is stored; the first legacy message after that, or the
periodic `sweep_migrations`, switches its policy and disables its legacy key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from cryptography.hazmat.primitives import hashes

from sensorseal.compat import valarm, waspmote, yoctopuce
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Level
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.core.replay import ReplayWindow
from sensorseal.registry import LEGACY_EPOCH, Registry
from sensorseal.server.pipeline import IngestUnavailable
from sensorseal.store.base import (
    AuditEvent,
    CompatStore,
    DeviceRecord,
    DeviceStatus,
    LegacyCredential,
    Store,
    TelemetryRow,
)

__all__ = [
    "LEGACY_FORMATS",
    "VALARM_ROUTE",
    "WASPMOTE_ROUTE",
    "YOCTOPUCE_ROUTE",
    "CompatIngest",
    "CompatStats",
    "LegacyAllowance",
    "Outcome",
    "check_uptime",
]

log = logging.getLogger(__name__)

VALARM_ROUTE: Final = "/v1/compat/valarm"
YOCTOPUCE_ROUTE: Final = "/v1/compat/yoctopuce"
WASPMOTE_ROUTE: Final = "/v1/compat/waspmote"
DAY_MS: Final = 24 * 3600 * 1000
REBOOT_SLACK_MS: Final = 10_000  # network delay + hub clock drift over a fresh boot
DRIFT_DIVISOR: Final = 1000  # hub and server clocks may differ by 0.1 % of the time elapsed
SWEEP_INTERVAL_MS: Final = 10_000
MAX_WINDOWS: Final = 100_000


@dataclass(frozen=True, slots=True)
class LegacyAllowance:
    """What a legacy policy lets in beyond the native levels."""

    weak: bool = True  # HMAC-MD5 Valarm, salted-MD5 Yoctopuce, AES-ECB Waspmote
    unsigned: bool = False  # password-less Yoctopuce hubs, plain Waspmote frames


LEGACY_FORMATS: Final[Mapping[str, LegacyAllowance]] = MappingProxyType({
    "legacy": LegacyAllowance(),
    "legacy-unsigned": LegacyAllowance(unsigned=True),
})


class Outcome(NamedTuple):
    """One legacy message's result. `reason` is for the audit log, never for the sender;
    `reply` is what the sender gets back (the hub commands of a Yoctopuce callback)."""

    ok: bool
    reason: RejectReason | None
    device_id: str | None  # 24 hex, once the message named a registered device
    reply: bytes = b""
    weak: bool = False  # accepted only because the policy allows a weak legacy format


@dataclass(slots=True)
class CompatStats:
    """Counters for metrics and the console. Keys are format names (valarm, yoctopuce,
    waspmote); `rejected` keys are "<format>:<reason>"."""

    accepted: Counter[str] = field(default_factory=Counter)
    weak_accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    commands_delivered: int = 0
    migrations_finished: int = 0
    internal_errors: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"accepted": dict(self.accepted), "weak_accepted": dict(self.weak_accepted),
                "rejected": dict(self.rejected), "commands_delivered": self.commands_delivered,
                "migrations_finished": self.migrations_finished,
                "internal_errors": self.internal_errors}


def check_uptime(previous: tuple[int, int] | None, uptime_ms: int | None, now_ms: int,
                 slack_ms: int = REBOOT_SLACK_MS) -> None:
    """The Yoctopuce uptime rule. `previous` = (last accepted upTime, when we accepted it).

    A callback is accepted if it starts a new boot after the last callback (the boot it
    implies, now - upTime, is not before the last callback), or if it continues the same boot:
    its upTime grew by as much as our clock did (within `slack_ms` plus 0.1 % drift). So a
    body of the same boot sent again is refused (its upTime did not grow), and so is a body
    of an earlier boot whose upTime happens to be larger, unless an attacker times it to match
    the hub's current upTime (docs/compat.md, weaknesses). Rejected(REPLAY) otherwise.
    """
    if previous is None or uptime_ms is None:
        return
    last_uptime, last_seen = previous
    if now_ms - uptime_ms >= last_seen - slack_ms:
        return  # the boot it implies started after the last callback: a (re)boot
    elapsed = now_ms - last_seen
    drift = abs(elapsed - (uptime_ms - last_uptime))
    if uptime_ms > last_uptime and drift <= slack_ms + elapsed // DRIFT_DIVISOR:
        return  # the same boot, moving on in step with our clock
    raise Rejected(RejectReason.REPLAY,
                   f"hub upTime {uptime_ms} ms does not follow {last_uptime} ms "
                   f"({elapsed} ms ago) in the same boot, nor starts a new one")


@dataclass(slots=True)
class _Device:
    cred: LegacyCredential
    record: DeviceRecord
    policy: Policy


@dataclass(slots=True)
class _Attempt:
    """Per-message facts the refusal path needs (which device the message named)."""

    now_ms: int
    device: _Device | None = None
    claimed: str | None = None  # 24 hex, as soon as the message named a registered device

    @property
    def device_hex(self) -> str | None:
        return self.claimed


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def _payload(doc: Mapping[str, Any]) -> bytes:
    """The stored payload: compact JSON. Non-finite numbers (JSON allows 1e999) are refused."""
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False,
                          ensure_ascii=False).encode("utf-8")
    except ValueError:
        raise Rejected(RejectReason.MALFORMED, "a reading is not a finite number") from None


class CompatIngest:
    """Turns legacy messages into stored telemetry and audited rejections (module docstring).

    Synchronous and thread-safe; async adapters call it from a worker thread.
    """

    def __init__(self, registry: Registry, store: Store, *,
                 clock_ms: Callable[[], int] = _wall_clock_ms,
                 yocto_window_ms: int = DAY_MS, waspmote_window_ms: int = 3600 * 1000,
                 reboot_slack_ms: int = REBOOT_SLACK_MS,
                 sweep_interval_ms: int = SWEEP_INTERVAL_MS) -> None:
        if not hasattr(store, "get_legacy"):
            raise ConfigError("this store back end has no legacy device support")
        self._registry = registry
        self._store = store
        self._compat: CompatStore = store  # type: ignore[assignment]
        self._clock_ms = clock_ms
        self._yocto_window_ms = yocto_window_ms
        self._wasp_window_ms = waspmote_window_ms
        self._slack_ms = reboot_slack_ms
        self._sweep_interval_ms = sweep_interval_ms
        self._next_sweep_ms = 0
        self._windows: dict[DeviceId, ReplayWindow] = {}
        self._lock = threading.Lock()
        self.stats = CompatStats()

    # -- the three formats -------------------------------------------------------------------

    def valarm(self, body: bytes, signature: str | None, *, source: str,
               transport: str = "http") -> Outcome:
        """A Valarm message (raw body + X-Valarm-Signature header)."""
        def work(att: _Attempt) -> Outcome:
            def key_for(device_id: DeviceId) -> bytes | None:
                att.device = self._device("valarm", device_id.hex(), att)
                secret = self._registry.legacy_secret(att.device.cred)
                return None if secret is None else secret.encode("utf-8")

            msg = valarm.verify(body, signature or "", key_for, now_ms=att.now_ms)
            dev = att.device
            assert dev is not None  # verify() returns only after key_for found the device
            allowance = LEGACY_FORMATS.get(dev.record.policy)
            if msg.legacy and allowance is None:
                raise Rejected(RejectReason.POLICY_VIOLATION,
                               f"HMAC-MD5 not allowed by policy {dev.record.policy}")
            # SIGNED level and the policy's timestamp skew (STALE), as for a native Mac0.
            dev.policy.check(Level.SIGNED, msg.ts_ms, att.now_ms)
            seq = msg.replay_seq
            window = self._window(dev.cred.device_id)
            window.check(seq)
            payload = _payload({"format": "valarm", "alg": msg.alg, "seq": msg.seq,
                                "ts": msg.ts_ms, "readings": dict(msg.readings)})
            row = TelemetryRow(dev.cred.device_id, LEGACY_EPOCH, seq, att.now_ms, msg.ts_ms,
                               f"legacy:valarm-{msg.alg}", VALARM_ROUTE, transport, payload)
            if not self._record(row):
                raise Rejected(RejectReason.REPLAY, f"seq {seq} already stored")
            with self._lock:
                window.strike(seq)
            return self._accepted("valarm", dev, weak=msg.legacy)

        return self._run("valarm", work, transport=transport, source=source)

    def yoctopuce(self, body: bytes, user_agent: str | None, content_type: str | None, *,
                  source: str, transport: str = "http") -> Outcome:
        """A YoctoHub / VirtualHub callback; `reply` carries the hub's queued commands."""
        def work(att: _Attempt) -> Outcome:
            def password_for(serial: str) -> str | None:
                att.device = self._device("yoctopuce", serial, att)
                self._allowance(att.device, "Yoctopuce callbacks")
                return self._registry.legacy_secret(att.device.cred)

            cb = yoctopuce.verify_callback(body, user_agent, password_for, allow_unsigned=True,
                                           content_type=content_type)
            dev = att.device
            assert dev is not None
            if not cb.signed and not self._allowance(dev, "Yoctopuce callbacks").unsigned:
                raise Rejected(RejectReason.POLICY_VIOLATION,
                               f"unsigned callbacks not allowed by policy {dev.record.policy}")
            device_id = dev.cred.device_id
            check_uptime(self._compat.hub_uptime(device_id), cb.uptime_ms, att.now_ms,
                         self._slack_ms)
            payload = _payload({"format": "yoctopuce", "hub": cb.hub_serial,
                                "signed": cb.signed, "uptime_ms": cb.uptime_ms,
                                "readings": [r._asdict() for r in cb.readings]})
            level = "legacy:yoctopuce-md5" if cb.signed else "legacy:yoctopuce-unsigned"
            self._store_once(device_id, cb.digest, att.now_ms + self._yocto_window_ms,
                             payload, level, YOCTOPUCE_ROUTE, transport, att.now_ms,
                             "callback body already received")
            if cb.uptime_ms is not None:
                self._compat.set_hub_uptime(device_id, cb.uptime_ms, att.now_ms)
            reply = self._deliver_commands(dev, att.now_ms, transport, source)
            return self._accepted("yoctopuce", dev, weak=True, reply=reply)

        return self._run("yoctopuce", work, transport=transport, source=source)

    def waspmote_frame(self, frame: bytes | str, network: str = "", *, source: str | None = None,
                       transport: str = "gateway") -> Outcome:
        """A Waspmote frame (bytes, or hex text as Waspmote uploads relay it), e.g. handed over
        by a gateway that took a Meshlium's place. `network` names where it came from."""
        route = WASPMOTE_ROUTE if transport == "http" else f"waspmote:{network[:64]}"
        src = source if source is not None else f"gateway:{network[:64]}"

        def work(att: _Attempt) -> Outcome:
            data = waspmote.from_hex(frame) if isinstance(frame, str) else bytes(frame)

            def key_for(serial: str) -> waspmote.WaspmoteKey | None:
                att.device = self._device("waspmote", serial, att)
                self._allowance(att.device, "Waspmote frames")
                secret = self._registry.legacy_secret(att.device.cred)
                if secret is None:
                    raise Rejected(RejectReason.POLICY_VIOLATION,
                                   f"node {serial} is registered for plain frames only")
                bits = json.loads(att.device.cred.options).get("aes_bits", 128)
                return waspmote.WaspmoteKey(secret, int(bits))

            wf = waspmote.open_frame(data, key_for, allow_plain=True)
            if not wf.encrypted:
                att.device = self._device("waspmote", wf.serial, att)
                if not self._allowance(att.device, "Waspmote frames").unsigned:
                    raise Rejected(RejectReason.POLICY_VIOLATION,
                                   f"plain frames not allowed by policy "
                                   f"{att.device.record.policy}")
                if att.device.cred.wrapped is not None:
                    raise Rejected(RejectReason.POLICY_VIOLATION,
                                   f"node {wf.serial} has an AES password but sent a plain frame")
            dev = att.device
            assert dev is not None
            doc: dict[str, Any] = {"format": "waspmote", "serial": wf.serial,
                                   "mote_id": wf.waspmote_id, "frame_seq": wf.seq,
                                   "mode": wf.mode, "frame_type": wf.frame_type,
                                   "encrypted": wf.encrypted, "aes_bits": wf.key_bits}
            if wf.mode == "ascii":
                doc["fields"] = [[f.tag, f.value] for f in wf.fields]
            else:
                doc["payload_hex"] = wf.payload.hex()
            level = "legacy:waspmote-aes-ecb" if wf.encrypted else "legacy:waspmote-plain"
            self._store_once(dev.cred.device_id, _sha256(data),
                             att.now_ms + self._wasp_window_ms, _payload(doc), level, route,
                             transport, att.now_ms, "identical frame received recently")
            return self._accepted("waspmote", dev, weak=True)

        return self._run("waspmote", work, transport=transport, source=src)

    # -- refusals made by an adapter before the format code ran ------------------------------

    def reject(self, fmt: str, reason: RejectReason, *, transport: str, source: str,
               detail: str = "") -> Outcome:
        """Audit a refusal the adapter made itself (oversize body, wrong content type)."""
        self._audit_refusal(fmt, reason, detail, None, transport, source, self._clock_ms())
        return Outcome(False, reason, None)

    # -- migration ---------------------------------------------------------------------------

    def sweep_migrations(self) -> int:
        """Finish every migration whose device has used its native keys; returns how many."""
        done = 0
        for cred in self._compat.legacy_in_state("migrating"):
            if self._registry.finish_migration_if_used(cred.device_id):
                done += 1
        with self._lock:
            self.stats.migrations_finished += done
        return done

    def migrating(self) -> list[str]:
        """Devices (24 hex) whose native keys were issued but not used yet."""
        return [c.device_id.hex() for c in self._compat.legacy_in_state("migrating")]

    def maybe_sweep(self) -> None:
        """`sweep_migrations`, at most once per `sweep_interval_ms` (adapters call it often)."""
        now = self._clock_ms()
        with self._lock:
            if now < self._next_sweep_ms:
                return
            self._next_sweep_ms = now + self._sweep_interval_ms
        try:
            self.sweep_migrations()
        except Exception:
            log.exception("migration sweep failed")

    # -- internals ---------------------------------------------------------------------------

    def _run(self, fmt: str, work: Callable[[_Attempt], Outcome], *, transport: str,
             source: str) -> Outcome:
        att = _Attempt(self._clock_ms())
        try:
            return work(att)
        except Rejected as exc:
            self._audit_refusal(fmt, exc.reason, exc.detail, att.device_hex, transport, source,
                                att.now_ms)
            return Outcome(False, exc.reason, att.device_hex)
        except IngestUnavailable:
            raise
        except Exception:
            # A bug or a failing keystore, never a verdict on the sender: logged with its
            # traceback, audited as an internal refusal, and the batch of one is refused.
            log.exception("internal error on a %s message from %s (%s)", fmt, source, transport)
            with self._lock:
                self.stats.internal_errors += 1
            self._audit_refusal(fmt, RejectReason.MALFORMED, "internal", att.device_hex,
                                transport, source, att.now_ms)
            return Outcome(False, RejectReason.MALFORMED, att.device_hex)

    def _device(self, kind: str, external_id: str, att: _Attempt) -> _Device:
        """The registered device behind a legacy id, or Rejected with why it may not send."""
        cred = self._compat.get_legacy(kind, external_id)
        if cred is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, f"no {kind} device {external_id[:40]}")
        att.claimed = cred.device_id.hex()
        record = self._registry.find(cred.device_id)
        if record is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, f"no device {cred.device_id}")
        if record.status is DeviceStatus.REVOKED:
            raise Rejected(RejectReason.REVOKED, "device revoked")
        if record.status is not DeviceStatus.ACTIVE:
            raise Rejected(RejectReason.SUSPENDED, "device suspended")
        if cred.state == "migrating" and self._registry.finish_migration_if_used(cred.device_id):
            with self._lock:
                self.stats.migrations_finished += 1
            cred = self._compat.get_legacy_of(cred.device_id) or cred
        if cred.state == "migrated":
            raise Rejected(RejectReason.POLICY_VIOLATION,
                           f"{kind} key disabled: the device migrated to the native envelope")
        policy = PRESETS.get(record.policy)
        if policy is None:
            raise Rejected(RejectReason.POLICY_VIOLATION, "device policy unknown to the server")
        return _Device(cred, record, policy)

    @staticmethod
    def _allowance(dev: _Device, what: str) -> LegacyAllowance:
        allowance = LEGACY_FORMATS.get(dev.record.policy)
        if allowance is None:
            raise Rejected(RejectReason.POLICY_VIOLATION,
                           f"{what} need a legacy policy (device has {dev.record.policy})")
        return allowance

    def _window(self, device_id: DeviceId) -> ReplayWindow:
        with self._lock:
            window = self._windows.get(device_id)
        if window is not None:
            return window
        fresh = ReplayWindow.resume(self._store.max_seq(device_id, LEGACY_EPOCH))
        with self._lock:
            if len(self._windows) >= MAX_WINDOWS:
                # The store's unique key stays the truth; an evicted window is rebuilt from it.
                self._windows.pop(next(iter(self._windows)))
            return self._windows.setdefault(device_id, fresh)

    def _record(self, row: TelemetryRow, events: list[AuditEvent] | None = None) -> bool:
        try:
            [stored] = self._store.record([row], events or [])
        except Exception as exc:
            log.exception("store write failed for a legacy message")
            raise IngestUnavailable("the store could not record the message") from exc
        return stored

    def _store_once(self, device_id: DeviceId, digest: bytes, expires_ms: int, payload: bytes,
                    level: str, route: str, transport: str, now_ms: int,
                    replay_detail: str) -> None:
        """Claim the digest, then store the row; release the claim if the write fails so that
        the sender's retry is not mistaken for a replay."""
        try:
            claimed = self._compat.claim_digest(device_id, digest, now_ms, expires_ms)
        except Exception as exc:
            log.exception("store could not claim a digest")
            raise IngestUnavailable("the store could not check for a replay") from exc
        if not claimed:
            raise Rejected(RejectReason.REPLAY, replay_detail)
        top = self._store.max_seq(device_id, LEGACY_EPOCH)
        seq = max(now_ms, -1 if top is None else top + 1)  # server-assigned, monotonic
        row = TelemetryRow(device_id, LEGACY_EPOCH, seq, now_ms, None, level, route, transport,
                           payload)
        try:
            stored = self._record(row)
        except BaseException:
            self._compat.release_digest(device_id, digest)
            raise
        if not stored:  # another worker took the same server-assigned seq this millisecond
            self._compat.release_digest(device_id, digest)
            raise Rejected(RejectReason.REPLAY, f"seq {seq} taken concurrently; retry")

    def _deliver_commands(self, dev: _Device, now_ms: int, transport: str,
                          source: str) -> bytes:
        """Pending hub commands as the reply body, marked delivered and audited (at most
        once: a reply lost on the way is not resent)."""
        try:
            commands = self._compat.take_commands(dev.cred.device_id, now_ms,
                                                  yoctopuce.MAX_COMMANDS)
        except Exception:
            log.exception("could not read the hub's pending commands")
            return b""
        valid: list[str] = []
        events: list[AuditEvent] = []
        hex_id = dev.cred.device_id.hex()
        for url in commands:
            try:
                yoctopuce.render_commands([url])
            except ConfigError:
                events.append(AuditEvent(now_ms, "yocto_command_dropped", transport, source,
                                         hex_id, "invalid command URL"))
                continue
            valid.append(url)
            events.append(AuditEvent(now_ms, "yocto_command_delivered", transport, source,
                                     hex_id, url[:200]))
        if events:
            try:
                self._store.add_events(events)
            except Exception:
                log.exception("could not audit %d hub command deliveries", len(events))
        with self._lock:
            self.stats.commands_delivered += len(valid)
        return yoctopuce.render_commands(valid)

    def _accepted(self, fmt: str, dev: _Device, *, weak: bool, reply: bytes = b"") -> Outcome:
        with self._lock:
            self.stats.accepted[fmt] += 1
            if weak:
                self.stats.weak_accepted[fmt] += 1
        return Outcome(True, None, dev.cred.device_id.hex(), reply, weak)

    def _audit_refusal(self, fmt: str, reason: RejectReason, detail: str,
                       device_hex: str | None, transport: str, source: str,
                       now_ms: int) -> None:
        with self._lock:
            self.stats.rejected[f"{fmt}:{reason.value}"] += 1
        event = AuditEvent(now_ms, reason.value, transport, source, device_hex,
                           f"{fmt}: {detail}"[:500])
        try:
            self._store.add_events([event])
        except Exception:
            log.exception("could not record a %s audit event", reason.value)
