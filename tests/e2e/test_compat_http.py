"""Legacy formats end to end: the real server process (`python -m sensorseal.server`) on a free
port, devices provisioned through the registry and the `sensorseal` CLI, every request over
HTTP, every refusal read back from the audit log through `GET /v1/events`."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess

from sensorseal.compat import valarm, waspmote
from sensorseal.compat.waspmote import WaspmoteKey
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

START_TIMEOUT_S = 20
UA = "VirtualHub (e2e)"
PLACEHOLDER = "0" * 32
HUB_PASSWORD = "s3cret-hub-pass"
WASP_SERIAL = bytes.fromhex("0123456789abcdef")
WASP_KEY = WaspmoteKey("libelium_pass_16", 128)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SENSORSEAL_KEK"}


@dataclass
class Setup:
    path: Path
    token: str
    ids: dict[str, str] = field(default_factory=dict)  # role -> 24-hex device id
    keys: dict[str, str] = field(default_factory=dict)  # role -> Valarm API key

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Server(ServerProcess):
    def __init__(self, data_dir: Path) -> None:
        super().__init__([sys.executable, "-m", "sensorseal.server", "--data-dir",
                          str(data_dir), "--http-port", "0"], _env(), START_TIMEOUT_S)
        self.url = self.wait_for_url()


def cli(setup: Setup, *args: str, stdin: str = "") -> str:
    r = subprocess.run([sys.executable, "-m", "sensorseal", "--data-dir", str(setup.path),
                        *args], input=stdin, capture_output=True, text=True, env=_env(),
                       timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    path = tmp_path_factory.mktemp("compat") / "data"
    datadir = DataDir(path, env=_env())
    s = Setup(path, datadir.init())
    store, keystore = datadir.open()
    try:
        reg = Registry(store, keystore)
        for role, policy in (("md5", "legacy"), ("sha", "lax"), ("suspended", "legacy"),
                             ("revoked", "legacy"), ("migrate", "legacy"), ("bad", "legacy")):
            dev = reg.add_legacy_device(role, "valarm", policy=policy)
            s.ids[role], s.keys[role] = dev.device_id.hex(), str(dev.generated_secret)
        reg.suspend(DeviceId.parse(s.ids["suspended"]))
        reg.revoke(DeviceId.parse(s.ids["revoked"]))
        s.ids["waspmote"] = reg.add_legacy_device(
            "mote", "waspmote", external_id=WASP_SERIAL.hex(), secret=WASP_KEY.password
        ).device_id.hex()
    finally:
        store.close()
    # Hubs through the CLI, the password on stdin (never on the command line).
    for role, serial, policy, password in (("hub", "YHUBETH1-00001", "legacy", HUB_PASSWORD),
                                           ("open", "VIRTHUB0-00002", "legacy", None),
                                           ("unsigned", "VIRTHUB0-00003", "legacy-unsigned",
                                            None)):
        args = ["device", "add", role, "--legacy", "yoctopuce", "--legacy-id", serial,
                "--policy", policy, "--json"]
        if password is not None:
            args.append("--secret-stdin")
        out = cli(s, *args, stdin=(password or "") + "\n")
        s.ids[role] = json.loads(out)["device_id"]
        assert password is None or password not in out
    return s


@pytest.fixture(scope="module")
def server(setup: Setup) -> Iterator[Server]:
    srv = Server(setup.path)
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, "".join(srv.output)
    assert not any("Traceback" in line for line in srv.output), "".join(srv.output)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def events(client: httpx.Client, setup: Setup, **params: str) -> list[dict[str, object]]:
    r = client.get("/v1/events", params={"limit": "1000", **params}, headers=setup.auth)
    assert r.status_code == 200
    return list(r.json()["events"])


def post_valarm(client: httpx.Client, body: bytes, sig: str) -> httpx.Response:
    return client.post("/v1/compat/valarm", content=body,
                       headers={"Content-Type": "application/json",
                                "X-Valarm-Signature": sig})


def valarm_body(device_id: str, seq: int, ts: int | None = None, temp: float = 21.5) -> bytes:
    return json.dumps({"device_id": device_id, "seq": seq,
                       "ts": now_ms() if ts is None else ts,
                       "readings": {"temp_c": temp}}).encode()


def yocto_body(serial: str, uptime: int, temp: str = "21.7", *, sign: bool = True) -> bytes:
    parts = [f'"serial":"{serial}"',
             f'"/api.json":{{"module":{{"serialNumber":"{serial}","upTime":{uptime}}}}}',
             '"/bySerial/METEOMK2-1A2B3/api.json":{"module":{"serialNumber":"METEOMK2-1A2B3"},'
             f'"temperature":{{"advertisedValue":"{temp}"}}}}']
    if sign:
        parts.append(f'"sign":"{PLACEHOLDER}"')
    return ("{" + ",".join(parts) + "}").encode()


def hub_sign(raw: bytes, password: str) -> bytes:
    """The hub's algorithm written out with hashlib, independently of sensorseal."""
    salt = hashlib.md5(password.encode()).hexdigest()
    marker = f'"sign":"{PLACEHOLDER}"'.encode()
    digest = hashlib.md5(raw.replace(marker, f'"sign":"{salt}"'.encode())).hexdigest()
    return raw.replace(marker, f'"sign":"{digest}"'.encode())


def post_yocto(client: httpx.Client, body: bytes, ua: str = UA,
               ctype: str = "application/json") -> httpx.Response:
    return client.post("/v1/compat/yoctopuce", content=body,
                       headers={"Content-Type": ctype, "User-Agent": ua})


def test_valarm_end_to_end(setup: Setup, client: httpx.Client) -> None:
    md5, sha = setup.ids["md5"], setup.ids["sha"]
    body = valarm_body(md5, 1)
    assert post_valarm(client, body, valarm.sign(body, setup.keys["md5"].encode(), "md5")
                       ).status_code == 202
    body = valarm_body(sha, 1)
    assert post_valarm(client, body, valarm.sign(body, setup.keys["sha"].encode())
                       ).status_code == 202
    r = client.get("/v1/telemetry", params={"device": md5}, headers=setup.auth)
    [row] = r.json()["telemetry"]
    assert row["level"] == "legacy:valarm-md5" and json.loads(row["payload"])["readings"] == {
        "temp_c": 21.5}

    def sig(role: str, b: bytes, alg: str = "sha256", key: str | None = None) -> str:
        return valarm.sign(b, (key or setup.keys[role]).encode(), alg)

    b2 = valarm_body(md5, 2)
    stale = valarm_body(md5, 3, ts=now_ms() - 3 * 3600 * 1000)
    unknown = valarm_body("5f1a2b3c4d5e6f70819283ff", 1)
    refusals: list[tuple[str | None, bytes, str, str]] = [
        (md5, b2, sig("md5", b2, key="WrongKey000000000000"), "bad_mac"),
        (md5, b2.replace(b"21.5", b"21.6"), sig("md5", b2), "bad_mac"),  # altered byte
        (None, valarm_body(md5, 1), "", "malformed"),  # no signature header (no device yet)
        (md5, stale, sig("md5", stale), "stale"),
        (None, unknown, sig("md5", unknown), "unknown_device"),
        (setup.ids["suspended"], valarm_body(setup.ids["suspended"], 1),
         sig("suspended", valarm_body(setup.ids["suspended"], 1)), "suspended"),
        (setup.ids["revoked"], valarm_body(setup.ids["revoked"], 1),
         sig("revoked", valarm_body(setup.ids["revoked"], 1)), "revoked"),
        (sha, valarm_body(sha, 9), sig("sha", valarm_body(sha, 9), "md5"), "policy_violation"),
    ]
    for device, b, s, reason in refusals:
        r = post_valarm(client, b, s)
        assert r.status_code in (400, 403) and r.json() == {"status": "rejected"}, reason
        found = [e for e in events(client, setup, reason=reason)
                 if device is None or e["device"] == device]
        assert found and str(found[0]["detail"]).startswith("valarm:"), reason


def test_valarm_replay_over_http(setup: Setup, client: httpx.Client) -> None:
    dev = setup.ids["bad"]
    body = valarm_body(dev, 42)
    s = valarm.sign(body, setup.keys["bad"].encode())
    assert post_valarm(client, body, s).status_code == 202
    assert post_valarm(client, body, s).status_code == 403
    assert any(e["device"] == dev for e in events(client, setup, reason="replay"))


def test_yoctopuce_end_to_end_with_commands(setup: Setup, client: httpx.Client) -> None:
    hub = setup.ids["hub"]
    first = hub_sign(yocto_body("YHUBETH1-00001", 50_000), HUB_PASSWORD)
    r = post_yocto(client, first)
    assert r.status_code == 200 and r.content == b""
    rows = client.get("/v1/telemetry", params={"device": hub}, headers=setup.auth).json()
    doc = json.loads(rows["telemetry"][0]["payload"])
    assert {"serial": "METEOMK2-1A2B3", "function": "temperature", "value": "21.7"} \
        in doc["readings"]
    # Refusals: wrong password, altered byte, the same body again, an unsigned body.
    later = yocto_body("YHUBETH1-00001", 52_000, "22.0")
    for body, reason in ((hub_sign(later, "not-the-password"), "bad_mac"),
                         (hub_sign(later, HUB_PASSWORD).replace(b"22.0", b"23.0"), "bad_mac"),
                         (first, "replay"),
                         (yocto_body("YHUBETH1-00001", 52_000, sign=False),
                          "policy_violation")):
        assert post_yocto(client, body).status_code == 403, reason
        assert any(e["device"] == hub for e in events(client, setup, reason=reason)), reason
    # A relay command queued through the CLI (and one through the API) rides on the reply.
    url = "/bySerial/RELAYLO1-XXXX/api/relay1?state=1"
    cli(setup, "device", "command", hub, "--yocto", url)
    r = client.post(f"/v1/compat/devices/{hub}/commands", json={"url": "/api/module?beacon=1"},
                    headers=setup.auth)
    assert r.status_code == 201
    assert client.post(f"/v1/compat/devices/{hub}/commands", json={"url": "/x"}
                       ).status_code == 401
    bad = client.post(f"/v1/compat/devices/{hub}/commands",
                      json={"url": "/api/module?userPassword=x"}, headers=setup.auth)
    assert bad.status_code == 400
    r = post_yocto(client, hub_sign(later, HUB_PASSWORD))
    assert r.status_code == 200
    assert r.content == (b"\n@YoctoAPI:GET " + url.encode() + b"\n"
                         b"\n@YoctoAPI:GET /api/module?beacon=1\n")
    delivered = events(client, setup, reason="yocto_command_delivered", device=hub)
    assert sorted(str(e["detail"]) for e in delivered) == sorted([url, "/api/module?beacon=1"])
    r = post_yocto(client, hub_sign(yocto_body("YHUBETH1-00001", 55_000), HUB_PASSWORD))
    assert r.status_code == 200 and r.content == b""  # delivered once


def test_hub_without_password(setup: Setup, client: httpx.Client) -> None:
    r = post_yocto(client, yocto_body("VIRTHUB0-00002", 1_000, sign=False))
    assert r.status_code == 403
    assert any(e["device"] == setup.ids["open"]
               for e in events(client, setup, reason="policy_violation"))
    assert post_yocto(client, yocto_body("VIRTHUB0-00003", 1_000, sign=False)
                      ).status_code == 200


def test_waspmote_route_weak_and_counted(setup: Setup, client: httpx.Client) -> None:
    plain = waspmote.build_ascii(serial=WASP_SERIAL, waspmote_id="node_01", seq=1,
                                 fields=[("TC", "21.50")])
    frame = waspmote.build_encrypted(plain, WASP_KEY, serial=WASP_SERIAL)
    r = client.post("/v1/compat/waspmote", content=frame,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202 and r.json()["weak"] is True and "native" in r.json()["migrate"]
    plain2 = waspmote.build_ascii(serial=WASP_SERIAL, waspmote_id="node_01", seq=2,
                                  fields=[("TC", "21.75")])
    hexed = waspmote.build_encrypted(plain2, WASP_KEY, serial=WASP_SERIAL).hex()
    assert client.post("/v1/compat/waspmote", content=hexed,
                       headers={"Content-Type": "text/plain"}).status_code == 202
    assert client.post("/v1/compat/waspmote", content=hexed,
                       headers={"Content-Type": "text/plain"}).status_code == 403  # replay
    assert client.get("/v1/compat/stats").status_code == 401
    stats = client.get("/v1/compat/stats", headers=setup.auth).json()
    assert stats["weak_accepted"]["waspmote"] >= 2 and stats["accepted"]["waspmote"] >= 2
    rows = client.get("/v1/telemetry", params={"device": setup.ids["waspmote"]},
                      headers=setup.auth).json()["telemetry"]
    assert {row["level"] for row in rows} == {"legacy:waspmote-aes-ecb"}


def test_migrate_to_native_through_the_cli(setup: Setup, client: httpx.Client) -> None:
    dev, key = setup.ids["migrate"], setup.keys["migrate"]
    body = valarm_body(dev, 1)
    assert post_valarm(client, body, valarm.sign(body, key.encode())).status_code == 202
    out = cli(setup, "device", "migrate", dev, "--to", "native")
    cred = DeviceCredential.parse(next(w for w in out.split() if w.startswith("ss1.")))
    body = valarm_body(dev, 2)
    assert post_valarm(client, body, valarm.sign(body, key.encode())).status_code == 202
    keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    msg = seal(b'{"temp_c":21.9}', keys=keys, seq=1, route="/v1/messages",
               timestamp_ms=now_ms())
    assert client.post("/v1/messages", content=msg,
                       headers={"Content-Type": "application/cose"}).status_code == 202
    body = valarm_body(dev, 3)
    assert post_valarm(client, body, valarm.sign(body, key.encode())).status_code == 403
    record = client.get(f"/v1/devices/{dev}", headers=setup.auth).json()
    assert record["policy"] == "standard"
    assert [e["reason"] for e in events(client, setup, device=dev)
            if str(e["reason"]).startswith("legacy_migra")] == ["legacy_migrated",
                                                                 "legacy_migration_started"]
    assert "migrated" in cli(setup, "device", "migrate", dev, "--to", "native")


def test_bad_inputs_get_clean_refusals(setup: Setup, client: httpx.Client,
                                       server: Server) -> None:
    frame = waspmote.build_encrypted(
        waspmote.build_ascii(serial=WASP_SERIAL, waspmote_id="n", seq=9, fields=[("A", "1")]),
        WASP_KEY, serial=WASP_SERIAL)
    wrong_key = waspmote.build_encrypted(
        waspmote.build_ascii(serial=WASP_SERIAL, waspmote_id="n", seq=9, fields=[("A", "1")]),
        WaspmoteKey("another-password", 128), serial=WASP_SERIAL)
    octet = {"Content-Type": "application/octet-stream"}
    jsn = {"Content-Type": "application/json", "X-Valarm-Signature": "md5=" + "0" * 32}
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("/v1/compat/waspmote", frame[:9], octet, "malformed"),  # truncated
        ("/v1/compat/waspmote", frame[:4] + b"\x07" + frame[5:], octet, "malformed"),  # length
        ("/v1/compat/waspmote", wrong_key, octet, "decrypt_failed"),  # bad padding
        ("/v1/compat/waspmote", b"<=>\x60\x0a" + b"\x00" * 10, octet, "malformed"),
        ("/v1/compat/waspmote", b"nothex!", {"Content-Type": "text/plain"}, "malformed"),
        ("/v1/compat/waspmote", frame, {"Content-Type": "image/png"}, "wrong_content_type"),
        ("/v1/compat/waspmote", b"\x00" * 5000, octet, "oversize"),
        ("/v1/compat/valarm", b"{not json", jsn, "malformed"),
        ("/v1/compat/valarm", b"[" * 8000 + b"]" * 8000, jsn, "malformed"),  # JSON bomb
        ("/v1/compat/valarm", b'{"device_id":"' + b"a" * 20_000 + b'"}', jsn, "oversize"),
        ("/v1/compat/valarm", b"{}", {"Content-Type": "text/plain"}, "wrong_content_type"),
        ("/v1/compat/valarm", b"\xff\xfe{}", jsn, "malformed"),
        ("/v1/compat/yoctopuce", b'{"a":' * 6000 + b"1" + b"}" * 6000,
         {"Content-Type": "application/json", "User-Agent": UA}, "malformed"),
        ("/v1/compat/yoctopuce", b"[1,2", {"Content-Type": "application/json",
                                          "User-Agent": UA}, "malformed"),
        ("/v1/compat/yoctopuce", b" " * 300_000, {"Content-Type": "application/json",
                                                 "User-Agent": UA}, "oversize"),
    ]
    before = {r: len(events(client, setup, reason=r)) for r in {c[3] for c in cases}}
    expected: dict[str, int] = {}
    for path, body, headers, reason in cases:
        r = client.post(path, content=body, headers=headers)
        assert 400 <= r.status_code < 500, (path, reason, r.status_code)
        assert r.json() == {"status": "rejected"}
        expected[reason] = expected.get(reason, 0) + 1
    for reason, n in expected.items():
        assert len(events(client, setup, reason=reason)) - before[reason] == n, reason
    # A huge declared body is refused before it is read.
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/compat/yoctopuce HTTP/1.1\r\nHost: x\r\nUser-Agent: " +
                     UA.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n" + b"{" * 1024)
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    assert client.get("/healthz").json() == {"status": "ok"}
