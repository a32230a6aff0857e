"""Gateway forwarding throughput: frames/s through `sensorseal gateway run` (a real process),
for E1+E3 pass-through and E1+E2 decrypt-and-reseal, against a bare UDP->HTTP forwarder
measured in the same run on the same machine.

What is timed, for each forwarder: from the first frame sent until every frame has been acked
to the sender AND handed upstream (the sink answered the POST that carried it). The sender keeps
a window of frames in flight and resends what was not acked. Frames are built before timing.

- gateway: E1 check, rate limit, E2 open (e2 mode) or pass-through, SQLite buffer with fsync per
  group commit (synchronous=FULL), E1-wrapped acks, batches sealed as the gateway, HTTP POST;
- bare: receive a datagram, ack it with 4 bytes, POST CBOR batches of raw frames (no crypto, no
  disk) -- the floor any forwarder pays for UDP, Python and HTTP.

Both POST plain HTTP to the same sink process (no TLS for either, so E4 cost is not measured).

    .venv/bin/python benchmarks/gateway_forward.py [--frames 3000] [--window 64]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from sensorseal.core.link import NetworkKey
from sensorseal.device.device import Device
from sensorseal.gateway.config import write_config
from sensorseal.gateway.node import LayeredDevice
from sensorseal.gateway.provision import GatewayRegistry
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import Registry
from sensorseal.store.sqlite import SQLiteStore

SINK = textwrap.dedent("""
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    async def take(request):
        await request.body()
        return Response(b"\\x80", media_type="application/cbor")
    app = Starlette(routes=[Route("/{p:path}", take, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
""")

BARE = textwrap.dedent("""
    import socket, sys, threading, queue, httpx, cbor2
    port, upstream, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    q = queue.Queue()
    def forward():
        client = httpx.Client()
        done = 0
        while done < total:
            batch = [q.get()]
            while len(batch) < 256:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            client.post(upstream, content=cbor2.dumps(batch),
                        headers={"Content-Type": "application/cbor"})
            done += len(batch)
        print("delivered", done, flush=True)
    threading.Thread(target=forward, daemon=True).start()
    print("ready", flush=True)
    seen = set()
    while True:
        data, addr = sock.recvfrom(2048)
        sock.sendto(b"ack" + data[-1:], addr)
        if data not in seen:
            seen.add(data)
            q.put(data)
""")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def blast(frames: list[bytes], port: int, window: int) -> None:
    """Send with `window` frames in flight; any answer datagram acks the frame in that slot
    (the gateway's ack names the frame; the bare forwarder's echoes its last byte, so the
    sender tracks acks by count and resends what is still unacked after a timeout)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.5)
    addr = ("127.0.0.1", port)
    i = 0
    while i < len(frames):
        chunk = frames[i:i + window]
        pending = len(chunk)
        for f in chunk:
            sock.sendto(f, addr)
        while pending:
            try:
                sock.recvfrom(2048)
                pending -= 1
            except TimeoutError:
                for f in chunk:  # duplicates are re-acked / deduplicated upstream
                    sock.sendto(f, addr)
                pending = len(chunk)
        i += window
    sock.close()


def setup(root: Path, mode: str, n: int) -> tuple[Path, list[bytes]]:
    store = SQLiteStore(root / "cloud.db")
    store.migrate()
    keystore = SoftwareKeystore(os.urandom(32))
    registry = Registry(store, keystore)
    gws = GatewayRegistry(store, keystore)
    record, _ = gws.add_network("bench", required="e1")
    net: NetworkKey = gws.network_key(record.network_id)
    frames: list[bytes] = []
    devices = 10
    for d in range(devices):
        cred = registry.add_device(f"d{d}", "lax")
        gws.assign(cred.device_id, record.network_id, mode)
        with Device(cred, root / "devs") as dev:
            layered = LayeredDevice(dev, net, mode)
            for i in range(n // devices):
                frames.append(layered.frame(json.dumps({"t": 21.5, "i": i}).encode())[0])
            layered.close()
    cfg = root / f"gw-{mode}.json"
    gateway = gws.add_gateway(f"gw-{mode}", [record.network_id])
    write_config(cfg, gws.gateway_config(gateway.device_id))
    store.close()
    # interleave devices as a real network would
    per = n // devices
    frames = [frames[d * per + i] for i in range(per) for d in range(devices)]
    return cfg, frames


def run_gateway(root: Path, mode: str, n: int, window: int, sink: str) -> float:
    (root / mode).mkdir()
    cfg, frames = setup(root / mode, mode, n)
    port = free_port(socket.SOCK_DGRAM)
    buf = root / mode / "buffer.db"
    proc = subprocess.Popen([sys.executable, "-m", "sensorseal", "gateway", "run", "--config",
                             str(cfg), "--buffer", str(buf), "--upstream", sink, "--listen",
                             f"127.0.0.1:{port}", "--rate", "1e6", "--burst", "1e6",
                             "--max-buffer", str(10 * n)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        t0 = time.perf_counter()
        blast(frames, port, window)
        conn = sqlite3.connect(buf)
        while conn.execute("SELECT count(*) FROM frames").fetchone()[0]:
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return len(frames) / elapsed


def run_bare(n: int, window: int, sink: str) -> float:
    frames = [os.urandom(120) + i.to_bytes(4, "big") for i in range(n)]
    port = free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([sys.executable, "-c", BARE, str(port), sink + "/bare", str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        t0 = time.perf_counter()
        blast(frames, port, window)
        assert proc.stdout.readline().startswith("delivered")
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    sink_port = free_port(socket.SOCK_STREAM)
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)])
    sink_url = f"http://127.0.0.1:{sink_port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", sink_port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sink did not start"
                time.sleep(0.05)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            bare = run_bare(args.frames, args.window, sink_url)
            e3 = run_gateway(root, "e3", args.frames, args.window, sink_url)
            e2 = run_gateway(root, "e2", args.frames, args.window, sink_url)
    finally:
        sink.terminate()
        sink.wait(10)
    print(f"bare UDP->HTTP forwarder:      {bare:10.0f} frames/s")
    print(f"gateway E1+E3 pass-through:    {e3:10.0f} frames/s  ({e3 / bare:.2f}x bare)")
    print(f"gateway E1+E2 decrypt+reseal:  {e2:10.0f} frames/s  ({e2 / bare:.2f}x bare)")
    print(json.dumps({"frames": args.frames, "window": args.window,
                      "bare_fps": round(bare), "e1_e3_fps": round(e3), "e1_e2_fps": round(e2),
                      "e1_e3_vs_bare": round(e3 / bare, 3),
                      "e1_e2_vs_bare": round(e2 / bare, 3)}))


if __name__ == "__main__":
    main()
