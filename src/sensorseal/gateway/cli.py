"""CLI commands for networks and gateways, mounted on `sensorseal` by `register()`:

    sensorseal network add NAME [--alg ccm|ccm16|gcm] [--require e1+e3+e4]
    sensorseal network rotate NETWORK_ID [--grace 7d]
    sensorseal gateway add NAME --network ID [--network ID ...] --out CONFIG.json
    sensorseal gateway export GATEWAY_ID --out CONFIG.json
    sensorseal gateway rotate GATEWAY_ID [--grace 7d] [--out CONFIG.json]
    sensorseal device assign DEVICE_ID --network ID --mode e3|e2|e2+e3
    sensorseal gateway run --config CONFIG.json --buffer BUF.db --upstream URL [--ca ...]
                           [--transport udp|mqtt --mqtt-host H --mqtt-port P --mqtt-ca CA ...]
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.link import LinkAlg
from sensorseal.gateway.provision import GatewayRegistry

__all__ = ["register"]

_ALGS = {"ccm": LinkAlg.AES_CCM_16_64_128, "ccm16": LinkAlg.AES_CCM_16_128_128,
         "gcm": LinkAlg.A128GCM}
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_MAX_GRACE_S = 365 * 86_400


class Duration(click.ParamType[int]):
    """A grace period: seconds, or a number with s, m, h or d (`7d`); at most a year."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"(\d{1,9})([smhd]?)", str(value).strip())
        if m is None:
            self.fail(f"{value!r:.20} is not a duration like 3600, 90m, 12h or 7d", param, ctx)
        seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
        if seconds > _MAX_GRACE_S:
            self.fail("a grace period is at most 365d", param, ctx)
        return seconds


def _fail(message: str, code: int = 3) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _hex12(text: str, what: str) -> bytes:
    try:
        return bytes(DeviceId.parse(text))
    except ConfigError:
        _fail(f"{what} must be 24 hex characters", 2)


@contextmanager
def _gateways(ctx: click.Context) -> Iterator[GatewayRegistry]:
    datadir = ctx.find_root().obj["datadir"]
    try:
        store, keystore = datadir.open()
    except ConfigError as exc:
        _fail(str(exc))
    try:
        yield GatewayRegistry(store, keystore)
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        store.close()


def register(main: click.Group, device: click.Group) -> None:
    """Add the `network` and `gateway` groups and `device assign` to the CLI."""

    @main.group()
    def network() -> None:
        """Sensor networks: the E1 link key and the layers their devices must use."""

    @network.command("add")
    @click.argument("name")
    @click.option("--alg", type=click.Choice(sorted(_ALGS)), default="ccm", show_default=True,
                  help="ccm: AES-CCM-16-64-128 (radios); ccm16: 16-byte tag; gcm: A128GCM.")
    @click.option("--require", "required", default="e1+e3", show_default=True,
                  help="Layers the cloud requires of the network's devices, e.g. e1+e3+e4.")
    @click.pass_context
    def network_add(ctx: click.Context, name: str, alg: str, required: str) -> None:
        """Create a network; its link key is shown once (load it into its devices)."""
        with _gateways(ctx) as gw:
            record, key_text = gw.add_network(name, alg=_ALGS[alg], required=required)
        click.echo(f"Network {record.network_id.hex()} ({name}), requires "
                   f"{record.required_layers}")
        click.echo("Link key (shown once; load it into the network's devices):")
        click.echo(key_text)

    @network.command("rotate")
    @click.argument("network_id")
    @click.option("--grace", "grace_s", type=Duration(), default="7d", show_default=True,
                  help="How long the old key epoch stays valid (devices not yet re-keyed).")
    @click.pass_context
    def network_rotate(ctx: click.Context, network_id: str, grace_s: int) -> None:
        """Start a new E1 key epoch; the new link key is shown once, here."""
        nid = _hex12(network_id, "network id")
        with _gateways(ctx) as gw:
            key, key_text = gw.rotate_network(nid, grace_ms=grace_s * 1000)
        click.echo(f"Network {nid.hex()} now at key epoch {key.epoch}; epoch {key.epoch - 1} "
                   f"stays valid for {grace_s}s")
        click.echo("Link key (shown once; load it into the network's devices):")
        click.echo(key_text)
        click.echo("Export the configuration of every gateway of this network again "
                   "(sensorseal gateway export ID --out FILE) and restart them with it.")

    @main.group()
    def gateway() -> None:
        """Gateways: provision, export their configuration, rotate their key, run one."""

    @gateway.command("add")
    @click.argument("name")
    @click.option("--network", "networks", multiple=True, required=True)
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="Where to write the gateway's configuration (0600; holds secrets).")
    @click.pass_context
    def gateway_add(ctx: click.Context, name: str, networks: tuple[str, ...], out: Path) -> None:
        """Provision a gateway and write its configuration file."""
        from sensorseal.gateway.config import write_config

        ids = [_hex12(n, "network id") for n in networks]
        with _gateways(ctx) as gw:
            cred = gw.add_gateway(name, ids)
            write_config(out, gw.gateway_config(cred.device_id))
        click.echo(f"Gateway {cred.device_id} ({name}); configuration written to {out}")

    @gateway.command("export")
    @click.argument("gateway_id")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
    @click.pass_context
    def gateway_export(ctx: click.Context, gateway_id: str, out: Path) -> None:
        """Write the gateway's configuration again (after devices were assigned)."""
        from sensorseal.gateway.config import write_config

        gid = DeviceId(_hex12(gateway_id, "gateway id"))
        with _gateways(ctx) as gw:
            write_config(out, gw.gateway_config(gid))
        click.echo(f"configuration of gateway {gid} written to {out}")

    @gateway.command("rotate")
    @click.argument("gateway_id")
    @click.option("--grace", "grace_s", type=Duration(), default="7d", show_default=True,
                  help="How long batches sealed under the old epoch are still accepted.")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write the new configuration here (0600; holds secrets).")
    @click.pass_context
    def gateway_rotate(ctx: click.Context, gateway_id: str, grace_s: int,
                       out: Path | None) -> None:
        """Start a new key epoch for the gateway; its configuration carries the new secret."""
        from sensorseal.gateway.config import write_config

        gid = DeviceId(_hex12(gateway_id, "gateway id"))
        if out is not None and out.exists():
            _fail(f"{out} exists; refusing to overwrite it", 2)
        with _gateways(ctx) as gw:
            cred = gw.rotate_gateway(gid, grace_ms=grace_s * 1000)
            if out is not None:
                write_config(out, gw.gateway_config(gid))
        click.echo(f"Gateway {gid} now at epoch {cred.epoch}; epoch {cred.epoch - 1} stays "
                   f"valid for {grace_s}s")
        if out is not None:
            click.echo(f"configuration written to {out}; restart the gateway with it")
        else:
            click.echo("Export its configuration (sensorseal gateway export ID --out FILE) and "
                       "restart the gateway with it.")

    @gateway.command("run")
    @click.option("--config", "config_path", required=True,
                  type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--buffer", "buffer_path", required=True,
                  type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--upstream", required=True, help="Cloud base URL (https://...).")
    @click.option("--ca", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--client-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--client-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--listen", default="127.0.0.1:0", show_default=True,
                  help="UDP address of the radio side (--transport udp); port 0 picks one.")
    @click.option("--transport", type=click.Choice(["udp", "mqtt"]), default="udp",
                  show_default=True, help="Radio side: loopback UDP, or a local MQTT broker.")
    @click.option("--mqtt-host", default="127.0.0.1", show_default=True)
    @click.option("--mqtt-port", type=click.IntRange(1, 65535), default=1883, show_default=True)
    @click.option("--mqtt-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                  help="Broker CA: TLS 1.2+ with the broker's host name verified.")
    @click.option("--mqtt-client-cert",
                  type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--mqtt-client-key",
                  type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--mqtt-username", default=None, help="Default: the gateway id.")
    @click.option("--mqtt-password", envvar="SENSORSEAL_GATEWAY_MQTT_PASSWORD", default=None,
                  help="Default: the gateway's derived broker password (prefer the env var).")
    @click.option("--mqtt-topic-prefix", default="sensorseal-radio", show_default=True)
    @click.option("--mtu", type=click.IntRange(64, 65_000), default=255, show_default=True)
    @click.option("--rate", type=click.FloatRange(0.1, 1e6), default=50.0, show_default=True,
                  help="Frames per second per device (token bucket).")
    @click.option("--burst", type=click.FloatRange(1, 1e6), default=100.0, show_default=True)
    @click.option("--max-buffer", type=click.IntRange(1, 10**8), default=100_000,
                  show_default=True)
    def gateway_run(config_path: Path, buffer_path: Path, upstream: str, ca: Path | None,
                    client_cert: Path | None, client_key: Path | None, listen: str,
                    transport: str, mqtt_host: str, mqtt_port: int, mqtt_ca: Path | None,
                    mqtt_client_cert: Path | None, mqtt_client_key: Path | None,
                    mqtt_username: str | None, mqtt_password: str | None,
                    mqtt_topic_prefix: str, mtu: int, rate: float, burst: float,
                    max_buffer: int) -> None:
        """Run a gateway: radio frames in (UDP or MQTT), buffered on disk, sealed batches up."""
        from sensorseal.gateway.relay import RateLimit
        from sensorseal.gateway.run import run_gateway
        from sensorseal.gateway.service import GatewaySettings

        host, _, port = listen.rpartition(":")
        if not port.isdigit():
            _fail("--listen is HOST:PORT", 2)
        try:
            run_gateway(config_path, buffer_path, upstream, ca_file=ca, client_cert=client_cert,
                        client_key=client_key, host=host, port=int(port), max_buffer=max_buffer,
                        settings=GatewaySettings(mtu=mtu, rate=RateLimit(rate, burst)),
                        transport=transport, mqtt_host=mqtt_host, mqtt_port=mqtt_port,
                        mqtt_ca=mqtt_ca, mqtt_client_cert=mqtt_client_cert,
                        mqtt_client_key=mqtt_client_key, mqtt_username=mqtt_username,
                        mqtt_password=mqtt_password, mqtt_topic_prefix=mqtt_topic_prefix)
        except ConfigError as exc:
            _fail(str(exc))

    @device.command("assign")
    @click.argument("device_id")
    @click.option("--network", required=True)
    @click.option("--mode", type=click.Choice(["e3", "e2", "e2+e3"]), default="e3",
                  show_default=True)
    @click.pass_context
    def device_assign(ctx: click.Context, device_id: str, network: str, mode: str) -> None:
        """Put a device in a network, behind its gateways, protected as MODE."""
        did = DeviceId(_hex12(device_id, "device id"))
        nid = _hex12(network, "network id")
        with _gateways(ctx) as gw:
            gw.assign(did, nid, mode)
            key_text = gw.network_key_text(nid)
        click.echo(f"Device {did} assigned to network {nid.hex()} ({mode})")
        click.echo("Network link key for this device (keep it secret):")
        click.echo(key_text)
