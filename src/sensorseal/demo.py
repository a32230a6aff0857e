"""`sensorseal demo`: a small fleet, live readings, live attacks, and what was refused and why.

Everything runs on the embedded defaults in one process: a SQLite data directory (a fresh
temporary one unless given), the HTTP ingest server on a free port, simulated devices that seal
and send over real HTTP. The attacks are the ones the platform exists to stop; the summary reads
their reasons back from the audit log, where the server recorded them (the attacker itself only
ever sees a generic refusal).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from starlette.applications import Starlette

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.datadir import DataDir
from sensorseal.device import Device, HttpSender
from sensorseal.operators import Role
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.console import Console as WebConsole
from sensorseal.server.pipeline import Pipeline
from sensorseal.store.base import Store

__all__ = ["run_demo"]

ROUTE = "/v1/messages"


@dataclass
class Attack:
    name: str
    expected: str
    device_id: str
    status: int = 0
    reason: str = "-"

    @property
    def refused(self) -> bool:
        return self.status >= 400 and self.reason == self.expected


class _ServerThread:
    """uvicorn on a socket we bound (so port 0 works), in a daemon thread."""

    def __init__(self, app: Starlette, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="demo-server", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the demo server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _reading(rng: random.Random, n: int) -> dict[str, float | int]:
    return {"n": n, "temp_c": round(rng.gauss(21, 2), 2), "rh": round(rng.uniform(30, 60), 1)}


def _last_reason(store: Store, device_id: str, after_ms: int) -> str:
    for event in store.events(device_id=device_id, since_ms=after_ms, limit=20):
        return event.reason
    return "-"


def _attacks(registry: Registry, store: Store, sender: HttpSender, devices: list[Device],
             accepted_envelope: bytes, console: Console) -> list[Attack]:
    victim, revoked = devices[0], devices[-1]
    results: list[Attack] = []

    def mount(name: str, expected: str, device_id: DeviceId, envelope: bytes) -> None:
        before = int(time.time() * 1000) - 1
        attack = Attack(name, expected, str(device_id))
        attack.status = sender.send(envelope).status
        attack.reason = _last_reason(store, str(device_id), before)
        results.append(attack)

    # 1. Forgery: the victim's id, but a key the attacker made up.
    forged_keys = derive(os.urandom(32), victim.device_id, victim.epoch, Direction.UP)
    mount("forged message (made-up key)", "decrypt_failed", victim.device_id,
          seal(b'{"temp_c": -40}', keys=forged_keys, seq=10**9, route=ROUTE,
               timestamp_ms=int(time.time() * 1000)))
    # 2. Tampering: one bit flipped in the ciphertext of a genuine message.
    genuine = bytearray(victim.seal_json({"temp_c": 22.0}))
    genuine[-20] ^= 0x01
    mount("bit-flipped message", "decrypt_failed", victim.device_id, bytes(genuine))
    # 3. Replay: a message the server already accepted, sent again verbatim.
    mount("replayed message", "replay", victim.device_id, accepted_envelope)
    # 4. A device nobody provisioned.
    stranger = DeviceId(os.urandom(12))
    mount("unknown device", "unknown_device", stranger,
          seal(b'{"temp_c": 1}', keys=derive(os.urandom(32), stranger, 1, Direction.UP), seq=1,
               route=ROUTE, timestamp_ms=int(time.time() * 1000)))
    # 5. A stolen device, revoked by the operator: its genuine keys no longer count.
    registry.revoke(revoked.device_id, actor="demo")
    time.sleep(1.1)  # revocation reaches the ingest cache within one second
    mount("revoked device (stolen)", "revoked", revoked.device_id,
          revoked.seal_json({"temp_c": 23.0}))
    return results


def _demo_admin(web: WebConsole) -> tuple[str, str]:
    """A fresh admin for this demo run, with a random password shown once on the console."""
    name = f"demo-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    web.operators.add(name, password, Role.ADMIN, actor="demo")
    return name, password


def run_demo(datadir: DataDir | None, *, duration: float, n_devices: int, port: int,
             keep: bool, console: Console, rng_seed: int | None = None) -> bool:
    """Run the demo; True if every attack was refused with its expected reason."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if datadir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sensorseal-demo-")
        datadir = DataDir(Path(tmp.name) / "data")
    try:
        return _run(datadir, duration=duration, n_devices=n_devices, port=port, keep=keep,
                    console=console,
                    rng=random.Random(rng_seed))  # noqa: S311 - simulated readings, not keys
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(datadir: DataDir, *, duration: float, n_devices: int, port: int, keep: bool,
         console: Console, rng: random.Random) -> bool:
    token = datadir.init() if not datadir.is_initialized() else None
    store, keystore = datadir.open()
    registry = Registry(store, keystore)
    pipeline = Pipeline(registry, store)
    web = WebConsole(pipeline, registry, store, token_check=datadir.check_token)
    app = create_app(pipeline, registry, store, token_check=datadir.check_token, console=web)
    admin_name, admin_password = _demo_admin(web)
    server = _ServerThread(app, port)
    server.start()
    try:
        console.rule("[bold]sensorseal demo")
        console.print(f"data dir      {datadir.path}")
        console.print(f"ingest API    {server.url}/v1/messages")
        console.print(f"operator API  {server.url}/v1/devices  (Authorization: Bearer <token>)")
        if token is not None:
            console.print(f"operator token {token}", markup=False, soft_wrap=True)
        console.print(f"web console   {server.url}/console/", markup=False)
        console.print(f"  sign in as  {admin_name} / {admin_password}  (one-time demo admin)",
                      markup=False, soft_wrap=True)
        creds: list[DeviceCredential] = [
            registry.add_device(f"sensor-{i + 1:02d}", "standard", actor="demo")
            for i in range(n_devices)]
        state = datadir.path / "demo-devices"
        devices = [Device(c, state / str(c.device_id)) for c in creds]
        console.print(f"provisioned   {n_devices} devices (policy standard: sealed, fresh)")
        sent = accepted = 0
        first_accepted: bytes | None = None
        with HttpSender(server.url, max_retries=3) as sender:
            start = time.monotonic()
            progress = Progress(TextColumn("streaming readings"), BarColumn(),
                                TextColumn("{task.fields[accepted]} accepted"),
                                TimeRemainingColumn(), console=console, transient=False)
            with progress:
                task = progress.add_task("stream", total=duration, accepted=0)
                while (elapsed := time.monotonic() - start) < duration:
                    batch = [d.seal_json(_reading(rng, sent + i)) for i, d in enumerate(devices)]
                    sent += len(batch)
                    verdicts = sender.send_batch(batch)
                    accepted += sum(verdicts)
                    if first_accepted is None and verdicts and verdicts[0]:
                        first_accepted = batch[0]
                    progress.update(task, completed=min(elapsed, duration), accepted=accepted)
                    time.sleep(0.2)
                progress.update(task, completed=duration, accepted=accepted)
            if first_accepted is None:
                console.print("[red]no reading was accepted: the demo cannot continue[/]")
                return False
            attacks = _attacks(registry, store, sender, devices, first_accepted, console)
        _summary(console, store, sent, accepted, attacks)
        if keep:
            console.print(f"Serving on {server.url} until Ctrl-C ...")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        for d in devices:
            d.close()
        return accepted == sent and all(a.refused for a in attacks)
    finally:
        server.stop()
        store.close()


def _summary(console: Console, store: Store, sent: int, accepted: int,
             attacks: list[Attack]) -> None:
    console.rule("[bold]summary")
    console.print(f"readings sent {sent}, accepted {accepted}, stored "
                  f"{store.count_telemetry()}")
    table = Table("attack", "HTTP answer", "reason in the audit log", "expected", "refused")
    for a in attacks:
        table.add_row(a.name, str(a.status), a.reason, a.expected,
                      "[green]yes[/]" if a.refused else "[red]NO[/]")
    console.print(table)
    counts = store.count_events_by_reason()
    console.print("audit log by reason: " + json.dumps(counts, sort_keys=True))
