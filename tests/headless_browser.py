"""A real headless Chromium (Debian's `chromium`, installed by `make test`) driven through the
DevTools protocol over a WebSocket (aiohttp), for tests that must see a page as a browser
renders it: its DOM after scripts ran, every request it made, and a screenshot.

Waits have no deadline of their own (like tests/waiting.py): on a busy machine they take longer,
and a browser that really hangs is ended by pytest-timeout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise AssertionError("Debian's chromium is needed for this test: run `make test` as root "
                             "(it installs it), or `apt-get install chromium`")
    return path


class Browser:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self.requests: list[str] = []  # every URL the page asked for
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._events: dict[str, list[asyncio.Future]] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "Browser":
        self.proc = await asyncio.create_subprocess_exec(
            chromium_path(), *FLAGS, f"--user-data-dir={self.profile.name}", "--window-size=1280,900", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        endpoint = await self._devtools_url()
        port = int(re.search(r":(\d+)/", endpoint).group(1))
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [target for target in await response.json() if target["type"] == "page"]
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Network.enable")
        await self.send("Page.enable")
        return self

    async def _devtools_url(self) -> str:
        while True:  # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
            line = await self.proc.stderr.readline()
            if not line:
                raise AssertionError("chromium exited before DevTools started")
            match = re.search(rb"DevTools listening on (ws://\S+)", line)
            if match:
                asyncio.create_task(self._drain_stderr())
                return match.group(1).decode()

    async def _drain_stderr(self) -> None:
        while await self.proc.stderr.readline():
            pass

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._ws is not None:
                try:
                    await asyncio.wait_for(self.send("Browser.close"), timeout=5)
                except Exception:
                    pass
                await self._ws.close()
        finally:
            if self._reader is not None:
                self._reader.cancel()
            if self._session is not None:
                await self._session.close()
            if self.proc is not None and self.proc.returncode is None:
                try:
                    await asyncio.wait_for(self.proc.wait(), timeout=10)
                except asyncio.TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
            self.profile.cleanup()

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(AssertionError(f"DevTools error: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            method = data.get("method")
            if method == "Network.requestWillBeSent":
                self.requests.append(data["params"]["request"]["url"])
            for future in self._events.pop(method, []):
                if not future.done():
                    future.set_result(data.get("params", {}))

    async def send(self, method: str, **params: Any) -> dict:
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return await future

    def event(self, method: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._events.setdefault(method, []).append(future)
        return future

    async def open(self, url: str) -> None:
        loaded = self.event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        await loaded

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """Until `expression` is truthy in the page (scripts update it as events arrive)."""
        while not (value := await self.evaluate(expression)):
            await asyncio.sleep(0.05)
        return value

    async def screenshot(self, path: Path, width: int = 1280) -> None:
        height = await self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=int(height), deviceScaleFactor=1, mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
