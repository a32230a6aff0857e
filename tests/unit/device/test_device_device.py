"""Device: what it seals opens with the core; it never repeats a seq; downlink refuses replays."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sensorseal.core.context import SecurityContext
from sensorseal.core.credential import DeviceCredential
from sensorseal.core.envelope import Opened, parse, seal, unseal
from sensorseal.core.errors import ConfigError, Rejected, RejectReason
from sensorseal.core.ids import DeviceId, Direction, Level
from sensorseal.core.keys import Alg, derive
from sensorseal.core.policy import PRESETS
from sensorseal.device import Device

NOW = 1_760_000_000_000


def make_cred(seed: int = 1, epoch: int = 0) -> DeviceCredential:
    return DeviceCredential(DeviceId(bytes([seed]) * 12), epoch, bytes([seed + 100]) * 32)


class Server:
    """The receiving side as the core defines it: one context per (device, epoch), a big window
    and, as the store's unique key would, a set of every seq ever accepted."""

    def __init__(self, cred: DeviceCredential, policy_name: str = "lax") -> None:
        self.ctx = SecurityContext.from_secret(cred.secret, cred.device_id, cred.epoch,
                                               Direction.UP, PRESETS[policy_name])
        self.cred = cred
        self.accepted: set[int] = set()

    def contexts(self, device_id: DeviceId, epoch: int) -> SecurityContext:
        if device_id != self.cred.device_id or epoch != self.cred.epoch:
            raise Rejected(RejectReason.UNKNOWN_DEVICE)
        return self.ctx

    def open(self, data: bytes, route: str = "/v1/messages") -> Opened:
        seq = parse(data).seq
        if seq in self.accepted:  # the store's unique key (device, epoch, seq)
            raise Rejected(RejectReason.REPLAY, "store")
        opened = unseal(data, route=route, contexts=self.contexts, now_ms=NOW)
        self.accepted.add(opened.seq)
        return opened


def test_sealed_envelope_opens_with_the_core(tmp_path: Path) -> None:
    cred = make_cred()
    server = Server(cred, "stringent")
    with Device(cred, tmp_path, clock_ms=lambda: NOW) as dev:
        data = dev.seal(b"t=21.5", route="/v1/messages")
    opened = server.open(data)
    assert opened.payload == b"t=21.5"
    assert (opened.device_id, opened.epoch, opened.seq) == (cred.device_id, 0, 1)
    assert opened.level is Level.SEALED and opened.alg == Alg.A256GCM
    assert opened.timestamp_ms == NOW and opened.direction is Direction.UP
    assert b"t=21.5" not in data


def test_route_is_bound(tmp_path: Path) -> None:
    cred = make_cred()
    with Device(cred, tmp_path) as dev:
        data = dev.seal(b"x", route="/v1/messages")
    with pytest.raises(Rejected) as ei:
        Server(cred).open(data, route="/v1/other")
    assert ei.value.reason is RejectReason.DECRYPT_FAILED


def test_seal_json_is_compact_utf8(tmp_path: Path) -> None:
    cred = make_cred()
    with Device(cred, tmp_path) as dev:
        data = dev.seal_json({"t": 21.5, "loc": "Zürich", "ok": [1, 2]})
    payload = Server(cred).open(data).payload
    assert payload == '{"t":21.5,"loc":"Zürich","ok":[1,2]}'.encode()
    assert json.loads(payload)["loc"] == "Zürich"


def test_signed_level_and_chacha(tmp_path: Path) -> None:
    cred = make_cred()
    server = Server(cred)
    with Device(cred, tmp_path, level=Level.SIGNED) as dev:
        signed = dev.seal(b"public reading")
    opened = server.open(signed)
    assert opened.level is Level.SIGNED and opened.alg == Alg.HMAC_256_256
    assert opened.payload == b"public reading" and b"public reading" in signed
    with Device(cred, tmp_path, alg=Alg.CHACHA20_POLY1305) as dev:
        sealed = dev.seal(b"secret")
    opened = server.open(sealed)
    assert opened.alg == Alg.CHACHA20_POLY1305 and opened.seq == 2
    with pytest.raises(Rejected) as ei:
        Server(cred, "standard").open(signed)  # a policy that wants sealed refuses signed
    assert ei.value.reason is RejectReason.POLICY_VIOLATION


def test_bad_configuration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Device(make_cred(), tmp_path, alg=Alg.HMAC_256_256)
    with pytest.raises(ConfigError, match="clock"):
        Device(make_cred(), tmp_path, clock_ms=None, downlink_policy=PRESETS["stringent"])
    with pytest.raises(ConfigError):
        Device.from_credential_string("ss1.nothex.0.AAAA", tmp_path)


def test_from_credential_string_and_no_secret_in_repr(tmp_path: Path) -> None:
    cred = make_cred()
    with Device.from_credential_string(cred.encode(), tmp_path, clock_ms=None) as dev:
        text = repr(dev)
        data = dev.seal(b"x")
    assert str(cred.device_id) in text and cred.secret.hex() not in text
    assert cred.encode().split(".")[3] not in text
    opened = Server(cred).open(data)
    assert opened.timestamp_ms is None


def test_recreated_device_never_repeats_a_seq(tmp_path: Path) -> None:
    cred = make_cred()
    server = Server(cred)
    for round_no in range(6):
        dev = Device(cred, tmp_path, block_size=4)
        for _ in range(round_no + 1):
            server.open(dev.seal(b"r%d" % round_no))  # raises REPLAY on any repeat
        if round_no % 2:
            dev.close()
        else:
            del dev  # crash: nothing given back
            gc.collect()
    assert len(server.accepted) == 21


_CHILD = """
import os, signal, sys
from sensorseal.core.credential import DeviceCredential
from sensorseal.device import Device
dev = Device(DeviceCredential.parse(sys.stdin.readline()), sys.argv[1], block_size=3)
for _ in range(int(sys.argv[2])):
    print(dev.seal(b"from child").hex(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_device_process_then_restart(tmp_path: Path) -> None:
    cred = make_cred()
    server = Server(cred)
    for count in (2, 3, 4):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(count)],
                              input=cred.encode() + "\n", capture_output=True, text=True,
                              timeout=30, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        for line in proc.stdout.split():
            server.open(bytes.fromhex(line))
    with Device(cred, tmp_path, block_size=3) as dev:
        opened = server.open(dev.seal(b"after reboot"))
    assert opened.seq > max(server.accepted - {opened.seq})
    assert len(server.accepted) == 10


def test_state_layout_and_lost_files(tmp_path: Path) -> None:
    cred = make_cred()
    with Device(cred, tmp_path) as dev:
        dev.seal(b"x")
        state = dev.state_path
    assert state == tmp_path / f"{cred.device_id}-0"
    assert sorted(p.name for p in state.iterdir() if not p.name.endswith(".lock")) == [
        "down.top", "up.seq"]
    assert [p.name for p in tmp_path.iterdir()] == [state.name]  # no temp dirs left behind
    os.unlink(state / "up.seq")
    with pytest.raises(ConfigError, match="missing"):
        Device(cred, tmp_path)
    with Device(make_cred(epoch=1), tmp_path) as dev:  # a new epoch starts fresh at 1
        assert dev.counter.peek() == 1


def test_damaged_downlink_state_is_refused_and_releases_the_counter(tmp_path: Path) -> None:
    cred = make_cred()
    Device(cred, tmp_path).close()
    (tmp_path / f"{cred.device_id}-0" / "down.top").write_text("7\n")
    with pytest.raises(ConfigError, match="damaged"):
        Device(cred, tmp_path)
    with pytest.raises(ConfigError, match="damaged"):  # not "in use": the lock was released
        Device(cred, tmp_path)


class Cloud:
    """The server's downlink sender."""

    def __init__(self, cred: DeviceCredential) -> None:
        self.keys = derive(cred.secret, cred.device_id, cred.epoch, Direction.DOWN)
        self.seq = 0

    def command(self, payload: bytes, route: str = "cmd", *, level: Level = Level.SEALED,
                seq: int | None = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return seal(payload, keys=self.keys, seq=seq, route=route, timestamp_ms=NOW, level=level)


def reason(exc: pytest.ExceptionInfo[Rejected]) -> RejectReason:
    return exc.value.reason


def test_downlink_opens_and_refuses_replays(tmp_path: Path) -> None:
    cred = make_cred()
    cloud = Cloud(cred)
    with Device(cred, tmp_path, clock_ms=lambda: NOW) as dev:
        first = cloud.command(b"reboot")
        opened = dev.open_downlink(first, "cmd")
        assert opened.payload == b"reboot" and opened.direction is Direction.DOWN
        with pytest.raises(Rejected) as ei:
            dev.open_downlink(first, "cmd")
        assert reason(ei) is RejectReason.REPLAY
        assert dev.open_downlink(cloud.command(b"ping", level=Level.SIGNED), "cmd").seq == 2


def test_downlink_refuses_forgeries(tmp_path: Path) -> None:
    cred = make_cred()
    cloud = Cloud(cred)
    with Device(cred, tmp_path) as dev:
        good = cloud.command(b"open valve")
        flipped = bytearray(good)
        flipped[-1] ^= 1
        with pytest.raises(Rejected) as ei:
            dev.open_downlink(bytes(flipped), "cmd")
        assert reason(ei) is RejectReason.DECRYPT_FAILED
        with pytest.raises(Rejected) as ei:
            dev.open_downlink(good, "other-route")
        assert reason(ei) is RejectReason.DECRYPT_FAILED
        uplink = seal(b"open valve", keys=derive(cred.secret, cred.device_id, 0, Direction.UP),
                      seq=50, route="cmd", timestamp_ms=None)
        with pytest.raises(Rejected) as ei:  # an uplink message reflected back as a command
            dev.open_downlink(uplink, "cmd")
        assert reason(ei) is RejectReason.DECRYPT_FAILED
        stranger = Cloud(make_cred(seed=2)).command(b"open valve")
        with pytest.raises(Rejected) as ei:
            dev.open_downlink(stranger, "cmd")
        assert reason(ei) is RejectReason.UNKNOWN_DEVICE
        other_epoch = Cloud(make_cred(epoch=9)).command(b"open valve")
        with pytest.raises(Rejected) as ei:
            dev.open_downlink(other_epoch, "cmd")
        assert reason(ei) is RejectReason.UNKNOWN_EPOCH
        with pytest.raises(Rejected) as ei:
            dev.open_downlink(b"\xa0not cose", "cmd")
        assert reason(ei) is RejectReason.MALFORMED
        # none of the failures moved the window: the genuine message still opens
        assert dev.open_downlink(good, "cmd").payload == b"open valve"
    assert (tmp_path / f"{cred.device_id}-0" / "down.top").read_text().split()[2] == "1"


def test_downlink_replays_refused_after_reboot(tmp_path: Path) -> None:
    cred = make_cred()
    cloud = Cloud(cred)
    msgs = [cloud.command(b"c%d" % i) for i in range(1, 11)]  # seqs 1..10
    dev = Device(cred, tmp_path)
    for i in (0, 1, 2, 9):  # seqs 1, 2, 3 and 10; 4..9 still in flight
        dev.open_downlink(msgs[i], "cmd")
    late = dev.open_downlink(msgs[5], "cmd")  # reordering is fine while running
    assert late.seq == 6
    del dev  # crash
    gc.collect()
    with Device(cred, tmp_path) as dev:
        for m in msgs:  # after a reboot nothing at or below the top opens again
            with pytest.raises(Rejected) as ei:
                dev.open_downlink(m, "cmd")
            assert reason(ei) is RejectReason.REPLAY
        assert dev.open_downlink(cloud.command(b"new"), "cmd").seq == 11
