"""MQTT ingest throughput and RPC latency, against plain paho measured in the same run.

One private Mosquitto on a free loopback port (anonymous, `max_queued_messages 0`). For QoS 0
and QoS 1, N messages with 100-byte payloads:

- plain:      paho publisher process -> Mosquitto -> paho subscriber (counts messages)
- sensorseal: MqttDevice process (seal each message, outbox for QoS 1) -> Mosquitto ->
              IngestWorker -> Pipeline (unseal, replay, policy) -> SQLite store (committed)

Rate = N / (time from the publisher's first publish until the consumer has all N). Both
publishers use the same in-flight window. The worker runs without a rate limit (one device
sends far faster than a sensor would). Then RPC round trips (cloud RpcClient -> device process
-> sealed response) on loopback, sequentially: p50 and p99.

    .venv/bin/python benchmarks/mqtt_ingest.py [--messages 20000] [--calls 500]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import getpass
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = "/usr/sbin/mosquitto"
PAYLOAD = bytes(range(100))
WINDOW = 500  # publisher in-flight window, both sides (MqttDevice uses 500)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        "per_listener_settings false", "allow_anonymous true", "persistence false",
        "max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 100",
        "set_tcp_nodelay true", f"user {getpass.getuser()}", "log_dest none",
        f"listener {port} 127.0.0.1", ""]))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("mosquitto did not start")


# -- publishers (child processes) ------------------------------------------------------------

def plain_publisher(port: int, n: int, qos: int, started: Any, t0: Any) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(WINDOW)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    started.wait()
    t0.value = time.time()
    info = None
    for _ in range(n):
        info = c.publish("plain/dev/telemetry", PAYLOAD, qos=qos)
    assert info is not None
    info.wait_for_publish(120)
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()


def sealed_publisher(port: int, n: int, qos: int, cred: str, state: str, started: Any,
                     t0: Any) -> None:
    from sensorseal.device.device import Device
    from sensorseal.mqtt.client import MqttDevice

    dev = Device.from_credential_string(cred, state)
    md = MqttDevice(dev, "127.0.0.1", port, outbox_path=Path(state) / f"outbox-{qos}.db",
                    qos=qos, outbox_capacity=max(n, 10_000),
                    client_id=f"bench-pub-{qos}").start()
    md.wait_connected(10)
    started.wait()
    t0.value = time.time()
    for _ in range(n):
        md.publish_telemetry(PAYLOAD)
    md.flush(120)
    time.sleep(0.5)
    md.stop()
    dev.close()


def rpc_device(port: int, cred: str, state: str, ready: Any, done: Any) -> None:
    from sensorseal.device.device import Device
    from sensorseal.mqtt.client import MqttDevice
    from sensorseal.mqtt.rpc import RpcDispatcher

    rpc = RpcDispatcher()
    rpc.register("echo", lambda x: x)
    dev = Device.from_credential_string(cred, state)
    md = MqttDevice(dev, "127.0.0.1", port, outbox_path=Path(state) / "outbox-rpc.db", rpc=rpc,
                    client_id="bench-rpc-dev").start()
    md.wait_connected(10)
    time.sleep(0.2)
    ready.set()
    done.wait(120)
    md.stop()
    dev.close()


# -- consumers (this process) ----------------------------------------------------------------

def run_plain(port: int, n: int, qos: int) -> float:
    ctx = mp.get_context("spawn")
    got = [0]
    finished = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        got[0] += 1
        if got[0] == n:
            finished.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe("plain/+/telemetry", qos=qos)
    sub.loop_start()
    subscribed.wait(10)
    started, t0 = ctx.Event(), ctx.Value("d", 0.0)
    pub = ctx.Process(target=plain_publisher, args=(port, n, qos, started, t0))
    pub.start()
    time.sleep(1.0)
    started.set()
    ok = finished.wait(120)
    t1 = time.time()
    pub.join(30)
    sub.disconnect()
    sub.loop_stop()
    if not ok:
        raise RuntimeError(f"plain qos{qos}: only {got[0]} of {n} arrived")
    return n / (t1 - float(t0.value))


def run_sealed(port: int, n: int, qos: int, tmp: Path) -> tuple[float, dict[str, Any]]:
    from sensorseal.keystore.software import SoftwareKeystore
    from sensorseal.mqtt.worker import IngestWorker
    from sensorseal.registry import Registry
    from sensorseal.server.pipeline import Pipeline
    from sensorseal.store.sqlite import SQLiteStore

    work = tmp / f"sealed-q{qos}"
    work.mkdir()
    store = SQLiteStore(work / "sensorseal.db")
    store.migrate()
    registry = Registry(store, SoftwareKeystore(os.urandom(32)))
    cred = registry.add_device(f"bench-q{qos}", "standard")
    worker = IngestWorker(Pipeline(registry, store), "127.0.0.1", port, qos=qos,
                          rate_limit=None, group=f"bench{qos}", client_id=f"bench-worker-{qos}")
    worker.start()
    worker.wait_subscribed(10)
    ctx = mp.get_context("spawn")
    started, t0 = ctx.Event(), ctx.Value("d", 0.0)
    pub = ctx.Process(target=sealed_publisher,
                      args=(port, n, qos, cred.encode(), str(work / "state"), started, t0))
    pub.start()
    time.sleep(1.5)
    started.set()
    deadline = time.time() + 180
    while worker.stats.accepted < n and time.time() < deadline:
        time.sleep(0.002)
    t1 = time.time()
    pub.join(60)
    worker.stop()
    stored = store.count_telemetry()
    stats = {"stored": stored, "batches": worker.stats.batches,
             "rejected": dict(worker.stats.rejected)}
    store.close()
    if stored != n:
        raise RuntimeError(f"sensorseal qos{qos}: stored {stored} of {n}: {stats}")
    return n / (t1 - t0.value), stats


def run_rpc(port: int, calls: int, tmp: Path) -> tuple[float, float]:
    from sensorseal.keystore.software import SoftwareKeystore
    from sensorseal.mqtt.commands import CloudLink, DownlinkCounter
    from sensorseal.mqtt.rpc import RpcClient
    from sensorseal.registry import Registry
    from sensorseal.store.sqlite import SQLiteStore

    work = tmp / "rpc"
    work.mkdir()
    store = SQLiteStore(work / "sensorseal.db")
    store.migrate()
    registry = Registry(store, SoftwareKeystore(os.urandom(32)))
    cred = registry.add_device("bench-rpc", "standard")
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    dev = ctx.Process(target=rpc_device,
                      args=(port, cred.encode(), str(work / "state"), ready, done))
    dev.start()
    ready.wait(30)
    link = CloudLink(registry, DownlinkCounter(work / "down.db"))
    lat: list[float] = []
    with RpcClient(link, "127.0.0.1", port) as client:
        for i in range(20):  # warm up
            client.call(cred.device_id, "echo", [i], timeout=5)
        for i in range(calls):
            t = time.perf_counter()
            assert client.call(cred.device_id, "echo", [i], timeout=5) == i
            lat.append((time.perf_counter() - t) * 1000)
    done.set()
    dev.join(30)
    store.close()
    lat.sort()
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    if not os.path.exists(MOSQUITTO):
        sys.exit("mosquitto is not installed")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker, port = start_broker(tmp)
        try:
            out: dict[str, Any] = {"messages": args.messages, "payload_bytes": len(PAYLOAD)}
            for qos in (0, 1):
                plain = run_plain(port, args.messages, qos)
                sealed, stats = run_sealed(port, args.messages, qos, tmp)
                print(f"QoS {qos}: plain {plain:,.0f} msg/s, sensorseal {sealed:,.0f} msg/s "
                      f"({sealed / plain:.0%}); worker batches {stats['batches']}", flush=True)
                out[f"plain_qos{qos}_per_s"] = round(plain)
                out[f"sensorseal_qos{qos}_per_s"] = round(sealed)
                out[f"ratio_qos{qos}"] = round(sealed / plain, 3)
            p50, p99 = run_rpc(port, args.calls, tmp)
            print(f"RPC round trip over {args.calls} calls: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            out["rpc_p50_ms"] = round(p50, 3)
            out["rpc_p99_ms"] = round(p99, 3)
        finally:
            broker.terminate()
            broker.wait(5)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
