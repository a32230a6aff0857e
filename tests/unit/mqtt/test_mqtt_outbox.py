"""The device outbox: FIFO, removal only on acknowledgement, explicit overflow, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from sensorseal.core.errors import ConfigError
from sensorseal.mqtt.outbox import Outbox, OutboxFull, Overflow


def test_fifo_and_removal(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ids = [ob.append("t/a", b"m%d" % i) for i in range(5)]
    assert ids == sorted(ids) and len(ob) == 5
    assert [e.payload for e in ob.pending()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [e.payload for e in ob.pending(after_id=ids[2], limit=1)] == [b"m3"]
    assert ob.remove([ids[0], ids[3], 999]) == 2
    assert [e.payload for e in ob.pending()] == [b"m1", b"m2", b"m4"]
    assert len(ob) == 3


def test_refuse_policy_counts_and_keeps_the_queue(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", capacity=3)
    for i in range(3):
        ob.append("t", b"%d" % i)
    for _ in range(2):
        with pytest.raises(OutboxFull):
            ob.append("t", b"late")
    assert ob.refused == 2 and ob.dropped == 0
    assert [e.payload for e in ob.pending()] == [b"0", b"1", b"2"]


def test_drop_oldest_policy_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", capacity=3, overflow=Overflow.DROP_OLDEST)
    for i in range(5):
        ob.append("t", b"%d" % i)
    assert [e.payload for e in ob.pending()] == [b"2", b"3", b"4"]
    assert ob.dropped == 2 and ob.refused == 0 and len(ob) == 3


def test_survives_reopen_with_counters(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, capacity=2)
    ob.append("t/x", b"\x00\xffbinary", qos=0)
    ob.append("t/y", b"two")
    with pytest.raises(OutboxFull):
        ob.append("t", b"three")
    ob.bump("broker_refused")
    ob.close()
    again = Outbox(path, capacity=2)
    entries = again.pending()
    assert [(e.topic, e.payload, e.qos) for e in entries] == [
        ("t/x", b"\x00\xffbinary", 0), ("t/y", b"two", 1)]
    assert again.refused == 1 and again.counter("broker_refused") == 1 and len(again) == 2
    # ids keep increasing after a restart, so the delivery order holds
    again.remove([entries[0].id])
    assert again.append("t", b"x", qos=1) > entries[-1].id


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Outbox(tmp_path / "o.db", capacity=0)
    ob = Outbox(tmp_path / "p.db")
    with pytest.raises(ConfigError):
        ob.append("t", b"x", qos=2)
    assert "capacity" in repr(ob)
