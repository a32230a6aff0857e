"""HTTP routes for legacy devices: thin adapters from HTTP to `CompatIngest`.

Routes (docs/compat.md has the formats and curl examples)::

    POST /v1/compat/valarm      application/json + X-Valarm-Signature  -> 202 | generic 4xx
    POST /v1/compat/yoctopuce   a hub's Yocto-API callback             -> 200 + hub commands
    POST /v1/compat/waspmote    one frame: application/octet-stream,
                                or its hex as text/plain               -> 202 | generic 4xx
    GET  /v1/compat/stats                                    operator: legacy counters
    POST /v1/compat/devices/{device_id}/commands   {"url": "/bySerial/..."}   operator:
                                queue a Yoctopuce hub command

Like the native routes, a refused sender learns only a status and a word; the reason goes to
the audit log. Bodies are read with a running limit, so a huge upload costs at most the limit.
Every request also gives `CompatIngest.maybe_sweep` a chance to finish migrations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sensorseal.compat import valarm, waspmote, yoctopuce
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId
from sensorseal.registry import Registry
from sensorseal.server.compat_ingest import (
    VALARM_ROUTE,
    WASPMOTE_ROUTE,
    YOCTOPUCE_ROUTE,
    CompatIngest,
    Outcome,
)
from sensorseal.server.pipeline import IngestUnavailable
from sensorseal.store.base import Store

__all__ = ["compat_routes"]

log = logging.getLogger(__name__)

TRANSPORT = "http"
_WASP_HEX_MAX = 2 * waspmote.DEFAULT_MAX_SIZE + 2  # hex text, maybe with a newline
_COMMAND_BODY_MAX = 4096

Handler = Callable[[Request], Any]


class _Refused(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _generic(status: int) -> JSONResponse:
    return JSONResponse({"status": "unavailable" if status == 503 else "rejected"},
                        status_code=status)


def _source(request: Request) -> str:
    client = request.client
    return "unknown" if client is None else f"{client.host}:{client.port}"


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (OVERSIZE) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise _Refused(RejectReason.MALFORMED, "bad Content-Length")
        if int(declared) > limit:
            raise _Refused(RejectReason.OVERSIZE, f"declared {declared[:20]} bytes > {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _Refused(RejectReason.OVERSIZE, f"body over the limit of {limit} bytes")
    return bytes(body)


def compat_routes(registry: object, store: Store, *,
                  operator: Callable[[Handler], Handler]) -> list[Route]:
    """The legacy routes, or none when the registry or store has no legacy support.

    `operator` wraps a handler with the app's operator-token check.
    """
    if not isinstance(registry, Registry) or not hasattr(store, "get_legacy"):
        return []
    compat = CompatIngest(registry, store)
    reg: Registry = registry

    async def run(fmt: str, request: Request, call: Callable[[bytes], Outcome],
                  limit: int) -> Outcome | Response:
        """Read the body and run the format; a Response when refused before the format ran."""
        source = _source(request)
        try:
            body = await _read_body(request, limit)
        except _Refused as exc:
            await run_in_threadpool(compat.reject, fmt, exc.reason, transport=TRANSPORT,
                                    source=source, detail=exc.detail)
            return _generic(Rejected(exc.reason).status)
        await run_in_threadpool(compat.maybe_sweep)
        try:
            return await run_in_threadpool(call, body)
        except IngestUnavailable:
            return _generic(503)

    def refused(outcome: Outcome) -> Response:
        assert outcome.reason is not None
        return _generic(Rejected(outcome.reason).status)

    async def post_valarm(request: Request) -> Response:
        source = _source(request)
        if _media(request) != "application/json":
            await run_in_threadpool(compat.reject, "valarm", RejectReason.WRONG_CONTENT_TYPE,
                                    transport=TRANSPORT, source=source,
                                    detail="expected application/json")
            return _generic(415)
        signature = request.headers.get(valarm.SIGNATURE_HEADER)
        result = await run(
            "valarm", request,
            lambda body: compat.valarm(body, signature, source=source, transport=TRANSPORT),
            valarm.DEFAULT_MAX_SIZE)
        if isinstance(result, Response):
            return result
        if not result.ok:
            return refused(result)
        return JSONResponse({"status": "accepted"}, status_code=202)

    async def post_yoctopuce(request: Request) -> Response:
        source = _source(request)
        user_agent = request.headers.get("user-agent")
        content_type = request.headers.get("content-type", "")
        result = await run(
            "yoctopuce", request,
            lambda body: compat.yoctopuce(body, user_agent, content_type, source=source,
                                          transport=TRANSPORT),
            yoctopuce.DEFAULT_MAX_SIZE)
        if isinstance(result, Response):
            return result
        if not result.ok:
            return refused(result)
        # The hub reads `@YoctoAPI:GET <path>` lines from the reply body.
        return Response(result.reply, status_code=200, media_type="text/plain")

    async def post_waspmote(request: Request) -> Response:
        source = _source(request)
        media = _media(request)
        if media not in ("application/octet-stream", "text/plain"):
            await run_in_threadpool(compat.reject, "waspmote", RejectReason.WRONG_CONTENT_TYPE,
                                    transport=TRANSPORT, source=source,
                                    detail="expected application/octet-stream or text/plain")
            return _generic(415)
        as_hex = media == "text/plain"

        def call(body: bytes) -> Outcome:
            frame: bytes | str = body.decode("ascii", "replace") if as_hex else body
            return compat.waspmote_frame(frame, "http", source=source, transport=TRANSPORT)

        limit = _WASP_HEX_MAX if as_hex else waspmote.DEFAULT_MAX_SIZE
        result = await run("waspmote", request, call, limit)
        if isinstance(result, Response):
            return result
        if not result.ok:
            return refused(result)
        return JSONResponse({"status": "accepted", "weak": True,
                             "migrate": "native envelope: sensorseal device migrate ID "
                                        "--to native"}, status_code=202)

    async def stats(request: Request) -> Response:
        body: dict[str, Any] = compat.stats.as_json()
        body["migrating"] = await run_in_threadpool(compat.migrating)
        return JSONResponse(body)

    async def queue_command(request: Request) -> Response:
        try:
            device_id = DeviceId.parse(request.path_params["device_id"])
            raw = await _read_body(request, _COMMAND_BODY_MAX)
            doc = json.loads(raw)
            if not isinstance(doc, dict) or set(doc) != {"url"} or not isinstance(doc["url"],
                                                                                   str):
                raise ConfigError('body must be {"url": "/bySerial/<serial>/api/...?..."}')
            command_id = await run_in_threadpool(
                lambda: reg.queue_legacy_command(device_id, doc["url"], actor="operator",
                                                 transport=TRANSPORT))
        except (ConfigError, ValueError, _Refused) as exc:
            return JSONResponse({"error": str(exc)[:300]}, status_code=400)
        return JSONResponse({"id": command_id, "status": "queued"}, status_code=201)

    return [
        Route(VALARM_ROUTE, post_valarm, methods=["POST"]),
        Route(YOCTOPUCE_ROUTE, post_yoctopuce, methods=["POST"]),
        Route(WASPMOTE_ROUTE, post_waspmote, methods=["POST"]),
        Route("/v1/compat/stats", operator(stats), methods=["GET"]),
        Route("/v1/compat/devices/{device_id}/commands", operator(queue_command),
              methods=["POST"]),
    ]
