"""Virtualenvs for peers: COSE code that nobody here wrote, run in its own process.

Why a separate virtualenv: pycose 1.1.0 cannot decode anything under cbor2 6 (pycose issue 141)
and sensorseal pins cbor2 6, so the two cannot share an interpreter. Each peer gets a cached
virtualenv under ``<repo>/.peer-venvs/<name>`` (git-ignored; override the parent directory with
SENSORSEAL_PEER_VENVS) and speaks JSON over stdin/stdout.

Used by tests/interop/ and benchmarks/open_throughput.py. Standard library only.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PYCOSE", "PeerEnv", "PeerSpec", "ensure_peer", "run_peer"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PeerSpec:
    """A peer: its virtualenv name, what pip installs there, and a probe that must succeed."""

    name: str
    requirements: tuple[str, ...]
    probe: str  # Python code run in the venv; exit 0 means the venv is usable


PYCOSE = PeerSpec(
    name="pycose",
    requirements=("pycose==1.1.0", "cbor2<6"),
    probe="import cbor2, pycose, importlib.metadata as m; "
          "assert m.version('pycose') == '1.1.0'; "
          "assert int(m.version('cbor2').split('.')[0]) < 6",
)


@dataclass(frozen=True)
class PeerEnv:
    """The result of `ensure_peer`: a python to run, or why pip could not install the peer."""

    python: Path | None
    install_error: str = ""


def _venv_root() -> Path:
    return Path(os.environ.get("SENSORSEAL_PEER_VENVS", ROOT / ".peer-venvs"))


def _usable(python: Path, spec: PeerSpec) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", spec.probe], capture_output=True, timeout=60,
                           check=False)
    return probe.returncode == 0


def ensure_peer(spec: PeerSpec, *, timeout_s: float = 300) -> PeerEnv:
    """Create (once) and return the peer's virtualenv.

    Creating the venv must work (a failure there is a broken machine and raises); only a failing
    `pip install` is reported back, so that callers can skip with the pip output as the reason.
    A file lock keeps two concurrent test runs from building the same venv at once.
    """
    root = _venv_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / spec.name
    python = venv / "bin" / "python"
    with open(root / f".{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(python, spec):
            return PeerEnv(python)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                       capture_output=True, timeout=timeout_s)
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", *spec.requirements],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
        if pip.returncode != 0:
            return PeerEnv(None, f"pip install {' '.join(spec.requirements)} failed:\n"
                                 f"{pip.stdout[-2000:]}{pip.stderr[-2000:]}")
        if not _usable(python, spec):
            raise RuntimeError(f"peer venv {venv} installed but its probe fails")
        return PeerEnv(python)


def run_peer(python: Path, script: Path, request: dict[str, Any], *,
             timeout_s: float = 120) -> dict[str, Any]:
    """Run `script` under the peer's python with `request` as JSON on stdin; return its JSON.

    The child gets an environment without PYTHONPATH, so it cannot import sensorseal by accident.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(python), "-I", str(script)], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"peer {script.name} exited {proc.returncode}: {proc.stderr[-3000:]}")
    reply: dict[str, Any] = json.loads(proc.stdout)
    return reply
