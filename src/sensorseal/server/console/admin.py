"""Admin pages: the policy editor and attachments, operator accounts, machine API tokens."""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sensorseal.core.errors import ConfigError
from sensorseal.operators import Principal, Role, parse_groups
from sensorseal.policies import LAYERS, PolicySpec
from sensorseal.server.console.auth import read_form
from sensorseal.server.console.web import BadForm, ConsoleContext, page, redirect

__all__ = ["admin_routes", "spec_from_form"]

log = logging.getLogger("sensorseal.console")
FLAGS = ("require_timestamp", "require_tls", "require_signed_commands",
         "require_device_signature", "require_hardware_keys")


def _int(form: dict[str, str], name: str, label: str) -> int | None:
    raw = form.get(name, "").strip()
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ConfigError(f"{label} must be a whole number")
    return int(raw)


def spec_from_form(form: dict[str, str]) -> PolicySpec:
    levels = [v for v in form.get("levels", "").split(",") if v]
    window = _int(form, "replay_window", "the replay window")
    data: dict[str, Any] = {
        "name": form.get("name", "").strip(), "description": form.get("description", "").strip(),
        "levels": levels, "max_skew_s": _int(form, "max_skew_s", "the clock skew"),
        "replay_window": 64 if window is None else window,
        "layers": [v for v in form.get("layers", "").split(",") if v],
    }
    for flag in FLAGS:
        data[flag] = form.get(flag) == "on"
    return PolicySpec.from_mapping(data)


def _me(request: Request) -> Principal:
    principal: Principal = request.scope["ss.session"].principal
    return principal


def admin_routes(ctx: ConsoleContext) -> list[Route]:

    async def policies(request: Request, error: str = "", status: int = 200,
                       form: dict[str, str] | None = None) -> Response:
        specs = await run_in_threadpool(ctx.policies.all)
        attachments = await run_in_threadpool(ctx.policies.attachments)
        editing = specs.get(request.query_params.get("edit", ""))
        return ctx.render(request, "policies.html", {
            "specs": sorted(specs.values(), key=lambda s: (not s.builtin, s.name)),
            "network": attachments.get(("network", ""), ""),
            "group_attachments": sorted((t, p) for (k, t), p in attachments.items()
                                        if k == "group"),
            "groups": ctx.policies.known_groups(), "layers": LAYERS, "error": error,
            "form": form, "editing": editing, "notice": request.query_params.get("ok") == "1",
        }, status)

    async def policy_action(request: Request) -> Response:
        me = _me(request)
        try:
            form = await read_form(request)
        except BadForm as exc:
            return await policies(request, str(exc), 400)
        await ctx.check_csrf(request, form)
        action = request.path_params["action"]
        try:
            if action == "save":
                spec = spec_from_form(form)
                await run_in_threadpool(ctx.policies.save, spec, actor=me.name)
            elif action == "delete":
                await run_in_threadpool(ctx.policies.delete, form.get("name", ""), actor=me.name)
            elif action == "attach":
                kind = form.get("kind", "")
                target = form.get("target", "").strip()
                name = form.get("policy", "") or None
                await run_in_threadpool(ctx.policies.attach, kind, target, name, actor=me.name)
            else:
                return await policies(request, "unknown action", 404)
        except ConfigError as exc:
            return await policies(request, str(exc), 400, form)
        ctx.pipeline.invalidate()
        return redirect("/console/policies?ok=1")

    async def people(request: Request, error: str = "", status: int = 200,
                     revealed: dict[str, str] | None = None) -> Response:
        operators = await run_in_threadpool(ctx.operators.accounts)
        tokens = await run_in_threadpool(ctx.operators.list_tokens)
        return ctx.render(request, "admin.html", {
            "operators": operators, "tokens": tokens, "error": error, "revealed": revealed,
            "notice": request.query_params.get("ok") == "1"}, status, no_store=True)

    async def people_action(request: Request) -> Response:
        me = _me(request)
        try:
            form = await read_form(request)
        except BadForm as exc:
            return await people(request, str(exc), 400)
        await ctx.check_csrf(request, form)
        action = request.path_params["action"]
        try:
            if action == "operator-add":
                role = Role.parse(form.get("role", ""))
                await run_in_threadpool(ctx.operators.add, form.get("name", "").strip(),
                                        form.get("password", ""), role,
                                        parse_groups(form.get("groups", "")), actor=me.name)
            elif action == "operator-disable":
                if form.get("name") == me.name:
                    raise ConfigError("you cannot disable your own account")
                await run_in_threadpool(ctx.operators.set_disabled, form.get("name", ""),
                                        form.get("disabled") == "1", actor=me.name)
            elif action == "token-create":
                role = Role.parse(form.get("role", ""))
                token_id, token = await run_in_threadpool(
                    ctx.operators.create_token, form.get("name", "").strip(), role,
                    parse_groups(form.get("groups", "")), actor=me.name)
                return await people(request, revealed={"id": token_id, "token": token})
            elif action == "token-revoke":
                await run_in_threadpool(ctx.operators.revoke_token, form.get("token_id", ""),
                                        actor=me.name)
            else:
                return await people(request, "unknown action", 404)
        except ConfigError as exc:
            return await people(request, str(exc), 400)
        return redirect("/console/admin?ok=1")

    admin = page(ctx, Role.ADMIN)
    return [
        Route("/console/policies", page(ctx)(policies), methods=["GET"]),
        Route("/console/policies/{action}", admin(policy_action), methods=["POST"]),
        Route("/console/admin", admin(people), methods=["GET"]),
        Route("/console/admin/{action}", admin(people_action), methods=["POST"]),
    ]
