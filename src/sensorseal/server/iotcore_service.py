"""Cloud IoT Core devices in `sensorseal serve`: a TLS-only amqtt listener, the HTTP bridge,
telemetry into the store, configs from the store.

`sensorseal.compat.gcp_iot` decides (JWT, topics) and `sensorseal.compat.gcp_bridge` keeps the
per-connection state; this module backs them with the store and runs them:

* `StoreKeyRegistry` — the `PublicKeyRegistry` the JWT check asks: a device's registered public
  keys (migration 0007), refused outright when the device is suspended or revoked.
* `StoreConfigService` — "latest config per device" in the store, so `sensorseal iotcore config`
  from another process and the HTTP bridge see the same versions.
* `IotCoreIngest` — events and state become `TelemetryRow`s of level `iotcore-jwt`. These
  payloads carry no MAC of their own (TLS and the session JWT are all that protects them), so
  the replay rules are the MQTT packet's: each PUBLISH the broker hands over is one row with a
  server-assigned sequence number (QoS 1 is at least once: a retransmission the broker passes
  on is stored again, as Cloud IoT Core delivered it again). A device registered with a counter
  field must put that integer in every event and state JSON object; it then goes through a
  replay window and the store's unique key like a native sequence number. Policy: only a
  device whose policy admits legacy formats (`legacy`, `legacy-unsigned`) may send this way.
  Every refusal is an audit event (transport `mqtt-gcp` / `http-gcp`).
* `IotCoreService` — one amqtt broker of its own (the plugin applies broker-wide, so it must not
  share a broker with native devices), TLS only, plus a task that publishes each new config
  retained (QoS 1) on `/devices/{id}/config`: a subscriber gets the latest one at once.

Store calls run on the broker's event loop (amqtt calls the plugin there); each is one short
SQLite statement. Blocking I/O never happens while holding a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from amqtt.broker import Broker
from starlette.routing import BaseRoute, Route

from sensorseal.compat import gcp_bridge, gcp_iot
from sensorseal.compat._json import loads_bounded
from sensorseal.compat.gcp_bridge import ConfigService, GcpMessage, IotCoreGate
from sensorseal.compat.gcp_iot import DeviceKey, DevicePath, PublicKey
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.core.replay import ReplayWindow
from sensorseal.registry import LEGACY_EPOCH, Registry
from sensorseal.server.compat_ingest import LEGACY_FORMATS
from sensorseal.server.eva_service import EvaOptions, EvaService
from sensorseal.store.base import (
    AuditEvent,
    DeviceStatus,
    IotCoreDevice,
    IotCoreStore,
    Store,
    TelemetryRow,
)

__all__ = [
    "IOTCORE_EPOCH",
    "LEVEL",
    "DropInEndpoints",
    "IngestStats",
    "IotCoreIngest",
    "IotCoreOptions",
    "IotCoreService",
    "StoreConfigService",
    "StoreKeyRegistry",
]

log = logging.getLogger(__name__)

LEVEL: Final = "iotcore-jwt"
IOTCORE_EPOCH: Final = LEGACY_EPOCH  # IoT Core devices have no native key epoch
MAX_BINDINGS: Final = 100_000
MAX_COUNTER: Final = 2**62


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def iot_store(store: Store) -> IotCoreStore:
    if not hasattr(store, "iotcore_device"):
        raise ConfigError("this store back end has no Cloud IoT Core support (migration 7)")
    return cast(IotCoreStore, store)


@functools.lru_cache(maxsize=4096)
def _public_key(pem: str) -> PublicKey:
    return gcp_iot.load_public_key(pem)


class StoreKeyRegistry:
    """Device name -> registered keys, from the store. Bindings (name -> device id) never
    change once made, so found ones are cached; keys and status are read on every call."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._iot = iot_store(store)
        self._bindings: dict[str, IotCoreDevice] = {}
        self._lock = threading.Lock()

    def binding(self, device: DevicePath) -> IotCoreDevice | None:
        name = str(device)
        with self._lock:
            found = self._bindings.get(name)
        if found is not None:
            return found
        found = self._iot.iotcore_device(name)
        if found is not None:
            with self._lock:
                if len(self._bindings) >= MAX_BINDINGS:
                    self._bindings.pop(next(iter(self._bindings)))
                self._bindings[name] = found
        return found

    def keys_for(self, device: DevicePath) -> Sequence[DeviceKey] | None:
        binding = self.binding(device)
        record = None if binding is None else self._store.get_device(binding.device_id)
        if binding is None or record is None:
            return None
        if record.status is DeviceStatus.REVOKED:
            raise Rejected(RejectReason.REVOKED, "device revoked")
        if record.status is not DeviceStatus.ACTIVE:
            raise Rejected(RejectReason.SUSPENDED, "device suspended")
        keys: list[DeviceKey] = []
        for row in self._iot.iotcore_keys(binding.device_id):
            try:
                public = _public_key(row.pem)
            except ConfigError:
                log.warning("IoT Core key #%d of %s is unusable; skipped", row.key_id,
                            binding.device_id)
                continue
            keys.append(DeviceKey(public, None if row.expires_ms is None
                                  else row.expires_ms / 1000))
        return keys


class StoreConfigService(ConfigService):
    """Configs in the store (versions shared by every process); last states in memory."""

    def __init__(self, store: Store, keys: StoreKeyRegistry,
                 clock_ms: Callable[[], int] = _wall_ms) -> None:
        super().__init__()
        self._iot = iot_store(store)
        self._keys = keys
        self._clock_ms = clock_ms

    def set_config(self, device: DevicePath, data: bytes) -> int:
        if len(data) > gcp_bridge.MAX_CONFIG:
            raise ConfigError(f"config over {gcp_bridge.MAX_CONFIG} bytes")
        binding = self._keys.binding(device)
        if binding is None:
            raise ConfigError(f"no Cloud IoT Core device {device}")
        return self._iot.put_iotcore_config(binding.device_id, bytes(data), self._clock_ms())

    def latest(self, device: DevicePath) -> tuple[int, bytes] | None:
        binding = self._keys.binding(device)
        row = None if binding is None else self._iot.iotcore_config(binding.device_id)
        return None if row is None else (row.version, row.data)


@dataclass(slots=True)
class IngestStats:
    accepted: int = 0
    rejected: int = 0
    store_errors: int = 0


def _route(msg: GcpMessage) -> str:
    sub = f"/{msg.subfolder}" if msg.subfolder else ""
    return f"/devices/{msg.device.device}/{msg.kind.value}{sub}"


def _counter(payload: bytes, name: str) -> int:
    doc = loads_bounded(payload, max_size=gcp_bridge.MAX_TELEMETRY, max_depth=8)
    value = doc.get(name) if isinstance(doc, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNTER:
        raise Rejected(RejectReason.MALFORMED, f"no integer counter field {name!r}")
    return value


class IotCoreIngest:
    """The `telemetry` callable of the gate: one GcpMessage -> one stored row, or an audited
    refusal (module docstring). Thread-safe."""

    def __init__(self, store: Store, keys: StoreKeyRegistry, *,
                 clock_ms: Callable[[], int] = _wall_ms, window_size: int = 64) -> None:
        self._store = store
        self._keys = keys
        self._clock_ms = clock_ms
        self._window_size = window_size
        self._windows: dict[DeviceId, ReplayWindow] = {}
        self._lock = threading.Lock()
        self.stats = IngestStats()

    def __call__(self, msg: GcpMessage) -> None:
        now_ms = self._clock_ms()
        transport = f"{msg.transport}-gcp"
        source = f"gateway {msg.via_gateway}" if msg.via_gateway else msg.transport
        try:
            self._ingest(msg, now_ms, transport)
        except Rejected as exc:
            with self._lock:
                self.stats.rejected += 1
            self._audit(AuditEvent(now_ms, exc.reason.value, transport, source, str(msg.device),
                                   exc.detail[:500]))
        except Exception:
            with self._lock:
                self.stats.store_errors += 1
            log.exception("could not store an IoT Core %s of %s", msg.kind.value,
                          msg.device.device)
            if msg.transport == "http":
                raise  # the bridge answers 500: the device retries

    def _ingest(self, msg: GcpMessage, now_ms: int, transport: str) -> None:
        binding = self._keys.binding(msg.device)
        record = None if binding is None else self._store.get_device(binding.device_id)
        if binding is None or record is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, f"device {msg.device.device}")
        if record.status is not DeviceStatus.ACTIVE:
            reason = (RejectReason.REVOKED if record.status is DeviceStatus.REVOKED
                      else RejectReason.SUSPENDED)
            raise Rejected(reason, f"device {record.status.value}")
        if record.policy not in LEGACY_FORMATS:
            raise Rejected(RejectReason.POLICY_VIOLATION,
                           f"IoT Core messages need a legacy policy (device has {record.policy})")
        device_id = binding.device_id
        if binding.counter_field is None:
            self._store_assigned(device_id, msg, now_ms, transport)
            return
        seq = _counter(msg.payload, binding.counter_field)
        window = self._window(device_id)
        with self._lock:
            window.check(seq)
        row = TelemetryRow(device_id, IOTCORE_EPOCH, seq, now_ms, None, LEVEL, _route(msg),
                           transport, msg.payload)
        [stored] = self._store.record([row])
        if not stored:
            raise Rejected(RejectReason.REPLAY, f"counter {seq} already stored")
        with self._lock:
            window.strike(seq)
            self.stats.accepted += 1

    def _store_assigned(self, device_id: DeviceId, msg: GcpMessage, now_ms: int,
                        transport: str) -> None:
        """One row per PUBLISH, seq = max(now in ms, highest + 1): monotonic per device."""
        for _ in range(3):
            top = self._store.max_seq(device_id, IOTCORE_EPOCH)
            seq = max(now_ms, -1 if top is None else top + 1)
            row = TelemetryRow(device_id, IOTCORE_EPOCH, seq, now_ms, None, LEVEL, _route(msg),
                               transport, msg.payload)
            if self._store.record([row])[0]:
                with self._lock:
                    self.stats.accepted += 1
                return
        raise RuntimeError("sequence numbers keep colliding (another writer?)")

    def _window(self, device_id: DeviceId) -> ReplayWindow:
        with self._lock:
            window = self._windows.get(device_id)
        if window is not None:
            return window
        fresh = ReplayWindow.resume(self._store.max_seq(device_id, IOTCORE_EPOCH),
                                    self._window_size)
        with self._lock:
            if len(self._windows) >= MAX_BINDINGS:
                self._windows.pop(next(iter(self._windows)))
            return self._windows.setdefault(device_id, fresh)

    def _audit(self, event: AuditEvent) -> None:
        try:
            self._store.add_events([event])
        except Exception:
            log.exception("could not record an IoT Core audit event (%s)", event.reason)


@dataclass(frozen=True, slots=True)
class IotCoreOptions:
    """`--iotcore-port` and its TLS files (TLS only: Cloud IoT Core devices verify the CA)."""

    port: int
    certfile: Path
    keyfile: Path
    host: str = "127.0.0.1"
    check_interval_s: float = 1.0  # how soon after `exp` a session is closed
    config_poll_s: float = 0.5  # how soon a config set from another process is delivered


_QUIET = (ConnectionResetError, BrokenPipeError, ssl.SSLError)


def _quiet_resets(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """amqtt reports a client that hangs up after a refused CONNACK as an unhandled error in
    `client_connected_cb`; that is a device's normal behaviour: log it at debug level."""
    if isinstance(context.get("exception"), _QUIET):
        log.debug("IoT Core listener: %s (%s)", context.get("message"),
                  type(context["exception"]).__name__)
        return
    loop.default_exception_handler(context)


@dataclass(eq=False)
class IotCoreService:
    """The gate, its HTTP bridge routes, and (once started) its own amqtt TLS listener, which
    runs on an event loop thread of its own: the server's loop may stop abruptly (SIGTERM)
    without cutting the broker's tasks short, and `stop()` shuts it down in order."""

    store: Store
    options: IotCoreOptions
    clock: Callable[[], float] = time.time
    keys: StoreKeyRegistry = field(init=False)
    ingest: IotCoreIngest = field(init=False)
    gate: IotCoreGate = field(init=False)
    port: int = field(init=False, default=0)
    _name: str = field(init=False, default="")
    _broker: Broker | None = field(init=False, default=None)
    _poller: asyncio.Task[None] | None = field(init=False, default=None)
    _config_change: int = field(init=False, default=0)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)
    _thread: threading.Thread | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        for path in (self.options.certfile, self.options.keyfile):
            if not Path(path).is_file():
                raise ConfigError(f"IoT Core TLS file {path} not found")
        self.keys = StoreKeyRegistry(self.store)
        self.ingest = IotCoreIngest(self.store, self.keys)
        self.gate = IotCoreGate(self.keys, clock=self.clock, audit=self._audit,
                                telemetry=self.ingest,
                                configs=StoreConfigService(self.store, self.keys))
        self._name = f"sensorseal-iotcore-{secrets.token_hex(6)}"

    def _audit(self, event: AuditEvent) -> None:
        try:
            self.store.add_events([event])
        except Exception:
            log.exception("could not record an IoT Core audit event (%s)", event.reason)

    def http_routes(self) -> list[Route]:
        """The HTTP bridge (`/v1/projects/.../devices/{d}:publishEvent` ...) for the main app."""
        return gcp_bridge.http_routes(self.gate)

    # -- lifecycle (blocking; any thread) --------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> int:
        """Start the listener on its own loop thread; returns the port it listens on."""
        if self._thread is not None:
            raise ConfigError("the IoT Core listener is already running")
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_resets)
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="iotcore-broker",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout_s)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"the IoT Core listener could not start on "
                              f"{self.options.host}:{self.options.port}: {exc}") from None
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout_s)
        except Exception:
            log.exception("IoT Core listener did not stop cleanly")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
            if not thread.is_alive():
                loop.close()

    def call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        """Run a coroutine on the listener's loop (e.g. `deliver_configs()`) and wait."""
        if self._loop is None:
            raise ConfigError("the IoT Core listener is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # -- on the listener's loop ------------------------------------------------------------

    async def _start(self) -> None:
        gcp_bridge.register_gate(self._name, self.gate)
        opts = self.options
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{opts.host}:{opts.port}",
                                      "ssl": True, "certfile": str(opts.certfile),
                                      "keyfile": str(opts.keyfile)}},
            "plugins": {"sensorseal.compat.gcp_bridge.IotCoreBrokerPlugin":
                        {"gate": self._name, "check_interval_s": opts.check_interval_s}},
        }
        broker = Broker(config)
        await broker.start()
        self._broker = broker
        server = broker._servers["default"].instance  # amqtt has no public accessor
        for sock in getattr(server, "sockets", None) or ():
            self.port = int(sock.getsockname()[1])
            break
        await self.deliver_configs()  # every stored config retained before anyone subscribes
        self._poller = asyncio.create_task(self._poll_configs())

    async def deliver_configs(self) -> int:
        """Publish (retained, QoS 1) every config written since the last call; how many."""
        plugin = gcp_bridge.IotCoreBrokerPlugin.instances.get(self._name)
        if plugin is None:
            return 0
        iot = iot_store(self.store)
        rows = await asyncio.to_thread(iot.iotcore_configs_after, self._config_change)
        for row in rows:
            binding = await asyncio.to_thread(iot.iotcore_device_of, row.device_id)
            self._config_change = row.change_id
            if binding is None:
                continue
            topic = f"/devices/{binding.short_name}/config"
            await plugin.context.retain_message(topic, row.data, 1)
            await plugin.context.broadcast_message(topic, row.data, 1)
        return len(rows)

    async def _poll_configs(self) -> None:
        while True:
            await asyncio.sleep(self.options.config_poll_s)
            try:
                await self.deliver_configs()
            except Exception:
                log.exception("IoT Core config delivery failed; retrying")

    async def _stop(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        broker, self._broker = self._broker, None
        if broker is not None:
            plugin = gcp_bridge.IotCoreBrokerPlugin.instances.pop(self._name, None)
            if plugin is not None:
                await plugin.close()
            await broker.shutdown()


class DropInEndpoints:
    """What `sensorseal serve` runs for `--iotcore-port` and `--eva-*`: routes for the HTTP
    app, then `start()` (returns lines to print) and `stop()`. Blocking; each part runs on
    threads of its own."""

    def __init__(self, registry: Registry, store: Store, *, iotcore: IotCoreOptions | None,
                 eva: EvaOptions | None) -> None:
        self.iotcore = None if iotcore is None else IotCoreService(store, iotcore)
        self.eva = None if eva is None else EvaService(registry, store, eva)

    @property
    def routes(self) -> list[BaseRoute]:
        return [] if self.iotcore is None else list(self.iotcore.http_routes())

    def start(self) -> list[str]:
        notes: list[str] = []
        try:
            if self.iotcore is not None:
                port = self.iotcore.start()
                host = self.iotcore.options.host
                shown = f"[{host}]" if ":" in host else host
                notes.append(f"sensorseal: Cloud IoT Core MQTT on mqtts://{shown}:{port}")
            if self.eva is not None:
                self.eva.start()
                notes.append(f"sensorseal: EVA ICS API on {self.eva.request_topic}")
        except BaseException:
            self.stop()
            raise
        return notes

    def stop(self) -> None:
        if self.eva is not None:
            self.eva.stop()
        if self.iotcore is not None:
            self.iotcore.stop()
