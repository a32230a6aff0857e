"""Run a gateway process until SIGINT/SIGTERM: `sensorseal gateway run` calls `run_gateway`.

The radio side is a transport: `udp` (loopback UDP standing in for the radio, the default) or
`mqtt` (a local MQTT broker, gateway/mqtt_radio.py). Everything behind it is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from sensorseal.core.errors import ConfigError
from sensorseal.gateway.buffer import Buffer
from sensorseal.gateway.config import load_config
from sensorseal.gateway.service import Gateway, GatewaySettings, run_udp
from sensorseal.gateway.upstream import Upstream, tls_context

__all__ = ["TRANSPORTS", "run_gateway"]

TRANSPORTS = ("udp", "mqtt")


def run_gateway(config_path: Path, buffer_path: Path, upstream_url: str, *,
                ca_file: Path | None = None, client_cert: Path | None = None,
                client_key: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                max_buffer: int = 100_000, settings: GatewaySettings | None = None,
                transport: str = "udp", mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883,
                mqtt_ca: Path | None = None, mqtt_client_cert: Path | None = None,
                mqtt_client_key: Path | None = None, mqtt_username: str | None = None,
                mqtt_password: str | None = None, mqtt_topic_prefix: str | None = None) -> None:
    """Blocks. Prints `sensorseal-gateway: listening on udp://HOST:PORT` (or
    `mqtt://HOST:PORT`, `mqtts://` with `mqtt_ca`) once it serves.

    `host`/`port` are the UDP listen address; `mqtt_*` the broker (TLS 1.2+ verified against
    `mqtt_ca` when given, optionally with a client certificate; the login defaults to the
    gateway id and its derived broker password).
    """
    if transport not in TRANSPORTS:
        raise ConfigError(f"transport must be one of {', '.join(TRANSPORTS)}")
    tls: ssl.SSLContext | None = None
    if mqtt_ca is not None:
        tls = tls_context(mqtt_ca, mqtt_client_cert, mqtt_client_key)
    elif mqtt_client_cert is not None or mqtt_client_key is not None:
        raise ConfigError("an MQTT client certificate needs the broker's CA (mqtt_ca)")
    config = load_config(config_path)
    upstream = Upstream(upstream_url, ca_file=ca_file, client_cert=client_cert,
                        client_key=client_key)
    buffer = Buffer(buffer_path, max_frames=max_buffer)
    try:
        gateway = Gateway(config, buffer, upstream, settings or GatewaySettings())
        if transport == "udp":
            asyncio.run(_main(run_udp(gateway, host, port, ready=_announce("udp"))))
        else:
            from sensorseal.gateway.mqtt_radio import DEFAULT_PREFIX, run_mqtt

            serve = run_mqtt(gateway, mqtt_host, mqtt_port,
                             topic_prefix=mqtt_topic_prefix or DEFAULT_PREFIX, tls=tls,
                             username=mqtt_username, password=mqtt_password,
                             ready=_announce("mqtts" if tls else "mqtt"))
            asyncio.run(_main(serve))
    finally:
        buffer.close()
        upstream.close()


def _announce(scheme: str) -> Callable[[tuple[str, int]], None]:
    def ready(addr: tuple[str, int]) -> None:
        print(f"sensorseal-gateway: listening on {scheme}://{addr[0]}:{addr[1]}", flush=True)
    return ready


async def _main(serve: Coroutine[Any, Any, None]) -> None:
    task = asyncio.create_task(serve)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
