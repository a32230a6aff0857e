"""The web console: operators run the fleet from a browser (see docs/console.md).

`Console` wires the services (stored policies, operator accounts, sessions, tokens) to one
store, installs the stored-policy hook in the ingest pipeline, and provides the routes that
`create_app(..., console=...)` mounts next to the ingest API: the pages under /console, their
JSON API under /console/api, /metrics, /openapi.json and /docs.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from sensorseal.core.errors import ConfigError
from sensorseal.operators import LoginLimiter, OperatorService
from sensorseal.policies import ConsoleBackend, PolicyService
from sensorseal.registry import Registry
from sensorseal.server.console.admin import admin_routes
from sensorseal.server.console.api import api_routes
from sensorseal.server.console.auth import auth_routes
from sensorseal.server.console.pages import page_routes
from sensorseal.server.console.updates import update_page_routes
from sensorseal.server.console.web import HERE, ConsoleContext
from sensorseal.server.metrics import Metrics
from sensorseal.server.openapi import openapi_routes
from sensorseal.server.pipeline import Pipeline, RegistryView
from sensorseal.store.base import Store

__all__ = ["Console"]


class Console:
    """Everything the console adds to one app."""

    def __init__(self, pipeline: Pipeline, registry: RegistryView, store: Store, *,
                 token_check: Callable[[str], bool],
                 limiter: LoginLimiter | None = None,
                 operators: OperatorService | None = None) -> None:
        if not isinstance(registry, Registry):
            raise ConfigError("the console needs a sensorseal.registry.Registry")
        if not hasattr(store, "list_operators"):
            raise ConfigError(f"{type(store).__name__} has no console tables (ConsoleStore)")
        backend: ConsoleBackend = store  # type: ignore[assignment]
        self.policies = PolicyService(backend, clock_ms=pipeline.now_ms)
        self.operators = operators or OperatorService(backend, clock_ms=pipeline.now_ms)
        self.metrics = Metrics(pipeline)
        self.context = ConsoleContext(backend, registry, pipeline, self.policies,
                                      self.operators, token_check,
                                      limiter or LoginLimiter(clock_ms=pipeline.now_ms))
        pipeline.set_policy_resolver(self.policies.resolve)

    def token_check(self, machine_check: Callable[[str], bool]) -> Callable[[str], bool]:
        """The check for the unscoped /v1 reads: the machine token, or an API token whose
        scope is every group (a scoped token would see other groups' devices there)."""
        operators = self.operators

        def check(token: str) -> bool:
            principal = operators.token_principal(token)
            if principal is not None:
                return principal.unscoped
            return machine_check(token)
        return check

    def routes(self) -> list[BaseRoute]:
        ctx = self.context
        routes: list[BaseRoute] = [
            *auth_routes(ctx), *page_routes(ctx), *admin_routes(ctx), *api_routes(ctx),
            *update_page_routes(ctx),
            *self.metrics.routes(), *openapi_routes(),
            Mount("/console/static", app=StaticFiles(directory=HERE / "static"),
                  name="console-static"),
        ]
        return routes


