"""The HTTP route a gateway posts to, kept here so the server app only mounts it.

    POST /v1/gateway/batch   one envelope sealed by a gateway, application/cose
                             -> 200 CBOR [0|1, ...] per item | generic 4xx | 503
"""

from __future__ import annotations

import logging
from typing import Any

import cbor2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.layers import GATEWAY_BATCH_ROUTE
from sensorseal.gateway.cloud import MAX_BATCH_BYTES, TRANSPORT, GatewayIngest
from sensorseal.gateway.provision import GatewayRegistry
from sensorseal.server.pipeline import IngestUnavailable, Pipeline
from sensorseal.store.base import Store

__all__ = ["gateway_ingest_for", "gateway_routes", "is_tls"]

log = logging.getLogger(__name__)


def gateway_ingest_for(pipeline: Pipeline, registry: Any, store: Store) -> GatewayIngest | None:
    """A GatewayIngest if the store has gateway tables and the registry exposes its keystore."""
    keystore = getattr(registry, "keystore", None)
    if keystore is None or not hasattr(store, "add_network"):
        return None
    try:
        return GatewayIngest(GatewayRegistry(store, keystore), pipeline, store)
    except ConfigError:
        return None


def is_tls(request: Request) -> bool:
    """E4 as the server sees it: the request arrived over TLS (uvicorn sets the scheme)."""
    return request.url.scheme == "https"


def _source(request: Request) -> str:
    client = request.client
    return "unknown" if client is None else f"{client.host}:{client.port}"


def _generic(status: int) -> JSONResponse:
    return JSONResponse({"status": "unavailable" if status == 503 else "rejected"},
                        status_code=status)


def gateway_routes(ingest: GatewayIngest, pipeline: Pipeline) -> list[Route]:
    async def post_gateway_batch(request: Request) -> Response:
        source = _source(request)
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        try:
            if kind != "application/cose":
                raise Rejected(RejectReason.WRONG_CONTENT_TYPE, "not application/cose")
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BATCH_BYTES:
                raise Rejected(RejectReason.OVERSIZE, f"declared {declared} bytes")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BATCH_BYTES:
                    raise Rejected(RejectReason.OVERSIZE, "gateway batch over the limit")
            _, codes = await run_in_threadpool(ingest.handle, bytes(body), e4=is_tls(request),
                                               source=source)
        except Rejected as exc:
            await run_in_threadpool(pipeline.reject, exc.reason, transport=TRANSPORT,
                                    source=source, detail=f"gateway batch: {exc.detail}")
            return _generic(exc.status)
        except IngestUnavailable:
            return _generic(503)
        return Response(cbor2.dumps(codes), media_type="application/cbor")

    return [Route(GATEWAY_BATCH_ROUTE, post_gateway_batch, methods=["POST"])]
