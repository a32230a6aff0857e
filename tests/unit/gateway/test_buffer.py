"""The store-and-forward buffer: order, bound with refuse-new, durability across reopen,
sequence numbers never reused after a crash."""

from __future__ import annotations

from pathlib import Path

from sensorseal.gateway.buffer import Buffer

N, S = b"n" * 12, b"s" * 12


def test_order_bound_and_reopen(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "b.db", max_frames=5)
    assert b.put([b"1", b"2", b"3"], [(N, S, 3)], 1) == 3
    assert b.put([b"4", b"5", b"6", b"7"], [(N, S, 7)], 2) == 2  # refuse new: 6, 7 not stored
    rows = b.oldest(10)
    assert [item for _, item in rows] == [b"1", b"2", b"3", b"4", b"5"]
    b.delete_through(rows[1][0])
    b.close()
    b = Buffer(tmp_path / "b.db", max_frames=5)  # after a crash or restart
    assert [item for _, item in b.oldest(10)] == [b"3", b"4", b"5"]
    assert len(b) == 3
    assert b.link_tops() == [(N, S, 7)]
    assert b.put([b"8"], [], 3) == 1
    assert [item for _, item in b.oldest(10)][-1] == b"8"


def test_sequence_numbers_survive_a_crash(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "b.db", seq_block=10)
    used = {b.next_seq() for _ in range(15)}
    # no close(): a kill -9 keeps whatever was durably reserved
    b2 = Buffer(tmp_path / "b.db", seq_block=10)
    assert not used & {b2.next_seq() for _ in range(30)}


def test_drops_are_kept_until_delivered(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "b.db")
    b.add_drops([("link_auth", 3, 10), ("garbage", 1, 11)])
    pending = b.pending_drops()
    assert [(lb, c) for _, lb, c, _ in pending] == [("link_auth", 3), ("garbage", 1)]
    b.delete_through(0, pending[0][0])
    assert b.drop_totals() == {"garbage": 1}
