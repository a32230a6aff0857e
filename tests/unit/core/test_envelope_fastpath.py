"""The fast path of `unseal` against the general one: same answer for every input.

`unseal` takes a regex-validated fast path for the layout `seal()` writes and the general parser
for everything else. The general path runs for anything that is not `bytes` (a bytearray, say),
so each test opens the same input both ways and demands the same `Opened` or the same reason.
Headers are built here from parts, with shortest and longer integer encodings, other label
orders and wrong map sizes, and sealed under the real key, so that a header the fast pattern
wrongly accepted would decrypt and show up as a difference.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorseal.core import envelope
from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import Opened, seal, unseal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import Alg, derive
from sensorseal.core.policy import PRESETS, Policy
from sensorseal.core.replay import MAX_SEQ

SECRET = bytes(range(7, 39))
DEVICE = DeviceId(bytes.fromhex("65f0000000000000000000aa"))
ROUTE = "/v1/messages"
NOW_MS = 1_700_000_000_000
DIFF = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def lookup_for(policy: Policy = PRESETS["lax"]) -> Any:
    table: dict[int, SecurityContext] = {}

    def lookup(device_id: DeviceId, epoch: int) -> SecurityContext:
        if device_id != DEVICE:
            raise Rejected(RejectReason.UNKNOWN_DEVICE)
        if epoch not in table:
            table[epoch] = SecurityContext.from_secret(SECRET, DEVICE, epoch, Direction.UP,
                                                       policy)
        return table[epoch]

    return lookup


def outcome(data: bytes | bytearray, policy: Policy = PRESETS["lax"]) -> Opened | str:
    """The result of opening `data` with a fresh receiver: an Opened or the reason."""
    try:
        return unseal(data, route=ROUTE, contexts=lookup_for(policy), now_ms=NOW_MS)
    except Rejected as exc:
        return exc.reason.value


def both(data: bytes, policy: Policy = PRESETS["lax"]) -> Opened | str:
    fast, general = outcome(data, policy), outcome(bytearray(data), policy)
    assert fast == general, (data.hex(), fast, general)
    if isinstance(fast, Opened):
        assert type(fast.device_id) is DeviceId and str(fast.device_id) == str(DEVICE)
    return fast


def uint(n: int, extra: int) -> bytes:
    """CBOR unsigned integer n with a head `extra` sizes longer than the shortest (0 = shortest)."""
    forms = [(24, 0, b""), (0x100, 0x18, b"\x18"), (0x10000, 0x19, b"\x19"),
             (0x100000000, 0x1A, b"\x1a"), (2**64, 0x1B, b"\x1b")]
    sizes = {b"": 0, b"\x18": 1, b"\x19": 2, b"\x1a": 4, b"\x1b": 8}
    shortest = next(i for i, (limit, _, _) in enumerate(forms) if n < limit)
    i = min(shortest + extra, len(forms) - 1)
    head = forms[i][2]
    return bytes((n,)) if not head else head + n.to_bytes(sizes[head], "big")


def neg(label: int) -> bytes:
    return b"\x3a" + (-1 - label).to_bytes(4, "big")


def raw_sealed(header: bytes, payload: bytes, seq: int, epoch: int, alg: int) -> bytes:
    """Encrypt under the device's real key with any protected header bytes."""
    keys = derive(SECRET, DEVICE, epoch, Direction.UP)
    prot = envelope._bstr(header)
    aad = envelope._aad_bstr(Direction.UP, ROUTE)
    ct = keys.aead(alg).encrypt(keys.nonce(envelope.partial_iv(seq)), payload,
                                envelope._enc_structure(prot, aad))
    return b"\xd0\x83" + prot + b"\xa0" + envelope._bstr(ct)


ALGS = st.sampled_from([Alg.A256GCM, Alg.CHACHA20_POLY1305])
SEQS = st.one_of(st.integers(0, 300), st.integers(0, MAX_SEQ))
EPOCHS = st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1))
STAMPS = st.one_of(st.none(), st.integers(0, 300), st.integers(0, 2**53 - 1))


@DIFF
@given(alg=ALGS, seq=SEQS, epoch=EPOCHS, ts=STAMPS, payload=st.binary(max_size=700))
def test_what_seal_writes_opens_the_same_both_ways(alg: int, seq: int, epoch: int,
                                                    ts: int | None, payload: bytes) -> None:
    data = seal(payload, keys=derive(SECRET, DEVICE, epoch, Direction.UP), seq=seq, route=ROUTE,
                timestamp_ms=ts, alg=alg)
    opened = both(data)
    assert isinstance(opened, Opened) and opened.payload == payload
    assert (opened.seq, opened.epoch, opened.timestamp_ms, opened.alg) == (seq, epoch, ts, alg)
    if len(payload) >= 8:  # bodies of 24+ bytes: the fast pattern must take what seal() writes
        assert envelope._FAST_SEALED.match(data) is not None


@DIFF
@given(alg=st.sampled_from([1, 3, 24, 5, 30, 255]), seq=SEQS, epoch=EPOCHS, ts=STAMPS,
       extras=st.lists(st.sampled_from([0, 0, 0, 1, 2, 4]), min_size=4, max_size=4),
       order=st.one_of(st.just([0, 1, 2, 3, 4]), st.permutations(range(5))),
       count_delta=st.sampled_from([0, 0, 0, -1, 1]),
       piv_pad=st.sampled_from([False, False, True]), payload=st.binary(min_size=8, max_size=300))
def test_headers_built_from_parts_open_the_same_both_ways(
        alg: int, seq: int, epoch: int, ts: int | None, extras: list[int], order: list[int],
        count_delta: int, piv_pad: bool, payload: bytes) -> None:
    piv = envelope.partial_iv(seq)
    padded = piv_pad and len(piv) < 5
    if padded:
        piv = b"\x00" + piv  # not the shortest form: refused
    entries = [b"\x01" + uint(alg, extras[0]), b"\x04" + envelope._bstr(bytes(DEVICE)),
               b"\x06" + envelope._bstr(piv), neg(-65537) + uint(epoch, extras[1])]
    if ts is not None:
        entries.append(neg(-65538) + uint(ts, extras[2]))
    entries = [entries[i] for i in order if i < len(entries)]
    count = max(0, len(entries) + count_delta)
    header = bytes((0xA0 | count,)) + b"".join(entries)
    result = both(raw_sealed(header, payload, seq, epoch,
                             alg if alg in (Alg.A256GCM, Alg.CHACHA20_POLY1305) else Alg.A256GCM))
    canonical = (not padded and count_delta == 0 and uint(alg, extras[0]) == uint(alg, 0)
                 and uint(epoch, extras[1]) == uint(epoch, 0)
                 and (ts is None or uint(ts, extras[2]) == uint(ts, 0)))
    if canonical and alg in (Alg.A256GCM, Alg.CHACHA20_POLY1305):
        assert isinstance(result, Opened), result  # any label order is valid CBOR: accepted
    elif not canonical:  # the general parser names an unsupported alg before the encoding
        assert result in ("malformed", "unsupported")


@DIFF
@given(data=st.data(), ts=STAMPS, payload=st.binary(min_size=8, max_size=300))
def test_every_mutation_gets_the_same_answer_both_ways(data: st.DataObject, ts: int | None,
                                                        payload: bytes) -> None:
    sealed = bytearray(seal(payload, keys=derive(SECRET, DEVICE, 9, Direction.UP), seq=77,
                            route=ROUTE, timestamp_ms=ts))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "replace"]))
    pos = data.draw(st.integers(0, len(sealed) - 1))
    if kind == "flip":
        sealed[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del sealed[pos:]
    elif kind == "insert":
        sealed[pos:pos] = data.draw(st.binary(min_size=1, max_size=3))
    else:
        sealed[pos] = data.draw(st.integers(0, 255))
    result = both(bytes(sealed))
    if isinstance(result, Opened):  # only a change that left the bytes as they were opens
        assert result.payload == payload


@pytest.mark.parametrize("policy", ["lax", "standard", "stringent"])
@pytest.mark.parametrize("ts", [None, NOW_MS, NOW_MS - 3_600_000, NOW_MS - 200_000 * 1000])
def test_policy_answers_are_the_same_both_ways(policy: str, ts: int | None) -> None:
    data = seal(b"twenty-one point five", keys=derive(SECRET, DEVICE, 1, Direction.UP), seq=5,
                route=ROUTE, timestamp_ms=ts)
    assert envelope._FAST_SEALED.match(data) is not None
    both(data, PRESETS[policy])


def test_replay_and_unknown_device_and_size_limit_are_the_same_both_ways() -> None:
    keys = derive(SECRET, DEVICE, 1, Direction.UP)
    data = seal(b"x" * 40, keys=keys, seq=5, route=ROUTE, timestamp_ms=NOW_MS)
    for form in (data, bytearray(data)):
        lookup = lookup_for()
        unseal(form, route=ROUTE, contexts=lookup, now_ms=NOW_MS)
        with pytest.raises(Rejected) as exc:
            unseal(form, route=ROUTE, contexts=lookup, now_ms=NOW_MS)
        assert exc.value.reason is RejectReason.REPLAY
        with pytest.raises(Rejected) as exc:
            unseal(form, route=ROUTE, contexts=lookup, now_ms=NOW_MS, max_size=len(data) - 1)
        assert exc.value.reason is RejectReason.OVERSIZE
        stranger = DeviceId(bytes(12))
        other = seal(b"x" * 40, keys=derive(SECRET, stranger, 1, Direction.UP), seq=5,
                     route=ROUTE, timestamp_ms=NOW_MS)
        with pytest.raises(Rejected) as exc:
            unseal(other if type(form) is bytes else bytearray(other), route=ROUTE,
                   contexts=lookup, now_ms=NOW_MS)
        assert exc.value.reason is RejectReason.UNKNOWN_DEVICE


def test_the_device_id_cache_stays_bounded() -> None:
    for i in range(70_000):
        envelope._device_id(i.to_bytes(12, "big"))
    assert len(envelope._id_cache) <= 65_536
    assert envelope._device_id(bytes(DEVICE)) == DEVICE


def test_a_header_that_is_not_cbor_map_of_the_seal_layout_takes_the_general_path() -> None:
    header = cbor2.dumps({4: bytes(DEVICE), 1: 3, 6: b"\x05", -65537: 1})  # another order
    data = raw_sealed(header, b"y" * 30, 5, 1, Alg.A256GCM)
    assert envelope._FAST_SEALED.match(data) is None
    assert isinstance(both(data), Opened)


def _header(alg: bytes = b"\x03", piv: bytes = b"\x41\x05", epoch: bytes = b"\x01",
            ts: bytes | None = b"\x1b" + (NOW_MS).to_bytes(8, "big"), count: int | None = None
            ) -> bytes:
    entries = [b"\x01" + alg, b"\x04\x4c" + bytes(DEVICE), b"\x06" + piv,
               neg(-65537) + epoch] + ([] if ts is None else [neg(-65538) + ts])
    return bytes((0xA0 | (len(entries) if count is None else count),)) + b"".join(entries)


NEAR_MISSES = {
    "alg in two bytes": _header(alg=b"\x18\x03"),
    "epoch 5 in two bytes": _header(epoch=b"\x18\x05"),
    "epoch 5 in three bytes": _header(epoch=b"\x19\x00\x05"),
    "epoch 300 in five bytes": _header(epoch=b"\x1a\x00\x00\x01\x2c"),
    "timestamp below 2**32 in nine bytes": _header(ts=b"\x1b" + (2**31).to_bytes(8, "big")),
    "timestamp below 2**16 in five bytes": _header(ts=b"\x1a" + (1000).to_bytes(4, "big")),
    "timestamp 2**53": _header(ts=b"\x1b" + (2**53).to_bytes(8, "big")),
    "Partial IV with a leading zero": _header(piv=b"\x42\x00\x05"),
    "Partial IV of six bytes": _header(piv=b"\x46\x01\x00\x00\x00\x00\x05"),
    "map of 4 holding 5 entries": _header(count=4),
    "map of 5 holding 4 entries": _header(ts=None, count=5),
}


@pytest.mark.parametrize("header", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_of_the_fast_layout_are_refused_both_ways(header: bytes) -> None:
    assert both(raw_sealed(header, b"z" * 40, 5, 1, Alg.A256GCM)) in ("malformed", "unsupported")


def test_the_near_miss_builder_builds_the_seal_layout() -> None:
    """The control for the near misses: unchanged, the same builder's header opens fast."""
    data = raw_sealed(_header(), b"z" * 40, 5, 1, Alg.A256GCM)
    assert envelope._FAST_SEALED.match(data) is not None
    assert isinstance(both(data), Opened)


@pytest.mark.parametrize("body_len", [16, 23, 24, 255, 256, 300])
@pytest.mark.parametrize("long_head", [False, True])
def test_ciphertext_heads_longer_than_needed_are_refused_both_ways(body_len: int,
                                                                   long_head: bool) -> None:
    sealed = raw_sealed(_header(), b"q" * (body_len - 16), 5, 1, Alg.A256GCM)
    head_len = len(envelope._bstr_head(body_len))
    prefix, body = sealed[:len(sealed) - body_len - head_len], sealed[len(sealed) - body_len:]
    if long_head:  # one size up: 0x58 for < 24, 0x59 for < 256, 0x5a above
        head = (b"\x58" + bytes((body_len,)) if body_len < 24 else
                b"\x59" + body_len.to_bytes(2, "big") if body_len < 256 else
                b"\x5a" + body_len.to_bytes(4, "big"))
    else:
        head = envelope._bstr_head(body_len)
    result = both(prefix + head + body)
    assert (result == "malformed") if long_head else isinstance(result, Opened)


def test_a_protected_header_with_a_long_head_is_refused_both_ways() -> None:
    sealed = raw_sealed(_header(), b"z" * 40, 5, 1, Alg.A256GCM)
    plen = sealed[3]
    assert sealed[2] == 0x58
    assert both(sealed[:2] + b"\x59" + plen.to_bytes(2, "big") + sealed[4:]) == "malformed"


def test_a_protected_length_that_disagrees_with_the_header_is_refused_both_ways() -> None:
    """A key holder seals a header whose bstr length is one short, the last timestamp byte
    standing in for the unprotected map: only the length check tells this from the real thing."""
    header = _header(ts=b"\x1b" + (NOW_MS - NOW_MS % 256 + 0xA0).to_bytes(8, "big"))
    assert header[-1] == 0xA0
    prot = b"\x58" + bytes((len(header) - 1,)) + header
    keys = derive(SECRET, DEVICE, 1, Direction.UP)
    aad = envelope._aad_bstr(Direction.UP, ROUTE)
    ct = keys.aead(Alg.A256GCM).encrypt(keys.nonce(b"\x05"), b"z" * 40,
                                        envelope._enc_structure(prot, aad))
    data = b"\xd0\x83" + prot + b"\xa0" + envelope._bstr(ct)
    assert envelope._FAST_SEALED.match(data) is not None
    assert both(data) == "malformed"


@DIFF
@given(alg=st.sampled_from([3, 5, 24]), seq=SEQS, epoch=EPOCHS, ts=STAMPS)
def test_the_hand_built_protected_header_is_what_cbor2_encodes(alg: int, seq: int, epoch: int,
                                                                ts: int | None) -> None:
    expected: dict[int, Any] = {1: alg, 4: bytes(DEVICE), 6: envelope.partial_iv(seq),
                                -65537: epoch}
    if ts is not None:
        expected[-65538] = ts
    assert envelope._protected(alg, DEVICE, seq, epoch, ts) == cbor2.dumps(expected)
