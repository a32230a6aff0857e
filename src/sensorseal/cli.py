"""The `sensorseal` command.

Exit codes scripts can rely on:
    0  success
    1  the operation ran but the answer is "no" (a message was rejected, nothing found)
    2  usage error (bad option or argument; click's own code)
    3  configuration error (data dir not initialized, unknown device, invalid name ...)
    4  could not reach the server (network, TLS, retries exhausted)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from sensorseal import __version__
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId, Level
from sensorseal.core.policy import PRESETS
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry

EXIT_NO, EXIT_CONFIG, EXIT_NETWORK = 1, 3, 4

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    sys.exit(code)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _device_id(text: str) -> DeviceId:
    try:
        return DeviceId.parse(text)
    except ConfigError as exc:
        _fail(str(exc), 2)


@contextmanager
def _registry(ctx: click.Context) -> Iterator[Registry]:
    datadir: DataDir = ctx.obj["datadir"]
    try:
        store, keystore = datadir.open()
    except ConfigError as exc:
        _fail(str(exc))
    try:
        yield Registry(store, keystore)
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        store.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where keys and data live (default: $SENSORSEAL_DATA_DIR or ./sensorseal-data).")
@click.version_option(__version__, prog_name="sensorseal")
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None) -> None:
    """sensorseal: sealed sensor data from device to cloud, across untrusted hops."""
    ctx.ensure_object(dict)
    ctx.obj["datadir"] = DataDir(data_dir if data_dir is not None else DataDir.default_path())


@main.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the data directory, its key-encryption key and an operator API token."""
    datadir: DataDir = ctx.obj["datadir"]
    try:
        token = datadir.init()
    except ConfigError as exc:
        _fail(str(exc))
    out.print(f"Initialized [bold]{datadir.path}[/]")
    out.print("Operator API token (shown once; keep it safe):")
    out.print(token, soft_wrap=True, markup=False)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="0 picks a free port.")
@click.option("--certfile", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--keyfile", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.pass_context
def serve(ctx: click.Context, host: str, http_port: int, certfile: Path | None,
          keyfile: Path | None) -> None:
    """Run the ingest server (HTTP, HTTPS with --certfile/--keyfile)."""
    from sensorseal.server.run import serve as run_server

    datadir: DataDir = ctx.obj["datadir"]
    try:
        run_server(datadir.path, host=host, port=http_port, certfile=certfile, keyfile=keyfile)
    except ConfigError as exc:
        _fail(str(exc))


# -- devices ------------------------------------------------------------------------------------

@main.group()
def device() -> None:
    """Provision and manage devices."""


@device.command("add")
@click.argument("name")
@click.option("--policy", type=click.Choice(sorted(PRESETS)), default="standard",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def device_add(ctx: click.Context, name: str, policy: str, as_json: bool) -> None:
    """Provision a device; its credential is shown once, here."""
    with _registry(ctx) as reg:
        cred = reg.add_device(name, policy)
    if as_json:
        out.print_json(json.dumps({"device_id": str(cred.device_id), "epoch": cred.epoch,
                                   "credential": cred.encode()}))
        return
    out.print(f"Device [bold]{cred.device_id}[/] ({name}, policy {policy})")
    out.print("Credential (shown once; load it into the device):")
    out.print(cred.encode(), soft_wrap=True, markup=False)


@device.command("list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.pass_context
def device_list(ctx: click.Context, limit: int) -> None:
    """List devices."""
    with _registry(ctx) as reg:
        records = reg.list(limit=limit)
    table = Table("id", "name", "status", "epoch", "policy", "last seen")
    for r in records:
        table.add_row(str(r.device_id), r.name, r.status.value, str(r.epoch), r.policy,
                      _when(r.last_seen_ms))
    out.print(table)
    if not records:
        out.print("(no devices yet: `sensorseal device add NAME`)")


@device.command("show")
@click.argument("device_id")
@click.pass_context
def device_show(ctx: click.Context, device_id: str) -> None:
    """Show one device."""
    did = _device_id(device_id)
    with _registry(ctx) as reg:
        r = reg.get(did)
    for label, value in (("id", str(r.device_id)), ("name", r.name), ("status", r.status.value),
                         ("epoch", str(r.epoch)), ("policy", r.policy),
                         ("created", _when(r.created_ms)), ("last seen", _when(r.last_seen_ms))):
        out.print(f"{label:>10}: {value}", markup=False)


@device.command("rename")
@click.argument("device_id")
@click.argument("name")
@click.pass_context
def device_rename(ctx: click.Context, device_id: str, name: str) -> None:
    """Give a device a new friendly name."""
    did = _device_id(device_id)
    with _registry(ctx) as reg:
        reg.rename(did, name)
    out.print(f"Renamed {did}")


def _status_command(verb: str, done: str, doc: str) -> None:
    @device.command(verb, help=doc)
    @click.argument("device_id")
    @click.pass_context
    def command(ctx: click.Context, device_id: str) -> None:
        did = _device_id(device_id)
        with _registry(ctx) as reg:
            action: Callable[[DeviceId], Any] = getattr(reg, verb)
            action(did)
        out.print(f"{done} {did}")


_status_command("suspend", "Suspended", "Refuse a device's messages until it is resumed.")
_status_command("resume", "Resumed", "Accept a suspended device's messages again.")
_status_command("revoke", "Revoked", "Refuse a device forever (its id is never reused).")


# -- events ------------------------------------------------------------------------------------

@main.command()
@click.option("--reason", help="Only this reason (e.g. replay, decrypt_failed).")
@click.option("--device", "device_id", help="Only this claimed device id.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def events(ctx: click.Context, reason: str | None, device_id: str | None, limit: int,
           as_json: bool) -> None:
    """Security events: every rejection with its reason, and operator actions."""
    if device_id is not None:
        device_id = str(_device_id(device_id))
    datadir: DataDir = ctx.obj["datadir"]
    try:
        store, _ = datadir.open()
    except ConfigError as exc:
        _fail(str(exc))
    try:
        rows = store.events(reason=reason, device_id=device_id, limit=limit)
    finally:
        store.close()
    if as_json:
        for e in rows:
            click.echo(json.dumps({"at_ms": e.at_ms, "reason": e.reason, "transport": e.transport,
                                   "source": e.source, "device_id": e.device_id,
                                   "detail": e.detail}))
        return
    table = Table("time (UTC)", "reason", "device", "transport", "source", "detail")
    for e in rows:
        table.add_row(_when(e.at_ms), e.reason, e.device_id or "-", e.transport, e.source,
                      e.detail)
    out.print(table)


# -- acting as a device --------------------------------------------------------------------------

@main.command()
@click.argument("data")
@click.option("--url", required=True, help="Server base URL, e.g. http://127.0.0.1:8080")
@click.option("--credential", envvar="SENSORSEAL_CREDENTIAL",
              help="Device credential (ss1....); or set SENSORSEAL_CREDENTIAL.")
@click.option("--credential-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("sensorseal-device"), show_default=True,
              help="Where the device keeps its sequence counters.")
@click.option("--signed", is_flag=True, help="Level signed (readable, MAC'd) instead of sealed.")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True), help="CA bundle for HTTPS.")
def send(data: str, url: str, credential: str | None, credential_file: Path | None,
         state_dir: Path, signed: bool, ca: str | None) -> None:
    """Seal DATA (a JSON document, or - for stdin) as a device and send it."""
    from sensorseal.device import Device, HttpSender, SendError

    if credential_file is not None:
        credential = credential_file.read_text().strip()
    if not credential:
        _fail("give --credential, --credential-file or SENSORSEAL_CREDENTIAL", 2)
    text = sys.stdin.read() if data == "-" else data
    try:
        doc = json.loads(text)
    except ValueError as exc:
        _fail(f"DATA is not JSON: {exc}", 2)
    try:
        cred = DeviceCredential.parse(credential)
        dev = Device(cred, state_dir, level=Level.SIGNED if signed else Level.SEALED)
    except ConfigError as exc:
        _fail(str(exc))
    with dev, HttpSender(url, verify=ca if ca else True) as sender:
        seq = dev.counter.peek()
        envelope = dev.seal_json(doc)
        try:
            result = sender.send(envelope)
        except SendError as exc:
            _fail(str(exc), EXIT_NETWORK)
    if not result.accepted:
        err.print(f"[red]rejected[/] (HTTP {result.status}); see `sensorseal events` on the server")
        sys.exit(EXIT_NO)
    out.print(f"accepted: device {cred.device_id} seq {seq}")


@main.command()
@click.option("--duration", type=click.FloatRange(1, 3600), default=20.0, show_default=True,
              help="Seconds of streaming before the attacks and the summary.")
@click.option("--devices", "n_devices", type=click.IntRange(1, 1000), default=5,
              show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=0,
              help="0 (default) picks a free port.")
@click.option("--keep", is_flag=True, help="Keep serving after the summary (Ctrl-C to stop).")
@click.pass_context
def demo(ctx: click.Context, duration: float, n_devices: int, http_port: int,
         keep: bool) -> None:
    """Provision simulated devices, stream readings, mount attacks, print what was refused."""
    from sensorseal.demo import run_demo

    explicit = ctx.find_root().params.get("data_dir") is not None or \
        os.environ.get("SENSORSEAL_DATA_DIR")
    datadir: DataDir | None = ctx.obj["datadir"] if explicit else None
    try:
        ok = run_demo(datadir, duration=duration, n_devices=n_devices, port=http_port,
                      keep=keep, console=out)
    except ConfigError as exc:
        _fail(str(exc))
    sys.exit(0 if ok else EXIT_NO)


if __name__ == "__main__":  # pragma: no cover
    main()
