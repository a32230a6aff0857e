"""Console page: update rollouts with per-device state counts and recorded failure reasons.

Read-only (viewer role and up). Scoped operators count only the devices of their groups, and a
rollout with no device in their scope is not listed, like an out-of-scope device elsewhere.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sensorseal.operators import Principal
from sensorseal.server.console.web import ConsoleContext, page
from sensorseal.store.base import UpdateStore

__all__ = ["STATES", "update_page_routes"]

STATES = ("pending", "offered", "downloading", "verified", "installed", "failed")
_LISTED = 100  # rollouts shown, newest first
_FAILED_SHOWN = 20  # failed devices named per rollout


def _me(request: Request) -> Principal:
    principal: Principal = request.scope["ss.session"].principal
    return principal


def update_page_routes(ctx: ConsoleContext) -> list[Route]:

    def rollout_rows(me: Principal) -> list[dict[str, Any]] | None:
        if not hasattr(ctx.store, "list_rollouts"):
            return None
        store = cast(UpdateStore, ctx.store)
        groups = ctx.policies.groups()
        rows = []
        for r in store.list_rollouts(limit=_LISTED):
            devices = [d for d in store.rollout_devices(r.rollout_id)
                       if me.sees(groups.get(d.device_id.hex()))]
            if not devices and not me.unscoped:
                continue
            counts = Counter(d.state for d in devices)
            failed = [d for d in devices if d.state == "failed"]
            rows.append({
                "r": r, "total": len(devices), "counts": counts,
                "done": counts["installed"] + counts["failed"] == len(devices),
                "reasons": sorted(Counter(d.reason or "unknown" for d in failed).items()),
                "failed": failed[:_FAILED_SHOWN],
            })
        return rows

    async def rollouts(request: Request) -> Response:
        rows = await run_in_threadpool(rollout_rows, _me(request))
        return ctx.render(request, "updates.html", {"rollouts": rows, "states": STATES})

    return [Route("/console/updates", page(ctx)(rollouts), methods=["GET"])]
