"""HTTP endpoints that third-party brokers call to authenticate clients and check topic ACLs.

Why: brokers other than Mosquitto-with-dynsec (EMQX, VerneMQ, Mosquitto with mosquitto-go-auth,
amqtt's HTTP plugin, RabbitMQ's HTTP backend after a small shim) delegate "may this client log
in?" and "may it touch this topic?" to an HTTP service. These routes answer with the same rules
as the embedded broker (sensorseal.mqtt.embedded: `check_login`, `check_topic`).

Requests (details and examples in docs/brokers.md):

    {prefix}/user       username, password, clientid          -> may log in?
    {prefix}/acl        username, topic, clientid, and either
                        action = publish | subscribe | receive (EMQX style, also "pub"/"sub")
                        or acc = 1 read(receive) | 2 write(publish) | 3 read+write | 4 subscribe
                        (mosquitto-go-auth / amqtt style)
    {prefix}/superuser  always denied: no sensorseal principal is a broker superuser

Parameters come as a JSON object, a form body, or a query string (GET), whichever the broker
sends; `clientid` may also be spelled `client_id` or `clientId`. Answers: 200 allow, 403 deny,
each with a JSON body that satisfies both conventions: `{"result": "allow"|"deny", "ok": bool}`
(EMQX reads `result`; go-auth's and amqtt's JSON modes read `ok`). Passwords are never logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sensorseal.mqtt.embedded import CheckLogin, CheckTopic, TopicAction

__all__ = ["MAX_BODY", "broker_auth_routes", "parse_acl_actions"]

log = logging.getLogger(__name__)

MAX_BODY = 8192  # an auth request is a few hundred bytes; refuse anything large
_ACTIONS: dict[str, tuple[TopicAction, ...]] = {
    "publish": (TopicAction.PUBLISH,), "pub": (TopicAction.PUBLISH,),
    "subscribe": (TopicAction.SUBSCRIBE,), "sub": (TopicAction.SUBSCRIBE,),
    "receive": (TopicAction.RECEIVE,), "read": (TopicAction.RECEIVE,),
    "write": (TopicAction.PUBLISH,),
}
# mosquitto's MOSQ_ACL_READ=1, MOSQ_ACL_WRITE=2, MOSQ_ACL_SUBSCRIBE=4 (3 = read and write).
_ACC: dict[int, tuple[TopicAction, ...]] = {
    1: (TopicAction.RECEIVE,), 2: (TopicAction.PUBLISH,),
    3: (TopicAction.RECEIVE, TopicAction.PUBLISH), 4: (TopicAction.SUBSCRIBE,),
}


def _allow() -> JSONResponse:
    return JSONResponse({"result": "allow", "ok": True, "is_superuser": False, "error": ""})


def _deny(status: int = 403, error: str = "denied") -> JSONResponse:
    return JSONResponse({"result": "deny", "ok": False, "error": error}, status_code=status)


class _BadRequest(Exception):
    pass


def _text(params: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise _BadRequest(f"{name} must be a string")
        return value
    return ""


def parse_acl_actions(params: Mapping[str, Any]) -> tuple[TopicAction, ...]:
    """The action(s) an ACL request asks about, from `action` or `acc`; all must be allowed."""
    action = params.get("action")
    if action is not None:
        found = _ACTIONS.get(str(action).strip().lower())
        if found is None:
            raise _BadRequest("unknown action")
        return found
    acc = params.get("acc", params.get("access"))
    if acc is None:
        raise _BadRequest("need action or acc")
    try:
        acc_int = int(str(acc).strip())
    except ValueError as exc:
        raise _BadRequest("acc must be 1, 2, 3 or 4") from exc
    found = _ACC.get(acc_int)
    if found is None:
        raise _BadRequest("acc must be 1, 2, 3 or 4")
    return found


async def _params(request: Request) -> dict[str, Any]:
    """Query parameters, overlaid by a JSON or form body (bounded in size)."""
    params: dict[str, Any] = dict(request.query_params)
    if request.method == "GET":
        return params
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _BadRequest("body too large")
    if not body:
        return params
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        try:
            params.update(parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False))
        except UnicodeDecodeError as exc:
            raise _BadRequest("form body is not UTF-8") from exc
        return params
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise _BadRequest("body is neither JSON nor a form") from exc
    if not isinstance(data, dict):
        raise _BadRequest("JSON body must be an object")
    params.update(data)
    return params


def broker_auth_routes(check_login: CheckLogin, check_topic: CheckTopic, *,
                       prefix: str = "/mqtt/auth") -> list[Route]:
    """Starlette routes `{prefix}/user`, `{prefix}/acl`, `{prefix}/superuser` (GET and POST).

    `check_login` may block (it reads the store): it runs in the thread pool. `check_topic` is
    called directly and must be fast.
    """
    prefix = prefix.rstrip("/")

    async def user(request: Request) -> JSONResponse:
        try:
            params = await _params(request)
            username = _text(params, "username", "user")
            password = _text(params, "password", "pass")
        except _BadRequest as exc:
            return _deny(400, str(exc))
        if not username:
            return _deny(403)
        try:
            allowed = await run_in_threadpool(check_login, username, password)
        except Exception as exc:  # never let a failing store turn into an allow
            log.warning("broker auth: login check failed for %.40r (%s)", username,
                        type(exc).__name__)
            return _deny(503, "unavailable")
        return _allow() if allowed else _deny()

    async def acl(request: Request) -> JSONResponse:
        try:
            params = await _params(request)
            username = _text(params, "username", "user")
            topic = _text(params, "topic")
            actions = parse_acl_actions(params)
        except _BadRequest as exc:
            return _deny(400, str(exc))
        if not username or not topic:
            return _deny(403)
        try:
            allowed = all(check_topic(username, topic, a) for a in actions)
        except Exception as exc:
            log.warning("broker auth: topic check failed (%s)", type(exc).__name__)
            return _deny(503, "unavailable")
        return _allow() if allowed else _deny()

    async def superuser(request: Request) -> JSONResponse:
        try:
            await _params(request)
        except _BadRequest as exc:
            return _deny(400, str(exc))
        return _deny()

    methods = ["GET", "POST"]
    handlers: list[tuple[str, Callable[[Request], Any]]] = [
        ("user", user), ("acl", acl), ("superuser", superuser)]
    return [Route(f"{prefix}/{name}", fn, methods=methods, name=f"broker_auth_{name}")
            for name, fn in handlers]
