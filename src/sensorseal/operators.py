"""Operators: accounts with roles and group scope, console sessions, machine API tokens.

Who may do what is decided here, once, for the console and the API alike:

    viewer    reads devices, telemetry and events of the groups in its scope
    operator  + provisions, renames, suspends, resumes, revokes those devices, sets their group
    admin     + policies, operators and API tokens; an admin's scope is always every group

A scoped principal sees only devices whose group is in its scope; a device without a group is
seen only by unscoped principals. An out-of-scope device is reported as absent (404), never as
forbidden, so that a scope does not reveal which ids exist elsewhere.

Secrets: passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106); a session id
and an API token are 32 random bytes whose SHA-256 alone is stored, so neither a database copy
nor a log line can replay them. Tokens read `sst_<id>_<secret>`: the id finds the row, the hash
of the whole string is compared in constant time. Every failure is a plain None or ConfigError
whose text names no secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from sensorseal.core.errors import ConfigError
from sensorseal.policies import ConsoleBackend, check_group
from sensorseal.store.base import ApiTokenRow, AuditEvent, OperatorRow, SessionRow

__all__ = [
    "LoginLimiter",
    "OperatorService",
    "Principal",
    "Role",
    "Session",
]

_NAME_RE = re.compile(r"[a-z][a-z0-9._-]{1,31}")
MIN_PASSWORD = 10
MAX_PASSWORD = 256
SESSION_TTL_MS = 12 * 3600 * 1000
TOKEN_PREFIX = "sst_"  # noqa: S105 - a public prefix, not a secret


class Role(IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ConfigError("a role is viewer, operator or admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is acting: an operator (session), an API token or the machine token."""

    name: str
    role: Role
    groups: frozenset[str] | None  # None: every group
    kind: str = "session"  # session | token | machine

    def may(self, role: Role) -> bool:
        return self.role >= role

    def sees(self, group: str | None) -> bool:
        """May this principal see a device of `group` (None: no group)?"""
        if self.groups is None:
            return True
        return group is not None and group in self.groups

    @property
    def unscoped(self) -> bool:
        return self.groups is None


MACHINE = Principal("operator-token", Role.ADMIN, None, "machine")


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    csrf: str
    expires_ms: int

    def __repr__(self) -> str:  # the CSRF token is a secret of the session
        return f"Session({self.principal.name!r}, expires_ms={self.expires_ms})"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _random_token(n: int = 32) -> str:
    return base64.urlsafe_b64encode(os.urandom(n)).rstrip(b"=").decode("ascii")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError("an operator name is 2 to 32 lowercase letters, digits, '.', '_' or "
                          "'-', starting with a letter")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ConfigError(f"a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def _groups_json(role: Role, groups: frozenset[str] | None) -> str | None:
    if groups is None:
        return None
    if role is Role.ADMIN:
        raise ConfigError("an admin's scope is every group; give no groups")
    if not groups:
        raise ConfigError("give at least one group, or none for every group")
    return json.dumps(sorted(check_group(g) for g in groups))


def _groups(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(json.loads(text))


def parse_groups(text: str) -> frozenset[str] | None:
    """A form's comma-separated group list; empty means every group."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return frozenset(check_group(p) for p in parts) if parts else None


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class LoginLimiter:
    """At most `limit` failed logins per `window_ms`, per account name and per client address.

    In memory, per process: enough to turn online guessing from thousands per second into a
    handful per minute; argon2 makes each guess expensive on top.
    """

    def __init__(self, *, limit: int = 5, window_ms: int = 300_000,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self._limit = limit
        self._window = window_ms
        self._clock = clock_ms
        self._failures: dict[str, deque[int]] = {}
        self._lock = threading.Lock()

    def retry_after_s(self, *keys: str) -> int:
        """0 if a login may be tried now, else seconds to wait."""
        now = self._clock()
        wait = 0
        with self._lock:
            for key in keys:
                times = self._failures.get(key)
                if not times:
                    continue
                while times and now - times[0] >= self._window:
                    times.popleft()
                if len(times) >= self._limit:
                    wait = max(wait, (times[0] + self._window - now + 999) // 1000)
        return wait

    def failed(self, *keys: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._failures) > 100_000:
                self._failures.clear()  # bounded memory: an attack on the table resets it
            for key in keys:
                self._failures.setdefault(key, deque(maxlen=self._limit * 2)).append(now)

    def succeeded(self, name_key: str) -> None:
        with self._lock:
            self._failures.pop(name_key, None)


class OperatorService:
    """Accounts, sessions and API tokens over the store."""

    def __init__(self, store: ConsoleBackend, *, clock_ms: Callable[[], int] = _wall_clock_ms,
                 hasher: PasswordHasher | None = None) -> None:
        self._store = store
        self._clock = clock_ms
        self._hasher = hasher or PasswordHasher()
        # verified against when the account does not exist, so that timing does not tell
        self._dummy_hash = self._hasher.hash(_random_token())

    def audit(self, reason: str, actor: str, detail: str) -> None:
        self._store.add_events([AuditEvent(self._clock(), reason, "console", actor, None,
                                           detail)])

    # -- accounts --------------------------------------------------------------------------

    def add(self, name: str, password: str, role: Role,
            groups: frozenset[str] | None = None, *, actor: str = "cli") -> None:
        check_name(name)
        check_password(password)
        row = OperatorRow(name, self._hasher.hash(password), role.label,
                          _groups_json(role, groups), False, self._clock())
        if not self._store.add_operator(row):
            raise ConfigError(f"operator {name} exists")
        scope = "all groups" if groups is None else ",".join(sorted(groups))
        self.audit("operator_added", actor, f"operator={name} role={role.label} scope={scope}")

    def accounts(self) -> list[tuple[str, Role, frozenset[str] | None, bool]]:
        return [(r.name, Role.parse(r.role), _groups(r.groups), r.disabled)
                for r in self._store.list_operators()]

    def set_password(self, name: str, password: str, *, actor: str = "cli") -> None:
        check_password(password)
        if not self._store.update_operator(name, password_hash=self._hasher.hash(password)):
            raise ConfigError(f"no operator {name!r:.40}")
        self._store.delete_sessions_of(name)  # a new password ends every open session
        self.audit("operator_password_set", actor, f"operator={name}")

    def set_disabled(self, name: str, disabled: bool, *, actor: str) -> None:
        if not self._store.update_operator(name, disabled=disabled):
            raise ConfigError(f"no operator {name!r:.40}")
        if disabled:
            self._store.delete_sessions_of(name)
        self.audit("operator_disabled" if disabled else "operator_enabled", actor,
                    f"operator={name}")

    def authenticate(self, name: str, password: str) -> Principal | None:
        """The operator if the password is right and the account enabled; None otherwise."""
        row = self._store.get_operator(name) if isinstance(name, str) and len(name) <= 64 \
            else None
        hashed = row.password_hash if row is not None else self._dummy_hash
        try:
            ok = isinstance(password, str) and len(password) <= MAX_PASSWORD and \
                self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or row is None or row.disabled:
            return None
        if self._hasher.check_needs_rehash(row.password_hash):
            self._store.update_operator(name, password_hash=self._hasher.hash(password))
        return Principal(row.name, Role.parse(row.role), _groups(row.groups))

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, principal: Principal) -> tuple[str, Session]:
        """A fresh session: (id for the cookie, session). Never reuses a client's id."""
        sid = _random_token()
        now = self._clock()
        session = Session(principal, _random_token(), now + SESSION_TTL_MS)
        self._store.add_session(SessionRow(_sha256(sid), principal.name, session.csrf, now,
                                           session.expires_ms))
        if now % 50 == 0:  # now and then, drop expired rows
            self._store.purge_sessions(now)
        return sid, session

    def session(self, sid: str) -> Session | None:
        """The live session of that id: not expired, operator still enabled."""
        if not sid or len(sid) > 128:
            return None
        row = self._store.get_session(_sha256(sid))
        if row is None or row.expires_ms <= self._clock():
            return None
        op = self._store.get_operator(row.operator)
        if op is None or op.disabled:
            return None
        principal = Principal(op.name, Role.parse(op.role), _groups(op.groups))
        return Session(principal, row.csrf, row.expires_ms)

    def close_session(self, sid: str) -> None:
        if sid and len(sid) <= 128:
            self._store.delete_session(_sha256(sid))

    # -- API tokens ------------------------------------------------------------------------

    def create_token(self, name: str, role: Role, groups: frozenset[str] | None, *,
                     actor: str) -> tuple[str, str]:
        """(token id, token): the token is shown once and stored only as its hash."""
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
            raise ConfigError("a token name is 1 to 64 printable characters")
        scope = _groups_json(role, groups)
        token_id = os.urandom(6).hex()
        token = f"{TOKEN_PREFIX}{token_id}_{_random_token()}"
        self._store.add_token(ApiTokenRow(token_id, name, _sha256(token), role.label, scope,
                                          self._clock(), actor, None))
        self.audit("token_created", actor, f"token={token_id} name={name!r} role={role.label}")
        return token_id, token

    def revoke_token(self, token_id: str, *, actor: str) -> None:
        if not re.fullmatch(r"[0-9a-f]{12}", token_id or "") or \
                not self._store.revoke_token(token_id, self._clock()):
            raise ConfigError(f"no active token {token_id!r:.40}")
        self.audit("token_revoked", actor, f"token={token_id}")

    def list_tokens(self) -> list[ApiTokenRow]:
        return self._store.list_tokens()

    def token_principal(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked API token; None for anything else."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        token_id, _, rest = token[len(TOKEN_PREFIX):].partition("_")
        if not rest or not re.fullmatch(r"[0-9a-f]{12}", token_id):
            return None
        row = self._store.get_token(token_id)
        if row is None or row.revoked_ms is not None:
            return None
        if not hmac.compare_digest(_sha256(token), row.sha256):
            return None
        return Principal(f"token:{row.name}", Role.parse(row.role), _groups(row.groups), "token")
