"""Helpers of the hostile-input suite: the registry its fuzzers run, a live server on a thread that
synchronous code (hypothesis, raw sockets) can send anything to, and a probe of its health check."""

from __future__ import annotations

import asyncio
import http.client
import statistics
import sys
import threading
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import counting_pack  # noqa: E402
from nodegraph.registry import NodeRegistry  # noqa: E402


UNSAFE_TO_FUZZ = {"Steps", "Blob", "ReadFile"}
"""Test nodes that would sleep, allocate or read what a fuzzed input says, however much: the fuzz
is about the engine and the server, not about nodes written to obey their tests."""


def fuzz_registry() -> NodeRegistry:
    """The counting pack without the nodes above, and the basic pack (text formatting, saving files)."""
    import nodegraph_basic

    registry = NodeRegistry()
    registry.add_pack("counting", [cls for cls in counting_pack.NODES if cls.type_name not in UNSAFE_TO_FUZZ])
    registry.add_pack("basic", nodegraph_basic.NODES)
    return registry


class LiveServer:
    """The API served on 127.0.0.1 from an event loop on a thread of its own."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-live-server", daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app)
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)

    async def _start(self) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection; returns status, headers and body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class HealthProbe:
    """Asks GET /api/health over and over from a thread of its own, keeping each answer's latency."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, name="hostile-health-probe", daemon=True)

    def _probe(self) -> None:
        while not self._stop.wait(0.01):
            started = time.perf_counter()
            try:
                status, _, _ = self.server.request("GET", "/api/health", timeout=10)
            except OSError as error:
                self.failures.append(repr(error))
                continue
            self.latencies.append(time.perf_counter() - started)
            if status != 200:
                self.failures.append(f"health answered {status}")

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.latencies)
