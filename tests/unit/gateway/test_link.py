"""E1 link frames (core/link.py): round trip per algorithm, every changed byte refused, other
keys and networks refused, size and shape checks before any crypto, per-sender nonces."""

from __future__ import annotations

import os

import pytest

from sensorseal.core.errors import Rejected, RejectReason
from sensorseal.core.link import LinkAlg, NetworkKey, open_frame, parse_frame, wrap

NET = bytes.fromhex("6650a1b2c3d4e5f6aabbccdd")
KEY = bytes(range(16))
A = bytes.fromhex("6650a1b2c3d4e5f601234567")
B = bytes.fromhex("6650a1b2c3d4e5f601234568")


@pytest.mark.parametrize("alg", list(LinkAlg))
def test_round_trip_and_overhead(alg: LinkAlg) -> None:
    net = NetworkKey(NET, KEY, alg)
    frame = wrap(b"hello", network=net, sender=A, seq=1000)
    hdr = parse_frame(frame)
    assert (hdr.sender, hdr.seq, hdr.network_id, hdr.alg) == (A, 1000, NET, alg)
    assert open_frame(hdr, NetworkKey(NET, KEY, alg)) == b"hello"
    tag = 8 if alg is LinkAlg.AES_CCM_16_64_128 else 16
    assert len(frame) - 5 - tag <= 46  # header overhead of a 2-byte seq frame, plus the tag


@pytest.mark.parametrize("alg", list(LinkAlg))
def test_every_changed_byte_is_refused(alg: LinkAlg) -> None:
    net = NetworkKey(NET, KEY, alg)
    frame = wrap(b"reading 21.5", network=net, sender=A, seq=7)
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises(Rejected):
            open_frame(parse_frame(bytes(bad)), net)


def test_stranger_key_and_other_network_are_refused() -> None:
    frame = wrap(b"x", network=NetworkKey(NET, os.urandom(16)), sender=A, seq=1)
    with pytest.raises(Rejected) as exc:
        open_frame(parse_frame(frame), NetworkKey(NET, KEY))
    assert exc.value.reason is RejectReason.DECRYPT_FAILED
    other = NetworkKey(bytes(12), KEY)
    with pytest.raises(Rejected) as exc:
        open_frame(parse_frame(wrap(b"x", network=other, sender=A, seq=1)), NetworkKey(NET, KEY))
    assert exc.value.reason is RejectReason.DECRYPT_FAILED


def test_size_and_shape_are_checked_first() -> None:
    net = NetworkKey(NET, KEY)
    big = wrap(b"x" * 300, network=net, sender=A, seq=1)
    with pytest.raises(Rejected) as exc:
        parse_frame(big, mtu=255)
    assert exc.value.reason is RejectReason.OVERSIZE
    for junk in (b"", b"\x00", os.urandom(40), b"\xd0\x83\x40\xa0\x40"):
        with pytest.raises(Rejected) as exc:
            parse_frame(junk)
        assert exc.value.reason is RejectReason.MALFORMED


def test_nonce_never_shared_between_senders() -> None:
    """Same network key, same seq, same payload, two senders: different ciphertexts (their
    per-sender keys differ), so one node's counter cannot collide with another's."""
    net = NetworkKey(NET, KEY)
    fa = parse_frame(wrap(b"same", network=net, sender=A, seq=5))
    fb = parse_frame(wrap(b"same", network=net, sender=B, seq=5))
    assert fa.ciphertext != fb.ciphertext
    assert wrap(b"same", network=net, sender=A, seq=5) == wrap(b"same", network=net, sender=A,
                                                              seq=5)


def test_repr_hides_the_key() -> None:
    assert KEY.hex() not in repr(NetworkKey(NET, KEY))
