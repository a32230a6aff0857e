"""Console pages: fleet overview, device page and its actions, provisioning, security events."""

from __future__ import annotations

import logging
from typing import Any

import segno
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.operators import Principal, Role
from sensorseal.policies import check_group
from sensorseal.server.console.auth import read_form
from sensorseal.server.console.web import BadForm, ConsoleContext, Denied, page, redirect
from sensorseal.store.base import DeviceRecord

__all__ = ["REASONS", "page_routes", "parse_event_filters"]

log = logging.getLogger("sensorseal.console")
ONLINE_MS = 5 * 60 * 1000
REASONS = sorted({r.value for r in RejectReason} | {
    "device_added", "device_renamed", "device_suspended", "device_resumed", "device_revoked",
    "device_group_set", "device_policy_set", "policy_saved", "policy_attached", "auth_failed",
    "login_failed"})
SINCE = {"15m": 15 * 60_000, "1h": 3_600_000, "24h": 86_400_000, "7d": 7 * 86_400_000}
NOTICES = {"renamed": "Device renamed.", "suspended": "Device suspended.",
           "resumed": "Device resumed.", "revoked": "Device revoked. Its messages are refused.",
           "group": "Group changed.", "policy": "Policy changed."}


def _me(request: Request) -> Principal:
    session = request.scope["ss.session"]
    principal: Principal = session.principal
    return principal


def parse_event_filters(params: Any, now_ms: int) -> tuple[str | None, str | None, int | None]:
    """(reason, device hex, since_ms) from query parameters; BadForm with a clear message."""
    reason = params.get("reason") or None
    if reason is not None and reason not in REASONS:
        raise BadForm("unknown reason; pick one from the list")
    device = (params.get("device") or "").strip().lower() or None
    if device is not None and (len(device) != 24 or any(c not in "0123456789abcdef"
                                                          for c in device)):
        raise BadForm("a device id is 24 hexadecimal characters")
    since_key = params.get("since") or None
    if since_key is not None and since_key not in SINCE:
        raise BadForm("since is one of " + ", ".join(SINCE))
    return reason, device, None if since_key is None else now_ms - SINCE[since_key]


def scoped_events(ctx: ConsoleContext, me: Principal, reason: str | None, device: str | None,
                  since_ms: int | None, limit: int) -> list[Any]:
    if me.unscoped:
        return ctx.store.events(reason=reason, device_id=device, since_ms=since_ms, limit=limit)
    groups = ctx.policies.groups()
    ids = [d for d, g in groups.items() if me.sees(g) and (device is None or d == device)]
    return ctx.store.events_for_devices(ids, reason=reason, since_ms=since_ms, limit=limit)


def page_routes(ctx: ConsoleContext) -> list[Route]:

    def fleet_rows(me: Principal) -> list[dict[str, Any]]:
        rows = []
        now = ctx.now_ms()
        for record, group in ctx.visible_devices(me):
            try:
                effective = ctx.policies.effective(record)
                policy, levels = effective.name, sorted(lv.value for lv in effective.levels)
            except Rejected as exc:
                policy, levels = "invalid", [exc.detail]
            online = record.last_seen_ms is not None and now - record.last_seen_ms < ONLINE_MS
            rows.append({"r": record, "group": group, "policy": policy, "levels": levels,
                         "online": online and record.status.value == "active"})
        return rows

    async def fleet(request: Request, error: str = "", status: int = 200,
                    form: dict[str, str] | None = None) -> Response:
        me = _me(request)
        rows = await run_in_threadpool(fleet_rows, me)
        counts = {s: sum(1 for x in rows if x["r"].status.value == s)
                  for s in ("active", "suspended", "revoked")}
        online = sum(1 for x in rows if x["online"])
        return ctx.render(request, "fleet.html", {
            "rows": rows, "counts": counts, "online": online, "error": error,
            "form": form or {}, "policies": sorted(ctx.policies.all()),
            "my_groups": sorted(me.groups) if me.groups is not None else None,
        }, status)

    async def provision(request: Request) -> Response:
        me = _me(request)
        try:
            form = await read_form(request)
        except BadForm as exc:
            return await fleet(request, str(exc), 400)
        await ctx.check_csrf(request, form)
        name = form.get("name", "").strip()
        group = form.get("group", "").strip() or None
        policy = form.get("policy", "standard")
        try:
            if group is not None:
                check_group(group)
            if not me.sees(group):
                mine = ", ".join(sorted(me.groups or ()))
                raise ConfigError(f"choose one of your groups: {mine}")
            if ctx.policies.get(policy) is None:
                raise ConfigError("choose a policy from the list")
            cred = await run_in_threadpool(ctx.registry.add_device, name, "standard",
                                           actor=me.name, transport="console")
        except ConfigError as exc:
            return await fleet(request, str(exc), 400, form)
        if group is not None:
            await run_in_threadpool(ctx.policies.set_group, cred.device_id, group, actor=me.name)
        if policy != "standard":
            await run_in_threadpool(ctx.policies.set_device_policy, cred.device_id, policy,
                                    actor=me.name)
        log.info("device provisioned", extra={"device": str(cred.device_id),
                                              "operator": me.name})
        secret = cred.encode()
        qr = segno.make(secret, error="m").svg_data_uri(scale=5, border=2)
        return ctx.render(request, "provisioned.html", {
            "device_id": str(cred.device_id), "name": name, "group": group, "policy": policy,
            "credential": secret, "qr": qr}, no_store=True)

    def device_view(me: Principal, raw: str) -> dict[str, Any]:
        record = ctx.visible_device(me, raw)
        epochs = [e for e in range(max(1, record.epoch - 19), record.epoch + 1)
                  if ctx.store.get_secret(record.device_id, e) is not None]
        events = ctx.store.events(device_id=record.device_id.hex(), limit=50)
        try:
            effective: Any = ctx.policies.effective(record)
            invalid = ""
        except Rejected as exc:
            effective, invalid = None, exc.detail
        return {"r": record, "group": ctx.policies.group_of(record.device_id),
                "epochs": epochs, "events": events, "effective": effective,
                "invalid": invalid, "applicable": ctx.policies.applicable(record),
                "policies": sorted(ctx.policies.all()), "count":
                    ctx.store.count_telemetry(record.device_id)}

    async def device(request: Request, error: str = "", status: int = 200) -> Response:
        me = _me(request)
        view = await run_in_threadpool(device_view, me, request.path_params["device_id"])
        notice = NOTICES.get(request.query_params.get("ok", ""), "")
        return ctx.render(request, "device.html", {**view, "error": error, "notice": notice},
                          status)

    async def device_action(request: Request) -> Response:
        me = _me(request)
        raw, action = request.path_params["device_id"], request.path_params["action"]
        record: DeviceRecord = await run_in_threadpool(ctx.visible_device, me, raw)
        try:
            form = await read_form(request)
        except BadForm as exc:
            return await device(request, str(exc), 400)
        await ctx.check_csrf(request, form)
        did = record.device_id
        try:
            if action == "rename":
                await run_in_threadpool(ctx.registry.rename, did, form.get("name", "").strip(),
                                        actor=me.name, transport="console")
                done = "renamed"
            elif action in ("suspend", "resume", "revoke"):
                await run_in_threadpool(getattr(ctx.registry, action), did, actor=me.name,
                                        transport="console")
                done = {"suspend": "suspended", "resume": "resumed", "revoke": "revoked"}[action]
            elif action == "group":
                group = form.get("group", "").strip() or None
                if group is not None:
                    check_group(group)
                if not me.sees(group):
                    raise ConfigError("you can only move a device into one of your groups")
                await run_in_threadpool(ctx.policies.set_group, did, group, actor=me.name)
                done = "group"
            elif action == "policy":
                if not me.may(Role.ADMIN):
                    raise Denied("changing a device's policy needs the admin role")
                await run_in_threadpool(ctx.policies.set_device_policy, did,
                                        form.get("policy", ""), actor=me.name)
                done = "policy"
            else:
                return await device(request, "unknown action", 404)
        except ConfigError as exc:
            return await device(request, str(exc), 400)
        ctx.pipeline.invalidate(did)
        return redirect(f"/console/devices/{did}?ok={done}")

    async def events(request: Request) -> Response:
        me = _me(request)
        try:
            reason, device_hex, since_ms = parse_event_filters(request.query_params,
                                                               ctx.now_ms())
            error, status = "", 200
        except BadForm as exc:
            reason = device_hex = since_ms = None
            error, status = str(exc), 400
        found = await run_in_threadpool(scoped_events, ctx, me, reason, device_hex, since_ms,
                                        200)
        return ctx.render(request, "events.html", {
            "events": found, "reasons": REASONS, "since_options": list(SINCE),
            "f": {"reason": reason or "", "device": device_hex or "",
                  "since": request.query_params.get("since", "") if not error else ""},
            "error": error}, status)

    async def root(request: Request) -> Response:
        return redirect("/console/")

    return [
        Route("/", root, methods=["GET"]),
        Route("/console", root, methods=["GET"]),
        Route("/console/", page(ctx)(fleet), methods=["GET"]),
        Route("/console/devices", page(ctx, Role.OPERATOR)(provision), methods=["POST"]),
        Route("/console/devices/{device_id}", page(ctx)(device), methods=["GET"]),
        Route("/console/devices/{device_id}/{action}", page(ctx, Role.OPERATOR)(device_action),
              methods=["POST"]),
        Route("/console/events", page(ctx)(events), methods=["GET"]),
    ]
