"""Keep Mosquitto's dynamic security plugin in step with the sensorseal registry.

Mosquitto 2.x's dynsec plugin is driven by JSON commands published to
`$CONTROL/dynamic-security/v1`; answers arrive on `$CONTROL/dynamic-security/v1/response`, one
entry per command, with an `error` field when it failed. `DynsecAdmin` sends one command at a
time with its own correlation data, waits for the matching answer, and raises `DynsecError` for
any error: a half-applied ACL must never pass silently.

What the broker ends up holding (defence in depth; the envelope still protects content):

- one client per device, username = the 24-hex device id, password = `broker_password(...)`
  of the current epoch, with its own role `sensorseal-device-<id>` that may publish only
  `telemetry`, `state`, `acks`, `rpc/response/+` and subscribe only `commands` and
  `rpc/request` under `sensorseal/<id>/`;
- `sync_device()` maps registry status: active -> enabled, suspended -> disabled (dynsec kicks
  a connected session), revoked -> client and role deleted (dynsec kicks it too);
- a service account role for ingest workers (shared telemetry, acks, RPC responses in; commands
  and RPC requests out).
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import hashes
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from sensorseal.core.errors import ConfigError, SensorsealError
from sensorseal.core.ids import DeviceId
from sensorseal.mqtt import topics

__all__ = [
    "CONTROL_TOPIC",
    "INGEST_ROLE",
    "RESPONSE_TOPIC",
    "Acl",
    "DynsecAdmin",
    "DynsecError",
    "device_acls",
    "device_role",
    "ingest_acls",
    "password_fingerprint",
]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
INGEST_ROLE = "sensorseal-ingest"
_NOT_FOUND = {"Client not found", "Role not found"}


class DynsecError(SensorsealError):
    """The broker refused a dynsec command (or did not answer). Carries the command name and the
    broker's error text; neither contains a password."""

    def __init__(self, command: str, error: str) -> None:
        self.command = command
        self.error = error
        super().__init__(f"dynsec {command}: {error}")


@dataclass(frozen=True, slots=True)
class Acl:
    """One dynsec ACL entry. `acltype` is one of publishClientSend, publishClientReceive,
    subscribeLiteral, subscribePattern, unsubscribeLiteral, unsubscribePattern."""

    acltype: str
    topic: str
    allow: bool = True
    priority: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "allow": self.allow,
                "priority": self.priority}


def password_fingerprint(password: str) -> str:
    """A non-secret tag of a password, stored as the dynsec client's text name so that a re-sync
    can tell whether the password changed. The passwords are 256-bit HKDF outputs (or random),
    so a truncated SHA-256 of them reveals nothing usable."""
    h = hashes.Hash(hashes.SHA256())
    h.update(b"sensorseal/dynsec-fingerprint\x00" + password.encode())
    return "pwfp:" + h.finalize()[:12].hex()


def device_role(device_id: DeviceId) -> str:
    return f"sensorseal-device-{device_id.hex()}"


def device_acls(device_id: DeviceId) -> list[Acl]:
    """A device's own subtree and nothing else (see sensorseal.mqtt.topics).

    Subscriptions use `subscribeLiteral`: the filter must be exactly the device's topic, so a
    wildcard such as `sensorseal/+/commands` is refused even though it would match it.
    """
    return [
        Acl("publishClientSend", topics.telemetry(device_id)),
        Acl("publishClientSend", topics.state(device_id)),
        Acl("publishClientSend", topics.acks(device_id)),
        Acl("publishClientSend", f"{topics.PREFIX}/{device_id.hex()}/rpc/response/+"),
        Acl("subscribeLiteral", topics.commands(device_id)),
        Acl("subscribeLiteral", topics.rpc_request(device_id)),
        Acl("unsubscribeLiteral", topics.commands(device_id)),
        Acl("unsubscribeLiteral", topics.rpc_request(device_id)),
    ]


def ingest_acls() -> list[Acl]:
    """What an ingest worker may do: take device->cloud traffic (telemetry and state through a
    shared subscription or a plain one), acks and RPC responses; send commands and RPC requests.
    """
    p = topics.PREFIX
    subs = [f"$share/+/{p}/+/telemetry", f"$share/+/{p}/+/state", f"{p}/+/telemetry",
            f"{p}/+/state", f"{p}/+/acks", f"{p}/+/rpc/response/#",
            f"$share/+/{p}/+/acks", f"$share/+/{p}/+/rpc/response/#"]
    return ([Acl("subscribePattern", s) for s in subs]
            + [Acl("unsubscribePattern", s) for s in subs]
            + [Acl("publishClientSend", f"{p}/+/commands"),
               Acl("publishClientSend", f"{p}/+/rpc/request")])


@dataclass(eq=False)
class DynsecAdmin:
    """A paho-mqtt 2.x client of the dynsec control topic. Thread-safe; one command in flight
    per call. Use as a context manager or call connect()/close()."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    ca_cert: Path | None = None
    timeout: float = 5.0
    _client: mqtt.Client = field(init=False, repr=False)
    _cond: threading.Condition = field(init=False, repr=False, default_factory=threading.Condition)
    _answers: dict[str, dict[str, Any]] = field(init=False, repr=False, default_factory=dict)
    _connected: bool | None = field(init=False, repr=False, default=None)
    _subscribed: bool = field(init=False, repr=False, default=False)
    _call_lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"sensorseal-dynsec-{secrets.token_hex(6)}",
                                   protocol=mqtt.MQTTv5)
        self._client.username_pw_set(self.username, self.password)
        if self.ca_cert is not None:
            self._client.tls_set(ca_certs=str(self.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._cond:
            self._connected = not reason_code.is_failure
            self._cond.notify_all()
        if not reason_code.is_failure:
            client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self._cond:
            self._subscribed = all(not rc.is_failure for rc in reason_codes)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        responses = body.get("responses") if isinstance(body, dict) else None
        if not isinstance(responses, list):
            return
        with self._cond:
            for r in responses:
                if isinstance(r, dict) and isinstance(r.get("correlationData"), str):
                    self._answers[r["correlationData"]] = r
            self._cond.notify_all()

    # -- lifecycle
    def connect(self) -> DynsecAdmin:
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._connected is not None and (
                not self._connected or self._subscribed), self.timeout)
        if not ok or not self._connected or not self._subscribed:
            self.close()
            raise ConfigError("could not connect to the dynsec control topic "
                              f"at {self.host}:{self.port} as {self.username!r}")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> DynsecAdmin:
        return self.connect()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- commands
    def execute(self, command: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its response entry; raise DynsecError on any error."""
        corr = secrets.token_hex(8)
        payload = json.dumps({"commands": [{"command": command, "correlationData": corr,
                                             **params}]})
        with self._call_lock:
            info = self._client.publish(CONTROL_TOPIC, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DynsecError(command, f"publish failed ({mqtt.error_string(info.rc)})")
            with self._cond:
                if not self._cond.wait_for(lambda: corr in self._answers, self.timeout):
                    raise DynsecError(command, f"no response within {self.timeout}s")
                answer = self._answers.pop(corr)
        error = answer.get("error")
        if error:
            raise DynsecError(command, str(error))
        return answer

    def _get(self, command: str, key: str, **params: Any) -> dict[str, Any] | None:
        try:
            data = self.execute(command, **params).get("data", {})
        except DynsecError as exc:
            if exc.error in _NOT_FOUND:
                return None
            raise
        value = data.get(key) if isinstance(data, dict) else None
        return value if isinstance(value, dict) else None

    def get_client(self, username: str) -> dict[str, Any] | None:
        return self._get("getClient", "client", username=username)

    def get_role(self, rolename: str) -> dict[str, Any] | None:
        return self._get("getRole", "role", rolename=rolename)

    def create_client(self, username: str, password: str, *, roles: Sequence[str] = (),
                      textname: str | None = None) -> None:
        params: dict[str, Any] = {"username": username, "password": password,
                                  "roles": [{"rolename": r} for r in roles]}
        if textname:
            params["textname"] = textname
        self.execute("createClient", **params)

    def delete_client(self, username: str) -> None:
        self.execute("deleteClient", username=username)

    def enable_client(self, username: str) -> None:
        self.execute("enableClient", username=username)

    def disable_client(self, username: str) -> None:
        self.execute("disableClient", username=username)

    def set_client_password(self, username: str, password: str) -> None:
        self.execute("setClientPassword", username=username, password=password)

    def create_role(self, rolename: str, acls: Iterable[Acl]) -> None:
        self.execute("createRole", rolename=rolename, acls=[a.as_json() for a in acls])

    def delete_role(self, rolename: str) -> None:
        self.execute("deleteRole", rolename=rolename)

    def add_role_acl(self, rolename: str, acl: Acl) -> None:
        self.execute("addRoleACL", rolename=rolename, **acl.as_json())

    def add_client_role(self, username: str, rolename: str, priority: int = 0) -> None:
        self.execute("addClientRole", username=username, rolename=rolename, priority=priority)

    # -- registry mirroring
    def _ensure_role(self, rolename: str, acls: list[Acl]) -> None:
        if self.get_role(rolename) is None:
            self.create_role(rolename, acls)

    def _ensure_client(self, username: str, password: str, rolename: str, *,
                       enabled: bool) -> None:
        fingerprint = password_fingerprint(password)
        existing = self.get_client(username)
        if existing is None:
            # A throwaway password first: nobody can log in until the state below is applied,
            # so a suspended device is never briefly enabled with its real password.
            self.create_client(username, secrets.token_urlsafe(32), roles=[rolename])
            existing = {"roles": [{"rolename": rolename}], "disabled": False}
        if not enabled and not existing.get("disabled"):
            self.disable_client(username)
        if existing.get("textname") != fingerprint:
            # Mosquitto kicks a client whose password is set, even to the same value, so the
            # password is only touched when its fingerprint (kept as the text name) differs:
            # re-syncing an unchanged registry disconnects nobody.
            self.execute("modifyClient", username=username, password=password,
                         textname=fingerprint)
        roles = {r.get("rolename") for r in existing.get("roles", []) if isinstance(r, dict)}
        if rolename not in roles:
            self.add_client_role(username, rolename)
        if enabled and existing.get("disabled"):
            self.enable_client(username)

    def sync_device(self, device_id: DeviceId, status: str, password: str | None) -> None:
        """Make the broker match the registry for one device.

        `status` is a DeviceStatus value: "active" -> enabled with its own role and `password`;
        "suspended" -> disabled (a connected session is kicked); "revoked" -> deleted (kicked).
        Idempotent: safe to call for every device on every start.
        """
        username = device_id.hex()
        rolename = device_role(device_id)
        if status == "revoked":
            if self.get_client(username) is not None:
                self.delete_client(username)
            if self.get_role(rolename) is not None:
                self.delete_role(rolename)
            return
        if status not in ("active", "suspended"):
            raise ConfigError(f"unknown device status {status!r}")
        if password is None:
            raise ConfigError("an active or suspended device needs its broker password")
        self._ensure_role(rolename, device_acls(device_id))
        self._ensure_client(username, password, rolename, enabled=status == "active")

    def ensure_service_account(self, username: str, password: str) -> None:
        """Create or update the ingest workers' account with the `sensorseal-ingest` role."""
        if not username or username == self.username:
            raise ConfigError("the service account needs its own username")
        self._ensure_role(INGEST_ROLE, ingest_acls())
        self._ensure_client(username, password, INGEST_ROLE, enabled=True)
