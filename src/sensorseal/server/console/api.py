"""The console's JSON API: what the live pages poll, and what scoped machine tokens use.

Authenticated by the session cookie (pages) or `Authorization: Bearer` (an API token, scoped to
groups, or the installation's operator token). A POST authenticated by cookie must also carry
the session's CSRF token in `X-CSRF-Token`; a bearer request carries no ambient credential and
needs none.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sensorseal.core.errors import ConfigError
from sensorseal.operators import Principal, Role
from sensorseal.server.console.pages import parse_event_filters, scoped_events
from sensorseal.server.console.web import BadForm, ConsoleContext, Denied, api
from sensorseal.store.base import AuditEvent, DeviceRecord, TelemetryRow

__all__ = ["api_routes", "numeric_values"]

MAX_VALUES = 12


def numeric_values(payload: bytes) -> dict[str, float]:
    """Numbers at the top level of a JSON object payload (what the chart can draw)."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in doc.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and len(out) < \
                MAX_VALUES and len(key) <= 40 and abs(value) < 1e15:
            out[key] = float(value)
    return out


def _row(r: TelemetryRow) -> dict[str, Any]:
    text = r.payload[:300].decode("utf-8", "replace")
    return {"seq": r.seq, "epoch": r.epoch, "received_ms": r.received_ms,
            "device_ts_ms": r.device_ts_ms, "level": r.level, "transport": r.transport,
            "values": numeric_values(r.payload), "payload": text}


def _event(e: AuditEvent) -> dict[str, Any]:
    return {"at_ms": e.at_ms, "reason": e.reason, "transport": e.transport, "source": e.source,
            "device": e.device_id, "detail": e.detail}


def _device(r: DeviceRecord, group: str | None) -> dict[str, Any]:
    return {"id": r.device_id.hex(), "name": r.name, "status": r.status.value,
            "epoch": r.epoch, "policy": r.policy, "group": group,
            "created_ms": r.created_ms, "last_seen_ms": r.last_seen_ms}


def _me(request: Request) -> Principal:
    principal: Principal = request.scope["ss.principal"]
    return principal


def _limit(request: Request, default: int, hi: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= hi:
        raise BadForm(f"limit must be an integer from 1 to {hi}")
    return int(raw)


def api_routes(ctx: ConsoleContext) -> list[Route]:

    async def whoami(request: Request) -> Response:
        me = _me(request)
        return JSONResponse({"name": me.name, "role": me.role.label, "kind": me.kind,
                             "groups": None if me.groups is None else sorted(me.groups)})

    async def devices(request: Request) -> Response:
        rows = await run_in_threadpool(ctx.visible_devices, _me(request))
        return JSONResponse({"devices": [_device(r, g) for r, g in rows]})

    async def device(request: Request) -> Response:
        record = await run_in_threadpool(ctx.visible_device, _me(request),
                                         request.path_params["device_id"])
        return JSONResponse(_device(record, ctx.policies.group_of(record.device_id)))

    async def telemetry(request: Request) -> Response:
        limit = _limit(request, 100, 1000)
        record = await run_in_threadpool(ctx.visible_device, _me(request),
                                         request.path_params["device_id"])
        rows = await run_in_threadpool(ctx.store.telemetry, device_id=record.device_id,
                                       limit=limit)
        return JSONResponse({"device": record.device_id.hex(), "status": record.status.value,
                             "last_seen_ms": record.last_seen_ms,
                             "telemetry": [_row(r) for r in rows]})

    async def events(request: Request) -> Response:
        limit = _limit(request, 100, 1000)
        reason, device_hex, since_ms = parse_event_filters(request.query_params, ctx.now_ms())
        found = await run_in_threadpool(scoped_events, ctx, _me(request), reason, device_hex,
                                        since_ms, limit)
        return JSONResponse({"events": [_event(e) for e in found]})

    async def policies(request: Request) -> Response:
        specs = await run_in_threadpool(ctx.policies.all)
        return JSONResponse({"policies": [json.loads(s.to_json()) | {"builtin": s.builtin}
                                          for s in specs.values()]})

    async def set_status(request: Request) -> Response:
        me = _me(request)
        if me.kind == "session":
            session = await ctx.session(request)
            sent = request.headers.get("x-csrf-token", "")
            if session is None or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                raise Denied("missing or wrong X-CSRF-Token")
        record = await run_in_threadpool(ctx.visible_device, me,
                                         request.path_params["device_id"])
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise BadForm("send application/json")
        body = await request.body()
        try:
            doc = json.loads(body) if len(body) <= 4096 else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        action = doc.get("action") if isinstance(doc, dict) else None
        if action not in ("suspend", "resume", "revoke"):
            raise BadForm('body must be {"action": "suspend" | "resume" | "revoke"}')
        try:
            updated = await run_in_threadpool(getattr(ctx.registry, action), record.device_id,
                                              actor=me.name, transport="api")
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        ctx.pipeline.invalidate(record.device_id)
        return JSONResponse(_device(updated, ctx.policies.group_of(updated.device_id)))

    base = "/console/api"
    return [
        Route(f"{base}/whoami", api(ctx)(whoami), methods=["GET"]),
        Route(f"{base}/devices", api(ctx)(devices), methods=["GET"]),
        Route(f"{base}/devices/{{device_id}}", api(ctx)(device), methods=["GET"]),
        Route(f"{base}/devices/{{device_id}}/telemetry", api(ctx)(telemetry), methods=["GET"]),
        Route(f"{base}/devices/{{device_id}}/status", api(ctx, Role.OPERATOR)(set_status),
              methods=["POST"]),
        Route(f"{base}/events", api(ctx)(events), methods=["GET"]),
        Route(f"{base}/policies", api(ctx)(policies), methods=["GET"]),
    ]
