"""E4: the gateway's link to the cloud, HTTPS with the server certificate checked against a
configured CA (never "accept any certificate") and an optional client certificate (mutual TLS).

`https://` URLs need a CA file: the gateway trusts exactly the CA its operator gave it, not the
system store, since a gateway in a street cabinet should not trust every public CA for its one
cloud. Plain `http://` is allowed for a local test or benchmark only; it carries no E4, and a
network that requires e4 makes the cloud refuse it (policy_violation).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import cbor2
import httpx

from sensorseal.core.errors import ConfigError, SensorsealError
from sensorseal.core.layers import GATEWAY_BATCH_ROUTE

__all__ = ["Upstream", "UpstreamError", "tls_context"]

CT_COSE = "application/cose"


class UpstreamError(SensorsealError):
    """The batch was not delivered. `retry`: worth trying again later (network, 5xx, 429);
    otherwise the cloud refused the batch as a whole (e.g. the gateway is revoked)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def tls_context(ca_file: str | Path, client_cert: str | Path | None = None,
                client_key: str | Path | None = None) -> ssl.SSLContext:
    """A client context: TLS 1.2+, the server verified against `ca_file` and its host name."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA file {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname:  # pragma: no cover
        raise ConfigError("refusing a TLS context that does not verify the server")
    if (client_cert is None) != (client_key is None):
        raise ConfigError("mutual TLS needs both a client certificate and its key")
    if client_cert is not None and client_key is not None:
        try:
            ctx.load_cert_chain(str(client_cert), str(client_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client certificate: {exc}") from None
    return ctx


class Upstream:
    """POSTs sealed batches to `<url>/v1/gateway/batch`. Blocking; call it from a thread."""

    def __init__(self, url: str, *, ca_file: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 timeout_s: float = 5.0) -> None:
        url = url.rstrip("/")
        if url.startswith("https://"):
            if ca_file is None:
                raise ConfigError("an https upstream needs a CA file (--ca)")
            verify: ssl.SSLContext | bool = tls_context(ca_file, client_cert, client_key)
        elif url.startswith("http://"):
            if client_cert is not None:
                raise ConfigError("client certificates need an https upstream")
            verify = False  # no TLS at all: nothing to verify (and no E4)
        else:
            raise ConfigError("upstream URL must start with https:// (or http:// for tests)")
        self.url = url + GATEWAY_BATCH_ROUTE
        self.tls = url.startswith("https://")
        self._client = httpx.Client(verify=verify, timeout=timeout_s)

    def send(self, envelope: bytes) -> list[int]:
        """Deliver one sealed batch; the cloud's per-item codes (0 stored, 1 refused)."""
        try:
            r = self._client.post(self.url, content=envelope, headers={"Content-Type": CT_COSE})
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable ({type(exc).__name__})",
                                retry=True) from exc
        if r.status_code == 200:
            try:
                codes = cbor2.loads(r.content)
            except Exception:
                raise UpstreamError("upstream answered a malformed body", retry=True) from None
            if not isinstance(codes, list):
                raise UpstreamError("upstream answered a malformed body", retry=True)
            return [int(c) for c in codes]
        retry = r.status_code in (408, 429) or r.status_code >= 500
        raise UpstreamError(f"upstream answered {r.status_code}", retry=retry)

    def close(self) -> None:
        self._client.close()
