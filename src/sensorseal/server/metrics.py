"""Observability: Prometheus metrics at `/metrics` and structured JSON logs.

Metrics are read at scrape time from the pipeline's own counters (no second bookkeeping on the
hot path), plus a request latency histogram measured by a small ASGI middleware and gauges for
any bounded queue an adapter registers (`register_queue`). Each app has its own registry, so
several apps in one process (tests, the demo) never share or clash. With several worker
processes, each serves its own numbers: scrape them all, as usual for Prometheus.

Only aggregate numbers are exported: no device id, name or address appears in a label.

Logs: `JsonLogFormatter` writes one JSON object per line. As a second line of defence (the
first is never passing a secret to a logger) it blanks anything shaped like a device credential
(`ss1.`), an API token (`sst_`) or a bearer header.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sensorseal.server.pipeline import Pipeline

__all__ = ["JsonLogFormatter", "LatencyMiddleware", "Metrics", "configure_json_logging", "redact"]

_ROUTES = ("/v1/messages", "/v1/messages:batch")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _route_label(path: str) -> str:
    """A fixed set of labels (never the raw path: ids would explode the cardinality)."""
    if path in _ROUTES:
        return path
    for prefix in ("/console/api", "/console", "/v1"):
        if path.startswith(prefix):
            return prefix
    return "other"


class _PipelineCollector(Collector):
    def __init__(self, pipeline: Pipeline, queues: dict[str, Callable[[], int]]) -> None:
        self._pipeline = pipeline
        self._queues = queues

    def collect(self) -> Iterable[Metric]:
        stats = self._pipeline.stats
        accepted = CounterMetricFamily("sensorseal_messages_accepted",
                                       "Messages verified and stored.")
        accepted.add_metric([], stats.accepted)
        yield accepted
        rejected = CounterMetricFamily("sensorseal_messages_rejected",
                                       "Messages refused, by reason.", labels=["reason"])
        for reason, n in sorted(stats.rejected.items()):
            rejected.add_metric([reason.value], n)
        yield rejected
        internal = CounterMetricFamily("sensorseal_internal_errors",
                                       "Messages that hit an internal error.")
        internal.add_metric([], stats.internal_errors)
        yield internal
        failures = CounterMetricFamily("sensorseal_store_failures",
                                       "Batches the store could not record.")
        failures.add_metric([], stats.store_failures)
        yield failures
        depth = GaugeMetricFamily("sensorseal_queue_depth", "Items waiting in a bounded queue.",
                                  labels=["queue"])
        for name, read in sorted(self._queues.items()):
            try:
                depth.add_metric([name], read())
            except Exception:  # noqa: S112 - a failing probe must not break the scrape
                continue
        yield depth


class Metrics:
    """One app's metrics: a private registry, the latency middleware and the route."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queues: dict[str, Callable[[], int]] = {}
        self.registry.register(_PipelineCollector(pipeline, self.queues))
        self.latency = Histogram("sensorseal_http_request_duration_seconds",
                                 "Time to answer an HTTP request.", ["route", "method"],
                                 registry=self.registry, buckets=_BUCKETS)

    def register_queue(self, name: str, depth: Callable[[], int]) -> None:
        """Export `depth()` as sensorseal_queue_depth{queue=name}."""
        self.queues[name] = depth

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.endpoint, methods=["GET"])]



class LatencyMiddleware:
    """ASGI middleware: observe every HTTP request's duration in `metrics.latency`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.latency = metrics.latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.latency.labels(_route_label(scope.get("path", "")),
                                scope.get("method", "GET")).observe(time.perf_counter() - start)


# -- logs ----------------------------------------------------------------------------------------

_SECRET_SHAPES = re.compile(
    r"ss1\.[0-9a-fA-F]{24}\.\d+\.[A-Za-z0-9_\-]+=*"  # device credential
    r"|sst_[0-9a-f]{12}_[A-Za-z0-9_\-]+"  # console API token
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]+=*"  # an Authorization header value
)
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    return _SECRET_SHAPES.sub("[redacted]", text)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, ensure_ascii=False, default=str))


def configure_json_logging(level: int = logging.INFO,
                           stream: Any = None) -> logging.Handler:
    """Send the root logger (and uvicorn's) to `stream` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    return handler
