"""CLI commands for the console's data: `operator`, `policy` and `token` (registered on the
`sensorseal` command by `register(main)`). They work on the data directory directly, so an
admin can create the first operator before any server runs.

Passwords are read with a hidden prompt (or from stdin with --password-stdin), never from the
command line, where they would land in the shell history and the process list.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from sensorseal.core.errors import ConfigError

__all__ = ["register"]


def _fail(message: str, code: int = 3) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _services(ctx: click.Context) -> Iterator[tuple[Any, Any, Any]]:
    """(store, PolicyService, OperatorService) on the data dir; ConfigError -> exit 3."""
    from sensorseal.operators import OperatorService
    from sensorseal.policies import PolicyService

    try:
        store, _ = ctx.obj["datadir"].open()
    except ConfigError as exc:
        _fail(str(exc))
    try:
        yield store, PolicyService(store), OperatorService(store)
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        store.close()


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


def _scope(groups: str | None) -> frozenset[str] | None:
    from sensorseal.operators import parse_groups

    return None if not groups else parse_groups(groups)


_ROLE = click.Choice(["viewer", "operator", "admin"])


def register(main: click.Group) -> None:
    @main.group()
    def operator() -> None:
        """Console operators: accounts, roles and group scope."""

    @operator.command("add")
    @click.argument("name")
    @click.option("--role", type=_ROLE, default="viewer", show_default=True)
    @click.option("--groups", help="Comma-separated groups (default: every group).")
    @click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
    @click.pass_context
    def operator_add(ctx: click.Context, name: str, role: str, groups: str | None,
                     password_stdin: bool) -> None:
        """Create an operator account."""
        from sensorseal.operators import Role

        password = _password(password_stdin)
        with _services(ctx) as (_, _, ops):
            ops.add(name, password, Role.parse(role), _scope(groups), actor="cli")
        click.echo(f"Operator {name} ({role}) created")

    @operator.command("list")
    @click.pass_context
    def operator_list(ctx: click.Context) -> None:
        """List operator accounts."""
        with _services(ctx) as (_, _, ops):
            for name, role, groups, disabled in ops.accounts():
                scope = "all groups" if groups is None else ",".join(sorted(groups))
                click.echo(f"{name}\t{role.label}\t{scope}\t{'disabled' if disabled else 'active'}")

    @operator.command("passwd")
    @click.argument("name")
    @click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
    @click.pass_context
    def operator_passwd(ctx: click.Context, name: str, password_stdin: bool) -> None:
        """Set an operator's password (ends their open sessions)."""
        password = _password(password_stdin)
        with _services(ctx) as (_, _, ops):
            ops.set_password(name, password, actor="cli")
        click.echo(f"Password of {name} changed")

    @main.group()
    def policy() -> None:
        """Security policies: list, show, save, attach."""

    @policy.command("list")
    @click.pass_context
    def policy_list(ctx: click.Context) -> None:
        """Every policy and where policies are attached."""
        with _services(ctx) as (_, pol, _):
            for spec in sorted(pol.all().values(), key=lambda s: (not s.builtin, s.name)):
                levels = ",".join(sorted(lv.value for lv in spec.levels))
                kind = "built-in" if spec.builtin else "stored"
                click.echo(f"{spec.name}\t{kind}\tlevels={levels}\t{spec.description}")
            for (kind, target), name in sorted(pol.attachments().items()):
                click.echo(f"attached: {kind}{' ' + target if target else ''} -> {name}")

    @policy.command("show")
    @click.argument("name")
    @click.pass_context
    def policy_show(ctx: click.Context, name: str) -> None:
        """A policy as JSON (the format `policy set --file` reads)."""
        with _services(ctx) as (_, pol, _):
            spec = pol.get(name)
            if spec is None:
                _fail(f"no policy {name!r:.40}", 1)
            click.echo(json.dumps(json.loads(spec.to_json()), indent=2))

    @policy.command("set")
    @click.argument("name")
    @click.option("--file", "spec_file", type=click.Path(dir_okay=False, exists=True,
                                                         path_type=Path),
                  help="Save the policy NAME from this JSON file (see `policy show`).")
    @click.option("--network", is_flag=True, help="Attach NAME to the whole network.")
    @click.option("--group", help="Attach NAME to this group.")
    @click.option("--device", "device_id", help="Make NAME this device's own policy.")
    @click.pass_context
    def policy_set(ctx: click.Context, name: str, spec_file: Path | None, network: bool,
                   group: str | None, device_id: str | None) -> None:
        """Save a policy from JSON and/or attach it (to the network, a group or a device)."""
        from sensorseal.core.ids import DeviceId
        from sensorseal.policies import PolicySpec

        if spec_file is None and not network and group is None and device_id is None:
            _fail("give --file, --network, --group or --device", 2)
        with _services(ctx) as (_, pol, _):
            if spec_file is not None:
                try:
                    data = json.loads(spec_file.read_text(encoding="utf-8"))
                except ValueError as exc:
                    _fail(f"{spec_file} is not JSON: {exc}", 2)
                if not isinstance(data, dict):
                    _fail("the policy file holds one JSON object", 2)
                pol.save(PolicySpec.from_mapping({**data, "name": name}), actor="cli")
                click.echo(f"Policy {name} saved")
            if network:
                pol.attach("network", "", name, actor="cli")
                click.echo(f"Policy {name} attached to the network")
            if group is not None:
                pol.attach("group", group, name, actor="cli")
                click.echo(f"Policy {name} attached to group {group}")
            if device_id is not None:
                pol.set_device_policy(DeviceId.parse(device_id), name, actor="cli")
                click.echo(f"Policy {name} set on device {device_id}")

    @main.group()
    def token() -> None:
        """Machine API tokens: scoped to groups, revocable."""

    @token.command("create")
    @click.argument("name")
    @click.option("--role", type=_ROLE, default="viewer", show_default=True)
    @click.option("--groups", help="Comma-separated groups (default: every group).")
    @click.pass_context
    def token_create(ctx: click.Context, name: str, role: str, groups: str | None) -> None:
        """Create a token; it is printed once."""
        from sensorseal.operators import Role

        with _services(ctx) as (_, _, ops):
            token_id, value = ops.create_token(name, Role.parse(role), _scope(groups),
                                               actor="cli")
        click.echo(f"Token {token_id} ({name}, {role}); shown once:", err=True)
        click.echo(value)

    @token.command("revoke")
    @click.argument("token_id")
    @click.pass_context
    def token_revoke(ctx: click.Context, token_id: str) -> None:
        """Revoke a token by its id."""
        with _services(ctx) as (_, _, ops):
            ops.revoke_token(token_id, actor="cli")
        click.echo(f"Token {token_id} revoked")

    @token.command("list")
    @click.pass_context
    def token_list(ctx: click.Context) -> None:
        """List tokens (ids, names, scope; never the token itself)."""
        with _services(ctx) as (_, _, ops):
            for t in ops.list_tokens():
                state = "revoked" if t.revoked_ms else "active"
                click.echo(f"{t.token_id}\t{t.name}\t{t.role}\t{t.groups or 'all'}\t{state}")
