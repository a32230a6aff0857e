"""The sliding replay window (RFC 8613 section 7.4 semantics)."""

import pytest

from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.replay import ReplayWindow


def _refused(w: ReplayWindow, seq: int) -> bool:
    try:
        w.check(seq)
    except Rejected as exc:
        assert exc.reason is RejectReason.REPLAY
        return True
    return False


def test_fresh_window_accepts_anything_once() -> None:
    w = ReplayWindow(8)
    for seq in (0, 5, 3, 9):
        assert not _refused(w, seq)
        w.strike(seq)
        assert _refused(w, seq)


def test_out_of_order_inside_window_accepted_once() -> None:
    w = ReplayWindow(8)
    w.strike(10)
    for seq in (9, 4, 3):
        assert not _refused(w, seq)
        w.strike(seq)
    assert _refused(w, 9) and _refused(w, 4) and _refused(w, 3)
    assert not _refused(w, 5)


def test_left_of_window_refused() -> None:
    w = ReplayWindow(8)
    w.strike(100)
    assert _refused(w, 92)  # offset 8 == size: outside
    assert not _refused(w, 93)


def test_big_jump_clears_bitmap() -> None:
    w = ReplayWindow(4)
    w.strike(1)
    w.strike(1000)
    assert _refused(w, 1000) and not _refused(w, 999) and _refused(w, 996)


def test_check_does_not_record() -> None:
    w = ReplayWindow()
    w.check(7)
    w.check(7)
    assert not w.seen(7)


def test_resume_after_restart() -> None:
    w = ReplayWindow.resume(50, 16)
    assert _refused(w, 50)  # the stored top
    assert _refused(w, 34)  # left of the window
    assert not _refused(w, 40)  # inside: the store's unique key decides
    assert not _refused(w, 51)
    assert ReplayWindow.resume(None).top == -1


@pytest.mark.parametrize("size", [0, 5000])
def test_size_bounds(size: int) -> None:
    with pytest.raises(ConfigError):
        ReplayWindow(size)


def test_matches_a_set_model() -> None:
    import random

    rng = random.Random(7)
    w, seen, top = ReplayWindow(32), set(), -1
    for _ in range(5000):
        seq = max(0, top + rng.randint(-40, 5))
        model_refuses = seq in seen or (top - seq >= 32)
        assert _refused(w, seq) == model_refuses, seq
        if not model_refuses:
            w.strike(seq)
            seen.add(seq)
            top = max(top, seq)


def test_store_decides_left_of_window_on_servers() -> None:
    w = ReplayWindow(8, store_decides_left=True)
    w.strike(100)
    assert not _refused(w, 3)  # far left: passes the window, the store's unique key decides
    assert _refused(w, 100)  # known seen: still refused here
    w.strike(95)
    assert _refused(w, 95)
    assert not ReplayWindow.resume(50, 8, store_decides_left=True).seen(1)
