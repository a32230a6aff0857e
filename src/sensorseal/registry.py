"""The device registry service: the one place where devices are created and change state.

Every adapter (CLI, HTTP console, demo) goes through `Registry`, so validation, secret wrapping
and the audit trail are the same whoever asks. The store keeps rows; the keystore keeps secrets
wrapped; this layer decides what is allowed:

    active <-> suspended      (suspend / resume)
    active | suspended -> revoked   (final: the id is never reused, its rows never deleted)

Each change is recorded as an audit event whose `source` is the acting operator (`actor`) and
whose `transport` names the adapter ("cli", "http", ...). Clock and randomness are injected so
tests can pin them.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sensorseal.compat import gcp_iot, valarm, waspmote, yoctopuce
from sensorseal.core.attest import ALG_EDDSA, ALG_ES256, PublicKey
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError, Rejected
from sensorseal.core.ids import DeviceId
from sensorseal.core.keys import ROOT_SECRET_LEN
from sensorseal.core.policy import PRESETS
from sensorseal.core.renewal import DeviceKemPublicKey, RenewalState, RenewalSuite
from sensorseal.keystore.base import Keystore
from sensorseal.store.base import (
    AuditEvent,
    CompatStore,
    DeviceExists,
    DeviceRecord,
    DeviceStatus,
    EpochInfo,
    IotCoreDevice,
    IotCoreKeyRow,
    IotCoreStore,
    KeyLifecycleStore,
    LegacyCredential,
    Store,
)

__all__ = [
    "DEFAULT_GRACE_MS",
    "EVA_KEY_SLOT",
    "FIRST_EPOCH",
    "IOTCORE_MAX_CONFIG",
    "LEGACY_EPOCH",
    "LEGACY_KEY_SLOT",
    "MAX_NAME_LEN",
    "LegacyDevice",
    "Registry",
    "eva_key_slot",
    "signing_key_bytes",
    "signing_key_from_bytes",
]

FIRST_EPOCH = 1
DEFAULT_GRACE_MS = 24 * 3600 * 1000  # an old epoch stays valid this long after a rotation
MAX_NAME_LEN = 64
_ID_ATTEMPTS = 3  # a 64-bit random id collides essentially never; retry a little, then fail
LEGACY_EPOCH = 0  # a legacy device's epoch (and its telemetry's) until it gets native keys
LEGACY_KEY_SLOT = 0xFFFF_FFFF  # keystore AAD slot of legacy secrets: never a native epoch
_LEGACY_LABEL = b"sensorseal-legacy/1\0"
_YOCTO_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")
_WASP_HEX = re.compile(r"[0-9A-Fa-f]{16}")
_WASP_DEC = re.compile(r"0|[1-9][0-9]{0,9}")
_CREDENTIAL_HINT = re.compile(r"(?i)pass|credential|secret|key")
EVA_KEY_SLOT = 0xFFFF_FFFE  # keystore AAD slot of EVA API keys (AAD device = hash of the key id)
_EVA_LABEL = b"sensorseal-eva-key/1\0"
_EVA_KEY_ID = re.compile(r"[A-Za-z0-9_.@:+=-]{1,64}")  # what an EVA frame can carry
_HEX24 = re.compile(r"[0-9a-fA-F]{24}")
_COUNTER_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
IOTCORE_MAX_CONFIG = 64 * 1024  # Cloud IoT Core's limit


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LEN:
        raise ConfigError(f"a device name is 1 to {MAX_NAME_LEN} characters")
    if not name.isprintable():
        raise ConfigError("a device name may only hold printable characters")
    return name


def _check_legacy_secret(secret: str, what: str, min_len: int) -> None:
    if (not isinstance(secret, str) or not min_len <= len(secret) <= 128
            or not all(0x21 <= ord(c) <= 0x7E for c in secret)):
        raise ConfigError(f"a {what} is {min_len}-128 printable ASCII characters, no spaces")


def _waspmote_serial(text: str) -> str:
    if _WASP_HEX.fullmatch(text):
        return text.upper()
    if _WASP_DEC.fullmatch(text) and int(text) < 2**32:
        return text
    raise ConfigError("a Waspmote serial is 16 hex digits (v15) or a 32-bit decimal (v12)")


@dataclass(frozen=True, slots=True)
class LegacyDevice:
    """A registered legacy device. `generated_secret` is set only when the registry drew the
    secret (a Valarm API key): the one time it is shown."""

    device_id: DeviceId
    kind: str
    external_id: str
    generated_secret: str | None = field(repr=False, default=None)


def _iot_path(ref: str) -> gcp_iot.DevicePath:
    try:
        return gcp_iot.DevicePath.parse(ref)
    except Rejected:
        raise ConfigError("an IoT Core device is projects/{project}/locations/{region}/"
                          "registries/{registry}/devices/{device}, or its 24-hex id") from None


def _check_policy(policy: str) -> str:
    if policy not in PRESETS:
        raise ConfigError(f"unknown policy {policy!r:.40} (known: {', '.join(sorted(PRESETS))})")
    return policy


def eva_key_slot(key_id: str) -> DeviceId:
    """The keystore AAD id an EVA API key is wrapped under (a hash of its key id): KEK
    rotation needs it to unwrap and re-wrap the key with the same binding."""
    if not isinstance(key_id, str) or not _EVA_KEY_ID.fullmatch(key_id):
        raise ConfigError("an EVA key id is 1-64 of [A-Za-z0-9_.@:+=-]")
    return DeviceId(hashlib.sha256(_EVA_LABEL + key_id.encode("ascii")).digest()[:12])


class Registry:
    """Devices: provisioning, naming, suspension, revocation, and their root secrets."""

    def __init__(self, store: Store, keystore: Keystore, *,
                 clock_ms: Callable[[], int] = _wall_clock_ms,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self._store = store
        self._keystore = keystore
        self._clock_ms = clock_ms
        self._random = random

    @property
    def keystore(self) -> Keystore:
        """The keystore (for sensorseal.gateway, which wraps network and gateway keys)."""
        return self._keystore

    # -- reads -----------------------------------------------------------------------------

    def find(self, device_id: DeviceId) -> DeviceRecord | None:
        """The device, or None (for callers where "unknown" is an answer, like ingest)."""
        return self._store.get_device(device_id)

    def get(self, device_id: DeviceId) -> DeviceRecord:
        """The device; ConfigError if there is none."""
        record = self._store.get_device(device_id)
        if record is None:
            raise ConfigError(f"no device {device_id}")
        return record

    def list(self, *, limit: int = 1000, offset: int = 0) -> list[DeviceRecord]:
        return self._store.list_devices(limit=limit, offset=offset)

    def root_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        """The unwrapped root secret of (device, epoch), or None if that epoch has none.
        ConfigError if the stored blob does not unwrap (wrong KEK, tampering)."""
        blob = self._store.get_secret(device_id, epoch)
        return None if blob is None else self._keystore.unwrap(device_id, epoch, blob)

    # -- changes ---------------------------------------------------------------------------

    def add_device(self, name: str, policy: str = "standard", *, actor: str = "cli",
                   transport: str = "cli") -> DeviceCredential:
        """Provision a device: a fresh id and root secret, stored wrapped. The credential
        returned is the only time the secret leaves the registry in clear: show it once."""
        _check_name(name)
        _check_policy(policy)
        secret = self._random(ROOT_SECRET_LEN)
        if len(secret) != ROOT_SECRET_LEN:
            raise ConfigError("the random source returned too few bytes")
        for _ in range(_ID_ATTEMPTS):
            now_ms = self._clock_ms()
            device_id = DeviceId.generate(now_s=now_ms // 1000, random12=self._random(8))
            record = DeviceRecord(device_id, name, DeviceStatus.ACTIVE, FIRST_EPOCH, policy,
                                  now_ms)
            wrapped = self._keystore.wrap(device_id, FIRST_EPOCH, secret)
            try:
                self._store.add_device(record, wrapped)
            except DeviceExists:
                continue
            self._audit("device_added", device_id, actor, transport,
                        f"name={name!r} policy={policy} epoch={FIRST_EPOCH}")
            return DeviceCredential(device_id, FIRST_EPOCH, secret)
        raise ConfigError("could not allocate a fresh device id; is the random source broken?")

    def rename(self, device_id: DeviceId, name: str, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        _check_name(name)
        old = self.get(device_id)
        if not self._store.rename_device(device_id, name):
            raise ConfigError(f"no device {device_id}")
        self._audit("device_renamed", device_id, actor, transport,
                    f"name={old.name!r} -> {name!r}")
        return self.get(device_id)

    def suspend(self, device_id: DeviceId, *, actor: str = "cli",
                transport: str = "cli") -> DeviceRecord:
        """Refuse the device's messages until `resume`."""
        return self._transition(device_id, DeviceStatus.SUSPENDED, "device_suspended",
                                frozenset({DeviceStatus.ACTIVE}), actor, transport)

    def resume(self, device_id: DeviceId, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        return self._transition(device_id, DeviceStatus.ACTIVE, "device_resumed",
                                frozenset({DeviceStatus.SUSPENDED}), actor, transport)

    def revoke(self, device_id: DeviceId, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        """Refuse the device forever. Its id is never reused; its telemetry is kept."""
        return self._transition(device_id, DeviceStatus.REVOKED, "device_revoked",
                                frozenset({DeviceStatus.ACTIVE, DeviceStatus.SUSPENDED}),
                                actor, transport)

    def _transition(self, device_id: DeviceId, target: DeviceStatus, reason: str,
                    allowed_from: frozenset[DeviceStatus], actor: str,
                    transport: str) -> DeviceRecord:
        current = self.get(device_id).status
        if current not in allowed_from:
            if current is DeviceStatus.REVOKED:
                raise ConfigError(f"device {device_id} is revoked; revocation is final")
            raise ConfigError(f"device {device_id} is {current.value}; cannot make it "
                              f"{target.value} ({reason.removeprefix('device_')} needs "
                              f"{' or '.join(sorted(s.value for s in allowed_from))})")
        if not self._store.set_status(device_id, target):
            raise ConfigError(f"no device {device_id}")
        self._audit(reason, device_id, actor, transport, f"status={current.value} -> {target}")
        return self.get(device_id)

    # -- key epochs (rotation, E5 renewal confirmation) and device public keys -----------------
    # The rules the pipeline applies: the current epoch is accepted; an older one until its
    # `expires_ms` (grace); epoch current + 1 while it has a secret (a pending E5 renewal, which
    # its first verified message confirms through `confirm_epoch`). See docs/keys.md.

    def _keys(self) -> KeyLifecycleStore:
        if not hasattr(self._store, "switch_epoch"):
            raise ConfigError("this store back end has no key lifecycle support")
        return cast(KeyLifecycleStore, self._store)

    def epoch_secret(self, device_id: DeviceId, epoch: int) -> tuple[bytes, EpochInfo] | None:
        """The unwrapped root secret of (device, epoch) with its epoch facts, or None."""
        info = self._keys().epoch_info(device_id, epoch)
        secret = None if info is None else self.root_secret(device_id, epoch)
        return None if info is None or secret is None else (secret, info)

    def rotate(self, device_id: DeviceId, *, grace_ms: int = DEFAULT_GRACE_MS,
               actor: str = "cli", transport: str = "cli") -> DeviceCredential:
        """Start epoch N+1 with a fresh random root secret (returned once, like `add_device`).
        Epoch N stays accepted for `grace_ms` (messages in flight, buffered at gateways); a
        pending renewal is cancelled (its N+1 secret is replaced)."""
        if grace_ms < 0:
            raise ConfigError("the grace period cannot be negative")
        record = self.get(device_id)
        if record.status is DeviceStatus.REVOKED:
            raise ConfigError(f"device {device_id} is revoked; revocation is final")
        keys = self._keys()
        new_epoch = record.epoch + 1
        secret = self._fresh_secret()
        now_ms = self._clock_ms()
        keys.add_epoch(device_id, new_epoch, self._keystore.wrap(device_id, new_epoch, secret),
                       now_ms, renewal_state=RenewalState(device_id, new_epoch).to_cbor(),
                       grace_ms=0)
        if not keys.switch_epoch(device_id, record.epoch, new_epoch, now_ms + grace_ms):
            raise ConfigError(f"device {device_id} changed while rotating; try again")
        self._audit("key_rotated", device_id, actor, transport,
                    f"epoch {record.epoch} -> {new_epoch}, grace {grace_ms // 1000}s")
        return DeviceCredential(device_id, new_epoch, secret)

    def confirm_epoch(self, device_id: DeviceId, epoch: int) -> bool:
        """A message under pending epoch `epoch` verified (and was stored): the proof of
        possession. Make it current; the old epoch keeps the renewal's grace. Idempotent and
        safe from several workers (compare-and-swap); False if there was nothing to confirm."""
        keys = self._keys()
        found = keys.get_renewal(device_id)
        if found is None:
            return False
        blob, grace_ms = found
        state = RenewalState.from_cbor(blob)
        if state.pending_epoch != epoch:
            return False
        confirmed = state.verified(epoch)
        now_ms = self._clock_ms()
        if not keys.switch_epoch(device_id, epoch - 1, epoch, now_ms + grace_ms,
                                 renewal_state=confirmed.to_cbor()):
            return False
        self._audit("key_renewal_confirmed", device_id, "pipeline", "ingest",
                    f"epoch {epoch - 1} -> {epoch} (proof of possession)")
        return True

    def _fresh_secret(self) -> bytes:
        secret = self._random(ROOT_SECRET_LEN)
        if len(secret) != ROOT_SECRET_LEN:
            raise ConfigError("the random source returned too few bytes")
        return secret

    def register_renewal_key(self, device_id: DeviceId, key: DeviceKemPublicKey, *,
                             actor: str = "cli", transport: str = "cli") -> None:
        """Record the device's KEM public key (the newest one is used for renewals)."""
        self.get(device_id)
        if self._keys().add_public_key(device_id, "renewal", int(key.suite), key.raw,
                                       self._clock_ms()):
            self._audit("renewal_key_registered", device_id, actor, transport,
                        f"suite {key.suite.name}")

    def renewal_key(self, device_id: DeviceId) -> DeviceKemPublicKey | None:
        rows = self._keys().public_keys(device_id, "renewal")
        return None if not rows else DeviceKemPublicKey(RenewalSuite(rows[0].alg), rows[0].public)

    def register_signing_key(self, device_id: DeviceId, key: PublicKey, *, actor: str = "cli",
                             transport: str = "cli") -> None:
        """Record a device signing key (Ed25519 or P-256). Old keys are kept: archived readings
        stay verifiable."""
        self.get(device_id)
        alg, raw = signing_key_bytes(key)
        if self._keys().add_public_key(device_id, "signing", alg, raw, self._clock_ms()):
            self._audit("signing_key_registered", device_id, actor, transport,
                        f"alg {'EdDSA' if alg == ALG_EDDSA else 'ES256'}")

    def signing_keys(self, device_id: DeviceId) -> builtins.list[PublicKey]:
        """Every signing key the device ever registered, newest first."""
        return [signing_key_from_bytes(r.alg, r.public)
                for r in self._keys().public_keys(device_id, "signing")]

    # -- legacy devices (sensorseal.compat, docs/compat.md) -----------------------------------
    # A legacy device has epoch LEGACY_EPOCH and no native secret until `start_migration`; its
    # legacy secret (Valarm API key, hub password, Waspmote password) is wrapped under the KEK
    # in the slot LEGACY_KEY_SLOT, labelled with its kind, so it never unwraps as a root secret.

    def _compat(self) -> CompatStore:
        if not hasattr(self._store, "get_legacy"):
            raise ConfigError("this store back end has no legacy device support")
        return cast(CompatStore, self._store)

    def add_legacy_device(self, name: str, kind: str, *, external_id: str | None = None,
                          secret: str | None = None, aes_bits: int = 128,
                          policy: str = "legacy", actor: str = "cli",
                          transport: str = "cli") -> LegacyDevice:
        """Register a device that speaks a legacy format. Valarm: `external_id` is its existing
        24-hex id (else one is drawn) and `secret` its existing API key (else a 20-character
        one is drawn and returned once). Yoctopuce: the hub serial and its callback password
        (None: a hub without one, accepted only under `legacy-unsigned`). Waspmote: the node
        serial and its AES password (`aes_bits` 128/192/256)."""
        _check_name(name)
        _check_policy(policy)
        compat = self._compat()
        now_ms = self._clock_ms()
        options = "{}"
        generated = False
        if kind == "valarm":
            device_id = (DeviceId.parse(external_id) if external_id is not None else
                         DeviceId.generate(now_s=now_ms // 1000, random12=self._random(8)))
            external_id = device_id.hex()
            if secret is None:
                secret, generated = valarm.generate_api_key(self._random), True
            _check_legacy_secret(secret, "API key", 8)
        elif kind in ("yoctopuce", "waspmote"):
            if external_id is None:
                raise ConfigError(f"a {kind} device needs its serial (external id)")
            device_id = DeviceId.generate(now_s=now_ms // 1000, random12=self._random(8))
            if kind == "yoctopuce":
                if not _YOCTO_SERIAL.fullmatch(external_id):
                    raise ConfigError("a Yoctopuce hub serial looks like YHUBETH1-12345")
                if secret is not None:
                    _check_legacy_secret(secret, "hub password", 1)
            else:
                external_id = _waspmote_serial(external_id)
                if secret is not None:  # None: a node that sends plain frames only
                    waspmote.WaspmoteKey(secret, aes_bits)  # validates length, ASCII, key size
                options = f'{{"aes_bits": {int(aes_bits)}}}'
        else:
            raise ConfigError(f"unknown legacy kind {kind!r:.20} (valarm, yoctopuce, waspmote)")
        record = DeviceRecord(device_id, name, DeviceStatus.ACTIVE, LEGACY_EPOCH, policy, now_ms)
        wrapped = None if secret is None else self._wrap_legacy(device_id, kind, secret)
        cred = LegacyCredential(device_id, kind, external_id, wrapped, options, "active", None,
                                now_ms)
        try:
            compat.add_legacy_device(record, cred)
        except DeviceExists:
            raise ConfigError(f"a device with {kind} id {external_id} is already "
                              "registered") from None
        self._audit("legacy_device_added", device_id, actor, transport,
                    f"name={name!r} kind={kind} id={external_id} policy={policy}"
                    f" secret={'generated' if generated else 'given' if secret else 'none'}")
        return LegacyDevice(device_id, kind, external_id, secret if generated else None)

    def legacy_of(self, device_id: DeviceId) -> LegacyCredential | None:
        """The device's legacy credential row (state, kind; the secret stays wrapped)."""
        return self._compat().get_legacy_of(device_id)

    def _wrap_legacy(self, device_id: DeviceId, kind: str, secret: str) -> bytes:
        label = _LEGACY_LABEL + kind.encode() + b"\0"
        return self._keystore.wrap(device_id, LEGACY_KEY_SLOT, label + secret.encode("utf-8"))

    def legacy_secret(self, cred: LegacyCredential) -> str | None:
        """The unwrapped legacy secret of `cred` (None for a hub without a password).
        ConfigError if the blob does not unwrap or is labelled for another kind."""
        if cred.wrapped is None:
            return None
        plain = self._keystore.unwrap(cred.device_id, LEGACY_KEY_SLOT, cred.wrapped)
        label = _LEGACY_LABEL + cred.kind.encode() + b"\0"
        if not plain.startswith(label):
            raise ConfigError(f"legacy secret of device {cred.device_id} has the wrong label")
        return plain[len(label):].decode("utf-8")

    def start_migration(self, device_id: DeviceId, *, target_policy: str = "standard",
                        actor: str = "cli", transport: str = "cli") -> DeviceCredential:
        """Issue native keys to a legacy device (returned once, like `add_device`). Its legacy
        format stays accepted until its first native message is stored; then
        `finish_migration_if_used` switches it to `target_policy` and disables the legacy key."""
        _check_policy(target_policy)
        if target_policy.startswith("legacy"):
            raise ConfigError("migrate to a native policy (lax, standard, stringent ...)")
        cred = self._compat().get_legacy_of(device_id)
        if cred is None:
            raise ConfigError(f"device {device_id} is not a legacy device")
        if cred.state != "active":
            raise ConfigError(f"device {device_id} is already {cred.state}")
        record = self.get(device_id)
        epoch = max(FIRST_EPOCH, record.epoch + 1)
        secret = self._random(ROOT_SECRET_LEN)
        if len(secret) != ROOT_SECRET_LEN:
            raise ConfigError("the random source returned too few bytes")
        wrapped = self._keystore.wrap(device_id, epoch, secret)
        if not self._compat().start_legacy_migration(device_id, epoch, wrapped, target_policy,
                                                     self._clock_ms()):
            raise ConfigError(f"device {device_id} changed or is revoked; nothing issued")
        self._audit("legacy_migration_started", device_id, actor, transport,
                    f"kind={cred.kind} native epoch {epoch} issued; target policy "
                    f"{target_policy} once the device uses it")
        return DeviceCredential(device_id, epoch, secret)

    def finish_migration_if_used(self, device_id: DeviceId) -> bool:
        """If a migrating device has had a native message stored: switch its policy and disable
        its legacy key (audited). Safe from several workers; False if nothing changed."""
        compat = self._compat()
        cred = compat.get_legacy_of(device_id)
        if cred is None or cred.state != "migrating":
            return False
        record = self.get(device_id)
        if self._store.max_seq(device_id, record.epoch) is None:
            return False
        event = AuditEvent(self._clock_ms(), "legacy_migrated", "ingest", "pipeline",
                           str(device_id), f"policy {record.policy} -> {cred.target_policy}; "
                           f"{cred.kind} key disabled after the first native message")
        return compat.finish_legacy_migration(device_id, event)

    def queue_legacy_command(self, device_id: DeviceId, url: str, *, actor: str = "cli",
                             transport: str = "cli") -> int:
        """Queue a hub command (a path on the hub, sent as `@YoctoAPI:GET <url>` in the reply
        to its next accepted callback). The reply travels in clear: anything that looks like a
        credential is refused."""
        cred = self._compat().get_legacy_of(device_id)
        if cred is None or cred.kind != "yoctopuce":
            raise ConfigError(f"device {device_id} is not a Yoctopuce hub")
        if cred.state == "migrated":
            raise ConfigError(f"device {device_id} has migrated; its hub channel is closed")
        yoctopuce.render_commands([url])  # validates (ConfigError)
        if _CREDENTIAL_HINT.search(url):
            raise ConfigError("hub commands travel in clear: no passwords or keys in them")
        command_id = self._compat().queue_command(device_id, url, self._clock_ms())
        self._audit("yocto_command_queued", device_id, actor, transport,
                    f"#{command_id} {url[:200]}")
        return command_id

    # -- drop-in endpoints: Cloud IoT Core devices and EVA ICS API keys (docs/compat.md) -------
    # An IoT Core device is a device row (epoch LEGACY_EPOCH, no native secret) bound to its
    # full Cloud IoT Core name, with up to 3 registered public keys (public material, stored as
    # uploaded). EVA API keys are shared secrets: wrapped under the KEK, bound to their key id.

    def _iot(self) -> IotCoreStore:
        if not hasattr(self._store, "iotcore_device"):
            raise ConfigError("this store back end has no Cloud IoT Core / EVA support")
        return cast(IotCoreStore, self._store)

    def iotcore_device(self, ref: str) -> IotCoreDevice:
        """A bound device, by its full IoT Core name or its 24-hex id; ConfigError if none."""
        found = (self._iot().iotcore_device_of(DeviceId.parse(ref)) if _HEX24.fullmatch(ref)
                 else self._iot().iotcore_device(str(_iot_path(ref))))
        if found is None:
            raise ConfigError(f"no Cloud IoT Core device {ref!r:.120}")
        return found

    def add_iotcore_key(self, ref: str, pem: bytes, *, expires_ms: int | None = None,
                        policy: str = "legacy", counter_field: str | None = None,
                        actor: str = "cli", transport: str = "cli") -> tuple[IotCoreDevice, int]:
        """Register a public key (PEM key or certificate) for an IoT Core device. `ref` is its
        full name (the device is created, with `policy` and `counter_field`, on its first key)
        or the 24-hex id of a bound device. Returns the device and the key's id."""
        public = gcp_iot.load_public_key(pem)
        alg = "RS256" if isinstance(public, rsa.RSAPublicKey) else "ES256"
        iot = self._iot()
        if _HEX24.fullmatch(ref):
            dev = self.iotcore_device(ref)
        else:
            path = _iot_path(ref)
            dev = (iot.iotcore_device(str(path))
                   or self._add_iotcore_device(path, policy, counter_field, actor, transport))
        if len(iot.iotcore_keys(dev.device_id)) >= gcp_iot.MAX_KEYS_PER_DEVICE:
            raise ConfigError(f"a device holds at most {gcp_iot.MAX_KEYS_PER_DEVICE} keys; "
                              "remove one first")
        key_id = iot.add_iotcore_key(dev.device_id, alg, pem.decode("ascii").strip() + "\n",
                                     expires_ms, self._clock_ms())
        if key_id is None:
            raise ConfigError("this key is already registered for the device")
        self._audit("iotcore_key_added", dev.device_id, actor, transport,
                    f"key #{key_id} {alg} expires_ms={expires_ms}")
        return dev, key_id

    def _add_iotcore_device(self, path: gcp_iot.DevicePath, policy: str,
                            counter_field: str | None, actor: str,
                            transport: str) -> IotCoreDevice:
        _check_policy(policy)
        if counter_field is not None and not _COUNTER_FIELD.fullmatch(counter_field):
            raise ConfigError("a counter field is 1-64 letters, digits or _")
        now_ms = self._clock_ms()
        device_id = DeviceId.generate(now_s=now_ms // 1000, random12=self._random(8))
        name = path.device[:MAX_NAME_LEN]
        record = DeviceRecord(device_id, name, DeviceStatus.ACTIVE, LEGACY_EPOCH, policy, now_ms)
        binding = IotCoreDevice(device_id, str(path), path.device, counter_field, now_ms)
        try:
            self._iot().add_iotcore_device(record, binding)
        except DeviceExists:
            raise ConfigError(f"an IoT Core device named {path.device!r} is already "
                              "registered (device ids must be unique across registries)") from None
        self._audit("iotcore_device_added", device_id, actor, transport,
                    f"path={path} policy={policy} counter={counter_field}")
        return binding

    def iotcore_keys(self, ref: str) -> builtins.list[IotCoreKeyRow]:
        return self._iot().iotcore_keys(self.iotcore_device(ref).device_id)

    def remove_iotcore_key(self, ref: str, key_id: int, *, actor: str = "cli",
                           transport: str = "cli") -> None:
        dev = self.iotcore_device(ref)
        if not self._iot().remove_iotcore_key(dev.device_id, key_id):
            raise ConfigError(f"device {dev.device_id} has no key #{key_id}")
        self._audit("iotcore_key_removed", dev.device_id, actor, transport, f"key #{key_id}")

    def set_iotcore_config(self, ref: str, data: bytes, *, actor: str = "cli",
                           transport: str = "cli") -> int:
        """Store a new config version; a running server delivers it (QoS 1, retained)."""
        if len(data) > IOTCORE_MAX_CONFIG:
            raise ConfigError(f"a config is at most {IOTCORE_MAX_CONFIG} bytes")
        dev = self.iotcore_device(ref)
        version = self._iot().put_iotcore_config(dev.device_id, data, self._clock_ms())
        self._audit("iotcore_config_set", dev.device_id, actor, transport,
                    f"version {version}, {len(data)} bytes")
        return version

    @staticmethod
    def _eva_slot(key_id: str) -> DeviceId:
        return eva_key_slot(key_id)

    def add_eva_key(self, key_id: str, api_key: str | None = None, *, actor: str = "cli",
                    transport: str = "cli") -> str | None:
        """Register an EVA API key under `key_id` (drawn if None: then returned, once)."""
        slot = self._eva_slot(key_id)
        generated = api_key is None
        if api_key is None:
            api_key = base64.urlsafe_b64encode(self._random(24)).decode("ascii")
        _check_legacy_secret(api_key, "EVA API key", 12)
        blob = self._keystore.wrap(slot, EVA_KEY_SLOT, _EVA_LABEL + api_key.encode("ascii"))
        if not self._iot().add_eva_key(key_id, blob, self._clock_ms()):
            raise ConfigError(f"EVA key id {key_id!r} exists; remove it first")
        self._store.add_events([AuditEvent(self._clock_ms(), "eva_key_added", transport, actor,
                                           None, f"key id {key_id}")])
        return api_key if generated else None

    def eva_api_key(self, key_id: str) -> str | None:
        """The unwrapped API key of `key_id`, or None (also for a malformed key id)."""
        try:
            slot = self._eva_slot(key_id)
        except ConfigError:
            return None
        blob = self._iot().eva_key(key_id)
        if blob is None:
            return None
        plain = self._keystore.unwrap(slot, EVA_KEY_SLOT, blob)
        if not plain.startswith(_EVA_LABEL):
            raise ConfigError(f"EVA key {key_id} has the wrong label")
        return plain[len(_EVA_LABEL):].decode("ascii")

    def list_eva_keys(self) -> builtins.list[tuple[str, int]]:
        return self._iot().list_eva_keys()

    def remove_eva_key(self, key_id: str, *, actor: str = "cli", transport: str = "cli") -> None:
        if not self._iot().remove_eva_key(key_id):
            raise ConfigError(f"no EVA key id {key_id!r:.70}")
        self._store.add_events([AuditEvent(self._clock_ms(), "eva_key_removed", transport, actor,
                                           None, f"key id {key_id}")])

    def _audit(self, reason: str, device_id: DeviceId, actor: str, transport: str,
               detail: str) -> None:
        self._store.add_events([AuditEvent(self._clock_ms(), reason, transport, actor,
                                           str(device_id), detail)])


def signing_key_bytes(key: PublicKey) -> tuple[int, bytes]:
    """(COSE alg, raw public key): Ed25519 32 bytes, P-256 the uncompressed SEC1 point."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ALG_EDDSA, key.public_bytes_raw()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ES256, key.public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    raise ConfigError("device signing keys are Ed25519 or EC P-256")


def signing_key_from_bytes(alg: int, raw: bytes) -> PublicKey:
    if alg == ALG_EDDSA:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if alg == ALG_ES256:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    raise ConfigError(f"unknown signing key alg {alg}")
