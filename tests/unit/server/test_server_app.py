"""The HTTP adapter through Starlette's TestClient: every route, generic answers to senders,
reasons only for operators, and hostile input answered with a clean 4xx (never a 500)."""

from __future__ import annotations

import hmac
import json
import os
import warnings
from collections.abc import Iterator

import cbor2
import pytest
from server_support import ROUTE, Env, sealed

with warnings.catch_warnings():
    # Starlette 1.x nudges towards `httpx2`; the httpx transport it ships still works.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.ids import DeviceId, Level
from sensorseal.server.app import create_app
from sensorseal.server.pipeline import IngestResult, Pipeline

TOKEN = "op-" + "x" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COSE = {"Content-Type": "application/cose"}
CBOR = {"Content-Type": "application/cbor"}
BATCH = ROUTE + ":batch"


def token_check(token: str) -> bool:
    return hmac.compare_digest(token.encode(), TOKEN.encode())


def make_client(env: Env, pipeline: Pipeline | None = None, **kw: int) -> TestClient:
    app = create_app(pipeline or env.pipeline, env.registry, env.store,
                     token_check=token_check, **kw)
    # Server exceptions surface as 500 responses (as a real client would see them).
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with make_client(env, max_body=64 * 1024, max_batch=100) as c:
        yield c


@pytest.fixture
def cred(env: Env) -> DeviceCredential:
    return env.registry.add_device("sensor-1", "lax")


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


# -- one message ---------------------------------------------------------------------------

def test_post_message_accepted_and_stored(client: TestClient, env: Env,
                                          cred: DeviceCredential) -> None:
    r = client.post(ROUTE, content=sealed(cred, 1, b"t=21"), headers=COSE)
    assert (r.status_code, r.json()) == (202, {"status": "accepted"})
    [row] = env.store.telemetry(device_id=cred.device_id)
    assert (row.payload, row.transport, row.route) == (b"t=21", "http", ROUTE)


@pytest.mark.parametrize("ctype", [
    'application/cose; cose-type="cose-encrypt0"',
    "Application/COSE ; cose-type=cose-mac0",
    "application/cose;charset=binary",
])
def test_post_message_media_type_parameters(client: TestClient, cred: DeviceCredential,
                                            ctype: str) -> None:
    r = client.post(ROUTE, content=sealed(cred, 1), headers={"Content-Type": ctype})
    assert r.status_code == 202


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/cbor", "application/json",
                                   "application/cose-x", 'application/cose; cose-type="sign1"',
                                   "", ";;;"])
def test_post_message_wrong_content_type(client: TestClient, env: Env, cred: DeviceCredential,
                                         ctype: str | None) -> None:
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = client.post(ROUTE, content=sealed(cred, 1), headers=headers)
    assert (r.status_code, r.json()) == (415, {"status": "rejected"})
    assert env.store.count_telemetry() == 0
    assert len(env.store.events(reason="wrong_content_type")) == 1


def test_rejections_are_generic_and_reasons_audited(client: TestClient, env: Env,
                                                    cred: DeviceCredential) -> None:
    msg = sealed(cred, 1)
    assert client.post(ROUTE, content=msg, headers=COSE).status_code == 202
    tampered = bytearray(sealed(cred, 2, level=Level.SIGNED))
    tampered[-1] ^= 1
    stranger = DeviceCredential(DeviceId(os.urandom(12)), 1, os.urandom(32))
    for body, status in ((msg, 403), (bytes(tampered), 403), (sealed(stranger, 1), 403),
                         (b"\x00garbage", 400), (b"", 400)):
        r = client.post(ROUTE, content=body, headers=COSE)
        assert (r.status_code, r.json()) == (status, {"status": "rejected"})
        for word in ("replay", "mac", "unknown", "malformed"):
            assert word not in r.text
    got = {e.reason for e in env.store.events()}
    assert {"replay", "bad_mac", "unknown_device", "malformed"} <= got


def test_post_message_oversize(client: TestClient, env: Env, cred: DeviceCredential) -> None:
    body = sealed(cred, 1, b"x" * (env.pipeline.max_size + 10))
    r = client.post(ROUTE, content=body, headers=COSE)
    assert (r.status_code, r.json()) == (413, {"status": "rejected"})
    assert len(env.store.events(reason="oversize")) == 1


def test_streamed_body_without_length_is_cut_at_limit(client: TestClient, env: Env) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):  # 6.5 MB, a hundred times the limit
            yield b"\x00" * 65536

    r = client.post(ROUTE, content=chunks(), headers=COSE)
    assert r.status_code == 413
    assert len(env.store.events(reason="oversize")) == 1


@pytest.mark.parametrize("body", [
    b"\x81" * 100_000 + b"\x40",             # deeply nested arrays
    b"\xd0" * 50_000 + b"\x40",               # a tower of tags
    b"\x1b" + b"\xff" * 8,                    # the largest uint64
    b"\xc2\x59\xff\xff" + b"\xff" * 100,      # a truncated bignum
    b"\xd0\x83\x40\xa0",                      # truncated Encrypt0
    b"\xd0\x9f\x40\xa0\x40\xff",              # indefinite-length array
    b"\xd8\x18\x43\xd0\x83\x40",              # tag 24 (embedded CBOR)
    b"\xa1\x01\x02",                          # a map
])
def test_hostile_single_messages_get_4xx(client: TestClient, body: bytes) -> None:
    r = client.post(ROUTE, content=body, headers=COSE)
    assert r.status_code in (400, 403, 413)
    assert r.json() == {"status": "rejected"}


# -- batches -------------------------------------------------------------------------------

def test_batch_mixed_results_in_cbor(client: TestClient, env: Env, cred: DeviceCredential) -> None:
    good = [sealed(cred, s) for s in (1, 2, 3)]
    body = cbor2.dumps([good[0], b"junk", good[1], good[0], good[2]])
    r = client.post(BATCH, content=body, headers=CBOR)
    assert r.status_code == 200 and r.headers["content-type"] == "application/cbor"
    assert cbor2.loads(r.content) == [0, 1, 0, 1, 0]
    assert env.store.count_telemetry() == 3
    assert {e.reason for e in env.store.events()} >= {"malformed", "replay"}


def test_batch_json_when_asked(client: TestClient, cred: DeviceCredential) -> None:
    body = cbor2.dumps([sealed(cred, 1), b"x"])
    r = client.post(BATCH, content=body, headers={**CBOR, "Accept": "application/json"})
    assert r.json() == {"results": [0, 1], "accepted": 1, "rejected": 1}


def test_empty_batch(client: TestClient) -> None:
    r = client.post(BATCH, content=b"\x80", headers=CBOR)
    assert (r.status_code, cbor2.loads(r.content)) == (200, [])


@pytest.mark.parametrize("body", [
    b"",                                      # nothing
    b"\x82\x41a",                             # truncated (2 items announced, 1 given)
    b"\x81\x5a\xff\xff\xff\xff",              # a bstr head claiming 4 GB
    b"\xa1\x41a\x41b",                        # a map, not an array
    b"\x41a",                                 # a bare bstr
    b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff",  # a huge integer
    b"\x81\x1b\xff\xff\xff\xff\xff\xff\xff\xff",  # an array holding a huge integer
    b"\x81\xc2\x49" + b"\xff" * 9,            # an array holding a bignum (tag 2)
    b"\x81\x61a",                             # an item that is text, not bytes
    b"\x81\x81\x41a",                         # an item that is an array
    b"\x81" * 60_000 + b"\x41a",              # deeply nested arrays
    b"\xd8\x18\x82\x41a\x41b",                # the array inside a tag
    b"\x9f\x41a\xff",                         # indefinite-length array
    b"\x81\x5f\x41a\xff",                     # indefinite-length bstr item
    b"\x9c",                                  # reserved additional info
    b"\x81\x41a\x00",                         # trailing bytes
])
def test_malformed_batches_get_400(client: TestClient, env: Env, body: bytes) -> None:
    r = client.post(BATCH, content=body, headers=CBOR)
    assert (r.status_code, r.json()) == (400, {"status": "rejected"})
    assert len(env.store.events(reason="malformed")) == 1


def test_batch_wrong_content_type(client: TestClient, cred: DeviceCredential) -> None:
    body = cbor2.dumps([sealed(cred, 1)])
    for headers in ({"Content-Type": "application/cose"}, {}, {"Content-Type": "text/cbor"}):
        assert client.post(BATCH, content=body, headers=headers).status_code == 415


def test_batch_limits(client: TestClient, env: Env) -> None:
    too_many = b"\x98\x65" + b"\x40" * 101  # 101 empty bstrs, limit 100
    assert client.post(BATCH, content=too_many, headers=CBOR).status_code == 413
    claims_huge = b"\x9b" + b"\xff" * 8
    assert client.post(BATCH, content=claims_huge, headers=CBOR).status_code == 413
    too_big = cbor2.dumps([b"\x00" * 70_000])  # over max_body = 64 KiB
    assert client.post(BATCH, content=too_big, headers=CBOR).status_code == 413
    assert len(env.store.events(reason="oversize")) == 3


def test_store_failure_is_503_and_retry_works(env: Env, cred: DeviceCredential) -> None:
    class Failing:
        fail = True

        def __getattr__(self, name: str) -> object:
            return getattr(env.store, name)

        def record(self, rows: object, events: object = ()) -> list[bool]:
            if self.fail:
                raise OSError("database is locked")
            return env.store.record(rows, events)  # type: ignore[arg-type]

    store = Failing()
    pipeline = Pipeline(env.registry, store, clock_ms=env.clock)  # type: ignore[arg-type]
    with make_client(env, pipeline) as c:
        body = cbor2.dumps([sealed(cred, 1)])
        r = c.post(BATCH, content=body, headers=CBOR)
        assert (r.status_code, r.json()) == (503, {"status": "unavailable"})
        assert "locked" not in r.text
        store.fail = False
        r = c.post(BATCH, content=body, headers=CBOR)
        assert cbor2.loads(r.content) == [0]


# -- operator reads ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/devices", "/v1/telemetry", "/v1/events",
                                  "/v1/devices/" + "ab" * 12])
def test_operator_routes_need_the_token(client: TestClient, env: Env, path: str) -> None:
    assert client.get(path).status_code == 401
    for header in ("Bearer wrong", "Basic " + TOKEN, "Bearer", f"bearer {TOKEN}x",
                   "Bearer " + "y" * 10_000):
        r = client.get(path, headers={"Authorization": header})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert client.get(path, headers=AUTH).status_code in (200, 404)
    assert len(env.store.events(reason="auth_failed")) >= 3


def test_devices(client: TestClient, cred: DeviceCredential) -> None:
    r = client.get("/v1/devices", headers=AUTH)
    [dev] = r.json()["devices"]
    assert (dev["id"], dev["name"], dev["status"], dev["policy"]) == (
        cred.device_id.hex(), "sensor-1", "active", "lax")
    r = client.get(f"/v1/devices/{cred.device_id.hex()}", headers=AUTH)
    assert r.json()["epoch"] == cred.epoch
    assert "secret" not in r.text
    assert client.get("/v1/devices/" + "00" * 12, headers=AUTH).status_code == 404
    r = client.get("/v1/devices/not-an-id", headers=AUTH)
    assert r.status_code == 400 and "24 hexadecimal" in r.json()["error"]


def test_telemetry_shows_text_or_base64(client: TestClient, cred: DeviceCredential) -> None:
    client.post(ROUTE, content=sealed(cred, 1, "t=21°".encode()), headers=COSE)
    client.post(ROUTE, content=sealed(cred, 2, b"\xff\xfe\x00"), headers=COSE)
    r = client.get(f"/v1/telemetry?device={cred.device_id.hex()}&limit=10", headers=AUTH)
    rows = r.json()["telemetry"]
    assert [(t["seq"], t["payload"], t["encoding"]) for t in rows] == [
        (2, "//4A", "base64"), (1, "t=21°", "utf-8")]
    r = client.get("/v1/telemetry?limit=1", headers=AUTH)
    assert len(r.json()["telemetry"]) == 1
    assert client.get("/v1/telemetry?device=" + "00" * 12, headers=AUTH).status_code == 404


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=-1", "limit=99999999999",
                                   "limit=1001", "limit=", "device=xyz", "device=" + "0" * 25,
                                   "colour=red", "limit=1&limit=2", "limit=%EF%BC%91"])
def test_telemetry_bad_query(client: TestClient, query: str) -> None:
    r = client.get("/v1/telemetry?" + query, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]


def test_events_with_reasons_for_operators(client: TestClient, cred: DeviceCredential) -> None:
    msg = sealed(cred, 1)
    client.post(ROUTE, content=msg, headers=COSE)
    client.post(ROUTE, content=msg, headers=COSE)
    client.post(ROUTE, content=b"junk", headers=COSE)
    r = client.get("/v1/events?reason=replay", headers=AUTH)
    [event] = r.json()["events"]
    assert (event["reason"], event["device"], event["transport"]) == (
        "replay", cred.device_id.hex(), "http")
    r = client.get(f"/v1/events?device={cred.device_id.hex()}&limit=5", headers=AUTH)
    assert {e["reason"] for e in r.json()["events"]} >= {"replay", "device_added"}
    for bad in ("reason=DROP%20TABLE", "reason=" + "a" * 100, "device=12", "limit=x", "x=1"):
        assert client.get("/v1/events?" + bad, headers=AUTH).status_code == 400


def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]
    assert client.get(ROUTE).status_code == 405
    assert client.post("/v1/devices", headers=AUTH).status_code == 405


def test_server_keeps_serving_after_abuse(client: TestClient, cred: DeviceCredential) -> None:
    for body in (b"\x81" * 50_000, b"\xff" * 100, b"\x9b" + b"\xff" * 8):
        client.post(BATCH, content=body, headers=CBOR)
        client.post(ROUTE, content=body, headers=COSE)
    client.get("/v1/events?limit=" + "9" * 1000, headers=AUTH)
    assert client.get("/healthz").status_code == 200
    r = client.post(ROUTE, content=sealed(cred, 42), headers=COSE)
    assert r.status_code == 202
    assert json.loads(r.text) == {"status": "accepted"}


def test_unexpected_error_is_a_bare_500(env: Env, cred: DeviceCredential,
                                         caplog: pytest.LogCaptureFixture) -> None:
    class Exploding(Pipeline):
        def ingest(self, *args: object, **kw: object) -> list[IngestResult]:
            raise RuntimeError("secret-looking internals")

    pipeline = Exploding(env.registry, env.store, clock_ms=env.clock)
    with make_client(env, pipeline) as c:
        r = c.post(ROUTE, content=sealed(cred, 1), headers=COSE)
        assert (r.status_code, r.json()) == (500, {"error": "internal error"})
        assert "internals" not in r.text and "Traceback" not in r.text
        assert c.get("/healthz").status_code == 200
    assert "secret-looking internals" in caplog.text
