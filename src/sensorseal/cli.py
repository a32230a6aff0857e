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
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes sharing the listening socket and the database.")
@click.option("--mqtt", "mqtt_broker", metavar="HOST:PORT",
              help="With --workers: each worker also ingests from this MQTT broker (shared "
                   "subscription; credentials from SENSORSEAL_MQTT_USERNAME/_PASSWORD).")
@click.option("--mqtt-port", type=click.IntRange(0, 65535), default=1883, show_default=True,
              help="Port of the embedded MQTT broker on --host; 0 picks a free port.")
@click.option("--no-mqtt", is_flag=True, help="HTTP only: no broker, no MQTT ingest.")
@click.option("--mqtt-url", metavar="mqtt[s]://HOST:PORT",
              help="Use this broker (e.g. Mosquitto, MQTT 5) instead of the embedded one: a "
                   "shared-subscription ingest worker, password from $SENSORSEAL_MQTT_PASSWORD.")
@click.option("--mqtt-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="CA certificate of an mqtts:// broker.")
@click.option("--mqtt-username", default="sensorseal-ingest", show_default=True,
              help="The server's service account on the --mqtt-url broker.")
@click.option("--dynsec", is_flag=True,
              help="Keep Mosquitto's dynamic security in step with the registry (admin from "
                   "$SENSORSEAL_DYNSEC_USERNAME/_PASSWORD).")
@click.option("--iotcore-port", type=click.IntRange(0, 65535),
              help="Also accept Cloud IoT Core devices: MQTT over TLS on this port (8883 in "
                   "production; 0 picks a free one) and the HTTP bridge (docs/compat.md).")
@click.option("--iotcore-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="TLS certificate (chain) for --iotcore-port (default: --certfile).")
@click.option("--iotcore-key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Its private key (default: --keyfile).")
@click.option("--eva-product", help="Answer EVA ICS v3 API calls as this product ...")
@click.option("--eva-system", help="... and system name.")
@click.option("--eva-space", help="EVA topic prefix (space), if the nodes use one.")
@click.option("--eva-broker", metavar="mqtt[s]://HOST:PORT",
              help="Broker of the EVA endpoint (default: --mqtt-url); credentials from "
                   "$SENSORSEAL_EVA_MQTT_USERNAME/_PASSWORD.")
@click.pass_context
def serve(ctx: click.Context, host: str, http_port: int, certfile: Path | None,
          keyfile: Path | None, workers: int, mqtt_broker: str | None, mqtt_port: int,
          no_mqtt: bool, mqtt_url: str | None, mqtt_ca: Path | None, mqtt_username: str,
          dynsec: bool, iotcore_port: int | None, iotcore_cert: Path | None,
          iotcore_key: Path | None, eva_product: str | None, eva_system: str | None,
          eva_space: str | None, eva_broker: str | None) -> None:
    """Run the ingest server: HTTP (HTTPS with --certfile/--keyfile) and MQTT (an embedded
    broker by default, or --mqtt-url)."""
    from sensorseal.server.run import serve as run_server

    datadir: DataDir = ctx.obj["datadir"]
    try:
        dropin = {"iotcore_port": iotcore_port, "iotcore_cert": iotcore_cert,
                  "iotcore_key": iotcore_key, "eva_product": eva_product,
                  "eva_system": eva_system, "eva_space": eva_space, "eva_broker": eva_broker}
        extra = _dropin_options(dropin, certfile=certfile, keyfile=keyfile, host=host,
                                mqtt_url=mqtt_url, mqtt_ca=mqtt_ca, mqtt_username=mqtt_username)
        if extra and (workers > 1 or mqtt_broker is not None):
            _fail("--iotcore-*/--eva-* run in a single server process (no --workers/--mqtt)", 2)
        if workers > 1 or mqtt_broker is not None:
            from sensorseal.server.workers import serve_workers

            if mqtt_url is not None or dynsec:
                _fail("with --workers, name the broker with --mqtt HOST:PORT", 2)
            serve_workers(datadir.path, workers=workers, host=host, port=http_port,
                          certfile=certfile, keyfile=keyfile, mqtt=mqtt_broker)
        else:
            from sensorseal.server.mqtt_service import MqttOptions

            if no_mqtt and (mqtt_url is not None or dynsec):
                _fail("--no-mqtt contradicts --mqtt-url/--dynsec", 2)
            options = None if no_mqtt else MqttOptions.from_env(
                host=host, port=mqtt_port, url=mqtt_url, ca=mqtt_ca, username=mqtt_username,
                dynsec=dynsec)
            run_server(datadir.path, host=host, port=http_port, certfile=certfile,
                       keyfile=keyfile, mqtt=options, **extra)
    except ConfigError as exc:
        _fail(str(exc))


@main.group()
def db() -> None:
    """The database (SQLite in the data dir, or $SENSORSEAL_DATABASE_URL)."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the schema migrations this version knows (idempotent; also done at start)."""
    from sensorseal.store import open_store

    datadir: DataDir = ctx.obj["datadir"]
    try:
        store = open_store(datadir.store_url, migrate=False)
        try:
            version = store.migrate()
        finally:
            store.close()
    except ConfigError as exc:
        _fail(str(exc))
    out.print(f"database schema at version {version}")


# -- devices ------------------------------------------------------------------------------------

@main.group()
def device() -> None:
    """Provision and manage devices."""


@device.command("add")
@click.argument("name")
@click.option("--policy", type=click.Choice(sorted(PRESETS)), default=None,
              help="Default: standard (legacy for --legacy devices).")
@click.option("--legacy", type=click.Choice(["valarm", "yoctopuce", "waspmote"]),
              help="A device that speaks a legacy format (docs/compat.md).")
@click.option("--legacy-id", help="Valarm: its existing 24-hex id; Yoctopuce: the hub serial; "
                                  "Waspmote: the node serial.")
@click.option("--secret-stdin", is_flag=True,
              help="Read the legacy secret (API key, hub password, AES password) from stdin. "
                   "Without it a Valarm API key is generated and a hub/node has none.")
@click.option("--aes-bits", type=click.Choice(["128", "192", "256"]), default="128",
              show_default=True, help="Waspmote AES key size.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def device_add(ctx: click.Context, name: str, policy: str | None, legacy: str | None,
               legacy_id: str | None, secret_stdin: bool, aes_bits: str,
               as_json: bool) -> None:
    """Provision a device; its credential is shown once, here."""
    if legacy is not None:
        _legacy_add(ctx, name, policy or "legacy", legacy, legacy_id, secret_stdin,
                    int(aes_bits), as_json)
        return
    policy = policy or "standard"
    with _registry(ctx) as reg:
        cred = reg.add_device(name, policy)
    if as_json:
        out.print_json(json.dumps({"device_id": str(cred.device_id), "epoch": cred.epoch,
                                   "credential": cred.encode()}))
        return
    out.print(f"Device [bold]{cred.device_id}[/] ({name}, policy {policy})")
    out.print("Credential (shown once; load it into the device):")
    out.print(cred.encode(), soft_wrap=True, markup=False)


def _legacy_add(ctx: click.Context, name: str, policy: str, kind: str, legacy_id: str | None,
                secret_stdin: bool, aes_bits: int, as_json: bool) -> None:
    secret = sys.stdin.readline().rstrip("\r\n") if secret_stdin else None
    if secret_stdin and not secret:
        _fail("--secret-stdin: no secret on stdin", 2)
    with _registry(ctx) as reg:
        dev = reg.add_legacy_device(name, kind, external_id=legacy_id, secret=secret,
                                    aes_bits=aes_bits, policy=policy)
    if as_json:
        out.print_json(json.dumps({"device_id": str(dev.device_id), "kind": kind,
                                   "legacy_id": dev.external_id, "policy": policy,
                                   "api_key": dev.generated_secret}))
        return
    out.print(f"Legacy {kind} device [bold]{dev.device_id}[/] ({name}, {dev.external_id}, "
              f"policy {policy})")
    if dev.generated_secret is not None:
        out.print("API key (shown once; configure it in the device):")
        out.print(dev.generated_secret, soft_wrap=True, markup=False)


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


@device.command("migrate")
@click.argument("device_id")
@click.option("--to", "target", type=click.Choice(["native"]), required=True)
@click.option("--policy", type=click.Choice(sorted(p for p in PRESETS
                                                   if not p.startswith("legacy"))),
              default="standard", show_default=True,
              help="Policy to switch to once the device has used its native keys.")
@click.pass_context
def device_migrate(ctx: click.Context, device_id: str, target: str, policy: str) -> None:
    """Issue native keys to a legacy device (shown once). Its legacy format stays accepted
    until its first native message; then its policy switches and its legacy key is disabled.
    Run again to see whether that has happened."""
    did = _device_id(device_id)
    with _registry(ctx) as reg:
        cred = reg.legacy_of(did)
        if cred is not None and cred.state != "active":
            if cred.state == "migrating" and reg.finish_migration_if_used(did):
                cred = reg.legacy_of(did)
            assert cred is not None
            out.print(f"{did}: migration {cred.state} (target policy {cred.target_policy})")
            return
        native = reg.start_migration(did, target_policy=policy)
    out.print(f"Native credential for [bold]{did}[/] (epoch {native.epoch}; shown once):")
    out.print(native.encode(), soft_wrap=True, markup=False)
    out.print("Legacy formats have no confidential channel to the device: load this credential "
              "locally (device console/USB) or into the sensorseal gateway next to it. "
              f"The first native message switches it to policy {policy}.", markup=False)


@device.command("command")
@click.argument("device_id")
@click.option("--yocto", "url", required=True,
              help='A path on the hub, e.g. "/bySerial/RELAYLO1-XXXX/api/relay1?state=1".')
@click.pass_context
def device_command(ctx: click.Context, device_id: str, url: str) -> None:
    """Queue a command for a Yoctopuce hub: sent in the reply to its next callback."""
    did = _device_id(device_id)
    with _registry(ctx) as reg:
        command_id = reg.queue_legacy_command(did, url)
    out.print(f"Queued command #{command_id} for {did}")


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


# -- the downlink over MQTT: commands and RPC through the running server's broker --------------

@contextmanager
def _cloud_link(ctx: click.Context, did: DeviceId) -> Iterator[tuple[Any, Any, Any]]:
    """(service info, CloudLink, store) for talking to devices through the running server's
    broker, as its service account. Exits 4 when no server is running."""
    from sensorseal.mqtt.commands import COUNTER_FILE, CloudLink, DownlinkCounter
    from sensorseal.server.mqtt_service import SERVICE_FILE, ServiceInfo

    datadir: DataDir = ctx.obj["datadir"]
    try:
        store, keystore = datadir.open()
    except ConfigError as exc:
        _fail(str(exc))
    counter = None
    try:
        info = ServiceInfo.read(datadir.path / SERVICE_FILE)
        if info is None:
            _fail(f"no server with MQTT is running on {datadir.path} (start `sensorseal serve`;"
                  " not with --no-mqtt)", EXIT_NETWORK)
        registry = Registry(store, keystore)
        _known_device(registry, did)
        counter = DownlinkCounter(datadir.path / COUNTER_FILE)
        yield info, CloudLink(registry, counter), store
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        if counter is not None:
            counter.close()
        store.close()


def _mqtt_protocol(info: Any) -> Any:
    import paho.mqtt.client as mqtt

    return mqtt.MQTTv311 if info.mqtt311 else mqtt.MQTTv5


def _start_caller(client: Any, info: Any) -> None:
    try:
        client.start(timeout=10.0)
    except ConfigError:
        client.stop()
        _fail(f"could not connect to the server's broker at {info.url}", EXIT_NETWORK)


def _known_device(reg: Registry, did: DeviceId) -> None:
    record = reg.find(did)
    if record is None:
        _fail(f"no device {did}")
    if record.status.value != "active":
        _fail(f"device {did} is {record.status.value}; it cannot receive")


@main.command("command")
@click.argument("device_id")
@click.argument("payload")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds to wait for the device's ack.")
@click.pass_context
def command_cmd(ctx: click.Context, device_id: str, payload: str, timeout: float) -> None:
    """Send PAYLOAD (text, or - for stdin) to a device as a sealed command; print its ack.

    Exit 0 when the device acknowledged success, 1 when it answered with a failure, 4 when no
    verified ack arrived in time (the command may or may not have run) or no server runs."""
    import base64

    from sensorseal.mqtt.commands import CommandSender, CommandTimeout

    did = _device_id(device_id)
    body = sys.stdin.buffer.read() if payload == "-" else payload.encode()
    with _cloud_link(ctx, did) as (info, link, store):
        _, host, port = info.endpoint
        sender = CommandSender(link, host, port, username=info.username,
                               password=info.password, tls_ca=info.ca, audit=store,
                               protocol=_mqtt_protocol(info))
        _start_caller(sender, info)
        try:
            ack = sender.send_command(did, body, timeout=timeout)
        except CommandTimeout:
            _fail(f"no verified ack from {did} within {timeout:g}s (it may be offline; the "
                  "command may or may not have run)", EXIT_NETWORK)
        finally:
            sender.stop()
    try:
        shown = ack.result.decode("utf-8")
    except UnicodeDecodeError:
        shown = "base64:" + base64.b64encode(ack.result).decode()
    if not ack.ok:
        err.print(f"[red]device {did} refused the command:[/] {ack.error}", markup=True)
        sys.exit(EXIT_NO)
    out.print(f"ack from {did}: ok", markup=False)
    if shown:
        click.echo(shown)


@main.command("rpc")
@click.argument("device_id")
@click.argument("method")
@click.argument("params", required=False, default=None)
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="Seconds to wait for the device's response.")
@click.pass_context
def rpc_cmd(ctx: click.Context, device_id: str, method: str, params: str | None,
            timeout: float) -> None:
    """Call METHOD on a device over sealed JSON-RPC 2.0; print the result as JSON.

    PARAMS is a JSON array or object (omit for none). Exit 1 for a JSON-RPC error answer, 4
    when no verified response arrived in time or no server runs."""
    from sensorseal.mqtt.rpc import RpcClient, RpcError, RpcTimeout

    did = _device_id(device_id)
    parsed: Any = None
    if params is not None:
        try:
            parsed = json.loads(params)
        except ValueError as exc:
            _fail(f"PARAMS is not JSON: {exc}", 2)
        if not isinstance(parsed, list | dict):
            _fail("PARAMS must be a JSON array or object", 2)
    with _cloud_link(ctx, did) as (info, link, store):
        _, host, port = info.endpoint
        client = RpcClient(link, host, port, username=info.username, password=info.password,
                           tls_ca=info.ca, audit=store, protocol=_mqtt_protocol(info))
        _start_caller(client, info)
        try:
            result = client.call(did, method, parsed, timeout=timeout)
        except RpcTimeout:
            _fail(f"no verified response from {did} within {timeout:g}s", EXIT_NETWORK)
        except RpcError as exc:
            _fail(f"device {did} answered with JSON-RPC error {exc.code}: {exc.message}",
                  EXIT_NO)
        finally:
            client.stop()
    click.echo(json.dumps(result))


# -- key lifecycle: rotation, E5 renewal, device keys, KEK rotation, archive check ---------------

@contextmanager
def _lifecycle(ctx: click.Context) -> Iterator[Any]:
    from sensorseal.lifecycle import KeyLifecycle
    from sensorseal.mqtt.commands import COUNTER_FILE, CloudLink, DownlinkCounter

    datadir: DataDir = ctx.obj["datadir"]
    try:
        store, keystore = datadir.open()
    except ConfigError as exc:
        _fail(str(exc))
    counter = DownlinkCounter(datadir.path / COUNTER_FILE)
    try:
        registry = Registry(store, keystore)
        link = CloudLink(registry, counter)
        yield KeyLifecycle(registry, store, keystore, seal_down=link.seal_down)
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        counter.close()
        store.close()


@device.command("rotate")
@click.argument("device_id")
@click.option("--grace", "grace_s", type=click.IntRange(0, 365 * 86400), default=86400,
              show_default=True, help="Seconds the old epoch stays valid (messages in flight).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def device_rotate(ctx: click.Context, device_id: str, grace_s: int, as_json: bool) -> None:
    """Start a new key epoch; the new credential is shown once, here."""
    did = _device_id(device_id)
    with _lifecycle(ctx) as life:
        cred = life.rotate(did, grace_ms=grace_s * 1000)
    if as_json:
        out.print_json(json.dumps({"device_id": str(did), "epoch": cred.epoch,
                                   "credential": cred.encode(), "grace_s": grace_s}))
        return
    out.print(f"Device [bold]{did}[/] now at epoch {cred.epoch}; epoch {cred.epoch - 1} "
              f"stays valid for {grace_s}s")
    out.print("Credential (shown once; load it into the device):")
    out.print(cred.encode(), soft_wrap=True, markup=False)


@device.command("enroll-keys")
@click.argument("device_id")
@click.option("--suite", type=click.Choice(["x25519", "mlkem768-x25519"]), default="x25519",
              show_default=True, help="HPKE suite of the renewal key pair.")
@click.option("--signing", type=click.Choice(["none", "ed25519", "es256"]), default="ed25519",
              show_default=True, help="Device signing key (level attested).")
@click.option("--out", "out_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Where the device's PRIVATE keys are written (0600; load into the device).")
@click.option("--public-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the signing PUBLIC key (PEM), e.g. for verify-archive.")
@click.pass_context
def device_enroll_keys(ctx: click.Context, device_id: str, suite: str, signing: str,
                       out_file: Path, public_out: Path | None) -> None:
    """Make the device's renewal (and signing) key pairs and register the public halves."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from sensorseal.core.renewal import DeviceKemKey, RenewalSuite

    did = _device_id(device_id)
    kem = DeviceKemKey.generate(RenewalSuite.X25519 if suite == "x25519"
                                else RenewalSuite.MLKEM768_X25519)
    sign_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | None = None
    if signing == "ed25519":
        sign_key = ed25519.Ed25519PrivateKey.generate()
    elif signing == "es256":
        sign_key = ec.generate_private_key(ec.SECP256R1())
    doc: dict[str, Any] = {"device_id": str(did), "renewal_suite": kem.suite.name,
                           "renewal_private": base64.b64encode(kem.private_bytes()).decode()}
    if sign_key is not None:
        doc["signing"] = signing
        doc["signing_private_pem"] = sign_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
    try:
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _fail(f"{out_file} exists; refusing to overwrite a device's keys")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    with _registry(ctx) as reg:
        reg.register_renewal_key(did, kem.public_key())
        if sign_key is not None:
            reg.register_signing_key(did, sign_key.public_key())
    if public_out is not None and sign_key is not None:
        public_out.write_bytes(sign_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out.print(f"Registered keys of {did} (renewal {kem.suite.name}, signing {signing}); "
              f"private keys in {out_file}")


@device.command("renew")
@click.argument("device_id")
@click.option("--grace", "grace_s", type=click.IntRange(0, 365 * 86400), default=86400,
              show_default=True, help="Seconds the old epoch stays valid once confirmed.")
@click.option("--route", help="Downlink route the envelope is sealed for "
                              "(default: the device's MQTT commands topic).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the sealed downlink envelope here (else: base64 on stdout).")
@click.option("--resend", is_flag=True, help="Re-deliver the pending offer, make no new one.")
@click.option("--publish", is_flag=True,
              help="Publish the envelope to the device's commands topic (QoS 1) through the "
                   "running server's broker.")
@click.pass_context
def device_renew(ctx: click.Context, device_id: str, grace_s: int, route: str | None,
                 out_file: Path | None, resend: bool, publish: bool) -> None:
    """E5 renewal: seal a new root secret to the device's KEM key (HPKE), inside a downlink.

    With --publish the device gets it over MQTT (an offline device from its persistent session
    when it returns, or from a later `--resend --publish`). Exit 4 when --publish finds no
    running server or its broker does not take the message; the offer then stays pending."""
    import base64

    from sensorseal.mqtt import topics

    did = _device_id(device_id)
    commands_topic = topics.commands(did)
    if publish and route not in (None, commands_topic):
        _fail("--publish sends to the device's commands topic; drop --route", 2)
    info = _running_broker(ctx) if publish else None  # before any offer is made
    with _lifecycle(ctx) as life:
        if not resend:
            life.renew(did, grace_ms=grace_s * 1000)
        envelope = life.deliver(did, route or commands_topic)
    if envelope is None:
        _fail(f"no renewal is pending for {did}", EXIT_NO)
    if out_file is not None:
        out_file.write_bytes(envelope)
        out.print(f"Renewal offer for {did} sealed into {out_file} ({len(envelope)} bytes)")
    if info is not None:
        routed = _publish_downlink(info, commands_topic, envelope)
        out.print(f"Renewal offer for {did} published to {commands_topic} "
                  f"({len(envelope)} bytes)", markup=False)
        if not routed:
            err.print(f"warning: the broker has no session for {did} (it never connected, or "
                      "its session expired); after it connects, run `device renew --resend "
                      "--publish`", markup=False)
    elif out_file is None:
        click.echo(base64.b64encode(envelope).decode())


def _running_broker(ctx: click.Context) -> Any:
    """The running server's broker (ServiceInfo); exits 4 when no server with MQTT runs."""
    from sensorseal.server.mqtt_service import SERVICE_FILE, ServiceInfo

    datadir: DataDir = ctx.obj["datadir"]
    try:
        info = ServiceInfo.read(datadir.path / SERVICE_FILE)
    except ConfigError as exc:
        _fail(str(exc))
    if info is None:
        _fail(f"no server with MQTT is running on {datadir.path} (start `sensorseal serve`; "
              "not with --no-mqtt)", EXIT_NETWORK)
    return info


def _publish_downlink(info: Any, topic: str, data: bytes, timeout: float = 10.0) -> bool:
    """Publish a sealed downlink at QoS 1 (retain off) as the server's service account and wait
    for the broker's PUBACK. False when an MQTT 5 broker routed it to nobody (0x10: the device
    has no session); exits 4 when the broker refused it or did not answer."""
    import threading

    from sensorseal.mqtt.commands import MqttSession

    _, host, port = info.endpoint
    session = MqttSession(host, port, [], lambda _t, _d: None, username=info.username,
                          password=info.password, tls_ca=info.ca, protocol=_mqtt_protocol(info))
    acked = threading.Event()
    reasons: dict[int, Any] = {}

    def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        reasons[mid] = reason
        acked.set()

    session.client.on_publish = on_publish
    _start_caller(session, info)
    try:
        mid = session.client.publish(topic, data, qos=1, retain=False).mid
        if not acked.wait(timeout) or mid not in reasons:
            _fail(f"the broker at {info.url} did not acknowledge the offer within {timeout:g}s;"
                  " it stays pending (retry with --resend --publish)", EXIT_NETWORK)
    finally:
        session.stop()
    reason = reasons[mid]
    if getattr(reason, "is_failure", False):
        _fail(f"the broker at {info.url} refused the offer ({reason}); it stays pending",
              EXIT_NETWORK)
    return getattr(reason, "value", 0) != 0x10  # MQTT 5: no matching subscribers


@main.group()
def kek() -> None:
    """The key-encryption key that wraps every stored secret."""


@kek.command("rotate")
@click.pass_context
def kek_rotate(ctx: click.Context) -> None:
    """Re-wrap every stored secret under a new KEK, without stopping servers."""
    from sensorseal.lifecycle import rotate_kek
    from sensorseal.store import open_store

    datadir: DataDir = ctx.obj["datadir"]
    if not datadir.is_initialized():
        _fail(f"{datadir.path} is not a sensorseal data directory")
    try:
        store = open_store(datadir.store_url)
        try:
            result = rotate_kek(datadir.path, store)
        finally:
            store.close()
    except ConfigError as exc:
        _fail(str(exc))
    out.print(f"KEK {result.old_kek_id} -> {result.new_kek_id}: {result.rewrapped} secrets "
              f"re-wrapped{' (resumed)' if result.resumed else ''}")


@main.command("verify-archive")
@click.option("--device", "device_id", required=True, help="Device id (24 hex).")
@click.option("--public-key", "key_files", required=True, multiple=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="PEM public key of the device (repeat for every key it ever had).")
@click.option("--since", help="Only readings received since (ISO 8601 UTC, or ms).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reading.")
@click.pass_context
def verify_archive_cmd(ctx: click.Context, device_id: str, key_files: tuple[Path, ...],
                       since: str | None, as_json: bool) -> None:
    """Check stored signed readings offline, with public keys only (no KEK needed)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from sensorseal.core.attest import PublicKey, verify_archive
    from sensorseal.store import open_store

    did = _device_id(device_id)
    since_ms: int | None = None
    if since is not None:
        try:
            since_ms = int(since) if since.isdigit() else int(
                datetime.fromisoformat(since).replace(tzinfo=UTC).timestamp() * 1000)
        except ValueError:
            _fail("--since is ISO 8601 or milliseconds", 2)
    keys: list[PublicKey] = []
    for path in key_files:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except ValueError:
            _fail(f"{path} is not a PEM public key")
        if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            _fail(f"{path} is not an Ed25519 or P-256 public key")
        keys.append(key)
    datadir: DataDir = ctx.obj["datadir"]
    if not datadir.is_initialized():
        _fail(f"{datadir.path} is not a sensorseal data directory")
    try:
        store = open_store(datadir.store_url, migrate=False)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        rows = [r for r in store.telemetry(device_id=did, limit=10_000_000)
                if r.level == "attested" and (since_ms is None or r.received_ms >= since_ms)]
    finally:
        store.close()
    rows.reverse()  # oldest first
    results = verify_archive([r.payload for r in rows], {bytes(did): keys})
    for row, res in zip(rows, results, strict=True):
        if as_json:
            click.echo(json.dumps({"epoch": row.epoch, "seq": row.seq,
                                   "received_ms": row.received_ms, "ok": res.ok,
                                   "reason": None if res.reason is None else res.reason.value,
                                   "payload_b64": None if res.payload is None else
                                   base64.b64encode(res.payload).decode()}))
    bad = [r for r in results if not r.ok]
    if not as_json:
        out.print(f"{len(results)} signed readings of {did}: {len(results) - len(bad)} verified, "
                  f"{len(bad)} failed")
    sys.exit(EXIT_NO if bad or not results else 0)


def _register_gateway_commands() -> None:
    from sensorseal.gateway.cli import register

    register(main, device)  # network add, gateway add/export/run, device assign


_register_gateway_commands()



def _register_console_commands() -> None:
    """`operator`, `policy` and `token` (sensorseal.server.console.commands)."""
    from sensorseal.server.console.commands import register

    register(main)


_register_console_commands()


def _register_update_commands() -> None:
    """`update create|sign|approve|rollout|status` (sensorseal.updates.commands)."""
    from sensorseal.updates.commands import register

    register(main)


_register_update_commands()


# -- drop-in endpoints: Cloud IoT Core devices, EVA ICS keys (docs/compat.md) --------------------

def _expiry_ms(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        _fail("--expires is ISO 8601, e.g. 2026-01-31T00:00:00Z", 2)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@device.command("add-key")
@click.argument("device_ref", metavar="ID")
@click.option("--iotcore", "pem_file", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The device's public key or certificate (PEM; RS256 or ES256), as uploaded "
                   "to Cloud IoT Core.")
@click.option("--expires", help="When the key stops being accepted (ISO 8601; UTC if no zone).")
@click.option("--policy", type=click.Choice(["legacy", "legacy-unsigned"]), default="legacy",
              show_default=True, help="Policy of a device created by this command.")
@click.option("--counter-field", help="A device created here must carry this integer JSON "
                                      "field in every event/state (replay window).")
@click.pass_context
def device_add_key(ctx: click.Context, device_ref: str, pem_file: Path, expires: str | None,
                   policy: str, counter_field: str | None) -> None:
    """Register a Cloud IoT Core public key. ID is the device's full name
    (projects/P/locations/R/registries/REG/devices/D; created on its first key) or the 24-hex
    id of a device registered that way. At most 3 keys per device."""
    with _registry(ctx) as reg:
        dev, key_id = reg.add_iotcore_key(device_ref, pem_file.read_bytes(),
                                          expires_ms=_expiry_ms(expires), policy=policy,
                                          counter_field=counter_field)
    out.print(f"Key #{key_id} registered for {dev.path} (device {dev.device_id})", markup=False)


@device.command("keys")
@click.argument("device_ref", metavar="ID")
@click.option("--remove", "remove_id", type=int, help="Remove the key with this number.")
@click.pass_context
def device_keys(ctx: click.Context, device_ref: str, remove_id: int | None) -> None:
    """List (or --remove) a Cloud IoT Core device's registered public keys."""
    with _registry(ctx) as reg:
        if remove_id is not None:
            reg.remove_iotcore_key(device_ref, remove_id)
            out.print(f"Removed key #{remove_id}")
            return
        rows = reg.iotcore_keys(device_ref)
    table = Table("#", "alg", "added", "expires")
    for r in rows:
        table.add_row(str(r.key_id), r.alg, _when(r.added_ms), _when(r.expires_ms))
    out.print(table)


@main.group()
def iotcore() -> None:
    """Cloud IoT Core devices (served with `serve --iotcore-port`)."""


@iotcore.command("config")
@click.argument("device_ref", metavar="ID")
@click.argument("config_file", metavar="FILE", type=click.File("rb"))
@click.pass_context
def iotcore_config(ctx: click.Context, device_ref: str, config_file: Any) -> None:
    """Set a device's config from FILE (- for stdin): a running server delivers it on
    /devices/D/config (QoS 1, latest on subscribe) and through the HTTP bridge."""
    data = config_file.read()
    with _registry(ctx) as reg:
        version = reg.set_iotcore_config(device_ref, data)
    out.print(f"Config version {version} stored ({len(data)} bytes)")


@main.group()
def eva() -> None:
    """EVA ICS v3 API keys (served with `serve --eva-product/--eva-system`)."""


@eva.group("key")
def eva_key() -> None:
    """EVA API keys (shared secrets, stored wrapped under the KEK)."""


@eva_key.command("add")
@click.argument("key_id")
@click.option("--key-stdin", is_flag=True,
              help="Read the existing API key from stdin (else one is generated, shown once).")
@click.pass_context
def eva_key_add(ctx: click.Context, key_id: str, key_stdin: bool) -> None:
    """Register an API key under KEY_ID (the id EVA nodes put in their frames)."""
    api_key = sys.stdin.readline().rstrip("\r\n") if key_stdin else None
    if key_stdin and not api_key:
        _fail("--key-stdin: no key on stdin", 2)
    with _registry(ctx) as reg:
        generated = reg.add_eva_key(key_id, api_key)
    out.print(f"EVA key id {key_id} registered", markup=False)
    if generated is not None:
        out.print("API key (shown once; configure it on the EVA node):")
        out.print(generated, soft_wrap=True, markup=False)


@eva_key.command("list")
@click.pass_context
def eva_key_list(ctx: click.Context) -> None:
    """List EVA key ids (never the keys)."""
    with _registry(ctx) as reg:
        rows = reg.list_eva_keys()
    for key_id, created_ms in rows:
        out.print(f"{key_id}  {_when(created_ms)}", markup=False)


@eva_key.command("remove")
@click.argument("key_id")
@click.pass_context
def eva_key_remove(ctx: click.Context, key_id: str) -> None:
    """Remove an EVA key (a running server stops accepting it within 5 s)."""
    with _registry(ctx) as reg:
        reg.remove_eva_key(key_id)
    out.print(f"Removed EVA key id {key_id}", markup=False)


def _dropin_options(opts: dict[str, Any], *, certfile: Path | None, keyfile: Path | None,
                    host: str, mqtt_url: str | None, mqtt_ca: Path | None,
                    mqtt_username: str) -> dict[str, Any]:
    """`serve`'s --iotcore-* and --eva-* options as run.serve() keyword arguments."""
    from sensorseal.server.eva_service import EvaOptions
    from sensorseal.server.iotcore_service import IotCoreOptions

    extra: dict[str, Any] = {}
    port = opts.get("iotcore_port")
    if port is not None:
        cert, key = opts.get("iotcore_cert") or certfile, opts.get("iotcore_key") or keyfile
        if cert is None or key is None:
            _fail("--iotcore-port is TLS only: give --iotcore-cert/--iotcore-key "
                  "(or --certfile/--keyfile)", 2)
        extra["iotcore"] = IotCoreOptions(port=port, certfile=cert, keyfile=key, host=host)
    product, system = opts.get("eva_product"), opts.get("eva_system")
    if (product is None) != (system is None):
        _fail("give both --eva-product and --eva-system", 2)
    if product is not None and system is not None:
        broker = opts.get("eva_broker") or mqtt_url
        if broker is None:
            _fail("the EVA endpoint needs a broker EVA nodes can log in to: --mqtt-url "
                  "(the server's broker) or --eva-broker; the embedded broker admits only "
                  "sensorseal devices", 2)
        same = opts.get("eva_broker") is None
        extra["eva"] = EvaOptions(
            product, system, opts.get("eva_space"), broker_url=broker,
            ca=mqtt_ca if same else None,
            username=mqtt_username if same else os.environ.get(EVA_USERNAME_ENV),
            password=os.environ.get("SENSORSEAL_MQTT_PASSWORD" if same else EVA_PASSWORD_ENV))
    return extra


EVA_USERNAME_ENV = "SENSORSEAL_EVA_MQTT_USERNAME"
EVA_PASSWORD_ENV = "SENSORSEAL_EVA_MQTT_PASSWORD"  # noqa: S105 (the variable's name)



if __name__ == "__main__":  # pragma: no cover
    main()
