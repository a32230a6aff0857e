"""The Store contract (sensorseal.store.base), run against every back end in conftest.BACKENDS."""

from __future__ import annotations

import os
import threading

import pytest

from sensorseal.core.errors import ConfigError
from sensorseal.core.ids import DeviceId
from sensorseal.store import (
    AuditEvent,
    DeviceExists,
    DeviceRecord,
    DeviceStatus,
    Store,
    TelemetryRow,
)


def device(n: int = 1, *, name: str | None = None, created_ms: int | None = None,
           epoch: int = 1) -> DeviceRecord:
    return DeviceRecord(DeviceId(n.to_bytes(12, "big")), name or f"dev-{n}", DeviceStatus.ACTIVE,
                        epoch, "standard", 1_000 + n if created_ms is None else created_ms)


def row(dev: DeviceRecord, seq: int, *, epoch: int | None = None, received_ms: int = 5_000,
        payload: bytes | None = None) -> TelemetryRow:
    return TelemetryRow(dev.device_id, dev.epoch if epoch is None else epoch, seq, received_ms,
                        received_ms - 7, "sealed", f"up/{dev.device_id}", "http",
                        payload if payload is not None else f"p{seq}".encode())


def event(at_ms: int, reason: str = "bad_mac", device_id: str | None = None,
          detail: str = "") -> AuditEvent:
    return AuditEvent(at_ms, reason, "mqtt", "10.0.0.1", device_id, detail)


def add(store: Store, *ns: int) -> list[DeviceRecord]:
    out = []
    for n in ns:
        rec = device(n)
        store.add_device(rec, b"wrapped-%d" % n)
        out.append(rec)
    return out


# -- lifecycle -------------------------------------------------------------------------------

def test_migrate_is_idempotent(store: Store) -> None:
    version = store.migrate()
    assert version >= 1
    assert store.migrate() == version
    (dev,) = add(store, 1)
    assert store.migrate() == version  # existing data survives a re-run
    assert store.get_device(dev.device_id) == dev


# -- registry --------------------------------------------------------------------------------

def test_add_and_get_device(store: Store) -> None:
    dev = DeviceRecord(DeviceId(os.urandom(12)), "kitchen ☃", DeviceStatus.ACTIVE, 3, "lax",
                       1_700_000_000_123)
    store.add_device(dev, b"\x01wrapped\x00bytes")
    assert store.get_device(dev.device_id) == dev
    got = store.get_device(dev.device_id)
    assert got is not None and isinstance(got.device_id, DeviceId)
    assert got.last_seen_ms is None
    assert store.get_secret(dev.device_id, 3) == b"\x01wrapped\x00bytes"
    assert store.get_secret(dev.device_id, 2) is None
    assert store.get_device(DeviceId(b"\xff" * 12)) is None
    assert store.get_secret(DeviceId(b"\xff" * 12), 3) is None


def test_add_existing_device_raises_and_keeps_the_original(store: Store) -> None:
    (dev,) = add(store, 1)
    clash = DeviceRecord(dev.device_id, "impostor", DeviceStatus.ACTIVE, 9, "lax", 1)
    with pytest.raises(DeviceExists):
        store.add_device(clash, b"other")
    assert store.get_device(dev.device_id) == dev
    assert store.get_secret(dev.device_id, dev.epoch) == b"wrapped-1"
    assert store.get_secret(dev.device_id, 9) is None  # nothing half-written


def test_revoked_id_is_never_reused(store: Store) -> None:
    (dev,) = add(store, 1)
    assert store.set_status(dev.device_id, DeviceStatus.REVOKED)
    with pytest.raises(DeviceExists):
        store.add_device(device(1), b"again")


def test_list_devices_pages_in_creation_order(store: Store) -> None:
    for n, created in [(3, 30), (1, 10), (2, 20), (4, 20)]:
        store.add_device(device(n, created_ms=created), b"w")
    names = [d.name for d in store.list_devices()]
    assert names == ["dev-1", "dev-2", "dev-4", "dev-3"]  # ties broken by id
    assert [d.name for d in store.list_devices(limit=2)] == ["dev-1", "dev-2"]
    assert [d.name for d in store.list_devices(limit=2, offset=2)] == ["dev-4", "dev-3"]
    assert store.list_devices(offset=10) == []


def test_rename_device(store: Store) -> None:
    (dev,) = add(store, 1)
    assert store.rename_device(dev.device_id, "porch")
    got = store.get_device(dev.device_id)
    assert got is not None and got.name == "porch"
    assert not store.rename_device(DeviceId(b"\x07" * 12), "nobody")


def test_set_status_transitions(store: Store) -> None:
    (dev,) = add(store, 1)
    did = dev.device_id

    def status() -> DeviceStatus:
        got = store.get_device(did)
        assert got is not None
        return got.status

    assert store.set_status(did, DeviceStatus.SUSPENDED) and status() is DeviceStatus.SUSPENDED
    assert store.set_status(did, DeviceStatus.ACTIVE) and status() is DeviceStatus.ACTIVE
    assert store.set_status(did, DeviceStatus.REVOKED) and status() is DeviceStatus.REVOKED
    assert store.set_status(did, DeviceStatus.REVOKED)  # revoking again changes nothing
    for later in (DeviceStatus.ACTIVE, DeviceStatus.SUSPENDED):
        with pytest.raises(ConfigError, match="revoked"):
            store.set_status(did, later)
    assert status() is DeviceStatus.REVOKED
    assert not store.set_status(DeviceId(b"\x07" * 12), DeviceStatus.SUSPENDED)


# -- telemetry -------------------------------------------------------------------------------

def test_record_stores_rows_exactly(store: Store) -> None:
    (dev,) = add(store, 1)
    payload = bytes(range(256))
    r = TelemetryRow(dev.device_id, 1, 42, 9_000, None, "signed", "t/x", "mqtt", payload)
    assert store.record([r]) == [True]
    assert store.telemetry() == [r]
    got = store.telemetry()[0]
    assert isinstance(got.device_id, DeviceId) and got.payload == payload


def test_record_duplicates_in_one_batch_report_false_for_the_second(store: Store) -> None:
    (dev,) = add(store, 1)
    batch = [row(dev, 1), row(dev, 2), row(dev, 1, payload=b"replayed"), row(dev, 3),
             row(dev, 2)]
    assert store.record(batch) == [True, True, False, True, False]
    assert store.count_telemetry() == 3
    stored = {r.seq: r.payload for r in store.telemetry()}
    assert stored[1] == b"p1"  # the first copy wins


def test_record_duplicates_across_batches(store: Store) -> None:
    a, b = add(store, 1, 2)
    assert store.record([row(a, 1), row(a, 2)]) == [True, True]
    assert store.record([row(a, 2), row(a, 3), row(b, 2), row(a, 1)]) == [False, True, True, False]
    # same seq under another epoch is another message
    assert store.record([row(a, 1, epoch=2)]) == [True]
    assert store.count_telemetry() == 5
    assert store.count_telemetry(a.device_id) == 4
    assert store.count_telemetry(b.device_id) == 1


def test_record_all_duplicates_and_empty(store: Store) -> None:
    (dev,) = add(store, 1)
    assert store.record([row(dev, 1)]) == [True]
    assert store.record([row(dev, 1), row(dev, 1)]) == [False, False]
    assert store.record([]) == []
    assert store.count_telemetry() == 1


def test_record_writes_events_in_the_same_call(store: Store) -> None:
    (dev,) = add(store, 1)
    ev = event(6_000, "replay", str(dev.device_id), "seq 1")
    assert store.record([row(dev, 1)], [ev]) == [True]
    assert store.events() == [ev]
    store.record([], [event(6_001, "bad_mac")])
    assert store.count_events_by_reason() == {"bad_mac": 1, "replay": 1}


def test_record_is_one_transaction(store: Store) -> None:
    """A batch that cannot be stored as a whole stores nothing: not its rows, not its events."""
    (dev,) = add(store, 1)
    ghost = TelemetryRow(DeviceId(b"\x09" * 12), 1, 1, 5_000, None, "sealed", "r", "http", b"x")
    with pytest.raises(ConfigError):
        store.record([row(dev, 1), ghost], [event(1, "replay")])
    assert store.count_telemetry() == 0
    assert store.events() == []
    got = store.get_device(dev.device_id)
    assert got is not None and got.last_seen_ms is None
    assert store.record([row(dev, 1)]) == [True]  # the store is usable afterwards


def test_record_moves_last_seen_forward_only_on_stored_rows(store: Store) -> None:
    a, b = add(store, 1, 2)

    def seen(d: DeviceRecord) -> int | None:
        got = store.get_device(d.device_id)
        assert got is not None
        return got.last_seen_ms

    store.record([row(a, 1, received_ms=100), row(a, 2, received_ms=300),
                  row(a, 3, received_ms=200)])
    assert seen(a) == 300 and seen(b) is None
    store.record([row(a, 4, received_ms=250)])  # older arrival time: never moves back
    assert seen(a) == 300
    store.record([row(a, 1, received_ms=900)])  # a replay is no sign of life
    assert seen(a) == 300
    store.record([row(b, 1, received_ms=50), row(a, 5, received_ms=400)])
    assert (seen(a), seen(b)) == (400, 50)
    # a batch mixing a replay (newer arrival) and a new row: only the new row counts
    assert store.record([row(a, 1, received_ms=950), row(a, 6, received_ms=500),
                         row(b, 1, received_ms=990)]) == [False, True, False]
    assert (seen(a), seen(b)) == (500, 50)


def test_max_seq(store: Store) -> None:
    a, b = add(store, 1, 2)
    assert store.max_seq(a.device_id, 1) is None
    store.record([row(a, 5), row(a, 70), row(a, 9), row(b, 1000), row(a, 3, epoch=2)])
    assert store.max_seq(a.device_id, 1) == 70
    assert store.max_seq(a.device_id, 2) == 3
    assert store.max_seq(b.device_id, 1) == 1000
    assert store.max_seq(b.device_id, 2) is None
    big = 2**40 + 1  # sequence numbers are not limited to 32 bits
    store.record([row(b, big)])
    assert store.max_seq(b.device_id, 1) == big


def test_telemetry_newest_first(store: Store) -> None:
    a, b = add(store, 1, 2)
    store.record([row(a, 1), row(b, 1)])
    store.record([row(a, 2)])
    store.record([row(a, 1, epoch=2), row(b, 2)])
    overall = [(r.device_id, r.epoch, r.seq) for r in store.telemetry()]
    assert overall == [(b.device_id, 1, 2), (a.device_id, 2, 1), (a.device_id, 1, 2),
                       (b.device_id, 1, 1), (a.device_id, 1, 1)]
    assert [(r.epoch, r.seq) for r in store.telemetry(device_id=a.device_id)] == [
        (2, 1), (1, 2), (1, 1)]
    assert len(store.telemetry(limit=2)) == 2
    assert [r.seq for r in store.telemetry(device_id=b.device_id, limit=1)] == [2]
    assert store.telemetry(device_id=DeviceId(b"\x05" * 12)) == []


def test_revoked_device_rows_are_kept(store: Store) -> None:
    (dev,) = add(store, 1)
    store.record([row(dev, 1), row(dev, 2)], [event(1, "bad_mac", str(dev.device_id))])
    store.set_status(dev.device_id, DeviceStatus.REVOKED)
    assert store.count_telemetry(dev.device_id) == 2
    assert len(store.events(device_id=str(dev.device_id))) == 1
    assert store.get_secret(dev.device_id, 1) == b"wrapped-1"


def test_two_threads_recording_the_same_keys(store: Store) -> None:
    """Each (device, epoch, seq) is stored once, whichever thread gets there first."""
    a, b = add(store, 1, 2)
    results: dict[int, list[bool]] = {0: [], 1: []}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait(timeout=10)
            for start in range(0, 2_000, 100):
                seqs = range(start, start + 100)
                # thread 0 walks a; thread 1 walks b and a: the a-rows race
                batch = [row(a, s) for s in seqs] if k == 0 else [
                    row(x, s) for s in seqs for x in (a, b)]
                results[k].extend(store.record(batch))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sum(results[0]) + sum(results[1]) == 4_000
    assert store.count_telemetry(a.device_id) == 2_000
    assert store.count_telemetry(b.device_id) == 2_000
    # thread 1's b-rows never race, so all of them (the odd positions) are stored
    assert all(results[1][1::2])


# -- audit and meta --------------------------------------------------------------------------

def test_events_filters_and_order(store: Store) -> None:
    d1, d2 = "00" * 12, "11" * 12
    store.add_events([event(100, "bad_mac", d1), event(300, "replay", d1),
                      event(200, "bad_mac", d2), event(300, "bad_mac", None, "garbage")])
    store.add_events([])
    assert [(e.at_ms, e.reason) for e in store.events()] == [
        (300, "bad_mac"), (300, "replay"), (200, "bad_mac"), (100, "bad_mac")]  # ties: newest id
    assert [e.at_ms for e in store.events(reason="bad_mac")] == [300, 200, 100]
    assert [e.reason for e in store.events(device_id=d1)] == ["replay", "bad_mac"]
    assert [e.at_ms for e in store.events(since_ms=200)] == [300, 300, 200]
    assert [e.at_ms for e in store.events(reason="bad_mac", device_id=d1)] == [100]
    assert [e.at_ms for e in store.events(reason="bad_mac", since_ms=150, limit=1)] == [300]
    assert store.events(reason="revoked") == []
    last = store.events(limit=1)[0]
    assert last == AuditEvent(300, "bad_mac", "mqtt", "10.0.0.1", None, "garbage")
    assert store.count_events_by_reason() == {"bad_mac": 3, "replay": 1}


def test_meta(store: Store) -> None:
    assert store.get_meta("operator_token_sha256") is None
    store.set_meta("operator_token_sha256", "ab" * 32)
    store.set_meta("other", "x")
    assert store.get_meta("operator_token_sha256") == "ab" * 32
    store.set_meta("operator_token_sha256", "cd" * 32)
    assert store.get_meta("operator_token_sha256") == "cd" * 32
    assert store.get_meta("other") == "x"
