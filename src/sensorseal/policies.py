"""Security policies as data: named profiles, where they are attached, which one applies.

A policy is attached to a device (the device's `policy` column), to a group, or to the whole
network. Several may apply to one device; the effective policy takes, rule by rule, the
strictest value among them (fewer accepted levels, smaller clock skew, a smaller replay window,
every "required" flag that any of them sets). It is therefore at least as strict as each
applicable policy, and when one of them is strictest in every rule it *is* that policy, name
included. A lax device policy can never loosen a stringent network policy.

Built-in presets (the core's `lax`/`standard`/`stringent` plus three application profiles) are
read-only; operators add their own, stored as JSON in the store. Rules the ingest pipeline can
check today (accepted levels, timestamp skew, required timestamp, replay window size) are
enforced through `PolicyService.resolve`, which the pipeline calls for every device it caches;
the others (TLS, signed commands, device signatures, hardware keys, protection layers E1-E4) are
stored and shown now so that later features enforce what operators already declared.

The service reloads its tables when a change counter in the store's meta table moves, checked at
most once per `ttl_ms`, so that every worker process sees an operator's change within a second.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Level
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.core.replay import DEFAULT_WINDOW
from sensorseal.store.base import AuditEvent, ConsoleStore, DeviceRecord, Store

__all__ = [
    "BUILTIN",
    "GROUP_RE",
    "LAYERS",
    "ConsoleBackend",
    "PolicyService",
    "PolicySpec",
    "check_group",
    "meet",
]

LAYERS = ("E1", "E2", "E3", "E4")
GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
META_VERSION = "console_config_version"
MAX_SKEW_S = 30 * 24 * 3600
MAX_WINDOW = 4096


def check_group(group: str) -> str:
    if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
        raise ConfigError("a group name is 1 to 32 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return group


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One named policy. The first four rules are enforced at ingest, the rest declared."""

    name: str
    description: str = ""
    levels: frozenset[Level] = frozenset({Level.SEALED})
    max_skew_s: int | None = None
    require_timestamp: bool = False
    replay_window: int = DEFAULT_WINDOW
    require_tls: bool = False
    require_signed_commands: bool = False
    require_device_signature: bool = False
    require_hardware_keys: bool = False
    layers: frozenset[str] = field(default_factory=frozenset)
    builtin: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError("a policy name is 1 to 32 lowercase letters, digits or '-'")
        if len(self.description) > 200 or not self.description.isprintable():
            raise ConfigError("a description is at most 200 printable characters")
        if not self.levels:
            raise ConfigError("a policy must accept at least one level (signed or sealed)")
        if self.max_skew_s is not None and not 1 <= self.max_skew_s <= MAX_SKEW_S:
            raise ConfigError(f"the allowed clock skew is 1 to {MAX_SKEW_S} seconds, or empty")
        if not 1 <= self.replay_window <= MAX_WINDOW:
            raise ConfigError(f"the replay window is 1 to {MAX_WINDOW} messages")
        if not self.layers <= set(LAYERS):
            raise ConfigError(f"protection layers are among {', '.join(LAYERS)}")

    def core(self) -> Policy:
        """The part the ingest pipeline enforces, as the core's Policy."""
        return Policy(self.name, self.levels, self.max_skew_s, self.require_timestamp,
                      self.replay_window, require_attestation=self.require_device_signature)

    def rules(self) -> tuple[object, ...]:
        """Every rule, for comparing strictness (names and descriptions aside)."""
        return (self.levels, self.max_skew_s, self.require_timestamp, self.replay_window,
                self.require_tls, self.require_signed_commands, self.require_device_signature,
                self.require_hardware_keys, self.layers)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("builtin")
        data["levels"] = sorted(lv.value for lv in self.levels)
        data["layers"] = sorted(self.layers)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicySpec:
        return cls.from_mapping(json.loads(text))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PolicySpec:
        """Build from JSON or a form; ConfigError with a message an operator can act on."""
        known = {f for f in cls.__dataclass_fields__ if f != "builtin"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown policy field {sorted(unknown)[0]!r:.40}")
        try:
            levels = frozenset(Level(v) for v in data.get("levels", ["sealed"]))
        except (ValueError, TypeError):
            raise ConfigError("levels are 'signed' and/or 'sealed'") from None
        skew = data.get("max_skew_s")
        window = data.get("replay_window", DEFAULT_WINDOW)
        for label, value in (("max_skew_s", skew), ("replay_window", window)):
            if value is not None and (type(value) is not int):
                raise ConfigError(f"{label} must be a whole number")
        flags = {}
        for flag in ("require_timestamp", "require_tls", "require_signed_commands",
                     "require_device_signature", "require_hardware_keys"):
            value = data.get(flag, False)
            if type(value) is not bool:
                raise ConfigError(f"{flag} must be true or false")
            flags[flag] = value
        layers = data.get("layers", [])
        if not isinstance(layers, list | tuple | frozenset | set) or \
                not all(isinstance(x, str) for x in layers):
            raise ConfigError("layers must be a list such as ['E3', 'E4']")
        name, description = data.get("name"), data.get("description", "")
        if not isinstance(name, str) or not isinstance(description, str):
            raise ConfigError("name and description must be text")
        return cls(name=name, description=description, levels=levels, max_skew_s=skew,
                   replay_window=window, layers=frozenset(layers), **flags)


def _builtin() -> dict[str, PolicySpec]:
    specs = [
        PolicySpec(p.name, f"core preset {p.name}", p.levels, p.max_skew_s, p.require_timestamp,
                   p.replay_window, require_device_signature=p.require_attestation,
                   builtin=True)
        for p in PRESETS.values()
    ]
    specs += [
        PolicySpec("weather-station", "public readings: authentic, not secret",
                   frozenset({Level.SIGNED, Level.SEALED}), layers=frozenset({"E3"}),
                   builtin=True),
        PolicySpec("industrial-controller", "sealed telemetry, signed commands, TLS",
                   frozenset({Level.SEALED}), max_skew_s=300, require_timestamp=True,
                   require_tls=True, require_signed_commands=True,
                   layers=frozenset({"E3", "E4"}), builtin=True),
        PolicySpec("critical-site", "every layer, device signatures, hardware keys",
                   frozenset({Level.SEALED}), max_skew_s=60, require_timestamp=True,
                   replay_window=32, require_tls=True, require_signed_commands=True,
                   require_device_signature=True, require_hardware_keys=True,
                   layers=frozenset(LAYERS), builtin=True),
    ]
    return {s.name: s for s in specs}


BUILTIN: dict[str, PolicySpec] = _builtin()


def meet(specs: list[PolicySpec]) -> PolicySpec:
    """The strictest value of every rule among `specs` (see the module docstring).

    Rejected(POLICY_VIOLATION) when the policies contradict each other (no level that all of
    them accept): refusing is the only answer at least as strict as each.
    """
    if not specs:
        raise ConfigError("meet() of no policy")
    for spec in specs:
        if all(_at_least(spec, other) for other in specs):
            return spec
    levels = frozenset.intersection(*(s.levels for s in specs))
    names = "+".join(sorted({s.name for s in specs}))
    if not levels:
        raise Rejected(RejectReason.POLICY_VIOLATION,
                       f"policies {names} accept no common level")
    skews = [s.max_skew_s for s in specs if s.max_skew_s is not None]
    combined = PolicySpec(
        specs[0].name, "", levels, min(skews) if skews else None,
        any(s.require_timestamp for s in specs), min(s.replay_window for s in specs),
        any(s.require_tls for s in specs), any(s.require_signed_commands for s in specs),
        any(s.require_device_signature for s in specs),
        any(s.require_hardware_keys for s in specs),
        frozenset().union(*(s.layers for s in specs)))
    # The combined name may exceed the 32 characters of a stored name; set it afterwards.
    object.__setattr__(combined, "name", names)
    return combined


def _at_least(a: PolicySpec, b: PolicySpec) -> bool:
    """True if `a` is at least as strict as `b` in every rule."""
    return (a.levels <= b.levels
            and (b.max_skew_s is None or (a.max_skew_s is not None
                                          and a.max_skew_s <= b.max_skew_s))
            and a.require_timestamp >= b.require_timestamp
            and a.replay_window <= b.replay_window
            and a.require_tls >= b.require_tls
            and a.require_signed_commands >= b.require_signed_commands
            and a.require_device_signature >= b.require_device_signature
            and a.require_hardware_keys >= b.require_hardware_keys
            and a.layers >= b.layers)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    version: str | None
    custom: dict[str, PolicySpec]
    attachments: dict[tuple[str, str], str]
    groups: dict[str, str]  # device hex -> group


class ConsoleBackend(Store, ConsoleStore, Protocol):
    """A store with the console tables (SQLiteStore is one)."""


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class PolicyService:
    """Stored policies, their attachments and device groups; resolves the effective policy."""

    def __init__(self, store: ConsoleBackend, *, clock_ms: Callable[[], int] = _wall_clock_ms,
                 ttl_ms: int = 1000) -> None:
        self._store = store
        self._clock_ms = clock_ms
        self._ttl_ms = ttl_ms
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None
        self._checked_ms = -(10**12)
        self._core_cache: dict[tuple[str, ...], Policy] = {}

    # -- reads -----------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        now = self._clock_ms()
        with self._lock:
            snap, fresh = self._snap, now - self._checked_ms < self._ttl_ms
        if snap is not None and fresh:
            return snap
        version = self._store.get_meta(META_VERSION)
        if snap is None or snap.version != version:
            custom: dict[str, PolicySpec] = {}
            for name, text in self._store.list_policies().items():
                try:
                    custom[name] = PolicySpec.from_json(text)
                except (ConfigError, ValueError):
                    continue  # an unreadable row acts as an unknown policy: refused at ingest
            snap = _Snapshot(version, custom, self._store.policy_attachments(),
                             self._store.device_groups())
        with self._lock:
            if self._snap is None or self._snap.version != snap.version:
                self._core_cache.clear()
            self._snap, self._checked_ms = snap, now
        return snap

    def refresh(self) -> None:
        """Forget the cached tables (this process): the next read reloads them."""
        with self._lock:
            self._snap = None

    def all(self) -> dict[str, PolicySpec]:
        """Built-in and operator-defined policies by name."""
        return {**BUILTIN, **self._snapshot().custom}

    def get(self, name: str) -> PolicySpec | None:
        return self.all().get(name)

    def attachments(self) -> dict[tuple[str, str], str]:
        return dict(self._snapshot().attachments)

    def group_of(self, device_id: DeviceId | str) -> str | None:
        key = device_id if isinstance(device_id, str) else device_id.hex()
        return self._snapshot().groups.get(key)

    def groups(self) -> dict[str, str]:
        return dict(self._snapshot().groups)

    def known_groups(self) -> list[str]:
        snap = self._snapshot()
        found = set(snap.groups.values()) | {t for (k, t) in snap.attachments if k == "group"}
        return sorted(found)

    def applicable(self, record: DeviceRecord) -> list[tuple[str, str]]:
        """(where, policy name) of every policy attached to the device, its group, the net."""
        snap = self._snapshot()
        found = [("device", record.policy)]
        group = snap.groups.get(record.device_id.hex())
        if group is not None and ("group", group) in snap.attachments:
            found.append((f"group {group}", snap.attachments[("group", group)]))
        if ("network", "") in snap.attachments:
            found.append(("network", snap.attachments[("network", "")]))
        return found

    def effective(self, record: DeviceRecord) -> PolicySpec:
        """The strictest combination of the applicable policies; Rejected if one is unknown."""
        specs = []
        known = self.all()
        for where, name in self.applicable(record):
            spec = known.get(name)
            if spec is None:
                raise Rejected(RejectReason.POLICY_VIOLATION,
                               f"{where} policy {name[:40]!r} unknown to the server")
            specs.append(spec)
        return meet(specs)

    def resolve(self, record: DeviceRecord) -> Policy:
        """The pipeline's hook: the core Policy to enforce for this device."""
        key = tuple(name for _, name in self.applicable(record))
        cached = self._core_cache.get(key)
        if cached is not None:
            return cached
        policy = self.effective(record).core()
        self._core_cache[key] = policy
        return policy

    # -- changes (each bumps the version so every process reloads) --------------------------

    def _changed(self, reason: str, actor: str, detail: str, device: str | None = None) -> None:
        self._store.set_meta(META_VERSION, secrets.token_hex(8))
        self._store.add_events([AuditEvent(self._clock_ms(), reason, "console", actor, device,
                                           detail)])
        self.refresh()

    def save(self, spec: PolicySpec, *, actor: str) -> None:
        if spec.name in BUILTIN:
            raise ConfigError(f"{spec.name} is a built-in policy; save a copy under a new name")
        spec = replace(spec, builtin=False)
        self._store.put_policy(spec.name, spec.to_json(), self._clock_ms())
        self._changed("policy_saved", actor, f"policy={spec.name}")

    def delete(self, name: str, *, actor: str) -> None:
        if name in BUILTIN:
            raise ConfigError(f"{name} is a built-in policy and cannot be deleted")
        in_use = [t or "network" for (_, t), p in self.attachments().items() if p == name]
        if in_use:
            raise ConfigError(f"policy {name} is attached to {', '.join(sorted(in_use))}; "
                              "detach it first")
        if not self._store.delete_policy(name):
            raise ConfigError(f"no policy {name!r:.40}")
        self._changed("policy_deleted", actor, f"policy={name}")

    def attach(self, kind: str, target: str, name: str | None, *, actor: str) -> None:
        """Attach `name` (None: detach) to the network (target '') or a group."""
        if kind == "network":
            target = ""
        elif kind == "group":
            check_group(target)
        else:
            raise ConfigError("a policy is attached to the network or a group here "
                              "(a device's own policy is set on the device)")
        if name is not None and name not in self.all():
            raise ConfigError(f"no policy {name!r:.40}")
        self._store.attach_policy(kind, target, name)
        self._changed("policy_attached", actor,
                      f"{kind}{' ' + target if target else ''} -> {name or '(none)'}")

    def set_device_policy(self, device_id: DeviceId, name: str, *, actor: str) -> None:
        if name not in self.all():
            raise ConfigError(f"no policy {name!r:.40}")
        if not self._store.set_device_policy(device_id, name):
            raise ConfigError(f"no device {device_id}")
        self._changed("device_policy_set", actor, f"policy={name}", str(device_id))

    def set_group(self, device_id: DeviceId, group: str | None, *, actor: str) -> None:
        if group is not None:
            check_group(group)
        if not self._store.set_device_group(device_id, group):
            raise ConfigError(f"no device {device_id}")
        self._changed("device_group_set", actor, f"group={group or '(none)'}", str(device_id))
