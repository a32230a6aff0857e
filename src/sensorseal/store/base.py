"""The store interface: registry, key material (wrapped), telemetry, audit.

One interface, several back ends (SQLite by default, PostgreSQL to scale). Implementations are
synchronous and thread-safe; async adapters call them from a worker thread. Secrets only ever
arrive here already wrapped under the key-encryption key (see sensorseal.keystore): a copy of the
database alone yields no key.

The unique key (device_id, epoch, seq) on telemetry is the replay truth that several workers and
restarts share: `record()` reports a duplicate instead of storing it twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, Protocol

from sensorseal.core.ids import DeviceId

__all__ = [
    "KEK_BLOB_COLUMNS",
    "ApiTokenRow",
    "Assignment",
    "AuditEvent",
    "CompatStore",
    "ConsoleStore",
    "DeviceExists",
    "DeviceRecord",
    "DeviceStatus",
    "EpochInfo",
    "GatewayRecord",
    "GatewayStore",
    "IotCoreConfigRow",
    "IotCoreDevice",
    "IotCoreKeyRow",
    "IotCoreStore",
    "KekBlobStore",
    "KeyEpochRow",
    "KeyLifecycleStore",
    "LegacyCredential",
    "NetworkRecord",
    "OperatorRow",
    "PublicKeyRow",
    "SessionRow",
    "Store",
    "TelemetryRow",
    "UpdateDeviceRow",
    "UpdateManifestRow",
    "UpdateRolloutRow",
    "UpdateStore",
    "WrappedBlob",
    "WrappedKind",
]


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"  # refused for now; can be re-activated
    REVOKED = "revoked"  # refused forever; the id is never reused


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: DeviceId
    name: str
    status: DeviceStatus
    epoch: int  # current key epoch
    policy: str  # name of the policy (see sensorseal.core.policy.PRESETS)
    created_ms: int
    last_seen_ms: int | None = None


class TelemetryRow(NamedTuple):
    """One accepted message. (A NamedTuple: ingest builds one per message, ~3x cheaper.)"""

    device_id: DeviceId
    epoch: int
    seq: int
    received_ms: int
    device_ts_ms: int | None
    level: str
    route: str
    transport: str
    payload: bytes


class AuditEvent(NamedTuple):
    """A security event: every rejection, and operator actions on devices."""

    at_ms: int
    reason: str  # a RejectReason value, or an action such as "device_revoked"
    transport: str  # http, mqtt, cli, ...
    source: str  # peer address, or operator name
    device_id: str | None = None  # as claimed by the message (24 hex) or None if unparseable
    detail: str = ""  # never contains secret material


class DeviceExists(Exception):
    """add_device() with an id that exists (or existed: revoked ids are never reused)."""


class Store(Protocol):
    """What every back end provides. All methods are blocking and thread-safe."""

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns that version."""
        ...

    def close(self) -> None: ...

    # registry
    def add_device(self, record: DeviceRecord, wrapped_secret: bytes) -> None:
        """Insert device and its first epoch's wrapped secret atomically. Raises DeviceExists."""
        ...

    def get_device(self, device_id: DeviceId) -> DeviceRecord | None: ...

    def list_devices(self, *, limit: int = 1000, offset: int = 0) -> list[DeviceRecord]: ...

    def rename_device(self, device_id: DeviceId, name: str) -> bool:
        """False if there is no such device."""
        ...

    def set_status(self, device_id: DeviceId, status: DeviceStatus) -> bool:
        """False if there is no such device. A revoked device cannot change status again."""
        ...

    def get_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        """The wrapped root secret of one epoch, or None."""
        ...

    # telemetry and replay truth
    def record(self, rows: Sequence[TelemetryRow], events: Sequence[AuditEvent] = ()) -> list[bool]:
        """Store rows and events in ONE transaction. Returns, per row, True if stored and False
        if (device_id, epoch, seq) was already there (a replay). Also updates last_seen_ms."""
        ...

    def max_seq(self, device_id: DeviceId, epoch: int) -> int | None:
        """Highest stored seq of (device, epoch), to resume a replay window after a restart."""
        ...

    def telemetry(self, *, device_id: DeviceId | None = None,
                  limit: int = 100) -> list[TelemetryRow]:
        """Newest first."""
        ...

    def count_telemetry(self, device_id: DeviceId | None = None) -> int: ...

    # audit
    def add_events(self, events: Sequence[AuditEvent]) -> None: ...

    def events(self, *, reason: str | None = None, device_id: str | None = None,
               since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        """Newest first, filtered."""
        ...

    def count_events_by_reason(self) -> dict[str, int]: ...

    # small key/value settings (operator token hash, schema facts)
    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


# -- console: operators, sessions, API tokens, policies, groups (migration 0003) -----------------
# A separate protocol so that a back end without a console still satisfies `Store`.


class OperatorRow(NamedTuple):
    """An operator account. `groups` is a JSON array of group names, None for every group."""

    name: str
    password_hash: str  # argon2id, never the password
    role: str  # viewer | operator | admin
    groups: str | None
    disabled: bool
    created_ms: int


class SessionRow(NamedTuple):
    """A console session; the id itself is never stored, only its SHA-256."""

    id_sha256: str
    operator: str
    csrf: str
    created_ms: int
    expires_ms: int


class ApiTokenRow(NamedTuple):
    """A machine token; `sha256` is the hash of the whole token string."""

    token_id: str
    name: str
    sha256: str
    role: str
    groups: str | None
    created_ms: int
    created_by: str
    revoked_ms: int | None


class ConsoleStore(Protocol):
    """What the console, the policy service and operator accounts need from a back end."""

    # groups and per-device policy
    def set_device_group(self, device_id: DeviceId, group: str | None) -> bool: ...

    def device_groups(self) -> dict[str, str]:
        """24-hex device id -> group, for every device that has a group."""
        ...

    def set_device_policy(self, device_id: DeviceId, policy: str) -> bool: ...

    # policies
    def list_policies(self) -> dict[str, str]:
        """name -> JSON spec of every operator-defined policy."""
        ...

    def put_policy(self, name: str, spec: str, now_ms: int) -> None: ...

    def delete_policy(self, name: str) -> bool: ...

    def policy_attachments(self) -> dict[tuple[str, str], str]:
        """(kind 'network'|'group', target) -> policy name."""
        ...

    def attach_policy(self, kind: str, target: str, policy: str | None) -> None:
        """Attach (or with None detach) a policy to the network (target '') or a group."""
        ...

    # operators
    def add_operator(self, row: OperatorRow) -> bool:
        """False if the name is taken."""
        ...

    def get_operator(self, name: str) -> OperatorRow | None: ...

    def list_operators(self) -> list[OperatorRow]: ...

    def update_operator(self, name: str, *, password_hash: str | None = None,
                        disabled: bool | None = None) -> bool: ...

    # sessions
    def add_session(self, row: SessionRow) -> None: ...

    def get_session(self, id_sha256: str) -> SessionRow | None: ...

    def delete_session(self, id_sha256: str) -> None: ...

    def delete_sessions_of(self, operator: str) -> int: ...

    def purge_sessions(self, now_ms: int) -> int: ...

    # API tokens
    def add_token(self, row: ApiTokenRow) -> None: ...

    def get_token(self, token_id: str) -> ApiTokenRow | None: ...

    def list_tokens(self) -> list[ApiTokenRow]: ...

    def revoke_token(self, token_id: str, now_ms: int) -> bool: ...

    # scoped reads
    def events_for_devices(self, device_ids: Sequence[str], *, reason: str | None = None,
                           since_ms: int | None = None, limit: int = 100) -> list[AuditEvent]:
        """Like `events`, restricted to events that claim one of `device_ids` (24 hex)."""
        ...


# -- key lifecycle: epochs, E5 renewal, device public keys (migration 0002) -----------------------
# A separate protocol (like ConsoleStore) so that a back end without it still satisfies `Store`.


class EpochInfo(NamedTuple):
    """One key epoch of a device, without its secret. `expires_ms`: an epoch older than the
    current one is accepted until then (grace); None on an older epoch: no longer accepted."""

    epoch: int
    created_ms: int
    expires_ms: int | None


class PublicKeyRow(NamedTuple):
    """A device public key: purpose 'renewal' (alg = RenewalSuite) or 'signing' (COSE alg)."""

    purpose: str
    alg: int
    public: bytes
    added_ms: int


class KeyLifecycleStore(Protocol):
    """What sensorseal.lifecycle and the pipeline's epoch rules need (sensorseal.registry)."""

    def add_epoch(self, device_id: DeviceId, epoch: int, wrapped: bytes, created_ms: int, *,
                  renewal_state: bytes | None = None, grace_ms: int = 0) -> None:
        """Insert, or replace, the wrapped secret of an epoch ABOVE the device's current one
        (a rotation about to switch, or a pending renewal). With `renewal_state`, also upsert
        the device's renewal row (state, grace_ms) in the same transaction. ConfigError for an
        unknown or revoked device or an epoch not above the current one."""
        ...

    def switch_epoch(self, device_id: DeviceId, from_epoch: int, to_epoch: int,
                     old_expires_ms: int | None, *, renewal_state: bytes | None = None) -> bool:
        """Atomically: if the device is not revoked, its current epoch is `from_epoch` and
        `to_epoch` has a secret, make `to_epoch` current, set `from_epoch`'s expires_ms to
        `old_expires_ms` (an expiry already set earlier is never extended) and, if given,
        replace the renewal state. False (nothing changed) otherwise: the compare-and-swap
        that lets several workers confirm the same renewal."""
        ...

    def epoch_info(self, device_id: DeviceId, epoch: int) -> EpochInfo | None: ...

    def list_epochs(self, device_id: DeviceId) -> list[EpochInfo]:
        """Oldest first."""
        ...

    def get_renewal(self, device_id: DeviceId) -> tuple[bytes, int] | None:
        """(RenewalState CBOR, grace_ms) or None."""
        ...

    def put_renewal(self, device_id: DeviceId, state: bytes, grace_ms: int,
                    now_ms: int) -> None: ...

    def add_public_key(self, device_id: DeviceId, purpose: str, alg: int, public: bytes,
                       added_ms: int) -> bool:
        """False if this device already has this key for this purpose."""
        ...

    def public_keys(self, device_id: DeviceId, purpose: str) -> list[PublicKeyRow]:
        """Newest first."""
        ...

    def wrapped_secrets(self, *, after: tuple[DeviceId, int] | None = None,
                        limit: int = 500) -> list[tuple[DeviceId, int, bytes]]:
        """(device, epoch, wrapped) ordered by (device, epoch), strictly after `after`: keyset
        paging over every stored secret, for KEK rotation."""
        ...

    def replace_secret(self, device_id: DeviceId, epoch: int, old: bytes, new: bytes) -> bool:
        """Compare-and-swap one wrapped secret (False if it is no longer `old`)."""
        ...


# -- KEK rotation outside device_secrets --------------------------------------------------------
# Other features keep KEK-wrapped blobs in their own tables; `sensorseal kek rotate` must move
# them too, or they become unreadable once the old KEK is retired.


class WrappedKind(StrEnum):
    """A table (besides device_secrets) whose rows hold one blob wrapped under the KEK."""

    NETWORK = "network"  # network_keys.wrapped_key (E1 link key, one row per key epoch)
    GATEWAY = "gateway"  # gateway_secrets.wrapped_secret (gateway root secret, one per epoch)
    LEGACY = "legacy"    # legacy_credentials.wrapped (NULL for a hub without password: skipped)
    EVA = "eva"          # eva_keys.wrapped (EVA ICS API key)


# kind -> (table, key column, blob column, epoch expression): the same SQL in every back end.
# Network keys and gateway secrets have one row per (id, epoch) since migration 0008.
KEK_BLOB_COLUMNS: dict[WrappedKind, tuple[str, str, str, str]] = {
    WrappedKind.NETWORK: ("network_keys", "network_id", "wrapped_key", "epoch"),
    WrappedKind.GATEWAY: ("gateway_secrets", "gateway_id", "wrapped_secret", "epoch"),
    WrappedKind.LEGACY: ("legacy_credentials", "device_id", "wrapped", "0"),
    WrappedKind.EVA: ("eva_keys", "key_id", "wrapped", "0"),
}


class WrappedBlob(NamedTuple):
    """One KEK-wrapped blob outside device_secrets. `row` is the row's primary key (an id's
    bytes, or the EVA key id); `epoch` is the row's epoch column (network keys, gateway
    secrets) or 0. The caller knows which keystore AAD (id, slot) each kind was wrapped with."""

    row: bytes | str
    epoch: int
    wrapped: bytes


class KekBlobStore(Protocol):
    """Keyset paging and compare-and-swap over the blobs of `WrappedKind` tables."""

    def kek_blobs(self, kind: WrappedKind, *, after: tuple[bytes | str, int] | None = None,
                  limit: int = 500) -> list[WrappedBlob]:
        """Non-NULL blobs of `kind`, ordered by (row key, epoch), strictly after `after`
        (the (row, epoch) of the previous page's last blob)."""
        ...

    def replace_kek_blob(self, kind: WrappedKind, row: bytes | str, epoch: int, old: bytes,
                         new: bytes) -> bool:
        """Compare-and-swap one blob (False if the row's blob or epoch is no longer that)."""
        ...


# -- compat: legacy devices (Valarm, Yoctopuce, Waspmote; migration 0005) -------------------------
# A separate protocol (like ConsoleStore) so that a back end without it still satisfies `Store`.


@dataclass(frozen=True, slots=True)
class LegacyCredential:
    """A legacy device's credential row. `wrapped` is under the KEK (None: a Yoctopuce hub with
    no password); `state` is active | migrating | migrated (legacy key disabled)."""

    device_id: DeviceId
    kind: str  # valarm | yoctopuce | waspmote
    external_id: str  # how the format names the device: 24-hex id, hub serial, node serial
    wrapped: bytes | None = field(repr=False)
    options: str  # JSON, not secret (e.g. {"aes_bits": 128})
    state: str
    target_policy: str | None
    created_ms: int


class CompatStore(Protocol):
    """What sensorseal.server.compat_ingest and the registry's legacy calls need."""

    def add_legacy_device(self, record: DeviceRecord, credential: LegacyCredential) -> None:
        """Insert the device row (no native secret) and its credential in one transaction.
        DeviceExists if the id or (kind, external_id) is taken."""
        ...

    def get_legacy(self, kind: str, external_id: str) -> LegacyCredential | None: ...

    def get_legacy_of(self, device_id: DeviceId) -> LegacyCredential | None: ...

    def legacy_in_state(self, state: str, *, limit: int = 1000) -> list[LegacyCredential]: ...

    def start_legacy_migration(self, device_id: DeviceId, epoch: int, wrapped_secret: bytes,
                               target_policy: str, now_ms: int) -> bool:
        """Atomically, if the credential is 'active' and the device not revoked: store the
        native secret of `epoch`, make `epoch` the device's current one, set the credential to
        'migrating' with `target_policy`. False (nothing changed) otherwise."""
        ...

    def finish_legacy_migration(self, device_id: DeviceId, event: AuditEvent) -> bool:
        """Atomically, if the credential is 'migrating': switch the device to its target
        policy, mark the credential 'migrated' (legacy key disabled), add `event`."""
        ...

    def claim_digest(self, device_id: DeviceId, digest: bytes, now_ms: int,
                     expires_ms: int) -> bool:
        """Remember `digest` until `expires_ms`; False if it is already remembered (a replay).
        Expired digests are forgotten first."""
        ...

    def release_digest(self, device_id: DeviceId, digest: bytes) -> None:
        """Forget a claim whose message could not be stored (so the sender may retry)."""
        ...

    def hub_uptime(self, device_id: DeviceId) -> tuple[int, int] | None:
        """(last accepted module.upTime, when it was accepted) of a Yoctopuce hub."""
        ...

    def set_hub_uptime(self, device_id: DeviceId, uptime_ms: int, seen_ms: int) -> None: ...

    def queue_command(self, device_id: DeviceId, command: str, now_ms: int) -> int:
        """Queue a command for the device's next accepted callback; returns its id."""
        ...

    def take_commands(self, device_id: DeviceId, now_ms: int, limit: int) -> list[str]:
        """The oldest pending commands (at most `limit`), marked delivered in one transaction."""
        ...


# -- networks and gateways (migration 0004; see sensorseal.gateway) -------------------------------
# A separate protocol (like ConsoleStore) so that a back end without gateways still is a `Store`.


class NetworkRecord(NamedTuple):
    """A sensor network: E1 link algorithm and the layers its devices must use (e.g. e1+e3+e4)."""

    network_id: bytes  # 12 bytes
    name: str
    alg: int  # COSE id: 1 A128GCM, 10 AES-CCM-16-64-128, 30 AES-CCM-16-128-128
    required_layers: str  # canonical text of sensorseal.core.layers.format_layers
    created_ms: int


class GatewayRecord(NamedTuple):
    """A gateway: its own identity and key epoch (it seals upstream batches like a device)."""

    gateway_id: DeviceId
    name: str
    status: DeviceStatus
    epoch: int
    created_ms: int


class Assignment(NamedTuple):
    """Which network a device belongs to and how it protects frames behind a gateway."""

    device_id: DeviceId
    network_id: bytes
    mode: str  # e3 | e2 | e2+e3
    assigned_ms: int


class KeyEpochRow(NamedTuple):
    """One key epoch of a network (E1 key) or gateway (root secret), wrapped under the KEK
    bound to (id, epoch). `not_after_ms`: accepted while now < it (the grace period after a
    rotation); None: no end (the current epoch)."""

    epoch: int
    wrapped: bytes
    created_ms: int
    not_after_ms: int | None


class GatewayStore(Protocol):
    """Networks (E1 keys wrapped under the KEK, per epoch), gateways (secrets wrapped, per
    epoch), assignments. Migrations 0004 and 0008."""

    def add_network(self, record: NetworkRecord, wrapped_key: bytes) -> None:
        """Insert the network and its epoch-0 key in one transaction."""
        ...

    def get_network(self, network_id: bytes) -> NetworkRecord | None: ...

    def list_networks(self) -> list[NetworkRecord]: ...

    def network_key(self, network_id: bytes) -> bytes | None:
        """The wrapped key of the network's newest epoch, or None."""
        ...

    def network_keys(self, network_id: bytes) -> list[KeyEpochRow]:
        """Every stored key epoch of the network, oldest first (empty: no such network)."""
        ...

    def rotate_network_key(self, network_id: bytes, epoch: int, wrapped_key: bytes,
                           created_ms: int, old_not_after_ms: int) -> bool:
        """Add `epoch` (it must be newest + 1) and end every older epoch at
        `old_not_after_ms` (an end set earlier is never extended), in one transaction.
        False if the network is unknown or `epoch` is not newest + 1 (a concurrent rotation)."""
        ...

    def add_gateway(self, record: GatewayRecord, wrapped_secret: bytes,
                    networks: Sequence[bytes]) -> None:
        """Insert the gateway, its secret of `record.epoch` and the networks it serves in one
        transaction."""
        ...

    def get_gateway(self, gateway_id: DeviceId) -> GatewayRecord | None: ...

    def gateway_secret(self, gateway_id: DeviceId, epoch: int) -> bytes | None:
        """The wrapped secret of the gateway's epoch (expired or not), or None."""
        ...

    def gateway_epoch(self, gateway_id: DeviceId, epoch: int) -> KeyEpochRow | None:
        """One epoch of the gateway's secrets with its grace end, or None."""
        ...

    def rotate_gateway(self, gateway_id: DeviceId, from_epoch: int, wrapped_secret: bytes,
                       created_ms: int, old_not_after_ms: int) -> bool:
        """Compare-and-swap the gateway from `from_epoch` to `from_epoch + 1` with the new
        wrapped secret, ending every older epoch at `old_not_after_ms` (never extending an
        earlier end), in one transaction. False if the gateway is not at `from_epoch` or is
        revoked."""
        ...

    def gateway_networks(self, gateway_id: DeviceId) -> list[bytes]: ...

    def assign_device(self, assignment: Assignment) -> None:
        """Put a device in a network (replacing an earlier assignment)."""
        ...

    def device_assignment(self, device_id: DeviceId) -> Assignment | None: ...

    def network_assignments(self, network_id: bytes) -> list[Assignment]: ...


# -- drop-in endpoints: Cloud IoT Core devices and EVA ICS keys (migration 0007) ------------------
# A separate protocol (like ConsoleStore) so that a back end without it still satisfies `Store`.


class IotCoreDevice(NamedTuple):
    """A sensorseal device bound to its Cloud IoT Core name. `counter_field`: the integer JSON
    field every event must carry (replay window), None for server-assigned sequence numbers."""

    device_id: DeviceId
    path: str  # projects/{p}/locations/{r}/registries/{reg}/devices/{d}
    short_name: str  # {d}: unique, since broker topics name only this part
    counter_field: str | None
    created_ms: int


class IotCoreKeyRow(NamedTuple):
    """A registered public key (PEM public key or certificate, as uploaded); public material."""

    key_id: int
    device_id: DeviceId
    alg: str  # RS256 | ES256
    pem: str
    expires_ms: int | None
    added_ms: int


class IotCoreConfigRow(NamedTuple):
    """The latest config of a device; `change_id` orders every config write of the store."""

    device_id: DeviceId
    version: int
    data: bytes
    change_id: int
    updated_ms: int


class IotCoreStore(Protocol):
    """What sensorseal.server.iotcore_service / eva_service and the registry's calls need."""

    def add_iotcore_device(self, record: DeviceRecord, binding: IotCoreDevice) -> None:
        """Insert the device row (no native secret) and its binding in one transaction.
        DeviceExists if the id, the path or the short name is taken."""
        ...

    def iotcore_device(self, path: str) -> IotCoreDevice | None: ...

    def iotcore_device_of(self, device_id: DeviceId) -> IotCoreDevice | None: ...

    def add_iotcore_key(self, device_id: DeviceId, alg: str, pem: str, expires_ms: int | None,
                        added_ms: int) -> int | None:
        """Store a key; its id, or None if the device already has this exact PEM."""
        ...

    def iotcore_keys(self, device_id: DeviceId) -> list[IotCoreKeyRow]:
        """Oldest first."""
        ...

    def remove_iotcore_key(self, device_id: DeviceId, key_id: int) -> bool: ...

    def put_iotcore_config(self, device_id: DeviceId, data: bytes, now_ms: int) -> int:
        """Store a new config (version = previous + 1, a fresh change id); returns the version."""
        ...

    def iotcore_config(self, device_id: DeviceId) -> IotCoreConfigRow | None: ...

    def iotcore_configs_after(self, change_id: int, *,
                              limit: int = 500) -> list[IotCoreConfigRow]:
        """Configs written after `change_id`, in change order."""
        ...

    def add_eva_key(self, key_id: str, wrapped: bytes, now_ms: int) -> bool:
        """False if the key id exists."""
        ...

    def eva_key(self, key_id: str) -> bytes | None:
        """The wrapped API key, or None."""
        ...

    def list_eva_keys(self) -> list[tuple[str, int]]:
        """(key id, created_ms), by key id."""
        ...

    def remove_eva_key(self, key_id: str) -> bool: ...


# -- signed updates: images, manifests, rollouts (migration 0006; see sensorseal.updates) --------
# A separate protocol (like ConsoleStore) so that a back end without it still satisfies `Store`.


class UpdateManifestRow(NamedTuple):
    """A manifest the server created (`payload`, canonical CBOR) and, once imported, its signed
    form and reference (`sensorseal.updates.manifest.manifest_ref`)."""

    seq: int
    device_class: str
    image_version: int
    image_sha256: bytes
    payload: bytes
    signed: bytes | None
    manifest_ref: str | None
    created_ms: int


class UpdateRolloutRow(NamedTuple):
    rollout_id: str
    manifest_seq: int
    manifest_ref: str
    image_version: int
    device_class: str
    target: str  # for people: "devices", "group lab", "group lab 10%"
    created_ms: int


class UpdateDeviceRow(NamedTuple):
    """Where one device of a rollout is (sensorseal.updates.rollout.DeviceRecord, flattened)."""

    device_id: DeviceId
    state: str  # pending | offered | downloading | verified | installed | failed
    reason: str | None
    offset: int
    attempts: int
    updated_ms: int
    revision: int


class UpdateStore(Protocol):
    """What sensorseal.updates.server needs. Every method is one statement or one transaction."""

    def put_image(self, sha256: bytes, data: bytes, created_ms: int) -> bool:
        """Store an image under its SHA-256 (the caller computed it); False if it was there."""
        ...

    def get_image(self, sha256: bytes) -> bytes | None: ...

    def add_manifest(self, row: UpdateManifestRow) -> None:
        """ConfigError if the sequence number is taken or the image is unknown."""
        ...

    def get_manifest(self, seq: int) -> UpdateManifestRow | None: ...

    def max_manifest_seq(self) -> int:
        """The highest manifest sequence number stored, 0 if none."""
        ...

    def set_signed_manifest(self, seq: int, signed: bytes, manifest_ref: str) -> bool:
        """Attach the signed form; False if there is no such manifest."""
        ...

    def add_rollout(self, row: UpdateRolloutRow, devices: Sequence[UpdateDeviceRow]) -> None:
        """Insert the rollout and its devices in one transaction; ConfigError if the id is
        taken or a device is unknown."""
        ...

    def get_rollout(self, rollout_id: str) -> UpdateRolloutRow | None: ...

    def list_rollouts(self, *, limit: int = 100) -> list[UpdateRolloutRow]:
        """Newest first."""
        ...

    def rollout_device(self, rollout_id: str, device_id: DeviceId) -> UpdateDeviceRow | None: ...

    def rollout_devices(self, rollout_id: str) -> list[UpdateDeviceRow]:
        """By device id."""
        ...

    def replace_rollout_device(self, rollout_id: str, row: UpdateDeviceRow, *,
                               expect_revision: int) -> bool:
        """Compare-and-set: write `row` only if the stored revision is `expect_revision`."""
        ...

    def open_rollouts_of(self, device_id: DeviceId) -> list[str]:
        """Rollouts where the device is neither installed nor failed, newest first."""
        ...
