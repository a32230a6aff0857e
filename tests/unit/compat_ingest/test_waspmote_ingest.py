"""Waspmote frames through the legacy ingest path (the gateway's entry point): accepted only
under a legacy policy, counted as weak, refusals audited."""

from __future__ import annotations

import json

import pytest
from compat_helpers import Env

from sensorseal.compat import waspmote
from sensorseal.compat.waspmote import WaspmoteKey
from sensorseal.core.errors import RejectReason

SERIAL8 = bytes.fromhex("0123456789abcdef")
SERIAL_TEXT = "0123456789ABCDEF"
PLAIN = waspmote.build_ascii(serial=SERIAL8, waspmote_id="node_01", seq=7,
                             fields=[("BAT", "93"), ("TC", "21.50")])
PASSWORDS = {128: "libelium_pass_16", 192: "a" * 24, 256: "password-for-aes-256-0123456789x"}


def add(env: Env, bits: int = 128, policy: str = "legacy", password: str | None = "") -> None:
    secret = PASSWORDS[bits] if password == "" else password
    env.registry.add_legacy_device("mote", "waspmote", external_id=SERIAL_TEXT.lower(),
                                   secret=secret, aes_bits=bits, policy=policy)


def frame(bits: int = 128, plain: bytes = PLAIN) -> bytes:
    return waspmote.build_encrypted(plain, WaspmoteKey(PASSWORDS[bits], bits), serial=SERIAL8)


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_encrypted_frame_accepted_under_legacy_and_counted(env: Env, bits: int) -> None:
    add(env, bits)
    out = env.compat.waspmote_frame(frame(bits), "lora-1")
    assert out.ok and out.weak
    [row] = env.store.telemetry()
    doc = json.loads(row.payload)
    assert row.level == "legacy:waspmote-aes-ecb" and row.route == "waspmote:lora-1"
    assert row.transport == "gateway"
    assert doc["fields"] == [["BAT", "93"], ["TC", "21.50"]] and doc["aes_bits"] == bits
    assert env.compat.stats.weak_accepted["waspmote"] == 1


def test_hex_frames_from_the_gateway(env: Env) -> None:
    add(env)
    assert env.compat.waspmote_frame(frame().hex().upper(), "xbee").ok
    assert env.compat.waspmote_frame("zz", "xbee").reason is RejectReason.MALFORMED


@pytest.mark.parametrize("policy", ["lax", "standard", "stringent"])
def test_refused_without_a_legacy_policy(env: Env, policy: str) -> None:
    add(env, policy=policy)
    assert env.compat.waspmote_frame(frame(), "n").reason is RejectReason.POLICY_VIOLATION
    assert env.store.count_telemetry() == 0


def test_bad_frames_refused_and_audited(env: Env) -> None:
    add(env)
    good = frame()
    wrong_key = waspmote.build_encrypted(PLAIN, WaspmoteKey("another_password", 128),
                                         serial=SERIAL8)
    other = waspmote.build_encrypted(PLAIN, WaspmoteKey("x", 128),
                                     serial=bytes.fromhex("0123456789abcd00"))
    cases = [
        (good[:20], "malformed"),  # truncated: length byte disagrees
        (good[:4] + bytes([good[4] + 1]) + good[5:], "malformed"),  # wrong length byte
        (good[:5 + 8] + good[5 + 8:-1], "malformed"),  # not whole blocks (and length)
        (wrong_key, "decrypt_failed"),  # bad padding / not a frame after decryption
        (other, "unknown_device"),
        (b"<=>\x00", "malformed"),
        (b"hello world", "malformed"),
        (b"<=>" + b"\x60" + b"\xff" * 2000, "oversize"),
        (PLAIN, "policy_violation"),  # plain frame under `legacy`
    ]
    for data, reason in cases:
        out = env.compat.waspmote_frame(data, "n")
        assert out.reason == reason, (reason, out)
    assert env.compat.waspmote_frame(good, "n").ok
    assert env.compat.waspmote_frame(good, "n").reason is RejectReason.REPLAY  # identical
    assert env.reasons() == [c[1] for c in cases] + ["replay"]


def test_identical_frame_accepted_again_after_the_window(env: Env) -> None:
    add(env)
    assert env.compat.waspmote_frame(frame(), "n").ok
    env.clock.now_ms += 3600 * 1000 + 1
    assert env.compat.waspmote_frame(frame(), "n").ok


def test_plain_frames_only_for_password_less_nodes_under_legacy_unsigned(env: Env) -> None:
    add(env, policy="legacy-unsigned", password=None)
    out = env.compat.waspmote_frame(PLAIN, "n")
    assert out.ok and env.store.telemetry()[0].level == "legacy:waspmote-plain"
    assert env.compat.waspmote_frame(frame(), "n").reason is RejectReason.POLICY_VIOLATION


def test_plain_frame_refused_for_a_node_with_a_password(env: Env) -> None:
    add(env, policy="legacy-unsigned")
    assert env.compat.waspmote_frame(PLAIN, "n").reason is RejectReason.POLICY_VIOLATION
    assert env.compat.waspmote_frame(frame(), "n").ok
