"""The ingest pipeline against a real SQLite store: accept, every rejection path, replay across
batches and restarts, audit events, and the store-failure rule (nothing struck)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import pytest
from server_support import ROUTE, T0, Env, sealed

from sensorseal.core.credential import DeviceCredential
from sensorseal.core.errors import RejectReason
from sensorseal.core.ids import DeviceId, Level
from sensorseal.keystore.software import SoftwareKeystore
from sensorseal.registry import Registry
from sensorseal.server.pipeline import IngestResult, IngestUnavailable, Pipeline
from sensorseal.store.base import AuditEvent, TelemetryRow
from sensorseal.store.sqlite import SQLiteStore

SRC = "10.0.0.7:5555"


def ingest(pipeline: Pipeline, *messages: bytes, route: str = ROUTE) -> list[IngestResult]:
    return pipeline.ingest([(m, route) for m in messages], transport="http", source=SRC)


def reasons(results: Sequence[IngestResult]) -> list[RejectReason | None]:
    return [r.reason for r in results]


def test_accepts_and_stores_a_sealed_message(env: Env) -> None:
    cred = env.registry.add_device("t1", "standard")
    [res] = ingest(env.pipeline, sealed(cred, 7, b"hello"))
    assert res == IngestResult(True, None, cred.device_id.hex(), 7)
    [row] = env.store.telemetry(device_id=cred.device_id)
    assert (row.seq, row.payload, row.level, row.route, row.transport, row.received_ms) == (
        7, b"hello", "sealed", ROUTE, "http", T0)
    assert row.device_ts_ms == T0
    assert env.pipeline.stats.accepted == 1
    assert env.store.events(reason="replay") == []


def test_accepts_signed_under_lax_policy(env: Env) -> None:
    cred = env.registry.add_device("weather", "lax")
    [res] = ingest(env.pipeline, sealed(cred, 1, b"open data", level=Level.SIGNED))
    assert res.ok
    assert env.store.telemetry(device_id=cred.device_id)[0].level == "signed"


def test_malformed_is_audited_without_device(env: Env) -> None:
    [res] = ingest(env.pipeline, b"\xff not cbor at all")
    assert res == IngestResult(False, RejectReason.MALFORMED, None, None)
    [event] = env.store.events(reason="malformed")
    assert (event.transport, event.source, event.device_id, event.at_ms) == ("http", SRC, None, T0)
    assert env.store.count_telemetry() == 0


def test_oversize(env: Env) -> None:
    cred = env.registry.add_device("big", "standard")
    pipeline = env.new_pipeline(max_size=200)
    [small, big] = ingest(pipeline, sealed(cred, 1, b"x" * 50), sealed(cred, 2, b"x" * 300))
    assert small.ok and big.reason is RejectReason.OVERSIZE
    assert len(env.store.events(reason="oversize")) == 1


def test_unknown_device_records_claimed_id(env: Env) -> None:
    stranger = DeviceCredential(DeviceId(os.urandom(12)), 1, os.urandom(32))
    [res] = ingest(env.pipeline, sealed(stranger, 1))
    assert res.reason is RejectReason.UNKNOWN_DEVICE
    assert res.device_id == stranger.device_id.hex()
    [event] = env.store.events(reason="unknown_device")
    assert event.device_id == stranger.device_id.hex()


def test_unknown_epoch(env: Env) -> None:
    cred = env.registry.add_device("e", "standard")
    [res] = ingest(env.pipeline, sealed(cred, 1, epoch=cred.epoch + 1))
    assert res.reason is RejectReason.UNKNOWN_EPOCH


def test_suspended_and_resumed(env: Env) -> None:
    cred = env.registry.add_device("s", "standard")
    assert ingest(env.pipeline, sealed(cred, 1))[0].ok
    env.registry.suspend(cred.device_id)
    env.pipeline.invalidate(cred.device_id)
    assert reasons(ingest(env.pipeline, sealed(cred, 2))) == [RejectReason.SUSPENDED]
    env.registry.resume(cred.device_id)
    env.pipeline.invalidate(cred.device_id)
    assert ingest(env.pipeline, sealed(cred, 3))[0].ok


def test_status_change_seen_after_ttl_without_invalidate(env: Env) -> None:
    cred = env.registry.add_device("ttl", "standard")
    assert ingest(env.pipeline, sealed(cred, 1))[0].ok
    env.registry.revoke(cred.device_id)  # e.g. by the CLI in another process
    env.clock.now_ms += 1_001
    [res] = ingest(env.pipeline, sealed(cred, 2, timestamp_ms=env.clock.now_ms))
    assert res.reason is RejectReason.REVOKED
    assert env.store.events(reason="revoked")[0].device_id == cred.device_id.hex()


def test_revoked(env: Env) -> None:
    cred = env.registry.add_device("r", "standard")
    env.registry.revoke(cred.device_id)
    assert reasons(ingest(env.pipeline, sealed(cred, 1))) == [RejectReason.REVOKED]


def test_bad_mac(env: Env) -> None:
    cred = env.registry.add_device("m", "lax")
    msg = bytearray(sealed(cred, 1, level=Level.SIGNED))
    msg[-1] ^= 1
    assert reasons(ingest(env.pipeline, bytes(msg))) == [RejectReason.BAD_MAC]


def test_decrypt_failed_on_flipped_bit_and_on_wrong_route(env: Env) -> None:
    cred = env.registry.add_device("d", "standard")
    msg = bytearray(sealed(cred, 1))
    msg[-1] ^= 1
    other_route = sealed(cred, 2, route="/elsewhere")
    assert reasons(ingest(env.pipeline, bytes(msg), other_route)) == [
        RejectReason.DECRYPT_FAILED, RejectReason.DECRYPT_FAILED]
    # Neither failure struck its number: the genuine messages still go through.
    assert [r.ok for r in ingest(env.pipeline, sealed(cred, 1), sealed(cred, 2))] == [True, True]


def test_replay_within_one_batch(env: Env) -> None:
    cred = env.registry.add_device("r1", "standard")
    msg = sealed(cred, 5)
    results = ingest(env.pipeline, msg, msg, sealed(cred, 6))
    assert reasons(results) == [None, RejectReason.REPLAY, None]
    assert results[1].seq == 5
    assert env.store.count_telemetry(cred.device_id) == 2
    [event] = env.store.events(reason="replay")
    assert event.device_id == cred.device_id.hex() and "5" in event.detail


def test_replay_across_batches(env: Env) -> None:
    cred = env.registry.add_device("r2", "standard")
    msg = sealed(cred, 9)
    assert ingest(env.pipeline, msg)[0].ok
    assert reasons(ingest(env.pipeline, msg)) == [RejectReason.REPLAY]
    assert env.store.count_telemetry(cred.device_id) == 1
    assert len(env.store.events(reason="replay")) == 1


def test_replay_after_restart(env: Env) -> None:
    cred = env.registry.add_device("r3", "standard")
    old = [sealed(cred, s) for s in (3, 4, 5)]
    assert all(r.ok for r in ingest(env.pipeline, *old))
    # A "restart": new store connection, registry and pipeline on the same database file.
    store = SQLiteStore(env.path)
    try:
        registry = Registry(store, SoftwareKeystore(env.kek), clock_ms=env.clock)
        pipeline = Pipeline(registry, store, clock_ms=env.clock)
        # 5 is the resumed top (window); 4 is inside the window, refused by the store's key;
        # 2 was never stored and is still inside the window: accepted.
        results = ingest(pipeline, old[2], old[1], sealed(cred, 2), sealed(cred, 6))
        assert reasons(results) == [RejectReason.REPLAY, RejectReason.REPLAY, None, None]
    finally:
        store.close()


def test_stale_and_policy_violation_under_stringent(env: Env) -> None:
    cred = env.registry.add_device("strict", "stringent")
    now = env.clock.now_ms
    results = ingest(env.pipeline,
                     sealed(cred, 1, timestamp_ms=now - 10 * 60_000),   # 10 min old
                     sealed(cred, 2, timestamp_ms=None),                 # timestamp required
                     sealed(cred, 3, level=Level.SIGNED),                # must be sealed
                     sealed(cred, 4, timestamp_ms=now - 5_000))          # fine
    assert reasons(results) == [RejectReason.STALE, RejectReason.POLICY_VIOLATION,
                                RejectReason.POLICY_VIOLATION, None]
    assert {e.reason for e in env.store.events(device_id=cred.device_id.hex())} >= {
        "stale", "policy_violation"}


def test_audit_events_and_counters(env: Env) -> None:
    cred = env.registry.add_device("a", "standard")
    tampered = bytearray(sealed(cred, 2))
    tampered[-3] ^= 0x80
    ingest(env.pipeline, sealed(cred, 1), bytes(tampered), b"junk", sealed(cred, 1))
    stats = env.pipeline.stats
    assert stats.accepted == 1
    assert stats.rejected == {RejectReason.DECRYPT_FAILED: 1, RejectReason.MALFORMED: 1,
                              RejectReason.REPLAY: 1}
    got = sorted(e.reason for e in env.store.events() if e.transport == "http")
    assert got == ["decrypt_failed", "malformed", "replay"]
    secret_hex = cred.secret.hex()
    assert all(secret_hex not in e.detail for e in env.store.events())


class FailingStore:
    """A store whose record() fails: everything else goes to the real one."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.fail = True

    def record(self, rows: Sequence[TelemetryRow],
               events: Sequence[AuditEvent] = ()) -> list[bool]:
        if self.fail:
            raise OSError("disk full")
        return self.inner.record(rows, events)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_nothing_struck_when_store_write_fails(env: Env) -> None:
    cred = env.registry.add_device("f", "standard")
    store = FailingStore(env.store)
    pipeline = Pipeline(env.registry, store, clock_ms=env.clock)  # type: ignore[arg-type]
    msgs = [sealed(cred, s) for s in (1, 2, 3)]
    with pytest.raises(IngestUnavailable):
        ingest(pipeline, *msgs)
    assert env.store.count_telemetry() == 0
    assert pipeline.stats.store_failures == 1 and pipeline.stats.accepted == 0
    store.fail = False  # the sender retries the same messages: all accepted
    assert [r.ok for r in ingest(pipeline, *msgs)] == [True, True, True]
    assert reasons(ingest(pipeline, msgs[0])) == [RejectReason.REPLAY]


class BrokenRegistry:
    """A registry whose unwrap blows up for one device: a bug or a broken keystore."""

    def __init__(self, inner: Registry, broken: DeviceId) -> None:
        self.inner, self.broken = inner, broken

    def find(self, device_id: DeviceId):  # type: ignore[no-untyped-def]
        return self.inner.find(device_id)

    def root_secret(self, device_id: DeviceId, epoch: int) -> bytes | None:
        if device_id == self.broken:
            raise RuntimeError("keystore exploded")
        return self.inner.root_secret(device_id, epoch)


def test_internal_error_is_audited_and_batch_continues(env: Env,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    good = env.registry.add_device("good", "standard")
    bad = env.registry.add_device("bad", "standard")
    pipeline = Pipeline(BrokenRegistry(env.registry, bad.device_id), env.store,
                        clock_ms=env.clock)
    results = ingest(pipeline, sealed(bad, 1), sealed(good, 1))
    assert reasons(results) == [RejectReason.MALFORMED, None]
    [event] = env.store.events(reason="malformed")
    assert event.detail == "internal" and event.device_id == bad.device_id.hex()
    assert "keystore exploded" in caplog.text  # the traceback stays in the server log
    assert pipeline.stats.internal_errors == 1


def test_transport_rejection_is_audited(env: Env) -> None:
    env.pipeline.reject(RejectReason.WRONG_CONTENT_TYPE, transport="http", source=SRC,
                        detail="text/plain")
    [event] = env.store.events(reason="wrong_content_type")
    assert (event.source, event.detail) == (SRC, "text/plain")
    assert env.pipeline.stats.rejected[RejectReason.WRONG_CONTENT_TYPE] == 1


def test_concurrent_batches_store_each_message_once(env: Env) -> None:
    cred = env.registry.add_device("c", "standard")
    msgs = [sealed(cred, s) for s in range(400)]
    results: list[IngestResult] = []
    lock = threading.Lock()

    def worker(chunk: list[bytes]) -> None:
        got = ingest(env.pipeline, *chunk)
        with lock:
            results.extend(got)

    # Every message is sent twice, by different threads, in interleaved chunks.
    chunks = [msgs[i:i + 50] for i in range(0, 400, 50)] * 2
    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 800
    accepted = [r.seq for r in results if r.ok]
    # Each message is stored at most once; a copy is refused as a replay. (A chunk that is
    # checked after a later chunk moved the window more than 64 ahead is refused too: the
    # sliding window's rule, which in-order devices never meet.)
    assert len(accepted) == len(set(accepted))
    assert set(range(350, 400)) <= set(accepted)  # no window can have moved past these
    assert all(r.reason is RejectReason.REPLAY for r in results if not r.ok)
    assert env.store.count_telemetry(cred.device_id) == len(accepted)
    assert env.pipeline.stats.accepted == len(accepted)


def test_two_workers_far_out_of_order_lose_nothing_and_accept_no_replay(env: Env) -> None:
    """Worker B's window is pushed far ahead; a genuine message worker A never saw, far left of
    B's window, must still be stored (the store decides), and its replay refused on both."""
    cred = env.registry.add_device("w2", "standard")
    worker_a, worker_b = env.pipeline, env.new_pipeline()
    assert ingest(worker_a, sealed(cred, 1))[0].ok
    assert all(r.ok for r in ingest(worker_b, *(sealed(cred, s) for s in range(500, 700))))
    late = sealed(cred, 7)  # in flight all along, 600+ numbers behind worker B's view
    assert ingest(worker_b, late)[0].ok
    assert reasons(ingest(worker_a, late)) == [RejectReason.REPLAY]
    assert reasons(ingest(worker_b, late)) == [RejectReason.REPLAY]
    assert reasons(ingest(worker_b, sealed(cred, 600))) == [RejectReason.REPLAY]
    assert env.store.count_telemetry(cred.device_id) == 202


def test_registry_outage_fails_the_batch_for_a_retry(env: Env) -> None:
    """A database error while looking a device up is not the message's fault: the batch is
    refused as unavailable (the sender retries), not recorded as malformed."""
    import sqlite3

    from sensorseal.server.pipeline import IngestUnavailable

    cred = env.registry.add_device("outage", "standard")
    pipeline = env.new_pipeline()
    real_find = env.registry.find

    def broken(device_id: object) -> object:
        raise sqlite3.OperationalError("database is locked")

    env.registry.find = broken  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(IngestUnavailable):
            pipeline.ingest([(sealed(cred, 1), ROUTE)], transport="test", source="t")
    finally:
        env.registry.find = real_find  # type: ignore[method-assign]
    assert env.store.events(reason="malformed") == []
    assert [r.ok for r in pipeline.ingest([(sealed(cred, 1), ROUTE)], transport="test",
                                          source="t")] == [True]
