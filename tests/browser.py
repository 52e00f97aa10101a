"""Headless Chromium driven over the DevTools protocol, for the dashboard test (no Selenium, no driver binary).

Debian's `chromium` is started with `--remote-debugging-port=0`; the port it picks is read from the profile's
`DevToolsActivePort` file, and one page is driven through its websocket (`websocket-client`).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import websocket


def chromium_binary() -> str | None:
    """Debian's `chromium` (or Chrome) if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """One headless Chromium with one page; `close()` (or `with`) stops it.

    Args:
        profile: An empty directory for the browser profile.
        width, height: The viewport in CSS pixels.
    """

    def __init__(self, profile: Path, *, width: int = 1280, height: int = 1500):
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("no chromium: apt-get install chromium")
        profile.mkdir(parents=True, exist_ok=True)
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=dict(os.environ, HOME=str(profile)))
        self._ids = itertools.count(1)
        try:
            port = self._port(profile / "DevToolsActivePort")
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                     if t["type"] == "page"]
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                                  suppress_origin=True)
        except BaseException:
            self.process.kill()
            raise

    def _port(self, file: Path, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if file.exists() and (text := file.read_text().split()):
                return int(text[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict:
        """Send one DevTools command and return its result (events in between are dropped)."""
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll until `expression` is truthy (an exception counts as not yet: the page may be loading)."""
        deadline, error = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                if value := self.evaluate(expression):
                    return value
            except RuntimeError as exc:
                error = exc
            time.sleep(0.2)
        raise AssertionError(f"still false after {timeout} s: {expression} (last error: {error})")

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        """A mouse event at viewport coordinates (`mouseMoved`, `mousePressed`, `mouseReleased`)."""
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.mouse(kind, x, y, button="left" if kind != "mouseMoved" else "none", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        """Save the whole page as PNG."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
