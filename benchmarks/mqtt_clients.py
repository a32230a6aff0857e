"""Which Python MQTT client can receive fastest? Plain subscribers against one Mosquitto.

The same plain paho publisher process as benchmarks/mqtt_ingest.py (100-byte payloads, 500 in
flight) publishes N messages; the subscriber in this process only counts them. For QoS 0 and
QoS 1 (the subscriber acknowledging each message as the client does by default), per client:

- paho:          paho-mqtt 2.x, network loop in its own thread (`loop_start`), as the plain
                 subscriber of mqtt_ingest.py
- paho+reader:   the same, but PUBLISH packets parsed in bulk by sensorseal.mqtt.worker's
                 `_PublishReader` (what IngestWorker does); paho keeps the connection
- gmqtt:         gmqtt (asyncio protocol), if installed
- aiomqtt:       aiomqtt (asyncio wrapper around paho), if installed

Rate = N / (first publish .. last message received); cpu = this process's CPU time per
message, which is what a 2-core machine shared with a publisher and a broker runs out of.

    .venv/bin/python benchmarks/mqtt_clients.py [--messages 20000] [--clients paho,gmqtt]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqtt_ingest import MOSQUITTO, plain_publisher, start_broker

TOPIC = "plain/+/telemetry"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Run:
    """Counts messages and times one publisher process against a subscriber."""

    def __init__(self, port: int, n: int, qos: int) -> None:
        self.port, self.n, self.qos = port, n, qos
        self.got = 0
        self.finished = threading.Event()

    def hit(self) -> None:
        self.got += 1
        if self.got == self.n:
            self.finished.set()

    def publish(self, wait: Callable[[float], bool]) -> tuple[float, float]:
        """Start the publisher, wait for every message; (msg/s, subscriber cpu µs per msg)."""
        ctx = mp.get_context("spawn")
        started, t0 = ctx.Event(), ctx.Value("d", 0.0)
        pub = ctx.Process(target=plain_publisher, args=(self.port, self.n, self.qos, started, t0))
        pub.start()
        time.sleep(1.0)
        cpu0 = _cpu_s()
        started.set()
        ok = wait(120)
        t1, cpu1 = time.time(), _cpu_s()
        pub.join(30)
        if not ok:
            raise RuntimeError(f"qos{self.qos}: only {self.got} of {self.n} arrived")
        return self.n / (t1 - t0.value), (cpu1 - cpu0) / self.n * 1e6


def run_paho(port: int, n: int, qos: int, reader: bool = False) -> tuple[float, float]:
    run = _Run(port, n, qos)
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda *_: run.hit()
    sub.on_subscribe = lambda *_: subscribed.set()
    if reader:  # as IngestWorker does: PUBLISH parsed in bulk, acknowledged with ack()
        from sensorseal.mqtt.worker import _PublishReader

        sub.manual_ack_set(True)

        def sink(items: list[Any]) -> None:
            for it in items:
                if it.qos:
                    sub.ack(it.mid, it.qos)
            run.got += len(items)
            if run.got >= n:
                run.finished.set()

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            c._sock = _PublishReader(c._sock, sink, v5=True, connection=0)

        sub.on_connect = on_connect
    sub.connect("127.0.0.1", port)
    sub.subscribe(TOPIC, qos=qos)
    sub.loop_start()
    subscribed.wait(10)
    try:
        return run.publish(run.finished.wait)
    finally:
        sub.disconnect()
        sub.loop_stop()


def run_gmqtt(port: int, n: int, qos: int) -> tuple[float, float]:
    import gmqtt  # type: ignore[import-untyped,import-not-found,unused-ignore]

    run = _Run(port, n, qos)

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_message(*_: Any) -> int:
            run.got += 1
            if run.got == n:
                done.set()
            return 0

        sub = gmqtt.Client(f"bench-gmqtt-{qos}")
        sub.on_message = on_message
        await sub.connect("127.0.0.1", port)
        sub.subscribe(TOPIC, qos=qos)
        await asyncio.sleep(0.3)

        def wait(timeout: float) -> bool:
            fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(done.wait(), timeout),
                                                   loop)
            try:
                fut.result()
                return True
            except Exception:
                return False

        result = await loop.run_in_executor(None, run.publish, wait)
        await sub.disconnect()
        return result

    return asyncio.run(main())


def run_aiomqtt(port: int, n: int, qos: int) -> tuple[float, float]:
    import aiomqtt

    run = _Run(port, n, qos)

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5,
                                  identifier=f"bench-aiomqtt-{qos}") as sub:
            await sub.subscribe(TOPIC, qos=qos)
            done = asyncio.Event()

            async def count() -> None:
                async for _ in sub.messages:
                    run.got += 1
                    if run.got == n:
                        done.set()
                        return

            counter = asyncio.create_task(count())

            def wait(timeout: float) -> bool:
                fut = asyncio.run_coroutine_threadsafe(
                    asyncio.wait_for(done.wait(), timeout), loop)
                try:
                    fut.result()
                    return True
                except Exception:
                    return False

            result = await loop.run_in_executor(None, run.publish, wait)
            counter.cancel()
            return result

    return asyncio.run(main())


CLIENTS: dict[str, tuple[str | None, Callable[[int, int, int], tuple[float, float]]]] = {
    "paho": (None, run_paho),
    "paho+reader": (None, lambda p, n, q: run_paho(p, n, q, reader=True)),
    "gmqtt": ("gmqtt", run_gmqtt),
    "aiomqtt": ("aiomqtt", run_aiomqtt),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--clients", default=",".join(CLIENTS))
    args = ap.parse_args()
    if not os.path.exists(MOSQUITTO):
        sys.exit("mosquitto is not installed")
    out: dict[str, Any] = {"messages": args.messages, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as d:
        broker, port = start_broker(Path(d))
        try:
            for name in args.clients.split(","):
                module, fn = CLIENTS[name]
                if module is not None and importlib.util.find_spec(module) is None:
                    print(f"{name}: not installed", flush=True)
                    continue
                for qos in (0, 1):
                    rate, cpu = fn(port, args.messages, qos)
                    print(f"{name:14} QoS {qos}: {rate:8,.0f} msg/s, subscriber cpu "
                          f"{cpu:6.1f} µs/msg", flush=True)
                    out[f"{name}_qos{qos}_per_s"] = round(rate)
                    out[f"{name}_qos{qos}_cpu_us"] = round(cpu, 1)
        finally:
            broker.terminate()
            broker.wait(5)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
