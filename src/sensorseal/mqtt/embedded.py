"""The zero-setup broker: amqtt 0.12 in-process, with sensorseal's authentication and ACLs.

Why: a single machine should run sensorseal without installing Mosquitto. The broker is still
treated as hostile (the envelope protects content); login and topic checks here are defence in
depth, the same rules as the Mosquitto dynsec roles (sensorseal.mqtt.dynsec).

Two callables decide everything, so the same rules can back this broker and the HTTP auth
endpoints for other brokers (sensorseal.mqtt.broker_auth):

    check_login(username, password) -> bool          run in a worker thread (may hit the store)
    check_topic(username, topic, action) -> bool     run on the event loop: must be fast, pure

`registry_auth(registry)` builds both from the Registry.

What amqtt 0.12.1 cannot do (see docs/brokers.md):
- MQTT 3.1.1 only: a CONNECT with protocol level 5 is refused ("unacceptable protocol
  version"). Clients must use MQTTv311 against this broker.
- No shared subscriptions: `$share/<group>/...` is kept as a literal filter that never matches
  a topic. Ingest workers subscribe to plain `sensorseal/+/telemetry` instead, so only ONE
  worker may run against the embedded broker (several would each get every message).
- QoS: a publisher's QoS 1 is acknowledged when the message is queued in memory for
  subscribers, not when they have it; a broker restart loses what was queued. Messages for a
  disconnected persistent (clean_session=False) subscriber are queued in memory only.
- Logins are checked at CONNECT only; after a suspend/revoke call `disconnect_user()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Protocol

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from sensorseal.core.errors import ConfigError, SensorsealError
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import broker_password
from sensorseal.mqtt import topics
from sensorseal.store.base import DeviceRecord, DeviceStatus

__all__ = [
    "SERVICE_USERNAME",
    "BrokerAuth",
    "CheckLogin",
    "CheckTopic",
    "EmbeddedBroker",
    "RegistryAuth",
    "TopicAction",
    "device_topic_allowed",
    "registry_auth",
    "service_topic_allowed",
]

log = logging.getLogger(__name__)

SERVICE_USERNAME = "sensorseal-ingest"
_DEVICE_USER = re.compile(r"[0-9a-f]{24}")
_ANY_DEVICE = r"sensorseal/[0-9a-f]{24}/"
_SERVICE_PUBLISH = re.compile(_ANY_DEVICE + r"(commands|rpc/request)")
_SERVICE_RECEIVE = re.compile(_ANY_DEVICE + r"(telemetry|state|acks|rpc/response/[0-9a-f]{1,64})")
_SERVICE_SUBSCRIBE = re.compile(
    r"(\$share/[^/+#]+/)?sensorseal/\+/(telemetry|state|acks)"
    r"|sensorseal/\+/rpc/response/(#|\+)")


class TopicAction(StrEnum):
    """What a client wants to do with a topic (amqtt's and the HTTP backends' vocabulary)."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"  # the broker is about to deliver a message to this subscriber


CheckLogin = Callable[[str, str], bool]
CheckTopic = Callable[[str, str, TopicAction], bool]


@dataclass(frozen=True, slots=True)
class BrokerAuth:
    check_login: CheckLogin
    check_topic: CheckTopic


def device_topic_allowed(device_hex: str, topic: str, action: TopicAction) -> bool:
    """A device's own subtree (sensorseal.mqtt.topics): it publishes telemetry, state, acks and
    RPC responses; it subscribes to (and receives) exactly its commands and RPC requests.
    Wildcard filters are refused even if they would cover only its own topics."""
    if not _DEVICE_USER.fullmatch(device_hex):
        return False
    own = DeviceId(bytes.fromhex(device_hex))
    if action is TopicAction.PUBLISH:
        if "+" in topic or "#" in topic:
            return False
        try:
            dev, kind = topics.device_of(topic)
        except SensorsealError:
            return False
        return dev == own and (kind in ("telemetry", "state", "acks")
                               or kind.startswith("rpc/response/"))
    return topic in (topics.commands(own), topics.rpc_request(own))


def service_topic_allowed(topic: str, action: TopicAction) -> bool:
    """The ingest service account: device->cloud traffic in, commands and RPC requests out."""
    if action is TopicAction.PUBLISH:
        return _SERVICE_PUBLISH.fullmatch(topic) is not None
    if action is TopicAction.SUBSCRIBE:
        return _SERVICE_SUBSCRIBE.fullmatch(topic) is not None
    return _SERVICE_RECEIVE.fullmatch(topic) is not None


class _DeviceLookup(Protocol):
    """The part of sensorseal.registry.Registry that broker auth needs."""

    def find(self, device_id: DeviceId) -> DeviceRecord | None: ...

    def root_secret(self, device_id: DeviceId, epoch: int) -> bytes | None: ...


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(eq=False)
class RegistryAuth:
    """Login and topic rules backed by the Registry, plus one service account for ingest
    workers whose password is random unless given. Both checks are callables."""

    registry: _DeviceLookup
    service_username: str = SERVICE_USERNAME
    service_password: str = field(repr=False, default_factory=lambda: secrets.token_urlsafe(32))

    def __post_init__(self) -> None:
        if _DEVICE_USER.fullmatch(self.service_username):
            raise ConfigError("the service account name must not look like a device id")

    def check_login(self, username: str, password: str) -> bool:
        """True only for the service account's password, or an ACTIVE device's broker password
        of its current epoch. Every comparison is constant-time."""
        if username == self.service_username:
            return _same(password, self.service_password)
        if not _DEVICE_USER.fullmatch(username):
            return False
        device_id = DeviceId(bytes.fromhex(username))
        record = self.registry.find(device_id)
        if record is None or record.status != DeviceStatus.ACTIVE:
            return False
        secret = self.registry.root_secret(device_id, record.epoch)
        if secret is None:
            return False
        return _same(password, broker_password(secret, device_id, record.epoch))

    def check_topic(self, username: str, topic: str, action: TopicAction) -> bool:
        if username == self.service_username:
            return service_topic_allowed(topic, action)
        return device_topic_allowed(username, topic, action)

    def as_broker_auth(self) -> BrokerAuth:
        return BrokerAuth(self.check_login, self.check_topic)


def registry_auth(registry: _DeviceLookup, *, service_username: str = SERVICE_USERNAME,
                  service_password: str | None = None) -> RegistryAuth:
    """Broker auth from the registry. Read `.service_password` to configure ingest workers."""
    if service_password is None:
        return RegistryAuth(registry, service_username)
    return RegistryAuth(registry, service_username, service_password)


# --------------------------------------------------------------------------- amqtt plugins

# amqtt builds plugins itself from a dotted path and a dict config, so the callables cannot be
# passed in directly: each running broker registers them here under a random key.
_HOOKS: dict[str, BrokerAuth] = {}


class SensorsealAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt auth plugin: `check_login` in a worker thread; any exception means no."""

    @dataclass
    class Config:
        hooks: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        hooks = _HOOKS.get(self.config.hooks)
        if hooks is None or session is None or not session.username:
            return False
        username, password = str(session.username), str(session.password or "")
        try:
            return bool(await asyncio.to_thread(hooks.check_login, username, password))
        except Exception as exc:  # a store error must not let anyone in, nor crash the broker
            log.warning("embedded broker: login check failed for %.40r (%s)", username,
                        type(exc).__name__)
            return False


class SensorsealTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic plugin: `check_topic` for publish, subscribe and delivery."""

    @dataclass
    class Config:
        hooks: str = ""

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        hooks = _HOOKS.get(self.config.hooks)
        if hooks is None or session is None or not session.username or not topic or not action:
            return False
        try:
            return bool(hooks.check_topic(str(session.username), topic,
                                          TopicAction(str(action.value))))
        except Exception as exc:
            log.warning("embedded broker: topic check failed (%s)", type(exc).__name__)
            return False


# --------------------------------------------------------------------------- the broker


class _DeliveringBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's Broker, minus a way to lose acknowledged messages.

    amqtt 0.12.1 sends the PUBACK of a QoS 1 PUBLISH when it puts the message on the session's
    delivery queue; the client loop then takes messages off that queue one by one, and stops at
    DISCONNECT (or a cut session) with the rest still queued, or with one taken but not yet
    handled. Those were acknowledged to the publisher and never delivered
    (tests/e2e/test_brokers.py reproduces it: 200 acked, 101 delivered). Here every message
    taken off the queue is remembered until it was handled, and when the loop ends the ones
    left are handled (topic checks and broadcast, as usual) before the session goes.
    """

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        taken: list[Any] = []
        next_message = handler.mqtt_deliver_next_message

        async def tracked() -> Any:
            message = await next_message()
            taken.append(message)  # no await in between: a cancellation cannot split the two
            return message

        handler.mqtt_deliver_next_message = tracked
        handler._sensorseal_taken = taken
        await super()._client_message_loop(client_session, handler)
        queue = client_session.delivered_message_queue
        left = list(taken)
        taken.clear()
        while not queue.empty():
            left.append(queue.get_nowait())
        for message in left:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(message)
            try:
                await super()._handle_message_delivery(client_session, handler, done)
            except Exception:  # a broadcast failing for one message must not stop the rest
                log.exception("embedded broker: could not deliver a queued message")

    async def _handle_message_delivery(self, client_session: Session, handler: Any,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        taken = getattr(handler, "_sensorseal_taken", None)
        if taken:
            with contextlib.suppress(ValueError):
                taken.remove(wait_deliver.result())
        return bool(await super()._handle_message_delivery(client_session, handler,
                                                           wait_deliver))


@dataclass(eq=False)
class EmbeddedBroker:
    """amqtt on `host:port` (port 0 = a free port; read `.port` after start()).

    `tls=(certfile, keyfile)` serves TLS instead of plain TCP. Use `async with`, or
    `await start()` / `await stop()`.
    """

    auth: BrokerAuth
    host: str = "127.0.0.1"
    port: int = 0
    tls: tuple[str, str] | None = None
    _key: str = field(init=False, repr=False, default="")
    _broker: Broker | None = field(init=False, repr=False, default=None)

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.tls is not None:
            listener.update(ssl=True, certfile=self.tls[0], keyfile=self.tls[1])
        return {
            "listeners": {"default": listener},
            "plugins": {
                f"{__name__}.SensorsealAuthPlugin": {"hooks": self._key},
                f"{__name__}.SensorsealTopicPlugin": {"hooks": self._key},
            },
        }

    async def start(self) -> EmbeddedBroker:
        if self._broker is not None:
            raise ConfigError("the embedded broker is already running")
        self._key = secrets.token_hex(16)
        _HOOKS[self._key] = self.auth
        try:
            broker = _DeliveringBroker(self._config())
            await broker.start()
        except BaseException:
            _HOOKS.pop(self._key, None)
            raise
        self._broker = broker
        server = broker._servers["default"].instance  # amqtt has no public accessor
        sockets = getattr(server, "sockets", None) or ()
        for sock in sockets:
            self.port = int(sock.getsockname()[1])
            break
        return self

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        try:
            if broker is not None:
                await broker.shutdown()
        finally:
            _HOOKS.pop(self._key, None)

    async def disconnect_user(self, username: str) -> int:
        """Close every connected session of `username` (after a suspend or revoke: amqtt checks
        logins only at CONNECT). Returns how many were closed."""
        if self._broker is None:
            return 0
        closed = 0
        for session, handler in list(self._broker.sessions.values()):
            # amqtt leaves refused logins in its table marked "connected"; only a session whose
            # reader task runs is really live.
            reader = getattr(handler, "_reader_task", None)
            live = reader is not None and not reader.done()
            if session.username == username and session.transitions.is_connected() and live:
                await handler.handle_connection_closed()
                closed += 1
        return closed

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
