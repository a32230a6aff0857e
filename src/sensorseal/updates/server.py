"""The distribution service: images, manifests and rollouts in the store; offers, chunks and
reports over HTTP (routes here) and MQTT (`MqttRolloutDriver`).

    update create   image -> store (content-addressed, size-limited) + unsigned manifest payload
    update sign     payload -> COSE_Sign1 / COSE_Sign (vendor key; offline, no data dir needed)
    update approve  COSE_Sign -> + operator signature
    update rollout  signed manifest imported (its payload must be one we created) -> rollout
    devices         offer (sealed downlink) -> chunks (public, digest-covered) -> reports (sealed)

The server holds no trust anchor and makes no security decision about an update: devices verify
signatures, class, versions, digest and size. What the server guarantees is bookkeeping: a
signed manifest is accepted for distribution only if its payload is byte for byte one that
`create` produced (so its digest names an image the store holds), and a device's state moves
only on its own sealed reports (the rollout state machine in `rollout.py` decides which moves
are legal). Reports arrive already authenticated: the HTTP route opens them with the ingest
pipeline (stored like telemetry, route `/v1/updates/report`), the MQTT driver with the RPC
layer's sealed responses.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2

from sensorseal.core.attest import parse_sign1
from sensorseal.core.errors import ConfigError, Rejected
from sensorseal.core.ids import DeviceId
from sensorseal.store.base import (
    AuditEvent,
    DeviceStatus,
    Store,
    UpdateDeviceRow,
    UpdateManifestRow,
    UpdateRolloutRow,
    UpdateStore,
)
from sensorseal.updates.manifest import (
    COSE_ALG_SHA256,
    MAX_MANIFEST_SIZE,
    Manifest,
    UpdateReason,
    encode_manifest,
    manifest_ref,
)
from sensorseal.updates.rollout import (
    DeviceRecord,
    DeviceState,
    ReportRefused,
    Rollout,
    Rollouts,
    RolloutSummary,
    Target,
)
from sensorseal.updates.transport import Offer, encode_offer, offer_route

__all__ = [
    "DEFAULT_MAX_IMAGE",
    "DriveStats",
    "MqttRolloutDriver",
    "StoreRolloutStore",
    "UpdateBackend",
    "UpdateService",
    "manifest_from_payload",
    "signed_payload",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE = 16 * 1024 * 1024
_CACHE_BYTES = 64 * 1024 * 1024
DAY_MS = 86_400_000


class UpdateBackend(Store, UpdateStore, Protocol):
    """A store with the update tables and device groups (SQLiteStore; PostgresStore when
    ported)."""

    def device_groups(self) -> dict[str, str]: ...


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --- manifest payloads ------------------------------------------------------------------------

def manifest_from_payload(payload: bytes) -> Manifest:
    """The `Manifest` an unsigned payload (from `update create`) describes; ConfigError unless
    the payload is exactly its canonical encoding. For signing tools: it checks no signature."""
    try:
        body = cbor2.loads(payload, max_depth=3, allow_indefinite=False,
                           allow_duplicate_keys=False)
        digest = body[5]
        if digest[0] != COSE_ALG_SHA256 or set(body) - set(range(1, 10)):
            raise ValueError
        m = Manifest(body[2], body[3], body[4], digest[1], body[6], body[8], body[9], body[7],
                     None, body[1])
    except (ValueError, KeyError, TypeError, IndexError, cbor2.CBORDecodeError):
        raise ConfigError("not an unsigned manifest produced by `update create`") from None
    if encode_manifest(m) != payload:
        raise ConfigError("the manifest is not in canonical form")
    return m


def signed_payload(signed: bytes) -> bytes:
    """The payload inside a signed manifest (COSE_Sign1 or COSE_Sign), without verifying it."""
    if not 0 < len(signed) <= MAX_MANIFEST_SIZE:
        raise ConfigError("a signed manifest is 1 byte to 16 KiB")
    if signed[:1] == b"\xd2":
        try:
            return parse_sign1(signed).payload
        except Rejected as exc:
            raise ConfigError(f"not a COSE_Sign1 manifest: {exc.detail}") from None
    try:
        item = cbor2.loads(signed, max_depth=6, allow_indefinite=False)
    except Exception:
        raise ConfigError("the signed manifest is not CBOR") from None
    if not isinstance(item, cbor2.CBORTag) or item.tag != 98 \
            or type(item.value) not in (list, tuple) or len(item.value) != 4 \
            or type(item.value[2]) is not bytes:
        raise ConfigError("not a COSE_Sign1 or COSE_Sign manifest")
    return bytes(item.value[2])


# --- rollouts in the store --------------------------------------------------------------------

class StoreRolloutStore:
    """`rollout.RolloutStore` over the store's update tables. `target` labels new rollouts."""

    def __init__(self, store: UpdateStore, target: str = "") -> None:
        self._store = store
        self._target = target

    def add_rollout(self, rollout: Rollout, devices: Sequence[DeviceRecord]) -> None:
        self._store.add_rollout(
            UpdateRolloutRow(rollout.rollout_id, rollout.manifest_seq, rollout.manifest_id,
                             rollout.image_version, rollout.device_class, self._target,
                             rollout.created_ms),
            [_to_row(d) for d in devices])

    def rollout(self, rollout_id: str) -> Rollout | None:
        row = self._store.get_rollout(rollout_id)
        if row is None:
            return None
        return Rollout(row.rollout_id, row.manifest_ref, row.manifest_seq, row.image_version,
                       row.device_class, row.created_ms)

    def device(self, rollout_id: str, device_id: DeviceId) -> DeviceRecord | None:
        row = self._store.rollout_device(rollout_id, device_id)
        return None if row is None else _from_row(row)

    def devices(self, rollout_id: str) -> list[DeviceRecord]:
        return [_from_row(r) for r in self._store.rollout_devices(rollout_id)]

    def replace_device(self, rollout_id: str, record: DeviceRecord, *,
                       expect_revision: int) -> bool:
        return self._store.replace_rollout_device(rollout_id, _to_row(record),
                                                  expect_revision=expect_revision)


def _to_row(d: DeviceRecord) -> UpdateDeviceRow:
    return UpdateDeviceRow(d.device_id, d.state.value, None if d.reason is None else
                           d.reason.value, d.offset, d.attempts, d.updated_ms, d.revision)


def _from_row(r: UpdateDeviceRow) -> DeviceRecord:
    return DeviceRecord(r.device_id, DeviceState(r.state),
                        None if r.reason is None else UpdateReason(r.reason), r.offset,
                        r.attempts, r.updated_ms, r.revision)


# --- the service ------------------------------------------------------------------------------

class Sealer(Protocol):
    """What seals an offer for one device (`mqtt.commands.CloudLink` has it)."""

    def seal_down(self, device_id: DeviceId, body: bytes, route: str) -> bytes: ...


@dataclass(slots=True)
class ServiceStats:
    offers: int = 0
    chunks: int = 0
    bytes_served: int = 0
    reports: int = 0
    reports_refused: int = 0


class UpdateService:
    """Images, manifests, rollouts and the device-facing operations. Thread-safe."""

    def __init__(self, store: UpdateBackend, *, sealer: Sealer | None = None,
                 clock_ms: Callable[[], int] = _wall_clock_ms,
                 max_image: int = DEFAULT_MAX_IMAGE) -> None:
        self.store = store
        self.sealer = sealer
        self._clock_ms = clock_ms
        self.max_image = max_image
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = ServiceStats()

    def now_ms(self) -> int:
        return self._clock_ms()

    def _rollouts(self, target: str = "") -> Rollouts:
        return Rollouts(StoreRolloutStore(self.store, target))

    # -- images and manifests (operator side) ----------------------------------------------

    def add_image(self, data: bytes) -> bytes:
        """Store an image; returns its SHA-256 (its name). ConfigError when it is too large."""
        if not 0 < len(data) <= self.max_image:
            raise ConfigError(f"an image is 1 to {self.max_image} bytes, not {len(data)}")
        sha = hashlib.sha256(data).digest()
        self.store.put_image(sha, data, self.now_ms())
        return sha

    def create_manifest(self, image: bytes, *, device_class: str, version: int,
                        kind: str = "firmware", valid_ms: int = 30 * DAY_MS,
                        seq: int | None = None) -> UpdateManifestRow:
        """Store the image and an unsigned manifest for it (next sequence number unless
        given); the row's payload is what the vendor signs."""
        sha = self.add_image(image)
        now = self.now_ms()
        seq = self.store.max_manifest_seq() + 1 if seq is None else seq
        m = Manifest(seq, device_class, version, sha, len(image), now, now + valid_ms, kind)
        row = UpdateManifestRow(seq, device_class, version, sha, encode_manifest(m), None, None,
                                now)
        self.store.add_manifest(row)
        return row

    def import_signed(self, signed: bytes) -> UpdateManifestRow:
        """Attach a signed manifest to the manifest it signs (same payload, byte for byte)."""
        payload = signed_payload(signed)
        m = manifest_from_payload(payload)
        row = self.store.get_manifest(m.sequence)
        if row is None or row.payload != payload:
            raise ConfigError(f"manifest {m.sequence} was not created here (or differs from "
                              "what `update create` produced)")
        if self.store.get_image(row.image_sha256) is None:
            raise ConfigError("the manifest's image is not in the store")
        ref = manifest_ref(signed)
        self.store.set_signed_manifest(row.seq, signed, ref)
        return row._replace(signed=signed, manifest_ref=ref)

    def group_members(self, group: str) -> list[DeviceId]:
        """Devices of `group` that are not revoked, oldest first."""
        groups = self.store.device_groups()
        return [r.device_id for r in self.store.list_devices(limit=1_000_000)
                if groups.get(r.device_id.hex()) == group and r.status is not DeviceStatus.REVOKED]

    def start_rollout(self, signed: bytes, target: Target, *, rollout_id: str | None = None,
                      label: str = "") -> tuple[str, tuple[DeviceId, ...]]:
        """Import `signed` and create a rollout over `target`; returns (id, devices chosen)."""
        row = self.import_signed(signed)
        assert row.manifest_ref is not None
        rid = rollout_id or f"r{row.seq}-{secrets.token_hex(3)}"
        if not 0 < len(rid) <= 64 or not rid.isprintable():
            raise ConfigError("a rollout id is 1-64 printable characters")
        rollout = Rollout(rid, row.manifest_ref, row.seq, row.image_version, row.device_class,
                          self.now_ms())
        chosen = self._rollouts(label).create(rollout, target)
        return rid, chosen

    def summary(self, rollout_id: str) -> RolloutSummary:
        return self._rollouts().summary(rollout_id)

    def records(self, rollout_id: str) -> list[UpdateDeviceRow]:
        return self.store.rollout_devices(rollout_id)

    def to_offer(self, rollout_id: str) -> list[DeviceId]:
        """Devices of the rollout that are neither installed nor failed."""
        return self._rollouts().to_offer(rollout_id)

    # -- device side -----------------------------------------------------------------------

    def manifest_of(self, rollout_id: str) -> tuple[UpdateRolloutRow, UpdateManifestRow]:
        r = self.store.get_rollout(rollout_id)
        m = None if r is None else self.store.get_manifest(r.manifest_seq)
        if r is None or m is None or m.signed is None:
            raise ConfigError(f"no rollout {rollout_id!r:.60} with a signed manifest")
        return r, m

    def offer_for(self, device_id: DeviceId) -> Offer | None:
        """The newest open rollout's offer for the device, or None."""
        for rid in self.store.open_rollouts_of(device_id):
            _r, m = self.manifest_of(rid)
            assert m.signed is not None
            size = len(self.image(m.image_sha256))
            return Offer(rid, m.signed, m.image_sha256.hex(), size)
        return None

    def record_offer(self, rollout_id: str, device_id: DeviceId, *,
                     only_first: bool = False) -> None:
        """Note that the manifest went out (`only_first`: only a device still pending moves, so
        that unauthenticated offer polls cannot rewrite a device's progress)."""
        cur = self.store.rollout_device(rollout_id, device_id)
        if cur is None or cur.state in ("installed", "failed") or \
                (only_first and cur.state != DeviceState.PENDING.value):
            return
        try:
            self._rollouts().offer(rollout_id, device_id, now_ms=self.now_ms())
        except ReportRefused as exc:  # a concurrent report won; nothing to record
            log.info("offer not recorded: %s", exc)
        with self._lock:
            self.stats.offers += 1

    def sealed_offer(self, device_id: DeviceId) -> bytes | None:
        """The offer sealed with the device's downlink keys (HTTP), or None."""
        if self.sealer is None:
            raise ConfigError("this server has no downlink sealer for update offers")
        offer = self.offer_for(device_id)
        if offer is None:
            return None
        data = self.sealer.seal_down(device_id, encode_offer(offer), offer_route(device_id))
        self.record_offer(offer.rollout, device_id, only_first=True)
        return data

    def image(self, sha256: bytes) -> bytes:
        """An image from a small in-process cache (bounded) or the store; ConfigError if absent."""
        with self._lock:
            data = self._cache.get(sha256)
            if data is not None:
                self._cache.move_to_end(sha256)
                return data
        found = self.store.get_image(sha256)
        if found is None:
            raise ConfigError("no such image")
        with self._lock:
            self._cache[sha256] = found
            while sum(len(v) for v in self._cache.values()) > _CACHE_BYTES and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return found

    def chunk(self, sha256: bytes, offset: int, length: int) -> bytes:
        data = self.image(sha256)[offset:offset + length]
        with self._lock:
            self.stats.chunks += 1
            self.stats.bytes_served += len(data)
        return data

    def apply_report(self, device_id: DeviceId, report: Mapping[str, Any]) -> DeviceRecord:
        """Apply one authentic report (it names its rollout). Raises ReportRefused."""
        rid = report.get("rollout")
        if type(rid) is not str:
            raise ReportRefused(f"device {device_id}: report names no rollout")
        try:
            record = self._rollouts().report(rid, device_id, report, now_ms=self.now_ms())
        except ConfigError as exc:  # no such rollout
            raise ReportRefused(str(exc)) from None
        with self._lock:
            self.stats.reports += 1
        return record

    def refused(self, device_id: DeviceId, exc: ReportRefused, transport: str) -> None:
        """Count and audit a report that did not fit (it was authentic, so it is recorded)."""
        with self._lock:
            self.stats.reports_refused += 1
        log.warning("update report refused: %s", exc)
        try:
            self.store.add_events([AuditEvent(self.now_ms(), "update_report_refused", transport,
                                              "updates", device_id.hex(), str(exc)[:200])])
        except Exception:
            log.exception("could not audit a refused update report")


# --- MQTT: the server drives, the device says which offset it needs ----------------------------

class RpcCaller(Protocol):
    """`sensorseal.mqtt.rpc.RpcClient.call`."""

    def call(self, device_id: DeviceId, method: str, params: Any = None,
             timeout: float = 5.0) -> Any: ...


@dataclass(slots=True)
class DriveStats:
    """One pass over a rollout: outcomes per device, chunks, bytes, where each resumed."""

    outcomes: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    bytes_sent: int = 0
    first_need: dict[str, int] = field(default_factory=dict)  # device hex -> first offset asked
    stopped: dict[str, str] = field(default_factory=dict)  # device hex -> last call unanswered
    seconds: float = 0.0


class MqttRolloutDriver:
    """Offers a rollout's manifest to its unfinished devices over sealed JSON-RPC and pushes
    the chunks each device asks for. A device that does not answer in `timeout_s` is left
    where it is (offered / downloading) for the next pass: `drive()` is meant to be repeated
    until `summary().complete`. `on_chunk(device, offset)` is a test hook."""

    def __init__(self, service: UpdateService, rpc: RpcCaller, *, chunk_size: int = 4096,
                 timeout_s: float = 5.0, parallel: int = 16,
                 on_chunk: Callable[[DeviceId, int], None] | None = None) -> None:
        if not 0 < chunk_size <= 24 * 1024:
            raise ConfigError("an MQTT chunk is 1 byte to 24 KiB (it travels base64 in JSON "
                              "inside a 64 KiB envelope)")
        self.service = service
        self.rpc = rpc
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        self.parallel = parallel
        self._on_chunk = on_chunk or (lambda _d, _o: None)

    def drive(self, rollout_id: str) -> DriveStats:
        rollout, manifest = self.service.manifest_of(rollout_id)
        todo = self.service.to_offer(rollout_id)
        stats = DriveStats()
        lock = threading.Lock()
        started = time.perf_counter()
        with ThreadPoolExecutor(max(1, min(self.parallel, len(todo) or 1))) as pool:
            for outcome in pool.map(lambda d: self._drive_one(rollout, manifest, d, stats, lock),
                                    todo):
                stats.outcomes[outcome] += 1
        stats.seconds = time.perf_counter() - started
        return stats

    def _apply(self, device_id: DeviceId, rollout_id: str, report: Any) -> bool:
        """Apply a report from an answer; False when it refused (the device is done for this
        pass)."""
        if not isinstance(report, dict):
            return True
        try:
            self.service.apply_report(device_id, {**report, "rollout": rollout_id})
        except ReportRefused as exc:
            self.service.refused(device_id, exc, "mqtt")
            return False
        return True

    def _drive_one(self, rollout: UpdateRolloutRow, manifest: UpdateManifestRow,
                   device_id: DeviceId, stats: DriveStats, lock: threading.Lock) -> str:
        from sensorseal.mqtt.rpc import RpcError, RpcTimeout

        assert manifest.signed is not None
        rid = rollout.rollout_id
        self.service.record_offer(rid, device_id)
        size = len(self.service.image(manifest.image_sha256))
        budget = 2 * (size // self.chunk_size + 1) + 8  # a device that loops is cut off
        where = "update.offer"
        try:
            answer = self.rpc.call(device_id, "update.offer",
                                   {"rollout": rid,
                                    "manifest": base64.b64encode(manifest.signed).decode()},
                                   self.timeout_s)
            first = True
            while True:
                if not isinstance(answer, dict):
                    return "bad_answer"
                if not self._apply(device_id, rid, answer.get("report")):
                    return "refused"
                need = answer.get("need")
                if type(need) is not int:
                    return "done" if isinstance(answer.get("report"), dict) else "busy"
                if first:
                    with lock:
                        stats.first_need[device_id.hex()] = need
                    first = False
                budget -= 1
                if budget < 0 or need < 0:
                    return "runaway"
                self._on_chunk(device_id, need)
                data = self.service.chunk(manifest.image_sha256, need, self.chunk_size)
                with lock:
                    stats.chunks += 1
                    stats.bytes_sent += len(data)
                where = f"update.chunk@{need}"
                answer = self.rpc.call(device_id, "update.chunk",
                                       {"rollout": rid, "offset": need,
                                        "data": base64.b64encode(data).decode()},
                                       self.timeout_s)
        except RpcTimeout:
            with lock:
                stats.stopped[device_id.hex()] = where
            return "unreachable"
        except RpcError as exc:
            log.warning("device %s answered an update call with error %s", device_id, exc.code)
            return "rpc_error"
        except ConfigError as exc:  # e.g. the device was suspended meanwhile
            log.warning("cannot drive device %s: %s", device_id, exc)
            return "not_sendable"


def with_reason(record: UpdateDeviceRow) -> str:
    """`state` or `failed (reason)`, for tables."""
    return record.state if record.reason is None else f"{record.state} ({record.reason})"



# --- HTTP routes --------------------------------------------------------------------------------

def _parse_range(header: str, size: int, cap: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=a-b` or `bytes=a-` range (RFC 9110 14.1.2),
    at most `cap` bytes long; None if it is not satisfiable or not of that form."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or not first.isdigit() or "," in spec \
            or (last and not last.isdigit()) or len(first) > 15 or len(last) > 15:
        return None
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or end <= start:
        return None
    return start, min(end, start + cap)


def update_routes(service: UpdateService, pipeline: Any, *,
                  opener_for: Callable[[Any], Mapping[str, Any]] | None = None,
                  max_chunk: int = 256 * 1024) -> list[Any]:
    """Starlette routes: the public image (Range), the sealed offer, the sealed report.

    `pipeline` is the ingest `Pipeline` (reports are opened, stored and audited there);
    `opener_for(request)` gives extra `ingest` arguments (app.py's gateway layer opener)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from sensorseal.core.envelope import unseal
    from sensorseal.updates.transport import IMAGES_PATH, REPORT_ROUTE, decode_report

    async def image(request: Request) -> Response:
        raw = request.path_params["sha256"]
        if len(raw) != 64 or any(c not in "0123456789abcdef" for c in raw):
            return JSONResponse({"error": "not found"}, status_code=404)
        try:
            data = await run_in_threadpool(service.image, bytes.fromhex(raw))
        except ConfigError:
            return JSONResponse({"error": "not found"}, status_code=404)
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{raw}"',
                   "Cache-Control": "public, max-age=31536000, immutable"}
        header = request.headers.get("range")
        if header is None:
            if len(data) > max_chunk:  # whole images only when small: ask for ranges
                return Response(status_code=416, headers={**headers,
                                                          "Content-Range": f"bytes */{len(data)}"})
            service.chunk(bytes.fromhex(raw), 0, len(data))
            return Response(data, media_type="application/octet-stream", headers=headers)
        found = _parse_range(header, len(data), max_chunk)
        if found is None:
            return Response(status_code=416,
                            headers={**headers, "Content-Range": f"bytes */{len(data)}"})
        start, end = found
        body = service.chunk(bytes.fromhex(raw), start, end - start)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return Response(body, status_code=206, media_type="application/octet-stream",
                        headers=headers)

    async def offer(request: Request) -> Response:
        try:
            device_id = DeviceId.parse(request.path_params["device_id"])
            data = await run_in_threadpool(service.sealed_offer, device_id)
        except ConfigError:
            data = None  # unknown, suspended or malformed: the same answer as "nothing"
        if data is None:
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        return Response(data, media_type="application/cose; cose-type=cose-encrypt0",
                        headers={"Cache-Control": "no-store"})

    async def report(request: Request) -> Response:
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        declared = request.headers.get("content-length", "0")
        if kind != "application/cose" or not declared.isdigit() \
                or int(declared) > pipeline.max_size:
            return JSONResponse({"status": "rejected"}, status_code=415 if kind !=
                                "application/cose" else 413)
        body = await request.body()
        if len(body) > pipeline.max_size:
            return JSONResponse({"status": "rejected"}, status_code=413)
        extra = dict(opener_for(request)) if opener_for is not None else {}
        inner = extra.pop("opener", None) or unseal
        opened: list[Any] = []

        def capture(data: bytes, **kwargs: Any) -> Any:
            msg = inner(data, **kwargs)
            opened.append(msg)
            return msg

        client = request.client
        source = "unknown" if client is None else f"{client.host}:{client.port}"
        try:
            [result] = await run_in_threadpool(pipeline.ingest, [(body, REPORT_ROUTE)],
                                               transport="http", source=source,
                                               opener=capture, **extra)
        except Exception:  # IngestUnavailable: nothing stored, the device retries
            log.exception("update report could not be stored")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if not result.ok or not opened:
            return JSONResponse({"status": "rejected"}, status_code=403)
        msg = opened[-1]
        try:
            await run_in_threadpool(service.apply_report, msg.device_id,
                                    decode_report(msg.payload))
        except (ReportRefused, Rejected) as exc:
            refusal = exc if isinstance(exc, ReportRefused) else ReportRefused(str(exc))
            await run_in_threadpool(service.refused, msg.device_id, refusal, "http")
        return JSONResponse({"status": "accepted"}, status_code=202)

    return [
        Route(IMAGES_PATH + "/{sha256}", image, methods=["GET"]),
        Route("/v1/updates/devices/{device_id}/offer", offer, methods=["GET"]),
        Route(REPORT_ROUTE, report, methods=["POST"]),
    ]
