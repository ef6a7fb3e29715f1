"""One WebSocket client that never reads must stall nobody: every other listener gets every event,
each run's end within 5 s of the run ending, and the server holds a bounded backlog for the stalled
one, then disconnects it with a close reason."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time

import pytest

from _server_fixtures import doc, link, submit
from nodegraph.server.app import EVENTS_KEY
from nodegraph.server.event_stream import LAGGING_CLOSE_CODE, LAGGING_REASON, StreamLimits

RUNS = 3
STEPS = 7_000
"""Each run reports this many progress events: RUNS x STEPS = 21,000 events, plus the rest."""
LIMITS = StreamLimits(backlog_messages=2_000, backlog_bytes=1024 * 1024, close_grace=600, socket_send_buffer=64 * 1024)
"""Far less than the runs send, so the stalled client must overflow; a grace long enough that it can
still read its close frame when the test looks, however long the runs took."""


async def open_stalled_socket(port: int) -> socket.socket:
    """A raw WebSocket connection to /api/events with a tiny receive buffer, which then never reads."""
    loop = asyncio.get_running_loop()
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await loop.sock_connect(raw, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(raw, (f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:  # read the handshake answer only, byte by byte: nothing of the stream
        answer += await loop.sock_recv(raw, 1)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return raw


async def read_until_close_frame(raw: socket.socket) -> tuple[int, str, int]:
    """Read the stream to its close frame: (close code, reason, text frames before it)."""
    loop = asyncio.get_running_loop()
    buffer, frames = b"", 0

    async def take(count: int) -> bytes:
        nonlocal buffer
        while len(buffer) < count:
            chunk = await loop.sock_recv(raw, 1 << 20)
            assert chunk, "the connection ended without a close frame"
            buffer += chunk
        head, buffer = buffer[:count], buffer[count:]
        return head

    while True:
        first, second = await take(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", await take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await take(8))[0]
        payload = await take(length)
        opcode = first & 0x0F
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode(), frames
        frames += opcode == 0x1


class Listener:
    """A healthy client: reads everything, noting when each run's end event arrived."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ends: dict[str, tuple[dict, float]] = {}
        self.done = asyncio.Event()

    async def listen(self, client, run_ids: list[str]) -> None:
        socket = await client.ws_connect("/api/events", max_msg_size=0)
        self.ready.set()
        async for message in socket:
            event = message.json()
            self.counts[event["run_id"]] = self.counts.get(event["run_id"], 0) + 1
            if event["type"] in ("run_finished", "run_failed", "run_cancelled"):
                self.ends[event["run_id"]] = (event, time.time())
                if len(self.ends) == RUNS:
                    self.done.set()
                    break
        await socket.close()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_stalled_client_stalls_nobody_and_is_disconnected(make_client):
    client = await make_client(event_limits=LIMITS)
    hub = client.app[EVENTS_KEY]
    stalled = await open_stalled_socket(client.port)
    listeners = [Listener() for _ in range(3)]
    tasks = []
    for listener in listeners:
        listener.ready = asyncio.Event()
        tasks.append(asyncio.create_task(listener.listen(client, [])))
        await listener.ready.wait()

    run_ids = [await submit(client, doc(s=("Steps", {"steps": STEPS, "x": n}), o=("Sink", {"value": link("s", "value")})))
               for n in range(RUNS)]
    # Bounded waits on the events themselves: a timeout here means events were lost or stuck.
    await asyncio.wait_for(asyncio.gather(*(listener.done.wait() for listener in listeners)), 120)
    await asyncio.gather(*tasks)

    # run_queued, run_started, 2 x (node_started, node_finished), the progress events, the end
    per_run = 2 + 4 + STEPS + 1
    for listener in listeners:
        assert {run_id: listener.counts.get(run_id) for run_id in run_ids} == {run_id: per_run for run_id in run_ids}
        for run_id in run_ids:
            event, received = listener.ends[run_id]
            assert event["type"] == "run_finished"
            assert received - event["time"] < 5.0, f"run end arrived {received - event['time']:.1f} s late"

    # The stalled client was cut off, having held at most its backlog bound, and told why.
    assert hub.lagging_disconnects == 1
    assert hub.peak_backlog_messages <= LIMITS.backlog_messages and hub.peak_backlog_bytes <= LIMITS.backlog_bytes
    code, reason, frames = await asyncio.wait_for(read_until_close_frame(stalled), 120)
    stalled.close()
    assert (code, reason) == (LAGGING_CLOSE_CODE, LAGGING_REASON)
    assert 0 < frames < RUNS * per_run  # it got the start of the stream, then the close frame
