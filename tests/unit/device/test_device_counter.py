"""SequenceCounter: never reuse a number, across crashes, threads, damage and block edges."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sensorseal.core.errors import ConfigError
from sensorseal.core.replay import MAX_SEQ
from sensorseal.device._statefile import read_state, write_state
from sensorseal.device.counter import SequenceCounter

KIND = "seq-next-unreserved"


def stored(path: Path) -> int | None:
    return read_state(path, KIND)


# A "crash" in-process: `del c` without close(); the file keeps its mark and the lock is freed,
# as when the process dies. The SIGKILL tests below do the same with a real process.


def test_starts_at_one_and_counts_up(tmp_path: Path) -> None:
    with SequenceCounter(tmp_path / "c", create=True) as c:
        assert [c.next() for _ in range(5)] == [1, 2, 3, 4, 5]


def test_block_boundaries_reserve_ahead(tmp_path: Path) -> None:
    path = tmp_path / "c"
    c = SequenceCounter(path, block_size=3, create=True)
    assert stored(path) == 1  # created, nothing reserved yet
    assert c.next() == 1
    assert stored(path) == 4  # 1..3 reserved before 1 was handed out
    assert c.next() == 2
    assert c.next() == 3
    assert stored(path) == 4  # still inside the block: no write
    assert c.next() == 4
    assert stored(path) == 7  # crossing the boundary reserves the next block first
    del c
    gc.collect()
    c2 = SequenceCounter(path, block_size=3)
    assert c2.next() == 7  # 5 and 6 are skipped, never reused
    c2.close()


def test_new_object_after_crash_never_repeats(tmp_path: Path) -> None:
    path = tmp_path / "c"
    seen: set[int] = set()
    for round_no in range(1, 30):
        c = SequenceCounter(path, block_size=10, create=True)
        got = [c.next() for _ in range(round_no)]
        assert seen.isdisjoint(got)
        assert got == sorted(got)
        seen.update(got)
        if round_no % 3:
            del c
            gc.collect()
        else:
            c.close()


def test_close_gives_back_the_rest_of_the_block(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with SequenceCounter(path, create=True) as c:
        assert [c.next() for _ in range(3)] == [1, 2, 3]
        assert stored(path) == 1001
    assert stored(path) == 4
    with SequenceCounter(path) as c:
        assert c.next() == 4
        c.close()
        with pytest.raises(ConfigError, match="closed"):
            c.next()


_CHILD = """
import os, signal, sys
from sensorseal.device.counter import SequenceCounter
c = SequenceCounter(sys.argv[1], block_size=int(sys.argv[2]), create=True)
n = int(sys.argv[3])
for i in range(n if n >= 0 else 10**9):
    print(c.next(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_child(path: Path, block: int, count: int) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(block), str(count)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return [int(line) for line in proc.stdout.split()]


def test_sigkilled_process_never_reused(tmp_path: Path) -> None:
    """A real process killed with SIGKILL (no cleanup at all) at various points in a block."""
    path = tmp_path / "c"
    seen: list[int] = []
    for count in (0, 4, 5, 6, 11):
        got = _run_child(path, 5, count)
        assert len(got) == count
        assert not set(got) & set(seen)
        seen += got
    assert seen == sorted(seen)
    with SequenceCounter(path, block_size=5) as c:
        assert c.next() > max(seen)


def test_killed_mid_stream_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "7", "-1"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    printed = [int(proc.stdout.readline()) for _ in range(200)]
    proc.kill()
    proc.wait(timeout=10)
    mark = stored(path)
    assert mark is not None and mark > max(printed)
    with SequenceCounter(path, block_size=7) as c:
        assert c.next() == mark  # resumes at the mark: past anything the dead process used


def test_threads_get_distinct_contiguous_numbers(tmp_path: Path) -> None:
    path = tmp_path / "c"
    c = SequenceCounter(path, block_size=50, create=True)
    results: list[list[int]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def work(out: list[int]) -> None:
        barrier.wait()
        for _ in range(500):
            out.append(c.next())

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    everything = [n for r in results for n in r]
    assert sorted(everything) == list(range(1, 4001))
    for r in results:
        assert r == sorted(r)  # each thread sees increasing numbers
    mark = stored(path)
    assert mark is not None and mark > 4000
    c.close()


def test_second_user_of_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with SequenceCounter(path, create=True) as c:
        with pytest.raises(ConfigError, match="in use"):
            SequenceCounter(path)
        c.next()
    with SequenceCounter(path) as c2:  # free again after close
        assert c2.next() == 2


def test_missing_file_is_not_a_fresh_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        SequenceCounter(tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("content", [
    b"",
    b"garbage\n",
    b"\x00" * 40,
    b"sensorseal-state/1 seq-next-unreserved 2001",  # torn: no checksum, no newline
    b"sensorseal-state/1 downlink-top 5 00000000\n",  # another kind of file
    b"sensorseal-state/1 seq-next-unreserved 2001 ffffffff\n",  # wrong checksum
])
def test_damaged_file_is_refused_not_restarted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="damaged"):
        SequenceCounter(path, create=True)
    assert path.read_bytes() == content  # left as it was, for a human to look at


def test_flipped_digit_is_detected(tmp_path: Path) -> None:
    """'5' (0x35) -> '4' (0x34) is one bit and would send the counter back a thousand."""
    path = tmp_path / "c"
    write_state(path, KIND, 5001)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b" 5001 ", b" 4001 "))
    with pytest.raises(ConfigError, match="damaged"):
        SequenceCounter(path)


def test_impossible_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    for value in (0, -3, 2**40 + 1):
        write_state(path, KIND, value)
        with pytest.raises(ConfigError, match="impossible"):
            SequenceCounter(path)


def test_refuses_to_pass_2_pow_40_minus_1(tmp_path: Path) -> None:
    path = tmp_path / "c"
    write_state(path, KIND, MAX_SEQ - 1)
    c = SequenceCounter(path, block_size=1000)
    assert c.remaining == 2
    assert c.next() == MAX_SEQ - 1
    assert stored(path) == MAX_SEQ + 1  # the block is capped at the end of the range
    assert c.next() == MAX_SEQ
    with pytest.raises(ConfigError, match="rotate"):
        c.next()
    del c
    gc.collect()
    with SequenceCounter(path) as c2, pytest.raises(ConfigError, match="rotate"):
        c2.next()


def test_bad_block_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SequenceCounter(tmp_path / "c", block_size=0, create=True)


def test_state_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "c"
    SequenceCounter(path, create=True).close()
    assert os.stat(path).st_mode & 0o077 == 0
    assert not path.with_name("c.tmp").exists()
