"""E5 key renewal: HPKE offers in both suites, the device's checks, the server state machine."""

from __future__ import annotations

import os

import cbor2
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke

from sensorseal.core.context import SecurityContext
from sensorseal.core.envelope import seal, unseal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction
from sensorseal.core.keys import derive
from sensorseal.core.renewal import (
    HDR_EK,
    DeviceKemKey,
    DeviceKemPublicKey,
    Phase,
    RenewalState,
    RenewalSuite,
    accept_offer,
    make_offer,
    parse_offer,
    renewal_info,
)

SUITES = list(RenewalSuite)
DEV_A = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f601020304"))
DEV_B = DeviceId(bytes.fromhex("65f0a1b2c3d4e5f6aabbccdd"))


@pytest.fixture(scope="module", params=SUITES, ids=[s.name for s in SUITES])
def suite(request: pytest.FixtureRequest) -> RenewalSuite:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def device_key(suite: RenewalSuite) -> DeviceKemKey:
    return DeviceKemKey.generate(suite)


def test_round_trip(suite: RenewalSuite, device_key: DeviceKemKey) -> None:
    secret = os.urandom(32)
    offer = make_offer(DEV_A, device_key.public_key(), 7, secret)
    assert accept_offer(offer, device_key, DEV_A, 7) == (8, secret)
    hdr = parse_offer(offer)
    assert (hdr.suite, hdr.device_id, hdr.old_epoch, hdr.new_epoch) == (suite, DEV_A, 7, 8)
    assert len(hdr.enc) == suite.enc_len
    assert secret not in offer


def test_offer_is_cose_encrypt0_with_documented_layout(device_key: DeviceKemKey) -> None:
    offer = make_offer(DEV_A, device_key.public_key(), 0, bytes(32))
    item = cbor2.loads(offer)
    assert item.tag == 16
    protected, unprotected, ct = item.value
    assert cbor2.loads(protected) == {1: int(device_key.suite), 4: bytes(DEV_A), -65537: 1,
                                      -65539: 0}
    assert set(unprotected) == {HDR_EK} and len(ct) == 48


def test_interop_with_plain_hpke(device_key: DeviceKemKey) -> None:
    """The offer is ordinary RFC 9180 single-shot HPKE: `cryptography` opens it directly with
    the documented info, and an offer built by hand from the documented layout is accepted."""
    secret = os.urandom(32)
    offer = make_offer(DEV_A, device_key.public_key(), 3, secret)
    hdr = parse_offer(offer)
    info = renewal_info(DEV_A, 3, 4, hdr.protected)
    suite = device_key.suite.hpke_suite()
    assert suite.decrypt(hdr.enc + hdr.ciphertext, device_key._hpke_key(), info=info) == secret

    protected = cbor2.dumps({1: int(device_key.suite), 4: bytes(DEV_A), -65537: 4, -65539: 3})
    sealed = suite.encrypt(secret, device_key.public_key().key(),
                           info=renewal_info(DEV_A, 3, 4, protected))
    n = device_key.suite.enc_len
    by_hand = cbor2.dumps(cbor2.CBORTag(16, [protected, {-4: sealed[:n]}, sealed[n:]]))
    assert accept_offer(by_hand, device_key, DEV_A, 3) == (4, secret)


def test_private_key_persists(device_key: DeviceKemKey) -> None:
    again = DeviceKemKey.from_private_bytes(device_key.suite, device_key.private_bytes())
    assert again.public_key().raw == device_key.public_key().raw
    offer = make_offer(DEV_A, device_key.public_key(), 0, b"\x01" * 32)
    assert accept_offer(offer, again, DEV_A, 0) == (1, b"\x01" * 32)
    assert "private" not in repr(device_key).lower() or "_x25519" not in repr(device_key)
    assert device_key.private_bytes().hex() not in repr(device_key)


def test_wrong_device_rejected(device_key: DeviceKemKey) -> None:
    offer = make_offer(DEV_A, device_key.public_key(), 1, os.urandom(32))
    with pytest.raises(Rejected) as info:
        accept_offer(offer, device_key, DEV_B, 1)
    assert info.value.reason is RejectReason.MALFORMED


@pytest.mark.parametrize("current", [0, 1, 3])
def test_epoch_must_be_current_plus_one(device_key: DeviceKemKey, current: int) -> None:
    offer = make_offer(DEV_A, device_key.public_key(), 2, os.urandom(32))
    with pytest.raises(Rejected) as info:
        accept_offer(offer, device_key, DEV_A, current)
    assert info.value.reason is RejectReason.UNKNOWN_EPOCH


def test_wrong_device_key_rejected(suite: RenewalSuite, device_key: DeviceKemKey) -> None:
    other = DeviceKemKey.generate(suite)
    offer = make_offer(DEV_A, other.public_key(), 1, os.urandom(32))
    with pytest.raises(Rejected) as info:
        accept_offer(offer, device_key, DEV_A, 1)
    assert info.value.reason is RejectReason.DECRYPT_FAILED


def test_suite_mismatch_rejected() -> None:
    classic, hybrid = DeviceKemKey.generate(), DeviceKemKey.generate(RenewalSuite.MLKEM768_X25519)
    offer = make_offer(DEV_A, classic.public_key(), 1, os.urandom(32))
    with pytest.raises(Rejected) as info:
        accept_offer(offer, hybrid, DEV_A, 1)
    assert info.value.reason is RejectReason.MALFORMED


def test_every_byte_of_an_offer_is_protected(device_key: DeviceKemKey) -> None:
    """Flip each bit of each byte in turn (XOR 0x01, 0x80 and 0xff): every variant is refused
    with one of the documented reasons, and none yields a secret."""
    secret = os.urandom(32)
    offer = make_offer(DEV_A, device_key.public_key(), 5, secret)
    allowed = {RejectReason.MALFORMED, RejectReason.DECRYPT_FAILED,
               RejectReason.UNKNOWN_EPOCH, RejectReason.UNSUPPORTED}
    seen: set[RejectReason] = set()
    for i in range(len(offer)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(offer)
            bad[i] ^= mask
            with pytest.raises(Rejected) as info:
                accept_offer(bytes(bad), device_key, DEV_A, 5)
            assert info.value.reason in allowed
            seen.add(info.value.reason)
    assert RejectReason.DECRYPT_FAILED in seen and RejectReason.MALFORMED in seen
    for cut in (0, 1, len(offer) // 2, len(offer) - 1):
        with pytest.raises(Rejected):
            accept_offer(offer[:cut], device_key, DEV_A, 5)
    with pytest.raises(Rejected):
        accept_offer(offer + b"\x00", device_key, DEV_A, 5)


def test_header_edited_consistently_still_fails(device_key: DeviceKemKey) -> None:
    """Re-encode the header with another device id and epochs (valid CBOR, right shape): the
    HPKE info no longer matches, so the AEAD refuses."""
    offer = make_offer(DEV_A, device_key.public_key(), 5, os.urandom(32))
    _, unprotected, ct = cbor2.loads(offer).value
    for dev, old, new in ((DEV_B, 5, 6), (DEV_A, 6, 7)):
        protected = cbor2.dumps({1: int(device_key.suite), 4: bytes(dev), -65537: new,
                                 -65539: old})
        forged = cbor2.dumps(cbor2.CBORTag(16, [protected, dict(unprotected), ct]))
        with pytest.raises(Rejected) as info:
            accept_offer(forged, device_key, dev, old)
        assert info.value.reason is RejectReason.DECRYPT_FAILED


def test_compromise_isolation(suite: RenewalSuite) -> None:
    """An attacker holding device A's private key and root secrets cannot open B's offer."""
    key_a, key_b = DeviceKemKey.generate(suite), DeviceKemKey.generate(suite)
    secret_b = os.urandom(32)
    offer_b = make_offer(DEV_B, key_b.public_key(), 1, secret_b)
    # A's key, claiming to be B (so the id check passes): decryption must still fail.
    with pytest.raises(Rejected) as info:
        accept_offer(offer_b, key_a, DEV_B, 1)
    assert info.value.reason is RejectReason.DECRYPT_FAILED
    # A's key with the raw HPKE call and every info it might guess: nothing opens.
    hdr = parse_offer(offer_b)
    for info_bytes in (renewal_info(DEV_B, 1, 2, hdr.protected), b"", None):
        with pytest.raises(InvalidTag):
            suite.hpke_suite().decrypt(hdr.enc + hdr.ciphertext, key_a._hpke_key(),
                                       info=info_bytes)
    # A's own offer under the same epochs carries a different secret.
    secret_a = os.urandom(32)
    offer_a = make_offer(DEV_A, key_a.public_key(), 1, secret_a)
    assert accept_offer(offer_a, key_a, DEV_A, 1) == (2, secret_a) and secret_a != secret_b


def test_bad_inputs_are_config_errors(device_key: DeviceKemKey) -> None:
    with pytest.raises(ConfigError):
        make_offer(DEV_A, device_key.public_key(), 0, b"short")
    with pytest.raises(ConfigError):
        make_offer(DEV_A, device_key.public_key(), 2**32 - 1, bytes(32))
    with pytest.raises(ConfigError):
        DeviceKemPublicKey(device_key.suite, b"\x00" * 5)


# --- carrier and state machine ------------------------------------------------------------------

def _proof(secret: bytes, epoch: int, seq: int) -> bytes:
    return seal(b'{"t":21.5}', keys=derive(secret, DEV_A, epoch, Direction.UP), seq=seq,
                route="t/up", timestamp_ms=None)


def test_offline_device_gets_the_same_offer_later() -> None:
    key = DeviceKemKey.generate()
    old_secret, new_secret = os.urandom(32), os.urandom(32)
    state = RenewalState(DEV_A, 4)
    assert state.accepted_epochs() == (4,)
    state = state.with_offer(make_offer(DEV_A, key.public_key(), 4, new_secret))
    assert state.phase is Phase.PENDING and state.accepted_epochs() == (4, 5)
    # The device is offline; the server restarts and keeps only the stored state.
    state = RenewalState.from_cbor(state.to_cbor())
    # Meanwhile the device still sends under epoch 4: the renewal stays pending.
    assert state.verified(4) is state
    # The device comes back: same bytes re-delivered, inside the downlink envelope of epoch 4
    # (which is what authenticates the cloud: HPKE base mode does not).
    carrier = seal(state.delivery(), keys=derive(old_secret, DEV_A, 4, Direction.DOWN), seq=1,
                   route="renewal", timestamp_ms=None)
    opened = unseal(carrier, route="renewal", now_ms=0, contexts=lambda d, e: SecurityContext
                    .from_secret(old_secret, d, e, Direction.DOWN))
    epoch, secret = accept_offer(opened.payload, key, DEV_A, 4)
    assert (epoch, secret) == (5, new_secret)
    # Its first message under epoch 5 verifies with the pending secret: proof of possession.
    ctx = SecurityContext.from_secret(new_secret, DEV_A, 5, Direction.UP)
    msg = unseal(_proof(secret, 5, 0), route="t/up", now_ms=0, contexts=lambda d, e: ctx)
    state = state.verified(msg.epoch)
    assert state.phase is Phase.CONFIRMED and state.current_epoch == 5
    assert state.accepted_epochs() == (5,)
    with pytest.raises(Rejected) as info:
        state.verified(4)  # the old epoch is gone once the new one is proven
    assert info.value.reason is RejectReason.UNKNOWN_EPOCH
    with pytest.raises(ConfigError):
        state.delivery()


def test_new_offer_supersedes() -> None:
    key = DeviceKemKey.generate()
    first, second = os.urandom(32), os.urandom(32)
    state = RenewalState(DEV_A, 0).with_offer(make_offer(DEV_A, key.public_key(), 0, first))
    offer2 = make_offer(DEV_A, key.public_key(), 0, second)
    state = state.with_offer(offer2)
    assert state.delivery() == offer2 and state.offers_made == 2
    assert accept_offer(state.delivery(), key, DEV_A, 0) == (1, second)
    state = state.verified(1)
    assert state.current_epoch == 1
    # A re-delivered superseded offer is refused by a device that moved on.
    with pytest.raises(Rejected) as info:
        accept_offer(offer2, key, DEV_A, 1)
    assert info.value.reason is RejectReason.UNKNOWN_EPOCH


def test_state_refuses_foreign_offers() -> None:
    key = DeviceKemKey.generate()
    state = RenewalState(DEV_A, 2)
    with pytest.raises(ConfigError):
        state.with_offer(make_offer(DEV_B, key.public_key(), 2, bytes(32)))
    with pytest.raises(ConfigError):
        state.with_offer(make_offer(DEV_A, key.public_key(), 1, bytes(32)))
    with pytest.raises(ConfigError):
        state.with_offer(b"junk")
    with pytest.raises(Rejected):
        state.verified(3)  # nothing pending: epoch 3 is unknown
    with pytest.raises(ConfigError):
        RenewalState.from_cbor(b"\xa0")


def test_hpke_module_shape_is_what_we_rely_on() -> None:
    """Guards the assumption that Suite.encrypt returns enc || ciphertext (RFC 9180 single shot)."""
    key = DeviceKemKey.generate()
    out = RenewalSuite.X25519.hpke_suite().encrypt(b"x" * 32, key.public_key().key(), info=b"i")
    assert len(out) == 32 + 32 + 16
    assert isinstance(RenewalSuite.X25519.hpke_suite(), hpke.Suite)
