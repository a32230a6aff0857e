"""Run the HTTP ingest server on one data directory: open, wire up, serve until stopped.

The listening socket is bound here rather than by uvicorn so that port 0 works: the kernel picks
a free port and `ready(url)` (and stdout) learn the real one once the server accepts requests.
With a certificate and key the server speaks HTTPS only, TLS 1.2 or newer.

With `mqtt=MqttOptions(...)` the same process also does MQTT (sensorseal.server.mqtt_service):
the embedded broker or a link to an external one, an ingest worker feeding the same pipeline,
and the watcher that carries revocations made by other processes to the broker. Its URL is
printed next to the HTTP one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from sensorseal.core.errors import ConfigError
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.pipeline import Pipeline

if TYPE_CHECKING:
    from sensorseal.mqtt.commands import DownlinkCounter
    from sensorseal.server.eva_service import EvaOptions
    from sensorseal.server.iotcore_service import DropInEndpoints, IotCoreOptions
    from sensorseal.server.mqtt_service import MqttOptions

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(scheme: str, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@contextmanager
def _sigterm_is_a_clean_stop() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with this handler
    in place that re-raise unwinds our `finally` blocks (closing the store) and exits with 0
    instead of dying of the signal. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(data_dir: Path, host: str = "127.0.0.1", port: int = 8080,
          certfile: Path | None = None, keyfile: Path | None = None,
          ready: Callable[[str], None] | None = None,
          sock: socket.socket | None = None, mqtt: MqttOptions | None = None,
          iotcore: IotCoreOptions | None = None, eva: EvaOptions | None = None) -> None:
    """Serve the HTTP API from `data_dir` until SIGINT/SIGTERM. Blocks.

    `ready(url)` is called (and the URL printed) once the server accepts connections.
    `sock`: an already listening socket to serve on instead of binding host:port (a worker
    process of sensorseal.server.workers inherits the one its supervisor bound).
    `mqtt`: also run MQTT (broker or broker link, ingest worker, status watcher); None: HTTP only.
    `iotcore`: a TLS listener for Cloud IoT Core devices and the HTTP bridge routes; `eva`: the
    EVA ICS server role (sensorseal.server.iotcore_service / eva_service, docs/compat.md).
    """
    if (certfile is None) != (keyfile is None):
        raise ConfigError("HTTPS needs both a certificate file and a key file")
    datadir = DataDir(Path(data_dir))
    store, keystore = datadir.open()
    mqtt_service = None
    dropins: DropInEndpoints | None = None
    counter: DownlinkCounter | None = None
    try:
        registry = Registry(store, keystore)
        pipeline = Pipeline(registry, store)
        notes: list[str] = []
        if mqtt is not None:
            from sensorseal.server.mqtt_service import MqttService

            mqtt_service = MqttService(mqtt, registry=registry, pipeline=pipeline, store=store,
                                       data_dir=datadir.path).start()
            kind = "embedded broker" if mqtt.url is None else "broker"
            notes.append(f"sensorseal: MQTT on {mqtt_service.url} ({kind})")
        if iotcore is not None or eva is not None:
            from sensorseal.server.iotcore_service import DropInEndpoints

            dropins = DropInEndpoints(registry, store, iotcore=iotcore, eva=eva)
            notes += dropins.start()  # their own threads: stopped below, after the server
        updates = None
        if hasattr(store, "list_rollouts"):  # a store with the update tables (sensorseal.updates)
            from sensorseal.mqtt.commands import COUNTER_FILE, CloudLink, DownlinkCounter
            from sensorseal.updates.server import UpdateService

            counter = DownlinkCounter(datadir.path / COUNTER_FILE)
            updates = UpdateService(store, sealer=CloudLink(registry, counter))  # type: ignore[arg-type]
        app = create_app(pipeline, registry, store, token_check=datadir.check_token,
                         console=True,
                         broker_auth=None if mqtt_service is None else mqtt_service.broker_auth(),
                         extra_routes=() if dropins is None else dropins.routes,
                         updates=updates)
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_level="info", server_header=False,
            ssl_certfile=None if certfile is None else str(certfile),
            ssl_keyfile=None if keyfile is None else str(keyfile),
        )
        config.load()
        if config.ssl is not None:
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        sock = _bind(host, port) if sock is None else sock
        url = _url("https" if config.ssl is not None else "http", sock)
        server = uvicorn.Server(config)
        with _sigterm_is_a_clean_stop():
            asyncio.run(_serve(server, sock, url, ready, notes))
    finally:
        if counter is not None:
            counter.close()
        if dropins is not None:
            dropins.stop()
        if mqtt_service is not None:
            mqtt_service.stop()
        store.close()


async def _serve(server: uvicorn.Server, sock: socket.socket, url: str,
                 ready: Callable[[str], None] | None, notes: list[str] | None = None) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"sensorseal: serving on {url}", flush=True)
        for note in notes or ():
            print(note, flush=True)
        if ready is not None:
            ready(url)
    await task

