"""Driving the system's headless Chromium over the DevTools protocol, for the editor's end-to-end test.

The Debian `chromium` package is used as installed: no test tool downloads a browser here. The
protocol needs nothing beyond aiohttp's WebSocket client, which the server already depends on.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """The browser to drive: $CHROMIUM, else the first of the usual names on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    """The browser failed to start, a command failed, or the page threw."""


ALT, CTRL, META, SHIFT = 1, 2, 4, 8  # DevTools key event modifiers


class Page:
    """One browser tab: navigate, evaluate JavaScript, type, screenshot."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + data["params"]["exceptionDetails"].get("text", ""))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        command_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        await self._socket.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {details.get('exception', {}).get('description', details['text'])}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll until the expression is truthy; returns its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise BrowserError(f"timed out waiting for {what or expression}; console: {self.console[-10:]}")
            await asyncio.sleep(0.1)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def type_into(self, selector: str, text: str) -> None:
        """Replace the text of an input or textarea as a user would: focus, select all, type."""
        found = await self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                                    f" if (!e) return false; e.focus(); e.select(); return true; }})()")
        if not found:
            raise BrowserError(f"no element {selector}")
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        if not await self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                                   f" if (!e) return false; e.click(); return true; }})()"):
            raise BrowserError(f"no element {selector}")

    async def press(self, key: str, code: str, key_code: int, modifiers: int = 0) -> None:
        """Press and release a key, as a user at the keyboard would; `modifiers`: the sum of CTRL, SHIFT, ..."""
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                            modifiers=modifiers)

    async def shortcut(self, letter: str, modifiers: int = 2) -> None:
        """A letter with modifiers (Ctrl by default): Ctrl+B is shortcut("b")."""
        await self.press(letter, f"Key{letter.upper()}", ord(letter.upper()), modifiers)

    async def mouse_click(self, point: tuple[float, float], button: str = "left", count: int = 1,
                          modifiers: int = 0) -> None:
        """Click (count 2: double-click) at a point in page coordinates, as the mouse does; `modifiers`
        held (SHIFT for a shift-click)."""
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=point[0], y=point[1], modifiers=modifiers)
        buttons = {"left": 1, "right": 2, "middle": 4}[button]
        for n in range(1, count + 1):
            await self.send("Input.dispatchMouseEvent", type="mousePressed", x=point[0], y=point[1], button=button,
                            buttons=buttons, clickCount=n, modifiers=modifiers)
            await self.send("Input.dispatchMouseEvent", type="mouseReleased", x=point[0], y=point[1], button=button,
                            buttons=0, clickCount=n, modifiers=modifiers)

    async def hold(self, key: str, down: bool) -> None:
        """Press (down) or release a modifier key: "Shift", "Control"."""
        code = {"Shift": ("ShiftLeft", 16, SHIFT), "Control": ("ControlLeft", 17, CTRL)}[key]
        await self.send("Input.dispatchKeyEvent", type="rawKeyDown" if down else "keyUp", key=key, code=code[0],
                        windowsVirtualKeyCode=code[1], modifiers=code[2] if down else 0)

    async def type_keys(self, text: str) -> None:
        """Type into the focused element one character at a time, each its own input event."""
        for character in text:
            await self.send("Input.insertText", text=character)

    async def centre(self, selector: str) -> tuple[float, float]:
        """The middle of an element, in page coordinates."""
        box = await self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                                  " if (!e) return null; const r = e.getBoundingClientRect();"
                                  " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        if box is None:
            raise BrowserError(f"no element {selector}")
        return box[0], box[1]

    async def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """Press the left button at `start`, move to `end` in steps, release there."""
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=start[0], y=start[1])
        await self.send("Input.dispatchMouseEvent", type="mousePressed", x=start[0], y=start[1], button="left",
                        buttons=1, clickCount=1)
        for step in range(1, steps + 1):
            x = start[0] + (end[0] - start[0]) * step / steps
            y = start[1] + (end[1] - start[1]) * step / steps
            await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        await self.send("Input.dispatchMouseEvent", type="mouseReleased", x=end[0], y=end[1], button="left",
                        buttons=0, clickCount=1)

    async def screenshot(self, path: Path) -> None:
        data = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        await self._socket.close()


class Browser:
    """A headless Chromium process with one page; use `async with Browser(path, profile) as page:`."""

    def __init__(self, executable: str, profile_dir: Path, width: int = 1500, height: int = 940) -> None:
        self.executable = executable
        self.profile_dir = profile_dir
        self.size = (width, height)
        self._process: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._page: Page | None = None

    async def __aenter__(self) -> Page:
        self._process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile_dir}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        endpoint = await asyncio.wait_for(asyncio.to_thread(self._devtools_address), 60)
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://{endpoint}/json/list") as response:
            targets = await response.json(content_type=None)
        page_target = next(t for t in targets if t["type"] == "page")
        socket = await self._session.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=0)
        self._page = Page(socket)
        await self._page.send("Page.enable")
        await self._page.send("Runtime.enable")
        # A headless tab is never the focused window; without this, typed text goes nowhere.
        await self._page.send("Emulation.setFocusEmulationEnabled", enabled=True)
        await self._page.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                              deviceScaleFactor=1, mobile=False)
        return self._page

    def _devtools_address(self) -> str:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            found = re.search(r"DevTools listening on ws://([^/]+)/", line)
            if found:
                # Keep reading, or a chatty browser would fill the pipe and stall.
                threading.Thread(target=self._process.stderr.read, daemon=True).start()
                return found.group(1)
        raise BrowserError(f"{self.executable} exited without opening the DevTools port (code {self._process.wait()})")

    async def __aexit__(self, *exc_info: object) -> None:
        if self._page is not None:
            await self._page.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 10)
            except subprocess.TimeoutExpired:
                self._process.kill()
