"""HTTP batch ingest throughput: the real server process, real sealed messages, real SQLite.

Provisions N devices in a temporary data directory, pre-seals M messages (100-byte payloads,
sequence numbers in order per device), starts `python -m sensorseal.server` (one uvicorn
process) and posts CBOR batches from a few concurrent httpx clients. Prints accepted messages
per second; the last line is one JSON object.

To see where the time goes, `--breakdown` also times the same work in this process without
HTTP: unseal alone, the pipeline without the store write, and the full pipeline.

    .venv/bin/python benchmarks/http_ingest.py [--devices 100] [--messages 200000]
        [--batch 1000] [--clients 4] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import cbor2
import httpx

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal, unseal
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import AuditEvent, TelemetryRow

ROUTE = "/v1/messages"


def provision(path: Path, devices: int) -> list[DeviceCredential]:
    datadir = DataDir(path)
    datadir.init()
    store, keystore = datadir.open()
    try:
        registry = Registry(store, keystore)
        return [registry.add_device(f"bench-{i}", "standard") for i in range(devices)]
    finally:
        store.close()


def seal_messages(creds: Sequence[DeviceCredential], count: int, payload_len: int,
                  first_seq: int) -> list[bytes]:
    """`count` messages round-robin over the devices, sequence numbers rising per device."""
    keys = [derive(c.secret, c.device_id, c.epoch, Direction.UP) for c in creds]
    now = int(time.time() * 1000)
    payload = os.urandom(payload_len)
    return [seal(payload, keys=keys[i % len(keys)], seq=first_seq + i // len(keys), route=ROUTE,
                 timestamp_ms=now) for i in range(count)]


def start_server(path: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "sensorseal.server", "--data-dir", str(path),
                             "--http-port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if "serving on " in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
            return proc, line.split("serving on ", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to report CPU per message:
    unlike msg/s, that figure does not depend on what else the machine is doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post_all(url: str, bodies: Sequence[bytes], clients: int) -> tuple[int, int, float]:
    """Post every body from `clients` threads; (accepted, rejected, seconds)."""
    work: queue.Queue[bytes] = queue.Queue()
    for body in bodies:
        work.put(body)
    totals = [0, 0]
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Content-Type": "application/cbor"}) as http:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    return
                r = http.post(ROUTE + ":batch", content=body)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}")
                    continue
                codes = cbor2.loads(r.content)
                with lock:
                    totals[0] += codes.count(0)
                    totals[1] += codes.count(1)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        print(f"errors: {len(errors)} (first: {errors[0]})", file=sys.stderr)
    return totals[0], totals[1], elapsed


class _NullStore:
    """Wraps a store but skips the write, to time the pipeline without SQLite."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def record(self, rows: Sequence[TelemetryRow],
               events: Sequence[AuditEvent] = ()) -> list[bool]:
        return [True] * len(rows)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def breakdown(path: Path, creds: Sequence[DeviceCredential], batch: int,
              payload_len: int) -> dict[str, float]:
    """Per-message CPU microseconds of each stage, in this process, without HTTP. (sqlite3
    waits for the disk outside the process's CPU time; fsync is off in WAL/NORMAL anyway.)"""
    n = 20 * batch
    msgs = seal_messages(creds, n, payload_len, first_seq=10_000_000)
    by_id = {bytes(c.device_id): c for c in creds}
    ctxs: dict[bytes, SecurityContext] = {}

    def lookup(device_id: DeviceId, epoch: int) -> SecurityContext:
        ctx = ctxs.get(device_id)
        if ctx is None:
            c = by_id[bytes(device_id)]
            ctx = ctxs[device_id] = SecurityContext.from_secret(c.secret, c.device_id, c.epoch,
                                                                Direction.UP)
        return ctx

    now = int(time.time() * 1000)
    start = time.process_time()  # CPU time: comparable between stages on a busy machine
    for m in msgs:
        unseal(m, route=ROUTE, contexts=lookup, now_ms=now, strike=False)
    out = {"unseal_us": (time.process_time() - start) / n * 1e6}

    datadir = DataDir(path)
    store, keystore = datadir.open()
    try:
        registry = Registry(store, keystore)
        items = [[(m, ROUTE) for m in msgs[i:i + batch]] for i in range(0, n, batch)]
        for label, target in (("pipeline_no_store_us", _NullStore(store)),
                              ("pipeline_with_sqlite_us", store)):
            pipeline = Pipeline(registry, target)  # type: ignore[arg-type]
            pipeline.ingest(items[0], transport="bench", source="local")  # warm the cache
            start = time.process_time()
            for chunk in items[1:]:
                pipeline.ingest(chunk, transport="bench", source="local")
            out[label] = (time.process_time() - start) / (n - batch) * 1e6
    finally:
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sensorseal-bench-") as tmp:
        path = Path(tmp) / "data"
        creds = provision(path, args.devices)
        t = time.perf_counter()
        warm = seal_messages(creds, args.batch, args.payload, first_seq=0)
        msgs = seal_messages(creds, args.messages, args.payload, first_seq=1_000)
        bodies = [cbor2.dumps(msgs[i:i + args.batch])
                  for i in range(0, len(msgs), args.batch)]
        print(f"sealed {len(msgs)} messages in {time.perf_counter() - t:.1f}s "
              f"({args.devices} devices, {args.payload}-byte payloads)")

        proc, url = start_server(path)
        try:
            post_all(url, [cbor2.dumps(warm)], 1)  # load every device's context once
            cpu0 = cpu_seconds(proc.pid)
            accepted, rejected, elapsed = post_all(url, bodies, args.clients)
            server_cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        rate = accepted / elapsed
        cpu_us = server_cpu / max(accepted, 1) * 1e6
        print(f"posted {len(bodies)} batches of {args.batch} from {args.clients} clients in "
              f"{elapsed:.2f}s: {accepted} accepted, {rejected} rejected, {rate:,.0f} msg/s")
        print(f"server CPU: {server_cpu:.2f}s, {cpu_us:.1f} us/msg "
              f"(= {1e6 / cpu_us:,.0f} msg/s per fully used core); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        datadir = DataDir(path)
        store, _ = datadir.open()
        try:
            stored = store.count_telemetry()
        finally:
            store.close()
        result: dict[str, object] = {
            "accepted_per_s": round(rate), "batch_size": args.batch, "messages": len(msgs),
            "accepted": accepted, "rejected": rejected, "stored": stored,
            "clients": args.clients, "devices": args.devices, "seconds": round(elapsed, 3),
            "cpus": os.cpu_count(), "server_cpu_us_per_msg": round(cpu_us, 2),
            "load_avg": round(os.getloadavg()[0], 2)}
        if args.breakdown:
            stages = breakdown(path, creds, args.batch, args.payload)
            for name, us in stages.items():
                print(f"  {name:>24}: {us:6.1f} us/msg  ({1e6 / us:,.0f} msg/s on one core)")
            result.update({k: round(v, 2) for k, v in stages.items()})
        print(json.dumps(result))


if __name__ == "__main__":
    main()
