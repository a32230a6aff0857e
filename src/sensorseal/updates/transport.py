"""How updates travel: the offer and report formats, and the device side of HTTP and MQTT.

Nothing here decides whether an update is acceptable: `DeviceUpdater` does (signatures, class,
versions, digest, size). These adapters only move bytes, and they never trust the path:

- **offer** (cloud -> device): CBOR `{"rollout": id, "manifest": signed manifest, "image": sha256
  hex, "size": n}`, always inside a downlink envelope sealed with the device's own downlink keys
  (COSE_Encrypt0, route bound), so only that device can read it and nobody can forge or replay
  one: over HTTP as the answer of `GET /v1/updates/devices/{id}/offer`, over MQTT as the sealed
  JSON-RPC request `update.offer` (the RPC layer seals it the same way).
- **image** (public): `GET /v1/updates/images/{sha256}` with `Range: bytes=a-b`
  (`HttpChunkFetcher`), or the sealed RPC `update.chunk` pushed by the server. Either way the
  signed digest covers every byte; a wrong byte ends in `digest_mismatch`, never in a slot.
- **report** (device -> cloud): `UpdateResult.as_dict()` plus `"rollout"`, sealed as uplink:
  over HTTP `POST /v1/updates/report` (route `/v1/updates/report`, opened and stored by the
  ingest pipeline like telemetry), over MQTT as the sealed RPC response.

MQTT runs the other way round from HTTP because a device may only publish on its own topics
(telemetry, state, acks, RPC responses): the server drives, the device answers each request
with the offset it needs next (`{"need": offset, "report": {...}}`), so a resumed transfer
starts wherever the device's durable download stopped, whoever lost the connection.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cbor2
import httpx

from sensorseal.core.errors import Rejected, RejectReason, SensorsealError
from sensorseal.core.ids import DeviceId, Level
from sensorseal.device.device import Device, wall_clock_ms
from sensorseal.updates.device_updater import DeviceUpdater, UpdateResult, UpdateStatus
from sensorseal.updates.manifest import UpdateReason, manifest_ref

__all__ = [
    "IMAGES_PATH",
    "REPORT_ROUTE",
    "HttpChunkFetcher",
    "HttpUpdateClient",
    "MqttUpdateAgent",
    "Offer",
    "TransferError",
    "decode_offer",
    "decode_report",
    "encode_offer",
    "encode_report",
    "offer_route",
]

log = logging.getLogger(__name__)

IMAGES_PATH = "/v1/updates/images"
REPORT_ROUTE = "/v1/updates/report"
MAX_OFFER = 20 * 1024  # a manifest is at most 16 KiB
MAX_REPORT = 4096
_CT_COSE = "application/cose"


def offer_route(device_id: DeviceId) -> str:
    """The route sealed into an HTTP offer (so it cannot be replayed as a command, or to
    another device): also the path it is fetched from."""
    return f"/v1/updates/devices/{device_id.hex()}/offer"


class TransferError(SensorsealError):
    """A chunk could not be fetched (status, framing). The updater reports `incomplete` and the
    next attempt resumes from the durable offset. Texts carry no URL."""


@dataclass(frozen=True, slots=True)
class Offer:
    rollout: str
    manifest: bytes  # the signed manifest, verified by the device, not by this codec
    image: str  # SHA-256 hex of the image as transferred (where to fetch it)
    size: int


def encode_offer(offer: Offer) -> bytes:
    return cbor2.dumps({"rollout": offer.rollout, "manifest": offer.manifest,
                        "image": offer.image, "size": offer.size}, canonical=True)


def decode_offer(payload: bytes) -> Offer:
    """Rejected(MALFORMED) unless `payload` is an offer (it came out of a verified envelope)."""
    try:
        body = cbor2.loads(payload, max_depth=2, allow_indefinite=False,
                           allow_duplicate_keys=False)
    except Exception:
        raise Rejected(RejectReason.MALFORMED, "offer is not CBOR") from None
    if not isinstance(body, dict) or set(body) != {"rollout", "manifest", "image", "size"}:
        raise Rejected(RejectReason.MALFORMED, "offer fields missing or unknown")
    rollout, manifest, image, size = (body["rollout"], body["manifest"], body["image"],
                                      body["size"])
    if (type(rollout) is not str or not 0 < len(rollout) <= 64 or type(manifest) is not bytes
            or type(image) is not str or len(image) != 64 or type(size) is not int
            or size < 0 or any(c not in "0123456789abcdef" for c in image)):
        raise Rejected(RejectReason.MALFORMED, "offer fields have the wrong types")
    return Offer(rollout, manifest, image, size)


def encode_report(rollout: str, report: Mapping[str, Any]) -> bytes:
    return cbor2.dumps({**report, "rollout": rollout})


def decode_report(payload: bytes) -> dict[str, Any]:
    """The report map of an opened envelope; Rejected(MALFORMED) for anything else."""
    if len(payload) > MAX_REPORT:
        raise Rejected(RejectReason.MALFORMED, "report too large")
    try:
        body = cbor2.loads(payload, max_depth=2, allow_indefinite=False,
                           allow_duplicate_keys=False)
    except Exception:
        raise Rejected(RejectReason.MALFORMED, "report is not CBOR") from None
    if not isinstance(body, dict) or not all(type(k) is str for k in body) \
            or type(body.get("rollout")) is not str:
        raise Rejected(RejectReason.MALFORMED, "report is not a map with a rollout")
    return body


def _already_running(updater: DeviceUpdater, manifest: bytes) -> dict[str, Any] | None:
    """The report for a manifest the device already runs (its active slot holds these very
    bytes): a re-offer after a lost report must not end as a refused replay."""
    try:
        active = (updater.active_image.parent / "manifest").read_bytes()
    except FileNotFoundError:
        return None
    if active != manifest:
        return None
    return {"status": UpdateStatus.INSTALLED.value, "running_version": updater.installed_version,
            "manifest": manifest_ref(manifest)}


# --- HTTP (device side) ---------------------------------------------------------------------

@dataclass(eq=False)
class HttpChunkFetcher:
    """A `ChunkFetcher` over HTTP Range requests: `GET {base}/v1/updates/images/{sha256}` with
    `Range: bytes=offset-(offset+chunk_size-1)`. 206 -> the bytes; 416 -> b"" (past the end,
    which the updater reports as size_mismatch); anything else raises TransferError."""

    client: httpx.Client
    base_url: str
    image: str
    chunk_size: int = 64 * 1024
    requests: int = 0
    received: int = 0
    ranges: list[int] = field(default_factory=list)

    def __call__(self, offset: int) -> bytes:
        self.requests += 1
        self.ranges.append(offset)
        end = offset + self.chunk_size - 1
        r = self.client.get(f"{self.base_url}{IMAGES_PATH}/{self.image}",
                            headers={"Range": f"bytes={offset}-{end}"})
        if r.status_code == 416:
            return b""
        if r.status_code != 206:
            raise TransferError(f"image range answered {r.status_code}")
        if not r.headers.get("content-range", "").startswith(f"bytes {offset}-") \
                or not 0 < len(r.content) <= self.chunk_size:
            raise TransferError("image range answer does not match the request")
        self.received += len(r.content)
        return r.content


class HttpUpdateClient:
    """One device's update loop over HTTPS: fetch the sealed offer, install, report sealed."""

    def __init__(self, device: Device, updater: DeviceUpdater, base_url: str, *,
                 client: httpx.Client | None = None, chunk_size: int = 64 * 1024,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.device = device
        self.updater = updater
        self.base_url = base_url.rstrip("/")
        self.chunk_size = chunk_size
        self._own_client = client is None
        self.client = client if client is not None else httpx.Client(timeout=10.0)
        self._clock_ms = clock_ms
        self.last_fetcher: HttpChunkFetcher | None = None

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def fetch_offer(self) -> Offer | None:
        """The pending offer, or None. Raises Rejected for an offer that is forged, replayed,
        for another device or malformed (the device's downlink keys and window decide)."""
        route = offer_route(self.device.device_id)
        r = self.client.get(self.base_url + route)
        if r.status_code == 204:
            return None
        if r.status_code != 200 or len(r.content) > MAX_OFFER:
            raise TransferError(f"offer answered {r.status_code}")
        opened = self.device.open_downlink(r.content, route, max_size=MAX_OFFER)
        if opened.level is not Level.SEALED:
            raise Rejected(RejectReason.POLICY_VIOLATION, "an offer must be sealed")
        return decode_offer(opened.payload)

    def report(self, rollout: str, report: Mapping[str, Any]) -> bool:
        """Send one sealed report; True if the server accepted the envelope."""
        data = self.device.seal(encode_report(rollout, report), route=REPORT_ROUTE)
        r = self.client.post(self.base_url + REPORT_ROUTE, content=data,
                             headers={"Content-Type": _CT_COSE})
        return r.status_code == 202

    def run_once(self) -> UpdateResult | dict[str, Any] | None:
        """Offer -> install -> report. None when there is nothing to do."""
        offer = self.fetch_offer()
        if offer is None:
            return None
        done = _already_running(self.updater, offer.manifest)
        if done is not None:
            self.report(offer.rollout, done)
            return done
        fetcher = HttpChunkFetcher(self.client, self.base_url, offer.image, self.chunk_size)
        self.last_fetcher = fetcher
        result = self.updater.install(offer.manifest, fetcher, now_ms=self._clock_ms())
        self.report(offer.rollout, result.as_dict())
        return result


# --- MQTT (device side) ---------------------------------------------------------------------

@dataclass(eq=False)
class _Job:
    rollout: str
    manifest: bytes
    ref: str
    need: int | None = None  # the offset the updater waits for
    chunk: bytes | None = None  # handed over by update.chunk, taken by the updater
    result: dict[str, Any] | None = None
    chunks: int = 0


class MqttUpdateAgent:
    """Serves the RPC methods `update.offer` and `update.chunk` for one `DeviceUpdater`.

    The updater pulls (`fetch(offset)`), MQTT pushes: `install` runs on a thread of its own and
    its fetcher waits for the chunk at the offset it asked for; each RPC answer says which
    offset that is (or carries the final report). A chunk that does not come within
    `chunk_timeout_s` ends the attempt as `incomplete` with the offset durable, and the next
    offer resumes there. Register on the device's dispatcher: `agent.register(mqtt_dev.rpc)`.
    """

    def __init__(self, updater: DeviceUpdater, *, clock_ms: Callable[[], int] = wall_clock_ms,
                 chunk_timeout_s: float = 30.0, answer_timeout_s: float = 10.0,
                 on_chunk: Callable[[int], None] | None = None) -> None:
        self.updater = updater
        self._clock_ms = clock_ms
        self._chunk_timeout = chunk_timeout_s
        self._answer_timeout = answer_timeout_s
        self._on_chunk = on_chunk or (lambda _offset: None)
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self.chunks_received = 0

    def register(self, rpc: Any) -> None:
        rpc.register("update.offer", self.offer)
        rpc.register("update.chunk", self.chunk)

    # RPC methods (run on the MqttDevice's downlink thread, one at a time)
    def offer(self, rollout: str, manifest: str) -> dict[str, Any]:
        data = _b64(manifest)
        if type(rollout) is not str:
            raise TypeError("rollout")
        with self._cond:
            job = self._job
            if job is not None and job.manifest == data and (job.result is None
                                                             or job.result["status"] in
                                                             _FINAL_STATUSES):
                return self._answer(job)  # a re-offer: where we are, or how it ended
            if job is not None and job.result is None:
                return {"need": None, "report": None}  # busy with another update
            done = _already_running(self.updater, data)
            job = _Job(rollout, data, manifest_ref(data), result=done)
            self._job = job
            if done is None:
                threading.Thread(target=self._run, args=(job,), daemon=True,
                                 name="update-install").start()
            return self._answer(job)

    def chunk(self, rollout: str, offset: int, data: str) -> dict[str, Any]:
        raw = _b64(data)
        if type(offset) is not int or type(rollout) is not str:
            raise TypeError("offset")
        with self._cond:
            job = self._job
            if job is None or job.rollout != rollout:
                return {"need": None, "report": None}  # nothing running: offer again
            if job.result is None and job.need == offset and job.chunk is None:
                job.chunk = raw
                job.need = None
                job.chunks += 1
                self.chunks_received += 1
                self._cond.notify_all()
            answer = self._answer(job)
        self._on_chunk(offset)
        return answer

    # internals
    def _answer(self, job: _Job) -> dict[str, Any]:
        self._cond.wait_for(lambda: job.need is not None or job.result is not None,
                            self._answer_timeout)
        if job.result is not None:
            return {"need": None, "report": job.result}
        if job.need is not None:
            return {"need": job.need, "report": {"status": UpdateStatus.DOWNLOADING.value,
                                                 "manifest": job.ref, "offset": job.need}}
        return {"need": None, "report": None}  # still busy (a slow health check)

    def _fetch(self, job: _Job, offset: int) -> bytes:
        with self._cond:
            job.need, job.chunk = offset, None
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: job.chunk is not None, self._chunk_timeout):
                job.need = None
                raise TimeoutError("no chunk in time")
            data, job.chunk = job.chunk, None
            assert data is not None
            return data

    def _run(self, job: _Job) -> None:
        try:
            report = self.updater.install(job.manifest, partial(self._fetch, job),
                                          now_ms=self._clock_ms()).as_dict()
        except Exception as exc:  # damaged local state (ConfigError) or a bug: report it
            log.exception("update install failed")
            report = {"status": UpdateStatus.REJECTED.value,
                      "reason": UpdateReason.INSTALL_FAILED.value, "manifest": job.ref,
                      "running_version": self.updater.installed_version,
                      "detail": type(exc).__name__}
        with self._cond:
            job.result, job.need = report, None
            self._cond.notify_all()


_FINAL_STATUSES = frozenset({"installed", "rejected", "rolled_back"})


def _b64(text: str) -> bytes:
    if type(text) is not str:
        raise TypeError("base64 text expected")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TypeError("not base64") from None

