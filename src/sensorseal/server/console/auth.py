"""Login and logout, and reading forms safely.

Login: rate limited per account name and per client address (LoginLimiter), argon2 verification
in a worker thread, then a *new* session id in the cookie (session fixation: whatever id the
client held before is never promoted) and the previous session, if any, closed.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sensorseal.server.console.web import COOKIE, PRE_COOKIE, BadForm, ConsoleContext, redirect

__all__ = ["auth_routes", "read_form"]

log = logging.getLogger("sensorseal.console")
MAX_FORM = 64 * 1024


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form as single text values; BadForm for anything else or too large."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadForm("forms are sent as application/x-www-form-urlencoded")
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > MAX_FORM:
        raise BadForm("the form is too large")
    data = await request.form(max_fields=64)
    out: dict[str, str] = {}
    for key in data:
        values = data.getlist(key)
        if len(values) != 1 or not isinstance(values[0], str):
            if key in ("levels", "layers"):
                out[key] = ",".join(str(v) for v in values)
                continue
            raise BadForm(f"field {key[:40]!r} given more than once")
        out[key] = values[0]
    return out


def _client(request: Request) -> str:
    return "unknown" if request.client is None else request.client.host


def _set_cookie(request: Request, response: Response, name: str, value: str,
                max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def auth_routes(ctx: ConsoleContext) -> list[Route]:

    async def login_page(request: Request, error: str = "", status: int = 200,
                         name: str = "") -> Response:
        pre = request.cookies.get(PRE_COOKIE, "")
        if len(pre) != 43:
            pre = secrets.token_urlsafe(32)
        csrf = await run_in_threadpool(ctx.login_csrf, pre)
        response = ctx.render(request, "login.html", {"login_csrf": csrf, "error": error,
                                                      "name": name}, status, no_store=True)
        _set_cookie(request, response, PRE_COOKIE, pre, 3600)
        return response

    async def login_get(request: Request) -> Response:
        if await ctx.session(request) is not None:
            return redirect("/console/")
        return await login_page(request)

    async def login_post(request: Request) -> Response:
        try:
            form = await read_form(request)
        except BadForm as exc:
            return await login_page(request, str(exc), 400)
        name = form.get("name", "").strip()[:64]
        pre = request.cookies.get(PRE_COOKIE, "")
        expected = await run_in_threadpool(ctx.login_csrf, pre) if pre else ""
        if not pre or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
            return await login_page(request, "The form expired; please try again.", 400, name)
        client = _client(request)
        keys = (f"name:{name.lower()}", f"addr:{client}")
        wait = ctx.limiter.retry_after_s(*keys)
        if wait:
            response = await login_page(
                request, f"Too many failed attempts. Try again in {wait} seconds.", 429, name)
            response.headers["Retry-After"] = str(wait)
            return response
        principal = await run_in_threadpool(ctx.operators.authenticate, name,
                                            form.get("password", ""))
        if principal is None:
            ctx.limiter.failed(*keys)
            log.info("console login failed", extra={"operator": name, "client": client})
            await run_in_threadpool(ctx.operators.audit, "login_failed", client,
                                    f"operator={name!r}")
            return await login_page(request, "Wrong name or password.", 401, name)
        ctx.limiter.succeeded(keys[0])
        old = request.cookies.get(COOKIE, "")
        if old:
            await run_in_threadpool(ctx.operators.close_session, old)
        sid, _ = await run_in_threadpool(ctx.operators.open_session, principal)
        log.info("console login", extra={"operator": principal.name, "client": client})
        response = redirect("/console/")
        _set_cookie(request, response, COOKIE, sid, None)
        response.delete_cookie(PRE_COOKIE, path="/")
        return response

    async def logout(request: Request) -> Response:
        try:
            form = await read_form(request)
            await ctx.check_csrf(request, form)
        except Exception:
            return redirect("/console/")
        sid = request.cookies.get(COOKIE, "")
        await run_in_threadpool(ctx.operators.close_session, sid)
        response = redirect("/console/login")
        response.delete_cookie(COOKIE, path="/")
        return response

    return [
        Route("/console/login", login_get, methods=["GET"]),
        Route("/console/login", login_post, methods=["POST"]),
        Route("/console/logout", logout, methods=["POST"]),
    ]
