"""The `sensorseal` command as a user runs it: real processes, real server, real HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CMD = [sys.executable, "-m", "sensorseal"]


def run(data: Path, *args: str, check: int | None = 0,
        **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SENSORSEAL_DATA_DIR": str(data), "COLUMNS": "200"}
    proc = subprocess.run([*CMD, *args], capture_output=True, text=True, env=env, timeout=120,
                          **kw)  # type: ignore[call-overload]
    if check is not None:
        assert proc.returncode == check, (proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    out = run(d, "init").stdout
    assert "Operator API token" in out
    assert oct((d / "kek").stat().st_mode & 0o777) == "0o600"
    return d


@pytest.fixture
def server(data: Path) -> Iterator[str]:
    env = {**os.environ, "SENSORSEAL_DATA_DIR": str(data)}
    proc = subprocess.Popen([*CMD, "serve", "--http-port", "0", "--mqtt-port", "0"], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    url = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and url is None:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        url = m.group(1) if m else None
        if proc.poll() is not None:
            break
    assert url, "server did not print its URL"
    httpx.get(url + "/healthz").raise_for_status()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def add(data: Path, name: str, *extra: str) -> tuple[str, str]:
    out = json.loads(run(data, "device", "add", name, "--json", *extra).stdout)
    return out["device_id"], out["credential"]


def test_init_refuses_to_overwrite(data: Path) -> None:
    proc = run(data, "init", check=3)
    assert "already initialized" in proc.stderr


def test_commands_before_init_fail_clearly(tmp_path: Path) -> None:
    proc = run(tmp_path / "nothing", "device", "list", check=3)
    assert "init" in proc.stderr


def test_device_lifecycle(data: Path) -> None:
    did, cred = add(data, "boiler room")
    assert cred.startswith("ss1." + did)
    listing = run(data, "device", "list").stdout
    assert did in listing and "boiler room" in listing and cred.split(".")[3] not in listing
    run(data, "device", "rename", did, "boiler-2")
    assert "boiler-2" in run(data, "device", "show", did).stdout
    run(data, "device", "suspend", did)
    run(data, "device", "resume", did)
    run(data, "device", "revoke", did)
    assert "revoked" in run(data, "device", "show", did).stdout
    assert "revoked" in run(data, "device", "resume", did, check=3).stderr
    events = [json.loads(x) for x in run(data, "events", "--json").stdout.splitlines()]
    reasons = {e["reason"] for e in events}
    assert {"device_added", "device_renamed", "device_suspended", "device_resumed",
            "device_revoked"} <= reasons


@pytest.mark.parametrize("args", [
    ["device", "show", "not-an-id"],
    ["device", "add", "x", "--policy", "nonsense"],
    ["device", "list", "--limit", "0"],
])
def test_bad_arguments_exit_2(data: Path, args: list[str]) -> None:
    proc = run(data, *args, check=2)
    assert "Traceback" not in proc.stderr


def test_unknown_device_exit_3(data: Path) -> None:
    proc = run(data, "device", "show", "0" * 24, check=3)
    assert "Traceback" not in proc.stderr


def test_send_as_device_then_replay_and_revocation(data: Path, server: str,
                                                   tmp_path: Path) -> None:
    did, cred = add(data, "sensor")
    state = tmp_path / "device-state"
    out = run(data, "send", "--url", server, "--credential", cred, "--state-dir", str(state),
              '{"temp_c": 21.5}').stdout
    assert "accepted" in out
    # signed level is below the default policy (standard = sealed only)
    run(data, "send", "--url", server, "--credential", cred, "--state-dir", str(state),
        "--signed", '{"temp_c": 1}', check=1)
    assert "policy_violation" in run(data, "events", "--reason", "policy_violation").stdout
    run(data, "send", "--url", server, "--credential", cred, "--state-dir", str(state),
        "not json", check=2)
    run(data, "device", "revoke", did)
    time.sleep(1.2)
    run(data, "send", "--url", server, "--credential", cred, "--state-dir", str(state),
        '{"temp_c": 22}', check=1)
    lines = run(data, "events", "--json", "--device", did).stdout.splitlines()
    rows = [json.loads(x) for x in lines]
    assert any(r["reason"] == "revoked" for r in rows)


def test_send_to_nowhere_exit_4(data: Path, tmp_path: Path) -> None:
    _, cred = add(data, "lonely")
    proc = run(data, "send", "--url", "http://127.0.0.1:9", "--credential", cred,
               "--state-dir", str(tmp_path / "s"), "{}", check=4)
    assert "Traceback" not in proc.stderr


def test_demo_runs_and_every_attack_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SENSORSEAL_DATA_DIR", None)
    proc = subprocess.run([*CMD, "demo", "--duration", "2", "--devices", "3"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for reason in ("decrypt_failed", "replay", "unknown_device", "revoked"):
        assert reason in proc.stdout
    # the "refused" column says NO for an attack that got through (not: anywhere in the text,
    # where a random token or password may contain those two letters)
    assert re.search(r"\bNO\s*[│|]\s*$", proc.stdout, re.MULTILINE) is None
    assert re.search(r"http://127\.0\.0\.1:\d+", proc.stdout)
