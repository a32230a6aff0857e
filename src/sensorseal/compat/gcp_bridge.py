"""Cloud IoT Core endpoints: the MQTT auth/ACL gate, an amqtt broker plugin, the HTTP bridge.

Devices written for Google Cloud IoT Core (retired 16 August 2023) connect unchanged except for
the host name and the CA. The security decisions live in `gcp_iot` (pure); this module keeps
the per-connection state and moves bytes:

* `IotCoreGate` — transport-neutral: `check_login(username, password, client_id)` verifies the
  JWT (username ignored, as Cloud IoT Core did) and remembers the session's `exp`;
  `check_topic(client_id, topic, action)` applies the ACL; `on_publish(...)` turns events and
  state into `GcpMessage`s for the telemetry callable and handles gateway attach/detach;
  `due_for_close(now)` lists sessions whose JWT has expired. Every refusal is audited.
* `ConfigService` — per-device config versions ("latest config on subscribe") and last state.
* `IotCoreBrokerPlugin` — the gate inside an amqtt broker (auth + topic plugin): closes the
  connection when the JWT expires or on a QoS 2 PUBLISH, keeps each device's latest config
  retained on `/devices/{id}/config` so a new subscription gets it at once, and delivers
  commands. Broker-wide, set amqtt's `max-qos: 1` so QoS 2 subscriptions are granted QoS 1.
* `http_routes(...)` — the HTTP bridge (`:publishEvent`, `:setState`, `GET .../config`) as
  Starlette routes with `authorization: Bearer <JWT>`.

The telemetry callable receives the raw payload (MQTT) or the decoded `binary_data` (HTTP); the
lead wires it to the pipeline. These payloads are authenticated only by the session's JWT and
TLS: no end-to-end protection (docs/compat.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from amqtt.broker import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sensorseal.compat import gcp_iot
from sensorseal.compat._json import loads_bounded
from sensorseal.compat.gcp_iot import Action, DevicePath, JwtSession, PublicKeyRegistry, TopicKind
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.store.base import AuditEvent

__all__ = [
    "ConfigService",
    "GcpMessage",
    "IotCoreBrokerPlugin",
    "IotCoreGate",
    "PublishOutcome",
    "http_routes",
    "register_gate",
]

MAX_TELEMETRY = 256 * 1024  # Cloud IoT Core's limits
MAX_STATE = 64 * 1024
MAX_CONFIG = 64 * 1024
MAX_HTTP_BODY = 2 * MAX_TELEMETRY

Audit = Callable[[AuditEvent], None]


@dataclass(frozen=True, slots=True)
class GcpMessage:
    """An event or state report from an authenticated device (or a gateway on its behalf)."""

    device: DevicePath
    kind: TopicKind  # EVENTS or STATE
    subfolder: str | None
    payload: bytes
    transport: str  # "mqtt" or "http"
    via_gateway: str | None = None


@dataclass
class ConfigService:
    """Latest config per device (versions count from 1) and the last reported state."""

    _configs: dict[DevicePath, tuple[int, bytes]] = field(default_factory=dict)
    _states: dict[DevicePath, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_config(self, device: DevicePath, data: bytes) -> int:
        if len(data) > MAX_CONFIG:
            raise ConfigError(f"config over {MAX_CONFIG} bytes")
        with self._lock:
            version = self._configs.get(device, (0, b""))[0] + 1
            self._configs[device] = (version, bytes(data))
            return version

    def latest(self, device: DevicePath) -> tuple[int, bytes] | None:
        with self._lock:
            return self._configs.get(device)

    def record_state(self, device: DevicePath, data: bytes) -> None:
        with self._lock:
            self._states[device] = bytes(data)

    def state(self, device: DevicePath) -> bytes | None:
        with self._lock:
            return self._states.get(device)


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """What the broker adapter must do after a PUBLISH: `close` the connection and/or publish
    `errors` (topic, payload) to the gateway's error topic."""

    accepted: bool
    close: bool = False
    error: tuple[str, bytes] | None = None


@dataclass
class _Login:
    session: JwtSession
    attached: set[str] = field(default_factory=set)


def _password_text(password: str | bytes | None) -> str:
    if isinstance(password, bytes | bytearray):
        try:
            return bytes(password).decode("ascii")
        except UnicodeDecodeError:
            raise Rejected(RejectReason.MALFORMED, "password is not a JWT") from None
    return password or ""


class IotCoreGate:
    """Per-connection state around the pure checks; thread-safe; audits every refusal."""

    def __init__(self, registry: PublicKeyRegistry, *, clock: Callable[[], float],
                 audit: Audit, telemetry: Callable[[GcpMessage], None],
                 configs: ConfigService | None = None,
                 bound: Mapping[DevicePath, Collection[str]] | None = None,
                 skew_s: int = gcp_iot.DEFAULT_SKEW_S) -> None:
        self.registry = registry
        self.clock = clock
        self.audit = audit
        self.telemetry = telemetry
        self.configs = configs if configs is not None else ConfigService()
        self.bound: Mapping[DevicePath, Collection[str]] = bound or {}
        self.skew_s = skew_s
        self._logins: dict[str, _Login] = {}
        self._lock = threading.Lock()

    # -- audit -----------------------------------------------------------------------------
    def refuse(self, exc: Rejected, *, transport: str, source: str,
                device: str | None) -> None:
        self.audit(AuditEvent(int(self.clock() * 1000), exc.reason.value, transport, source,
                              device, exc.detail))

    def verify(self, token: str | bytes, device: DevicePath, *, transport: str,
               source: str) -> JwtSession:
        """Verify a JWT for `device`; audit and re-raise a refusal."""
        try:
            return gcp_iot.verify_jwt(token, device, self.registry, now=self.clock(),
                                      skew_s=self.skew_s)
        except Rejected as exc:
            self.refuse(exc, transport=transport, source=source, device=str(device))
            raise

    # -- MQTT ------------------------------------------------------------------------------
    def check_login(self, username: str | None, password: str | bytes | None,
                    client_id: str) -> JwtSession:
        """CONNECT: the client id names the device, the password is its JWT."""
        del username  # ignored by Cloud IoT Core
        try:
            device = DevicePath.parse(client_id)
            token = _password_text(password)
        except Rejected as exc:
            self.refuse(exc, transport="mqtt-gcp", source=client_id[:300], device=None)
            raise
        session = self.verify(token, device, transport="mqtt-gcp", source=client_id)
        with self._lock:
            self._logins[client_id] = _Login(session)
        return session

    def logout(self, client_id: str) -> None:
        with self._lock:
            self._logins.pop(client_id, None)

    def session(self, client_id: str) -> JwtSession | None:
        with self._lock:
            login = self._logins.get(client_id)
            return login.session if login else None

    def due_for_close(self, now: float) -> list[str]:
        """Client ids whose JWT expired: the adapter closes them (the device reconnects)."""
        with self._lock:
            return [cid for cid, login in self._logins.items() if login.session.exp <= now]

    def _login(self, client_id: str) -> _Login | None:
        with self._lock:
            login = self._logins.get(client_id)
        if login is None or login.session.exp <= self.clock():
            return None
        return login

    def check_topic(self, client_id: str, topic: str, action: Action) -> bool:
        login = self._login(client_id)
        if login is None:
            return False
        dev = login.session.device
        with self._lock:
            attached = set(login.attached)
        ok = gcp_iot.allowed(dev.device, topic, action, attached=attached,
                             bound=self.bound.get(dev, ()))
        if not ok:
            self.refuse(Rejected(RejectReason.POLICY_VIOLATION, f"{action.value} {topic[:200]}"),
                         transport="mqtt-gcp", source=client_id, device=str(dev))
        return ok

    def on_publish(self, client_id: str, topic: str, payload: bytes, qos: int) -> PublishOutcome:
        """After the ACL allowed a PUBLISH: ingest events/state, run attach/detach."""
        login = self._login(client_id)
        if login is None:
            return PublishOutcome(False, close=True)
        gw = login.session.device
        if not gcp_iot.publish_qos_allowed(qos):
            self.refuse(Rejected(RejectReason.UNSUPPORTED, "QoS 2 publish"),
                         transport="mqtt-gcp", source=client_id, device=str(gw))
            return PublishOutcome(False, close=True)
        try:
            parsed = gcp_iot.parse_topic(topic)
        except Rejected:
            return PublishOutcome(False)
        target = gw.sibling(parsed.device)
        via = gw.device if parsed.device != gw.device else None
        if parsed.kind in (TopicKind.EVENTS, TopicKind.STATE):
            limit = MAX_TELEMETRY if parsed.kind is TopicKind.EVENTS else MAX_STATE
            if len(payload) > limit:
                self.refuse(Rejected(RejectReason.OVERSIZE, f"{len(payload)} bytes"),
                             transport="mqtt-gcp", source=client_id, device=str(target))
                return PublishOutcome(False)
            if parsed.kind is TopicKind.STATE:
                self.configs.record_state(target, payload)
            self.telemetry(GcpMessage(target, parsed.kind, parsed.subfolder, bytes(payload),
                                      "mqtt", via))
            return PublishOutcome(True)
        if parsed.kind is TopicKind.ATTACH:
            return self._attach(client_id, login, target, payload)
        if parsed.kind is TopicKind.DETACH:
            with self._lock:
                login.attached.discard(target.device)
            return PublishOutcome(True)
        return PublishOutcome(False)

    def _attach(self, client_id: str, login: _Login, target: DevicePath,
                payload: bytes) -> PublishOutcome:
        gw = login.session.device
        errors = f"/devices/{gw.device}/errors"
        try:
            body = loads_bounded(payload, max_size=16 * 1024, max_depth=2)
            token = body.get("authorization") if isinstance(body, dict) else None
            if not isinstance(token, str):
                raise Rejected(RejectReason.MALFORMED, "attach without authorization")
        except Rejected as exc:
            self.refuse(exc, transport="mqtt-gcp", source=client_id, device=str(target))
            return PublishOutcome(False, error=(errors, _error_body(target, "malformed")))
        try:
            self.verify(token, target, transport="mqtt-gcp", source=client_id)
        except Rejected:
            return PublishOutcome(False, error=(errors, _error_body(target, "unauthorized")))
        with self._lock:
            login.attached.add(target.device)
        return PublishOutcome(True)


def _error_body(device: DevicePath, code: str) -> bytes:
    return json.dumps({"device_id": device.device, "error_type": code}).encode()


# --- amqtt plugin -------------------------------------------------------------------------

_GATES: dict[str, IotCoreGate] = {}


def register_gate(name: str, gate: IotCoreGate) -> None:
    """Make `gate` available to `IotCoreBrokerPlugin` configured with `gate: name`."""
    _GATES[name] = gate


_ACTIONS = {AmqttAction.PUBLISH: Action.PUBLISH, AmqttAction.SUBSCRIBE: Action.SUBSCRIBE,
            AmqttAction.RECEIVE: Action.SUBSCRIBE}


class IotCoreBrokerPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """amqtt auth + topic plugin: `plugins: {"sensorseal.compat.gcp_bridge.IotCoreBrokerPlugin":
    {"gate": "<name given to register_gate>", "check_interval_s": 1.0}}`."""

    instances: ClassVar[dict[str, IotCoreBrokerPlugin]] = {}

    @dataclass
    class Config:
        gate: str = "default"
        check_interval_s: float = 1.0

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.config: IotCoreBrokerPlugin.Config = context.config
        gate = _GATES.get(self.config.gate)
        if gate is None:
            raise ConfigError(f"no IotCoreGate registered as {self.config.gate!r}")
        self.gate = gate
        self._watchdog: asyncio.Task[None] | None = None
        IotCoreBrokerPlugin.instances[self.config.gate] = self

    async def authenticate(self, *, session: Any) -> bool:
        try:
            self.gate.check_login(session.username, session.password, session.client_id or "")
        except Rejected:
            return False
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._close_expired())
        return True

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Any = None) -> bool:
        if session is None or topic is None or action not in _ACTIONS:
            return False
        if action is AmqttAction.RECEIVE and self.gate.session(session.client_id) is None:
            return False
        return self.gate.check_topic(session.client_id, topic, _ACTIONS[action])

    async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
        if message.qos == 2:  # refused and closed in on_broker_message_received
            return
        outcome = self.gate.on_publish(client_id, message.topic, bytes(message.data),
                                       message.qos or 0)
        if outcome.error is not None:
            await self.context.broadcast_message(outcome.error[0], outcome.error[1], 0)
        if outcome.close:
            await self.disconnect(client_id)

    async def on_broker_message_received(self, *, client_id: str, message: Any) -> None:
        # QoS 2 PUBLISH: Cloud IoT Core closed the connection (it is also never ingested,
        # see IotCoreGate.on_publish).
        if message is not None and message.qos == 2:
            self.gate.on_publish(client_id, message.topic, b"", 2)
            await self.disconnect(client_id)

    async def on_broker_client_disconnected(self, *, client_id: str, **_: Any) -> None:
        self.gate.logout(client_id)

    async def disconnect(self, client_id: str) -> None:
        """Close a client's connection from the broker side (amqtt has no public call)."""
        entry = self.context._broker_instance._sessions.get(client_id)
        if entry is None:
            return
        handler = entry[1]
        with contextlib.suppress(Exception):
            await handler.handle_connection_closed()
            await handler.stop()
        self.gate.logout(client_id)

    async def _close_expired(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            for client_id in self.gate.due_for_close(self.gate.clock()):
                await self.disconnect(client_id)

    async def push_config(self, device: DevicePath, data: bytes) -> int:
        """Store a new config version and publish it retained (QoS 1) to the device."""
        version = self.gate.configs.set_config(device, data)
        topic = f"/devices/{device.device}/config"
        await self.context.retain_message(topic, data, 1)
        await self.context.broadcast_message(topic, data, 1)
        return version

    async def send_command(self, device: DevicePath, data: bytes,
                           subfolder: str | None = None) -> None:
        topic = f"/devices/{device.device}/commands" + (f"/{subfolder}" if subfolder else "")
        gcp_iot.parse_topic(topic)  # refuses wildcards and bad subfolders
        await self.context.broadcast_message(topic, data, 1)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog


# --- HTTP bridge --------------------------------------------------------------------------

def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise Rejected(RejectReason.MALFORMED, "binary_data missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(RejectReason.MALFORMED, "binary_data is not base64") from None


def http_routes(gate: IotCoreGate, prefix: str = "/v1") -> list[Route]:
    """Starlette routes for the Cloud IoT Core HTTP bridge. Every refusal is audited once."""

    def fail(status: int) -> Response:
        return JSONResponse({"error": {"code": status, "status": "DENIED"}}, status_code=status)

    def source_of(request: Request) -> str:
        return request.client.host if request.client else ""

    def authorize(request: Request, name: str) -> DevicePath | Response:
        """The device named by the path, if the bearer JWT is its own; else the error reply."""
        source = source_of(request)
        p = request.path_params
        try:
            device = DevicePath.parse(f"projects/{p['project']}/locations/{p['region']}"
                                      f"/registries/{p['registry']}/devices/{name}")
        except Rejected as exc:
            gate.refuse(exc, transport="http-gcp", source=source, device=None)
            return fail(404)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            gate.refuse(Rejected(RejectReason.MALFORMED, "no bearer token"),
                         transport="http-gcp", source=source, device=str(device))
            return fail(401)
        try:
            gate.verify(token.strip(), device, transport="http-gcp", source=source)
        except Rejected as exc:
            return fail(401 if exc.reason is RejectReason.MALFORMED else 403)
        return device

    def payload_of(body: Any, verb: str) -> tuple[bytes, str | None]:
        if not isinstance(body, dict):
            raise Rejected(RejectReason.MALFORMED, "body is not an object")
        if verb == "publishEvent":
            sub = body.get("sub_folder")
            if sub is not None and (not isinstance(sub, str) or "+" in sub or "#" in sub):
                raise Rejected(RejectReason.MALFORMED, "bad sub_folder")
            payload, limit = _b64(body.get("binary_data")), MAX_TELEMETRY
        else:
            state = body.get("state")
            payload = _b64(state.get("binary_data") if isinstance(state, dict) else None)
            sub, limit = None, MAX_STATE
        if len(payload) > limit:
            raise Rejected(RejectReason.OVERSIZE, f"{len(payload)} bytes")
        return payload, sub or None

    async def device_action(request: Request) -> Response:
        name, _, verb = request.path_params["device_action"].rpartition(":")
        if verb not in ("publishEvent", "setState"):
            return fail(404)
        device = authorize(request, name)
        if isinstance(device, Response):
            return device
        try:
            body = loads_bounded(await request.body(), max_size=MAX_HTTP_BODY, max_depth=3)
            payload, sub = payload_of(body, verb)
        except Rejected as exc:
            gate.refuse(exc, transport="http-gcp", source=source_of(request),
                         device=str(device))
            return fail(exc.status)
        if verb == "setState":
            gate.configs.record_state(device, payload)
        kind = TopicKind.EVENTS if verb == "publishEvent" else TopicKind.STATE
        gate.telemetry(GcpMessage(device, kind, sub, payload, "http"))
        return JSONResponse({})

    async def get_config(request: Request) -> Response:
        device = authorize(request, request.path_params["device"])
        if isinstance(device, Response):
            return device
        latest = gate.configs.latest(device)
        version, data = latest if latest is not None else (0, b"")
        return JSONResponse({"version": str(version),
                             "binaryData": base64.b64encode(data).decode("ascii")})

    base = (prefix + "/projects/{project}/locations/{region}/registries/{registry}/devices")
    return [
        Route(base + "/{device}/config", get_config, methods=["GET"]),
        Route(base + "/{device_action}", device_action, methods=["POST"]),
    ]
