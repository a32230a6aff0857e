"""Shared by test_scale.py and test_soak.py (and benchmarks/scale.py): a sensorseal installation
on PostgreSQL, bulk-provisioned simulated devices, pre-sealed messages, and a supervisor process
(`sensorseal serve --workers N`) whose worker pids we can follow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import KeyContext, derive
from sensorseal.datadir import DATABASE_URL_ENV, DataDir
from sensorseal.registry import FIRST_EPOCH
from sensorseal.store.base import DeviceRecord, DeviceStatus, Store

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_SERVING = re.compile(r"serving on (\S+)")


def install(path: Path, database_url: str | None) -> dict[str, str]:
    """Initialize a data dir (on `database_url` if given); the environment to use it with."""
    env = dict(os.environ)
    env.pop(DATABASE_URL_ENV, None)
    if database_url is not None:
        env[DATABASE_URL_ENV] = database_url
    DataDir(path, env=env).init()
    return env


def provision(path: Path, env: Mapping[str, str], count: int,
              store: Store | None = None) -> list[DeviceCredential]:
    """`count` devices in one bulk write (PostgresStore.add_devices) or one by one (SQLite)."""
    datadir = DataDir(path, env=env)
    own = store is None
    if store is None:
        store, keystore = datadir.open()
    else:
        _, keystore = datadir.open()
    try:
        now = int(time.time() * 1000)
        creds, items = [], []
        for _ in range(count):
            did = DeviceId(os.urandom(12))
            secret = os.urandom(32)
            creds.append(DeviceCredential(did, FIRST_EPOCH, secret))
            items.append((DeviceRecord(did, f"sim-{did.hex()[:6]}", DeviceStatus.ACTIVE,
                                       FIRST_EPOCH, "standard", now),
                          keystore.wrap(did, FIRST_EPOCH, secret)))
        bulk = getattr(store, "add_devices", None)
        if bulk is not None:
            bulk(items)
        else:
            for rec, wrapped in items:
                store.add_device(rec, wrapped)
        return creds
    finally:
        if own:
            store.close()


class Sealer:
    """Seals messages for simulated devices, keeping each device's counter."""

    def __init__(self, creds: Sequence[DeviceCredential]) -> None:
        self.creds = list(creds)
        self.keys: list[KeyContext] = [derive(c.secret, c.device_id, c.epoch, Direction.UP)
                                       for c in self.creds]
        self.next_seq = [1] * len(self.creds)

    def seal(self, index: int, route: str, payload: bytes = b"x" * 100) -> tuple[bytes, int]:
        seq = self.next_seq[index]
        self.next_seq[index] += 1
        return seal(payload, keys=self.keys[index], seq=seq, route=route,
                    timestamp_ms=int(time.time() * 1000)), seq


@dataclass
class Cluster:
    """`sensorseal serve --workers N` as a child process; follows its workers' pids."""

    data_dir: Path
    env: dict[str, str]
    workers: int = 2
    mqtt: str | None = None
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    pids: dict[int, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self, timeout: float = 60.0) -> Cluster:
        cmd = [sys.executable, "-m", "sensorseal", "--data-dir", str(self.data_dir), "serve",
               "--workers", str(self.workers), "--http-port", "0"]
        if self.mqtt is not None:
            cmd += ["--mqtt", self.mqtt]
        elif self.workers == 1:
            cmd.append("--no-mqtt")  # one process: HTTP only, like the workers
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(lambda: bool(self.url), timeout, "the cluster to serve")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip())
                m = _STARTED.search(line)
                if m:
                    self.pids[int(m.group(1))] = int(m.group(2))
                m = _SERVING.search(line)
                if m:
                    self.url = m.group(1)
                self._cond.notify_all()

    def wait_for(self, predicate: object, timeout: float, what: str) -> None:
        assert callable(predicate)
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                tail = "\n".join(self.lines[-30:])
                raise AssertionError(f"timed out waiting for {what}; output:\n{tail}")

    def kill_worker(self, index: int, timeout: float = 30.0) -> tuple[int, int]:
        """SIGKILL one worker; wait until the supervisor has started its successor and it is
        ready. (old pid, new pid)."""
        old = self.pids[index]
        ready_before = self.ready_count(index)
        os.kill(old, signal.SIGKILL)
        self.wait_for(lambda: self.pids.get(index) != old and self.ready_count(index) >
                      ready_before, timeout, f"worker {index} to be restarted")
        return old, self.pids[index]

    def ready_count(self, index: int) -> int:
        return sum(1 for ln in self.lines if f"worker {index} (pid" in ln and "ready" in ln)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def pid_serving(client_port: int, pids: Sequence[int]) -> int | None:
    """Which of `pids` holds the server end of the TCP connection from 127.0.0.1:client_port
    (read from /proc, so no extra dependency)."""
    inodes: set[str] = set()
    port_hex = f"{client_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[2].endswith(":" + port_hex):  # remote end is the client
                inodes.add(cols[9])
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None
