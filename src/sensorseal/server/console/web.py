"""What every console route shares: the services, templates, sessions, CSRF and scope checks.

Security choices, in one place:
- Session cookie `ss_session`: HttpOnly, SameSite=Strict, Secure when the request came over
  HTTPS, Path=/; its value is a fresh random id minted at login (never one the client brought).
- CSRF: every state-changing form carries the session's random token, compared in constant time.
  The login form has no session yet: it carries HMAC(console key, pre-login cookie).
- Every page is rendered by Jinja2 with autoescaping, under a Content-Security-Policy that
  allows scripts, styles and connections to our own origin only (no inline script at all).
- An out-of-scope device is "not found", exactly like a device that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.operators import MACHINE, LoginLimiter, OperatorService, Principal, Role, Session
from sensorseal.policies import ConsoleBackend, PolicyService
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import DeviceRecord

__all__ = ["COOKIE", "ConsoleContext", "Denied", "NotFound"]

COOKIE = "ss_session"
PRE_COOKIE = "ss_prelogin"
HERE = Path(__file__).parent
META_KEY = "console_form_key"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class NotFound(Exception):
    """Nothing there for this principal (absent or out of scope): 404."""


class Denied(Exception):
    """Signed in, but the role does not allow it: 403."""


class BadForm(Exception):
    """A form or parameter we cannot use; the text is shown to the operator."""


def when(ms: int | None) -> str:
    if ms is None:
        return "never"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    s = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


@dataclass
class ConsoleContext:
    store: ConsoleBackend
    registry: Registry
    pipeline: Pipeline
    policies: PolicyService
    operators: OperatorService
    token_check: Callable[[str], bool]
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    templates: Environment = field(init=False)
    _form_key: bytes | None = None

    def __post_init__(self) -> None:
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                                     autoescape=select_autoescape(default=True),
                                     trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["when"] = when
        self.templates.globals["Role"] = Role

    def now_ms(self) -> int:
        return self.pipeline.now_ms()

    # -- rendering -------------------------------------------------------------------------

    def render(self, request: Request, template: str, context: Mapping[str, Any],
               status: int = 200, *, no_store: bool = False) -> HTMLResponse:
        session: Session | None = request.scope.get("ss.session")
        page = self.templates.get_template(template).render(
            request=request, me=None if session is None else session.principal,
            csrf="" if session is None else session.csrf, now_ms=self.now_ms(),
            ago=lambda ms: ago(ms, self.now_ms()), **context)
        headers = dict(SECURITY_HEADERS)
        headers["Cache-Control"] = "no-store" if no_store else "private, no-cache"
        return HTMLResponse(page, status_code=status, headers=headers)

    # -- form key for the login CSRF token ---------------------------------------------------

    def form_key(self) -> bytes:
        if self._form_key is None:
            stored = self.store.get_meta(META_KEY)
            if stored is None:
                self.store.set_meta(META_KEY, os.urandom(32).hex())
                stored = self.store.get_meta(META_KEY)
            assert stored is not None
            self._form_key = bytes.fromhex(stored)
        return self._form_key

    def login_csrf(self, pre: str) -> str:
        return hmac.new(self.form_key(), pre.encode(), hashlib.sha256).hexdigest()

    # -- who is asking ---------------------------------------------------------------------

    async def session(self, request: Request) -> Session | None:
        if "ss.session" in request.scope:
            found: Session | None = request.scope["ss.session"]
            return found
        sid = request.cookies.get(COOKIE, "")
        found = await run_in_threadpool(self.operators.session, sid) if sid else None
        request.scope["ss.session"] = found
        return found

    async def principal(self, request: Request) -> Principal | None:
        """A bearer API token or the machine token if the request names one (an explicit
        credential beats the ambient cookie; a bad one is refused, no fallback), else the
        session's operator."""
        header = request.headers.get("authorization")
        if header is None:
            session = await self.session(request)
            return None if session is None else session.principal
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            return None
        principal = await run_in_threadpool(self.operators.token_principal, token)
        if principal is not None:
            return principal
        if await run_in_threadpool(self.token_check, token):
            return MACHINE
        return None

    async def check_csrf(self, request: Request, form: Mapping[str, Any]) -> None:
        session = await self.session(request)
        sent = form.get("csrf")
        if session is None or not isinstance(sent, str) or \
                not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise Denied("the form expired or did not come from this console; reload the page")

    # -- scope -----------------------------------------------------------------------------

    def visible_device(self, principal: Principal, raw_id: str) -> DeviceRecord:
        try:
            device_id = DeviceId.parse(raw_id)
        except ConfigError:
            raise NotFound("no such device") from None
        record = self.store.get_device(device_id)
        if record is None or not principal.sees(self.policies.group_of(device_id)):
            raise NotFound("no such device")
        return record

    def visible_devices(self, principal: Principal) -> list[tuple[DeviceRecord, str | None]]:
        groups = self.policies.groups()
        return [(r, groups.get(r.device_id.hex())) for r in self.store.list_devices(limit=5000)
                if principal.sees(groups.get(r.device_id.hex()))]


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


Handler = Callable[[Request], Awaitable[Response]]


def page(ctx: ConsoleContext, role: Role = Role.VIEWER) -> Callable[[Handler], Handler]:
    """Wrap a page: a session is needed (else the login page), the role checked, errors shown."""
    def wrap(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            session = await ctx.session(request)
            if session is None:
                return redirect("/console/login")
            try:
                if not session.principal.may(role):
                    raise Denied(f"this needs the {role.label} role")
                return await handler(request)
            except NotFound as exc:
                return ctx.render(request, "error.html", {"title": "Not found",
                                                          "message": str(exc)}, 404)
            except Denied as exc:
                return ctx.render(request, "error.html", {"title": "Not allowed",
                                                          "message": str(exc)}, 403)
        return endpoint
    return wrap


def api(ctx: ConsoleContext, role: Role = Role.VIEWER) -> Callable[[Handler], Handler]:
    """Wrap a JSON endpoint: a session or a bearer token; errors as JSON."""
    def wrap(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            principal = await ctx.principal(request)
            if principal is None:
                return JSONResponse({"error": "unauthorized"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer realm="sensorseal"'})
            request.scope["ss.principal"] = principal
            try:
                if not principal.may(role):
                    raise Denied(f"this needs the {role.label} role")
                return await handler(request)
            except NotFound as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            except Denied as exc:
                return JSONResponse({"error": str(exc)}, status_code=403)
            except BadForm as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return endpoint
    return wrap
