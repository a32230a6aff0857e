"""The HTTP API described as OpenAPI 3.0, served at `/openapi.json`, readable at `/docs`.

Hand-written on purpose: the routes are few, and a spec written next to the code says what we
promise (statuses, limits, auth) rather than what a framework infers. tests/e2e/
test_schemathesis.py checks the real app against it.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from sensorseal import __version__

__all__ = ["SPEC", "openapi_routes"]

_ERR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}
_GENERIC = {"description": "refused (reason only in the audit log)",
            "content": {"application/json": {"schema": {
                "type": "object", "properties": {"status": {"type": "string"}}}}}}
_UNAUTH = {"description": "missing or bad bearer token", **{"content": _ERR["content"]}}
_HEX24 = {"type": "string", "pattern": "^[0-9a-f]{24}$"}
_LIMIT = {"name": "limit", "in": "query", "required": False,
          "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
_DEVICE_PATH = {"name": "device_id", "in": "path", "required": True, "schema": _HEX24}
_DEVICE = {"type": "object", "properties": {
    "id": _HEX24, "name": {"type": "string"},
    "status": {"type": "string", "enum": ["active", "suspended", "revoked"]},
    "epoch": {"type": "integer"}, "policy": {"type": "string"},
    "created_ms": {"type": "integer"}, "last_seen_ms": {"type": ["integer", "null"]},
}, "required": ["id", "name", "status", "epoch", "policy"]}
_EVENT = {"type": "object", "properties": {
    "at_ms": {"type": "integer"}, "reason": {"type": "string"},
    "transport": {"type": "string"}, "source": {"type": "string"},
    "device": {"type": ["string", "null"]}, "detail": {"type": "string"}}}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def _json(schema: dict[str, Any], description: str = "ok") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _list(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return _json({"type": "object", "properties": {key: {"type": "array", "items": item}}})


def _read(summary: str, ok: dict[str, Any], params: list[dict[str, Any]] | None = None,
          not_found: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok, "400": _ERR, "401": _UNAUTH}
    if not_found:
        responses["404"] = _ERR
    return {"summary": summary, "security": _SECURED, "parameters": params or [],
            "responses": responses}


_REASON = {"name": "reason", "in": "query", "required": False,
           "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"}}
_SINCE = {"name": "since", "in": "query", "required": False,
          "schema": {"type": "string", "enum": ["15m", "1h", "24h", "7d"]}}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "sensorseal", "version": __version__,
             "description": "Sealed sensor data ingest, operator reads and the console API. "
                            "Devices authenticate through their COSE envelopes; operators "
                            "with a bearer token (the installation's operator token or a "
                            "scoped API token from the console)."},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/v1/messages": {"post": {
            "summary": "Submit one sealed (COSE_Encrypt0) or signed (COSE_Mac0) envelope",
            "requestBody": {"required": True, "content": {"application/cose": {
                "schema": {"type": "string", "format": "binary", "maxLength": 65536}}}},
            "responses": {"202": _json({"type": "object"}, "accepted"), "400": _GENERIC,
                          "403": _GENERIC, "413": _GENERIC, "415": _GENERIC,
                          "503": _GENERIC}}},
        "/v1/messages:batch": {"post": {
            "summary": "Submit a CBOR array of envelopes in one transaction",
            "requestBody": {"required": True, "content": {"application/cbor": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "per item 0 (accepted) or 1 (rejected)",
                                  "content": {"application/cbor": {"schema": {}},
                                              "application/json": {"schema": {}}}},
                          "400": _GENERIC, "403": _GENERIC, "413": _GENERIC,
                          "415": _GENERIC, "503": _GENERIC}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {
            "200": _json({"type": "object"})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (aggregates only)", "responses": {
            "200": {"description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/v1/devices": {"get": _read(
            "List devices (unscoped tokens only)", _list("devices", _DEVICE),
            [_LIMIT, {"name": "offset", "in": "query", "required": False,
                      "schema": {"type": "integer", "minimum": 0, "maximum": 10**9}}])},
        "/v1/devices/{device_id}": {"get": _read("One device", _json(_DEVICE),
                                                 [_DEVICE_PATH], not_found=True)},
        "/v1/telemetry": {"get": _read(
            "Newest telemetry", _list("telemetry", {"type": "object"}),
            [_LIMIT, {"name": "device", "in": "query", "required": False, "schema": _HEX24}],
            not_found=True)},
        "/v1/events": {"get": _read(
            "Security events (audit log)", _list("events", _EVENT),
            [_LIMIT, _REASON, {"name": "device", "in": "query", "required": False,
                               "schema": _HEX24}])},
        "/console/api/whoami": {"get": _read("The authenticated principal",
                                             _json({"type": "object"}))},
        "/console/api/devices": {"get": _read("Devices in the caller's scope",
                                              _list("devices", _DEVICE))},
        "/console/api/devices/{device_id}": {"get": _read(
            "One device in scope", _json(_DEVICE), [_DEVICE_PATH], not_found=True)},
        "/console/api/devices/{device_id}/telemetry": {"get": _read(
            "A device's newest telemetry, with the numbers of JSON payloads",
            _json({"type": "object"}), [_DEVICE_PATH, _LIMIT], not_found=True)},
        "/console/api/devices/{device_id}/status": {"post": {
            "summary": "Suspend, resume or revoke a device (operator role)",
            "security": _SECURED, "parameters": [_DEVICE_PATH],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["action"], "properties": {
                    "action": {"type": "string", "enum": ["suspend", "resume", "revoke"]}}}}}},
            "responses": {"200": _json(_DEVICE), "400": _ERR, "401": _UNAUTH, "403": _ERR,
                          "404": _ERR, "409": _ERR}}},
        "/console/api/events": {"get": _read(
            "Security events in the caller's scope", _list("events", _EVENT),
            [_LIMIT, _SINCE, {"name": "reason", "in": "query", "required": False,
                              "schema": {"type": "string"}},
             {"name": "device", "in": "query", "required": False, "schema": _HEX24}])},
        "/console/api/policies": {"get": _read("Every policy (built-in and stored)",
                                               _list("policies", {"type": "object"}))},
    },
}


async def _spec(request: Request) -> Response:
    return JSONResponse(SPEC)


async def _docs(request: Request) -> Response:
    rows = []
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            auth = "bearer" if op.get("security") else "none"
            codes = ", ".join(op["responses"])
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>"
                        f"{html.escape(path)}</code></td><td>{html.escape(op['summary'])}</td>"
                        f"<td>{auth}</td><td>{codes}</td></tr>")
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>sensorseal API"
            "</title><link rel=stylesheet href=/console/static/console.css></head><body>"
            "<main class=wrap><h1>sensorseal HTTP API</h1><p>Machine-readable: "
            "<a href=/openapi.json>/openapi.json</a> (OpenAPI 3.1)</p><table class=table>"
            "<tr><th>method</th><th>path</th><th>what</th><th>auth</th><th>statuses</th></tr>"
            + "".join(rows) + "</table></main></body></html>")
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'"})


def openapi_routes() -> list[Route]:
    return [Route("/openapi.json", _spec, methods=["GET"]),
            Route("/docs", _docs, methods=["GET"])]
