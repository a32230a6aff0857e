"""MQTT on a local broker as the gateway's radio: the same frames and acks as UDP, over topics.

Topic layout (`<prefix>` defaults to `sensorseal-radio`; `<net>` and `<id>` are the 24 lowercase
hex digits of the network id and of the sender id):

    <prefix>/<net>/up/<id>      device -> gateway   one E1 frame per message, QoS 1
    <prefix>/<net>/down/<id>    gateway -> device   the gateway's E1 ack frame, QoS 1

The gateway subscribes to `<prefix>/<net>/up/+` for each network it serves (optionally as an
MQTT 5 shared subscription) and hands every payload, unread, to `Gateway.on_frame`: the relay's
MTU check and every other check run exactly as for a UDP datagram, so garbage, strangers and
oversized payloads are dropped and counted there. The ack is sent only after the frame is in the
gateway's buffer (the relay's rule), and it goes to the downlink topic of the sender and network
the frame *authenticated* as, never to the topic it arrived on (which anyone may pick). A broker
PUBACK means nothing to a device; only the E1 ack does (a stranger or the broker cannot forge it).

Inbound QoS 1 plus a persistent gateway session keep frames that arrive while the gateway
reconnects; anything lost anyway (a broker restart without persistence) is resent by the device,
which keeps every frame until its ack. A resend the gateway already buffered is only re-acked.

Broker accounts (defence in depth, like section 15): a device logs in as its id with its
`broker_password`, a gateway likewise with its own credential; `device_acls` / `gateway_acls`
are the dynsec ACLs that confine each to its topics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensorseal.core.errors import ConfigError, Rejected
from sensorseal.core.keys import broker_password
from sensorseal.core.link import NetworkKey, open_frame, parse_frame
from sensorseal.gateway.relay import ack_payload
from sensorseal.gateway.service import Gateway
from sensorseal.mqtt.commands import set_nodelay
from sensorseal.mqtt.dynsec import Acl

__all__ = [
    "DEFAULT_MAX_PACKET",
    "DEFAULT_PREFIX",
    "MqttGatewayRadio",
    "MqttRadio",
    "RadioStats",
    "device_acls",
    "downlink_topic",
    "gateway_acls",
    "run_mqtt",
    "uplink_filter",
    "uplink_topic",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "sensorseal-radio"
# The largest packet the gateway accepts from the broker (MQTT 5 Maximum Packet Size): far above
# any radio MTU, so an oversized frame still reaches the relay and is counted as `oversize`,
# while a multi-megabyte publish cannot make the gateway buffer it (the broker drops it).
DEFAULT_MAX_PACKET = 65_536
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_INFLIGHT = 100  # acks sent and not yet PUBACKed (Mosquitto's default receive window is 100)


def _check_prefix(prefix: str) -> str:
    """No wildcards, no `$` topics, no empty levels: the prefix is part of every ACL."""
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"MQTT radio topic prefix must be plain topic levels: {prefix!r:.60}")
    return prefix


def _hex12(value: bytes, what: str) -> str:
    if len(value) != 12:
        raise ConfigError(f"a {what} is 12 bytes")
    return bytes(value).hex()


def uplink_topic(network_id: bytes, sender: bytes, prefix: str = DEFAULT_PREFIX) -> str:
    """Where `sender` publishes its frames for `network_id`."""
    return f"{_check_prefix(prefix)}/{_hex12(network_id, 'network id')}/up/" \
           f"{_hex12(sender, 'sender id')}"


def downlink_topic(network_id: bytes, sender: bytes, prefix: str = DEFAULT_PREFIX) -> str:
    """Where the gateway publishes the acks for `sender`."""
    return f"{_check_prefix(prefix)}/{_hex12(network_id, 'network id')}/down/" \
           f"{_hex12(sender, 'sender id')}"


def uplink_filter(network_id: bytes, prefix: str = DEFAULT_PREFIX) -> str:
    """The gateway's subscription for one network."""
    return f"{_check_prefix(prefix)}/{_hex12(network_id, 'network id')}/up/+"


def device_acls(network_id: bytes, sender: bytes, prefix: str = DEFAULT_PREFIX) -> list[Acl]:
    """A device may publish on its own uplink topic and read only its own downlink topic."""
    down = downlink_topic(network_id, sender, prefix)
    return [Acl("publishClientSend", uplink_topic(network_id, sender, prefix)),
            Acl("subscribeLiteral", down), Acl("unsubscribeLiteral", down)]


def gateway_acls(network_ids: Iterable[bytes], prefix: str = DEFAULT_PREFIX) -> list[Acl]:
    """A gateway reads its networks' uplinks (also through `$share/...`) and sends acks."""
    acls: list[Acl] = []
    for net in network_ids:
        up = uplink_filter(net, prefix)
        acls += [Acl("subscribePattern", up), Acl("subscribePattern", f"$share/+/{up}"),
                 Acl("unsubscribePattern", up), Acl("unsubscribePattern", f"$share/+/{up}"),
                 Acl("publishClientSend",
                     f"{prefix}/{_hex12(net, 'network id')}/down/+")]
    return acls


def _tls_ready(tls: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if tls is not None and tls.minimum_version < ssl.TLSVersion.TLSv1_2:
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
    return tls


class _Callbacks(Protocol):
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None: ...
    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None: ...
    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[Any],
                      _p: Any) -> None: ...
    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None: ...


def _configure(client: mqtt.Client, owner: _Callbacks, tls: ssl.SSLContext | None,
               reconnect_min_s: float, reconnect_max_s: float) -> None:
    """What both ends set on their paho client: TLS 1.2+, no client-side queue (a frame not
    sent now is resent by the device's own retry), the reconnect backoff and the callbacks."""
    if tls is not None:
        client.tls_set_context(_tls_ready(tls))
    client.max_queued_messages_set(0)
    # paho's types say int; it only multiplies and compares them, so sub-second works.
    client.reconnect_delay_set(min_delay=reconnect_min_s,  # type: ignore[arg-type]
                               max_delay=reconnect_max_s)  # type: ignore[arg-type]
    client.on_connect = owner._on_connect
    client.on_disconnect = owner._on_disconnect
    client.on_subscribe = owner._on_subscribe
    client.on_message = owner._on_message


@dataclass(slots=True)
class RadioStats:
    """What a transport saw (the relay counts the drops; these count the traffic)."""

    connects: int = 0
    disconnects: int = 0
    frames_in: int = 0  # gateway: payloads handed to the relay
    frames_out: int = 0  # device: publishes, resends included
    acks_in: int = 0  # device: acks that matched a frame
    acks_refused: int = 0  # device: downlink messages that were not the ack awaited
    acks_out: int = 0  # gateway: acks published
    acks_unsent: int = 0  # gateway: the broker was away when the ack was due (device resends)
    subscribe_refused: int = 0


# ------------------------------------------------------------------------------ gateway side


class MqttGatewayRadio:
    """The gateway's MQTT side. paho runs its network loop in its own thread and reconnects with
    capped exponential backoff; every frame is handed to the event loop, which owns the gateway
    (the relay is not thread-safe), and acks are published from there."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 1883, *,
                 topic_prefix: str = DEFAULT_PREFIX, tls: ssl.SSLContext | None = None,
                 username: str | None = None, password: str | None = None,
                 client_id: str | None = None, share_group: str | None = None,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv5, keepalive_s: int = 30,
                 reconnect_min_s: float = 0.1, reconnect_max_s: float = 5.0,
                 session_expiry_s: int = 300, max_packet: int | None = None) -> None:
        """`username`/`password` default to the gateway's id and its derived broker password
        (`broker_password` of its credential, as for a device). `max_packet` (MQTT 5) defaults
        to DEFAULT_MAX_PACKET or twice the MTU, whichever is larger."""
        if protocol not in (mqtt.MQTTv5, mqtt.MQTTv311):
            raise ConfigError("protocol is mqtt.MQTTv5 or mqtt.MQTTv311")
        if share_group is not None and (protocol != mqtt.MQTTv5 or
                                        not re.fullmatch(r"[A-Za-z0-9_.-]+", share_group)):
            raise ConfigError("a share group needs MQTT 5 and a plain name")
        mtu = gateway.settings.mtu
        if max_packet is None:
            max_packet = max(DEFAULT_MAX_PACKET, 2 * mtu)
        elif max_packet < mtu + 1024:
            raise ConfigError("max_packet must leave room for an oversized frame to be counted")
        self.gateway = gateway
        self.host, self.port = host, port
        self.prefix = _check_prefix(topic_prefix)
        self.stats = RadioStats()
        cfg = gateway.config
        gid = cfg.gateway_id
        filters = [uplink_filter(net, self.prefix) for net in sorted(cfg.networks)]
        if share_group is not None:
            filters = [f"$share/{share_group}/{f}" for f in filters]
        self.filters = filters
        self._protocol = protocol
        self._keepalive = keepalive_s
        self._session_expiry = session_expiry_s
        self._max_packet = max_packet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: Callable[[tuple[str, int]], None] | None = None
        self._sub_mid: int | None = None
        extra: dict[str, Any] = {} if protocol == mqtt.MQTTv5 else {"clean_session": False}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"sensorseal-gw-{gid.hex()}",
                                   protocol=protocol, **extra)
        self._client.username_pw_set(
            username or gid.hex(),
            password if password is not None else
            broker_password(cfg.credential.secret, gid, cfg.credential.epoch))
        self._tls = tls is not None
        self._client.max_inflight_messages_set(_INFLIGHT)
        _configure(self._client, self, tls, reconnect_min_s, reconnect_max_s)

    @property
    def url(self) -> str:
        scheme = "mqtts" if self._tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    async def run(self, ready: Callable[[tuple[str, int]], None] | None = None) -> None:
        """Serve until cancelled: frames in, acks out, the gateway forwarding upstream.
        `ready((host, port))` is called once the broker granted the subscriptions."""
        self._loop = asyncio.get_running_loop()
        self._ready = ready
        if self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry
            props.MaximumPacketSize = self._max_packet
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive,
                                       clean_start=False, properties=props)
        else:
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        try:
            await self.gateway.run_forever()
        finally:
            self._loop = None  # first: no frame is handed to a gateway that is stopping
            self._client.disconnect()
            self._client.loop_stop()

    # -- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT radio: broker %s refused the gateway (%s)", self.url, reason)
            return
        self.stats.connects += 1
        set_nodelay(client)
        # Always (re)subscribe: a restarted broker without persistence forgot the session.
        _rc, self._sub_mid = client.subscribe([(f, 1) for f in self.filters])

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.stats.disconnects += 1
        if self._loop is not None:
            log.info("MQTT radio: disconnected from %s (%s); reconnecting", self.url, reason)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[Any],
                      _p: Any) -> None:
        if mid != self._sub_mid:
            return
        refused = [f for f, rc in zip(self.filters, codes, strict=False) if rc.is_failure]
        if refused:
            self.stats.subscribe_refused += 1
            log.error("MQTT radio: the broker refused the subscriptions %s; no frames arrive",
                      refused)
            return
        loop, ready = self._loop, self._ready
        if ready is not None and loop is not None:
            self._ready = None
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(ready, (self.host, self.port))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver, bytes(msg.payload))

    # -- event loop ----------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        """Every payload goes to the relay as it is, oversized or garbage included."""
        self.stats.frames_in += 1
        self.gateway.on_frame(data, lambda ack: self._send_ack(data, ack))

    def _send_ack(self, frame: bytes, ack: bytes) -> None:
        # The relay only answers frames that passed E1, so the header's network and sender
        # are authenticated: the ack goes to that device, not to whoever picked the topic.
        try:
            hdr = parse_frame(frame, mtu=len(frame))
        except Rejected:  # cannot happen for a frame the relay acked; never guess a topic
            log.error("MQTT radio: ack for a frame that does not parse; not sent")
            return
        if not self._client.is_connected():
            self.stats.acks_unsent += 1
            return
        self._client.publish(downlink_topic(hdr.network_id, hdr.sender, self.prefix), ack,
                             qos=1)
        self.stats.acks_out += 1


async def run_mqtt(gateway: Gateway, host: str = "127.0.0.1", port: int = 1883, *,
                   topic_prefix: str = DEFAULT_PREFIX, tls: ssl.SSLContext | None = None,
                   username: str | None = None, password: str | None = None,
                   ready: Callable[[tuple[str, int]], None] | None = None,
                   **options: Any) -> None:
    """Serve the radio over MQTT on a local broker until cancelled (`run_udp`'s twin).
    `options` go to `MqttGatewayRadio` (client_id, share_group, protocol, reconnect_*, ...)."""
    radio = MqttGatewayRadio(gateway, host, port, topic_prefix=topic_prefix, tls=tls,
                             username=username, password=password, **options)
    await radio.run(ready)


# ------------------------------------------------------------------------------- device side


class MqttRadio:
    """`UdpRadio`'s twin over MQTT: publish a frame on the sender's uplink topic and wait for
    the gateway's E1 ack on its downlink topic; resend the same bytes until acked.

    One connection may carry several senders (each subscribed on first use); with per-device
    broker accounts, give each device its own radio. A broker PUBACK is not an ack: only the
    gateway's E1 frame, which a stranger or the broker cannot forge, lets a device forget a frame.
    """

    def __init__(self, broker: tuple[str, int], network: NetworkKey, *,
                 username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None, topic_prefix: str = DEFAULT_PREFIX,
                 timeout_s: float = 0.3, senders: Iterable[bytes] = (),
                 client_id: str | None = None, protocol: MQTTProtocolVersion = mqtt.MQTTv5,
                 keepalive_s: int = 30, reconnect_min_s: float = 0.1,
                 reconnect_max_s: float = 2.0) -> None:
        if protocol not in (mqtt.MQTTv5, mqtt.MQTTv311):
            raise ConfigError("protocol is mqtt.MQTTv5 or mqtt.MQTTv311")
        self.broker = broker
        self.network = network
        self._keys = {network.epoch: network}  # acks come under the key epoch of their frame
        self.prefix = _check_prefix(topic_prefix)
        self.timeout_s = timeout_s
        self.stats = RadioStats()
        self._cond = threading.Condition()
        self._connected = False
        self._wanted: set[bytes] = {bytes(s) for s in senders}
        self._subscribed: set[bytes] = set()
        self._pending: dict[int, list[bytes]] = {}  # SUBSCRIBE mid -> senders
        self._subacks: dict[int, bool] = {}  # SUBACKs not matched to a pending mid yet
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=256)
        self._closed = False
        # A clean session: an ack for an old attempt is worthless, and subscriptions are
        # renewed on every connect.
        extra: dict[str, Any] = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                   protocol=protocol, **extra)
        if username is not None:
            self._client.username_pw_set(username, password)
        _configure(self._client, self, tls, reconnect_min_s, reconnect_max_s)
        self._client.connect_async(broker[0], broker[1], keepalive=keepalive_s)
        self._client.loop_start()

    # -- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT radio: broker %s:%s refused the device (%s)", *self.broker,
                        reason)
            return
        set_nodelay(client)
        with self._cond:
            self._connected = True
            self.stats.connects += 1
            self._subscribed.clear()
            wanted = sorted(self._wanted)
            self._cond.notify_all()
        if wanted:
            self._subscribe(wanted)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        with self._cond:
            self._connected = False
            self.stats.disconnects += 1
            self._subscribed.clear()
            self._pending.clear()
            self._subacks.clear()
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[Any],
                      _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = all(not rc.is_failure for rc in codes)
            self._settle()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._inbox.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    # -- subscriptions -------------------------------------------------------------------------

    def _subscribe(self, senders: list[bytes]) -> None:
        topics = [(downlink_topic(self.network.network_id, s, self.prefix), 1) for s in senders]
        rc, mid = self._client.subscribe(topics)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: on_connect subscribes again
        with self._cond:
            self._pending[mid] = senders
            self._settle()

    def _settle(self) -> None:
        """Match SUBACKs to their SUBSCRIBEs (either may be seen first). Holds `_cond`."""
        for mid in [m for m in self._subacks if m in self._pending]:
            senders = self._pending.pop(mid)
            if self._subacks.pop(mid):
                self._subscribed.update(senders)
            else:
                self.stats.subscribe_refused += 1
                log.warning("MQTT radio: the broker refused a downlink subscription")
        self._cond.notify_all()

    def _want(self, sender: bytes) -> None:
        with self._cond:
            if sender in self._wanted:
                return
            self._wanted.add(sender)
            connected = self._connected
        if connected:
            self._subscribe([sender])

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """True once connected and subscribed to every known sender's downlink topic."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._connected and self._wanted <= self._subscribed, timeout)

    # -- sending -------------------------------------------------------------------------------

    def send(self, frame: bytes, sender: bytes, link_seq: int, *, attempts: int = 10) -> bool:
        """True once the gateway acked (the frame is durable there); False after `attempts`,
        each waiting up to `timeout_s` (for the broker, then for the ack)."""
        if attempts < 1:
            raise ConfigError("attempts must be at least 1")
        sender = bytes(sender)
        self._want(sender)
        up = uplink_topic(self.network.network_id, sender, self.prefix)
        down = downlink_topic(self.network.network_id, sender, self.prefix)
        expected = ack_payload(sender, link_seq)
        with self._cond:
            self._inbox.clear()  # acks of earlier frames
        for _ in range(attempts):
            deadline = time.monotonic() + self.timeout_s
            with self._cond:
                ok = self._cond.wait_for(lambda: self._connected and sender in self._subscribed,
                                         self.timeout_s)
            if not ok:
                continue  # the broker is away: this attempt is spent waiting for it
            self._client.publish(up, frame, qos=1)
            self.stats.frames_out += 1
            with self._cond:
                while True:
                    while self._inbox:
                        topic, data = self._inbox.popleft()
                        if topic == down and self._is_ack(data, expected):
                            self.stats.acks_in += 1
                            return True
                        self.stats.acks_refused += 1
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closed:
                        break
                    self._cond.wait(left)
        return False

    def rekey(self, network: NetworkKey) -> None:
        """Also accept acks under `network` (a newer key epoch of the same network, as
        `UdpRadio.rekey`); frames sent under the old epoch are still acked under it."""
        if network.network_id != self.network.network_id:
            raise ConfigError("rekey takes a key of the same network")
        self.network = network
        self._keys[network.epoch] = network

    def _is_ack(self, data: bytes, expected: bytes) -> bool:
        try:
            frame = parse_frame(data, mtu=2048)
            key = self._keys.get(frame.epoch)
            return key is not None and open_frame(frame, key) == expected
        except (Rejected, ValueError):
            return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
