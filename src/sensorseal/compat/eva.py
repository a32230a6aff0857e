"""EVA ICS v3's encrypted API over MQTT: frames, a server role and a client role, all pure.

EVA ICS v3 controllers answer JSON-RPC 2.0 calls sent through an MQTT broker. The frames are
encrypted and authenticated end to end with a key derived from the API key, so the broker only
routes them. sensorseal speaks the same frames so that EVA nodes and tools keep working.

Topics (`space/` is an optional prefix)::

    {space/}controller/{product}/{system}/api/request            requests
    {space/}controller/{product}/{system}/api/response/{id_hex}  responses
    {space/}controller/discovery                                  payload "{product}/{system}"

Binary frames (EVA 3.4, `eva.client.coreapiclient` and `eva.api.mqtt_api_handler`)::

    request  = 0x00 | enc | key_id (ASCII) | 0x00 | C         enc: 0x02 msgpack, 0x03 zlib+msgpack
    response = 0x00 | 0xC8 | C'                                 or the ASCII text "500|" on failure
    C        = IV (16) || AES-256-CBC-PKCS7(plain) || HMAC-SHA256(IV || CT)
    plain    = request_id (16) || body    (request; the response has no request_id)
    h        = SHA-512(api_key);  AES key = HMAC key = h[:32]   (pyaltt2.crypto.Rioja)

Text frames (older EVA clients, Fernet)::

    request  = "|" key_id "|" Fernet(call_id "|" JSON)          Fernet key = b64(SHA-256(api_key))
    response = "200|" Fernet(JSON)

Weaknesses we cannot fix without changing the peer (docs/compat.md): the *same* 32 bytes key
AES and HMAC (key reuse across primitives); no sequence number or timestamp in binary frames
(the server keeps a bounded cache of seen request ids to refuse replays); the API key is a
shared secret held by both sides. What we add: the HMAC is verified (constant time) before
anything is decrypted, PKCS#7 padding is checked strictly, zlib output and msgpack shapes are
bounded, and a request that fails any check gets *no* answer (only an audit entry), so the
server is no decryption or padding oracle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import msgpack  # no stubs; pinned msgpack==1.2.4
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sensorseal.compat._json import loads_bounded
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.store.base import AuditEvent

__all__ = [
    "DEFAULT_MAX_FRAME",
    "EvaClient",
    "EvaReply",
    "EvaRequest",
    "EvaRpcError",
    "EvaServer",
    "FrameEncoding",
    "build_request",
    "build_response",
    "build_text_request",
    "discovery_payload",
    "discovery_topic",
    "fernet_key",
    "open_block",
    "open_request",
    "open_response",
    "parse_request_topic",
    "request_topic",
    "response_topic",
    "rioja_key",
    "seal_block",
]

DEFAULT_MAX_FRAME: Final = 256 * 1024
DEFAULT_MAX_BODY: Final = 1024 * 1024  # after zlib: bounds a zip bomb
FAILURE_FRAME: Final = b"500|"
RESPONSE_OK: Final = b"\x00\xc8"  # 0x00, then 200 as one byte
_IV_LEN = 16
_TAG_LEN = 32
_RID_LEN = 16
_MAX_DEPTH = 32
_MAX_BATCH = 32
_KEY_ID_RE = re.compile(rb"[A-Za-z0-9_.@:+=-]{1,64}")
_CALL_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")  # becomes a topic level: no '/', '+', '#'
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}(?:/[A-Za-z0-9_.-]{1,64}){0,3}")

# EVA's JSON-RPC error codes (eva.client.apiclient): what EVA tools expect to read.
ERR_NOT_FOUND: Final = 1
ERR_FORBIDDEN: Final = 2
ERR_METHOD_UNKNOWN: Final = 6
ERR_FUNC_FAILED: Final = 10
ERR_INVALID_PARAMS: Final = 11


class FrameEncoding(IntEnum):
    """Second byte of a binary request: how the body is encoded."""

    MSGPACK = 0x02
    ZLIB_MSGPACK = 0x03


# --- topics -------------------------------------------------------------------------------

def _prefix(space: str | None) -> str:
    if space is None or space == "":
        return ""
    if not _SPACE_RE.fullmatch(space):
        raise ConfigError("bad EVA space name")
    return space + "/"


def _names(product: str, system: str) -> str:
    if not (_NAME_RE.fullmatch(product) and _NAME_RE.fullmatch(system)):
        raise ConfigError("bad EVA product or system name")
    return f"{product}/{system}"


def request_topic(product: str, system: str, space: str | None = None) -> str:
    return f"{_prefix(space)}controller/{_names(product, system)}/api/request"


def response_topic(product: str, system: str, request_id_hex: str,
                   space: str | None = None) -> str:
    if not _CALL_ID_RE.fullmatch(request_id_hex):
        raise ConfigError("bad request id")
    return f"{_prefix(space)}controller/{_names(product, system)}/api/response/{request_id_hex}"


def discovery_topic(space: str | None = None) -> str:
    return f"{_prefix(space)}controller/discovery"


def discovery_payload(product: str, system: str) -> bytes:
    return _names(product, system).encode("ascii")


def parse_request_topic(topic: str, space: str | None = None) -> tuple[str, str]:
    """(product, system) of a request topic; Rejected(MALFORMED) for any other topic."""
    pfx = _prefix(space)
    if not topic.startswith(pfx + "controller/") or not topic.endswith("/api/request"):
        raise Rejected(RejectReason.MALFORMED, "not an EVA request topic")
    middle = topic[len(pfx) + len("controller/"):-len("/api/request")].split("/")
    if len(middle) != 2 or not all(_NAME_RE.fullmatch(m) for m in middle):
        raise Rejected(RejectReason.MALFORMED, "bad product/system in topic")
    return middle[0], middle[1]


# --- the cipher block (pyaltt2.crypto "Rioja") --------------------------------------------

def rioja_key(api_key: str) -> bytes:
    """h[:32] of h = SHA-512(api_key): EVA uses these 32 bytes as AES key *and* HMAC key."""
    return hashlib.sha512(api_key.encode("utf-8")).digest()[:32]


def fernet_key(api_key: str) -> bytes:
    """The text mode's Fernet key: standard base64 of SHA-256(api_key)."""
    return base64.b64encode(hashlib.sha256(api_key.encode("utf-8")).digest())


def _mac(key: bytes, data: bytes) -> crypto_hmac.HMAC:
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac


def seal_block(plain: bytes, key: bytes, iv: bytes) -> bytes:
    """IV || AES-256-CBC-PKCS7(plain) || HMAC-SHA256(IV || CT), `key` = `rioja_key(...)`."""
    if len(key) != 32 or len(iv) != _IV_LEN:
        raise ConfigError("key must be 32 bytes and iv 16 bytes")
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = iv + enc.update(padded) + enc.finalize()
    return body + _mac(key, body).finalize()


def open_block(block: bytes, key: bytes) -> bytes:
    """Check the HMAC (constant time), *then* decrypt and strictly unpad; Rejected otherwise."""
    if len(block) < _IV_LEN + 16 + _TAG_LEN or (len(block) - _IV_LEN - _TAG_LEN) % 16:
        raise Rejected(RejectReason.MALFORMED, f"cipher block of {len(block)} bytes")
    body, tag = block[:-_TAG_LEN], block[-_TAG_LEN:]
    try:
        _mac(key, body).verify(tag)
    except InvalidSignature:
        raise Rejected(RejectReason.BAD_MAC, "HMAC did not verify") from None
    dec = Cipher(algorithms.AES(key), modes.CBC(body[:_IV_LEN])).decryptor()
    padded = dec.update(body[_IV_LEN:]) + dec.finalize()
    try:
        unpadder = padding.PKCS7(128).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        # Only reachable by whoever holds the key (the HMAC passed): still no oracle for others.
        raise Rejected(RejectReason.DECRYPT_FAILED, "bad padding") from None


# --- bounded decoding ---------------------------------------------------------------------

def _inflate(data: bytes, max_size: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_size)
    except zlib.error:
        raise Rejected(RejectReason.MALFORMED, "bad zlib stream") from None
    if inflater.unconsumed_tail:
        raise Rejected(RejectReason.OVERSIZE, f"zlib body over {max_size} bytes")
    if not inflater.eof or inflater.unused_data:
        raise Rejected(RejectReason.MALFORMED, "truncated or trailing zlib data")
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack ext types are not accepted")


def _depth_ok(value: Any) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > _MAX_DEPTH:
            return False
        stack.extend((c, depth + 1) for c in children)
    return True


def _unpack(body: bytes) -> Any:
    n = len(body)
    try:
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext,
            max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        raise Rejected(RejectReason.MALFORMED, "body is not msgpack") from None
    if not _depth_ok(value):
        raise Rejected(RejectReason.MALFORMED, "body nested too deeply")
    return value


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# --- requests and responses ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EvaRequest:
    """A verified request. `request_id` names the response topic; `text` for Fernet frames."""

    key_id: str
    request_id: str  # hex of the 16 binary bytes, or the text mode's call id
    payload: Any  # a JSON-RPC 2.0 call (dict) or batch (list)
    text: bool = False
    encoding: FrameEncoding = FrameEncoding.MSGPACK


@dataclass(frozen=True, slots=True)
class EvaReply:
    """What to publish: `frame` on `response_topic(product, system, request_id)`."""

    request_id: str
    frame: bytes


def _split_binary(frame: bytes) -> tuple[FrameEncoding, str, bytes]:
    if len(frame) < 3 or frame[0] != 0:
        raise Rejected(RejectReason.MALFORMED, "not a binary EVA frame")
    try:
        encoding = FrameEncoding(frame[1])
    except ValueError:
        raise Rejected(RejectReason.UNSUPPORTED, f"encoding 0x{frame[1]:02x}") from None
    end = frame.find(b"\x00", 2, 2 + 65)
    if end < 0 or not _KEY_ID_RE.fullmatch(frame, 2, end):
        raise Rejected(RejectReason.MALFORMED, "bad key id")
    return encoding, frame[2:end].decode("ascii"), frame[end + 1:]


def _split_text(frame: bytes) -> tuple[str, bytes]:
    parts = frame.split(b"|", 2)
    if len(parts) != 3 or parts[0] != b"" or not _KEY_ID_RE.fullmatch(parts[1]):
        raise Rejected(RejectReason.MALFORMED, "not a text EVA frame")
    return parts[1].decode("ascii"), parts[2]


def open_request(frame: bytes, api_key_for: Callable[[str], str | None], *, now: float,
                 max_frame: int = DEFAULT_MAX_FRAME, max_body: int = DEFAULT_MAX_BODY,
                 fernet_ttl_s: int | None = 300) -> EvaRequest:
    """Parse and verify a request frame (both modes); Rejected with the precise reason."""
    if not isinstance(frame, bytes | bytearray) or not frame:
        raise Rejected(RejectReason.MALFORMED, "empty frame")
    frame = bytes(frame)
    if len(frame) > max_frame:
        raise Rejected(RejectReason.OVERSIZE, f"{len(frame)} bytes")
    if frame[:1] == b"|":
        key_id, token = _split_text(frame)
        api_key = api_key_for(key_id)
        if api_key is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE, f"key id {key_id}")
        try:
            fernet = Fernet(fernet_key(api_key))
            if fernet_ttl_s is None:
                plain = fernet.decrypt(token)
            else:
                plain = fernet.decrypt_at_time(token, fernet_ttl_s, int(now))
        except InvalidToken:
            # Fernet gives one uniform failure (bad MAC, expired, malformed): no oracle.
            raise Rejected(RejectReason.BAD_MAC, "Fernet token did not verify") from None
        call_id, sep, body = plain.partition(b"|")
        try:
            call_text = call_id.decode("ascii")
        except UnicodeDecodeError:
            call_text = ""
        if not sep or not _CALL_ID_RE.fullmatch(call_text):
            raise Rejected(RejectReason.MALFORMED, "bad call id")
        payload = loads_bounded(body, max_size=max_body, max_depth=_MAX_DEPTH)
        return EvaRequest(key_id, call_text, payload, text=True)
    encoding, key_id, block = _split_binary(frame)
    api_key = api_key_for(key_id)
    if api_key is None:
        raise Rejected(RejectReason.UNKNOWN_DEVICE, f"key id {key_id}")
    plain = open_block(block, rioja_key(api_key))
    if len(plain) < _RID_LEN:
        raise Rejected(RejectReason.MALFORMED, "no request id")
    body = plain[_RID_LEN:]
    if encoding is FrameEncoding.ZLIB_MSGPACK:
        body = _inflate(body, max_body)
    elif len(body) > max_body:
        raise Rejected(RejectReason.OVERSIZE, f"body of {len(body)} bytes")
    return EvaRequest(key_id, plain[:_RID_LEN].hex(), _unpack(body), encoding=encoding)


def build_request(payload: Any, *, key_id: str, api_key: str, request_id: bytes, iv: bytes,
                  encoding: FrameEncoding = FrameEncoding.MSGPACK) -> bytes:
    """A binary request frame, as EVA's CoreAPIClient writes it (zlib for 0x03)."""
    if len(request_id) != _RID_LEN:
        raise ConfigError("request id must be 16 bytes")
    kid = key_id.encode("ascii")
    if not _KEY_ID_RE.fullmatch(kid):
        raise ConfigError("bad key id")
    body = _pack(payload)
    if encoding is FrameEncoding.ZLIB_MSGPACK:
        body = zlib.compress(body)
    return (b"\x00" + bytes([encoding]) + kid + b"\x00"
            + seal_block(request_id + body, rioja_key(api_key), iv))


def build_text_request(payload: Any, *, key_id: str, api_key: str, call_id: str,
                       now: float) -> bytes:
    """A text request frame; Fernet draws its own IV (cryptography's os.urandom)."""
    if not _CALL_ID_RE.fullmatch(call_id) or not _KEY_ID_RE.fullmatch(key_id.encode()):
        raise ConfigError("bad call id or key id")
    plain = call_id.encode("ascii") + b"|" + json.dumps(payload).encode("utf-8")
    token = Fernet(fernet_key(api_key)).encrypt_at_time(plain, int(now))
    return b"|" + key_id.encode("ascii") + b"|" + token


def build_response(response: Any, *, api_key: str, iv: bytes, text: bool = False,
                   now: float = 0) -> bytes:
    """The success frame for a response object (`0x00 0xC8 ...`, or `200|token` in text mode)."""
    if text:
        token = Fernet(fernet_key(api_key)).encrypt_at_time(
            json.dumps(response).encode("utf-8"), int(now))
        return b"200|" + token
    return RESPONSE_OK + seal_block(_pack(response), rioja_key(api_key), iv)


def open_response(frame: bytes, *, api_key: str, max_body: int = DEFAULT_MAX_BODY) -> Any:
    """The client side: decode a response frame; Rejected for failures and forgeries."""
    if frame.startswith(b"500|"):
        raise Rejected(RejectReason.UNSUPPORTED, "server answered 500")
    if frame.startswith(b"200|"):
        try:
            plain = Fernet(fernet_key(api_key)).decrypt(frame[4:])
        except InvalidToken:
            raise Rejected(RejectReason.BAD_MAC, "Fernet token did not verify") from None
        return loads_bounded(plain, max_size=max_body, max_depth=_MAX_DEPTH)
    if not frame.startswith(RESPONSE_OK):
        raise Rejected(RejectReason.MALFORMED, "not an EVA response")
    body = open_block(frame[2:], rioja_key(api_key))
    if len(body) > max_body:
        raise Rejected(RejectReason.OVERSIZE, f"body of {len(body)} bytes")
    return _unpack(body)


# --- server role --------------------------------------------------------------------------

class EvaRpcError(Exception):
    """Raised by a handler: becomes a JSON-RPC error with EVA's `code` in the response."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Handler = Callable[[str, Any], Any]  # (key_id, params) -> result


def _rpc_error(call_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": call_id}


@dataclass
class EvaServer:
    """The controller's side: verify a request, dispatch its JSON-RPC methods, seal the answer.

    `handle()` returns the reply to publish, or None: for a request that fails to verify (it
    is ignored, as EVA does, and audited) and for notifications (no id). The clock and the
    IV source are passed in, as everywhere in sensorseal's pure code.
    """

    api_key_for: Callable[[str], str | None]
    handlers: Mapping[str, Handler]
    rng: Callable[[int], bytes]
    clock: Callable[[], float]
    audit: Callable[[AuditEvent], None] | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    fernet_ttl_s: int | None = 300
    replay_capacity: int = 65536
    _seen: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)
    evicted: int = 0  # replay-cache evictions: a replay older than the cache is not caught

    def handle(self, frame: bytes, *, source: str = "mqtt") -> EvaReply | None:
        now = self.clock()
        try:
            request = open_request(frame, self.api_key_for, now=now, max_frame=self.max_frame,
                                   fernet_ttl_s=self.fernet_ttl_s)
            self._check_replay(request)
        except Rejected as exc:
            self._audit(exc, source, now)
            return None
        api_key = self.api_key_for(request.key_id)
        if api_key is None:  # removed between the two look-ups
            return None
        try:
            response = self._dispatch(request)
        except Exception:
            return EvaReply(request.request_id, FAILURE_FRAME)
        if response is None:
            return None
        frame_out = build_response(response, api_key=api_key, iv=self.rng(_IV_LEN),
                                   text=request.text, now=now)
        return EvaReply(request.request_id, frame_out)

    def _check_replay(self, request: EvaRequest) -> None:
        key = (request.key_id, request.request_id)
        if key in self._seen:
            raise Rejected(RejectReason.REPLAY, f"request id seen before for key {request.key_id}")
        self._seen[key] = None
        while len(self._seen) > self.replay_capacity:
            self._seen.popitem(last=False)
            self.evicted += 1

    def _audit(self, exc: Rejected, source: str, now: float) -> None:
        if self.audit is not None:
            self.audit(AuditEvent(int(now * 1000), exc.reason.value, "mqtt-eva", source,
                                  None, exc.detail))

    def _dispatch(self, request: EvaRequest) -> Any:
        payload = request.payload
        if isinstance(payload, list):
            if not payload or len(payload) > _MAX_BATCH:
                return _rpc_error(None, ERR_INVALID_PARAMS, "bad batch")
            results = [self._call(request.key_id, p) for p in payload]
            answered = [r for r in results if r is not None]
            return answered or None
        return self._call(request.key_id, payload)

    def _call(self, key_id: str, call: Any) -> dict[str, Any] | None:
        if not isinstance(call, dict):
            return _rpc_error(None, ERR_INVALID_PARAMS, "not a JSON-RPC call")
        call_id = call.get("id")
        method = call.get("method")
        params = call.get("params", {})
        if call.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _rpc_error(call_id, ERR_INVALID_PARAMS, "not a JSON-RPC 2.0 call")
        handler = self.handlers.get(method)
        try:
            if handler is None:
                raise EvaRpcError(ERR_METHOD_UNKNOWN, "API method not found")
            result = handler(key_id, params)
        except EvaRpcError as exc:
            response = _rpc_error(call_id, exc.code, exc.message)
        else:
            response = {"jsonrpc": "2.0", "result": result, "id": call_id}
        return None if call_id is None else response


# --- client role --------------------------------------------------------------------------

@dataclass
class EvaClient:
    """An EVA-style caller: builds request frames and opens the answers."""

    key_id: str
    api_key: str = field(repr=False)
    rng: Callable[[int], bytes]
    encoding: FrameEncoding = FrameEncoding.MSGPACK
    _next_id: int = 1

    def call(self, method: str, params: Any = None) -> tuple[str, bytes]:
        """(request id hex, frame) for one JSON-RPC call."""
        call: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._next_id}
        self._next_id += 1
        if params is not None:
            call["params"] = params
        rid = self.rng(_RID_LEN)
        frame = build_request(call, key_id=self.key_id, api_key=self.api_key, request_id=rid,
                              iv=self.rng(_IV_LEN), encoding=self.encoding)
        return rid.hex(), frame

    def open(self, frame: bytes) -> Any:
        return open_response(frame, api_key=self.api_key)
