"""Cloud -> device commands over MQTT, sealed with the device's downlink keys.

    cloud                                   broker (hostile)                 device
    seal_down(CBOR {cmd, body}) ----------> sensorseal/<id>/commands ------> open_downlink
                                                                              run handler
    open_up(ack) <------------------------- sensorseal/<id>/acks <---------- seal(CBOR {cmd, ok,
                                                                              result|error})

Commands are always level `sealed` (COSE_Encrypt0): a broker sees neither what is commanded nor
the answer. Each downlink envelope spends one number of a server-side counter per (device,
epoch): the AEAD nonce is derived from it, so it must never repeat, across restarts and across
processes. `DownlinkCounter` keeps it in a small SQLite file of its own (under the data dir) and
reserves numbers in blocks with an atomic update, so two senders never share a number. (The
store interface has no atomic increment yet; see the lead's notes.)

The command id (`cmd`, 16 random bytes in hex) is inside the sealed body, so the ack is matched
to its command without the broker learning anything; the ack's route (the acks topic) and its
key bind it to the device. A forged, replayed or misrouted ack is rejected and counted (and
audited when a store is given); it never completes a command.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import Opened, seal, unseal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import KeyContext, derive
from sensorseal.core.policy import PRESETS
from sensorseal.core.replay import MAX_SEQ
from sensorseal.mqtt import topics
from sensorseal.store.base import AuditEvent, DeviceRecord, DeviceStatus, Store

__all__ = [
    "Ack",
    "CloudLink",
    "CommandSender",
    "CommandTimeout",
    "DeviceDirectory",
    "DownlinkCounter",
    "MqttSession",
    "set_nodelay",
]

log = logging.getLogger(__name__)

COUNTER_FILE = "downlink-counters.db"
_BLOCK = 64


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle on the client's socket (paho does not). Without it a small PUBLISH that
    follows a PUBACK waits for the peer's delayed ACK: about 40 ms per hop on Linux."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # also ssl.SSLSocket; not a websocket wrapper
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DeviceDirectory(Protocol):
    """What the cloud side needs from the registry (sensorseal.registry.Registry has it)."""

    def find(self, device_id: DeviceId) -> DeviceRecord | None: ...

    def root_secret(self, device_id: DeviceId, epoch: int) -> bytes | None: ...


class DownlinkCounter:
    """Server-side downlink sequence numbers per (device, epoch), persisted, never repeated.

    Numbers are reserved `block` at a time with one atomic UPDATE ... RETURNING in a durable
    (synchronous=FULL) transaction; a crash loses at most the rest of a block, never reuses one.
    Thread-safe; several processes may share the file.
    """

    def __init__(self, path: str | Path, *, block: int = _BLOCK) -> None:
        if block < 1:
            raise ConfigError("block must be at least 1")
        self._block = block
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS downlink_seq (device_id BLOB NOT NULL, "
                         "epoch INTEGER NOT NULL, next_unreserved INTEGER NOT NULL, "
                         "PRIMARY KEY (device_id, epoch)) WITHOUT ROWID")
        self._ranges: dict[tuple[bytes, int], tuple[int, int]] = {}  # key -> (next, limit)

    def next(self, device_id: DeviceId, epoch: int) -> int:
        key = (bytes(device_id), epoch)
        with self._lock:
            nxt, limit = self._ranges.get(key, (0, 0))
            if nxt >= limit:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute(
                        "INSERT INTO downlink_seq (device_id, epoch, next_unreserved) "
                        "VALUES (?, ?, 1 + ?) ON CONFLICT (device_id, epoch) DO UPDATE "
                        "SET next_unreserved = next_unreserved + ? RETURNING next_unreserved",
                        (key[0], epoch, self._block, self._block)).fetchone()
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                limit = int(row[0])
                nxt = limit - self._block
            if nxt > MAX_SEQ:
                raise ConfigError("downlink counter exhausted for this epoch; renew the keys")
            self._ranges[key] = (nxt + 1, limit)
            return nxt

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(slots=True, eq=False)
class _DeviceKeys:
    epoch: int
    down: KeyContext
    up: SecurityContext  # private window: replies seen by this process


class CloudLink:
    """The cloud end of a device's downlink: seals for it, opens its replies. Thread-safe."""

    def __init__(self, directory: DeviceDirectory, counter: DownlinkCounter, *,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self._directory = directory
        self._counter = counter
        self._clock_ms = clock_ms
        self._keys: dict[DeviceId, _DeviceKeys] = {}
        self._lock = threading.Lock()

    def _for(self, device_id: DeviceId, epoch: int | None = None) -> _DeviceKeys:
        record = self._directory.find(device_id)
        if record is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, "no such device")
        if record.status is DeviceStatus.REVOKED:
            raise Rejected(RejectReason.REVOKED, "device revoked")
        if record.status is DeviceStatus.SUSPENDED:
            raise Rejected(RejectReason.SUSPENDED, "device suspended")
        epoch = record.epoch if epoch is None else epoch
        with self._lock:
            keys = self._keys.get(device_id)
            if keys is not None and keys.epoch == epoch:
                return keys
        secret = self._directory.root_secret(device_id, epoch)
        if secret is None:
            raise Rejected(RejectReason.UNKNOWN_EPOCH, f"no key for epoch {epoch}")
        policy = PRESETS.get(record.policy, PRESETS["standard"])
        keys = _DeviceKeys(epoch, derive(secret, device_id, epoch, Direction.DOWN),
                           SecurityContext.from_secret(secret, device_id, epoch, Direction.UP,
                                                       policy))
        with self._lock:
            if epoch == record.epoch:  # replace, never keep: the epoch may have moved on
                self._keys[device_id] = keys
            return keys

    def seal_down(self, device_id: DeviceId, body: bytes, route: str) -> bytes:
        """Seal `body` for the device's current epoch (level sealed, next downlink number).

        Raises ConfigError for a device that cannot receive (unknown, suspended, revoked).
        """
        try:
            keys = self._for(device_id)
        except Rejected as exc:
            raise ConfigError(f"cannot send to device {device_id}: {exc.reason.value}") from None
        seq = self._counter.next(device_id, keys.epoch)
        return seal(body, keys=keys.down, seq=seq, route=route, timestamp_ms=self._clock_ms(),
                    level=Level.SEALED)

    def open_up(self, device_id: DeviceId, data: bytes, route: str) -> Opened:
        """Open a device's reply (ack, RPC response) or raise Rejected. Replies must be sealed."""
        def contexts(kid: DeviceId, epoch: int) -> SecurityContext:
            if kid != device_id:
                raise Rejected(RejectReason.MALFORMED, "reply kid differs from its topic")
            return self._for(kid, epoch).up

        opened = unseal(data, route=route, contexts=contexts, now_ms=self._clock_ms())
        if opened.level is not Level.SEALED:
            raise Rejected(RejectReason.POLICY_VIOLATION, "replies must be sealed")
        return opened


class MqttSession:
    """One paho MQTT 5 connection of a cloud-side service, subscribed to fixed filters.

    Messages are handed to `on_message(topic, payload)` on paho's network thread; handlers here
    only verify and complete futures (microseconds), so they do not hold the loop up.
    """

    def __init__(self, host: str, port: int, filters: Sequence[str],
                 on_message: Callable[[str, bytes], None], *, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None,
                 client_id: str | None = None, keepalive_s: int = 30,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        if protocol not in (mqtt.MQTTv5, mqtt.MQTTv311):
            raise ConfigError("protocol is mqtt.MQTTv5 or mqtt.MQTTv311")
        self.host, self.port = host, port
        self._protocol = protocol
        self._filters = list(filters)
        self._handler = on_message
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"sensorseal-{secrets.token_hex(6)}",
                                   protocol=protocol)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls_ca is not None:
            self._client.tls_set_context(ssl.create_default_context(cafile=tls_ca))
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._keepalive = keepalive_s

    @property
    def client(self) -> mqtt.Client:
        return self._client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("%s:%s refused the connection (%s)", self.host, self.port, reason)
            return
        set_nodelay(client)
        if self._filters:
            _, self._sub_mid = client.subscribe([(f, 1) for f in self._filters])
        else:
            self._subscribed.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        if mid == self._sub_mid:
            failed = [c for c in codes if c.is_failure]
            if failed:
                log.warning("subscription refused by the broker: %s", failed)
            else:
                self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handler(msg.topic, bytes(msg.payload))
        except Exception:  # one bad message must not stop the session
            log.exception("error while handling a message")

    def start(self, timeout: float = 10.0) -> None:
        if self._protocol == mqtt.MQTTv5:
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive,
                                       clean_start=True)
        else:  # MQTT 3.1.1: clean_session (paho's default for a 3.1.1 client) is set already
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            raise ConfigError(f"could not connect and subscribe to {self.host}:{self.port}")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise ConfigError(f"publish failed: {mqtt.error_string(info.rc)}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass(frozen=True, slots=True)
class Ack:
    """A device's verified answer to a command."""

    command_id: str
    ok: bool
    result: bytes = b""
    error: str = ""


class CommandTimeout(TimeoutError):
    """No verified ack arrived in time (the command may or may not have run)."""


def _decode_ack(payload: bytes) -> Ack:
    try:
        body = cbor2.loads(payload)
    except Exception:
        raise Rejected(RejectReason.MALFORMED, "ack body is not CBOR") from None
    if not isinstance(body, dict):
        raise Rejected(RejectReason.MALFORMED, "ack body is not a map")
    cmd, ok = body.get("cmd"), body.get("ok")
    result, error = body.get("result", b""), body.get("error", "")
    if (type(cmd) is not str or type(ok) is not bool or type(result) is not bytes
            or type(error) is not str):
        raise Rejected(RejectReason.MALFORMED, "ack body lacks cmd/ok or has wrong types")
    return Ack(cmd, ok, result, error)


@dataclass(slots=True)
class CloudStats:
    """Replies that were refused, by reason (they never complete a command or call)."""

    sent: int = 0
    completed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    unmatched: int = 0


class CommandSender:
    """Sends sealed commands and waits for verified acks: `send_command(id, payload, timeout)`."""

    def __init__(self, link: CloudLink, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None,
                 audit: Store | None = None, protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self._link = link
        self._audit = audit
        self._pending: dict[str, tuple[DeviceId, Future[Ack]]] = {}
        self._lock = threading.Lock()
        self.stats = CloudStats()
        self._session = MqttSession(host, port, [f"{topics.PREFIX}/+/acks"], self._on_ack,
                                    username=username, password=password, tls_ca=tls_ca,
                                    protocol=protocol)

    def start(self, timeout: float = 10.0) -> CommandSender:
        self._session.start(timeout)
        return self

    def stop(self) -> None:
        self._session.stop()

    def __enter__(self) -> CommandSender:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def send_command(self, device_id: DeviceId, payload: bytes, timeout: float = 10.0) -> Ack:
        """Seal and publish `payload` as a command; return the device's verified ack.

        Raises CommandTimeout if no verified ack arrives within `timeout` seconds.
        """
        command_id = secrets.token_hex(16)
        route = topics.commands(device_id)
        data = self._link.seal_down(device_id,
                                    cbor2.dumps({"cmd": command_id, "body": bytes(payload)}),
                                    route)
        fut: Future[Ack] = Future()
        with self._lock:
            self._pending[command_id] = (device_id, fut)
        try:
            self._session.publish(route, data, qos=1)
            self.stats.sent += 1
            return fut.result(timeout)
        except FutureTimeout:
            raise CommandTimeout(f"no ack from {device_id} within {timeout}s") from None
        finally:
            with self._lock:
                self._pending.pop(command_id, None)

    def _refuse(self, device: str | None, exc: Rejected) -> None:
        self.stats.rejected[exc.reason.value] += 1
        log.warning("command ack refused: %s", exc)
        if self._audit is not None:
            try:
                self._audit.add_events([AuditEvent(_wall_clock_ms(), exc.reason.value, "mqtt",
                                                   "commands", device, f"ack: {exc.detail}")])
            except Exception:
                log.exception("could not audit a refused ack")

    def _on_ack(self, topic: str, data: bytes) -> None:
        try:
            device_id, _kind = topics.device_of(topic)
        except Rejected as exc:
            self._refuse(None, exc)
            return
        try:
            ack = _decode_ack(self._link.open_up(device_id, data, topic).payload)
        except Rejected as exc:
            self._refuse(device_id.hex(), exc)
            return
        with self._lock:
            entry = self._pending.get(ack.command_id)
        if entry is None or entry[0] != device_id:
            self.stats.unmatched += 1  # late, or for another sender: authentic, just not ours
            return
        self.stats.completed += 1
        entry[1].set_result(ack)
