"""Cloud IoT Core compatibility: client ids, topics and ACL, and the strict JWT verifier.

JWTs are made with PyJWT exactly as Google's sample device clients make them
(`jwt.encode({"iat", "exp", "aud": project}, private_key_pem, algorithm=...)`), and the
attacks are made by hand (alg none, HS256 keyed with the public key PEM) since PyJWT itself
refuses to produce some of them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sensorseal.compat import gcp_iot as g
from sensorseal.core.errors import ConfigError, Rejected, RejectReason

NOW = 1_700_000_000
DEV = g.DevicePath("my-project", "us-central1", "my-registry", "dev-1")
OTHER = DEV.sibling("dev-2")


def pem_private(key: Any) -> bytes:
    out: bytes = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return out


def pem_public(key: Any) -> bytes:
    out: bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "other_ec": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture()
def registry(keys: dict[str, Any]) -> g.InMemoryKeyRegistry:
    reg = g.InMemoryKeyRegistry()
    reg.add_key(DEV, pem_public(keys["rsa"]))
    reg.add_key(DEV, pem_public(keys["ec"]), expires_at=NOW + 3600)
    reg.add_key(OTHER, pem_public(keys["other_ec"]))
    return reg


def google_jwt(private: Any, alg: str, *, iat: int = NOW, exp: int | None = None,
               aud: Any = "my-project") -> str:
    """As Google's cloudiot_mqtt_example.py create_jwt() does."""
    claims = {"iat": iat, "exp": exp if exp is not None else iat + 20 * 60, "aud": aud}
    return jwt.encode(claims, pem_private(private), algorithm=alg)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    signing_input = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode()))
    return signing_input + "." + b64(sign(signing_input.encode()))


def verify(token: str, reg: g.InMemoryKeyRegistry, now: float = NOW,
           device: g.DevicePath = DEV) -> g.JwtSession:
    return g.verify_jwt(token, device, reg, now=now)


def reason_of(token: str, reg: g.InMemoryKeyRegistry, now: float = NOW,
              device: g.DevicePath = DEV) -> RejectReason:
    with pytest.raises(Rejected) as info:
        verify(token, reg, now, device)
    return info.value.reason


# --- client id and topics -----------------------------------------------------------------

def test_client_id_roundtrip_and_refusals() -> None:
    cid = "projects/my-project/locations/us-central1/registries/my-registry/devices/dev-1"
    assert g.DevicePath.parse(cid) == DEV and str(DEV) == cid
    for bad in ("", "projects/x/locations/us-central1/registries/r1x/devices/d1x",
                cid + "/extra", cid.replace("dev-1", "1dev"), cid.replace("dev-1", "d#v"),
                cid.replace("my-project", "My-Project"), "devices/dev-1"):
        with pytest.raises(Rejected) as info:
            g.DevicePath.parse(bad)
        assert info.value.reason is RejectReason.MALFORMED


def test_topic_parsing() -> None:
    assert g.parse_topic("/devices/dev-1/events") == g.DeviceTopic("dev-1", g.TopicKind.EVENTS)
    assert g.parse_topic("/devices/dev-1/events/a/b").subfolder == "a/b"
    assert g.parse_topic("/devices/dev-1/commands/#").wildcard
    for bad in ("/devices/dev-1/events/+", "/devices/dev-1/config/x", "/devices/+/config",
                "devices/dev-1/events", "/devices/dev-1/bogus", "/devices/dev-1/events//x",
                "/devices/dev-1/state/#", "/devices/#"):
        with pytest.raises(Rejected):
            g.parse_topic(bad)


def test_acl_device_and_gateway() -> None:
    pub, sub = g.Action.PUBLISH, g.Action.SUBSCRIBE
    assert g.allowed("dev-1", "/devices/dev-1/events", pub)
    assert g.allowed("dev-1", "/devices/dev-1/events/alerts", pub)
    assert g.allowed("dev-1", "/devices/dev-1/state", pub)
    assert g.allowed("dev-1", "/devices/dev-1/config", sub)
    assert g.allowed("dev-1", "/devices/dev-1/commands/#", sub)
    assert not g.allowed("dev-1", "/devices/dev-2/events", pub)
    assert not g.allowed("dev-1", "/devices/dev-2/config", sub)
    assert not g.allowed("dev-1", "/devices/dev-1/config", pub)  # config is cloud -> device
    assert not g.allowed("dev-1", "/devices/dev-1/commands", pub)
    assert not g.allowed("dev-1", "/devices/dev-1/events", sub)  # no eavesdropping
    assert not g.allowed("dev-1", "#", sub) and not g.allowed("dev-1", "/devices/+/config", sub)
    assert not g.allowed("dev-1", "/devices/dev-2/attach", pub)  # not bound
    # gateway gw-1 with dev-2 bound, then attached
    assert g.allowed("gw-1", "/devices/dev-2/attach", pub, bound={"dev-2"})
    assert not g.allowed("gw-1", "/devices/dev-2/events", pub, bound={"dev-2"})
    assert g.allowed("gw-1", "/devices/dev-2/events", pub, attached={"dev-2"})
    assert g.allowed("gw-1", "/devices/dev-2/config", sub, attached={"dev-2"})
    assert g.allowed("gw-1", "/devices/gw-1/errors", sub)
    assert not g.allowed("gw-1", "/devices/dev-2/errors", sub, attached={"dev-2"})
    assert not g.allowed("gw-1", "/devices/gw-1/attach", pub, bound={"dev-2"})


def test_qos_rules() -> None:
    assert g.publish_qos_allowed(0) and g.publish_qos_allowed(1)
    assert not g.publish_qos_allowed(2)
    assert [g.granted_qos(q) for q in (0, 1, 2)] == [0, 1, 1]


# --- keys ---------------------------------------------------------------------------------

def test_key_upload_rules(keys: dict[str, Any]) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError):
        g.load_public_key(pem_public(weak))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError):
        g.load_public_key(pem_public(p384))
    with pytest.raises(ConfigError):
        g.load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    # an uploaded certificate (ES256_X509_PEM) carries the key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unused")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(keys["ec"].public_key()).serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1))
            .sign(keys["ec"], hashes.SHA256()))
    loaded = g.load_public_key(cert.public_bytes(serialization.Encoding.PEM))
    assert loaded.public_numbers() == keys["ec"].public_key().public_numbers()
    reg = g.InMemoryKeyRegistry()
    for _ in range(g.MAX_KEYS_PER_DEVICE):
        reg.add_key(DEV, keys["ec"].public_key())
    with pytest.raises(ConfigError):
        reg.add_key(DEV, keys["ec"].public_key())
    assert "BEGIN" not in repr(reg.keys_for(DEV))


# --- JWT ----------------------------------------------------------------------------------

def test_google_style_jwts_verify(keys: dict[str, Any], registry: g.InMemoryKeyRegistry) -> None:
    s = verify(google_jwt(keys["rsa"], "RS256"), registry)
    assert (s.device, s.alg, s.exp) == (DEV, "RS256", NOW + 1200)
    s = verify(google_jwt(keys["ec"], "ES256", exp=NOW + 24 * 3600), registry)
    assert s.alg == "ES256"
    # iat up to 10 minutes in the future is clock skew, tolerated
    verify(google_jwt(keys["ec"], "ES256", iat=NOW + 590), registry)
    # token bytes (paho passes the password as bytes) work too
    assert verify(google_jwt(keys["rsa"], "RS256").encode(), registry).alg == "RS256"  # type: ignore[arg-type]


def test_alg_none_refused(keys: dict[str, Any], registry: g.InMemoryKeyRegistry) -> None:
    claims = {"iat": NOW, "exp": NOW + 600, "aud": "my-project"}
    for alg in ("none", "None", "NONE"):
        token = handmade({"alg": alg, "typ": "JWT"}, claims, lambda m: b"")
        assert reason_of(token, registry) is RejectReason.UNSUPPORTED
    token = b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims).encode()) + "."
    assert reason_of(token, registry) is RejectReason.UNSUPPORTED


def test_hs256_with_public_key_as_secret_refused(keys: dict[str, Any],
                                                 registry: g.InMemoryKeyRegistry) -> None:
    claims = {"iat": NOW, "exp": NOW + 600, "aud": "my-project"}
    for secret in (pem_public(keys["rsa"]), pem_public(keys["ec"])):
        for alg, h in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            token = handmade({"alg": alg, "typ": "JWT"}, claims,
                             lambda m, s=secret, h=h: hmac.new(s, m, h).digest())
            assert reason_of(token, registry) is RejectReason.UNSUPPORTED


def test_alg_must_match_key_type(keys: dict[str, Any]) -> None:
    reg = g.InMemoryKeyRegistry()
    reg.add_key(DEV, pem_public(keys["ec"]))  # only an EC key
    # an RS256 token (even validly signed by some RSA key) finds no usable key of its type
    assert reason_of(google_jwt(keys["rsa"], "RS256"), reg) is RejectReason.UNKNOWN_EPOCH
    for alg in ("PS256", "RS512", "ES384", "EdDSA"):
        token = handmade({"alg": alg}, {"iat": NOW, "exp": NOW + 60, "aud": "my-project"},
                         lambda m: b"x" * 64)
        assert reason_of(token, reg) is RejectReason.UNSUPPORTED


def test_claims(keys: dict[str, Any], registry: g.InMemoryKeyRegistry) -> None:
    k = keys["rsa"]
    cases = {
        "wrong aud": (google_jwt(k, "RS256", aud="other-project"), RejectReason.POLICY_VIOLATION),
        "aud list": (google_jwt(k, "RS256", aud=["my-project"]), RejectReason.POLICY_VIOLATION),
        "no aud": (jwt.encode({"iat": NOW, "exp": NOW + 60}, pem_private(k), "RS256"),
                   RejectReason.POLICY_VIOLATION),
        "future iat": (google_jwt(k, "RS256", iat=NOW + 601), RejectReason.STALE),
        "expired": (google_jwt(k, "RS256", iat=NOW - 3600, exp=NOW - 1), RejectReason.STALE),
        "exp now": (google_jwt(k, "RS256", iat=NOW - 60, exp=NOW), RejectReason.STALE),
        "lifetime": (google_jwt(k, "RS256", iat=NOW - 10, exp=NOW + 25 * 3600),
                     RejectReason.POLICY_VIOLATION),
        "backdated": (google_jwt(k, "RS256", iat=NOW - 2 * 86400, exp=NOW + 3600),
                      RejectReason.POLICY_VIOLATION),
        "no iat": (jwt.encode({"exp": NOW + 60, "aud": "my-project"}, pem_private(k), "RS256"),
                   RejectReason.MALFORMED),
        "iat string": (jwt.encode({"iat": "1", "exp": NOW + 60, "aud": "my-project"},
                                  pem_private(k), "RS256"), RejectReason.MALFORMED),
        "exp before iat": (google_jwt(k, "RS256", iat=NOW, exp=NOW - 5), RejectReason.MALFORMED),
        "garbage": ("a.b.c", RejectReason.MALFORMED),
        "huge": ("x" * 9000, RejectReason.OVERSIZE),
    }
    for name, (token, reason) in cases.items():
        assert reason_of(token, registry) is reason, name
    # a lifetime of exactly 24 h (plus skew) is fine
    verify(google_jwt(k, "RS256", iat=NOW, exp=NOW + 24 * 3600 + 600), registry)


def test_keys_of_others_and_expired_keys(keys: dict[str, Any],
                                         registry: g.InMemoryKeyRegistry) -> None:
    # another device's (registered, valid) key cannot sign for dev-1
    assert reason_of(google_jwt(keys["other_ec"], "ES256"), registry) is RejectReason.BAD_SIGNATURE
    # ... and dev-1's token does not open dev-2
    assert reason_of(google_jwt(keys["ec"], "ES256"), registry, device=OTHER) is \
        RejectReason.BAD_SIGNATURE
    # dev-1's EC key expires at NOW + 3600: after that its tokens are refused
    token = google_jwt(keys["ec"], "ES256", iat=NOW + 3600, exp=NOW + 4000)
    assert reason_of(token, registry, now=NOW + 3601) is RejectReason.UNKNOWN_EPOCH
    # unknown device
    ghost = DEV.sibling("ghost")
    assert reason_of(google_jwt(keys["ec"], "ES256"), registry, device=ghost) is \
        RejectReason.UNKNOWN_DEVICE
    # a signature bit flip
    token = google_jwt(keys["rsa"], "RS256")
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 1
    assert reason_of(f"{head}.{body}.{b64(bytes(raw))}", registry) is RejectReason.BAD_SIGNATURE
    # the claims changed under a valid signature
    forged_body = b64(json.dumps({"iat": NOW, "exp": NOW + 86000, "aud": "my-project"}).encode())
    assert reason_of(f"{head}.{forged_body}.{sig}", registry) is RejectReason.BAD_SIGNATURE


def test_rejections_carry_no_secret(keys: dict[str, Any], registry: g.InMemoryKeyRegistry) -> None:
    token = google_jwt(keys["other_ec"], "ES256")
    with pytest.raises(Rejected) as info:
        verify(token, registry)
    assert token not in str(info.value) and token.split(".")[2] not in str(info.value)


def test_real_clock_google_sample_shape(keys: dict[str, Any]) -> None:
    reg = g.InMemoryKeyRegistry()
    reg.add_key(DEV, pem_public(keys["rsa"]))
    now = int(time.time())
    token = jwt.encode({"iat": now, "exp": now + 60, "aud": "my-project"},
                       pem_private(keys["rsa"]), algorithm="RS256")
    assert g.verify_jwt(token, DEV, reg, now=now).exp == now + 60
