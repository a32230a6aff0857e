"""Scale benchmark: workers x back ends, PostgreSQL batch inserts, 1,000,000-device registry.

In one run, on this machine, loopback only:

1. End-to-end accepted messages/s over HTTP batches (`sensorseal serve --workers N`, real
   processes, pre-sealed 100-byte messages, 1,000-message CBOR batches from 8 client threads)
   with 1 and 2 workers, on PostgreSQL (a fresh database) and on SQLite (WAL).
2. PostgresStore.record() rows/s with the two insert strategies: one multi-row
   `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING RETURNING` versus COPY into a
   temporary table then `INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING`.
3. Bulk provisioning of 1,000,000 devices into PostgreSQL (secrets wrapped under the KEK,
   COPY in chunks) with a rich progress bar; then registry lookups: uncached (a database read
   per lookup) per second, the pipeline's cached lookup in microseconds, and memory per cached
   device (tracemalloc).

The last line is one JSON object (pg_1worker_per_s, pg_2workers_per_s, sqlite_1worker_per_s,
sqlite_2workers_per_s, cached_lookup_us, provision_1m_s, ...).

    .venv/bin/python benchmarks/scale.py [--messages 60000] [--devices 1000000]
        [--clients 8] [--skip-provision]

Needs PostgreSQL at SENSORSEAL_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import httpx
import psutil
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from scale_support import Cluster, Sealer, install, provision

import pg_support
from sensorseal.core.ids import DeviceId
from sensorseal.datadir import DataDir
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import FIRST_EPOCH, Registry
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import DeviceRecord, DeviceStatus, TelemetryRow
from sensorseal.store.postgres import PostgresStore

ROUTE = "/v1/messages"
BATCH = 1_000


def post_all(url: str, bodies: Sequence[bytes], clients: int) -> tuple[int, float]:
    work: queue.Queue[bytes] = queue.Queue()
    for b in bodies:
        work.put(b)
    accepted = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120,
                          headers={"Content-Type": "application/cbor"}) as http:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    return
                r = http.post(ROUTE + ":batch", content=body)
                if r.status_code == 200:
                    n = cbor2.loads(r.content).count(0)
                    with lock:
                        accepted[0] += n

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted[0], time.perf_counter() - start


def ingest_rate(backend: str, workers: int, messages: int, clients: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, (
            pg_support.fresh_database(prefix="sensorseal_bench") if backend == "pg"
            else _nothing()) as url:
        path = Path(tmp) / "d"
        env = install(path, url)
        creds = provision(path, env, 100)
        sealer = Sealer(creds)
        msgs = [sealer.seal(i % len(creds), ROUTE)[0] for i in range(messages)]
        bodies = [cbor2.dumps(msgs[i:i + BATCH]) for i in range(0, len(msgs), BATCH)]
        with Cluster(path, env, workers=workers) as cluster:
            post_all(cluster.url, bodies[:2], 2)  # warm-up: caches, connections
            before = psutil.cpu_times()
            accepted, took = post_all(cluster.url, bodies[2:], clients)
            busy = _busy_s(before, psutil.cpu_times())
        expected = messages - 2 * BATCH
        if accepted != expected:
            print(f"  warning: {accepted} of {expected} accepted", file=sys.stderr)
        rate = accepted / took
        CORES_BUSY[(backend, workers)] = busy / took
        print(f"{backend:6} {workers} worker(s): {accepted} accepted in {took:.2f}s = "
              f"{rate:,.0f} msg/s; {busy / took:.2f} of {psutil.cpu_count()} cores busy "
              f"(workers, database, load generator and anything else)")
        return rate


# (back end, workers) -> cores busy machine-wide during the timed part. A run that already
# keeps B of the machine's C cores busy with one worker can gain at most C / B from a second
# worker if it is CPU-bound: that bound is printed next to the speed-up.
CORES_BUSY: dict[tuple[str, int], float] = {}


def _busy_s(before: Any, after: Any) -> float:
    """CPU seconds spent on anything but idle and I/O wait, all cores, between two samples."""
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0)
                                         - getattr(before, "iowait", 0.0))
    return float((sum(after) - sum(before)) - idle)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def record_modes(url: str) -> dict[str, float]:
    """rows/s of PostgresStore.record for 1,000-row batches, per insert mode."""
    out: dict[str, float] = {}
    for mode in ("unnest", "copy"):
        store = PostgresStore(url, insert_mode=mode)  # type: ignore[arg-type]
        store.migrate()
        devs = [DeviceId(os.urandom(12)) for _ in range(10)]
        for d in devs:
            store.add_device(DeviceRecord(d, "b", DeviceStatus.ACTIVE, 1, "standard", 0), b"w")
        payload = os.urandom(100)
        batches = [[TelemetryRow(devs[i % 10], 1, b * BATCH + i, 1_000 + b, None, "sealed",
                                 ROUTE, "http", payload) for i in range(BATCH)]
                   for b in range(60)]
        for batch in batches[:5]:
            store.record(batch)
        start = time.perf_counter()
        for batch in batches[5:]:
            store.record(batch)
        took = time.perf_counter() - start
        out[mode] = 55 * BATCH / took
        store.close()
        print(f"PostgresStore.record insert_mode={mode}: {out[mode]:,.0f} rows/s")
    return out


def provision_bulk(url: str, count: int,
                   keystore: SoftwareKeystore) -> tuple[float, list[DeviceId]]:
    store = PostgresStore(url)
    store.migrate()
    chunk = 20_000
    ids: list[DeviceId] = []
    now = int(time.time() * 1000)
    start = time.perf_counter()
    with Progress(TextColumn("provisioning"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("devices", total=count)
        done = 0
        while done < count:
            n = min(chunk, count - done)
            items = []
            for _ in range(n):
                did = DeviceId(os.urandom(12))
                items.append((DeviceRecord(did, "bulk", DeviceStatus.ACTIVE, FIRST_EPOCH,
                                           "standard", now),
                              keystore.wrap(did, FIRST_EPOCH, os.urandom(32))))
                ids.append(did)
            store.add_devices(items)
            done += n
            bar.update(task, advance=n)
    took = time.perf_counter() - start
    store.close()
    print(f"provisioned {count:,} devices in {took:.1f}s ({count / took:,.0f}/s)")
    return took, ids


def lookups(url: str, keystore: SoftwareKeystore, ids: list[DeviceId]) -> dict[str, float]:
    store = PostgresStore(url)
    registry = Registry(store, keystore)
    pipeline = Pipeline(registry, store, status_ttl_ms=3_600_000)
    rng = random.Random(7)
    cold = rng.sample(ids, 3_000)
    start = time.perf_counter()
    for did in cold:
        registry.find(did)
    uncached = len(cold) / (time.perf_counter() - start)
    print(f"uncached registry lookups (one PostgreSQL read each): {uncached:,.0f}/s")

    cached_ids = rng.sample(ids, 20_000)
    now = pipeline.now_ms()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for did in cached_ids:
        pipeline._context(did, FIRST_EPOCH, now)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_device = (after - before) / len(cached_ids)
    print(f"memory per cached device (record + security context + window): "
          f"{per_device:,.0f} bytes")

    context = pipeline._context
    probe = cached_ids * 10
    start = time.perf_counter()
    for did in probe:
        context(did, FIRST_EPOCH, now)
    cached_us = (time.perf_counter() - start) / len(probe) * 1e6
    print(f"cached lookup: {cached_us:.2f} us ({1e6 / cached_us:,.0f}/s)")
    store.close()
    return {"uncached_lookups_per_s": uncached, "cached_lookup_us": cached_us,
            "cached_bytes_per_device": per_device}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=60_000)
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--skip-provision", action="store_true")
    args = ap.parse_args()
    reason = pg_support.unreachable_reason()
    if reason:
        raise SystemExit(reason)
    result: dict[str, float] = {}
    for backend in ("pg", "sqlite"):
        for workers in (1, 2):
            rate = ingest_rate(backend, workers, args.messages, args.clients)
            key = f"{backend if backend == 'sqlite' else 'pg'}_{workers}worker" + \
                ("s" if workers > 1 else "") + "_per_s"
            result[key] = round(rate)
    result["pg_speedup_2_workers"] = round(result["pg_2workers_per_s"] /
                                           result["pg_1worker_per_s"], 2)
    result["sqlite_speedup_2_workers"] = round(result["sqlite_2workers_per_s"] /
                                               result["sqlite_1worker_per_s"], 2)
    cores = psutil.cpu_count() or 1
    for backend in ("pg", "sqlite"):
        one = CORES_BUSY[(backend, 1)]
        result[f"{backend}_1worker_cores_busy"] = round(one, 2)
        result[f"{backend}_2workers_cores_busy"] = round(CORES_BUSY[(backend, 2)], 2)
        # CPU-bound, a second worker can add at most the cores the first run left idle.
        result[f"{backend}_speedup_cpu_bound_limit"] = round(cores / one, 2)
        print(f"{backend:6} speed-up with 2 workers: {result[f'{backend}_speedup_2_workers']}x; "
              f"one worker already kept {one:.2f} of {cores} cores busy, so a CPU-bound "
              f"limit of {cores / one:.2f}x")
    with pg_support.fresh_database(prefix="sensorseal_bench") as url:
        modes = record_modes(url)
    result["pg_record_unnest_rows_per_s"] = round(modes["unnest"])
    result["pg_record_copy_rows_per_s"] = round(modes["copy"])
    if not args.skip_provision:
        with pg_support.fresh_database(prefix="sensorseal_bench") as url, \
                tempfile.TemporaryDirectory() as tmp:
            DataDir(Path(tmp) / "k").init()
            keystore = SoftwareKeystore(os.urandom(32))
            took, ids = provision_bulk(url, args.devices, keystore)
            result["provision_1m_s"] = round(took * 1_000_000 / args.devices, 1)
            found = lookups(url, keystore, ids)
            result["uncached_lookups_per_s"] = round(found["uncached_lookups_per_s"])
            result["cached_lookup_us"] = round(found["cached_lookup_us"], 2)
            result["cached_bytes_per_device"] = round(found["cached_bytes_per_device"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
