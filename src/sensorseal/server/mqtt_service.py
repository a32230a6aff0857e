"""Everything MQTT that `sensorseal serve` runs: a broker (or a link to one), the ingest worker,
the service account, and the status watcher that carries revocations to the broker.

Two set-ups, chosen by `MqttOptions`:

    embedded (default)                         external (--mqtt-url mqtt[s]://host:port)
    amqtt in this process, on its own           Mosquitto or another MQTT 5 broker
    event-loop thread; logins and ACLs from     run by the operator; with --dynsec its clients
    the registry (RegistryAuth); a random       and roles are kept in step with the registry
    service password per run                    (Mosquitto dynamic security)
    one IngestWorker, MQTT 3.1.1, plain         one IngestWorker in the MQTT 5 shared
    `sensorseal/+/<kind>` subscription          subscription (more may join from elsewhere)

Both feed the same `Pipeline` as HTTP, so a message is judged the same whichever way it came.

Revocation across processes: `sensorseal device revoke` in another shell writes the registry and
an audit event, nothing else. The `StatusWatcher` here polls the audit log (indexed by reason
and time: a handful of cheap queries every 0.5 s, independent of fleet size and of rejection
floods) for the events that change a device's status or key epoch, and for each one
invalidates the pipeline's cache, then cuts the broker side: the embedded broker closes the
device's sessions (its logins are checked against the registry, so a reconnect is refused);
with dynsec the device's client is disabled or deleted, which makes Mosquitto kick it.

The server writes how to reach its broker (URL, service account, password, protocol) into
`<data>/mqtt-service.json`, mode 0600, for `sensorseal command` and `sensorseal rpc`; the file is
removed when the server stops. The password is never printed or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import broker_password
from sensorseal.mqtt.embedded import (
    SERVICE_USERNAME,
    BrokerAuth,
    EmbeddedBroker,
    RegistryAuth,
    registry_auth,
)
from sensorseal.mqtt.worker import IngestWorker
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import AuditEvent, DeviceRecord, DeviceStatus, Store

__all__ = [
    "CUT_SESSION_EVENTS",
    "DYNSEC_PASSWORD_ENV",
    "DYNSEC_USERNAME_ENV",
    "MQTT_PASSWORD_ENV",
    "SERVICE_FILE",
    "STATUS_EVENTS",
    "MqttOptions",
    "MqttService",
    "ServiceInfo",
    "StatusWatcher",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

SERVICE_FILE = "mqtt-service.json"
MQTT_PASSWORD_ENV = "SENSORSEAL_MQTT_PASSWORD"  # noqa: S105 (the variable's name)
DYNSEC_USERNAME_ENV = "SENSORSEAL_DYNSEC_USERNAME"
DYNSEC_PASSWORD_ENV = "SENSORSEAL_DYNSEC_PASSWORD"  # noqa: S105 (the variable's name)
DEFAULT_PORT, DEFAULT_TLS_PORT = 1883, 8883
# Audit reasons written by the registry (and the pipeline) when a device's status or current
# key epoch changes, or a device appears: what the broker side must follow.
STATUS_EVENTS = frozenset({
    "device_added", "device_suspended", "device_resumed", "device_revoked", "key_rotated",
    "key_renewal_confirmed", "legacy_migration_started", "legacy_migrated"})
# ... and those after which a live MQTT session must go: it logged in as an active device with
# the password of an epoch that is no longer current.
CUT_SESSION_EVENTS = frozenset({"device_suspended", "device_revoked", "key_rotated",
                                "key_renewal_confirmed"})


# --------------------------------------------------------------------------- options, URLs


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """`mqtt://host[:port]` or `mqtts://host[:port]` -> (tls, host, port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"not a broker URL: {url[:80]!r}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker URL must be mqtt://HOST:PORT or mqtts://HOST:PORT, got "
                          f"{url[:80]!r}")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
        raise ConfigError("put no credentials, path or query in the broker URL "
                          "(credentials: --mqtt-username and $SENSORSEAL_MQTT_PASSWORD)")
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)


def _url(tls: bool, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'mqtts' if tls else 'mqtt'}://{shown}:{port}"


@dataclass(frozen=True)
class MqttOptions:
    """How the server does MQTT. `url=None`: the embedded broker on `host:port` (0 = free).

    External broker: `url`, `ca` (required for mqtts://), the service account `username` and
    `password` (None: anonymous, or with `dynsec` a random one the server provisions), and
    `dynsec` with the admin's `dynsec_username`/`dynsec_password`.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    url: str | None = None
    ca: Path | None = None
    username: str = SERVICE_USERNAME
    password: str | None = field(default=None, repr=False)
    dynsec: bool = False
    dynsec_username: str | None = None
    dynsec_password: str | None = field(default=None, repr=False)
    watch_interval_s: float = 0.5

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **kw: Any) -> MqttOptions:
        """Options with the secrets taken from the environment (never from the command line,
        where `ps` would show them)."""
        return cls(password=env.get(MQTT_PASSWORD_ENV) or None,
                   dynsec_username=env.get(DYNSEC_USERNAME_ENV) or None,
                   dynsec_password=env.get(DYNSEC_PASSWORD_ENV) or None, **kw)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("the MQTT port must be between 0 and 65535")
        if self.url is None:
            if self.dynsec or self.ca is not None:
                raise ConfigError("--dynsec and --mqtt-ca need an external broker (--mqtt-url)")
            return
        tls, _, _ = parse_broker_url(self.url)
        if tls and self.ca is None:
            raise ConfigError("an mqtts:// broker needs --mqtt-ca (the CA that signed it)")
        if not tls and self.ca is not None:
            raise ConfigError("--mqtt-ca is for mqtts:// URLs")
        if self.dynsec and not (self.dynsec_username and self.dynsec_password):
            raise ConfigError(f"--dynsec needs ${DYNSEC_USERNAME_ENV} and "
                              f"${DYNSEC_PASSWORD_ENV} (the dynsec admin)")


# --------------------------------------------------------------------------- the service file


@dataclass(frozen=True)
class ServiceInfo:
    """How to reach the running server's broker as its service account (for the CLI)."""

    url: str
    username: str
    password: str | None = field(repr=False)
    ca: str | None
    mqtt311: bool  # the broker speaks MQTT 3.1.1 only (embedded)
    pid: int

    @property
    def endpoint(self) -> tuple[bool, str, int]:
        return parse_broker_url(self.url)

    def write(self, path: Path) -> None:
        """Atomically, created 0600 (it holds a password)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), 0o600)
                json.dump({"url": self.url, "username": self.username,
                           "password": self.password, "ca": self.ca,
                           "protocol": "3.1.1" if self.mqtt311 else "5", "pid": self.pid}, fh)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    @classmethod
    def read(cls, path: Path) -> ServiceInfo | None:
        """The running server's broker, or None when no server is running (no file, or the
        process that wrote it has gone)."""
        try:
            doc = json.loads(path.read_text())
            info = cls(str(doc["url"]), str(doc["username"]),
                       None if doc.get("password") is None else str(doc["password"]),
                       None if doc.get("ca") is None else str(doc["ca"]),
                       doc.get("protocol") == "3.1.1", int(doc["pid"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is unreadable or damaged") from None
        return info if _alive(info.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- MQTT 3.1.1 bridge


# --------------------------------------------------------------------------- status watcher


class StatusWatcher:
    """Polls the audit log for status/epoch changes made by any process; calls `on_change`.

    Each poll reads the events of `STATUS_EVENTS` since the previous poll minus an overlap (an
    event is timestamped before its transaction commits, and clocks of processes on one host
    agree only roughly); events already handled are remembered for the overlap, so each one is
    acted on once. `on_change(device_id, record, reasons)` gets the device's current record
    and the reasons of its new events.
    """

    OVERLAP_MS = 5_000

    def __init__(self, store: Store,
                 on_change: Callable[[DeviceId, DeviceRecord | None, frozenset[str]], None],
                 *, interval_s: float = 0.5, reasons: Iterable[str] = STATUS_EVENTS,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._store = store
        self._on_change = on_change
        self._interval = interval_s
        self._reasons = sorted(reasons)
        self._clock_ms = clock_ms
        self._since = clock_ms()
        self._seen: dict[AuditEvent, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changes = 0

    def poll(self) -> list[DeviceId]:
        """One round: the devices whose change was handled now."""
        started = self._clock_ms()
        since = self._since - self.OVERLAP_MS
        fresh: list[AuditEvent] = []
        for reason in self._reasons:
            fresh += [e for e in self._store.events(reason=reason, since_ms=since, limit=10_000)
                      if e not in self._seen and e.device_id]
        self._since = started
        for e in list(self._seen):
            if self._seen[e] < since:
                del self._seen[e]
        by_device: dict[DeviceId, set[str]] = {}
        for event in sorted(fresh, key=lambda e: e.at_ms):
            self._seen[event] = event.at_ms
            try:
                device_id = DeviceId.parse(str(event.device_id))
            except ConfigError:
                continue
            by_device.setdefault(device_id, set()).add(event.reason)
        for device_id, reasons in by_device.items():
            try:
                self._on_change(device_id, self._store.get_device(device_id),
                                frozenset(reasons))
            except Exception:  # the next change must still get through
                log.exception("status watcher: could not apply a change of %s", device_id)
        self.changes += len(by_device)
        return list(by_device)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:
                log.exception("status watcher: poll failed; retrying")

    def start(self) -> StatusWatcher:
        self._thread = threading.Thread(target=self._run, name="mqtt-status-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# --------------------------------------------------------------------------- the service


class _BrokerThread:
    """The embedded broker on an event loop of its own, so HTTP and MQTT do not share one."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mqtt-broker",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.broker.start(), self._loop).result(30)
        except BaseException:
            self.stop()
            raise

    def disconnect_user(self, username: str) -> int:
        return asyncio.run_coroutine_threadsafe(self.broker.disconnect_user(username),
                                                self._loop).result(10)

    def stop(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.broker.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()


def _check_free(host: str, port: int) -> None:
    """Say clearly that the MQTT port is taken (amqtt only logs a traceback)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = (" (another broker runs there?); pick a free one with --mqtt-port 0, or "
                    "use that broker with --mqtt-url, or turn MQTT off with --no-mqtt")
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"MQTT port {host}:{port} is already in use{hint}") from None
            raise ConfigError(f"cannot listen for MQTT on {host}:{port}: {exc.strerror}") \
                from None


class MqttService:
    """Broker (or link to one), ingest worker, status watcher. `start()`, then `stop()`."""

    def __init__(self, options: MqttOptions, *, registry: Registry, pipeline: Pipeline,
                 store: Store, data_dir: Path) -> None:
        self.options = options
        self._registry = registry
        self._pipeline = pipeline
        self._store = store
        self._service_file = Path(data_dir) / SERVICE_FILE
        self._broker: _BrokerThread | None = None
        self._dynsec: Any = None  # DynsecAdmin when --dynsec
        self.worker: IngestWorker | None = None
        self.watcher: StatusWatcher | None = None
        self.auth: RegistryAuth | None = None
        self.url = ""
        self._username = options.username
        self._password = options.password
        self._wrote_file = False

    @property
    def endpoint(self) -> tuple[bool, str, int]:
        """(tls, host, port) of the broker, once started."""
        return parse_broker_url(self.url)

    def service_account(self) -> tuple[str, str | None]:
        """(username, password) of the service account, for in-process callers (the demo's
        command and RPC senders). Never log the password."""
        return self._username, self._password

    # -- what the HTTP app mounts for other brokers

    def broker_auth(self) -> BrokerAuth | None:
        """HTTP auth rules for an external broker (EMQX, mosquitto-go-auth ...): device logins
        from the registry, the service account with this server's credentials. None for the
        embedded broker, which asks the registry itself (no endpoint to expose)."""
        if self.options.url is None:
            return None
        if self.auth is None:
            self.auth = registry_auth(self._registry, service_username=self._username,
                                      service_password=self._password or secrets.token_urlsafe(32))
        return self.auth.as_broker_auth()

    # -- lifecycle

    def start(self) -> MqttService:
        try:
            if self.options.url is None:
                self._start_embedded()
            else:
                self._start_external()
            self._start_worker()
            self.watcher = StatusWatcher(self._store, self._apply,
                                         interval_s=self.options.watch_interval_s).start()
            ServiceInfo(self.url, self._username, self._password,
                        None if self.options.ca is None else str(self.options.ca.resolve()),
                        self.options.url is None, os.getpid()).write(self._service_file)
            self._wrote_file = True
        except BaseException:
            self.stop()
            raise
        return self

    def _start_embedded(self) -> None:
        opts = self.options
        _check_free(opts.host, opts.port)
        self._password = secrets.token_urlsafe(32)  # per run; never shown
        self.auth = registry_auth(self._registry, service_username=self._username,
                                  service_password=self._password)
        broker = EmbeddedBroker(self.auth.as_broker_auth(), host=opts.host, port=opts.port)
        self._broker = _BrokerThread(broker)
        try:
            self._broker.start()
        except Exception as exc:
            self._broker = None
            raise ConfigError(f"the embedded MQTT broker could not start on "
                              f"{opts.host}:{opts.port}: {exc}") from None
        self.url = _url(False, opts.host, broker.port)

    def _start_external(self) -> None:
        assert self.options.url is not None
        tls, host, port = parse_broker_url(self.options.url)
        self.url = _url(tls, host, port)
        if not self.options.dynsec:
            return
        from sensorseal.mqtt.dynsec import DynsecAdmin

        assert self.options.dynsec_username and self.options.dynsec_password
        if self._password is None:
            self._password = secrets.token_urlsafe(32)
        self._dynsec = DynsecAdmin(host, port, self.options.dynsec_username,
                                   self.options.dynsec_password, ca_cert=self.options.ca)
        self._dynsec.connect()
        self._dynsec.ensure_service_account(self._username, self._password)
        synced = 0
        offset = 0
        while True:
            page = self._store.list_devices(limit=1000, offset=offset)
            for record in page:
                synced += self._sync(record.device_id, record)
            if len(page) < 1000:
                break
            offset += len(page)
        log.info("dynsec: %d devices in step with the registry", synced)

    def _start_worker(self) -> None:
        _, host, port = parse_broker_url(self.url)
        embedded = self.options.url is None
        self.worker = IngestWorker(
            self._pipeline, host, port, username=self._username, password=self._password,
            tls_ca=None if self.options.ca is None else str(self.options.ca),
            shared=not embedded, client_id=f"{self._username}-{os.getpid()}")
        try:
            self.worker.start(wait_s=10.0)
        except OSError as exc:
            raise ConfigError(f"cannot reach the MQTT broker at {self.url}: "
                              f"{exc.strerror or exc}") from None
        if not self.worker.wait_subscribed(0.1):
            raise ConfigError(f"the MQTT broker at {self.url} refused the service account "
                              f"{self._username!r} (credentials, ACL or MQTT 5 support)")

    def stop(self) -> None:
        if self._wrote_file:
            with contextlib.suppress(OSError):
                self._service_file.unlink()
            self._wrote_file = False
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            with contextlib.suppress(Exception):
                self.worker.stop()
            self.worker = None
        if self._dynsec is not None:
            with contextlib.suppress(Exception):
                self._dynsec.close()
            self._dynsec = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> MqttService:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- changes

    def _sync(self, device_id: DeviceId, record: DeviceRecord | None) -> int:
        """Mirror one device into dynsec; 0 if it has no MQTT identity (a legacy device)."""
        if record is None:
            return 0
        password = None
        if record.status is not DeviceStatus.REVOKED:
            secret = self._registry.root_secret(device_id, record.epoch)
            if secret is None:
                return 0
            password = broker_password(secret, device_id, record.epoch)
        self._dynsec.sync_device(device_id, record.status.value, password)
        return 1

    def _apply(self, device_id: DeviceId, record: DeviceRecord | None,
               reasons: frozenset[str]) -> None:
        """A device changed (any process): forget the cached state, then cut or update the
        broker side."""
        self._pipeline.invalidate(device_id)
        if self._dynsec is not None:
            self._sync(device_id, record)  # suspended/revoked/new password: Mosquitto kicks
        if self._broker is not None and (reasons & CUT_SESSION_EVENTS or record is None
                                         or record.status is not DeviceStatus.ACTIVE):
            # Logins are checked against the registry; a live session must be closed so that
            # the device has to log in again (refused unless active with its current key).
            closed = self._broker.disconnect_user(device_id.hex())
            if closed:
                log.info("mqtt: closed %d session(s) of %s after a status/key change", closed,
                         device_id)
