"""Run a gateway process until SIGINT/SIGTERM: `sensorseal gateway run` calls `run_gateway`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from sensorseal.gateway.buffer import Buffer
from sensorseal.gateway.config import load_config
from sensorseal.gateway.service import Gateway, GatewaySettings, run_udp
from sensorseal.gateway.upstream import Upstream

__all__ = ["run_gateway"]


def run_gateway(config_path: Path, buffer_path: Path, upstream_url: str, *,
                ca_file: Path | None = None, client_cert: Path | None = None,
                client_key: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                max_buffer: int = 100_000, settings: GatewaySettings | None = None) -> None:
    """Blocks. Prints `sensorseal-gateway: listening on udp://HOST:PORT` once it serves."""
    config = load_config(config_path)
    upstream = Upstream(upstream_url, ca_file=ca_file, client_cert=client_cert,
                        client_key=client_key)
    buffer = Buffer(buffer_path, max_frames=max_buffer)
    try:
        gateway = Gateway(config, buffer, upstream, settings or GatewaySettings())
        asyncio.run(_main(gateway, host, port))
    finally:
        buffer.close()
        upstream.close()


async def _main(gateway: Gateway, host: str, port: int) -> None:
    task = asyncio.create_task(run_udp(
        gateway, host, port,
        ready=lambda a: print(f"sensorseal-gateway: listening on udp://{a[0]}:{a[1]}",
                              flush=True)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
