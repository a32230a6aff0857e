"""PKCS#11 with a real SoftHSM2 token: KEK in the token, ES256 device key, ECDH for HPKE.

The test creates its own token in a temporary directory (SOFTHSM2_CONF points at a private
config; `softhsm2-util --init-token --free`), so it never touches a token of the machine.
Without SoftHSM2 it fails under CI=true and skips locally, saying why.

Non-extractability is *proven* by attempting extraction through every standard PKCS#11 route
(read CKA_VALUE, C_WrapKey with another token key, flip CKA_EXTRACTABLE back on) and expecting
the token to refuse each one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from sensorseal.core.attest import ALG_ES256, sign1, verify_archive, verify_sign1
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId

pytestmark = pytest.mark.e2e

MODULE = os.environ.get("SENSORSEAL_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
UTIL = shutil.which("softhsm2-util")
PIN, SO_PIN, LABEL = "4321", "87654321", "sensorseal-test"
DEV = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f601020304"))
DEV2 = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f6aabbccdd"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SoftHSM2 is required in CI: {reason} (apt-get install -y softhsm2; "
                    "pip install python-pkcs11==0.10.1)")
    pytest.skip(reason)


try:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11 import exceptions as p11err
    from pkcs11.util.ec import encode_ec_public_key

    from sensorseal.keystore.pkcs11 import (
        Pkcs11Config,
        Pkcs11Keystore,
        Pkcs11Signer,
        generate_ec_key,
        hpke_open_p256,
        open_session,
        token_ecdh,
    )
except ImportError as exc:  # python-pkcs11 not installed
    _IMPORT_ERROR: str | None = f"python-pkcs11 missing: {exc}"
else:
    _IMPORT_ERROR = None


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if _IMPORT_ERROR:
        _unavailable(_IMPORT_ERROR)
    if not Path(MODULE).is_file() or UTIL is None:
        _unavailable(f"SoftHSM2 not installed ({MODULE} / softhsm2-util missing)")
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by SoftHSM at C_Initialize, in this process
    assert UTIL is not None
    subprocess.run([UTIL, "--init-token", "--free", "--label", LABEL, "--pin", PIN,
                    "--so-pin", SO_PIN], check=True, capture_output=True, timeout=30,
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    yield Pkcs11Config.from_env({"SENSORSEAL_PKCS11_MODULE": MODULE,
                                 "SENSORSEAL_PKCS11_TOKEN": LABEL,
                                 "SENSORSEAL_PKCS11_PIN": PIN})
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="module")
def session(config: Any) -> Iterator[Any]:
    s = open_session(config)
    yield s
    s.close()


# --- (a) KEK in the token --------------------------------------------------------------------

def test_kek_wraps_and_unwraps(config: Any, session: Any) -> None:
    ks = Pkcs11Keystore(session, config.kek_label)
    secret = os.urandom(32)
    blob = ks.wrap(DEV, 3, secret)
    assert secret not in blob and len(blob) == 1 + 4 + 12 + 32 + 16
    assert ks.unwrap(DEV, 3, blob) == secret
    assert ks.wrap(DEV, 3, secret) != blob  # fresh nonce every time
    for dev, epoch in ((DEV2, 3), (DEV, 4)):
        with pytest.raises(ConfigError):
            ks.unwrap(dev, epoch, blob)  # bound to its (device, epoch) row
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(ConfigError) as info:
            ks.unwrap(DEV, 3, bytes(bad))
        assert secret.hex() not in str(info.value)
    assert PIN not in repr(config) and "kek_id" in repr(ks)


def test_kek_lives_in_the_token(config: Any, session: Any) -> None:
    """A second, independent session (as after a restart) finds the same KEK and opens blobs."""
    blob = Pkcs11Keystore(session, config.kek_label).wrap(DEV, 1, b"\x07" * 32)
    other = Pkcs11Keystore.from_config(config)
    assert other.unwrap(DEV, 1, blob) == b"\x07" * 32
    assert other.kek_id == Pkcs11Keystore(session, config.kek_label).kek_id
    different = Pkcs11Keystore(session, "another-kek")
    assert different.kek_id != other.kek_id
    with pytest.raises(ConfigError):
        different.unwrap(DEV, 1, blob)


def test_kek_cannot_be_extracted(config: Any, session: Any) -> None:
    Pkcs11Keystore(session, config.kek_label)
    kek = session.get_key(label=config.kek_label, key_type=KeyType.AES)
    assert kek[Attribute.SENSITIVE] is True and kek[Attribute.EXTRACTABLE] is False
    assert kek[Attribute.ALWAYS_SENSITIVE] is True and kek[Attribute.NEVER_EXTRACTABLE] is True
    assert kek[Attribute.WRAP] is False and kek[Attribute.UNWRAP] is False
    with pytest.raises(p11err.AttributeSensitive):
        kek[Attribute.VALUE]
    _assert_cannot_wrap_out(session, kek)
    _assert_cannot_make_extractable(kek)


# --- (b) device ES256 key generated in the token ----------------------------------------------

def test_device_key_signs_cose_sign1(session: Any) -> None:
    private, public = generate_ec_key(session, "device-es256")
    signer = Pkcs11Signer(private)
    data = sign1(b'{"temp":21.5}', signer, bytes(DEV), ALG_ES256)
    assert verify_sign1(data, public) == b'{"temp":21.5}'
    # The public key read back from the token by label verifies too (what a registry stores).
    pub_obj = session.get_key(label="device-es256", object_class=pkcs11.ObjectClass.PUBLIC_KEY)
    again = load_der_public_key(encode_ec_public_key(pub_obj))
    assert isinstance(again, ec.EllipticCurvePublicKey)
    assert verify_archive([data], {bytes(DEV): again})[0].ok
    bad = bytearray(data)
    bad[-5] ^= 0x10
    with pytest.raises(Rejected) as info:
        verify_sign1(bytes(bad), public)
    assert info.value.reason is RejectReason.BAD_SIGNATURE
    assert "Pkcs11Signer" in repr(signer)


def test_device_key_cannot_be_extracted(session: Any) -> None:
    private, _ = generate_ec_key(session, "device-es256-x")
    assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.NEVER_EXTRACTABLE] is True and private[Attribute.LOCAL] is True
    with pytest.raises(p11err.AttributeSensitive):
        private[Attribute.VALUE]
    _assert_cannot_wrap_out(session, private)
    _assert_cannot_make_extractable(private)


def _assert_cannot_wrap_out(session: Any, key: Any) -> None:
    """C_WrapKey with a wrapping key of our own: the token must refuse to export `key`."""
    wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                   template={Attribute.WRAP: True, Attribute.EXTRACTABLE: True})
    # Control: the route works, an extractable key does come out (so a refusal below means
    # something).
    control = session.generate_key(KeyType.AES, 256, store=False,
                                   template={Attribute.EXTRACTABLE: True})
    assert len(wrapper.wrap_key(control, mechanism=Mechanism.AES_KEY_WRAP_PAD)) == 40
    for mech in (Mechanism.AES_KEY_WRAP_PAD, Mechanism.AES_KEY_WRAP):
        with pytest.raises(p11err.KeyUnextractable):
            wrapper.wrap_key(key, mechanism=mech)


def _assert_cannot_make_extractable(key: Any) -> None:
    """PKCS#11 v2.40 section 4.4: CKA_EXTRACTABLE can go true->false, never back."""
    with pytest.raises(p11err.PKCS11Error):
        key[Attribute.EXTRACTABLE] = True
    with pytest.raises(p11err.PKCS11Error):
        key[Attribute.SENSITIVE] = False
    assert key[Attribute.EXTRACTABLE] is False


# --- (c) HPKE: the DH step in the token, the key schedule outside ----------------------------

def test_token_ecdh_matches_software(session: Any) -> None:
    private, public = generate_ec_key(session, "device-kem-p256", usage="derive")
    eph = ec.generate_private_key(ec.SECP256R1())
    assert token_ecdh(private, eph.public_key()) == eph.exchange(ec.ECDH(), public)
    _assert_cannot_wrap_out(session, private)
    with pytest.raises(p11err.AttributeSensitive):
        private[Attribute.VALUE]


def test_hpke_p256_offer_opens_with_the_token_key(session: Any) -> None:
    """A renewal-style HPKE message sealed by `cryptography` (DHKEM(P-256)) opens with the
    private key that never leaves the token; a tampered one does not."""
    private, public = generate_ec_key(session, "device-kem-hpke", usage="derive")
    suite = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    secret, info = os.urandom(32), b"sensorseal/1 renewal test"
    sealed = suite.encrypt(secret, public, info=info)
    assert hpke_open_p256(private, public, sealed, info) == secret
    with pytest.raises(InvalidTag):
        hpke_open_p256(private, public, sealed, info + b"x")
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(InvalidTag):
        hpke_open_p256(private, public, bytes(bad), info)


def test_signing_key_refuses_derive(session: Any) -> None:
    """One key, one purpose: the ES256 key cannot be used for ECDH (CKA_DERIVE false)."""
    private, _ = generate_ec_key(session, "device-es256-only")
    with pytest.raises(ConfigError):
        token_ecdh(private, ec.generate_private_key(ec.SECP256R1()).public_key())


def test_bad_config_is_config_error(config: Any) -> None:
    """A wrong PIN fails with ConfigError whose text does not echo the PIN. Run in a fresh
    process: login state is per application, and this one is already logged in."""
    code = ("import sys\n"
            "from sensorseal.keystore.pkcs11 import Pkcs11Config, open_session\n"
            "from sensorseal.core.errors import ConfigError\n"
            "try:\n"
            f"    open_session(Pkcs11Config({config.module!r}, {config.token_label!r}, '0000'))\n"
            "except ConfigError as exc:\n"
            "    print(exc); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 3, proc.stderr
    assert "PinIncorrect" in proc.stdout and "0000" not in proc.stdout
    with pytest.raises(ConfigError):
        Pkcs11Config.from_env({})
    with pytest.raises(ConfigError):
        open_session(Pkcs11Config(config.module, "no-such-token", PIN))
