"""Real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven over W3C WebDriver.

The protocol is a handful of JSON requests to chromedriver, so no client library is needed: open a page,
fill a field, click, read the DOM. Browser downloads do not work here; the Debian packages do.
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

#: The WebDriver id of an element in JSON answers.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when the Debian packages are not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class Browser:
    """One WebDriver session."""

    def __init__(self, base: str, session_id: str) -> None:
        self._session = f"{base}/session/{session_id}"
        self._http = httpx.Client(base_url=self._session, timeout=60)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        answer = response.json()
        if response.status_code != 200:
            raise AssertionError(f"WebDriver {method} {path}: {answer.get('value')}")
        return answer["value"]

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def source(self) -> str:
        return str(self._call("GET", "/source"))

    def title(self) -> str:
        return str(self._call("GET", "/title"))

    def find(self, css: str) -> str:
        return str(self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def wait_for(self, css: str, timeout: float = 30.0) -> str:
        """The first element matching ``css`` once the page shows one (a form submit navigates first)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_all(css)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no element {css!r} within {timeout:.0f} s:\n{self.source()[:2000]}")
            time.sleep(0.2)

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(e[ELEMENT]) for e in found]

    def text(self, element: str) -> str:
        return str(self._call("GET", f"/element/{element}/text"))

    def type(self, element: str, value: str) -> None:
        self._call("POST", f"/element/{element}/value", {"text": value})

    def click(self, element: str) -> None:
        self._call("POST", f"/element/{element}/click", {})

    def screenshot_png(self) -> bytes:
        import base64

        return base64.b64decode(self._call("GET", "/screenshot"))

    def close(self) -> None:
        """Ends the session, which makes chromedriver quit the browser. The session's own URL, not the
        client's base (httpx would add a trailing slash, which chromedriver answers with 404, and the browser
        would outlive the test)."""
        try:
            self._call("DELETE", self._session)
        finally:
            self._http.close()


def _free_port() -> int:
    """A loopback port free in both families: chromedriver listens on 127.0.0.1 and on ::1, and exits when
    either is taken (CI saw "IPv6 port not available. Exiting..." for a port probed on IPv4 alone)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET6) as s6:
                s6.bind(("::1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            # No IPv6 loopback here (EADDRNOTAVAIL, EAFNOSUPPORT): chromedriver will not listen on it either.
        return port
    raise AssertionError("no loopback port was free in both IPv4 and IPv6")


def _start_driver(driver_bin: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """chromedriver on a free loopback port, ready; started again on another port if it exits at once (a
    port taken between the probe and its bind)."""
    for _ in range(3):
        port = _free_port()
        with log_path.open("ab") as log:
            driver = subprocess.Popen(
                [driver_bin, f"--port={port}", "--allowed-ips=127.0.0.1"], stdout=log, stderr=log
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while driver.poll() is None:
            try:
                if httpx.get(f"{base}/status", timeout=2).json()["value"]["ready"]:
                    return driver, base
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.time() > deadline:
                driver.kill()
                driver.wait(10)
                raise AssertionError("chromedriver did not start")
            time.sleep(0.1)
    raise AssertionError(f"chromedriver did not start: it exited three times ({log_path})")


@contextmanager
def headless_chromium(profile: Path) -> Iterator[Browser]:
    """chromedriver on a free loopback port and a headless Chromium session that accepts the test's
    self-signed certificate; both are stopped afterwards."""
    paths = chromium_paths()
    if paths is None:
        raise AssertionError("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    browser_bin, driver_bin = paths
    log_path = profile.parent / "chromedriver.log"
    driver, base = _start_driver(driver_bin, log_path)
    try:
        capabilities = {
            "browserName": "chrome",
            "acceptInsecureCerts": True,  # the hub's self-signed test certificate
            "goog:chromeOptions": {
                "binary": browser_bin,
                # --no-sandbox: the tests run as root, where Chromium's sandbox cannot start.
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    f"--user-data-dir={profile}",
                    "--window-size=1280,1000",
                ],
            },
        }
        answer = httpx.post(
            f"{base}/session", json={"capabilities": {"alwaysMatch": capabilities}}, timeout=120
        ).json()
        if "sessionId" not in answer.get("value", {}):
            raise AssertionError(f"chromium did not start: {answer.get('value')}")
        browser = Browser(base, answer["value"]["sessionId"])
        try:
            yield browser
        finally:
            browser.close()
    finally:
        driver.terminate()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait(10)
