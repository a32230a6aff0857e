"""Stateless workers on PostgreSQL: `sensorseal serve --workers 2` as real processes.

- A revocation is honoured by EVERY worker within one second: we hold one keep-alive connection
  to each worker (identified through /proc: which pid owns the server end of our socket) and
  measure, per worker, the time from the registry change to the first refusal.
- Acknowledge after commit: a worker SIGKILLed in the middle of a batch gives the client no
  2xx; the client resends and every message is stored exactly once.

Real PostgreSQL (a fresh database with a random name), real processes, loopback only.
"""

from __future__ import annotations

import http.client
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_support import Cluster, Sealer, install, pid_serving, provision

import pg_support
from sensorseal.datadir import DataDir
from sensorseal.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROUTE = "/v1/messages"


@pytest.fixture
def pg_url() -> Iterator[str]:
    pg_support.require_postgres()
    with pg_support.fresh_database() as url:
        yield url


def _connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.connect()
    return conn


def _post_one(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", ROUTE, body=body, headers={"Content-Type": "application/cose"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _connection_per_worker(cluster: Cluster, sealer: Sealer
                           ) -> dict[int, http.client.HTTPConnection]:
    """One open connection served by each worker process (new connections until both seen)."""
    by_pid: dict[int, http.client.HTTPConnection] = {}
    pids = list(cluster.pids.values())
    for _ in range(200):
        conn = _connect(cluster.url)
        assert _post_one(conn, sealer.seal(0, ROUTE)[0]) == 202
        pid = pid_serving(conn.sock.getsockname()[1], pids)
        if pid is not None and pid not in by_pid:
            by_pid[pid] = conn
        else:
            conn.close()
        if len(by_pid) == len(pids):
            return by_pid
    raise AssertionError(f"could not reach every worker: {sorted(by_pid)} of {pids}")


def test_revocation_is_honoured_by_every_worker_within_one_second(
        pg_url: str, tmp_path: Path) -> None:
    env = install(tmp_path / "d", pg_url)
    (cred,) = provision(tmp_path / "d", env, 1)
    sealer = Sealer([cred])
    with Cluster(tmp_path / "d", env, workers=2) as cluster:
        conns = _connection_per_worker(cluster, sealer)
        assert len(conns) == 2
        for conn in conns.values():  # each worker has the device cached and accepting
            assert _post_one(conn, sealer.seal(0, ROUTE)[0]) == 202
        store, keystore = DataDir(tmp_path / "d", env=env).open()
        try:
            Registry(store, keystore).revoke(cred.device_id, actor="test")
        finally:
            store.close()
        revoked_at = time.monotonic()
        seen: dict[int, float] = {}
        while len(seen) < len(conns) and time.monotonic() - revoked_at < 3:
            for pid, conn in conns.items():
                if pid in seen:
                    continue
                status = _post_one(conn, sealer.seal(0, ROUTE)[0])
                if status == 403:
                    seen[pid] = time.monotonic() - revoked_at
                else:
                    assert status == 202
            time.sleep(0.02)
        print(f"\nrevocation honoured after (s), per worker pid: "
              f"{ {pid: round(s, 3) for pid, s in seen.items()} }")
        assert sorted(seen) == sorted(conns)
        # 1 s status TTL, plus one polling step (20 ms) and one request
        assert max(seen.values()) < 1.15
        for conn in conns.values():  # and it stays refused
            assert _post_one(conn, sealer.seal(0, ROUTE)[0]) == 403
            conn.close()


def _post_batch(conn: http.client.HTTPConnection, body: bytes) -> list[int]:
    conn.request("POST", ROUTE + ":batch", body=body,
                 headers={"Content-Type": "application/cbor"})
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 200, resp.status
    codes: list[int] = cbor2.loads(data)
    return codes


def test_worker_killed_mid_batch_gives_no_2xx_and_the_resend_is_stored_once(
        pg_url: str, tmp_path: Path) -> None:
    env = install(tmp_path / "d", pg_url)
    creds = provision(tmp_path / "d", env, 50)
    sealer = Sealer(creds)
    size = 4_000

    def batch() -> list[bytes]:
        return [sealer.seal(i % len(creds), ROUTE)[0] for i in range(size)]

    with Cluster(tmp_path / "d", env, workers=2) as cluster:
        warm = _connect(cluster.url)
        start = time.perf_counter()
        assert _post_batch(warm, cbor2.dumps(batch())) == [0] * size
        took = time.perf_counter() - start
        warm.close()
        outcomes = []
        for fraction in (0.2, 0.5):
            body = cbor2.dumps(batch())
            conn = _connect(cluster.url)
            conn.request("POST", ROUTE + ":batch", body=body,
                         headers={"Content-Type": "application/cbor"})
            pid = pid_serving(conn.sock.getsockname()[1], list(cluster.pids.values()))
            assert pid is not None
            index = next(i for i, p in cluster.pids.items() if p == pid)
            ready_before = cluster.ready_count(index)
            time.sleep(took * fraction)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                conn.getresponse().read()  # no status at all, so certainly no 2xx
            conn.close()
            cluster.wait_for(lambda i=index, r=ready_before: cluster.ready_count(i) > r, 30,
                             "the killed worker to be replaced")
            retry = _connect(cluster.url)
            codes = _post_batch(retry, body)  # the client resends the same bytes
            retry.close()
            # One transaction per batch: all of it was committed before the kill, or none.
            assert codes in ([0] * size, [1] * size)
            outcomes.append("committed before the kill" if codes[0] else "rolled back")
        with psycopg.connect(pg_url) as db:
            stored = db.execute("SELECT count(*), count(DISTINCT (device_id, epoch, seq))"
                                " FROM telemetry").fetchone()
        assert stored == (3 * size, 3 * size)
        print(f"\nbatch of {size} took {took:.3f}s; kills: {outcomes}; stored {stored[0]} "
              f"rows, each once")


def test_db_upgrade_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """`sensorseal db upgrade` migrates the database named by SENSORSEAL_DATABASE_URL."""
    import subprocess

    from sensorseal.store.postgres import migrations

    env = dict(os.environ, SENSORSEAL_DATABASE_URL=pg_url)
    cmd = [sys.executable, "-m", "sensorseal", "--data-dir", str(tmp_path / "d"), "db",
           "upgrade"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    newest = max(v for v, _, _ in migrations())
    assert f"version {newest}" in out.stdout
    with psycopg.connect(pg_url) as db:
        (version,) = db.execute("SELECT max(version) FROM schema_version").fetchone() or (0,)
    assert version == newest


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """A configuration error would repeat on every restart: the supervisor stops and says so
    instead of restarting the worker forever."""
    from sensorseal.core.errors import ConfigError
    from sensorseal.server.workers import Supervisor

    sup = Supervisor(tmp_path / "not-a-data-dir", workers=2, port=0, echo=lambda line: None)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="could not start"):
        sup.run()
    assert time.monotonic() - start < 30


def test_worker_client_ids_are_stable_per_slot_and_distinct_per_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sensorseal.server.workers import WORKER_NAME_ENV, worker_client_id

    monkeypatch.setenv(WORKER_NAME_ENV, "ingest-a")
    assert worker_client_id(1) == worker_client_id(1) == "sensorseal-ingest-ingest-a-1"
    assert worker_client_id(2) != worker_client_id(1)
    monkeypatch.setenv(WORKER_NAME_ENV, "ingest-b/+#")
    assert worker_client_id(1) == "sensorseal-ingest-ingest-b----1"
