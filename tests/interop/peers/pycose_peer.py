"""A sensorseal device and receiver built on pycose 1.1.0, from docs/protocol.md alone.

This file must never import sensorseal: it is the "third party with a COSE library and the
document". It runs in its own virtualenv (pycose 1.1.0 needs cbor2 < 6) and speaks JSON:

    stdin:  {"op": "seal" | "open" | "bench" | "probe", ...}
    stdout: the reply object

* seal:  {"credential", "direction", "route", "messages": [{"seq", "payload" (hex), "level",
          "alg", "timestamp_ms"}]}  ->  {"messages": [hex, ...]}
* open:  {"credentials": [...], "direction", "route", "messages": [hex]}  ->
         {"results": [{"ok": true, "level", "alg", "kid", "epoch", "seq", "timestamp_ms",
                       "payload"} | {"ok": false, "error"}]}
* bench: like open plus "repeat"; times decode+decrypt/verify in this process and returns the
         fastest run -> {"count", "seconds"}
* probe: -> {"pycose", "cbor2", "sensorseal_importable"}

`"unpatched": true` in a request runs pycose's own nonce computation (see `_rfc9052_nonce`).

Imports: pycose, cbor2, cryptography and the standard library only.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import sys
import time
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as _ChaChaAead
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pycose import headers
from pycose.algorithms import A256GCM, HMAC256, CoseAlgorithm, _EncAlg
from pycose.exceptions import CoseException
from pycose.keys.symmetric import SymmetricKey
from pycose.messages.cosemessage import CoseMessage
from pycose.messages.enc0message import Enc0Message
from pycose.messages.enccommon import EncCommon
from pycose.messages.mac0message import Mac0Message


@CoseAlgorithm.register_attribute()
class ChaCha20Poly1305(_EncAlg):
    """COSE alg 24 (RFC 9053 section 4.3), which pycose 1.1.0 does not ship.

    Registered through pycose's own algorithm registry, with the AEAD from `cryptography`, the
    same way pycose implements A256GCM; everything else (structure, Enc_structure, header
    handling) stays pycose's.
    """

    identifier = 24
    fullname = "CHACHA20_POLY1305"

    @classmethod
    def get_key_length(cls) -> int:
        return 32

    @classmethod
    def encrypt(cls, key: SymmetricKey, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return _ChaChaAead(key.k).encrypt(nonce, data, aad)

    @classmethod
    def decrypt(cls, key: SymmetricKey, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return _ChaChaAead(key.k).decrypt(nonce, ciphertext, aad)


# docs/protocol.md section 5.3: header labels; 5.5 / 4: the protocol label.
PROTOCOL = "sensorseal/1"
HDR_EPOCH, HDR_TIMESTAMP = -65537, -65538
ALG_A256GCM, ALG_CHACHA, ALG_HMAC = 3, 24, 5
PYCOSE_ALGS: dict[int, Any] = {ALG_A256GCM: A256GCM, ALG_CHACHA: ChaCha20Poly1305,
                               ALG_HMAC: HMAC256}


def _rfc9052_nonce(self: EncCommon) -> bytes:
    """Replacement for pycose 1.1.0 `EncCommon._get_nonce` (docs/protocol.md section 6).

    pycose bug: it computes `nonce.to_bytes((nonce.bit_length() + 7) // 8, "big")`, which drops
    the leading zero bytes of `base_iv XOR Partial IV`. The Partial IV only reaches the last 5
    bytes, so every message of a key whose base IV starts with 00 (one device in 256) gets a
    nonce shorter than 12 bytes (AES-GCM quietly computes something else, ChaCha20 raises).
    RFC 9052 section 3.1: left-pad the Partial IV to the IV length, XOR with the Context IV.
    (pycose also shortens the Partial IV with `utils.truncate`, but only in `__repr__`; nothing
    here relies on a repr.)
    """
    iv = self.get_attr(headers.IV)
    if iv is not None:
        return bytes(iv)
    piv = self.get_attr(headers.PartialIV)
    base_iv = self.key.base_iv
    if piv is None or not base_iv:
        raise CoseException("No IV found")
    padded = bytes(piv).rjust(len(base_iv), b"\0")
    return bytes(a ^ b for a, b in zip(base_iv, padded, strict=True))


_PYCOSE_NONCE = EncCommon._get_nonce
setattr(EncCommon, "_get_nonce", _rfc9052_nonce)  # noqa: B010  (the documented patch)


def parse_credential(text: str) -> tuple[bytes, int, bytes]:
    """ss1.<24 hex>.<epoch>.<base64url secret>  (docs/protocol.md section 3)."""
    prefix, kid_hex, epoch, secret_b64 = text.strip().split(".")
    assert prefix == "ss1" and len(kid_hex) == 24 and epoch.isdigit()
    secret = base64.urlsafe_b64decode(secret_b64 + "=" * (-len(secret_b64) % 4))
    assert len(secret) == 32
    return bytes.fromhex(kid_hex), int(epoch), secret


def derive(secret: bytes, kid: bytes, epoch: int, direction: str, purpose: str,
           alg: int | None, length: int) -> bytes:
    """HKDF-SHA256, no salt, info = CBOR [label, kid, epoch, direction, purpose, alg, L]."""
    info = cbor2.dumps([PROTOCOL, kid, epoch, direction, purpose, alg, length])
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


class Device:
    """Keys of one (device, epoch, direction), as pycose key objects."""

    def __init__(self, credential: str, direction: str) -> None:
        self.kid, self.epoch, secret = parse_credential(credential)
        base_iv = derive(secret, self.kid, self.epoch, direction, "iv", None, 12)
        self.keys: dict[int, SymmetricKey] = {}
        for alg, purpose in ((ALG_A256GCM, "enc"), (ALG_CHACHA, "enc"), (ALG_HMAC, "mac")):
            key = SymmetricKey(k=derive(secret, self.kid, self.epoch, direction, purpose, alg, 32))
            if purpose == "enc":
                key.base_iv = base_iv
            self.keys[alg] = key


def external_aad(direction: str, route: str) -> bytes:
    return cbor2.dumps([PROTOCOL, direction, route])


def partial_iv(seq: int) -> bytes:
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


def seal(req: dict[str, Any]) -> dict[str, Any]:
    dev = Device(req["credential"], req["direction"])
    aad = external_aad(req["direction"], req["route"])
    out = []
    for m in req["messages"]:
        alg = m["alg"]
        phdr: dict[Any, Any] = {headers.Algorithm: PYCOSE_ALGS[alg], headers.KID: dev.kid,
                                headers.PartialIV: partial_iv(m["seq"]), HDR_EPOCH: dev.epoch}
        if m.get("timestamp_ms") is not None:
            phdr[HDR_TIMESTAMP] = m["timestamp_ms"]
        cls = Mac0Message if m["level"] == "signed" else Enc0Message
        msg = cls(phdr=phdr, uhdr={}, payload=bytes.fromhex(m["payload"]), external_aad=aad,
                  key=dev.keys[alg])
        out.append(msg.encode().hex())
    return {"messages": out}


def _open_one(data: bytes, devices: dict[tuple[bytes, int], Device], aad: bytes) -> dict[str, Any]:
    msg = CoseMessage.decode(data)
    if msg.uhdr:
        raise CoseException("unprotected header must be empty")
    kid, epoch = msg.phdr[headers.KID], msg.phdr[HDR_EPOCH]  # private label kept as an int
    dev = devices[(kid, epoch)]
    alg = msg.phdr[headers.Algorithm].identifier
    msg.key = dev.keys[alg]
    msg.external_aad = aad  # type: ignore[misc]  # pycose declares its setter late
    if isinstance(msg, Enc0Message):
        if alg not in (ALG_A256GCM, ALG_CHACHA):
            raise CoseException("not an AEAD alg")
        payload, level = msg.decrypt(), "sealed"
    elif isinstance(msg, Mac0Message):
        if alg != ALG_HMAC or not msg.verify_tag():
            raise CoseException("MAC does not verify")
        payload, level = bytes(msg.payload or b""), "signed"
    else:
        raise CoseException(f"unexpected message type {type(msg).__name__}")
    return {"ok": True, "level": level, "alg": alg, "kid": kid.hex(), "epoch": epoch,
            "seq": int.from_bytes(msg.phdr[headers.PartialIV], "big"),
            "timestamp_ms": msg.phdr.get(HDR_TIMESTAMP), "payload": payload.hex()}


def _devices(req: dict[str, Any]) -> dict[tuple[bytes, int], Device]:
    devs = [Device(c, req["direction"]) for c in req["credentials"]]
    return {(d.kid, d.epoch): d for d in devs}


def open_messages(req: dict[str, Any]) -> dict[str, Any]:
    devices = _devices(req)
    aad = external_aad(req["direction"], req["route"])
    results = []
    for hexmsg in req["messages"]:
        try:
            results.append(_open_one(bytes.fromhex(hexmsg), devices, aad))
        except Exception as exc:  # report, do not die: the test decides what a failure means
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return {"results": results}


def bench(req: dict[str, Any]) -> dict[str, Any]:
    devices = _devices(req)
    aad = external_aad(req["direction"], req["route"])
    messages = [bytes.fromhex(m) for m in req["messages"]]
    best = float("inf")
    for _ in range(int(req.get("repeat", 1))):  # the fastest run counts, as for sensorseal
        start = time.perf_counter()
        for data in messages:
            _open_one(data, devices, aad)
        best = min(best, time.perf_counter() - start)
    return {"count": len(messages), "seconds": best}


def probe(_req: dict[str, Any]) -> dict[str, Any]:
    version = importlib.metadata.version
    return {"pycose": version("pycose"), "cbor2": version("cbor2"),
            "sensorseal_importable": importlib.util.find_spec("sensorseal") is not None}


def main() -> None:
    req = json.load(sys.stdin)
    if req.get("unpatched"):  # only to show that the patch above is needed
        setattr(EncCommon, "_get_nonce", _PYCOSE_NONCE)  # noqa: B010
    ops = {"seal": seal, "open": open_messages, "bench": bench, "probe": probe}
    json.dump(ops[req["op"]](req), sys.stdout)


if __name__ == "__main__":
    main()
