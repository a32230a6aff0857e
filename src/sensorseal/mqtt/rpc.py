"""Encrypted JSON-RPC 2.0 over MQTT (after EVA ICS's encrypted RPC).

    caller (cloud)                         broker (hostile)                         device
    seal_down({"jsonrpc":"2.0","id":R,...}) -> sensorseal/<id>/rpc/request ------> open_downlink
                                                                                  dispatch(method)
    open_up(response) <------------- sensorseal/<id>/rpc/response/<R> <---------- seal (uplink)

Requests and responses are always level `sealed`. The request id R is 16 random bytes in hex,
fresh per call: it is inside the sealed request and names the response topic, and the response
is bound to that topic by the envelope's route, so a response cannot be moved to another call.
The key id (the device id) is in clear in the COSE header, as it must be for the receiver to
pick its key; nothing else is.

A request that does not verify (forged, replayed, bit-flipped, moved from another device) is
ignored: no response at all, so a prober learns nothing; the device counts it by reason. An
authentic request that is not valid JSON-RPC gets a JSON-RPC error response (-32600), a missing
method -32601, bad params -32602, a failing handler -32603 (without its exception text).
The caller raises `RpcTimeout` when no verified response arrived in time and `RpcError` for an
error response.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.mqtt import topics
from sensorseal.mqtt.commands import CloudLink, CloudStats, MqttSession
from sensorseal.store.base import AuditEvent, Store

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "RpcClient",
    "RpcDispatcher",
    "RpcError",
    "RpcTimeout",
    "decode_request",
    "encode_request",
]

log = logging.getLogger(__name__)

INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32600, -32601, -32602, -32603
_REQ_ID = re.compile(r"[0-9a-f]{1,64}")
_MAX_METHOD = 128

Handler = Callable[..., Any]


class RpcTimeout(TimeoutError):
    """No verified response in time. The call may or may not have run on the device."""


class RpcError(Exception):
    """The device answered with a JSON-RPC error object."""

    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def encode_request(request_id: str, method: str, params: Any) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        body["params"] = params
    return _dumps(body)


def decode_request(data: bytes) -> tuple[str, str, Any]:
    """(id, method, params) of an authentic request; Rejected(MALFORMED) if it is not JSON-RPC
    2.0 and has no readable id. With a readable id but an invalid shape, method is "" so that
    the error can still be answered."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(RejectReason.MALFORMED, "request is not JSON") from None
    if not isinstance(body, dict):
        raise Rejected(RejectReason.MALFORMED, "request is not an object")
    req_id = body.get("id")
    if not isinstance(req_id, str) or not _REQ_ID.fullmatch(req_id):
        raise Rejected(RejectReason.MALFORMED, "request id must be 1-64 lowercase hex")
    method = body.get("method")
    params = body.get("params")
    if (body.get("jsonrpc") != "2.0" or not isinstance(method, str)
            or not 0 < len(method) <= _MAX_METHOD or not isinstance(params, list | dict | None)):
        return req_id, "", None
    return req_id, method, params


class RpcDispatcher:
    """The device's registry of RPC methods: `register("name", fn)`, then `handle(...)`."""

    def __init__(self) -> None:
        self._methods: dict[str, Handler] = {}

    def register(self, name: str, fn: Handler) -> None:
        self._methods[name] = fn

    def method(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of `register`."""
        def deco(fn: Handler) -> Handler:
            self.register(name, fn)
            return fn
        return deco

    def handle(self, request: bytes) -> tuple[str, bytes]:
        """Run an authentic request; return (request id, JSON response bytes).

        Raises Rejected(MALFORMED) only when no request id can be read (nothing to answer to).
        """
        req_id, method, params = decode_request(request)
        if not method:
            return req_id, self._error(req_id, INVALID_REQUEST, "invalid request")
        fn = self._methods.get(method)
        if fn is None:
            return req_id, self._error(req_id, METHOD_NOT_FOUND, "method not found")
        try:
            if isinstance(params, dict):
                result = fn(**params)
            elif isinstance(params, list):
                result = fn(*params)
            else:
                result = fn()
        except TypeError:
            return req_id, self._error(req_id, INVALID_PARAMS, "invalid params")
        except Exception:
            log.exception("rpc method %s failed", method)
            return req_id, self._error(req_id, INTERNAL_ERROR, "internal error")
        try:
            return req_id, _dumps({"jsonrpc": "2.0", "id": req_id, "result": result})
        except (TypeError, ValueError):
            return req_id, self._error(req_id, INTERNAL_ERROR, "result is not JSON")

    @staticmethod
    def _error(req_id: str, code: int, message: str) -> bytes:
        return _dumps({"jsonrpc": "2.0", "id": req_id,
                       "error": {"code": code, "message": message}})


def _decode_response(data: bytes, req_id: str) -> Any:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(RejectReason.MALFORMED, "response is not JSON") from None
    if not isinstance(body, dict) or body.get("jsonrpc") != "2.0" or body.get("id") != req_id:
        raise Rejected(RejectReason.MALFORMED, "response is not JSON-RPC 2.0 for this call")
    if "error" in body:
        err = body["error"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), int):
            raise Rejected(RejectReason.MALFORMED, "malformed error object")
        return RpcError(err["code"], str(err.get("message", "")))
    return body.get("result")


class RpcClient:
    """The caller's side: `call(device_id, method, params, timeout) -> result`."""

    def __init__(self, link: CloudLink, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None,
                 audit: Store | None = None, protocol: MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self._link = link
        self._audit = audit
        self._pending: dict[str, tuple[DeviceId, Future[Any]]] = {}
        self._lock = threading.Lock()
        self.stats = CloudStats()
        self._session = MqttSession(host, port, [f"{topics.PREFIX}/+/rpc/response/+"],
                                    self._on_response, username=username, password=password,
                                    tls_ca=tls_ca, protocol=protocol)

    def start(self, timeout: float = 10.0) -> RpcClient:
        self._session.start(timeout)
        return self

    def stop(self) -> None:
        self._session.stop()

    def __enter__(self) -> RpcClient:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def call(self, device_id: DeviceId, method: str, params: Any = None,
             timeout: float = 5.0) -> Any:
        """Call `method` on the device. Raises RpcTimeout, or RpcError for an error answer."""
        req_id = secrets.token_hex(16)
        route = topics.rpc_request(device_id)
        data = self._link.seal_down(device_id, encode_request(req_id, method, params), route)
        fut: Future[Any] = Future()
        with self._lock:
            self._pending[req_id] = (device_id, fut)
        try:
            self._session.publish(route, data, qos=1)
            self.stats.sent += 1
            outcome = fut.result(timeout)
        except FutureTimeout:
            raise RpcTimeout(f"no verified response from {device_id} to {method!r:.40} "
                             f"within {timeout}s") from None
        finally:
            with self._lock:
                self._pending.pop(req_id, None)
        if isinstance(outcome, RpcError):
            raise outcome
        return outcome

    def _refuse(self, device: str | None, exc: Rejected) -> None:
        self.stats.rejected[exc.reason.value] += 1
        log.warning("rpc response refused: %s", exc)
        if self._audit is not None:
            try:
                self._audit.add_events([AuditEvent(self._now(), exc.reason.value, "mqtt", "rpc",
                                                   device, f"rpc response: {exc.detail}")])
            except Exception:
                log.exception("could not audit a refused rpc response")

    @staticmethod
    def _now() -> int:
        return time.time_ns() // 1_000_000

    def _on_response(self, topic: str, data: bytes) -> None:
        try:
            device_id, kind = topics.device_of(topic)
        except Rejected as exc:
            self._refuse(None, exc)
            return
        req_id = kind.rpartition("/")[2]
        with self._lock:
            entry = self._pending.get(req_id)
        if entry is None or entry[0] != device_id:
            self.stats.unmatched += 1  # not a call of ours (another caller, or too late)
            return
        try:
            outcome = _decode_response(self._link.open_up(device_id, data, topic).payload,
                                       req_id)
        except Rejected as exc:
            self._refuse(device_id.hex(), exc)
            return
        self.stats.completed += 1
        if not entry[1].done():
            entry[1].set_result(outcome)
