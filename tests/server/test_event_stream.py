"""Event delivery: each client's own bounded outbox, previews dropped before state events, a client
too far behind disconnected with a reason while the others go on."""

from __future__ import annotations

import asyncio

import pytest

from nodegraph.server.event_stream import LAGGING_CLOSE_CODE, LAGGING_REASON, EventHub, StreamLimits


class FakeRequest:
    remote = "test"
    transport = None


class RecordingSocket:
    """Sends at once, or (stuck) holds the first send until released, as a socket whose client stopped reading."""

    def __init__(self, stuck: bool = False) -> None:
        self.sent: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not stuck:
            self.release.set()
        self.progress = asyncio.Condition()
        self.closed_with: tuple[int, str] | None = None
        self.closed = False

    async def send_str(self, text: str) -> None:
        self.entered.set()
        await self.release.wait()
        async with self.progress:
            self.sent.append(text)
            self.progress.notify_all()

    async def wait_sent(self, count: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.sent) >= count)

    async def close(self, code: int, message: bytes) -> bool:
        self.closed_with = (code, message.decode())
        self.closed = True
        return True


@pytest.mark.asyncio
async def test_previews_go_before_state_events_then_the_client_goes_and_the_others_get_everything():
    hub = EventHub(StreamLimits(backlog_messages=5, backlog_bytes=10**6, preview_backlog=3, close_grace=5))
    messages = ["s1", "p1", "p2", "p3", "s2", "s3", "s4", "p4", "s5", "s6", "s7"]
    healthy_socket = RecordingSocket()
    healthy = hub.connect(healthy_socket, FakeRequest(), "first")
    stuck_socket = RecordingSocket(stuck=True)
    stuck = hub.connect(stuck_socket, FakeRequest(), "first")
    await stuck_socket.entered.wait()  # its sender holds "first": the socket is full from here on

    async def publish(text: str) -> None:
        hub.publish(text, preview=text.startswith("p"))
        await healthy_socket.wait_sent(1 + messages.index(text) + 1)  # the healthy client keeps up

    for text in messages[:7]:  # s1 p1 p2 p3 s2 fill the outbox to 5; s3 makes room by dropping p1-p3
        await publish(text)
    assert [text for text, _ in stuck._outbox] == ["s1", "s2", "s3", "s4"]
    await publish("p4")  # 4 waiting >= preview_backlog: not queued
    await publish("s5")
    assert stuck in hub.clients and stuck.dropped_previews == 4
    await publish("s6")  # outbox full of state events: s7 cannot fit
    await publish("s7")
    assert stuck not in hub.clients and hub.lagging_disconnects == 1

    stuck_socket.release.set()
    await stuck.closing
    await stuck.sender  # ends after the send it was stuck in, sending nothing more
    assert stuck_socket.closed_with == (LAGGING_CLOSE_CODE, LAGGING_REASON)
    assert stuck_socket.sent == ["first"]
    assert healthy_socket.sent == ["first", *messages]  # everything, in order, previews included
    assert healthy.peak_backlog_messages <= 5 and hub.stats()["clients"] == 1


@pytest.mark.asyncio
async def test_a_client_over_its_byte_bound_is_disconnected():
    hub = EventHub(StreamLimits(backlog_messages=1000, backlog_bytes=100, close_grace=5))
    socket = RecordingSocket(stuck=True)
    client = hub.connect(socket, FakeRequest(), "first")
    await socket.entered.wait()
    hub.publish("x" * 60)
    assert client in hub.clients
    hub.publish("y" * 60)  # 120 bytes waiting > 100
    assert client not in hub.clients and hub.peak_backlog_bytes == 60
    socket.release.set()
    await client.closing
    await client.sender
    assert socket.sent == ["first"] and socket.closed_with == (LAGGING_CLOSE_CODE, LAGGING_REASON)


@pytest.mark.asyncio
async def test_shutdown_closes_every_client():
    hub = EventHub()
    sockets = [RecordingSocket() for _ in range(3)]
    for socket in sockets:
        hub.connect(socket, FakeRequest(), "first")
    await hub.close_all()
    assert [socket.closed_with for socket in sockets] == [(1001, "server shutdown")] * 3
    assert hub.clients == set()
