"""How fast the receiver opens messages, against a bare AEAD loop and against pycose.

One run measures, on the same 100-byte messages from many devices:

* sensorseal `unseal` (parse, context lookup in a dict, replay check, AES-256-GCM decrypt,
  policy, strike) — messages/s;
* a bare loop of `cryptography` AESGCM.decrypt calls with the same keys, nonces and AAD: the
  floor that any COSE receiver in Python pays;
* pycose 1.1.0 decoding and decrypting the same messages, in its own virtualenv (it needs
  cbor2 < 6) and process; the time is measured inside that process, so start-up is excluded;
* sensorseal `unseal` of COSE_Mac0 (HMAC-SHA256) messages: verifies/s.

The last line is one JSON object (sensorseal_per_s, bare_aesgcm_per_s, pycose_per_s,
ratio_vs_bare, speedup_vs_pycose, mac0_verify_per_s, ...).

    .venv/bin/python benchmarks/open_throughput.py --messages 20000 --devices 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import external_aad, parse, seal, unseal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import Alg, derive

ROUTE = "/v1/messages"
NOW_MS = 1_717_171_717_171
PAYLOAD_LEN = 100
PEER = Path(__file__).resolve().parents[1] / "tests" / "interop" / "peers" / "pycose_peer.py"


def credentials(n: int) -> list[DeviceCredential]:
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"bench-device-{i}".encode()).digest()
        out.append(DeviceCredential(DeviceId(digest[:12]), 1, hashlib.sha256(digest).digest()))
    return out


def messages(creds: list[DeviceCredential], count: int, level: Level) -> list[bytes]:
    """`count` messages, round robin over the devices, each device counting up from 1."""
    keys = [derive(c.secret, c.device_id, c.epoch, Direction.UP) for c in creds]
    out = []
    for i in range(count):
        k = keys[i % len(keys)]
        payload = hashlib.sha256(i.to_bytes(8, "big")).digest() * 4
        out.append(seal(payload[:PAYLOAD_LEN], keys=k, seq=1 + i // len(keys), route=ROUTE,
                        timestamp_ms=NOW_MS, level=level))
    return out


def receiver(creds: list[DeviceCredential]) -> dict[tuple[DeviceId, int], SecurityContext]:
    """Fresh receiver state, keys derived ahead (key derivation is not what is measured)."""
    table = {}
    for c in creds:
        ctx = SecurityContext.from_secret(c.secret, c.device_id, c.epoch, Direction.UP)
        ctx.keys.aead(Alg.A256GCM)
        _ = ctx.keys.mac_key
        table[(c.device_id, c.epoch)] = ctx
    return table


def time_unseal(creds: list[DeviceCredential], msgs: list[bytes]) -> float:
    table = receiver(creds)

    def lookup(device_id: DeviceId, epoch: int) -> SecurityContext:
        ctx = table.get((device_id, epoch))
        if ctx is None:
            raise Rejected(RejectReason.UNKNOWN_DEVICE)
        return ctx

    start = time.perf_counter()
    for data in msgs:
        unseal(data, route=ROUTE, contexts=lookup, now_ms=NOW_MS)
    return time.perf_counter() - start


def time_bare_aesgcm(creds: list[DeviceCredential], msgs: list[bytes]) -> float:
    """The same decryptions with nothing around them: the inputs are prepared before timing."""
    by_id = {(c.device_id, c.epoch): c for c in creds}
    aeads: dict[bytes, AESGCM] = {}
    jobs = []
    aad = external_aad(Direction.UP, ROUTE)
    for data in msgs:
        env = parse(data)
        c = by_id[(env.device_id, env.epoch)]
        keys = derive(c.secret, c.device_id, c.epoch, Direction.UP)
        if c.device_id not in aeads:
            aeads[c.device_id] = keys.aead(Alg.A256GCM)  # type: ignore[assignment]
        protected = cbor2.loads(data).value[0]  # the header bytes as sent, as any receiver
        enc_structure = cbor2.dumps(["Encrypt0", protected, aad])
        jobs.append((aeads[c.device_id], keys.nonce(env.partial_iv), env.body, enc_structure))
    for aead, nonce, body, enc in jobs[:1]:  # the prepared AAD must be right
        assert len(aead.decrypt(nonce, body, enc)) == PAYLOAD_LEN
    start = time.perf_counter()
    for aead, nonce, body, enc in jobs:
        aead.decrypt(nonce, body, enc)
    return time.perf_counter() - start


def time_pycose(creds: list[DeviceCredential], msgs: list[bytes],
                repeat: int) -> tuple[float | None, str]:
    env = _peers.ensure_peer(_peers.PYCOSE)
    if env.python is None:
        return None, env.install_error
    reply: dict[str, Any] = _peers.run_peer(env.python, PEER, {
        "op": "bench", "credentials": [c.encode() for c in creds], "direction": "up",
        "route": ROUTE, "messages": [m.hex() for m in msgs], "repeat": repeat}, timeout_s=900)
    assert reply["count"] == len(msgs)
    return float(reply["seconds"]), ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per measurement; the fastest counts (the machine may be shared)")
    args = ap.parse_args()
    n = args.messages
    creds = credentials(args.devices)
    sealed = messages(creds, n, Level.SEALED)
    signed = messages(creds, n, Level.SIGNED)
    print(f"{n} messages of {PAYLOAD_LEN} bytes from {args.devices} devices "
          f"(sealed: {len(sealed[0])} bytes, signed: {len(signed[0])} bytes on the wire)")

    runs: dict[str, list[float]] = {"unseal": [], "bare": [], "mac": []}
    for _ in range(max(1, args.repeat)):  # interleaved, so that load changes hit all alike
        runs["unseal"].append(time_unseal(creds, sealed))
        runs["bare"].append(time_bare_aesgcm(creds, sealed))
        runs["mac"].append(time_unseal(creds, signed))
    t_unseal, t_bare, t_mac = min(runs["unseal"]), min(runs["bare"]), min(runs["mac"])
    t_pycose, why = time_pycose(creds, sealed, max(1, args.repeat))

    result: dict[str, Any] = {
        "messages": n,
        "repeat": args.repeat,
        "devices": args.devices,
        "payload_bytes": PAYLOAD_LEN,
        "sensorseal_per_s": round(n / t_unseal),
        "bare_aesgcm_per_s": round(n / t_bare),
        "pycose_per_s": round(n / t_pycose) if t_pycose else None,
        "mac0_verify_per_s": round(n / t_mac),
        "ratio_vs_bare": round(t_bare / t_unseal, 3),
        "speedup_vs_pycose": round(t_pycose / t_unseal, 2) if t_pycose else None,
        "us_per_unseal": round(t_unseal / n * 1e6, 2),
        "us_per_bare_decrypt": round(t_bare / n * 1e6, 2),
    }
    print(f"sensorseal unseal (A256GCM): {result['sensorseal_per_s']:>10,} msg/s  "
          f"({result['us_per_unseal']} us each)")
    print(f"bare AESGCM.decrypt loop:    {result['bare_aesgcm_per_s']:>10,} msg/s  "
          f"({result['us_per_bare_decrypt']} us each)")
    if t_pycose:
        print(f"pycose 1.1.0 decode+decrypt: {result['pycose_per_s']:>10,} msg/s")
    else:
        print(f"pycose: not measured ({why.splitlines()[0] if why else 'unavailable'})")
    print(f"sensorseal unseal (Mac0):    {result['mac0_verify_per_s']:>10,} verify/s")
    print(f"unseal runs at {result['ratio_vs_bare']:.1%} of the bare AEAD loop; "
          f"{result['speedup_vs_pycose']}x pycose")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
