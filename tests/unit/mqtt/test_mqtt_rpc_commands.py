"""RPC dispatch, command/ack encoding, the downlink counter and the worker's cheap checks."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import cbor2
import pytest

from sensorseal.core.envelope import seal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import derive
from sensorseal.mqtt.client import _decode_command
from sensorseal.mqtt.commands import DownlinkCounter, _decode_ack
from sensorseal.mqtt.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    RpcDispatcher,
    encode_request,
)
from sensorseal.mqtt.worker import RateLimit, _Buckets, _claimed_kid

DEV = DeviceId(bytes.fromhex("6650a1b2c3d4e5f601234567"))


def _answer(d: RpcDispatcher, req: bytes) -> dict[str, object]:
    _, resp = d.handle(req)
    out = json.loads(resp)
    assert isinstance(out, dict)
    return out


def test_dispatch_results_and_errors() -> None:
    d = RpcDispatcher()
    d.register("add", lambda a, b: a + b)

    @d.method("boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    assert _answer(d, encode_request("a1", "add", [1, 2])) == {
        "jsonrpc": "2.0", "id": "a1", "result": 3}
    assert _answer(d, encode_request("a2", "add", {"a": 1, "b": 5}))["result"] == 6
    assert _answer(d, encode_request("a3", "nope", None))["error"]["code"] == METHOD_NOT_FOUND  # type: ignore[index]
    assert _answer(d, encode_request("a4", "add", [1]))["error"]["code"] == INVALID_PARAMS  # type: ignore[index]
    err = _answer(d, encode_request("a5", "boom", None))["error"]
    assert err == {"code": INTERNAL_ERROR, "message": "internal error"}  # no exception text
    bad = json.dumps({"jsonrpc": "1.0", "id": "a6", "method": "add"}).encode()
    assert _answer(d, bad)["error"]["code"] == INVALID_REQUEST  # type: ignore[index]


@pytest.mark.parametrize("req", [b"not json", b"[]", b'{"id": "ZZ", "method": "x"}',
                                 b'{"jsonrpc": "2.0", "method": "x"}'])
def test_unanswerable_requests_are_rejected(req: bytes) -> None:
    with pytest.raises(Rejected) as exc:
        RpcDispatcher().handle(req)
    assert exc.value.reason is RejectReason.MALFORMED


def test_command_and_ack_bodies() -> None:
    assert _decode_command(cbor2.dumps({"cmd": "ab", "body": b"x"})) == ("ab", b"x")
    for bad in (b"\xff", cbor2.dumps([1]), cbor2.dumps({"cmd": 1, "body": b""}),
                cbor2.dumps({"cmd": "ab", "body": "text"})):
        with pytest.raises(Rejected):
            _decode_command(bad)
    ack = _decode_ack(cbor2.dumps({"cmd": "ab", "ok": False, "error": "no"}))
    assert (ack.command_id, ack.ok, ack.error) == ("ab", False, "no")
    with pytest.raises(Rejected):
        _decode_ack(cbor2.dumps({"cmd": "ab", "ok": "yes"}))


def test_downlink_counter_never_repeats_across_instances_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "down.db"
    a, b = DownlinkCounter(path, block=8), DownlinkCounter(path, block=8)
    got: list[int] = []
    lock = threading.Lock()

    def take(counter: DownlinkCounter) -> None:
        for _ in range(100):
            n = counter.next(DEV, 1)
            with lock:
                got.append(n)

    threads = [threading.Thread(target=take, args=(c,)) for c in (a, a, b, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 400 and min(got) >= 1
    a.close()
    b.close()
    c = DownlinkCounter(path, block=8)
    assert c.next(DEV, 1) > max(got)
    assert c.next(DEV, 2) == 1  # another epoch has its own numbers


def test_claimed_kid_reads_the_protected_header() -> None:
    keys = derive(os.urandom(32), DEV, 1, Direction.UP)
    for level in (Level.SEALED, Level.SIGNED):
        env = seal(b"x", keys=keys, seq=7, route="r", timestamp_ms=1, level=level)
        assert _claimed_kid(env) == DEV
    assert _claimed_kid(b"") is None
    assert _claimed_kid(b"\xd0\x83\x45\xff\xff\xff\xff\xff") is None


def test_token_bucket() -> None:
    now = [0.0]
    buckets = _Buckets(RateLimit(per_s=2.0, burst=3.0), lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # per device
    now[0] += 1.0
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
