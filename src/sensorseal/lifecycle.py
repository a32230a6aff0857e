"""The key-lifecycle service: rotation, E5 renewal, revocation everywhere, KEK rotation.

Everything an operator does to keys goes through `KeyLifecycle`, which sits over the registry
(the epoch rules and the audit trail), the store and the keystore, and tells the running parts
of the system about a change through hooks:

- `invalidate` hooks (e.g. `Pipeline.invalidate`) make a change visible at once in this process;
  other processes see it within the pipeline's status TTL (1 s);
- `on_revoke` hooks cut the broker side (e.g. `DynsecAdmin.sync_device(id, "revoked", None)`,
  which deletes the client and kicks its session, or `EmbeddedBroker.disconnect_user`).

Epoch rules (enforced by the pipeline, docs/keys.md): the current epoch is accepted; an older
epoch until the end of its grace period, then refused as UNKNOWN_EPOCH; epoch current + 1 while
an E5 renewal is pending, whose first verified message confirms it.

E5 renewal: `renew()` draws a new root secret, seals it to the device's registered KEM public
key (`core.renewal.make_offer`), stores it wrapped under the KEK for epoch N+1 together with the
`RenewalState` (offer ciphertext only). The offer travels as the body of a downlink envelope
sealed under the device's *current* epoch (`deliver()`; HPKE base mode does not authenticate the
sender, the envelope does). Until the device confirms, every delivery carries the same offer.

KEK rotation (`rotate_kek`): blobs carry their KEK id, so a `Keyring` reads blobs of both KEKs
while the re-wrap runs; the new KEK is written atomically next to the old one (`kek.next`), the
old one is kept (`kek.old`) until every blob has moved, and a rotation interrupted half-way is
resumed by running it again. Every KEK-wrapped blob moves, not only device root secrets: the
E1 network keys, gateway secrets, legacy-device secrets and EVA API keys (`WrappedKind`), each
unwrapped and re-wrapped with the same keystore binding (id, slot) its feature used.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.core.renewal import (
    Phase,
    RenewalState,
    make_offer,
    renewal_body,
    renewal_offer_of,
)
from sensorseal.keystore.base import Keystore
from sensorseal.keystore.software import (
    KEK_ENV,
    KEK_FILE,
    KEK_LEN,
    SoftwareKeystore,
    create_kek_file,
    load_kek,
)
from sensorseal.registry import (
    DEFAULT_GRACE_MS,
    EVA_KEY_SLOT,
    LEGACY_KEY_SLOT,
    Registry,
    eva_key_slot,
)
from sensorseal.store.base import (
    AuditEvent,
    DeviceRecord,
    KekBlobStore,
    KeyLifecycleStore,
    Store,
    WrappedBlob,
    WrappedKind,
)

__all__ = [
    "DEFAULT_GRACE_MS",
    "KEK_NEXT_FILE",
    "KEK_OLD_FILE",
    "KekRotation",
    "KeyLifecycle",
    "Keyring",
    "open_keyring",
    "renewal_body",
    "renewal_offer_of",
    "rotate_kek",
]

KEK_NEXT_FILE = "kek.next"
KEK_OLD_FILE = "kek.old"
META_KEK_ID = "kek_id"  # as in sensorseal.datadir

DeviceHook = Callable[[DeviceId], object]
SealDown = Callable[[DeviceId, bytes, str], bytes]


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class KeyLifecycle:
    """Rotation, renewal and revocation of device keys, with hooks for the running system."""

    def __init__(self, registry: Registry, store: Store, keystore: Keystore, *,
                 seal_down: SealDown | None = None,
                 invalidate: Iterable[DeviceHook] = (),
                 on_revoke: Iterable[DeviceHook] = (),
                 clock_ms: Callable[[], int] = _wall_clock_ms,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        """`seal_down(device, body, route)` seals a downlink under the current epoch and
        spends one number of the shared downlink counter (`mqtt.commands.CloudLink.seal_down`):
        the one place downlink nonces come from, so renewals and commands never collide."""
        if not hasattr(store, "switch_epoch"):
            raise ConfigError("this store back end has no key lifecycle support")
        self.registry = registry
        self._store = store
        self._keystore = keystore
        self._keys = cast(KeyLifecycleStore, store)
        self._seal_down = seal_down
        self._invalidate = list(invalidate)
        self._on_revoke = list(on_revoke)
        self._clock_ms = clock_ms
        self._random = random

    def add_invalidate_hook(self, hook: DeviceHook) -> None:
        self._invalidate.append(hook)

    def add_revoke_hook(self, hook: DeviceHook) -> None:
        self._on_revoke.append(hook)

    def _changed(self, device_id: DeviceId) -> None:
        for hook in self._invalidate:
            hook(device_id)

    # -- rotation --------------------------------------------------------------------------

    def rotate(self, device_id: DeviceId, *, grace_ms: int = DEFAULT_GRACE_MS,
               actor: str = "cli", transport: str = "cli") -> DeviceCredential:
        """Start epoch N+1 (fresh random secret, returned once); N stays valid `grace_ms`."""
        cred = self.registry.rotate(device_id, grace_ms=grace_ms, actor=actor,
                                    transport=transport)
        self._changed(device_id)
        return cred

    # -- E5 renewal ------------------------------------------------------------------------

    def renewal_state(self, device_id: DeviceId) -> RenewalState | None:
        found = self._keys.get_renewal(device_id)
        return None if found is None else RenewalState.from_cbor(found[0])

    def renew(self, device_id: DeviceId, *, grace_ms: int = DEFAULT_GRACE_MS,
              actor: str = "cli", transport: str = "cli") -> bytes:
        """Make (or supersede) the renewal offer for epoch N+1; return the offer bytes.

        The secret is stored wrapped for N+1 and the offer kept for re-delivery in one
        transaction; N stays current until the device's first verified message under N+1.
        After that, N keeps `grace_ms` for messages still in flight.
        """
        if grace_ms < 0:
            raise ConfigError("the grace period cannot be negative")
        record = self.registry.get(device_id)
        if record.status.value != "active":
            raise ConfigError(f"device {device_id} is {record.status.value}; renew needs active")
        public = self.registry.renewal_key(device_id)
        if public is None:
            raise ConfigError(f"device {device_id} has no renewal key registered")
        state = self.renewal_state(device_id)
        if state is None or state.current_epoch != record.epoch:
            state = RenewalState(device_id, record.epoch)
        secret = self._random(32)
        if len(secret) != 32:
            raise ConfigError("the random source returned too few bytes")
        offer = make_offer(device_id, public, record.epoch, secret)
        state = state.with_offer(offer)
        new_epoch = record.epoch + 1
        wrapped = self._keystore.wrap(device_id, new_epoch, secret)
        self._keys.add_epoch(device_id, new_epoch, wrapped, self._clock_ms(),
                             renewal_state=state.to_cbor(), grace_ms=grace_ms)
        self._store.add_events([AuditEvent(
            self._clock_ms(), "key_renewal_offered", transport, actor, str(device_id),
            f"epoch {record.epoch} -> {new_epoch}, suite {public.suite.name}, "
            f"offer #{state.offers_made}")])
        self._changed(device_id)  # a superseded pending secret must not linger in a cache
        return offer

    def pending_offer(self, device_id: DeviceId) -> bytes | None:
        """The offer to (re)deliver while the renewal is pending: always the same bytes."""
        state = self.renewal_state(device_id)
        if state is None or state.phase is not Phase.PENDING:
            return None
        record = self.registry.get(device_id)
        if record.epoch != state.current_epoch:  # rotated meanwhile: the offer is void
            return None
        return state.delivery()

    def deliver(self, device_id: DeviceId, route: str) -> bytes | None:
        """The pending offer sealed as a downlink for `route` (e.g. the MQTT commands topic),
        under the device's current epoch; None if no renewal is pending. Each call seals anew
        (a fresh downlink number); the offer inside stays the same until confirmed."""
        offer = self.pending_offer(device_id)
        if offer is None:
            return None
        if self._seal_down is None:
            raise ConfigError("no downlink sealer configured (seal_down)")
        return self._seal_down(device_id, renewal_body(offer), route)

    # -- revocation ------------------------------------------------------------------------

    def revoke(self, device_id: DeviceId, *, actor: str = "cli",
               transport: str = "cli") -> DeviceRecord:
        """Revoke in the registry (final; the id is never reused), then at once in this
        process's pipelines and on the broker. A failing broker hook is raised after every
        other hook ran: the registry revocation stands either way, and ingest refuses."""
        record = self.registry.revoke(device_id, actor=actor, transport=transport)
        self._changed(device_id)
        failure: Exception | None = None
        for hook in self._on_revoke:
            try:
                hook(device_id)
            except Exception as exc:  # keep going: every transport must be cut
                failure = failure or exc
        if failure is not None:
            raise ConfigError(f"device {device_id} is revoked, but a broker hook failed: "
                              f"{type(failure).__name__}") from failure
        return record


# -- KEK: a keyring and rotation ----------------------------------------------------------------

class Keyring:
    """A `Keystore` over several KEKs: wraps with the primary, unwraps with whichever KEK the
    blob names (byte 1..4 of a software blob is its KEK id). `reload()` is asked for the KEKs
    again when a blob names an unknown one, so a running server follows a rotation done by
    another process without a restart."""

    def __init__(self, primary: SoftwareKeystore, others: Sequence[SoftwareKeystore] = (), *,
                 reload: Callable[[], Sequence[SoftwareKeystore]] | None = None) -> None:
        self._primary = primary
        self._by_id = {k.kek_id: k for k in (*others, primary)}
        self._reload = reload

    def __repr__(self) -> str:
        return f"Keyring(primary={self.kek_id!r}, keks={sorted(self._by_id)!r})"

    @property
    def kek_id(self) -> str:
        return self._primary.kek_id

    @property
    def kek_ids(self) -> list[str]:
        return sorted(self._by_id)

    def wrap(self, device_id: DeviceId, epoch: int, secret: bytes) -> bytes:
        return self._primary.wrap(device_id, epoch, secret)

    def unwrap(self, device_id: DeviceId, epoch: int, blob: bytes) -> bytes:
        kek_id = bytes(blob[1:5]).hex()
        keystore = self._by_id.get(kek_id)
        if keystore is None and self._reload is not None:
            loaded = list(self._reload())
            self._by_id.update({k.kek_id: k for k in loaded})
            keystore = self._by_id.get(kek_id)
        return (keystore or self._primary).unwrap(device_id, epoch, blob)


def _read_kek_file(path: Path) -> bytes | None:
    """A KEK file with the same checks as `load_kek` (regular, 0600-ish, 32 bytes), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
            raise ConfigError(f"KEK file {path} must be a regular file with mode 0600")
        kek = os.read(fd, KEK_LEN + 1)
    finally:
        os.close(fd)
    if len(kek) != KEK_LEN:
        raise ConfigError(f"KEK file {path} must hold exactly {KEK_LEN} bytes")
    return kek


def _extra_keks(data_dir: Path) -> list[SoftwareKeystore]:
    found = (_read_kek_file(data_dir / name) for name in (KEK_NEXT_FILE, KEK_OLD_FILE))
    return [SoftwareKeystore(k) for k in found if k is not None]


def open_keyring(data_dir: str | Path, env: Mapping[str, str] = os.environ) -> Keyring:
    """The data directory's keystore during and outside a KEK rotation: the KEK (`kek` or
    SENSORSEAL_KEK) as primary, plus `kek.next` / `kek.old` when a rotation is under way."""
    path = Path(data_dir)

    def load() -> list[SoftwareKeystore]:
        return [SoftwareKeystore(load_kek(path, env)), *_extra_keks(path)]

    return Keyring(SoftwareKeystore(load_kek(path, env)), _extra_keks(path), reload=load)


@dataclass(frozen=True, slots=True)
class KekRotation:
    """What `rotate_kek` did (ids are public fingerprints, never key bytes)."""

    old_kek_id: str
    new_kek_id: str
    rewrapped: int
    resumed: bool


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a 0600 file under a temporary name, fsync, rename over `path`, fsync the dir."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrap_pass(keys: KeyLifecycleStore, ring: Keyring, new: SoftwareKeystore,
                 batch: int) -> tuple[int, int]:
    """One pass over every wrapped blob of every table: (re-wrapped, left behind by a
    concurrent change)."""
    moved, missed = _rewrap_device_secrets(keys, ring, new, batch)
    for kind in WrappedKind:
        done, left = _rewrap_kind(cast(KekBlobStore, keys), kind, ring, new, batch)
        moved += done
        missed += left
    return moved, missed


def _blob_binding(kind: WrappedKind, item: WrappedBlob) -> tuple[DeviceId, int]:
    """The keystore (id, slot) a blob of `kind` was wrapped with; it must be unwrapped and
    re-wrapped with the same, or the feature that reads it refuses it afterwards."""
    if kind is WrappedKind.EVA:
        return eva_key_slot(str(item.row)), EVA_KEY_SLOT  # registry.add_eva_key
    if isinstance(item.row, str):
        raise ConfigError(f"a {kind.value} row has a text key")
    row_id = DeviceId(bytes(item.row))
    if kind in (WrappedKind.NETWORK, WrappedKind.GATEWAY):
        return row_id, item.epoch  # gateway.provision: (network or gateway id, key epoch)
    return row_id, LEGACY_KEY_SLOT  # registry._wrap_legacy


def _rewrap_kind(blobs: KekBlobStore, kind: WrappedKind, ring: Keyring,
                 new: SoftwareKeystore, batch: int) -> tuple[int, int]:
    moved = missed = 0
    after: tuple[bytes | str, int] | None = None
    while True:
        page = blobs.kek_blobs(kind, after=after, limit=batch)
        if not page:
            return moved, missed
        for item in page:
            if bytes(item.wrapped[1:5]).hex() == new.kek_id:
                continue
            bound_id, slot = _blob_binding(kind, item)
            fresh = new.wrap(bound_id, slot, ring.unwrap(bound_id, slot, item.wrapped))
            if blobs.replace_kek_blob(kind, item.row, item.epoch, item.wrapped, fresh):
                moved += 1
            else:
                missed += 1  # replaced meanwhile: the next pass takes it
        after = (page[-1].row, page[-1].epoch)


def _rewrap_device_secrets(keys: KeyLifecycleStore, ring: Keyring, new: SoftwareKeystore,
                           batch: int) -> tuple[int, int]:
    moved = missed = 0
    after: tuple[DeviceId, int] | None = None
    while True:
        page = keys.wrapped_secrets(after=after, limit=batch)
        if not page:
            return moved, missed
        for device_id, epoch, blob in page:
            if bytes(blob[1:5]).hex() == new.kek_id:
                continue
            fresh = new.wrap(device_id, epoch, ring.unwrap(device_id, epoch, blob))
            if keys.replace_secret(device_id, epoch, blob, fresh):
                moved += 1
            else:
                missed += 1  # replaced meanwhile (a renewal): the next pass takes it
        after = (page[-1][0], page[-1][1])


def rotate_kek(data_dir: str | Path, store: Store, *, env: Mapping[str, str] = os.environ,
               batch: int = 500, max_passes: int = 5,
               clock_ms: Callable[[], int] = _wall_clock_ms,
               between: Callable[[], None] | None = None) -> KekRotation:
    """Re-wrap every stored secret under a new KEK, row by row, while servers run: device
    secrets and every `WrappedKind` table (network keys, gateway secrets, legacy secrets, EVA
    API keys).

    1. `kek.next` (new random KEK) is written atomically; a rotation that was interrupted finds
       it and resumes with it.
    2. Every blob not yet under the new KEK is unwrapped (old KEK) and re-wrapped (new KEK) with
       a compare-and-swap per row; servers with a `Keyring` read both kinds meanwhile.
    3. The old KEK is copied to `kek.old`, `kek.next` renamed over `kek`, the store's KEK id
       updated; a last pass catches blobs written under the old KEK meanwhile; `kek.old` is
       deleted only then. (`between` is a test seam called after step 2.)
    """
    if KEK_ENV in env:
        raise ConfigError(f"the KEK comes from {KEK_ENV}; rotate it in your secret manager "
                          "(this command rotates the data directory's kek file)")
    if not hasattr(store, "replace_secret") or not hasattr(store, "replace_kek_blob"):
        raise ConfigError("this store back end has no key lifecycle support")
    keys = cast(KeyLifecycleStore, store)
    path = Path(data_dir)
    old = SoftwareKeystore(load_kek(path, env))
    next_path = path / KEK_NEXT_FILE
    next_kek = _read_kek_file(next_path)
    resumed = next_kek is not None
    if next_kek is None:
        tmp = path / f".{KEK_NEXT_FILE}.{secrets.token_hex(6)}.tmp"
        next_kek = create_kek_file(tmp)
        os.replace(tmp, next_path)
        _fsync_dir(path)
    new = SoftwareKeystore(next_kek)
    if new.kek_id == old.kek_id:
        raise ConfigError("the new KEK equals the old one")
    ring = Keyring(new, [old, *_extra_keks(path)])
    moved = 0
    for _ in range(max_passes):
        done, missed = _rewrap_pass(keys, ring, new, batch)
        moved += done
        if not missed:
            break
    else:
        raise ConfigError("secrets keep changing during the KEK rotation; run it again")
    if between is not None:
        between()
    kek_path = path / KEK_FILE
    old_bytes = _read_kek_file(kek_path)
    if old_bytes is None:
        raise ConfigError(f"{kek_path} disappeared during the rotation")
    _write_atomically(path / KEK_OLD_FILE, old_bytes)
    os.replace(next_path, kek_path)
    _fsync_dir(path)
    store.set_meta(META_KEK_ID, new.kek_id)
    moved += _rewrap_pass(keys, ring, new, batch)[0]
    os.unlink(path / KEK_OLD_FILE)
    _fsync_dir(path)
    store.add_events([AuditEvent(clock_ms(), "kek_rotated", "cli", "operator", None,
                                 f"kek {old.kek_id} -> {new.kek_id}, {moved} secrets "
                                 f"re-wrapped{' (resumed)' if resumed else ''}")])
    return KekRotation(old.kek_id, new.kek_id, moved, resumed)
