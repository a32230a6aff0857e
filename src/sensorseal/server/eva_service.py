"""The EVA ICS v3 server role in `sensorseal serve`: answer encrypted API calls over MQTT.

`sensorseal.compat.eva.EvaServer` verifies a request frame, dispatches its JSON-RPC methods and
seals the answer, all pure. This module is the worker around it:

    subscribe {space/}controller/{product}/{system}/api/request        (QoS 1)
    on each frame: EvaServer.handle -> publish the reply on .../api/response/{request_id}
    on connect: announce {product}/{system} on {space/}controller/discovery

API keys come from the registry (`sensorseal eva key add`, stored wrapped under the KEK) and
are cached for `key_ttl_s` (5 s), so a removed key stops working within that time. A frame
that fails any check gets no answer and one audit event (transport `mqtt-eva`), as EVA does.

The methods answered (`handlers`): `test` (who we are) and `item.state` (the latest reading of
a device, `i` = `sensor:<24-hex id>`, or of every device up to 100 without `i`). Any key that is
registered may call them: one EVA key reads every device's latest reading. Actions on devices
are not offered; use sensorseal's native commands and RPC (sensorseal.mqtt.rpc).

The broker is the server's own MQTT broker when that is an external one (`--mqtt-url`), or any
broker named by `EvaOptions.broker_url`. It needs no trust: it only routes ciphertext.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sensorseal import __version__
from sensorseal.compat import eva
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.registry import Registry
from sensorseal.store.base import AuditEvent, DeviceRecord, DeviceStatus, Store

__all__ = ["EvaOptions", "EvaService", "eva_handlers"]

log = logging.getLogger(__name__)

KEY_TTL_S: Final = 5.0
MAX_CACHED_KEYS: Final = 1024
MAX_LISTED: Final = 100
_OID_PREFIX: Final = "sensor:"


def _split_url(url: str) -> tuple[bool, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"not a broker URL: {url[:80]!r}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.username:
        raise ConfigError("an EVA broker is mqtt://HOST:PORT or mqtts://HOST:PORT "
                          "(credentials from the environment, never in the URL)")
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port or (8883 if tls else 1883)


@dataclass(frozen=True)
class EvaOptions:
    """`--eva-product/--eva-system[/--eva-space]`, and which broker to use (a URL; the CLI
    fills in the server's own one). `ca` for mqtts://; credentials from the environment."""

    product: str
    system: str
    space: str | None = None
    broker_url: str | None = None
    ca: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        eva.request_topic(self.product, self.system, self.space)  # ConfigError if invalid
        if self.broker_url is not None:
            _split_url(self.broker_url)


def _reading(record: DeviceRecord, store: Store) -> dict[str, Any]:
    rows = store.telemetry(device_id=record.device_id, limit=1)
    item: dict[str, Any] = {"oid": f"{_OID_PREFIX}{record.device_id}", "name": record.name,
                            "status": 1 if record.status is DeviceStatus.ACTIVE else 0,
                            "value": None, "t": None}
    if rows:
        try:
            value = rows[0].payload.decode("utf-8")
        except UnicodeDecodeError:
            value = base64.b64encode(rows[0].payload).decode("ascii")
        item.update(value=value, t=rows[0].received_ms / 1000)
    return item


def eva_handlers(store: Store, *, product: str,
                 system: str) -> dict[str, Callable[[str, Any], Any]]:
    """The JSON-RPC methods sensorseal answers as an EVA node (module docstring)."""

    def test(key_id: str, params: Any) -> Any:
        del key_id, params
        return {"ok": True, "product": product, "system": system,
                "product_name": "sensorseal", "version": __version__}

    def item_state(key_id: str, params: Any) -> Any:
        del key_id
        if params is None or params == {}:
            return [_reading(r, store) for r in store.list_devices(limit=MAX_LISTED)]
        oid = params.get("i") if isinstance(params, dict) else None
        if not isinstance(oid, str) or not oid.startswith(_OID_PREFIX):
            raise eva.EvaRpcError(eva.ERR_INVALID_PARAMS, "i must be sensor:<device id>")
        try:
            device_id = DeviceId.parse(oid[len(_OID_PREFIX):])
        except ConfigError:
            raise eva.EvaRpcError(eva.ERR_NOT_FOUND, "no such item") from None
        record = store.get_device(device_id)
        if record is None:
            raise eva.EvaRpcError(eva.ERR_NOT_FOUND, "no such item")
        return [_reading(record, store)]

    return {"test": test, "item.state": item_state}


class EvaService:
    """One MQTT client that answers EVA calls for (space, product, system). Thread-safe
    start/stop; frames are handled on paho's network thread, one at a time."""

    def __init__(self, registry: Registry, store: Store, options: EvaOptions, *,
                 rng: Callable[[int], bytes] = os.urandom,
                 clock: Callable[[], float] = time.time, key_ttl_s: float = KEY_TTL_S) -> None:
        if options.broker_url is None:
            raise ConfigError("the EVA endpoint needs an MQTT broker URL")
        self.options = options
        self._registry = registry
        self._store = store
        self._clock = clock
        self._key_ttl_s = key_ttl_s
        self._keys: dict[str, tuple[str | None, float]] = {}
        self._keys_lock = threading.Lock()
        self.server = eva.EvaServer(
            api_key_for=self._api_key_for,
            handlers=eva_handlers(store, product=options.product, system=options.system),
            rng=rng, clock=clock, audit=self._audit)
        self.request_topic = eva.request_topic(options.product, options.system, options.space)
        self.answered = 0
        self.ignored = 0
        self._subscribed = threading.Event()
        tls, self._host, self._port = _split_url(options.broker_url)
        client_id = f"sensorseal-eva-{rng(6).hex()}"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv311, clean_session=True)
        if options.username is not None:
            self._client.username_pw_set(options.username, options.password)
        if tls:
            self._client.tls_set(ca_certs=None if options.ca is None else str(options.ca))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 5)

    def __repr__(self) -> str:
        return f"EvaService({self.request_topic!r} via {self._host}:{self._port})"

    # -- keys and audit --------------------------------------------------------------------

    def _api_key_for(self, key_id: str) -> str | None:
        now = self._clock()
        with self._keys_lock:
            cached = self._keys.get(key_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        api_key = self._registry.eva_api_key(key_id)
        with self._keys_lock:
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()  # a flood of unknown key ids: start over, the store decides
            self._keys[key_id] = (api_key, now + self._key_ttl_s)
        return api_key

    def _audit(self, event: AuditEvent) -> None:
        try:
            self._store.add_events([event])
        except Exception:
            log.exception("could not record an EVA audit event (%s)", event.reason)

    # -- MQTT ------------------------------------------------------------------------------

    def start(self, *, wait_s: float = 10.0) -> EvaService:
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise ConfigError(f"cannot reach the EVA broker {self._host}:{self._port}: "
                              f"{exc.strerror or exc}") from None
        self._client.loop_start()
        if not self._subscribed.wait(wait_s):
            self.stop()
            raise ConfigError(f"the broker at {self._host}:{self._port} did not let the EVA "
                              f"endpoint subscribe to {self.request_topic}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any,
                    _p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("EVA endpoint: broker refused the connection (%s)", reason)
            return
        client.subscribe(self.request_topic, qos=1)
        opts = self.options
        client.publish(eva.discovery_topic(opts.space),
                       eva.discovery_payload(opts.product, opts.system), qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: Any,
                      _p: Any = None) -> None:
        if all(not getattr(r, "is_failure", False) for r in reasons):
            self._subscribed.set()
        else:
            log.warning("EVA endpoint: subscription to %s refused", self.request_topic)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.request_topic:
            return
        try:
            reply = self.server.handle(bytes(msg.payload), source=f"mqtt:{msg.topic}"[:200])
        except Exception:
            log.exception("EVA endpoint: a request could not be handled")
            reply = None
        if reply is None:
            self.ignored += 1
            return
        opts = self.options
        topic = eva.response_topic(opts.product, opts.system, reply.request_id, opts.space)
        client.publish(topic, reply.frame, qos=1)
        self.answered += 1
