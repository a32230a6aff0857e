"""Store benchmarks, not collected by pytest.

Run: .venv/bin/python tests/unit/store/bench_store.py

1. record(): rows/s for 1,000-row batches with 100-byte payloads into a WAL file.
2. Why SQLiteStore uses locked connections rather than one connection per thread: the same mixed
   load (get_device + small record batches) from 1 and 4 threads on both designs, with raw
   sqlite3 so that only the connection strategy differs.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from sensorseal.core.ids import DeviceId
from sensorseal.store import DeviceRecord, DeviceStatus, SQLiteStore, TelemetryRow
from sensorseal.store.sqlite import migrations

BATCH = 1_000
BATCHES = 100


def bench_record(rounds: int = 5) -> tuple[list[float], list[float]]:
    """(wall-clock rows/s, CPU-time rows/s) per round. CPU time is the steadier figure on a
    shared machine; wall time includes the WAL writes and checkpoints."""
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteStore(Path(tmp) / "bench.db")
            store.migrate()
            devices = [DeviceId(os.urandom(12)) for _ in range(10)]
            for n, did in enumerate(devices):
                store.add_device(DeviceRecord(did, f"d{n}", DeviceStatus.ACTIVE, 1, "standard",
                                              0), b"w")
            batches = [[TelemetryRow(devices[i % 10], 1, b * BATCH + i, 1_000 + i, None,
                                     "sealed", "up/t", "http", os.urandom(100))
                        for i in range(BATCH)] for b in range(BATCHES)]
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                store.record(batch)
            wall.append(BATCH * BATCHES / (time.perf_counter() - start))
            cpu.append(BATCH * BATCHES / (time.process_time() - start_cpu))
            store.close()
    return wall, cpu


def bench_raw_insert(rounds: int = 5) -> list[float]:
    """The ceiling: bare sqlite3 executemany of the same rows into the same schema, rows/s."""
    results = []
    insert = ("INSERT INTO telemetry (device_id, epoch, seq, received_ms, device_ts_ms, level,"
              " route, transport, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
              " ON CONFLICT DO NOTHING")
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            setup = SQLiteStore(Path(tmp) / "raw.db")
            setup.migrate()
            devices = [os.urandom(12) for _ in range(10)]
            for n, raw_id in enumerate(devices):
                setup.add_device(DeviceRecord(DeviceId(raw_id), f"d{n}", DeviceStatus.ACTIVE, 1,
                                              "standard", 0), b"w")
            setup.close()
            conn = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            batches = [[(devices[i % 10], 1, b * BATCH + i, 1_000 + i, None, "sealed", "up/t",
                         "http", os.urandom(100)) for i in range(BATCH)] for b in range(BATCHES)]
            start = time.perf_counter()
            for batch in batches:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(insert, batch)
                conn.execute("COMMIT")
            results.append(BATCH * BATCHES / (time.perf_counter() - start))
            conn.close()
    return results


def bench_threads(per_thread: bool, threads: int, ops: int = 4_000) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "t.db")
        setup = SQLiteStore(path)
        setup.migrate()
        ids = [os.urandom(12) for _ in range(100)]
        for n, raw_id in enumerate(ids):
            setup.add_device(DeviceRecord(DeviceId(raw_id), f"d{n}", DeviceStatus.ACTIVE, 1,
                                          "standard", 0), b"w")
        setup.close()

        def connect() -> sqlite3.Connection:
            c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA synchronous = NORMAL")
            c.execute("PRAGMA busy_timeout = 10000")
            return c

        local = threading.local()
        shared = connect()
        lock = threading.Lock()

        def conn() -> sqlite3.Connection:
            if not per_thread:
                return shared
            c: sqlite3.Connection | None = getattr(local, "c", None)
            if c is None:
                c = local.c = connect()
            return c

        def guard() -> AbstractContextManager[object]:
            return nullcontext() if per_thread else lock

        insert = ("INSERT INTO telemetry (device_id, epoch, seq, received_ms, level, route,"
                  " transport, payload) VALUES (?, 1, ?, 0, 's', 'r', 'h', ?)"
                  " ON CONFLICT DO NOTHING")

        def work(t: int) -> None:
            seq = t * 10**9
            for k in range(ops):
                with guard():
                    c = conn()
                    if k % 5 == 0:
                        c.execute("BEGIN IMMEDIATE")
                        c.executemany(insert, [(ids[t], seq + j, b"x" * 100) for j in range(10)])
                        c.execute("COMMIT")
                        seq += 10
                    else:
                        c.execute("SELECT * FROM devices WHERE id = ?", (ids[k % 100],)).fetchone()

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return threads * ops / (time.perf_counter() - start)


def main() -> None:
    assert migrations()
    wall: list[float] = []
    cpu: list[float] = []
    raw: list[float] = []
    for _ in range(3):  # interleaved with the bare-sqlite3 ceiling, same machine, same load
        w, c = bench_record(rounds=2)
        wall += w
        cpu += c
        raw += bench_raw_insert(rounds=2)
    print(f"record(): {BATCH}-row batches, 100-byte payloads, {BATCHES} batches x {len(wall)} "
          f"rounds: wall median {statistics.median(wall):,.0f} rows/s (max {max(wall):,.0f}); "
          f"CPU-time median {statistics.median(cpu):,.0f} rows/s; cpus={os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"bare sqlite3 executemany of the same rows (the ceiling): wall median "
          f"{statistics.median(raw):,.0f} rows/s; record() reaches "
          f"{statistics.median(wall) / statistics.median(raw):.0%} of it")
    strategies: list[tuple[str, Callable[[int], float]]] = [
        ("one connection + lock", lambda n: bench_threads(False, n)),
        ("connection per thread", lambda n: bench_threads(True, n)),
    ]
    # interleaved, so that drift in the machine's load hits every design alike
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for name, fn in strategies:
            for n in (1, 4):
                runs.setdefault((name, n), []).append(fn(n))
    for (name, n), rates in runs.items():
        print(f"mixed 80% get_device / 20% 10-row record, {n} thread(s), {name}: "
              f"median {statistics.median(rates):,.0f} ops/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
