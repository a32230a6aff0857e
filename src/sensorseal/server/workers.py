"""Several stateless ingest processes behind one listening socket: `sensorseal serve --workers N`.

Why processes: unsealing is CPU-bound Python, so one process uses one core whatever its thread
count. The supervisor binds the HTTP socket ONCE and every worker inherits it (passed as a file
descriptor): the kernel queues connections on that one socket and whichever worker is free
accepts the next one. Unlike SO_REUSEPORT, a worker that dies loses no queued connection, and
port 0 works. With `--mqtt HOST:PORT` each worker also runs an MQTT ingest worker in the shared
subscription, with a client id fixed per host and worker slot, so a restarted worker resumes
the broker session of the one it replaces and receives what that one had not acknowledged.

Workers share nothing but the database (and the broker): each has its own store connections,
registry cache and replay windows. The store's unique key (device, epoch, seq) decides replays
between them; a device's status is re-read at most `status_ttl_ms` (1 s) after it was cached,
so a revocation is honoured by every worker within one second. A worker that exits for any
reason is started again; SIGTERM/SIGINT to the supervisor stops every worker gracefully.

A worker learns that its supervisor died through its stdin pipe (EOF) and stops itself.

    supervisor (binds socket, restarts workers, forwards signals)
      ├─ worker 1: uvicorn on the inherited socket + Pipeline + store pool [+ IngestWorker]
      └─ worker 2: ...
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from sensorseal.core.errors import ConfigError

__all__ = ["MQTT_PASSWORD_ENV", "MQTT_USERNAME_ENV", "WORKER_NAME_ENV", "Supervisor",
           "serve_workers", "worker_client_id"]

log = logging.getLogger(__name__)

MQTT_USERNAME_ENV = "SENSORSEAL_MQTT_USERNAME"
MQTT_PASSWORD_ENV = "SENSORSEAL_MQTT_PASSWORD"  # noqa: S105 (the variable's name)
WORKER_NAME_ENV = "SENSORSEAL_WORKER_NAME"
RESTART_DELAY_S = 0.5
STOP_TIMEOUT_S = 10.0
EXIT_CONFIG = 2  # what a worker exits with on ConfigError
_READY_MARK = "serving on "


def _split_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MQTT broker must be HOST:PORT, got {text!r:.60}")
    return host.strip("[]"), int(port)


@dataclass(eq=False)
class _Slot:
    index: int
    proc: subprocess.Popen[str] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    starts: int = 0
    ever_ready: bool = False


class Supervisor:
    """Starts `workers` worker processes on one inherited socket and keeps them running."""

    def __init__(self, data_dir: Path, *, workers: int, host: str = "127.0.0.1",
                 port: int = 8080, certfile: Path | None = None, keyfile: Path | None = None,
                 mqtt: str | None = None, echo: Callable[[str], None] | None = None) -> None:
        if workers < 1:
            raise ConfigError("--workers must be at least 1")
        if (certfile is None) != (keyfile is None):
            raise ConfigError("HTTPS needs both a certificate file and a key file")
        if mqtt is not None:
            _split_broker(mqtt)
        from sensorseal.server.run import _bind, _url

        self.data_dir = Path(data_dir)
        self.certfile, self.keyfile, self.mqtt = certfile, keyfile, mqtt
        self.sock = _bind(host, port)
        self.url = _url("https" if certfile is not None else "http", self.sock)
        self.slots = [_Slot(i + 1) for i in range(workers)]
        self._echo = echo or (lambda line: print(line, flush=True))
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # -- workers -----------------------------------------------------------------------------

    def _command(self, slot: _Slot) -> list[str]:
        cmd = [sys.executable, "-m", "sensorseal.server.workers", "--data-dir",
               str(self.data_dir), "--fd", str(self.sock.fileno()), "--index", str(slot.index)]
        if self.certfile is not None and self.keyfile is not None:
            cmd += ["--certfile", str(self.certfile), "--keyfile", str(self.keyfile)]
        if self.mqtt is not None:
            cmd += ["--mqtt", self.mqtt]
        return cmd

    def _spawn(self, slot: _Slot) -> None:
        slot.ready.clear()
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self._command(slot), pass_fds=(self.sock.fileno(),), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)
        slot.proc = proc
        slot.starts += 1
        self._echo(f"sensorseal: worker {slot.index} started (pid {proc.pid})")
        threading.Thread(target=self._relay, args=(slot, proc), daemon=True,
                         name=f"relay-{slot.index}").start()

    def _relay(self, slot: _Slot, proc: subprocess.Popen[str]) -> None:
        """Echo a worker's stdout with its slot and pid; notice when it serves."""
        stream: IO[str] | None = proc.stdout
        if stream is None:
            return
        for line in stream:
            line = line.rstrip("\n")
            if _READY_MARK in line:
                slot.ready.set()
                slot.ever_ready = True
                line = f"sensorseal: worker {slot.index} (pid {proc.pid}) ready"
            self._echo(line)

    def pids(self) -> dict[int, int]:
        """Slot index -> pid of the running worker process."""
        with self._lock:
            return {s.index: s.proc.pid for s in self.slots
                    if s.proc is not None and s.proc.poll() is None}

    # -- lifecycle -----------------------------------------------------------------------------

    def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Start every worker, announce the URL once all serve, restart any that exits, and
        return after stop() (or SIGTERM/SIGINT when run in the main thread)."""
        with self._lock:
            for slot in self.slots:
                self._spawn(slot)
        announced = False
        failed: str | None = None
        try:
            while not self._stopping.is_set():
                if not announced and all(s.ready.is_set() for s in self.slots):
                    announced = True
                    self._echo(f"sensorseal: serving on {self.url} with "
                               f"{len(self.slots)} workers")
                    if ready is not None:
                        ready(self.url)
                with self._lock:
                    for slot in self.slots:
                        proc = slot.proc
                        if proc is not None and proc.poll() is not None \
                                and not self._stopping.is_set():
                            if proc.returncode == EXIT_CONFIG and not slot.ever_ready:
                                # A configuration error repeats on every start: stop, say why.
                                failed = (f"worker {slot.index} could not start (configuration"
                                          " error above)")
                                self._stopping.set()
                                break
                            self._echo(f"sensorseal: worker {slot.index} (pid {proc.pid}) exited"
                                       f" with {proc.returncode}; starting it again")
                            time.sleep(RESTART_DELAY_S)
                            self._spawn(slot)
                self._stopping.wait(0.1)
        finally:
            self._stop_workers()
            self.sock.close()
        if failed is not None:
            raise ConfigError(failed)

    def stop(self) -> None:
        self._stopping.set()

    def _stop_workers(self) -> None:
        with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdin is not None:
                proc.stdin.close()


def serve_workers(data_dir: Path, *, workers: int, host: str = "127.0.0.1", port: int = 8080,
                  certfile: Path | None = None, keyfile: Path | None = None,
                  mqtt: str | None = None,
                  ready: Callable[[str], None] | None = None) -> None:
    """Run `workers` ingest processes until SIGTERM/SIGINT. Blocks."""
    from sensorseal.datadir import DataDir

    datadir = DataDir(data_dir)
    store, _ = datadir.open()  # fail early (not N times) on a bad data dir; migrates once
    store.close()
    sup = Supervisor(data_dir, workers=workers, host=host, port=port, certfile=certfile,
                     keyfile=keyfile, mqtt=mqtt)

    def stop(signum: int, frame: FrameType | None) -> None:
        sup.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    sup.run(ready)


# -- the worker process ------------------------------------------------------------------------

def _exit_with_supervisor() -> None:
    """Stop this worker when its supervisor goes away (our stdin is its pipe: EOF then)."""
    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.read()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="supervisor-watch").start()


def _worker_main(args: argparse.Namespace) -> int:
    from sensorseal.server import run as run_mod

    sock = socket.socket(fileno=args.fd)
    mqtt_worker = None
    if args.mqtt is not None:
        mqtt_worker = _start_mqtt(args.data_dir, args.mqtt, args.index)
    _exit_with_supervisor()
    try:
        run_mod.serve(args.data_dir, certfile=args.certfile, keyfile=args.keyfile, sock=sock)
    finally:
        if mqtt_worker is not None:
            mqtt_worker.stop()
    return 0


def worker_client_id(index: int) -> str:
    """The MQTT client id of worker slot `index` on this host: stable across restarts (so a
    replacement resumes the session and gets what its predecessor had not acknowledged) and
    distinct between hosts (`$SENSORSEAL_WORKER_NAME`, else the host name)."""
    name = os.environ.get(WORKER_NAME_ENV, "").strip() or socket.gethostname()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40]
    return f"sensorseal-ingest-{safe}-{index}"


class _MqttIngest:
    """An IngestWorker with its own store and pipeline (independent of the HTTP side's)."""

    def __init__(self, data_dir: Path, broker: str, index: int) -> None:
        from sensorseal.datadir import DataDir
        from sensorseal.mqtt.worker import IngestWorker
        from sensorseal.registry import Registry
        from sensorseal.server.pipeline import Pipeline

        host, port = _split_broker(broker)
        self._store, keystore = DataDir(data_dir).open()
        pipeline = Pipeline(Registry(self._store, keystore), self._store)
        self.worker = IngestWorker(pipeline, host, port,
                                   username=os.environ.get(MQTT_USERNAME_ENV),
                                   password=os.environ.get(MQTT_PASSWORD_ENV),
                                   client_id=worker_client_id(index))
        self.worker.start(wait_s=10.0)

    def stop(self) -> None:
        try:
            self.worker.stop()
        finally:
            self._store.close()


def _start_mqtt(data_dir: Path, broker: str, index: int) -> _MqttIngest:
    return _MqttIngest(data_dir, broker, index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensorseal.server.workers",
                                     description="One worker process (started by the "
                                                 "supervisor of `sensorseal serve --workers`).")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--certfile", type=Path)
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--mqtt", help="HOST:PORT of the broker to ingest from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {args.index} "
                        "%(levelname)s %(name)s: %(message)s")
    try:
        return _worker_main(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
