"""The console in a real browser: Debian's Chromium, headless, driven by Playwright.

A real server (uvicorn on a free 127.0.0.1 port, the console mounted) and a real device sending
sealed readings over HTTP. An operator logs in, provisions a device, watches its readings arrive
on the live chart, revokes it, and sees the refusals of its later messages in the live events
feed. Each test saves a screenshot to test-artifacts/.

No browser is ever downloaded: the test uses /usr/bin/chromium (apt-get install chromium) and
skips locally without it; under CI=true a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sensorseal.core.credential import DeviceCredential
from sensorseal.datadir import DataDir
from sensorseal.device import Device, HttpSender
from sensorseal.operators import OperatorService, Role
from sensorseal.registry import Registry
from sensorseal.server.app import create_app
from sensorseal.server.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "browser-test-password"


def _browser_or_skip() -> None:
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install playwright; no browser download)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)


class ServerThread:
    """uvicorn on a socket bound to a free port, in a daemon thread."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", access_log=False,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(
            self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@dataclass
class Site:
    url: str
    registry: Registry
    tmp: Path


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    _browser_or_skip()
    datadir = DataDir(tmp_path / "data")
    datadir.init()
    store, keystore = datadir.open()
    registry = Registry(store, keystore)
    pipeline = Pipeline(registry, store, status_ttl_ms=200)
    app = create_app(pipeline, registry, store, token_check=datadir.check_token, console=True)
    OperatorService(store).add("admin", PASSWORD, Role.ADMIN, actor="test")
    try:
        with ServerThread(app) as server:
            yield Site(server.url, registry, tmp_path)
    finally:
        store.close()


@pytest.fixture
def browser_page(site: Site) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 860})
            page = context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def _shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def _login(page: object, site: Site) -> None:
    page.goto(site.url + "/console/login")  # type: ignore[attr-defined]
    page.fill("input[name=name]", "admin")  # type: ignore[attr-defined]
    page.fill("input[name=password]", PASSWORD)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url(site.url + "/console/")  # type: ignore[attr-defined]


def test_provision_watch_revoke_and_see_rejections(site: Site, browser_page: object) -> None:
    page: object = browser_page
    _login(page, site)
    # provision through the form; the credential is revealed once, with a QR code
    page.fill("input[name=name]", "greenhouse-7")  # type: ignore[attr-defined]
    page.fill("input[name=group]", "north")  # type: ignore[attr-defined]
    page.click("button:has-text('Provision')")  # type: ignore[attr-defined]
    secret = page.input_value("#credential")  # type: ignore[attr-defined]
    assert secret.startswith("ss1.")
    assert page.locator("img[alt^='QR code']").count() == 1  # type: ignore[attr-defined]
    _shot(page, "console-provisioned")
    cred = DeviceCredential.parse(secret)

    # open the device page, then the device sends readings over real HTTP
    page.click("text=Open the device page")  # type: ignore[attr-defined]
    device = Device(cred, site.tmp / "device-state")
    with device, HttpSender(site.url, max_retries=1) as sender:
        for i in range(6):
            result = sender.send(device.seal_json({"temp_c": 20 + i * 0.5, "rh": 40 + i}))
            assert result.accepted
            time.sleep(0.15)
        # (locators, not wait_for_function: the console's CSP forbids evaluating strings)
        page.locator("#readings tbody tr").nth(5).wait_for()  # type: ignore[attr-defined]
        page.wait_for_selector("#chart canvas")  # type: ignore[attr-defined]
        assert page.locator("#chart-empty").is_hidden()  # type: ignore[attr-defined]
        _shot(page, "console-live-telemetry")

        # revoke it (confirm dialog accepted), then its genuine messages are refused
        page.on("dialog", lambda d: d.accept())  # type: ignore[attr-defined]
        page.click("button.danger")  # type: ignore[attr-defined]
        page.wait_for_selector("text=Device revoked")  # type: ignore[attr-defined]
        assert page.locator("#status").inner_text() == "revoked"  # type: ignore[attr-defined]

        page.goto(site.url + f"/console/events?device={cred.device_id}")  # type: ignore[attr-defined]
        time.sleep(0.3)  # the revocation reaches the ingest cache (status_ttl_ms=200)
        for _ in range(2):
            assert not sender.send(device.seal_json({"temp_c": 99})).accepted
        # the live feed shows the refusals without a reload
        fresh = page.locator("#events tbody tr.fresh", has_text="revoked")  # type: ignore[attr-defined]
        fresh.nth(1).wait_for()
        _shot(page, "console-events-live")


def test_hostile_names_are_shown_not_run(site: Site, browser_page: object) -> None:
    page: object = browser_page
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    cred = site.registry.add_device(evil[:64], actor="test")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
    _login(page, site)
    assert page.locator("#fleet").inner_text().count("<script>alert(1)</script>") == 1  # type: ignore[attr-defined]
    page.goto(site.url + f"/console/devices/{cred.device_id}")  # type: ignore[attr-defined]
    assert "<script>alert(1)</script>" in page.locator("h1").inner_text()  # type: ignore[attr-defined]
    time.sleep(0.5)
    assert dialogs == []
    _shot(page, "console-escaped-name")


def test_phone_layout_and_login_rate_limit(site: Site, browser_page: object) -> None:
    page: object = browser_page
    page.set_viewport_size({"width": 390, "height": 844})  # type: ignore[attr-defined]
    for _ in range(5):
        page.goto(site.url + "/console/login")  # type: ignore[attr-defined]
        page.fill("input[name=name]", "admin")  # type: ignore[attr-defined]
        page.fill("input[name=password]", "wrong-password")  # type: ignore[attr-defined]
        page.click("button[type=submit]")  # type: ignore[attr-defined]
        assert page.locator(".alert.error").inner_text() == "Wrong name or password."  # type: ignore[attr-defined]
    page.fill("input[name=password]", PASSWORD)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    assert re.search(r"Too many failed attempts", page.locator(".alert.error").inner_text())  # type: ignore[attr-defined]
    _shot(page, "console-phone-rate-limited")
