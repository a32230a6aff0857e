"""The device's MQTT client: sealed telemetry up, verified commands and RPC down.

`MqttDevice` wraps a `sensorseal.device.Device` (which owns keys and the persistent sequence
counter) and a paho MQTT 5 connection that logs in with the device id and its derived broker
password (`broker_password`, never the root secret). It never trusts the broker:

- uplink: a message is sealed once. While the device is connected and has no backlog it goes
  straight to paho (QoS 1 messages are remembered until their PUBACK, and paho re-sends them
  after a reconnect). While the device is offline, or a backlog is still draining, messages are
  written to the persistent `Outbox` and sent oldest-first when the connection is back; an
  outbox entry is removed only when the broker's PUBACK arrives. `stop()` moves QoS 1 messages
  still awaiting their PUBACK into the outbox, so a restart re-sends them. With `durable=True`
  every QoS 1 message is written to the outbox before it is sent, which also covers a crash of
  the device process (at about 0.1 ms per message). Re-sent bytes are the same envelope, which
  the server stores once.
- downlink: commands and RPC requests are opened with `Device.open_downlink` (downlink keys and
  replay window, route = topic). A forgery, replay or bit flip is counted by reason and never
  reaches a handler. Handlers run on their own thread, in arrival order, so a slow handler does
  not stall the network loop.

Only one thread (the pump) moves outbox entries to paho and removes acknowledged ones: paho calls
`on_publish` while holding its own lock, so doing outbox work there could deadlock.

E5 renewal over MQTT (docs/keys.md): with a `kem_key`, a command whose authentic body is a
renewal offer (`core.renewal.renewal_offer_of`) never reaches `on_command`; it is taken with
`Device.accept_renewal` (the same offer again is a no-op), `on_renewal` gets the new credential
to persist, and an ack sealed under N+1 goes out at once: the proof of possession that makes the
server confirm. The broker login follows: the session in progress keeps the password it logged
in with; every new login tries the newest epoch's password first and, when the broker answers
"bad user name or password" / "not authorized", the previous epoch's next (the server may not
have confirmed yet), one attempt per paho reconnect delay. Passwords are changed only on paho's
network thread (in its connect/disconnect callbacks), right before the reconnect that uses them.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import Level
from sensorseal.core.keys import broker_password
from sensorseal.core.renewal import DeviceKemKey, renewal_offer_of
from sensorseal.device.device import Device
from sensorseal.mqtt import topics
from sensorseal.mqtt.commands import set_nodelay
from sensorseal.mqtt.outbox import Outbox, OutboxFull, Overflow
from sensorseal.mqtt.rpc import RpcDispatcher

__all__ = ["RENEWAL_ACK", "CommandHandler", "DeviceStats", "MqttDevice", "RenewalHandler"]

log = logging.getLogger(__name__)

CommandHandler = Callable[[bytes], bytes | None]
# (new credential, previous credential): persist both before the device may restart.
RenewalHandler = Callable[[DeviceCredential, DeviceCredential | None], None]
RENEWAL_ACK = "renewal"  # the `cmd` of the ack that answers a renewal offer
_LOGIN_REFUSED = frozenset({0x86, 0x87})  # CONNACK: bad user name or password, not authorized
_WINDOW = 500  # outbox entries handed to paho and not yet acknowledged
_NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason: accepted, routed to nobody, dropped
_NOT_ROUTED_PAUSE_S = 1.0  # wait this long before sending a not-routed message again
_DELIVERED, _REFUSED, _NOT_ROUTED = 0, 1, 2  # PUBACK outcomes (paho thread -> pump thread)
_SESSION_EXPIRY_S = 3600  # the broker keeps commands for an offline device this long


@dataclass(slots=True)
class DeviceStats:
    """Counters: what went out, what came in, what was refused and why."""

    published: int = 0
    acked_by_broker: int = 0
    broker_refused: int = 0
    not_routed: int = 0  # PUBACK 0x10: no subscriber yet; kept and sent again
    downlink_rejected: Counter[str] = field(default_factory=Counter)
    commands_executed: int = 0
    rpc_served: int = 0
    rpc_responses_unsent: int = 0
    connects: int = 0
    renewals_accepted: int = 0  # offers that changed the credential (not re-deliveries)
    renewals_refused: int = 0  # authentic downlinks with an offer that could not be taken
    logins_refused: int = 0  # CONNACK "bad user name or password" / "not authorized"
    password_fallbacks: int = 0  # logins that succeeded with the previous epoch's password


def _decode_command(payload: bytes) -> tuple[str, bytes]:
    try:
        body = cbor2.loads(payload)
    except Exception:
        raise Rejected(RejectReason.MALFORMED, "command body is not CBOR") from None
    if not isinstance(body, dict):
        raise Rejected(RejectReason.MALFORMED, "command body is not a map")
    cmd, data = body.get("cmd"), body.get("body")
    if type(cmd) is not str or not 0 < len(cmd) <= 64 or type(data) is not bytes:
        raise Rejected(RejectReason.MALFORMED, "command body lacks cmd/body")
    return cmd, data


class MqttDevice:
    """A device on MQTT. `start()`, publish, `stop()`; `on_command` and `rpc` for the downlink."""

    def __init__(self, device: Device, host: str, port: int, *, outbox_path: str | Path,
                 tls_ca: str | None = None, qos: int = 1,
                 on_command: CommandHandler | None = None, rpc: RpcDispatcher | None = None,
                 outbox_capacity: int = 10_000, overflow: Overflow = Overflow.REFUSE,
                 keepalive_s: int = 30, reconnect_min_s: float = 0.2,
                 reconnect_max_s: float = 30.0, client_id: str | None = None,
                 durable: bool = False, protocol: MQTTProtocolVersion = mqtt.MQTTv5,
                 kem_key: DeviceKemKey | None = None,
                 on_renewal: RenewalHandler | None = None) -> None:
        """`protocol`: mqtt.MQTTv5 (Mosquitto, EMQX, ...) or mqtt.MQTTv311 (the embedded amqtt
        broker). Either way the device keeps a persistent session, so commands sent while it
        reconnects wait for it.

        `kem_key`: the device's renewal key pair; without it renewal offers are refused
        (counted). `on_renewal(new, previous)` runs on the downlink thread after an offer was
        taken and before anything sealed under the new epoch is sent: persist both there."""
        if qos not in (0, 1):
            raise ConfigError("telemetry is published at QoS 0 or 1")
        self.device = device
        self.host, self.port, self.qos = host, port, qos
        self.on_command = on_command
        self.rpc = rpc if rpc is not None else RpcDispatcher()
        self.outbox = Outbox(outbox_path, capacity=outbox_capacity, overflow=overflow)
        self.stats = DeviceStats()
        self.durable = durable
        self.kem_key = kem_key
        self.on_renewal = on_renewal
        self._keepalive = keepalive_s
        # Held while sealing, and while a renewal switches keys and `on_renewal` persists them:
        # nothing sealed under the new epoch leaves before the application has kept it.
        self._seal_lock = threading.RLock()
        # Broker login (paho network thread only, and start() before the loop runs).
        self._login_index = 0  # which of `_login_passwords()` the next attempt uses
        self._session_up = False
        self._topic_telemetry = topics.telemetry(device.device_id)
        self._topic_state = topics.state(device.device_id)
        self._topic_acks = topics.acks(device.device_id)
        self._topic_commands = topics.commands(device.device_id)
        self._topic_rpc = topics.rpc_request(device.device_id)

        self._connected = threading.Event()
        self._subscribed = threading.Event()  # the downlink subscriptions of this session
        self._sub_mid: int | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._puback: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._downlink: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._handed: dict[int, int] = {}  # paho mid -> outbox id (pump thread only)
        self._direct_lock = threading.Lock()
        self._direct: dict[int, tuple[str, bytes]] = {}  # paho mid -> QoS 1 sent directly
        self._last_handed = 0
        self._resend_at = 0.0  # monotonic time before which the pump sends nothing
        self._threads: list[threading.Thread] = []

        if protocol not in (mqtt.MQTTv5, mqtt.MQTTv311):
            raise ConfigError("protocol is mqtt.MQTTv5 or mqtt.MQTTv311")
        self._protocol = protocol
        # MQTT 3.1.1 has no clean_start; its clean_session=False is the persistent session.
        extra: dict[str, Any] = {} if protocol == mqtt.MQTTv5 else {"clean_session": False}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or device.device_id.hex(),
                                   protocol=protocol, **extra)
        if tls_ca is not None:
            self._client.tls_set_context(ssl.create_default_context(cafile=tls_ca))
        self._client.max_inflight_messages_set(_WINDOW)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)),
                                         max_delay=max(1, int(reconnect_max_s)))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> MqttDevice:
        """Start connecting (in the background, retrying with backoff) and the worker threads."""
        self._stopping.clear()
        self._session_up = False
        self._use_login(0)
        if self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = _SESSION_EXPIRY_S
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive,
                                       clean_start=False, properties=props)
        else:
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        for target, name in ((self._pump_forever, "outbox-pump"),
                             (self._downlink_forever, "downlink")):
            t = threading.Thread(target=target, name=f"{name}-{self.device.device_id}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Connected and the broker granted the commands and RPC subscriptions."""
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged everything sent or queued so far."""
        deadline = time.monotonic() + timeout
        while len(self.outbox) or self._direct:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.005)
        return True

    def stop(self) -> None:
        """Disconnect. Unacknowledged messages stay in the outbox for the next start."""
        self._stopping.set()
        self._wake.set()
        self._downlink.put(None)
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        self._client.disconnect()
        self._client.loop_stop()
        with self._direct_lock:
            unacked, self._direct = list(self._direct.values()), {}
        for topic, data in unacked:  # sent but not acknowledged: keep them for the next start
            try:
                self.outbox.append(topic, data, 1)
            except OutboxFull:
                log.warning("outbox full: an unacknowledged message could not be kept (counted)")
        self.outbox.close()

    def __enter__(self) -> MqttDevice:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- uplink --------------------------------------------------------------------------------

    def publish_telemetry(self, payload: bytes, qos: int | None = None) -> None:
        """Seal and send one reading. Raises OutboxFull (counted) if it cannot be queued."""
        with self._seal_lock:
            data = self.device.seal(payload, route=self._topic_telemetry)
        self._send(self._topic_telemetry, data, self.qos if qos is None else qos)

    def announce_state(self, payload: bytes, *, level: Level = Level.SIGNED) -> None:
        """Publish the device's state. Level `signed` (the default) is readable by anyone on
        the path but authenticated; `sealed` hides it. Always QoS 1 through the outbox."""
        route = self._topic_state
        with self._seal_lock:
            if level is self.device.level:
                data = self.device.seal(payload, route=route)
            else:
                data = self._seal_other_level(payload, route, level)
        self._send(route, data, 1)

    def _seal_other_level(self, payload: bytes, route: str, level: Level) -> bytes:
        # Device.seal reads keys and counter together under its uplink lock: after a renewal
        # both belong to the new epoch (a cached key of the old epoch with a number of the
        # new counter would repeat a nonce).
        with self._seal_lock:
            return self.device.seal(payload, route=route, level=level)

    def _seal(self, payload: bytes, route: str) -> bytes:
        with self._seal_lock:
            return self.device.seal(payload, route=route)

    def _send(self, topic: str, data: bytes, qos: int) -> None:
        if (self._connected.is_set() and not (qos and self.durable)
                and not len(self.outbox)):
            if qos == 0:
                self._client.publish(topic, data, qos=0)
            else:
                with self._direct_lock:
                    info = self._client.publish(topic, data, qos=1)
                    self._direct[info.mid] = (topic, data)
            self.stats.published += 1
            return
        try:
            self.outbox.append(topic, data, qos)
        except OutboxFull:
            log.warning("outbox full: message to %s refused (counted)", topic)
            raise
        self._wake.set()

    # -- paho callbacks (network thread) -------------------------------------------------------

    def _login_passwords(self) -> list[str]:
        """Broker passwords to try, newest epoch first: after a renewal that the server may not
        have confirmed yet, the previous epoch's too."""
        dev = self.device
        creds = [dev.credential]
        previous = dev.previous
        if previous is not None and previous.epoch != creds[0].epoch:
            creds.append(previous)
        return [broker_password(c.secret, c.device_id, c.epoch) for c in creds]

    def _use_login(self, index: int) -> None:
        """Set the password of the next login attempt (network thread, or before it runs)."""
        passwords = self._login_passwords()
        self._login_index = index % len(passwords)
        self._client.username_pw_set(self.device.device_id.hex(),
                                     passwords[self._login_index])

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("device %s: broker refused the connection (%s)",
                        self.device.device_id, reason)
            if getattr(reason, "value", None) in _LOGIN_REFUSED:
                # Maybe the broker still (or already) knows the other epoch's password: the
                # next attempt, after paho's growing reconnect delay, uses it.
                self.stats.logins_refused += 1
                self._use_login(self._login_index + 1)
            return
        self.stats.connects += 1
        self._session_up = True
        if self._login_index:
            self.stats.password_fallbacks += 1
        set_nodelay(client)
        _, self._sub_mid = client.subscribe([(self._topic_commands, 1), (self._topic_rpc, 1)])
        self._connected.set()
        self._wake.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        if mid != self._sub_mid:
            return
        if any(getattr(c, "is_failure", False) for c in codes):
            log.warning("device %s: the broker refused a downlink subscription (%s)",
                        self.device.device_id, codes)
        else:
            self._subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if self._session_up:
            # A session ended (e.g. cut when the server confirmed a renewal): log in again with
            # the newest password first. After a refused login the rotation above stands.
            self._session_up = False
            self._use_login(0)
        if not self._stopping.is_set():
            log.info("device %s: disconnected (%s); reconnecting", self.device.device_id, reason)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            outcome = _REFUSED
        elif getattr(reason, "value", 0) == _NO_MATCHING_SUBSCRIBERS:
            # MQTT 5 reason 0x10: the broker took the message but routed it to nobody and
            # dropped it (e.g. no ingest worker subscribed yet after a broker restart). paho
            # counts it a success; for us it is not delivered: keep it and send it again.
            outcome = _NOT_ROUTED
        else:
            outcome = _DELIVERED
        self._puback.put((mid, outcome))
        if self._handed:  # outbox entries wait for this; direct ones are settled in batches
            self._wake.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._downlink.put((msg.topic, bytes(msg.payload)))
        except UnicodeDecodeError:
            self.stats.downlink_rejected[RejectReason.MALFORMED.value] += 1

    # -- outbox pump ---------------------------------------------------------------------------

    def _pump_forever(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._pump_once()
            except Exception:
                log.exception("device %s: outbox pump error", self.device.device_id)
                time.sleep(0.1)

    def _pump_once(self) -> None:
        done: list[int] = []
        while True:
            try:
                mid, outcome = self._puback.get_nowait()
            except queue.Empty:
                break
            entry_id = self._handed.pop(mid, None)
            direct = None
            if entry_id is None:
                with self._direct_lock:
                    direct = self._direct.pop(mid, None)
                if direct is None:
                    continue  # a QoS 0 publish or an RPC response
            if outcome == _NOT_ROUTED:
                self._not_routed(entry_id, direct)
                continue
            if entry_id is not None:
                done.append(entry_id)
            if outcome == _DELIVERED:
                self.stats.acked_by_broker += 1
            else:
                # The broker refused the message (e.g. not authorized): retrying cannot help.
                self.stats.broker_refused += 1
                self.outbox.bump("broker_refused")
                log.warning("device %s: broker refused a message", self.device.device_id)
        if done:
            self.outbox.remove(done)
        if not self._connected.is_set() or time.monotonic() < self._resend_at:
            return
        room = _WINDOW - len(self._handed)
        if room <= 0:
            return
        in_flight = set(self._handed.values())
        for entry in self.outbox.pending(after_id=self._last_handed, limit=room + len(in_flight)):
            if entry.id in in_flight:
                continue
            info = self._client.publish(entry.topic, entry.payload, qos=entry.qos)
            self._handed[info.mid] = entry.id
            self._last_handed = max(self._last_handed, entry.id)
            self.stats.published += 1
            room -= 1
            if room <= 0:
                break

    def _not_routed(self, entry_id: int | None, direct: tuple[str, bytes] | None) -> None:
        """A message the broker dropped for want of a subscriber: keep it in the outbox and send
        it again after a pause (in order with what follows it)."""
        self.stats.not_routed += 1
        self.outbox.bump("not_routed")
        if entry_id is None and direct is not None:
            try:
                entry_id = self.outbox.append(direct[0], direct[1], 1)
            except OutboxFull:
                log.warning("outbox full: a message the broker did not route was lost (counted)")
                return
        if entry_id is not None:
            self._last_handed = min(self._last_handed, entry_id - 1)
        self._resend_at = time.monotonic() + _NOT_ROUTED_PAUSE_S
        self._wake.set()

    # -- downlink ------------------------------------------------------------------------------

    def _downlink_forever(self) -> None:
        while True:
            item = self._downlink.get()
            if item is None:
                return
            topic, data = item
            try:
                self._handle_downlink(topic, data)
            except Exception:
                log.exception("device %s: downlink handler error", self.device.device_id)

    def _reject(self, exc: Rejected) -> None:
        self.stats.downlink_rejected[exc.reason.value] += 1
        log.warning("device %s: downlink refused: %s", self.device.device_id, exc)

    def _handle_downlink(self, topic: str, data: bytes) -> None:
        if topic not in (self._topic_commands, self._topic_rpc):
            self._reject(Rejected(RejectReason.MALFORMED, "downlink on an unexpected topic"))
            return
        try:
            opened = self.device.open_downlink(data, topic)
            if opened.level is not Level.SEALED:
                raise Rejected(RejectReason.POLICY_VIOLATION, "downlink must be sealed")
        except Rejected as exc:
            self._reject(exc)
            return
        if topic == self._topic_commands:
            offer = renewal_offer_of(opened.payload)
            if offer is not None:
                self._renew(offer)
            else:
                self._run_command(opened.payload)
        else:
            self._serve_rpc(opened.payload)

    def _renew(self, offer: bytes) -> None:
        """Take an authentic renewal offer, then answer with an ack sealed under the new epoch
        (the proof of possession). A re-delivered offer is answered again, changing nothing."""
        ack: dict[str, Any] = {"cmd": RENEWAL_ACK, "ok": True}
        with self._seal_lock:
            if self.kem_key is None:
                self.stats.renewals_refused += 1
                log.warning("device %s: renewal offer, but no KEM key configured",
                            self.device.device_id)
                ack.update(ok=False, error="no renewal key")
            else:
                before = self.device.credential
                try:
                    new = self.device.accept_renewal(offer, self.kem_key)
                except Rejected as exc:
                    self.stats.renewals_refused += 1
                    self._reject(exc)
                    ack.update(ok=False, error=exc.reason.value)
                else:
                    if new is not before:
                        self.stats.renewals_accepted += 1
                        log.info("device %s: renewed to epoch %d", self.device.device_id,
                                 new.epoch)
                        if self.on_renewal is not None:
                            try:
                                self.on_renewal(new, self.device.previous)
                            except Exception:
                                log.exception("device %s: on_renewal failed",
                                              self.device.device_id)
            data = self.device.seal(cbor2.dumps(ack), route=self._topic_acks)
        self._send(self._topic_acks, data, 1)

    def _run_command(self, payload: bytes) -> None:
        try:
            cmd, body = _decode_command(payload)
        except Rejected as exc:
            self._reject(exc)
            return
        ack: dict[str, Any] = {"cmd": cmd, "ok": True}
        if self.on_command is None:
            ack.update(ok=False, error="no command handler")
        else:
            try:
                ack["result"] = self.on_command(body) or b""
            except Exception as exc:
                log.exception("command handler failed")
                ack.update(ok=False, error=f"handler failed: {type(exc).__name__}")
        self.stats.commands_executed += 1
        data = self._seal(cbor2.dumps(ack), self._topic_acks)
        self._send(self._topic_acks, data, 1)

    def _serve_rpc(self, payload: bytes) -> None:
        try:
            req_id, response = self.rpc.handle(payload)
        except Rejected as exc:
            self._reject(exc)
            return
        route = topics.rpc_response(self.device.device_id, req_id)
        data = self._seal(response, route)
        self.stats.rpc_served += 1
        if self._connected.is_set():
            # Straight out: a response is useful only while the caller waits.
            self._client.publish(route, data, qos=1)
        else:
            self.stats.rpc_responses_unsent += 1

    def __repr__(self) -> str:
        return f"MqttDevice({self.device.device_id}, {self.host}:{self.port})"
