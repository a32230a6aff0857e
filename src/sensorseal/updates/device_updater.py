"""The device side of an update: verify, download (resumable), install into an A/B slot, check
health, confirm or fall back. The device always keeps running a version it already had unless the
new one has been verified, written completely, switched to and found healthy.

Files under the updater's root (every write: temp file, fsync, os.replace, fsync the directory)::

    active              the one commit point: "sensorseal-updater/1 <json> <crc32>" holding the
                        active slot, its image version (the anti-rollback floor), the last manifest
                        sequence seen (anti-replay) and, during a trial, the slot to fall back to
    slot_a/image        slot contents; slot_X/manifest is the signed manifest of that image
    slot_b/image
    download/manifest   the manifest whose image is being downloaded
    download/image.part the bytes received so far; download/offset how many of them are durable

Keeping version, sequence and pointer in one file makes every state change a single atomic
rename: there is no moment where the pointer names the new slot while the floor is the old one.

Install order, and what a crash at each point leaves (`checkpoint(name)` is called at the named
points so tests can crash there)::

    verify manifest -> download chunks (offset durable after each) -> digest + size
    -> stage into the inactive slot ("slot-written") -> commit trial: active=new, fallback=old
    ("pointer-switched") -> health check -> commit confirmed, or commit back to the old slot

    crash during download      restart resumes at the durable offset; the digest covers it all
    crash after slot-written   pointer still on the old slot; the next install reuses the download
    crash during the trial     the restart finds an unconfirmed trial and falls back (reported
                               install_failed); the manifest's sequence is burned

A manifest that fails digest or size is *not* burned (a network attacker could otherwise make a
device refuse a genuine update forever by corrupting one chunk); one that fails its health check
is (the same image would fail again). Transport errors are `incomplete`: call install() again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sensorseal.core.errors import ConfigError
from sensorseal.device._statefile import fsync_dir, read_state, write_state
from sensorseal.updates.manifest import (
    GCM_TAG_LEN,
    Manifest,
    TrustAnchors,
    UpdateReason,
    UpdateRejected,
    manifest_ref,
    verify_manifest,
)

__all__ = ["ChunkFetcher", "DeviceUpdater", "SlotState", "UpdateResult", "UpdateStatus"]

ChunkFetcher = Callable[[int], bytes]
"""Returns the image bytes starting at `offset` (any length > 0), b"" at the end; raises on a
transport error. HTTP (Range requests) and MQTT (chunk request/response) adapters plug in here."""
HealthCheck = Callable[[Path], bool]

_MAGIC = "sensorseal-updater/1"
_SLOTS = ("a", "b")
_BLOCK = 64 * 1024
_MAX_STATE = 1024


class UpdateStatus(StrEnum):
    """What a result reports; `reason` is set for rejected and rolled_back."""

    DOWNLOADING = "downloading"  # progress: `offset` bytes are durable
    VERIFIED = "verified"  # progress: size and digest hold
    INSTALLED = "installed"
    REJECTED = "rejected"  # refused before anything was switched
    ROLLED_BACK = "rolled_back"  # switched, then returned to the old slot
    INCOMPLETE = "incomplete"  # transport error; call install() again to resume


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """The device's report. `as_dict()` is what the caller seals and sends upstream."""

    status: UpdateStatus
    running_version: int
    reason: UpdateReason | None = None
    manifest: str = ""  # first 16 bytes of SHA-256 of the signed manifest, hex
    manifest_seq: int | None = None
    image_version: int | None = None
    offset: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value, "running_version": self.running_version,
                               "manifest": self.manifest}
        if self.reason is not None:
            out["reason"] = self.reason.value
        for key in ("manifest_seq", "image_version", "offset"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True, slots=True)
class SlotState:
    """The committed content of `active`."""

    active: str
    version: int
    seq: int
    fallback: str | None = None  # set while the active slot is on trial
    fallback_version: int | None = None

    def encode(self) -> bytes:
        body = json.dumps({"active": self.active, "version": self.version, "seq": self.seq,
                           "fallback": self.fallback, "fallback_version": self.fallback_version},
                          sort_keys=True, separators=(",", ":"))
        return f"{_MAGIC} {body} {zlib.crc32(body.encode()):08x}\n".encode()

    @classmethod
    def decode(cls, raw: bytes) -> SlotState:
        try:
            magic, body, crc = raw.decode("ascii").rstrip("\n").split(" ")
            if magic != _MAGIC or crc != f"{zlib.crc32(body.encode()):08x}":
                raise ValueError
            d = json.loads(body)
            state = cls(d["active"], d["version"], d["seq"], d["fallback"], d["fallback_version"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ConfigError("the updater's active file is damaged; refusing to guess the "
                              "installed version (re-provision the device)") from None
        if state.active not in _SLOTS or type(state.version) is not int \
                or type(state.seq) is not int or (state.fallback not in (None, *_SLOTS)):
            raise ConfigError("the updater's active file has impossible values")
        return state


def _other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def _write_durably(path: Path, data: bytes) -> None:
    """tmp + fsync + os.replace + fsync(dir): a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DeviceUpdater:
    """Installs signed updates into A/B slots under `root`. Not thread-safe: one per device."""

    def __init__(self, root: Path | str, *, device_class: str, trust: TrustAnchors,
                 health_check: HealthCheck, require_operator: bool = False,
                 notify: Callable[[dict[str, Any]], None] | None = None,
                 checkpoint: Callable[[str], None] | None = None) -> None:
        self._root = Path(root)
        self._class = device_class
        self._trust = trust
        self._health = health_check
        self._require_operator = require_operator
        self._notify = notify or (lambda _report: None)
        self._checkpoint = checkpoint or (lambda _name: None)
        try:
            raw = (self._root / "active").read_bytes()[:_MAX_STATE + 1]
        except FileNotFoundError:
            raise ConfigError("updater not provisioned: call DeviceUpdater.provision") from None
        self._state = SlotState.decode(raw)
        self.recovered: UpdateResult | None = self._recover()

    @classmethod
    def provision(cls, root: Path | str, *, image: bytes, version: int,
                  **kwargs: Any) -> DeviceUpdater:
        """First start: the factory image goes into slot a at `version`, no manifest seen."""
        root = Path(root)
        if (root / "active").exists():
            raise ConfigError("already provisioned")
        for slot in _SLOTS:
            (root / f"slot_{slot}").mkdir(parents=True, exist_ok=True)
        (root / "download").mkdir(exist_ok=True)
        _write_durably(root / "slot_a" / "image", image)
        _write_durably(root / "active", SlotState("a", version, 0).encode())
        return cls(root, **kwargs)

    def __repr__(self) -> str:
        return (f"DeviceUpdater(class={self._class!r}, slot={self._state.active}, "
                f"version={self._state.version}, seq={self._state.seq})")

    # --- what the device runs -----------------------------------------------------------------
    @property
    def state(self) -> SlotState:
        return self._state

    @property
    def installed_version(self) -> int:
        return self._state.version

    @property
    def last_manifest_seq(self) -> int:
        return self._state.seq

    @property
    def active_image(self) -> Path:
        return self._root / f"slot_{self._state.active}" / "image"

    def pending_manifest(self) -> bytes | None:
        """The manifest of an unfinished download, so a restarted device can resume by itself."""
        try:
            return (self._root / "download" / "manifest").read_bytes()
        except FileNotFoundError:
            return None

    # --- the update ---------------------------------------------------------------------------
    def install(self, manifest_data: bytes, fetch: ChunkFetcher, *, now_ms: int,
                image_key: bytes | None = None) -> UpdateResult:
        """Verify, download, install and health-check one update. Never raises for a device-side
        outcome (it is in the result); raises ConfigError for damaged local state."""
        mid = manifest_ref(manifest_data) if isinstance(manifest_data, bytes) else ""
        try:
            m = verify_manifest(manifest_data, self._trust, device_class=self._class,
                                installed_version=self._state.version,
                                last_manifest_seq=self._state.seq, now_ms=now_ms,
                                require_operator=self._require_operator)
        except UpdateRejected as exc:
            return self._result(UpdateStatus.REJECTED, mid, None, exc.reason, exc.detail)
        if m.encryption is not None and (image_key is None or len(image_key) != 32):
            return self._result(UpdateStatus.REJECTED, mid, m, UpdateReason.INSTALL_FAILED,
                                "encrypted image and no image key")
        outcome = self._download(manifest_data, m, mid, fetch)
        if outcome is not None:
            return outcome
        self._notify(self._result(UpdateStatus.VERIFIED, mid, m).as_dict())
        target = _other(self._state.active)
        try:
            self._stage(m, target, image_key or b"")
        except UpdateRejected as exc:
            return self._result(UpdateStatus.REJECTED, mid, m, exc.reason, exc.detail)
        self._checkpoint("slot-written")
        old = self._state
        self._commit(SlotState(target, m.image_version, m.sequence, old.active, old.version))
        self._checkpoint("pointer-switched")
        self._clear_download()
        healthy, why = self._run_health_check(self.active_image)
        if healthy:
            self._commit(SlotState(target, m.image_version, m.sequence))
            return self._result(UpdateStatus.INSTALLED, mid, m)
        self._commit(SlotState(old.active, old.version, m.sequence))
        return self._result(UpdateStatus.ROLLED_BACK, mid, m, UpdateReason.HEALTH_CHECK_FAILED,
                            why)

    # --- steps --------------------------------------------------------------------------------
    def _result(self, status: UpdateStatus, mid: str, m: Manifest | None,
                reason: UpdateReason | None = None, detail: str = "",
                offset: int | None = None) -> UpdateResult:
        return UpdateResult(status, self._state.version, reason, mid,
                            m.sequence if m else None, m.image_version if m else None, offset,
                            detail)

    def _commit(self, state: SlotState) -> None:
        _write_durably(self._root / "active", state.encode())
        self._state = state

    def _recover(self) -> UpdateResult | None:
        """A trial that never got confirmed (crash or power loss during the health check)
        falls back to the slot it came from; its manifest stays burned."""
        s = self._state
        if s.fallback is None or s.fallback_version is None:
            return None
        self._commit(SlotState(s.fallback, s.fallback_version, s.seq))
        return UpdateResult(UpdateStatus.ROLLED_BACK, s.fallback_version,
                            UpdateReason.INSTALL_FAILED, "", s.seq, s.version, None,
                            "restarted before the new slot was confirmed")

    def _clear_download(self) -> None:
        d = self._root / "download"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        fsync_dir(self._root)

    def _resume_point(self, manifest_data: bytes) -> tuple[int, Any]:
        """(durable offset, SHA-256 over those bytes) of a download of this very manifest;
        (0, fresh hash) after starting a new one."""
        d = self._root / "download"
        part = d / "image.part"
        if self.pending_manifest() == manifest_data and part.exists():
            try:
                offset = read_state(d / "offset", "download-offset") or 0
            except ConfigError:  # a damaged cache, not security state: download again
                offset = 0
            with open(part, "r+b") as fh:
                fh.truncate(offset)  # bytes past the durable offset may be torn
                h = hashlib.sha256()
                while block := fh.read(_BLOCK):
                    h.update(block)
            if part.stat().st_size == offset:
                return offset, h
        self._clear_download()
        _write_durably(d / "manifest", manifest_data)
        part.touch()
        write_state(d / "offset", "download-offset", 0)
        return 0, hashlib.sha256()

    def _download(self, manifest_data: bytes, m: Manifest, mid: str,
                  fetch: ChunkFetcher) -> UpdateResult | None:
        """Stream the image into download/image.part; None when it is complete and intact."""
        d = self._root / "download"
        offset, h = self._resume_point(manifest_data)
        with open(d / "image.part", "ab") as fh:
            while offset < m.size:
                try:
                    chunk = fetch(offset)
                except Exception as exc:  # any transport failure: resume later
                    return self._result(UpdateStatus.INCOMPLETE, mid, m, None,
                                        f"fetch failed: {type(exc).__name__}", offset)
                if not isinstance(chunk, bytes | bytearray) or not chunk \
                        or offset + len(chunk) > m.size:
                    self._clear_download()
                    got = "no more" if not chunk else f"{offset + len(chunk)}"
                    return self._result(UpdateStatus.REJECTED, mid, m, UpdateReason.SIZE_MISMATCH,
                                        f"{got} bytes where {m.size} were declared")
                fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
                offset += len(chunk)
                write_state(d / "offset", "download-offset", offset)
                h.update(chunk)
                self._notify(self._result(UpdateStatus.DOWNLOADING, mid, m, offset=offset)
                             .as_dict())
        if not hmac.compare_digest(h.digest(), m.digest):
            self._clear_download()
            return self._result(UpdateStatus.REJECTED, mid, m, UpdateReason.DIGEST_MISMATCH,
                                f"{m.size} bytes received; SHA-256 differs")
        return None

    def _stage(self, m: Manifest, slot: str, image_key: bytes) -> None:
        """Copy (or decrypt) the verified download into `slot`, durably. The slot's image is
        replaced only once everything, the GCM tag included, has checked out."""
        d = self._root / "download"
        slot_dir = self._root / f"slot_{slot}"
        slot_dir.mkdir(exist_ok=True)
        tmp = slot_dir / "image.tmp"
        try:
            with open(d / "image.part", "rb") as src, open(tmp, "wb") as dst:
                if m.encryption is None:
                    shutil.copyfileobj(src, dst, _BLOCK)
                else:
                    _decrypt_stream(src, dst, m.size, m.encryption.iv, image_key)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, slot_dir / "image")
            _write_durably(slot_dir / "manifest", (d / "manifest").read_bytes())
        except InvalidTag:
            tmp.unlink(missing_ok=True)
            raise UpdateRejected(UpdateReason.INSTALL_FAILED,
                                 "image key does not open the image") from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UpdateRejected(UpdateReason.INSTALL_FAILED,
                                 f"cannot write slot {slot}: {exc.strerror}") from None

    def _run_health_check(self, image: Path) -> tuple[bool, str]:
        try:
            ok = self._health(image)
        except Exception as exc:  # a crashing check is a failed check
            return False, f"health check raised {type(exc).__name__}"
        return (True, "") if ok is True else (False, "health check returned false")


def _decrypt_stream(src: Any, dst: Any, size: int, iv: bytes, key: bytes) -> None:
    """AES-256-GCM, streamed: ciphertext is everything but the last 16 bytes (the tag).
    Plaintext lands in a temp file that is discarded unless finalize() accepts the tag."""
    dec = Cipher(algorithms.AES(key), modes.GCM(iv)).decryptor()
    remaining = size - GCM_TAG_LEN
    while remaining > 0:
        block = src.read(min(_BLOCK, remaining))
        if not block:
            raise InvalidTag
        remaining -= len(block)
        dst.write(dec.update(block))
    tag = src.read(GCM_TAG_LEN)
    dst.write(dec.finalize_with_tag(tag))
