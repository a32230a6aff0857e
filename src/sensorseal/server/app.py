"""The HTTP adapter: envelopes in over POST, operator reads behind a bearer token.

Thin on purpose: it moves bytes between HTTP and the pipeline and renders results with one table
(`Rejected.status`). Devices authenticate through their envelopes alone. A refused sender learns
only a generic failure (403, or 400/413/415 for shape problems); the precise reason goes to the
audit log, where operators can read it through `GET /v1/events`.

Routes::

    POST /v1/messages        one envelope, Content-Type application/cose    -> 202 | 4xx
    POST /v1/messages:batch  CBOR array of envelopes, application/cbor      -> 200 [0|1, ...]
    GET  /healthz            no auth
    GET  /v1/devices, /v1/devices/{id}, /v1/telemetry, /v1/events           bearer token

Bodies are read with a running size limit, so a huge upload costs at most the limit. The
pipeline, the store and the token check block, so they run in worker threads and the event loop
keeps serving.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cbor2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.server.compat_routes import compat_routes
from sensorseal.server.pipeline import IngestUnavailable, Pipeline, RegistryView
from sensorseal.store.base import AuditEvent, DeviceRecord, Store, TelemetryRow

if TYPE_CHECKING:
    from sensorseal.mqtt.embedded import BrokerAuth
    from sensorseal.server.console import Console
    from sensorseal.updates.server import UpdateService

__all__ = ["MESSAGES_ROUTE", "create_app"]

log = logging.getLogger(__name__)

MESSAGES_ROUTE = "/v1/messages"
TRANSPORT = "http"
MAX_LIST_LIMIT = 1000
_COSE_TYPES = frozenset({"cose-encrypt0", "cose-mac0"})
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class _Refused(Exception):
    """A request refused before the pipeline: rendered as a generic status, audited."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _BadQuery(Exception):
    """An operator's query parameter that we cannot use; the text is shown to the operator."""


def _generic(status: int) -> JSONResponse:
    """The only thing a refused sender learns: a status and a word."""
    word = "unavailable" if status == 503 else "rejected"
    return JSONResponse({"status": word}, status_code=status)


def _source(request: Request) -> str:
    client = request.client
    return "unknown" if client is None else f"{client.host}:{client.port}"


def _media_type(request: Request) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into a lowercase type and its parameters (RFC 9110 8.3)."""
    raw = request.headers.get("content-type", "")
    kind, _, rest = raw.partition(";")
    params: dict[str, str] = {}
    for part in rest.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            params[name.strip().lower()] = value.strip().strip('"').lower()
    return kind.strip().lower(), params


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (OVERSIZE) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Refused(RejectReason.MALFORMED, "bad Content-Length")
        if int(declared) > limit:
            raise _Refused(RejectReason.OVERSIZE, f"declared {declared} bytes > limit {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _Refused(RejectReason.OVERSIZE, f"body over the limit of {limit} bytes")
    return bytes(body)


_HEAD_WIDTH = {24: 1, 25: 2, 26: 4, 27: 8}


def _array_head(body: bytes) -> tuple[int, int]:
    """(item count, head size) of a definite-length CBOR array (RFC 8949 3.1), read before
    decoding so that a huge announced count costs nothing."""
    if not body or body[0] >> 5 != 4:
        raise _Refused(RejectReason.MALFORMED, "batch is not a CBOR array")
    info = body[0] & 0x1F
    if info < 24:
        return info, 1
    width = _HEAD_WIDTH.get(info)
    if width is None or len(body) < 1 + width:
        raise _Refused(RejectReason.MALFORMED, "batch array has no definite length")
    return int.from_bytes(body[1:1 + width], "big"), 1 + width


def _bstr_head_len(n: int) -> int:
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5


def _decode_batch(body: bytes, max_batch: int) -> list[bytes]:
    count, head = _array_head(body)
    if count > max_batch:
        raise _Refused(RejectReason.OVERSIZE, f"batch of {count} items > limit {max_batch}")
    try:
        # Depth 1: an array of plain byte strings; any tag or nested container is refused by
        # the decoder before it builds anything from it.
        items = cbor2.loads(body, max_depth=1, allow_indefinite=False)
    except Exception:
        raise _Refused(RejectReason.MALFORMED, "batch is not well-formed CBOR") from None
    if type(items) is not list or not all(type(item) is bytes for item in items):
        raise _Refused(RejectReason.MALFORMED, "batch is not an array of byte strings")
    # The decoder stops after the first item: anything after it, or a byte string with a
    # longer head than needed, changes the size. One encoding per batch, nothing smuggled.
    if head + sum(_bstr_head_len(len(item)) + len(item) for item in items) != len(body):
        raise _Refused(RejectReason.MALFORMED, "non-canonical batch framing or trailing bytes")
    return items


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "application/cbor" not in accept


# -- operator views ------------------------------------------------------------------------------

def _device_json(r: DeviceRecord) -> dict[str, Any]:
    return {"id": r.device_id.hex(), "name": r.name, "status": r.status.value, "epoch": r.epoch,
            "policy": r.policy, "created_ms": r.created_ms, "last_seen_ms": r.last_seen_ms}


def _telemetry_json(r: TelemetryRow) -> dict[str, Any]:
    try:
        payload, encoding = r.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(r.payload).decode("ascii"), "base64"
    return {"device": r.device_id.hex(), "epoch": r.epoch, "seq": r.seq,
            "received_ms": r.received_ms, "device_ts_ms": r.device_ts_ms, "level": r.level,
            "route": r.route, "transport": r.transport, "payload": payload,
            "encoding": encoding}


def _event_json(e: AuditEvent) -> dict[str, Any]:
    return {"at_ms": e.at_ms, "reason": e.reason, "transport": e.transport, "source": e.source,
            "device": e.device_id, "detail": e.detail}


def _query(request: Request, allowed: frozenset[str]) -> Mapping[str, str]:
    params = request.query_params
    unknown = sorted(set(params.keys()) - allowed)
    if unknown:
        raise _BadQuery(f"unknown query parameter {unknown[0]!r:.40}; "
                        f"allowed: {', '.join(sorted(allowed)) or 'none'}")
    for name in params:
        if len(params.getlist(name)) > 1:
            raise _BadQuery(f"query parameter {name!r} given more than once")
    return params


def _int_param(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9 or not lo <= int(raw) <= hi:
        raise _BadQuery(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _device_param(raw: str) -> DeviceId:
    try:
        return DeviceId.parse(raw)
    except ConfigError:
        raise _BadQuery("device id must be 24 hexadecimal characters") from None


# -- the application -------------------------------------------------------------------------

def create_app(pipeline: Pipeline, registry: RegistryView, store: Store, *,
               token_check: Callable[[str], bool], max_body: int = 1_048_576,
               max_batch: int = 10_000, console: bool | Console = False,
               broker_auth: BrokerAuth | None = None,
               extra_routes: Sequence[BaseRoute] = (),
               updates: UpdateService | None = None) -> Starlette:
    """Build the Starlette app. `token_check` compares an operator token in constant time.

    `registry` is accepted for the routes that will change devices; reads go to `store`.
    `console=True` (or a prepared `Console`) adds the web console, its JSON API, stored
    policies enforced at ingest, /metrics, /openapi.json and /docs (sensorseal.server.console).
    `broker_auth` mounts /mqtt/auth/{user,acl,superuser} for an external broker's HTTP auth
    backend (sensorseal.mqtt.broker_auth, docs/brokers.md).
    `extra_routes` are mounted as given: the Cloud IoT Core HTTP bridge under /v1/projects/...
    (sensorseal.server.iotcore_service), which authenticates devices by their JWT itself.
    `updates` adds the update distribution routes under /v1/updates (sensorseal.updates.server).
    """
    extra: list[BaseRoute] = []
    middleware: list[Middleware] = []
    if console is not False:
        from sensorseal.server.console import Console
        from sensorseal.server.metrics import LatencyMiddleware

        if console is True:
            console = Console(pipeline, registry, store, token_check=token_check)
        token_check = console.token_check(token_check)
        extra = console.routes()
        middleware = [Middleware(LatencyMiddleware, metrics=console.metrics)]
    compat_registry = registry  # for the legacy routes (sensorseal.server.compat_routes)
    # Gateways (sensorseal.gateway): POST /v1/gateway/batch, and the layers a device's network
    # requires enforced on the direct routes too (None: no gateway tables in this store).
    from sensorseal.gateway.routes import gateway_ingest_for, gateway_routes, is_tls

    gateways = gateway_ingest_for(pipeline, registry, store)
    del registry  # reads need only the store today

    def direct(request: Request) -> dict[str, Any]:
        return {} if gateways is None else {"opener": gateways.direct_opener(is_tls(request))}

    async def refuse(request: Request, exc: _Refused) -> Response:
        await run_in_threadpool(pipeline.reject, exc.reason, transport=TRANSPORT,
                                source=_source(request), detail=exc.detail)
        return _generic(Rejected(exc.reason).status)

    async def post_message(request: Request) -> Response:
        try:
            kind, params = _media_type(request)
            if kind != "application/cose" or params.get("cose-type", "cose-encrypt0") \
                    not in _COSE_TYPES:
                raise _Refused(RejectReason.WRONG_CONTENT_TYPE,
                               f"content type {kind[:60]!r} is not application/cose")
            body = await _read_body(request, pipeline.max_size)
        except _Refused as exc:
            return await refuse(request, exc)
        try:
            [result] = await run_in_threadpool(pipeline.ingest, [(body, MESSAGES_ROUTE)],
                                               transport=TRANSPORT, source=_source(request),
                                               **direct(request))
        except IngestUnavailable:
            return _generic(503)
        if result.ok:
            return JSONResponse({"status": "accepted"}, status_code=202)
        assert result.reason is not None
        return _generic(Rejected(result.reason).status)

    async def post_batch(request: Request) -> Response:
        try:
            kind, _ = _media_type(request)
            if kind != "application/cbor":
                raise _Refused(RejectReason.WRONG_CONTENT_TYPE,
                               f"content type {kind[:60]!r} is not application/cbor")
            body = await _read_body(request, max_body)
            envelopes = _decode_batch(body, max_batch)
        except _Refused as exc:
            return await refuse(request, exc)
        items = [(data, MESSAGES_ROUTE) for data in envelopes]
        try:
            results = await run_in_threadpool(pipeline.ingest, items, transport=TRANSPORT,
                                              source=_source(request), **direct(request))
        except IngestUnavailable:
            return _generic(503)
        codes = [0 if r.ok else 1 for r in results]
        if _wants_json(request):
            return JSONResponse({"results": codes, "accepted": codes.count(0),
                                 "rejected": codes.count(1)})
        return Response(cbor2.dumps(codes), media_type="application/cbor")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        if len(token) <= 512 and await run_in_threadpool(token_check, token):
            return True
        event = AuditEvent(pipeline.now_ms(), "auth_failed", TRANSPORT, _source(request), None,
                           f"bad operator token on {request.url.path[:100]}")
        try:
            await run_in_threadpool(store.add_events, [event])
        except Exception:
            log.exception("could not record an auth_failed event")
        return False

    def unauthorized() -> Response:
        return JSONResponse({"error": "unauthorized"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="sensorseal"'})

    def operator(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Wrap an operator read: token first, then the handler; bad queries become 400."""
        async def endpoint(request: Request) -> Response:
            if not await authorized(request):
                return unauthorized()
            try:
                result: Response = await handler(request)
                return result
            except _BadQuery as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return endpoint

    async def list_devices(request: Request) -> Response:
        params = _query(request, frozenset({"limit", "offset"}))
        limit = _int_param(params, "limit", 100, 1, MAX_LIST_LIMIT)
        offset = _int_param(params, "offset", 0, 0, 10**9)
        records = await run_in_threadpool(store.list_devices, limit=limit, offset=offset)
        return JSONResponse({"devices": [_device_json(r) for r in records]})

    async def get_device(request: Request) -> Response:
        _query(request, frozenset())
        device_id = _device_param(request.path_params["device_id"])
        record = await run_in_threadpool(store.get_device, device_id)
        if record is None:
            return JSONResponse({"error": "no such device"}, status_code=404)
        return JSONResponse(_device_json(record))

    async def telemetry(request: Request) -> Response:
        params = _query(request, frozenset({"device", "limit"}))
        limit = _int_param(params, "limit", 100, 1, MAX_LIST_LIMIT)
        raw = params.get("device")
        device_id = None if raw is None else _device_param(raw)
        if device_id is not None and await run_in_threadpool(store.get_device, device_id) is None:
            return JSONResponse({"error": "no such device"}, status_code=404)
        rows = await run_in_threadpool(store.telemetry, device_id=device_id, limit=limit)
        return JSONResponse({"telemetry": [_telemetry_json(r) for r in rows]})

    async def events(request: Request) -> Response:
        params = _query(request, frozenset({"reason", "device", "limit"}))
        limit = _int_param(params, "limit", 100, 1, MAX_LIST_LIMIT)
        reason = params.get("reason")
        if reason is not None and not _REASON_RE.fullmatch(reason):
            raise _BadQuery("reason must be a reason name such as 'bad_mac' or 'replay'")
        raw = params.get("device")
        device = None if raw is None else _device_param(raw).hex()
        found = await run_in_threadpool(store.events, reason=reason, device_id=device,
                                        limit=limit)
        return JSONResponse({"events": [_event_json(e) for e in found]})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return JSONResponse({"error": "internal error"}, status_code=500)

    routes: list[BaseRoute] = [
        Route(MESSAGES_ROUTE, post_message, methods=["POST"]),
        Route(MESSAGES_ROUTE + ":batch", post_batch, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/devices", operator(list_devices), methods=["GET"]),
        Route("/v1/devices/{device_id}", operator(get_device), methods=["GET"]),
        Route("/v1/telemetry", operator(telemetry), methods=["GET"]),
        Route("/v1/events", operator(events), methods=["GET"]),
        *extra,
    ]
    routes += compat_routes(compat_registry, store, operator=operator)
    if gateways is not None:
        routes += gateway_routes(gateways, pipeline)
    if updates is not None:
        from sensorseal.updates.server import update_routes

        routes += update_routes(updates, pipeline, opener_for=direct)
    if broker_auth is not None:
        from sensorseal.mqtt.broker_auth import broker_auth_routes

        routes += broker_auth_routes(broker_auth.check_login, broker_auth.check_topic)
    routes += extra_routes
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error, Exception: server_error})
