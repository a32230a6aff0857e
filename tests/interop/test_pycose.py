"""sensorseal and pycose 1.1.0 read each other's messages, in both directions.

The peer (tests/interop/peers/pycose_peer.py) is written from docs/protocol.md alone, imports
only pycose, cbor2 and cryptography, and runs in its own virtualenv and process (pycose 1.1.0
cannot decode under cbor2 6, which sensorseal pins). The venv is built on first use and cached
under .peer-venvs/; the tests skip only when `pip install` of the peer fails.

SENSORSEAL_INTEROP_MESSAGES sets the number of messages per algorithm (default 40).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import seal, unseal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import Alg, derive

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
PEER = Path(__file__).resolve().parent / "peers" / "pycose_peer.py"
N = int(os.environ.get("SENSORSEAL_INTEROP_MESSAGES", "40"))
ROUTE_UP = "/v1/messages"
ROUTE_DOWN = "devices/commands"  # any route works; MQTT topic names are specified later
NOW_MS = 1_717_171_717_171
KINDS = [(Level.SEALED, Alg.A256GCM), (Level.SEALED, Alg.CHACHA20_POLY1305),
         (Level.SIGNED, Alg.HMAC_256_256)]
# Sequence numbers at every Partial IV length and its edges (RFC 8613 section 5 encoding).
EDGE_SEQS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**24, 2**32 - 1, 2**32, 2**40 - 1]


def _load_peers_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_sensorseal_peers", ROOT / "benchmarks" /
                                                  "_peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


peers = _load_peers_module()


@pytest.fixture(scope="module")
def peer() -> Callable[[dict[str, Any]], dict[str, Any]]:
    env = peers.ensure_peer(peers.PYCOSE)
    if env.python is None:
        pytest.skip(f"pycose peer unavailable: {env.install_error}")
    python: Path = env.python

    def call(request: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = peers.run_peer(python, PEER, request)
        return reply

    return call


def _device(i: int, *, zero_base_iv: bool = False) -> DeviceCredential:
    """A deterministic credential; with zero_base_iv, one whose uplink base IV starts with 00
    (the case that pycose's own nonce computation gets wrong)."""
    counter = 0
    while True:
        secret = hashlib.sha256(f"interop-{i}-{counter}".encode()).digest()
        device_id = DeviceId(hashlib.sha256(f"id-{i}".encode()).digest()[:12])
        iv = derive(secret, device_id, 7, Direction.UP).base_iv
        if not zero_base_iv or iv[0] == 0:
            return DeviceCredential(device_id, 7, secret)
        counter += 1


def _contexts(creds: list[DeviceCredential], direction: Direction,
              ) -> Callable[[DeviceId, int], SecurityContext]:
    table = {(c.device_id, c.epoch): SecurityContext.from_secret(c.secret, c.device_id, c.epoch,
                                                                 direction) for c in creds}

    def lookup(device_id: DeviceId, epoch: int) -> SecurityContext:
        ctx = table.get((device_id, epoch))
        if ctx is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE)
        return ctx

    return lookup


def _plan(seed: int) -> list[dict[str, Any]]:
    """N messages per kind: edge sequence numbers, then increasing random ones."""
    rng = random.Random(seed)
    plan = []
    for level, alg in KINDS:
        seqs = sorted(set(EDGE_SEQS + rng.sample(range(2**40), max(0, N - len(EDGE_SEQS)))))
        for seq in seqs:
            plan.append({"seq": seq, "payload": rng.randbytes(rng.choice([0, 1, 15, 100, 300]))
                         .hex(), "level": level.value, "alg": int(alg),
                         "timestamp_ms": rng.choice([None, NOW_MS - rng.randrange(10**6)])})
    return plan


def test_peer_is_independent_of_sensorseal(peer: Callable[[dict[str, Any]], dict[str, Any]],
                                           ) -> None:
    """The peer runs pycose 1.1.0 on cbor2 < 6, cannot see sensorseal and imports only its
    allowed modules."""
    info = peer({"op": "probe"})
    assert info["pycose"] == "1.1.0"
    assert int(info["cbor2"].split(".")[0]) < 6
    assert info["sensorseal_importable"] is False
    tree = ast.parse(PEER.read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"pycose", "cbor2", "cryptography", "__future__", "base64", "importlib",
                     "json", "sys", "time", "typing"}, roots


@pytest.mark.parametrize("zero_base_iv", [False, True], ids=["any-iv", "base-iv-00"])
def test_pycose_device_to_sensorseal(peer: Callable[[dict[str, Any]], dict[str, Any]],
                                     zero_base_iv: bool) -> None:
    """(a) pycose seals for both AEADs and for Mac0; sensorseal's unseal accepts every one."""
    cred = _device(1 if not zero_base_iv else 2, zero_base_iv=zero_base_iv)
    plan = _plan(seed=11 + zero_base_iv)
    sealed = peer({"op": "seal", "credential": cred.encode(), "direction": "up",
                   "route": ROUTE_UP, "messages": plan})["messages"]
    assert len(sealed) == len(plan)
    contexts = _contexts([cred], Direction.UP)
    keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    for m, hexmsg in zip(plan, sealed, strict=True):
        data = bytes.fromhex(hexmsg)
        # Byte for byte what sensorseal itself writes for the same inputs.
        assert data == seal(bytes.fromhex(m["payload"]), keys=keys, seq=m["seq"], route=ROUTE_UP,
                            timestamp_ms=m["timestamp_ms"], level=Level(m["level"]),
                            alg=m["alg"])
        with pytest.raises(Rejected) as wrong_route:  # the peer really bound the route
            unseal(data, route="/v1/other", contexts=contexts, now_ms=NOW_MS)
        assert wrong_route.value.reason in (RejectReason.DECRYPT_FAILED, RejectReason.BAD_MAC)
        opened = unseal(data, route=ROUTE_UP, contexts=contexts, now_ms=NOW_MS, strike=False)
        assert opened.payload.hex() == m["payload"]
        assert (opened.seq, opened.timestamp_ms, opened.level.value, opened.alg) == (
            m["seq"], m["timestamp_ms"], m["level"], m["alg"])
        assert (opened.device_id, opened.epoch) == (cred.device_id, cred.epoch)


def test_unpatched_pycose_nonce_is_wrong(peer: Callable[[dict[str, Any]], dict[str, Any]],
                                         ) -> None:
    """Why the peer patches pycose: its own nonce drops the leading 00 of the base IV, so its
    AES-GCM messages do not open (ChaCha20-Poly1305 refuses the short nonce outright)."""
    cred = _device(2, zero_base_iv=True)
    plan = [{"seq": 5, "payload": "00", "level": "sealed", "alg": int(Alg.A256GCM),
             "timestamp_ms": None}]
    hexmsg = peer({"op": "seal", "credential": cred.encode(), "direction": "up",
                   "route": ROUTE_UP, "messages": plan, "unpatched": True})["messages"][0]
    with pytest.raises(Rejected) as exc:
        unseal(bytes.fromhex(hexmsg), route=ROUTE_UP, contexts=_contexts([cred], Direction.UP),
               now_ms=NOW_MS)
    assert exc.value.reason is RejectReason.DECRYPT_FAILED


def test_sensorseal_to_pycose(peer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """(b) sensorseal seals (downlink, several devices); pycose decodes, decrypts or verifies,
    and returns every payload and header field."""
    creds = [_device(10 + i, zero_base_iv=(i == 0)) for i in range(3)]
    plan = _plan(seed=23)
    messages, expected = [], []
    for i, m in enumerate(plan):
        cred = creds[i % len(creds)]
        keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.DOWN)
        messages.append(seal(bytes.fromhex(m["payload"]), keys=keys, seq=m["seq"],
                             route=ROUTE_DOWN, timestamp_ms=m["timestamp_ms"],
                             level=Level(m["level"]), alg=m["alg"]).hex())
        expected.append({"ok": True, "level": m["level"], "alg": m["alg"],
                         "kid": cred.device_id.hex(), "epoch": cred.epoch, "seq": m["seq"],
                         "timestamp_ms": m["timestamp_ms"], "payload": m["payload"]})
    # One tampered copy per kind: the peer must refuse it, or it is not really verifying.
    tampered = []
    for level, _alg in KINDS:
        i = next(i for i, m in enumerate(plan) if m["level"] == level.value)
        raw = bytearray.fromhex(messages[i])
        raw[-1] ^= 0x01
        tampered.append(raw.hex())
    results = peer({"op": "open", "credentials": [c.encode() for c in creds],
                    "direction": "down", "route": ROUTE_DOWN,
                    "messages": messages + tampered})["results"]
    assert results[:len(messages)] == expected
    assert [r["ok"] for r in results[len(messages):]] == [False] * len(tampered)


def test_pycose_refuses_wrong_direction(peer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """An uplink message opened as downlink fails in pycose too: direction is in the keys and
    the external AAD."""
    cred = _device(30)
    keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.UP)
    msgs = [seal(b"x", keys=keys, seq=1, route=ROUTE_UP, timestamp_ms=None, level=level,
                 alg=alg).hex() for level, alg in KINDS]
    results = peer({"op": "open", "credentials": [cred.encode()], "direction": "down",
                    "route": ROUTE_UP, "messages": msgs})["results"]
    assert [r["ok"] for r in results] == [False, False, False]
