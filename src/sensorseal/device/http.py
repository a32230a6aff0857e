"""Send sealed envelopes to the ingest server over HTTP(S), with bounded retries.

Endpoints (see docs/protocol.md):

- ``POST /v1/messages``: body = one envelope, ``Content-Type: application/cose``; 2xx = accepted.
- ``POST /v1/messages:batch``: body = CBOR array of byte strings, ``Content-Type:
  application/cbor``; the answer is a CBOR array of the same length, 0 = accepted, 1 = rejected.

What is retried, and why it is safe
-----------------------------------
Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and full
jitter (sleep a uniform random time in ``[0, min(backoff_max, backoff_base * 2**n)]``; a
``Retry-After`` in seconds raises the floor, capped at ``backoff_max``). Other 4xx answers are
*not* retried: the server refused the message, and the same bytes will not become valid.

Retries always resend the *same bytes*. That is safe after an unknown outcome (a timeout after the
request left, a 502 from a proxy after the server stored it): the server's replay check keys on
(device, epoch, seq), so the message is stored at most once. The flip side: if the first attempt
was in fact stored, the retry is refused as a replay, and the sender sees a rejection for a
message that was accepted. `SendResult.maybe_duplicate` says when that can be the case. Never
re-seal a payload to retry it: that makes a second, distinct message.

Errors, drawn once::

    SensorsealError
    ├── ConfigError       bad base URL, CA bundle missing, bad retry settings
    └── SendError         outcome unknown after the last attempt (keep the bytes, try later),
                          or a batch refused as a whole / answered with a malformed body
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import cbor2
import httpx

from sensorseal.core.errors import ConfigError, SensorsealError

__all__ = ["BATCH_PATH", "MESSAGES_PATH", "HttpSender", "SendError", "SendResult"]

MESSAGES_PATH = "/v1/messages"
BATCH_PATH = "/v1/messages:batch"
CT_COSE = "application/cose"
CT_CBOR = "application/cbor"
_MAX_BATCH_RESPONSE = 1 << 20

# Answers that say "try again": the message was not judged. 408/429 mean it was not processed;
# 5xx may come from a proxy after the server stored it, so the outcome is unknown.
_RETRY_NOT_PROCESSED = frozenset({408, 429})

_jitter_rng = random.SystemRandom()


class SendError(SensorsealError):
    """Sending failed without a verdict (or a batch was refused as a whole).

    `status` is the last HTTP status (None if the last attempt got no answer), `exc_type` the name
    of the last transport exception (None if it got an answer). `retryable` is False when the
    server answered and resending the same request cannot help (a batch refused with 4xx, a
    malformed batch answer). Texts carry no URL and no payload.
    """

    def __init__(self, detail: str, *, attempts: int, status: int | None = None,
                 exc_type: str | None = None, retryable: bool = True) -> None:
        self.attempts = attempts
        self.status = status
        self.exc_type = exc_type
        self.retryable = retryable
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class SendResult:
    """The server's verdict on one envelope."""

    accepted: bool
    status: int
    attempts: int
    # An earlier attempt may have reached the server: a rejection now may be the replay check
    # refusing our own retry of a message that was stored.
    maybe_duplicate: bool = False


def _retry_after(resp: httpx.Response) -> float | None:
    """Retry-After in delta-seconds (RFC 9110 section 10.2.3); HTTP dates are ignored."""
    value = resp.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    return None


class HttpSender:
    """Posts envelopes to one ingest server. Thread-safe as far as the httpx client is."""

    def __init__(self, base_url: str, *, verify: bool | str = True, timeout: float = 10,
                 max_retries: int = 5, backoff_base: float = 0.2, backoff_max: float = 10,
                 client: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = _jitter_rng.random) -> None:
        """`verify`: True (system CAs), False (no TLS check: tests only), or a CA bundle path.

        With `client` given, its transport, TLS and timeout settings are used and `verify` and
        `timeout` are ignored; the caller keeps ownership of it (`close()` leaves it open).
        `max_retries` counts retries: at most ``max_retries + 1`` attempts are made.
        """
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError("base_url must be an http:// or https:// URL with a host")
        if max_retries < 0:
            raise ConfigError("max_retries must be >= 0")
        if not (0 < backoff_base <= backoff_max) or not math.isfinite(backoff_max):
            raise ConfigError("need 0 < backoff_base <= backoff_max (finite)")
        if timeout <= 0:
            raise ConfigError("timeout must be positive")
        base = str(url).rstrip("/")
        port = f":{url.port}" if url.port else ""
        self._display = f"{url.scheme}://{url.host}{port}"  # no userinfo, no query
        self._single_url = base + MESSAGES_PATH
        self._batch_url = base + BATCH_PATH
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._rng = rng
        self._owns_client = client is None
        if client is None:
            client = httpx.Client(verify=self._tls(verify), timeout=httpx.Timeout(timeout),
                                  follow_redirects=False)
        self._client = client

    @staticmethod
    def _tls(verify: bool | str) -> ssl.SSLContext | bool:
        if isinstance(verify, bool):
            return verify
        if not Path(verify).is_file():
            raise ConfigError(f"CA bundle not found: {verify}")
        try:
            return ssl.create_default_context(cafile=verify)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load CA bundle {verify}: {exc}") from exc

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based): full jitter, capped."""
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** min(retry, 60))
        delay = self._rng() * cap
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _post(self, url: str, path: str, body: bytes,
              headers: dict[str, str]) -> tuple[httpx.Response, int, bool]:
        """POST with retries. Returns (final non-retryable response, attempts, maybe_duplicate)."""
        maybe_sent = False
        retry_after: float | None = None
        last_status: int | None = None
        last_exc: Exception | None = None
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self.backoff(attempt - 1, retry_after))
            attempts = attempt + 1
            retry_after = None
            try:
                resp = self._client.post(url, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last_exc, last_status = exc, None  # never left this host
                continue
            except httpx.TransportError as exc:
                last_exc, last_status = exc, None  # may have reached the server
                maybe_sent = True
                continue
            status = resp.status_code
            if status in _RETRY_NOT_PROCESSED or status >= 500:
                last_exc, last_status = None, status
                maybe_sent = maybe_sent or status >= 500
                retry_after = _retry_after(resp)
                continue
            return resp, attempts, maybe_sent
        last = f"status {last_status}" if last_status is not None else type(last_exc).__name__
        raise SendError(f"POST {path} gave up after {attempts} attempts; last: {last}",
                        attempts=attempts, status=last_status,
                        exc_type=None if last_exc is None else type(last_exc).__name__
                        ) from last_exc

    def send(self, envelope: bytes) -> SendResult:
        """Send one envelope. A 4xx verdict is a result (accepted=False), not an exception."""
        resp, attempts, maybe_dup = self._post(self._single_url, MESSAGES_PATH, bytes(envelope),
                                               {"content-type": CT_COSE})
        return SendResult(resp.is_success, resp.status_code, attempts, maybe_dup)

    def send_batch(self, envelopes: Sequence[bytes]) -> list[bool]:
        """Send envelopes in one request; True for each one the server accepted.

        The whole batch is retried as one (same bytes, so the same idempotence as `send`; after
        an unknown outcome, accepted entries may come back as replays, i.e. False).
        """
        if not envelopes:
            return []
        body = cbor2.dumps([bytes(e) for e in envelopes])
        resp, attempts, _ = self._post(self._batch_url, BATCH_PATH, body,
                                       {"content-type": CT_CBOR, "accept": CT_CBOR})
        if not resp.is_success:
            raise SendError(f"POST {BATCH_PATH} refused as a whole: status {resp.status_code}",
                            attempts=attempts, status=resp.status_code, retryable=False)
        return self._batch_verdicts(resp, len(envelopes), attempts)

    @staticmethod
    def _batch_verdicts(resp: httpx.Response, count: int, attempts: int) -> list[bool]:
        def bad(why: str) -> SendError:
            return SendError(f"POST {BATCH_PATH}: malformed answer ({why})", attempts=attempts,
                             status=resp.status_code, retryable=False)

        if len(resp.content) > _MAX_BATCH_RESPONSE:
            raise bad("too large")
        try:
            verdicts: Any = cbor2.loads(resp.content, max_depth=2, allow_indefinite=False)
        except Exception as exc:  # cbor2 raises several types; all mean the same here
            raise bad("not CBOR") from exc
        if not isinstance(verdicts, list | tuple) or len(verdicts) != count:
            raise bad(f"expected an array of {count} verdicts")
        if any(type(v) is not int or v not in (0, 1) for v in verdicts):
            raise bad("verdicts must be 0 or 1")
        return [v == 0 for v in verdicts]

    def close(self) -> None:
        """Close the HTTP client if this sender created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> HttpSender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpSender({self._display!r})"
