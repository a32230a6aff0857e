"""HttpSender: retries what may succeed, not what was refused; batch verdicts; real sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import unseal
from sensorseal.core.errors import ConfigError, Rejected, SensorsealError
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.device import Device, HttpSender, SendError

BASE = "https://ingest.example"
Handler = Callable[[httpx.Request], httpx.Response]


class Script:
    """A MockTransport handler that plays a list of outcomes and records every request."""

    def __init__(self, *outcomes: int | Exception | httpx.Response) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, int):
            return httpx.Response(outcome)
        return outcome


def sender(handler: Handler, sleeps: list[float], rng: float = 1.0,
           **kw: Any) -> HttpSender:
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return HttpSender(BASE, client=client, sleep=sleeps.append, rng=lambda: rng, **kw)


def test_503_then_202_resends_the_same_bytes() -> None:
    script = Script(503, 202)
    sleeps: list[float] = []
    result = sender(script, sleeps).send(b"\xd0envelope")
    assert result.accepted and result.status == 202 and result.attempts == 2
    assert result.maybe_duplicate  # a 503 may come from a proxy after the server stored it
    assert sleeps == [0.2]
    for req in script.requests:
        assert req.method == "POST" and req.url == f"{BASE}/v1/messages"
        assert req.headers["content-type"] == "application/cose"
        assert req.content == b"\xd0envelope"


def test_connection_errors_are_retried_and_not_duplicates() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), 202)
    sleeps: list[float] = []
    result = sender(script, sleeps).send(b"e")
    assert result.accepted and result.attempts == 3 and not result.maybe_duplicate
    assert sleeps == [0.2, 0.4]


def test_read_timeout_makes_the_outcome_unknown() -> None:
    script = Script(httpx.ReadTimeout("no answer"), 403)
    sleeps: list[float] = []
    result = sender(script, sleeps).send(b"e")
    assert not result.accepted and result.status == 403 and result.maybe_duplicate


def test_403_is_not_retried() -> None:
    script = Script(403, 202)
    sleeps: list[float] = []
    result = sender(script, sleeps).send(b"e")
    assert (result.accepted, result.status, result.attempts) == (False, 403, 1)
    assert len(script.requests) == 1 and sleeps == []
    assert not result.maybe_duplicate


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 415])
def test_other_4xx_not_retried(status: int) -> None:
    script = Script(status)
    sleeps: list[float] = []
    assert sender(script, sleeps).send(b"e").attempts == 1


def test_429_backs_off_exponentially_with_full_jitter_and_cap() -> None:
    script = Script(429, 429, 429, 429, 429, 202)
    sleeps: list[float] = []
    result = sender(script, sleeps, backoff_base=0.5, backoff_max=3).send(b"e")
    assert result.accepted and result.attempts == 6 and not result.maybe_duplicate
    assert sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]  # rng=1.0: the top of each jitter range
    sleeps2: list[float] = []
    sender(Script(429, 429, 202), sleeps2, rng=0.25).send(b"e")
    assert sleeps2 == [0.05, 0.1]  # full jitter: uniform in [0, cap]


def test_retry_after_raises_the_floor_but_not_past_the_cap() -> None:
    limited = httpx.Response(429, headers={"Retry-After": "2"})
    script = Script(limited, limited, 202)
    sleeps: list[float] = []
    sender(script, sleeps, rng=0.0, backoff_max=5).send(b"e")
    assert sleeps == [2.0, 2.0]
    huge = httpx.Response(503, headers={"Retry-After": "3600"})
    sleeps2: list[float] = []
    sender(Script(huge, 202), sleeps2, rng=0.0, backoff_max=5).send(b"e")
    assert sleeps2 == [5.0]


def test_gives_up_with_a_clear_error() -> None:
    script = Script(503)
    sleeps: list[float] = []
    with pytest.raises(SendError) as ei:
        sender(script, sleeps, max_retries=3).send(b"e")
    err = ei.value
    assert isinstance(err, SensorsealError)
    assert (err.status, err.exc_type, err.attempts) == (503, None, 4)
    assert "status 503" in str(err) and "4 attempts" in str(err)
    assert len(script.requests) == 4 and len(sleeps) == 3

    with pytest.raises(SendError) as ei:
        sender(Script(httpx.ConnectError("down")), [], max_retries=0).send(b"e")
    assert (ei.value.status, ei.value.exc_type, ei.value.attempts) == (None, "ConnectError", 1)
    assert isinstance(ei.value.__cause__, httpx.ConnectError)


def test_batch_sends_a_cbor_array_and_maps_verdicts() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url == f"{BASE}/v1/messages:batch"
        assert request.headers["content-type"] == "application/cbor"
        items = cbor2.loads(request.content)
        assert items == [b"a", b"bb", b"ccc"]
        return httpx.Response(200, content=cbor2.dumps([0, 1, 0]),
                              headers={"content-type": "application/cbor"})

    assert sender(handler, []).send_batch([b"a", b"bb", b"ccc"]) == [True, False, True]


def test_batch_retries_then_succeeds_and_empty_sends_nothing() -> None:
    ok = httpx.Response(200, content=cbor2.dumps([0]))
    script = Script(502, ok)
    sleeps: list[float] = []
    s = sender(script, sleeps)
    assert s.send_batch([b"x"]) == [True]
    assert len(script.requests) == 2 and script.requests[0].content == script.requests[1].content
    assert s.send_batch([]) == [] and len(script.requests) == 2


@pytest.mark.parametrize("body", [
    b"not cbor \xff", cbor2.dumps([0]), cbor2.dumps([0, 2]), cbor2.dumps({"a": 0}),
    cbor2.dumps([0, True]),
])
def test_batch_malformed_answer(body: bytes) -> None:
    with pytest.raises(SendError, match="malformed") as ei:
        sender(Script(httpx.Response(200, content=body)), []).send_batch([b"x", b"y"])
    assert not ei.value.retryable


def test_batch_refused_as_a_whole_is_not_retried() -> None:
    script = Script(413)
    with pytest.raises(SendError) as ei:
        sender(script, []).send_batch([b"x"])
    assert ei.value.status == 413 and not ei.value.retryable and len(script.requests) == 1


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        HttpSender("ftp://x")
    with pytest.raises(ConfigError):
        HttpSender("https://x", verify=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError):
        HttpSender("https://x", backoff_base=0)
    with pytest.raises(ConfigError):
        HttpSender("https://x", max_retries=-1)
    s = HttpSender("https://user:pw@x.example:8443/prefix")
    assert "pw" not in repr(s) and "x.example:8443" in repr(s)
    s.close()


# --- real sockets on 127.0.0.1 --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ingest() -> Iterator[tuple[str, DeviceCredential, list[bytes]]]:
    """A tiny ingest server that opens envelopes with the core: 202 accepted, 403 refused."""
    cred = DeviceCredential(DeviceId(b"\x07" * 12), 0, b"\x42" * 32)
    ctx = SecurityContext.from_secret(cred.secret, cred.device_id, 0, Direction.UP)
    payloads: list[bytes] = []
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            status = 415
            if self.headers["content-type"] == "application/cose":
                try:
                    with lock:
                        opened = unseal(body, route=self.path, contexts=lambda d, e: ctx,
                                        now_ms=0)
                    payloads.append(opened.payload)
                    status = 202
                except Rejected:
                    status = 403
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", cred, payloads
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_device_to_real_http_server(ingest: tuple[str, DeviceCredential, list[bytes]],
                                    tmp_path: Path) -> None:
    url, cred, payloads = ingest
    with Device(cred, tmp_path) as dev, HttpSender(url, timeout=5) as s:
        data = dev.seal(b"reading 1")
        assert s.send(data).status == 202
        # Resending the same bytes is harmless: the replay check refuses the second copy.
        again = s.send(data)
        assert (again.accepted, again.status, again.attempts) == (False, 403, 1)
        assert s.send(dev.seal_json({"n": 2})).accepted
    assert payloads == [b"reading 1", b'{"n":2}']


def test_real_connection_refused() -> None:
    sleeps: list[float] = []
    port = free_port()  # closed again: nothing listens there
    with HttpSender(f"http://127.0.0.1:{port}", timeout=2, max_retries=2, sleep=sleeps.append,
                    rng=lambda: 0.5) as s, pytest.raises(SendError) as ei:
        s.send(b"e")
    assert ei.value.exc_type == "ConnectError" and ei.value.attempts == 3
    assert sleeps == [0.1, 0.2]
