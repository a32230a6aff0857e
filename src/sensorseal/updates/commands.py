"""CLI: `sensorseal update create|sign|approve|rollout|status` (registered by `register(main)`).

`create`, `rollout` and `status` work on the data directory. `sign` and `approve` need no data
directory at all: they read a file and a key and write a file, so they run on the offline
signing machine (docs/updates.md, "Keeping the vendor key offline"). A key comes from a PEM
file (its password, if any, from $SENSORSEAL_SIGNING_KEY_PASSWORD) or from a PKCS#11 token
(--pkcs11 LABEL; module, token and PIN from $SENSORSEAL_PKCS11_MODULE/_TOKEN/_PIN). No key, PIN
or password is ever printed.
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

from sensorseal.core.errors import ConfigError

__all__ = ["register"]

PASSWORD_ENV = "SENSORSEAL_SIGNING_KEY_PASSWORD"  # noqa: S105 (an environment variable name)
STATES = ("pending", "offered", "downloading", "verified", "installed", "failed")

out = Console(highlight=False)


def _fail(message: str, code: int = 3) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def _service(ctx: click.Context) -> Iterator[Any]:
    from sensorseal.updates.server import UpdateService

    try:
        store, _ = ctx.obj["datadir"].open()
    except ConfigError as exc:
        _fail(str(exc))
    if not hasattr(store, "list_rollouts"):
        store.close()
        _fail(f"{type(store).__name__} has no update tables")
    try:
        yield UpdateService(store)
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        store.close()


def _signer(key_file: Path | None, pkcs11_label: str | None) -> tuple[Callable[[bytes], bytes],
                                                                        int]:
    """(signer, COSE alg) from a PEM private key or a token key; ConfigError otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from sensorseal.core.attest import ALG_EDDSA, ALG_ES256, software_signer

    if (key_file is None) == (pkcs11_label is None):
        raise ConfigError("give exactly one of --key and --pkcs11")
    if pkcs11_label is not None:
        from pkcs11 import ObjectClass

        from sensorseal.keystore.pkcs11 import Pkcs11Config, Pkcs11Signer, open_session

        session = open_session(Pkcs11Config.from_env(), rw=False)
        try:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=pkcs11_label)
        except Exception as exc:  # NoSuchKey, MultipleObjectsReturned
            raise ConfigError(f"no single private key labelled {pkcs11_label!r} in the token "
                              f"({type(exc).__name__})") from None
        return Pkcs11Signer(key), ALG_ES256
    assert key_file is not None
    password = os.environ.get(PASSWORD_ENV)
    try:
        private = serialization.load_pem_private_key(
            key_file.read_bytes(), None if password is None else password.encode())
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"cannot load the private key in {key_file} "
                          f"({type(exc).__name__})") from None
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return software_signer(private), ALG_EDDSA
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve,
                                                                       ec.SECP256R1):
        return software_signer(private), ALG_ES256
    raise ConfigError("a signing key is Ed25519 or EC P-256")


def _public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a PEM public key ({type(exc).__name__})") from None


_KEY = click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True,
                                                         path_type=Path),
                    help="PEM private key (password from $SENSORSEAL_SIGNING_KEY_PASSWORD).")
_PKCS11 = click.option("--pkcs11", "pkcs11_label", metavar="LABEL",
                       help="Private key LABEL in the PKCS#11 token ($SENSORSEAL_PKCS11_*).")
_OUT = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                    required=True, help="Where to write the result.")


def _status_table(service: Any, rollout_id: str, as_json: bool) -> None:
    row = service.store.get_rollout(rollout_id)
    if row is None:
        _fail(f"no rollout {rollout_id!r}", 1)
    summary = service.summary(rollout_id)
    records = service.records(rollout_id)
    failed = [r for r in records if r.state == "failed"]
    if as_json:
        click.echo(json.dumps({"rollout": rollout_id, "manifest_seq": row.manifest_seq,
                               **summary.as_dict(),
                               "failed": [{"device": r.device_id.hex(), "reason": r.reason,
                                           "attempts": r.attempts} for r in failed]}))
        return
    out.print(f"rollout [bold]{rollout_id}[/]: manifest #{row.manifest_seq} "
              f"({row.device_class} v{row.image_version}), target {row.target or '-'}, "
              f"created {_when(row.created_ms)} UTC")
    states = Table(title=f"{summary.total} devices"
                   f"{' - complete' if summary.complete else ''}")
    for s in STATES:
        states.add_column(s, justify="right")
    states.add_row(*(str(summary.by_state.get(s, 0)) for s in STATES))
    out.print(states)
    if failed:
        table = Table(title="failures")
        for name in ("device", "reason", "attempts", "updated (UTC)"):
            table.add_column(name)
        for r in failed:
            table.add_row(r.device_id.hex(), r.reason or "-", str(r.attempts),
                          _when(r.updated_ms))
        out.print(table)


def register(main: click.Group) -> None:
    @main.group()
    def update() -> None:
        """Signed updates: create, sign, approve, roll out, follow."""

    @update.command("create")
    @click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--class", "device_class", required=True, help="Target device class.")
    @click.option("--version", "version", type=click.IntRange(0), required=True,
                  help="Image version (must exceed what devices run).")
    @click.option("--kind", type=click.Choice(["firmware", "config"]), default="firmware",
                  show_default=True)
    @click.option("--valid-days", type=click.IntRange(1, 3650), default=30, show_default=True)
    @click.option("--seq", type=click.IntRange(1), help="Manifest sequence (default: next).")
    @_OUT
    @click.pass_context
    def create(ctx: click.Context, image: Path, device_class: str, version: int, kind: str,
               valid_days: int, seq: int | None, output: Path) -> None:
        """Store IMAGE and write the unsigned manifest that the vendor signs."""
        with _service(ctx) as service:
            data = image.read_bytes()
            row = service.create_manifest(data, device_class=device_class, version=version,
                                          kind=kind, valid_ms=valid_days * 86_400_000, seq=seq)
        output.write_bytes(row.payload)
        out.print(f"manifest #{row.seq}: {device_class} v{version}, {len(data)} bytes, "
                  f"sha256 {row.image_sha256.hex()} -> {output} (unsigned)")

    @update.command("sign")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--kid", required=True, help="Key id the devices know the vendor key by.")
    @_KEY
    @_PKCS11
    @click.option("--for-approval", is_flag=True,
                  help="COSE_Sign, so that an operator can add an approval.")
    @_OUT
    def sign(manifest: Path, kid: str, key_file: Path | None, pkcs11_label: str | None,
             for_approval: bool, output: Path) -> None:
        """Vendor signature over an unsigned manifest (no data directory needed)."""
        from sensorseal.updates.manifest import sign_manifest
        from sensorseal.updates.server import manifest_from_payload

        try:
            m = manifest_from_payload(manifest.read_bytes())
            signer, alg = _signer(key_file, pkcs11_label)
            signed = sign_manifest(m, signer, kid.encode(), alg, for_approval=for_approval)
        except ConfigError as exc:
            _fail(str(exc))
        output.write_bytes(signed)
        out.print(f"manifest #{m.sequence} signed by {kid!r} "
                  f"({'for approval' if for_approval else 'COSE_Sign1'}) -> {output}")

    @update.command("approve")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--kid", required=True, help="The operator's key id.")
    @_KEY
    @_PKCS11
    @click.option("--vendor-key", required=True,
                  type=click.Path(dir_okay=False, exists=True, path_type=Path),
                  help="The vendor's PEM public key (its signature is checked first).")
    @click.option("--vendor-kid", required=True)
    @_OUT
    def approve(manifest: Path, kid: str, key_file: Path | None, pkcs11_label: str | None,
                vendor_key: Path, vendor_kid: str, output: Path) -> None:
        """Operator approval: a second signature over a vendor-signed manifest."""
        from sensorseal.updates.manifest import TrustAnchors, approve_manifest, verify_manifest
        from sensorseal.updates.server import manifest_from_payload, signed_payload

        try:
            trust = TrustAnchors(vendor={vendor_kid.encode(): _public_key(vendor_key)})
            signed = manifest.read_bytes()
            m = manifest_from_payload(signed_payload(signed))
            # approve_manifest alone lets a manifest through when no signature names a trusted
            # vendor kid; a full verification (at the manifest's own creation time) does not
            verify_manifest(signed, trust, device_class=m.device_class, installed_version=-1,
                            last_manifest_seq=-1, now_ms=m.created_ms, require_operator=False)
            signer, alg = _signer(key_file, pkcs11_label)
            approved = approve_manifest(signed, signer, kid.encode(), alg, trust=trust)
        except ConfigError as exc:
            _fail(str(exc))
        except Exception as exc:  # UpdateRejected: the vendor signature does not hold
            _fail(f"not approved: {exc}", 1)
        output.write_bytes(approved)
        out.print(f"approved by {kid!r} -> {output}")

    @update.command("rollout")
    @click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--device", "devices", multiple=True, help="A device id (repeatable).")
    @click.option("--group", help="Every device of this group (or --percent of it).")
    @click.option("--percent", type=click.FloatRange(0.01, 100.0),
                  help="Deterministic share of --group.")
    @click.option("--id", "rollout_id", help="Rollout id (default: generated).")
    @click.pass_context
    def rollout(ctx: click.Context, manifest: Path, devices: tuple[str, ...],
                group: str | None, percent: float | None, rollout_id: str | None) -> None:
        """Import a signed MANIFEST and roll it out to devices, a group or a share of one."""
        from sensorseal.core.ids import DeviceId
        from sensorseal.updates.rollout import Target

        if bool(devices) == bool(group) or (percent is not None and not group):
            _fail("give --device ... or --group [--percent]", 2)
        with _service(ctx) as service:
            if devices:
                target = Target.devices([DeviceId.parse(d) for d in devices])
                label = f"{len(devices)} devices"
            else:
                assert group is not None
                members = service.group_members(group)
                target = (Target.whole_group(group, members) if percent is None
                          else Target.percentage(group, members, percent))
                label = f"group {group}" + ("" if percent is None else f" {percent:g}%")
            rid, chosen = service.start_rollout(manifest.read_bytes(), target,
                                                rollout_id=rollout_id, label=label)
        out.print(f"rollout [bold]{rid}[/]: {len(chosen)} devices selected ({label})")

    @update.command("status")
    @click.argument("rollout_id", required=False)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def status(ctx: click.Context, rollout_id: str | None, as_json: bool) -> None:
        """Per-state counts and failures (with reasons) of a rollout, or list rollouts."""
        with _service(ctx) as service:
            if rollout_id is not None:
                _status_table(service, rollout_id, as_json)
                return
            rows = service.store.list_rollouts(limit=100)
            summaries = [(r, service.summary(r.rollout_id)) for r in rows]
        if as_json:
            for r, s in summaries:
                click.echo(json.dumps({"rollout": r.rollout_id, **s.as_dict()}))
            return
        table = Table(title="rollouts")
        for name in ("rollout", "manifest", "target", "devices", *STATES):
            table.add_column(name)
        for r, s in summaries:
            table.add_row(r.rollout_id, f"#{r.manifest_seq} v{r.image_version}",
                          r.target or "-", str(s.total),
                          *(str(s.by_state.get(st, 0)) for st in STATES))
        out.print(table)
