"""PostgreSQL for tests and benchmarks: fresh throw-away databases, and private clusters.

- `fresh_database()`: CREATE DATABASE with a random name on the server named by
  SENSORSEAL_TEST_PG_URL (default: the machine's PostgreSQL, postgresql://postgres@127.0.0.1:5432,
  trust auth), yield its URL, DROP it at the end. Never touches any other database.
- `require_postgres()`: skip with the reason when that server is unreachable, but fail under
  CI=true, where PostgreSQL is part of the machine.
- `PrivateCluster`: initdb + pg_ctl in a temporary directory on a free port, owned by a
  non-root user (initdb refuses root), for tests that must stop and restart the database.

Import from a test with `sys.path.insert(0, <tests dir>)`; it has no pytest dependency except
in `require_postgres`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ADMIN_URL = os.environ.get("SENSORSEAL_TEST_PG_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")


def unreachable_reason(admin_url: str = ADMIN_URL) -> str | None:
    """None if we can connect and create databases; otherwise why not."""
    try:
        with psycopg.connect(admin_url, connect_timeout=3, autocommit=True) as conn:
            row = conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles"
                               " WHERE rolname = current_user").fetchone()
            if not row or not row[0]:
                return f"the role at {_redact(admin_url)} may not create databases"
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {_redact(admin_url)}: {type(exc).__name__}"
    return None


def require_postgres(admin_url: str = ADMIN_URL) -> None:
    import pytest

    reason = unreachable_reason(admin_url)
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL is required)")
    pytest.skip(reason)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_database(admin_url: str = ADMIN_URL, prefix: str = "sensorseal_test") -> Iterator[str]:
    """A new, empty database with a random name; dropped (connections forced out) at the end."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivateCluster:
    """A PostgreSQL cluster of our own, in a temporary directory, on a free loopback port.

    Started as the `postgres` system user when we are root (initdb refuses root). fsync is left
    on: the restart tests are about durability of what was acknowledged.
    """

    def __init__(self, *, user: str = "postgres") -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bindir = bindir
        self.port = free_port()
        self._tmp = tempfile.mkdtemp(prefix="sensorseal-pg-")
        os.chmod(self._tmp, 0o755)
        self.datadir = Path(self._tmp) / "data"
        self.sockdir = Path(self._tmp) / "sock"
        self.logfile = Path(self._tmp) / "postgres.log"
        self._runas = user if os.geteuid() == 0 else None
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._runas is not None:
            cmd = ["runuser", "-u", self._runas, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> PrivateCluster:
        if not self.datadir.exists():
            self.sockdir.mkdir()
            if self._runas is not None:
                shutil.chown(self._tmp, self._runas)
                shutil.chown(self.sockdir, self._runas)
            self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                      "--auth=trust", "-E", "UTF8", "--no-sync")
            with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.sockdir}'\n"
                           "max_connections = 200\nshared_buffers = 128MB\n"
                           "synchronous_commit = on\n")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                  "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                  "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Stop (fast: disconnect every client, roll back open transactions) and start."""
        self.stop(mode)
        self.start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        try:
            return self.start()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()
