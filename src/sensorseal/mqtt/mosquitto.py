"""Run a private Mosquitto 2.x with the dynamic security plugin, and render production configs.

Why this exists: sensorseal treats every broker as hostile (the envelope protects content), but
broker-side authentication and ACLs are defence in depth, and the broker must not lose what it
acknowledged. Mosquitto's default `max_queued_messages 1000` silently DROPS QoS 1 messages for a
slow subscriber while the publisher already got its PUBACK; every config rendered here sets
`max_queued_messages 0` (no count limit) so an acknowledged message is delivered or kept.

`MosquittoProcess` starts a real broker on free ports of 127.0.0.1 (a plain listener and
optionally a TLS 1.2+ listener with a generated CA), with `per_listener_settings false` and the
dynamic security plugin, whose JSON file we write ourselves with an admin user hashed the way the
plugin expects (PBKDF2-HMAC-SHA512). `render_config()` produces the same settings for operators
(docs/brokers.md shows one).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import getpass
import glob
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sensorseal.core.errors import ConfigError

__all__ = [
    "ADMIN_USERNAME",
    "DEFAULT_MAX_INFLIGHT",
    "MosquittoProcess",
    "TlsFiles",
    "TlsListener",
    "dynsec_file_content",
    "find_binary",
    "find_dynsec_plugin",
    "free_port",
    "install_hint",
    "make_ca_and_cert",
    "render_config",
]

MOSQUITTO_BIN = "/usr/sbin/mosquitto"
ADMIN_USERNAME = "sensorseal-admin"
# Per client, messages "in flight" (QoS 1/2 sent, not yet acknowledged). Mosquitto's default is
# 20; a larger window keeps a fast subscriber busy without letting one client hog the broker.
DEFAULT_MAX_INFLIGHT = 100
# The iteration count the dynsec plugin of Mosquitto 2.0 uses for passwords it hashes itself.
# Our passwords are 256-bit random/HKDF outputs, so the count adds no meaningful strength.
_DYNSEC_ITERATIONS = 101


def install_hint() -> str:
    """What an operator runs to get the broker binary and the dynamic security plugin."""
    return "apt-get install -y mosquitto   (Debian/Ubuntu; provides mosquitto 2.x and dynsec)"


def find_binary() -> str | None:
    """Path of the mosquitto binary, or None if it is not installed."""
    if os.access(MOSQUITTO_BIN, os.X_OK):
        return MOSQUITTO_BIN
    return shutil.which("mosquitto")


def find_dynsec_plugin() -> str | None:
    """Path of mosquitto_dynamic_security.so (Debian puts it in the multiarch dir)."""
    # Fixed depths only: a recursive walk of /usr/lib takes minutes on some hosts.
    for pattern in ("/usr/lib/*/mosquitto_dynamic_security.so",
                    "/usr/lib/mosquitto_dynamic_security.so",
                    "/usr/lib/*/mosquitto/mosquitto_dynamic_security.so",
                    "/usr/local/lib/mosquitto_dynamic_security.so",
                    "/usr/local/lib/*/mosquitto_dynamic_security.so"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a small PKI: a CA and one server certificate signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sensorseal"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_cert(directory: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     ca_name: str = "sensorseal test CA", days: int = 2) -> TlsFiles:
    """Write a fresh CA and a server certificate for `hosts` (DNS names or IPs) into `directory`.

    ECDSA P-256 keys; the server key file is mode 0600. For tests and quick starts only: a
    production CA lives elsewhere.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name)).issuer_name(_name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = srv_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    fd = os.open(files.server_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return files


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class TlsListener:
    """A TLS listener: port plus PEM paths. `require_client_cert` turns on mutual TLS."""

    port: int
    cafile: Path
    certfile: Path
    keyfile: Path
    require_client_cert: bool = False


def render_config(*, port: int | None, bind: str = "127.0.0.1", tls: TlsListener | None = None,
                  dynsec_plugin: str | None, dynsec_file: Path | None,
                  persistence_dir: Path | None = None, log_file: Path | None = None,
                  max_queued_messages: int = 0,
                  max_inflight_messages: int = DEFAULT_MAX_INFLIGHT,
                  run_as_user: str | None = None) -> str:
    """A mosquitto.conf for sensorseal.

    `port=None` omits the plain listener (production: TLS only). `persistence_dir=None` turns
    persistence off (a broker restart then loses queued messages; the devices' own buffers and
    the envelope's sequence numbers cover that). `max_queued_messages=0` means no count limit:
    anything else makes Mosquitto drop acknowledged QoS 1 messages once a slow subscriber's queue
    is full. Memory is then bounded by the host, not by silent loss; watch the broker's RSS.
    """
    if max_queued_messages < 0 or max_inflight_messages < 0:
        raise ConfigError("queue limits are non-negative")
    if (dynsec_plugin is None) != (dynsec_file is None):
        raise ConfigError("dynsec_plugin and dynsec_file go together")
    lines = [
        "# Generated by sensorseal. See docs/brokers.md.",
        "per_listener_settings false",
        "allow_anonymous false",
        # 0 = no limit. Mosquitto's default (1000) drops QoS 1 messages it already PUBACKed.
        f"max_queued_messages {max_queued_messages}",
        "max_queued_bytes 0",
        f"max_inflight_messages {max_inflight_messages}",
        "set_tcp_nodelay true",
        "connection_messages true",
    ]
    if run_as_user:
        lines.append(f"user {run_as_user}")
    if persistence_dir is None:
        lines.append("persistence false")
    else:
        lines += ["persistence true", f"persistence_location {persistence_dir}/",
                  "autosave_interval 30"]
    if log_file is None:
        lines.append("log_dest stderr")
    else:
        lines.append(f"log_dest file {log_file}")
    lines += ["log_type error", "log_type warning", "log_type notice", "log_type information",
              "log_timestamp_format %Y-%m-%dT%H:%M:%S"]
    if dynsec_plugin is not None:
        lines += [f"plugin {dynsec_plugin}", f"plugin_opt_config_file {dynsec_file}"]
    if port is not None:
        lines += ["", f"listener {port} {bind}", "protocol mqtt"]
    if tls is not None:
        lines += ["", f"listener {tls.port} {bind}", "protocol mqtt",
                  f"cafile {tls.cafile}", f"certfile {tls.certfile}", f"keyfile {tls.keyfile}",
                  # In Mosquitto 2.x this is the minimum version: 1.2 and 1.3 are accepted.
                  "tls_version tlsv1.2",
                  f"require_certificate {'true' if tls.require_client_cert else 'false'}"]
    return "\n".join(lines) + "\n"


def _pbkdf2_sha512(password: str, salt: bytes, iterations: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA512(), length=64, salt=salt, iterations=iterations)
    return kdf.derive(password.encode())


def dynsec_file_content(admin_username: str, admin_password: str) -> dict[str, Any]:
    """The initial dynamic-security.json: one admin allowed to drive `$CONTROL/dynamic-security`
    and to read everything (tests use it as the all-seeing subscriber). Same shape as
    `mosquitto_ctrl dynsec init` writes, without needing that tool."""
    salt = secrets.token_bytes(12)
    digest = _pbkdf2_sha512(admin_password, salt, _DYNSEC_ITERATIONS)
    control = "$CONTROL/dynamic-security/#"
    acls = [
        ("publishClientSend", control), ("publishClientReceive", control),
        ("subscribePattern", control), ("publishClientReceive", "$SYS/#"),
        ("subscribePattern", "$SYS/#"), ("publishClientReceive", "#"),
        ("subscribePattern", "#"), ("unsubscribePattern", "#"),
    ]
    return {
        "clients": [{
            "username": admin_username, "textName": "sensorseal broker admin",
            "password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": _DYNSEC_ITERATIONS, "roles": [{"rolename": "sensorseal-admin"}],
        }],
        "roles": [{"rolename": "sensorseal-admin",
                   "acls": [{"acltype": t, "topic": topic, "allow": True} for t, topic in acls]}],
        "groups": [],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
    }


# --------------------------------------------------------------------------- the process


@dataclass(eq=False)
class MosquittoProcess:
    """A private Mosquitto on free ports of 127.0.0.1, configured in `workdir`.

    Use as a context manager, or call start()/stop(). Ports stay the same across restart() so
    clients can reconnect. The admin password is random per instance and never shown in repr.
    """

    workdir: Path
    tls: bool = False
    dynsec: bool = True
    persistence: bool = False
    max_queued_messages: int = 0
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT
    binary: str | None = None
    host: str = "127.0.0.1"
    port: int = field(init=False, default=0)
    tls_port: int | None = field(init=False, default=None)
    tls_files: TlsFiles | None = field(init=False, default=None)
    admin_username: str = field(init=False, default=ADMIN_USERNAME)
    admin_password: str = field(init=False, repr=False, default="")
    _proc: subprocess.Popen[bytes] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_password = secrets.token_urlsafe(32)
        self.port = free_port(self.host)
        if self.tls:
            self.tls_port = free_port(self.host)
            self.tls_files = make_ca_and_cert(self.workdir / "tls")

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def dynsec_path(self) -> Path:
        return self.workdir / "dynamic-security.json"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        """The broker log so far (for test failure messages; it holds no passwords)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _write_config(self) -> None:
        plugin: str | None = None
        dynsec_file: Path | None = None
        if self.dynsec:
            plugin = find_dynsec_plugin()
            if plugin is None:
                raise ConfigError("mosquitto_dynamic_security.so not found under /usr/lib; "
                                  + install_hint())
            dynsec_file = self.dynsec_path
            if not dynsec_file.exists():
                content = dynsec_file_content(self.admin_username, self.admin_password)
                fd = os.open(dynsec_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    json.dump(content, fh, indent=1)
        persistence_dir = self.workdir / "data" if self.persistence else None
        if persistence_dir is not None:
            persistence_dir.mkdir(exist_ok=True)
        tls = None
        if self.tls_files is not None and self.tls_port is not None:
            tls = TlsListener(self.tls_port, self.tls_files.ca_cert, self.tls_files.server_cert,
                              self.tls_files.server_key)
        text = render_config(
            port=self.port, bind=self.host, tls=tls, dynsec_plugin=plugin, dynsec_file=dynsec_file,
            persistence_dir=persistence_dir, log_file=self.log_path,
            max_queued_messages=self.max_queued_messages,
            max_inflight_messages=self.max_inflight_messages,
            # When started as root, Mosquitto switches to user "mosquitto", which could not
            # write our files; staying as the current user keeps the work dir private.
            run_as_user=getpass.getuser(),
        )
        self.config_path.write_text(text)

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Write the config, start the broker, and wait until every listener accepts."""
        if self._proc is not None and self._proc.poll() is None:
            raise ConfigError("mosquitto is already running")
        binary = self.binary or find_binary()
        if binary is None:
            raise ConfigError("mosquitto binary not found; " + install_hint())
        self._write_config()
        with open(self.workdir / "stderr.log", "ab") as stderr:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, our own config path
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,
            )
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if self._proc.poll() is not None:
                raise ConfigError(f"mosquitto exited with {self._proc.returncode}; log:\n"
                                  + self.log_text()[-2000:])
            if time.monotonic() > deadline:
                self.kill()
                raise ConfigError(f"mosquitto did not listen on {pending} within {timeout}s")
            try:
                with socket.create_connection((self.host, pending[0]), timeout=0.2):
                    pending.pop(0)
            except OSError:
                time.sleep(0.02)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients and persistence can tell."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(5)

    def restart(self, *, hard: bool = False, timeout: float = 10.0) -> MosquittoProcess:
        """Stop (or kill, if `hard`) and start again on the same ports."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoProcess:
        if not self.running():
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):
            self.stop()
