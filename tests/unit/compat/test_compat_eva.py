"""EVA ICS v3 encrypted MQTT API frames: known structure, tamper cases, and interop with pyaltt2.

The interop peer is EVA's own crypto library, `pyaltt2.crypto` (what `eva.crypto` wraps), run
in a separate virtualenv (.peer-venvs/pyaltt2, created by `ensure_peer_venv`) as a subprocess
that builds frames exactly as EVA 3.4's `CoreAPIClient.do_call_mqtt` and `api.mqtt_api_handler`
do, and opens ours. Those tests skip (with the reason) only when the venv cannot be built.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.fernet import Fernet

from sensorseal.compat import eva
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.store.base import AuditEvent

ROOT = Path(__file__).resolve().parents[3]
PEER_VENV = ROOT / ".peer-venvs" / "pyaltt2"
PEER_PINS = ["pyaltt2==0.0.117", "pycryptodomex==3.24.2", "msgpack==1.2.4",
             "cryptography==48.0.0"]
API_KEY = "eva-api-key-0123456789abcdef"
KEY_ID = "operator"

# The peer: EVA 3.4's client and server steps, written with pyaltt2 (EVA's crypto) and msgpack.
PEER_SOURCE = r'''
import base64, hashlib, json, sys, uuid, zlib
import msgpack
import pyaltt2.crypto as pc
from cryptography.fernet import Fernet

def encrypt(data, private_key):   # eva.crypto.encrypt
    return pc.encrypt(data, private_key, hmac_key=True, key_is_hash=True, b64=False)

def decrypt(data, private_key):   # eva.crypto.decrypt
    return pc.decrypt(data, private_key, hmac_key=True, key_is_hash=True, b64=False)

for line in sys.stdin:
    cmd = json.loads(line)
    pk = hashlib.sha512(cmd["api_key"].encode()).digest()
    op = cmd["op"]
    try:
        if op == "build_request":        # CoreAPIClient.do_call_mqtt
            rid = uuid.uuid4().bytes
            body = msgpack.packb(cmd["payload"], use_bin_type=True)
            if cmd.get("enc") == 3:
                body = zlib.compress(body)
            frame = bytes([0, cmd.get("enc", 2)]) + cmd["key_id"].encode() + b"\x00" + \
                encrypt(rid + body, pk)
            out = {"rid": rid.hex(), "frame": frame.hex()}
        elif op == "open_response":      # CoreAPIClient.MQTTCallback + decrypt
            data = bytes.fromhex(cmd["frame"])
            assert data[0] == 0 and data[1] == 200
            out = {"response": msgpack.loads(decrypt(data[2:], pk), raw=False)}
        elif op == "open_request":       # api.mqtt_api_handler, binary branch
            data = bytes.fromhex(cmd["frame"])
            pfx, key_id, d = data.split(b"\x00", 2)
            d = decrypt(d, pk)
            out = {"key_id": key_id[1:].decode(), "rid": d[:16].hex(),
                   "payload": msgpack.loads(d[16:], raw=False)}
        elif op == "build_response":     # api.mqtt_api_handler, answer
            packed = msgpack.Packer(use_bin_type=True).pack(cmd["response"])
            out = {"frame": (b"\x00\xC8" + encrypt(packed, pk)).hex()}
        elif op == "build_text_request": # MQTTAPIClient (Fernet, text mode)
            ce = Fernet(base64.b64encode(hashlib.sha256(cmd["api_key"].encode()).digest()))
            data = cmd["call_id"] + "|" + json.dumps(cmd["payload"])
            frame = "|{}|{}".format(cmd["key_id"], ce.encrypt(data.encode()).decode())
            out = {"frame": frame.encode().hex()}
        elif op == "open_text_response":
            ce = Fernet(base64.b64encode(hashlib.sha256(cmd["api_key"].encode()).digest()))
            code, body = bytes.fromhex(cmd["frame"]).decode().split("|", 1)
            out = {"code": int(code), "response": json.loads(ce.decrypt(body.encode()))}
        else:
            out = {"error": "unknown op"}
    except Exception as exc:  # the peer refusing our bytes is a result, not a crash
        out = {"error": type(exc).__name__ + ": " + str(exc)}
    print(json.dumps(out), flush=True)
'''


def ensure_peer_venv() -> Path | None:
    """The peer's python; builds the venv with pinned packages on first use; None if impossible."""
    python = PEER_VENV / "bin" / "python"
    check = [str(python), "-c", "import pyaltt2.crypto, Cryptodome, msgpack, cryptography"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True,
                       capture_output=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PINS], check=True,
                       capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    return python if subprocess.run(check, capture_output=True).returncode == 0 else None


class Peer:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def __call__(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"api_key": API_KEY, "key_id": KEY_ID, **cmd}) + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    python = ensure_peer_venv()
    if python is None:
        pytest.skip("pyaltt2 peer venv could not be built (no network or pip failure)")
    script = tmp_path_factory.mktemp("peer") / "pyaltt2_peer.py"
    script.write_text(PEER_SOURCE)
    proc = subprocess.Popen([str(python), str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        yield Peer(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_server(audit: list[AuditEvent], **kw: Any) -> eva.EvaServer:
    def test(key_id: str, params: Any) -> Any:
        return {"ok": True, "key_id": key_id}

    def item_state(key_id: str, params: Any) -> Any:
        if not isinstance(params, dict) or "i" not in params:
            raise eva.EvaRpcError(eva.ERR_INVALID_PARAMS, "i is required")
        if params["i"] != "sensor:env/temp":
            raise eva.EvaRpcError(eva.ERR_NOT_FOUND, "no such item")
        return {"oid": "sensor:env/temp", "status": 1, "value": "21.5"}

    def boom(key_id: str, params: Any) -> Any:
        raise RuntimeError("handler bug")

    return eva.EvaServer(api_key_for={KEY_ID: API_KEY}.get,
                         handlers={"test": test, "item.state": item_state, "boom": boom},
                         rng=os.urandom, clock=Clock(), audit=audit.append, **kw)


# --- structure ----------------------------------------------------------------------------

def test_topics() -> None:
    assert eva.request_topic("uc", "plant1") == "controller/uc/plant1/api/request"
    assert eva.request_topic("uc", "plant1", "site/a") == "site/a/controller/uc/plant1/api/request"
    assert eva.response_topic("uc", "plant1", "ab" * 16) == \
        f"controller/uc/plant1/api/response/{'ab' * 16}"
    assert eva.discovery_topic() == "controller/discovery"
    assert eva.discovery_payload("uc", "plant1") == b"uc/plant1"
    assert eva.parse_request_topic("site/a/controller/lm/x/api/request", "site/a") == ("lm", "x")
    for bad in ("controller/uc/api/request", "controller/uc/a/b/api/request",
                "controller/u+/x/api/request", "other/uc/x/api/request"):
        with pytest.raises(Rejected):
            eva.parse_request_topic(bad)
    with pytest.raises(ConfigError):
        eva.response_topic("uc", "x", "a/b")
    with pytest.raises(ConfigError):
        eva.request_topic("uc", "#")


def test_block_layout_and_key_reuse() -> None:
    key = eva.rioja_key(API_KEY)
    assert key == hashlib.sha512(API_KEY.encode()).digest()[:32]
    iv = bytes(range(16))
    block = eva.seal_block(b"x" * 20, key, iv)
    assert block[:16] == iv and len(block) == 16 + 32 + 32
    import hmac as std_hmac
    assert block[-32:] == std_hmac.new(key, block[:-32], "sha256").digest()  # same key as AES
    assert eva.open_block(block, key) == b"x" * 20


def test_request_roundtrip_both_encodings() -> None:
    for enc in eva.FrameEncoding:
        rid = os.urandom(16)
        frame = eva.build_request({"jsonrpc": "2.0", "method": "test", "id": 1}, key_id=KEY_ID,
                                  api_key=API_KEY, request_id=rid, iv=os.urandom(16),
                                  encoding=enc)
        assert frame[:2] == bytes([0, enc]) and frame[2:2 + len(KEY_ID)] == KEY_ID.encode()
        req = eva.open_request(frame, {KEY_ID: API_KEY}.get, now=0)
        assert req.request_id == rid.hex() and req.payload["method"] == "test"
        assert req.encoding is enc


def test_tampering_is_refused_with_reasons() -> None:
    frame = eva.build_request({"jsonrpc": "2.0", "method": "test", "id": 1}, key_id=KEY_ID,
                              api_key=API_KEY, request_id=bytes(16), iv=bytes(16))
    keys = {KEY_ID: API_KEY, "other": "another key"}.get
    cases: dict[str, tuple[bytes, RejectReason]] = {
        "flip ct": (frame[:-40] + bytes([frame[-40] ^ 1]) + frame[-39:], RejectReason.BAD_MAC),
        "flip iv": (frame[:len(KEY_ID) + 3] + bytes([frame[len(KEY_ID) + 3] ^ 1])
                    + frame[len(KEY_ID) + 4:], RejectReason.BAD_MAC),
        "flip tag": (frame[:-1] + bytes([frame[-1] ^ 1]), RejectReason.BAD_MAC),
        "other key id": (frame.replace(KEY_ID.encode(), b"other", 1), RejectReason.BAD_MAC),
        "unknown key id": (frame.replace(KEY_ID.encode(), b"nobody", 1),
                           RejectReason.UNKNOWN_DEVICE),
        "truncated": (frame[:-17], RejectReason.MALFORMED),
        "enc 0x05": (b"\x00\x05" + frame[2:], RejectReason.UNSUPPORTED),
        "not binary": (b"\x01" + frame[1:], RejectReason.MALFORMED),
        "no key id": (b"\x00\x02\x00" + frame[3:], RejectReason.MALFORMED),
        "oversize": (frame + bytes(eva.DEFAULT_MAX_FRAME), RejectReason.OVERSIZE),
    }
    for name, (data, reason) in cases.items():
        with pytest.raises(Rejected) as info:
            eva.open_request(data, keys, now=0)
        assert info.value.reason is reason, name
        assert API_KEY not in str(info.value)


def test_bad_padding_under_a_valid_mac_is_decrypt_failed() -> None:
    # Only a key holder can produce this: HMAC valid, padding invalid.
    key = eva.rioja_key(API_KEY)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    iv = bytes(16)
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = iv + enc.update(bytes(31) + b"\x07") + enc.finalize()
    import hmac as std_hmac
    block = body + std_hmac.new(key, body, "sha256").digest()
    with pytest.raises(Rejected) as info:
        eva.open_block(block, key)
    assert info.value.reason is RejectReason.DECRYPT_FAILED


def test_zip_bomb_and_bad_msgpack() -> None:
    keys = {KEY_ID: API_KEY}.get
    bomb = zlib.compress(bytes(50 * 1024 * 1024))  # 50 MiB of zeros, ~50 KiB compressed
    key = eva.rioja_key(API_KEY)
    frame = (b"\x00\x03" + KEY_ID.encode() + b"\x00"
             + eva.seal_block(bytes(16) + bomb, key, bytes(16)))
    with pytest.raises(Rejected) as info:
        eva.open_request(frame, keys, now=0)
    assert info.value.reason is RejectReason.OVERSIZE
    for body, reason in ((b"\xc1", RejectReason.MALFORMED),            # never-used byte
                         (b"\xd4\x01\x00", RejectReason.MALFORMED),     # ext type
                         (b"\x91" * 40 + b"\xc0", RejectReason.MALFORMED),  # depth 40
                         (b"\x92\x01", RejectReason.MALFORMED)):        # truncated
        frame = (b"\x00\x02" + KEY_ID.encode() + b"\x00"
                 + eva.seal_block(bytes(16) + body, key, bytes(16)))
        with pytest.raises(Rejected) as info:
            eva.open_request(frame, keys, now=0)
        assert info.value.reason is reason


def test_server_dispatch_ignore_and_audit() -> None:
    audit: list[AuditEvent] = []
    server = make_server(audit)
    client = eva.EvaClient(KEY_ID, API_KEY, os.urandom)
    rid, frame = client.call("item.state", {"i": "sensor:env/temp"})
    reply = server.handle(frame)
    assert reply is not None and reply.request_id == rid
    assert client.open(reply.frame)["result"]["value"] == "21.5"
    # replay of the same frame: ignored, audited
    assert server.handle(frame) is None
    assert audit[-1].reason == "replay"
    # errors are JSON-RPC errors with EVA's codes
    for method, params, code in (("item.state", {"i": "x"}, eva.ERR_NOT_FOUND),
                                 ("item.state", [], eva.ERR_INVALID_PARAMS),
                                 ("nope", None, eva.ERR_METHOD_UNKNOWN)):
        _, f = client.call(method, params)
        out = server.handle(f)
        assert out is not None
        assert client.open(out.frame)["error"]["code"] == code
    # a crashing handler gives EVA's "500|", which the client reports as a failure
    _, f = client.call("boom")
    out = server.handle(f)
    assert out is not None and out.frame == b"500|"
    with pytest.raises(Rejected):
        client.open(out.frame)
    # forged: wrong key -> no response, one audit entry, no secret in it
    n = len(audit)
    forger = eva.EvaClient(KEY_ID, "guessed key", os.urandom)
    assert server.handle(forger.call("test")[1], source="mqtt:forger") is None
    assert len(audit) == n + 1 and audit[-1].reason == "bad_mac"
    assert audit[-1].source == "mqtt:forger" and API_KEY not in repr(audit[-1])
    assert "guessed" not in repr(forger)


def test_notifications_and_batches() -> None:
    server = make_server([])
    frame = eva.build_request({"jsonrpc": "2.0", "method": "test"}, key_id=KEY_ID,
                              api_key=API_KEY, request_id=os.urandom(16), iv=os.urandom(16))
    assert server.handle(frame) is None  # notification: no id, no answer
    batch = [{"jsonrpc": "2.0", "method": "test", "id": 1},
             {"jsonrpc": "2.0", "method": "nope", "id": 2},
             {"jsonrpc": "2.0", "method": "test"}]
    frame = eva.build_request(batch, key_id=KEY_ID, api_key=API_KEY,
                              request_id=os.urandom(16), iv=os.urandom(16))
    reply = server.handle(frame)
    assert reply is not None
    out = eva.open_response(reply.frame, api_key=API_KEY)
    assert [r["id"] for r in out] == [1, 2] and "error" in out[1]


def test_replay_cache_is_bounded() -> None:
    server = make_server([], replay_capacity=2)
    client = eva.EvaClient(KEY_ID, API_KEY, os.urandom)
    frames = [client.call("test")[1] for _ in range(3)]
    assert all(server.handle(f) is not None for f in frames)
    assert server.evicted == 1 and len(server._seen) == 2


def test_text_mode_roundtrip_and_ttl() -> None:
    audit: list[AuditEvent] = []
    clock = Clock()
    server = make_server(audit)
    server.clock = clock
    frame = eva.build_text_request({"jsonrpc": "2.0", "method": "test", "id": 7},
                                   key_id=KEY_ID, api_key=API_KEY, call_id="c0ffee-1",
                                   now=clock.now)
    reply = server.handle(frame)
    assert reply is not None and reply.request_id == "c0ffee-1"
    assert reply.frame.startswith(b"200|")
    assert eva.open_response(reply.frame, api_key=API_KEY)["result"]["ok"] is True
    # the same token replayed after the TTL: Fernet refuses it, uniformly
    clock.now += 3600
    frame2 = eva.build_text_request({"jsonrpc": "2.0", "method": "test", "id": 8},
                                    key_id=KEY_ID, api_key=API_KEY, call_id="c0ffee-2",
                                    now=clock.now - 3600)
    assert server.handle(frame2) is None and audit[-1].reason == "bad_mac"
    # call ids that would inject topic levels are refused
    token = Fernet(eva.fernet_key(API_KEY)).encrypt_at_time(b"a/#|{}", int(clock.now))
    assert server.handle(b"|" + KEY_ID.encode() + b"|" + token) is None
    assert audit[-1].reason == "malformed"


# --- interop with EVA's own crypto (pyaltt2) ----------------------------------------------

@pytest.mark.interop
def test_pyaltt2_request_opens_here(peer: Peer) -> None:
    call = {"jsonrpc": "2.0", "method": "item.state", "params": {"i": "sensor:env/temp"},
            "id": 5}
    for enc in (2, 3):
        built = peer(op="build_request", payload=call, enc=enc)
        req = eva.open_request(bytes.fromhex(built["frame"]), {KEY_ID: API_KEY}.get, now=0)
        assert req.request_id == built["rid"] and req.payload == call


@pytest.mark.interop
def test_our_request_opens_in_pyaltt2_and_responses_both_ways(peer: Peer) -> None:
    call = {"jsonrpc": "2.0", "method": "test", "id": 9}
    rid = os.urandom(16)
    frame = eva.build_request(call, key_id=KEY_ID, api_key=API_KEY, request_id=rid,
                              iv=os.urandom(16))
    opened = peer(op="open_request", frame=frame.hex())
    assert opened == {"key_id": KEY_ID, "rid": rid.hex(), "payload": call}
    # our server's answer opens in EVA's client code
    server = make_server([])
    reply = server.handle(bytes.fromhex(peer(op="build_request", payload=call)["frame"]))
    assert reply is not None
    assert peer(op="open_response", frame=reply.frame.hex())["response"]["result"]["ok"]
    # EVA's server answer opens in our client
    response = {"jsonrpc": "2.0", "result": {"value": 3}, "id": 9}
    theirs = bytes.fromhex(peer(op="build_response", response=response)["frame"])
    assert eva.open_response(theirs, api_key=API_KEY) == response


@pytest.mark.interop
def test_pyaltt2_text_mode(peer: Peer) -> None:
    call = {"jsonrpc": "2.0", "method": "test", "id": 3}
    frame = bytes.fromhex(peer(op="build_text_request", payload=call, call_id="abc-123")["frame"])
    server = make_server([])
    server.clock = Clock(__import__("time").time())
    reply = server.handle(frame)
    assert reply is not None and reply.request_id == "abc-123"
    out = peer(op="open_text_response", frame=reply.frame.hex())
    assert out["code"] == 200 and out["response"]["result"]["ok"] is True


@pytest.mark.interop
def test_pyaltt2_refuses_our_tampered_frames_too(peer: Peer) -> None:
    frame = eva.build_request({"jsonrpc": "2.0", "method": "test", "id": 1}, key_id=KEY_ID,
                              api_key=API_KEY, request_id=bytes(16), iv=bytes(16))
    tampered = frame[:-40] + bytes([frame[-40] ^ 1]) + frame[-39:]
    assert "HMAC" in peer(op="open_request", frame=tampered.hex())["error"]


def test_msgpack_is_what_eva_writes() -> None:
    # EVA packs with use_bin_type=True and reads with raw=False: str stays str, bytes stay bytes
    value = {"s": "x", "b": b"\x00", "n": [1, 2.5, None, True]}
    assert msgpack.unpackb(eva._pack(value), raw=False) == value
