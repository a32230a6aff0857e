"""Envelope: one test per RejectReason the core raises, plus the guarantees of seal/unseal."""

from __future__ import annotations

import os

import cbor2
import pytest

from sensorseal.core import (
    PRESETS,
    Alg,
    DeviceId,
    Direction,
    Level,
    Rejected,
    RejectReason,
    SecurityContext,
    derive,
    parse,
    seal,
    unseal,
)
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import HDR_EPOCH, HDR_TIMESTAMP
from sensorseal.core.errors import ConfigError

ROUTE = "/v1/messages"
NOW = 1_700_000_000_000
ROOT = bytes(range(32))
DID = DeviceId(bytes.fromhex("65a1b2c3d4e5f60718293a4b"))


def ctx(policy: str = "lax", root: bytes = ROOT) -> SecurityContext:
    return SecurityContext.from_secret(root, DID, 1, Direction.UP, PRESETS[policy])


def sealed(seq: int = 1, *, level: Level = Level.SEALED, alg: int | None = None,
           route: str = ROUTE, ts: int | None = NOW, root: bytes = ROOT, epoch: int = 1,
           direction: Direction = Direction.UP, payload: bytes = b'{"t":21.5}') -> bytes:
    keys = derive(root, DID, epoch, direction)
    return seal(payload, keys=keys, seq=seq, route=route, timestamp_ms=ts, level=level, alg=alg)


def reason(data: bytes, c: SecurityContext | None = None, route: str = ROUTE,
           now: int = NOW) -> RejectReason:
    c = c or ctx()
    with pytest.raises(Rejected) as info:
        unseal(data, route=route, contexts=lambda d, e: c, now_ms=now)
    return info.value.reason


@pytest.mark.parametrize("alg", [Alg.A256GCM, Alg.CHACHA20_POLY1305])
def test_sealed_round_trip_hides_payload(alg: int) -> None:
    data = sealed(alg=alg, payload=b"secret reading 42")
    assert b"secret reading" not in data
    o = unseal(data, route=ROUTE, contexts=lambda d, e: ctx(), now_ms=NOW)
    assert (o.payload, o.seq, o.epoch, o.level, o.alg, o.timestamp_ms) == (
        b"secret reading 42", 1, 1, Level.SEALED, alg, NOW)
    assert o.device_id == DID


def test_signed_round_trip_payload_readable() -> None:
    data = sealed(level=Level.SIGNED, payload=b"public reading")
    assert b"public reading" in data
    o = unseal(data, route=ROUTE, contexts=lambda d, e: ctx(), now_ms=NOW)
    assert o.payload == b"public reading" and o.level is Level.SIGNED


def test_malformed() -> None:
    for junk in (b"", b"\x00", b"\xd0", b"\xd0\x83", cbor2.dumps([1, 2, 3]),
                 cbor2.dumps(cbor2.CBORTag(16, [b"", {}, b""])), sealed() + b"\x00"):
        assert reason(junk) is RejectReason.MALFORMED


def test_oversize() -> None:
    with pytest.raises(Rejected) as info:
        unseal(b"\xd0" * 70_000, route=ROUTE, contexts=lambda d, e: ctx(), now_ms=NOW)
    assert info.value.reason is RejectReason.OVERSIZE and info.value.status == 413


def test_unsupported_alg() -> None:
    good = parse(sealed())
    hdr = cbor2.loads(good.protected[1:] if good.protected[0] < 0x58 else good.protected[2:])
    hdr[1] = 1  # A128GCM: well formed, not accepted
    prot = cbor2.dumps(hdr)
    data = cbor2.dumps(cbor2.CBORTag(16, [prot, {}, b"x" * 32]))
    assert reason(data) is RejectReason.UNSUPPORTED


def test_unknown_device_reason_comes_from_the_context_lookup() -> None:
    def contexts(d: DeviceId, e: int) -> SecurityContext:
        raise Rejected(RejectReason.UNKNOWN_DEVICE)

    with pytest.raises(Rejected) as info:
        unseal(sealed(), route=ROUTE, contexts=contexts, now_ms=NOW)
    assert info.value.reason is RejectReason.UNKNOWN_DEVICE


def test_bad_mac_and_decrypt_failed_under_another_key() -> None:
    other = os.urandom(32)
    assert reason(sealed(level=Level.SIGNED, root=other)) is RejectReason.BAD_MAC
    assert reason(sealed(root=other)) is RejectReason.DECRYPT_FAILED


def test_route_and_direction_are_authenticated() -> None:
    assert reason(sealed(route="/elsewhere")) is RejectReason.DECRYPT_FAILED
    assert reason(sealed(direction=Direction.DOWN)) is RejectReason.DECRYPT_FAILED
    assert reason(sealed(level=Level.SIGNED, route="/x")) is RejectReason.BAD_MAC


def test_replay_and_nothing_struck_on_failure() -> None:
    c = ctx()
    data = sealed(5)
    unseal(data, route=ROUTE, contexts=lambda d, e: c, now_ms=NOW)
    assert reason(data, c) is RejectReason.REPLAY
    # a message that fails verification leaves no trace in the window
    assert reason(sealed(6, route="/x"), c) is RejectReason.DECRYPT_FAILED
    unseal(sealed(6), route=ROUTE, contexts=lambda d, e: c, now_ms=NOW)


def test_strike_false_leaves_window_to_the_caller() -> None:
    c = ctx()
    data = sealed(9)
    o = unseal(data, route=ROUTE, contexts=lambda d, e: c, now_ms=NOW, strike=False)
    unseal(data, route=ROUTE, contexts=lambda d, e: c, now_ms=NOW, strike=False)
    c.window.strike(o.seq)
    assert reason(data, c) is RejectReason.REPLAY


def test_policy_violation_and_stale() -> None:
    assert reason(sealed(level=Level.SIGNED), ctx("standard")) is RejectReason.POLICY_VIOLATION
    assert reason(sealed(ts=None), ctx("stringent")) is RejectReason.POLICY_VIOLATION
    assert reason(sealed(ts=NOW - 121_000), ctx("stringent")) is RejectReason.STALE
    assert reason(sealed(ts=NOW + 121_000), ctx("stringent")) is RejectReason.STALE
    unseal(sealed(ts=NOW - 119_000), route=ROUTE, contexts=lambda d, e: ctx("stringent"),
           now_ms=NOW)


def test_header_fields_parsed_before_verification() -> None:
    env = parse(sealed(seq=300, epoch=7, ts=123))
    assert (env.device_id, env.epoch, env.seq, env.timestamp_ms) == (DID, 7, 300, 123)


def test_non_canonical_header_rejected() -> None:
    # Partial IV with a leading zero byte would give a second encoding of the same number.
    hdr = {1: 3, 4: bytes(DID), 6: b"\x00\x01", HDR_EPOCH: 1, HDR_TIMESTAMP: NOW}
    data = cbor2.dumps(cbor2.CBORTag(16, [cbor2.dumps(hdr), {}, b"x" * 32]))
    assert reason(data) is RejectReason.MALFORMED
    # A non-empty unprotected header would be unauthenticated: refused.
    env = parse(sealed())
    data = cbor2.dumps(cbor2.CBORTag(16, [cbor2.loads(env.protected), {5: b"x"}, env.body]))
    assert reason(data) is RejectReason.MALFORMED


def test_every_single_bit_flip_rejected() -> None:
    for level in (Level.SEALED, Level.SIGNED):
        data = sealed(level=level)
        for bit in range(len(data) * 8):
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(Rejected):
                unseal(bytes(flipped), route=ROUTE, contexts=lambda d, e: ctx(), now_ms=NOW)


def test_seal_refuses_misuse() -> None:
    keys = derive(ROOT, DID, 1, Direction.UP)
    with pytest.raises(ConfigError):
        seal(b"", keys=keys, seq=-1, route=ROUTE, timestamp_ms=None)
    with pytest.raises(ConfigError):
        seal(b"", keys=keys, seq=2**40, route=ROUTE, timestamp_ms=None)
    with pytest.raises(ConfigError):
        seal(b"", keys=keys, seq=1, route=ROUTE, timestamp_ms=None, alg=Alg.HMAC_256_256)


def test_secrets_never_in_repr() -> None:
    keys = derive(ROOT, DID, 1, Direction.UP)
    cred = DeviceCredential(DID, 1, ROOT)
    for obj in (keys, cred, ctx()):
        text = repr(obj)
        assert ROOT.hex() not in text and str(ROOT) not in text


def test_credential_round_trip_and_errors() -> None:
    cred = DeviceCredential(DID, 3, ROOT)
    assert DeviceCredential.parse(cred.encode()) == cred
    for bad in ("", "ss1.x.1.y", "ss2." + cred.encode()[4:], cred.encode() + "A",
                cred.encode().replace(".3.", ".x.")):
        with pytest.raises(ConfigError) as info:
            DeviceCredential.parse(bad)
        assert cred.encode().split(".")[3] not in str(info.value)


def test_protected_header_must_be_preferred_serialization() -> None:
    """Longer heads, duplicate labels and indefinite maps all change the header's size."""
    good = parse(sealed()).protected
    prot = cbor2.loads(good)  # the bstr's content
    # epoch 1 written with a 4-byte head (1a 00 00 00 01) instead of the one-byte 01
    longer = prot.replace(b"\x3a\x00\x01\x00\x00\x01", b"\x3a\x00\x01\x00\x00\x1a\x00\x00\x00\x01")
    # the same map written as an indefinite-length map
    indefinite = b"\xbf" + prot[1:] + b"\xff"
    # a duplicated alg label: cbor2 keeps the last value, the map head says one pair more
    duplicated = bytes([prot[0] + 1]) + prot[1:] + b"\x01\x03"
    for variant in (longer, indefinite, duplicated, prot + b"\x00"):
        data = cbor2.dumps(cbor2.CBORTag(16, [variant, {}, b"x" * 32]))
        assert reason(data) is RejectReason.MALFORMED, variant.hex()
