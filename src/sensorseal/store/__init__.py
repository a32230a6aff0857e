"""sensorseal.store: where devices, wrapped secrets, telemetry and the audit log live.

`open_store(url)` is the one place that turns a configured URL into a back end, so adapters
(CLI, HTTP server, MQTT workers) never name a back-end class.
"""

from __future__ import annotations

from pathlib import Path

from sensorseal.core.errors import ConfigError
from sensorseal.store.base import (
    AuditEvent,
    DeviceExists,
    DeviceRecord,
    DeviceStatus,
    Store,
    TelemetryRow,
)
from sensorseal.store.sqlite import MEMORY, SQLiteStore

__all__ = [
    "AuditEvent",
    "DeviceExists",
    "DeviceRecord",
    "DeviceStatus",
    "SQLiteStore",
    "Store",
    "TelemetryRow",
    "open_store",
]

_MEMORY_FORMS = {MEMORY, "sqlite://:memory:", "sqlite:///:memory:", "sqlite://"}


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open (and by default migrate) the store at `url`.

    Accepted: ``sqlite:///abs/path.db``, a plain file path, and ``sqlite://:memory:`` (also
    ``:memory:``) for tests; ``postgresql://user@host:port/db`` (libpq URL) for PostgreSQL.
    """
    url = url.strip()
    if not url:
        raise ConfigError("empty store URL")
    scheme, sep, rest = url.partition("://")
    if url in _MEMORY_FORMS:
        target = MEMORY
    elif not sep:
        target = url  # a plain path
    elif scheme == "sqlite":
        if not rest.startswith("/"):
            raise ConfigError("sqlite URL needs an absolute path: sqlite:///abs/path.db")
        target = rest
    elif scheme in ("postgresql", "postgres"):
        return _open_postgres(url, migrate=migrate)
    else:
        raise ConfigError(f"unknown store URL scheme {scheme!r} (sqlite:///path.db expected)")
    if target != MEMORY and not Path(target).parent.is_dir():
        raise ConfigError(f"store directory does not exist: {Path(target).parent}")
    store = SQLiteStore(target)
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store


def _open_postgres(url: str, *, migrate: bool) -> Store:
    """PostgreSQL, imported only when named (psycopg is needed only by deployments using it)."""
    try:
        from sensorseal.store.postgres import PostgresStore
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(f"PostgreSQL needs psycopg 3 and psycopg_pool ({exc})") from None
    store = PostgresStore(url)
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
