"""Google Cloud IoT Core's device protocol (retired by Google on 16 August 2023), as pure functions.

Devices built for Cloud IoT Core keep working if they reach a server that speaks the same
protocol; only the host name and the CA they trust change. This module holds the parts that
decide security, with no socket and no clock of its own (`now` is passed in):

* `DevicePath`: the MQTT client id / HTTP path
  `projects/{project}/locations/{region}/registries/{registry}/devices/{device}`.
* `verify_jwt`: the device authenticates with a JWT (RS256 or ES256) signed by one of the
  public keys its registry holds, `aud` = project id, `iat`/`exp` within the rules below. The
  result carries `exp` so that an adapter closes the session then, as Cloud IoT Core did.
* `parse_topic`, `allowed`, `publish_qos_allowed`, `granted_qos`: the topic rules (a device may
  touch only its own topics, a gateway also those of the devices attached to it).
* `PublicKeyRegistry` and `InMemoryKeyRegistry`: device -> registered keys, each with an
  optional expiry; `load_public_key` accepts an uploaded PEM public key or certificate.

JWT rules, stricter than "whatever a JOSE library accepts" on purpose:
1. `alg` must be RS256 or ES256 *and* match the registered key's type (RSA >= 2048 bits, EC
   P-256). `none`, HS256 (the "public key as HMAC secret" confusion) and every other alg are
   refused before any key is touched (`unsupported`).
2. Only this device's registered, non-expired keys are tried (a key of another device fails the
   signature: `bad_signature`; no usable key at all: `unknown_epoch`).
3. After the signature: `aud` must be this project (`policy_violation`); `iat` at most `skew_s`
   (10 minutes) in the future and `exp` in the future (`stale`); `exp - iat` at most 24 h plus
   the skew (`policy_violation`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sensorseal.core.errors import ConfigError, Rejected, RejectReason

__all__ = [
    "ALLOWED_ALGS",
    "DEFAULT_SKEW_S",
    "MAX_LIFETIME_S",
    "Action",
    "DeviceKey",
    "DevicePath",
    "DeviceTopic",
    "InMemoryKeyRegistry",
    "JwtSession",
    "PublicKey",
    "PublicKeyRegistry",
    "TopicKind",
    "allowed",
    "granted_qos",
    "load_public_key",
    "parse_topic",
    "publish_qos_allowed",
    "verify_jwt",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

ALLOWED_ALGS: Final = frozenset({"RS256", "ES256"})
DEFAULT_SKEW_S: Final = 600  # Cloud IoT Core tolerated 10 minutes of device clock skew
MAX_LIFETIME_S: Final = 24 * 3600
MIN_RSA_BITS: Final = 2048
MAX_JWT_LEN: Final = 8192  # an RS256 JWT with a 4096-bit key is ~1 KiB; refuse before parsing
MAX_KEYS_PER_DEVICE: Final = 3  # Cloud IoT Core's limit; bounds the work one CONNECT costs

# Cloud IoT Core's id rules: a project id is 6-30 lowercase letters, digits and hyphens; a
# registry or device id starts with a letter and has 3-255 of [A-Za-z0-9-._~+%].
_PROJECT = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
_REGION = r"[a-z]+(?:-[a-z]+)*[0-9]+"
_ID = r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}"
_CLIENT_ID_RE = re.compile(
    rf"projects/({_PROJECT})/locations/({_REGION})/registries/({_ID})/devices/({_ID})"
)
_DEVICE_ID_RE = re.compile(_ID)
_SUBFOLDER_RE = re.compile(r"[A-Za-z0-9._~+%-]{1,256}(?:/[A-Za-z0-9._~+%-]{1,256}){0,7}")


@dataclass(frozen=True, slots=True)
class DevicePath:
    """The full name of a device; its `str()` is the MQTT client id Cloud IoT Core required."""

    project: str
    region: str
    registry: str
    device: str

    @classmethod
    def parse(cls, client_id: str) -> DevicePath:
        """Parse an MQTT client id or the device part of an HTTP path; Rejected(MALFORMED)."""
        match = _CLIENT_ID_RE.fullmatch(client_id) if isinstance(client_id, str) else None
        if match is None:
            raise Rejected(RejectReason.MALFORMED, "client id is not a Cloud IoT Core device path")
        return cls(*match.groups())

    def sibling(self, device: str) -> DevicePath:
        """The same registry's device `device` (a gateway's attached device)."""
        if not _DEVICE_ID_RE.fullmatch(device):
            raise Rejected(RejectReason.MALFORMED, "bad device id")
        return DevicePath(self.project, self.region, self.registry, device)

    def __str__(self) -> str:
        return (f"projects/{self.project}/locations/{self.region}"
                f"/registries/{self.registry}/devices/{self.device}")


class TopicKind(StrEnum):
    EVENTS = "events"
    STATE = "state"
    CONFIG = "config"
    COMMANDS = "commands"
    ATTACH = "attach"
    DETACH = "detach"
    ERRORS = "errors"


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed `/devices/{device}/{kind}[/{subfolder}]`; `wildcard` is set for `commands/#`."""

    device: str
    kind: TopicKind
    subfolder: str | None = None
    wildcard: bool = False


def parse_topic(topic: str) -> DeviceTopic:
    """Parse a Cloud IoT Core topic; Rejected(MALFORMED) for anything else.

    Only `commands/#` may carry a wildcard (that is how devices subscribe to all commands);
    `events` and `commands` may carry a subfolder; the other kinds take none.
    """
    if not isinstance(topic, str) or len(topic) > 1024 or not topic.startswith("/devices/"):
        raise Rejected(RejectReason.MALFORMED, "not a /devices/... topic")
    if "+" in topic or "#" in topic.removesuffix("/commands/#"):
        # MQTT wildcards are never part of a name here (Cloud IoT Core ids may contain '+',
        # but such a device could not be told apart from a wildcard in a filter).
        raise Rejected(RejectReason.MALFORMED, "wildcard in topic")
    parts = topic[len("/devices/"):].split("/", 2)
    if len(parts) < 2 or not _DEVICE_ID_RE.fullmatch(parts[0]):
        raise Rejected(RejectReason.MALFORMED, "bad device id in topic")
    try:
        kind = TopicKind(parts[1])
    except ValueError:
        raise Rejected(RejectReason.MALFORMED, "unknown topic kind") from None
    rest = parts[2] if len(parts) == 3 else None
    if rest is None:
        return DeviceTopic(parts[0], kind)
    if kind is TopicKind.COMMANDS and rest == "#":
        return DeviceTopic(parts[0], kind, None, wildcard=True)
    if kind in (TopicKind.EVENTS, TopicKind.COMMANDS) and _SUBFOLDER_RE.fullmatch(rest):
        return DeviceTopic(parts[0], kind, rest)
    raise Rejected(RejectReason.MALFORMED, "bad subfolder")


_PUBLISH_KINDS = frozenset({TopicKind.EVENTS, TopicKind.STATE})
_GATEWAY_PUBLISH_KINDS = frozenset({TopicKind.ATTACH, TopicKind.DETACH})
_SUBSCRIBE_KINDS = frozenset({TopicKind.CONFIG, TopicKind.COMMANDS})


def allowed(device: str, topic: str, action: Action, *,
            attached: Collection[str] = (), bound: Collection[str] = ()) -> bool:
    """May `device` (a device id) publish to / subscribe to `topic`?

    A device: publish its own events and state; subscribe its own config and commands.
    A gateway additionally: publish `attach`/`detach` for the devices bound to it (`bound`),
    publish events/state and subscribe config/commands of the devices currently `attached`,
    and subscribe its own `errors`. Everything else, including malformed topics, is False.
    """
    try:
        parsed = parse_topic(topic)
    except Rejected:
        return False
    own = parsed.device == device
    if action is Action.PUBLISH:
        if parsed.wildcard:
            return False
        if parsed.kind in _PUBLISH_KINDS:
            return own or parsed.device in attached
        if parsed.kind in _GATEWAY_PUBLISH_KINDS:
            return not own and parsed.device in bound
        return False
    if action is Action.SUBSCRIBE:
        if parsed.kind in _SUBSCRIBE_KINDS:
            return own or parsed.device in attached
        if parsed.kind is TopicKind.ERRORS:
            return own
        return False
    return False


def publish_qos_allowed(qos: int) -> bool:
    """Cloud IoT Core closed the connection on a QoS 2 PUBLISH; QoS 0 and 1 are fine."""
    return qos in (0, 1)


def granted_qos(requested: int) -> int:
    """QoS granted for a SUBSCRIBE: QoS 2 is downgraded to 1, as Cloud IoT Core did."""
    return min(max(requested, 0), 1)


# --- keys ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceKey:
    """One registered public key; `expires_at` (Unix seconds) None means it never expires."""

    public_key: PublicKey
    expires_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def __repr__(self) -> str:
        return f"DeviceKey({_key_kind(self.public_key)}, expires_at={self.expires_at})"


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC-{key.curve.name}"
    return type(key).__name__


def _check_key(key: object) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"RSA keys need at least {MIN_RSA_BITS} bits")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("EC keys must be on P-256 (ES256)")
        return key
    raise ConfigError("only RSA (RS256) and EC P-256 (ES256) keys are accepted")


def load_public_key(pem: bytes | str) -> PublicKey:
    """Load an uploaded public key or X.509 certificate (PEM) and check its type and size.

    Cloud IoT Core accepted RSA_PEM, RSA_X509_PEM, ES256_PEM and ES256_X509_PEM; the
    certificate is only a carrier here (its validity dates are not the key's expiry: give
    `expires_at` when registering).
    """
    data = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError("not a PEM public key or certificate") from exc
    return _check_key(key)


class PublicKeyRegistry(Protocol):
    """Where the adapters find a device's keys. None: no such device."""

    def keys_for(self, device: DevicePath) -> Sequence[DeviceKey] | None: ...


@dataclass
class InMemoryKeyRegistry:
    """The in-memory twin of the registry, for tests and single-process deployments."""

    _keys: dict[DevicePath, list[DeviceKey]] = field(default_factory=dict)

    def add_device(self, device: DevicePath) -> None:
        self._keys.setdefault(device, [])

    def add_key(self, device: DevicePath, key: PublicKey | bytes | str, *,
                expires_at: float | None = None) -> DeviceKey:
        public = load_public_key(key) if isinstance(key, bytes | str) else _check_key(key)
        keys = self._keys.setdefault(device, [])
        if len(keys) >= MAX_KEYS_PER_DEVICE:
            raise ConfigError(f"a device holds at most {MAX_KEYS_PER_DEVICE} keys")
        entry = DeviceKey(public, expires_at)
        keys.append(entry)
        return entry

    def remove_device(self, device: DevicePath) -> None:
        self._keys.pop(device, None)

    def keys_for(self, device: DevicePath) -> Sequence[DeviceKey] | None:
        keys = self._keys.get(device)
        return None if keys is None else tuple(keys)


# --- JWT ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JwtSession:
    """A verified JWT: who, with which alg, and until when (`exp`: close the session then)."""

    device: DevicePath
    alg: str
    iat: int
    exp: int


_ALG_KEY_TYPE: Final[Mapping[str, type]] = {
    "RS256": rsa.RSAPublicKey,
    "ES256": ec.EllipticCurvePublicKey,
}


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(RejectReason.MALFORMED, f"JWT claim {name} missing or not a number")
    return int(value)


def verify_jwt(token: str | bytes, device: DevicePath, registry: PublicKeyRegistry, *,
               now: float, skew_s: int = DEFAULT_SKEW_S,
               max_lifetime_s: int = MAX_LIFETIME_S) -> JwtSession:
    """Verify a device's JWT (the MQTT password or the HTTP bearer token); Rejected otherwise."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise Rejected(RejectReason.MALFORMED, "JWT is not ASCII") from None
    if not isinstance(token, str) or not token:
        raise Rejected(RejectReason.MALFORMED, "no JWT")
    if len(token) > MAX_JWT_LEN:
        raise Rejected(RejectReason.OVERSIZE, f"JWT of {len(token)} chars")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Rejected(RejectReason.MALFORMED, "JWT header unreadable") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        # Covers "none", HS256 with the public key as the HMAC secret, and everything else.
        raise Rejected(RejectReason.UNSUPPORTED, f"JWT alg {str(alg)[:16]!r} not allowed")
    if "crit" in header:
        raise Rejected(RejectReason.UNSUPPORTED, "JWT crit header")

    keys = registry.keys_for(device)
    if keys is None:
        raise Rejected(RejectReason.UNKNOWN_DEVICE, f"device {device.device}")
    key_type = _ALG_KEY_TYPE[alg]
    candidates = [k.public_key for k in keys
                  if k.usable(now) and isinstance(k.public_key, key_type)]
    if not candidates:
        raise Rejected(RejectReason.UNKNOWN_EPOCH, f"no usable {alg} key for {device.device}")

    claims: dict[str, Any] | None = None
    for key in candidates[:MAX_KEYS_PER_DEVICE]:
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[alg],
                options={"verify_signature": True, "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False, "verify_aud": False, "verify_iss": False,
                         "verify_sub": False, "verify_jti": False},
            )
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            raise Rejected(RejectReason.MALFORMED, "JWT unreadable") from None
    if claims is None:
        raise Rejected(RejectReason.BAD_SIGNATURE, f"JWT signature for {device.device}")

    aud = claims.get("aud")
    if aud != device.project:
        raise Rejected(RejectReason.POLICY_VIOLATION, "JWT aud is not this project")
    iat = _int_claim(claims, "iat")
    exp = _int_claim(claims, "exp")
    if exp <= iat:
        raise Rejected(RejectReason.MALFORMED, "JWT exp not after iat")
    if iat > now + skew_s:
        raise Rejected(RejectReason.STALE, "JWT iat in the future")
    if exp <= now:
        raise Rejected(RejectReason.STALE, "JWT expired")
    if exp - iat > max_lifetime_s + skew_s or exp - now > max_lifetime_s + skew_s:
        raise Rejected(RejectReason.POLICY_VIOLATION, "JWT lifetime over 24 h")
    if "nbf" in claims and _int_claim(claims, "nbf") > now + skew_s:
        raise Rejected(RejectReason.STALE, "JWT nbf in the future")
    return JwtSession(device, alg, iat, exp)
