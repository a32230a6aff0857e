"""Properties of the envelope: round trips, tamper evidence, binding, replay, and the fuzz target.

The fuzz target's only invariant (CONVENTIONS.md, "In practice" 6): for any input, `unseal`
returns an `Opened` or raises `Rejected` — nothing else escapes. SENSORSEAL_FUZZ_EXAMPLES sets
the number of hypothesis examples for the fuzz tests (default small, for CI).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import Opened, seal, unseal
from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import Alg, derive
from sensorseal.core.replay import MAX_SEQ

FUZZ_EXAMPLES = int(os.environ.get("SENSORSEAL_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROPS = settings(max_examples=100, deadline=None)

SECRET = bytes(range(100, 132))
OTHER_SECRET = bytes(range(1, 33))
DEVICE = DeviceId(bytes.fromhex("65f000000000000000000001"))
EPOCH = 3
ROUTE = "/v1/messages"
NOW_MS = 1_700_000_000_000
KINDS = [(Level.SEALED, Alg.A256GCM), (Level.SEALED, Alg.CHACHA20_POLY1305),
         (Level.SIGNED, Alg.HMAC_256_256)]
KIND_IDS = ["a256gcm", "chacha20poly1305", "hmac256"]

Lookup = Callable[[DeviceId, int], SecurityContext]


def contexts(secret: bytes = SECRET, direction: Direction = Direction.UP,
             epochs: tuple[int, ...] = (EPOCH,), derive_epoch: int | None = None) -> Lookup:
    """A receiver that knows DEVICE at `epochs` (keys derived for `derive_epoch` if given)."""
    table = {e: SecurityContext.from_secret(secret, DEVICE, e if derive_epoch is None
                                            else derive_epoch, direction) for e in epochs}

    def lookup(device_id: DeviceId, epoch: int) -> SecurityContext:
        if device_id != DEVICE:
            raise Rejected(RejectReason.UNKNOWN_DEVICE)
        if epoch not in table:
            raise Rejected(RejectReason.UNKNOWN_EPOCH)
        return table[epoch]

    return lookup


def make(payload: bytes = b"reading 21.5C", *, seq: int = 42, kind: int = 0, route: str = ROUTE,
         direction: Direction = Direction.UP, ts: int | None = NOW_MS,
         secret: bytes = SECRET, epoch: int = EPOCH) -> bytes:
    level, alg = KINDS[kind]
    keys = derive(secret, DEVICE, epoch, direction)
    return seal(payload, keys=keys, seq=seq, route=route, timestamp_ms=ts, level=level, alg=alg)


def open_(data: bytes, lookup: Lookup | None = None, route: str = ROUTE) -> Opened:
    return unseal(data, route=route, contexts=lookup or contexts(), now_ms=NOW_MS)


def reason_of(data: bytes, lookup: Lookup | None = None, route: str = ROUTE) -> RejectReason:
    with pytest.raises(Rejected) as exc:
        open_(data, lookup, route)
    return exc.value.reason


# --- round trip ------------------------------------------------------------------------------


@PROPS
@given(payload=st.binary(max_size=2048), seq=st.integers(0, MAX_SEQ), kind=st.integers(0, 2),
       route=st.text(max_size=80), direction=st.sampled_from(Direction),
       ts=st.none() | st.integers(0, 2**53 - 1), epoch=st.integers(0, 2**32 - 1))
def test_round_trip(payload: bytes, seq: int, kind: int, route: str, direction: Direction,
                    ts: int | None, epoch: int) -> None:
    data = make(payload, seq=seq, kind=kind, route=route, direction=direction, ts=ts,
                epoch=epoch)
    opened = unseal(data, route=route, contexts=contexts(direction=direction, epochs=(epoch,)),
                    now_ms=NOW_MS)
    level, alg = KINDS[kind]
    assert opened == Opened(DEVICE, epoch, seq, ts, level, alg, direction, route, payload)
    if level is Level.SEALED and len(payload) >= 8:
        assert payload not in data  # sealed hides the payload


# --- tamper evidence: every bit, every truncation --------------------------------------------


@pytest.mark.parametrize("kind", range(3), ids=KIND_IDS)
def test_every_single_bit_flip_is_rejected(kind: int) -> None:
    """Exhaustive over all bit positions of one message per kind."""
    data = make(kind=kind)
    open_(data, contexts())  # the untouched message is fine
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(Rejected):
            open_(bytes(flipped))


@PROPS
@given(payload=st.binary(max_size=300), kind=st.integers(0, 2), seq=st.integers(0, MAX_SEQ),
       data=st.data())
def test_random_bit_flip_is_rejected(payload: bytes, kind: int, seq: int, data: Any) -> None:
    message = make(payload, kind=kind, seq=seq)
    bit = data.draw(st.integers(0, len(message) * 8 - 1))
    flipped = bytearray(message)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(Rejected):
        open_(bytes(flipped))


@pytest.mark.parametrize("kind", range(3), ids=KIND_IDS)
def test_truncation_at_every_length_and_extension_are_rejected(kind: int) -> None:
    data = make(b"x" * 40, kind=kind)
    for n in range(len(data)):
        assert reason_of(data[:n]) is RejectReason.MALFORMED
    for extra in (b"\x00", b"\xa0", data):
        assert reason_of(data + extra) is RejectReason.MALFORMED


# --- binding: route, direction, key, epoch ---------------------------------------------------


@pytest.mark.parametrize("kind", range(3), ids=KIND_IDS)
def test_binding_to_route_direction_key_and_epoch(kind: int) -> None:
    auth_fail = RejectReason.BAD_MAC if kind == 2 else RejectReason.DECRYPT_FAILED
    data = make(kind=kind)
    assert reason_of(data, route="/v1/messages/") is auth_fail
    assert reason_of(data, route="") is auth_fail
    assert reason_of(data, contexts(direction=Direction.DOWN)) is auth_fail
    assert reason_of(data, contexts(secret=OTHER_SECRET)) is auth_fail
    # Epoch: unknown to the receiver, or known but with keys of another epoch.
    assert reason_of(data, contexts(epochs=(EPOCH + 1,))) is RejectReason.UNKNOWN_EPOCH
    assert reason_of(data, contexts(derive_epoch=EPOCH + 1)) is auth_fail
    assert reason_of(make(kind=kind, direction=Direction.DOWN)) is auth_fail
    assert open_(data).payload == b"reading 21.5C"


# --- replay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", range(3), ids=KIND_IDS)
def test_replay_is_rejected_and_failures_leave_no_trace(kind: int) -> None:
    lookup = contexts()
    first = make(kind=kind, seq=100)
    tampered = bytearray(first)
    tampered[-1] ^= 0x80
    with pytest.raises(Rejected):
        open_(bytes(tampered), lookup)
    assert open_(first, lookup).seq == 100  # the failed copy struck nothing
    assert reason_of(first, lookup) is RejectReason.REPLAY
    assert open_(make(kind=kind, seq=90), lookup).seq == 90  # inside the window, unseen
    assert reason_of(make(kind=kind, seq=90), lookup) is RejectReason.REPLAY
    assert open_(make(kind=kind, seq=1000), lookup).seq == 1000
    assert reason_of(make(kind=kind, seq=1000 - 64), lookup) is RejectReason.REPLAY  # left of it
    assert open_(make(kind=kind, seq=1000 - 63), lookup).seq == 1000 - 63


@PROPS
@given(seqs=st.lists(st.integers(0, 300), min_size=1, max_size=40))
def test_each_sequence_number_is_accepted_at_most_once(seqs: list[int]) -> None:
    lookup = contexts()
    accepted: list[int] = []
    for seq in seqs:
        try:
            accepted.append(open_(make(seq=seq), lookup).seq)
        except Rejected as exc:
            assert exc.reason is RejectReason.REPLAY
    assert len(accepted) == len(set(accepted))


# --- the fuzz target -------------------------------------------------------------------------


def accept_or_reject(data: bytes) -> None:
    """The invariant: an Opened, or Rejected. Any other exception fails the test."""
    try:
        result = open_(data)
    except Rejected:
        return
    assert isinstance(result, Opened)


def _head(major: int, n: int, width: int | None = None) -> bytes:
    """A CBOR head; `width` forces a (possibly non-shortest) argument size: 0,1,2,4,8 bytes."""
    if width is None:
        width = 0 if n < 24 else 1 if n < 2**8 else 2 if n < 2**16 else 4 if n < 2**32 else 8
    if width == 0:
        return bytes([major << 5 | n])
    code = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | code]) + n.to_bytes(width, "big")


def _raw_cbor(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Compound raw CBOR items, including indefinite lengths and non-shortest heads."""
    widths = st.sampled_from([None, None, None, 1, 2, 4, 8])

    def array(items: list[bytes], indefinite: bool, width: int | None) -> bytes:
        if indefinite:
            return b"\x9f" + b"".join(items) + b"\xff"
        try:
            return _head(4, len(items), width) + b"".join(items)
        except OverflowError:
            return _head(4, len(items)) + b"".join(items)

    def mapping(items: list[bytes], indefinite: bool) -> bytes:
        pairs = items[: len(items) // 2 * 2]
        body = b"".join(pairs)
        return (b"\xbf" + body + b"\xff") if indefinite else _head(5, len(pairs) // 2) + body

    def tagged(tag: int, item: bytes) -> bytes:
        return _head(6, tag) + item

    def chunked(parts: list[bytes], text: bool) -> bytes:
        major = 3 if text else 2
        chunks = b"".join(_head(major, len(p)) + p for p in parts)
        return bytes([major << 5 | 31]) + chunks + b"\xff"

    return st.one_of(
        st.builds(array, st.lists(children, max_size=5), st.booleans(), widths),
        st.builds(mapping, st.lists(children, max_size=8), st.booleans()),
        st.builds(tagged, st.sampled_from([0, 1, 2, 3, 16, 17, 18, 24, 55799, 2**64 - 1]) |
                  st.integers(0, 2**64 - 1), children),
        st.builds(chunked, st.lists(st.binary(max_size=8), max_size=3), st.booleans()),
    )


_atoms = st.one_of(
    st.integers(0, 2**64 - 1).map(lambda n: _head(0, n)),
    st.integers(0, 2**64 - 1).map(lambda n: _head(1, n)),
    st.binary(max_size=40).map(lambda b: _head(2, len(b)) + b),
    st.text(max_size=20).map(lambda t: _head(3, len(t.encode())) + t.encode()),
    st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xf8\x20", b"\xff", b"\x1f", b"\x5f"]),
    st.floats().map(lambda f: b"\xfb" + struct.pack(">d", f)),
    st.integers(0, 2**2048).map(lambda n: b"\xc2" + _head(2, (n.bit_length() + 7) // 8)
                                + n.to_bytes((n.bit_length() + 7) // 8, "big")),  # bignum
)
RAW_CBOR = st.recursive(_atoms, _raw_cbor, max_leaves=30)

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**300), 2**300) | st.binary(max_size=30)
    | st.text(max_size=20) | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.integers(-(2**70), 2**70) | st.text(max_size=5), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.integers(0, 2**64 - 1), inner),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    accept_or_reject(data)


@FUZZ
@given(RAW_CBOR)
def test_fuzz_raw_cbor(data: bytes) -> None:
    accept_or_reject(data)
    for lead in (b"\xd0", b"\xd1"):  # the same items as a COSE tag's content
        accept_or_reject(lead + data)


@FUZZ
@given(_values)
def test_fuzz_structured_cbor(value: Any) -> None:
    accept_or_reject(cbor2.dumps(value))
    accept_or_reject(cbor2.dumps(cbor2.CBORTag(16, [value, {}, b"\x00" * 16])))


def _frame(lead: bytes, protected: bytes, body: bytes, tag: bytes | None) -> bytes:
    out = lead + _head(2, len(protected)) + protected + b"\xa0" + _head(2, len(body)) + body
    return out + (_head(2, len(tag)) + tag if tag is not None else b"")


_labels = st.sampled_from([1, 4, 6, -65537, -65538]) | st.integers(-(2**64), 2**64 - 1)
_header_values: st.SearchStrategy[Any] = st.sampled_from(
    [3, 24, 5, -1, 2**40, bytes(DEVICE), b"\x00", b"\x00\x01", b"\x01" * 6, EPOCH, 2**32, -5,
     2**53, True, None, 1.5, "3", [], {}]) | _values


@FUZZ
@given(header=st.dictionaries(_labels, _header_values, max_size=7), raw=RAW_CBOR,
       use_raw=st.booleans(), signed=st.booleans(), body=st.binary(max_size=64))
def test_fuzz_header_inside_valid_framing(header: dict[int, Any], raw: bytes, use_raw: bool,
                                          signed: bool, body: bytes) -> None:
    """Well-framed envelopes whose protected header is arbitrary: reaches the header checks."""
    protected = raw if use_raw else cbor2.dumps(header)
    if signed:
        accept_or_reject(_frame(b"\xd1\x84", protected, body, body[:32].ljust(32, b"\0")))
    else:
        accept_or_reject(_frame(b"\xd0\x83", protected, body.ljust(16, b"\0"), None))


@pytest.mark.parametrize("protected", [
    b"\x81" * 20000 + b"\x00",  # deep nesting
    b"\x9f" * 20000 + b"\xff" * 20000,  # deep indefinite nesting
    b"\xa1\x01" * 10000 + b"\x00",  # deep maps
    b"\xc2\x5a\x00\x00\xff\xff" + b"\xff" * 0xFFFF,  # a 512-kbit bignum
    b"\xbf\x01\x03\xff",  # indefinite-length map
    b"\xa2\x01\x03\x01\x03",  # duplicate label
    b"\xa1\x01\x03\x00",  # a map followed by a trailing byte
    b"\xa1\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00\x03",  # NaN as a label
    b"\xa1\x80\x03",  # an (unhashable) array as a label
    b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # a byte string claiming 2^64 bytes
], ids=["deep-array", "deep-indef", "deep-map", "bignum", "indef-map", "dup-label",
        "trailing", "nan-label", "array-label", "huge-length"])
def test_hostile_protected_headers(protected: bytes) -> None:
    for lead, tag in ((b"\xd0\x83", None), (b"\xd1\x84", b"\0" * 32)):
        data = _frame(lead, protected, b"\0" * 16, tag)
        if len(data) <= 64 * 1024:
            assert reason_of(data) in (RejectReason.MALFORMED, RejectReason.UNSUPPORTED)
        accept_or_reject(data)


def test_oversize_is_rejected_before_parsing() -> None:
    big = make(b"\0" * 70_000)
    assert reason_of(big) is RejectReason.OVERSIZE
    assert reason_of(b"\xff" * (64 * 1024 + 1)) is RejectReason.OVERSIZE


def test_trailing_bytes_inside_protected_header_are_malformed() -> None:
    """A correctly MACed message whose protected bstr holds the map plus one extra byte.

    It is authenticated, so not a forgery; but it is a second encoding of the same header, which
    the document's one-encoding rule forbids.
    """
    from sensorseal.core import envelope

    keys = derive(SECRET, DEVICE, EPOCH, Direction.UP)
    protected = envelope._protected(Alg.HMAC_256_256, DEVICE, 7, EPOCH, None) + b"\x00"
    prot, aad = envelope._bstr(protected), envelope._bstr(envelope.external_aad(Direction.UP,
                                                                                 ROUTE))
    tag = envelope._hmac(keys.mac_key, envelope._mac_structure(prot, aad, b"hi"))
    data = b"\xd1\x84" + prot + b"\xa0" + envelope._bstr(b"hi") + envelope._bstr(tag)
    assert reason_of(data) is RejectReason.MALFORMED
