"""The WebSocket event stream's delivery: each client has its own bounded outbox and its own sender
task, so a client that stops reading holds up nobody but itself, and is disconnected once it
falls too far behind (it reconnects and resyncs from `GET /api/runs`)."""

from __future__ import annotations

import asyncio
import logging
from socket import AF_INET, AF_INET6, SO_SNDBUF, SOL_SOCKET
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, web

log = logging.getLogger(__name__)

LAGGING_CLOSE_CODE = WSCloseCode.TRY_AGAIN_LATER
LAGGING_REASON = "too far behind the event stream; reconnect and resync from GET /api/runs"
"""The close frame's reason for a client that fell too far behind (at most 123 bytes)."""


@dataclass(frozen=True)
class StreamLimits:
    """How far a client may fall behind before it loses previews, and then its connection."""

    backlog_messages: int = 50_000
    """Messages waiting for one client beyond which it is disconnected."""
    backlog_bytes: int = 16 * 1024 * 1024
    """Bytes waiting for one client beyond which it is disconnected."""
    preview_backlog: int = 64
    """A preview is queued only for a client with fewer messages than this waiting: a client that
    is behind gets the state of its runs, not stale pictures of them."""
    close_grace: float = 10.0
    """Seconds a disconnected client has to read its close frame before the connection is dropped."""
    socket_send_buffer: int | None = 256 * 1024
    """The kernel's send buffer for an event socket (SO_SNDBUF), fixed so that it does not grow to
    megabytes for a client that does not read (None: the system's own sizing)."""


class EventClient:
    """One connected socket: its outbox, in order, and the task that sends it."""

    def __init__(self, socket: web.WebSocketResponse, request: web.Request, limits: StreamLimits) -> None:
        self.socket = socket
        self.limits = limits
        self.peer = request.remote or "?"
        self._transport = request.transport
        raw = self._transport.get_extra_info("socket") if self._transport is not None else None
        if raw is not None and limits.socket_send_buffer is not None and raw.family in (AF_INET, AF_INET6):
            raw.setsockopt(SOL_SOCKET, SO_SNDBUF, limits.socket_send_buffer)
        self._outbox: deque[tuple[str, bool]] = deque()
        self.backlog_bytes = 0
        self.peak_backlog_bytes = 0
        self.peak_backlog_messages = 0
        self.dropped_previews = 0
        self._ready = asyncio.Event()
        self._stopped = False
        self.sender = asyncio.get_running_loop().create_task(self._send())
        self._closing: asyncio.Task[None] | None = None

    @property
    def backlog_messages(self) -> int:
        return len(self._outbox)

    def offer(self, text: str, preview: bool) -> bool:
        """Queue one message; False when it does not fit even without previews (the client must go)."""
        if preview and len(self._outbox) >= self.limits.preview_backlog:
            self.dropped_previews += 1
            return True
        size = len(text)  # event messages are ASCII JSON: characters are bytes
        if not self._fits(size):
            self._drop_previews()
            if not self._fits(size):
                return False
        self._outbox.append((text, preview))
        self.backlog_bytes += size
        self.peak_backlog_bytes = max(self.peak_backlog_bytes, self.backlog_bytes)
        self.peak_backlog_messages = max(self.peak_backlog_messages, len(self._outbox))
        self._ready.set()
        return True

    def _fits(self, size: int) -> bool:
        return (len(self._outbox) < self.limits.backlog_messages
                and self.backlog_bytes + size <= self.limits.backlog_bytes)

    def _drop_previews(self) -> None:
        kept = deque(item for item in self._outbox if not item[1])
        self.dropped_previews += len(self._outbox) - len(kept)
        self._outbox = kept
        self.backlog_bytes = sum(len(text) for text, _ in kept)

    async def _send(self) -> None:
        try:
            while not self._stopped:
                await self._ready.wait()
                self._ready.clear()
                while self._outbox and not self._stopped:
                    text, _ = self._outbox.popleft()
                    self.backlog_bytes -= len(text)
                    await self.socket.send_str(text)  # waits only while this client's socket is full
        except ConnectionError:  # the client went away; its handler ends the connection
            log.info("event client %s went away", self.peer)

    def stop_sending(self) -> None:
        """Send nothing more and forget what was waiting.

        The sender is told to stop rather than cancelled: while the socket is full it waits on the
        connection's one drain future, which a cancellation would cancel for the close frame too.
        """
        self._stopped = True
        self._outbox.clear()
        self.backlog_bytes = 0
        self._ready.set()

    def close(self, code: int, reason: str, grace: float) -> asyncio.Task[None]:
        """Stop sending, send a close frame with `reason`, and drop the connection if the client
        has not answered it within `grace` seconds (a stalled client never will)."""
        if self._closing is None:
            self.stop_sending()
            self._closing = asyncio.get_running_loop().create_task(self._close(code, reason, grace))
        return self._closing

    @property
    def closing(self) -> asyncio.Task[None] | None:
        """The task closing this client (after close()), else None."""
        return self._closing

    async def _close(self, code: int, reason: str, grace: float) -> None:
        try:
            await asyncio.wait_for(self.socket.close(code=code, message=reason.encode()), grace)
        except asyncio.TimeoutError:
            log.info("event client %s did not answer the close frame within %.0f s; dropped", self.peer, grace)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the connection now, with whatever it still had to send."""
        if self._transport is not None:
            self._transport.abort()

    def ended(self) -> None:
        """The connection's handler ended. A transport closed while still holding data for a client
        that does not read (its heartbeat went unanswered) would wait for it forever: drop it."""
        if self._closing is not None:
            return  # close() owns the end
        self.stop_sending()
        transport = self._transport
        if transport is not None and transport.is_closing() and transport.get_write_buffer_size():
            transport.abort()


class EventHub:
    """Every connected event client; `publish` hands a message to each without waiting for any."""

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self.clients: set[EventClient] = set()
        self.lagging_disconnects = 0
        self.peak_backlog_bytes = 0
        """The most bytes ever waiting for one client: what the outboxes held at their fullest."""
        self.peak_backlog_messages = 0

    def connect(self, socket: web.WebSocketResponse, request: web.Request, first: str) -> EventClient:
        """Register a prepared socket; `first` (the queue's state) is its first message."""
        client = EventClient(socket, request, self.limits)
        client.offer(first, preview=False)
        self.clients.add(client)
        return client

    def disconnect(self, client: EventClient) -> None:
        """The client's handler ended (it closed, or the connection was lost)."""
        self.clients.discard(client)
        self._note_peak(client)
        client.ended()

    def publish(self, text: str, preview: bool = False) -> None:
        """Queue a message for every client; one that cannot take it is disconnected as lagging."""
        for client in list(self.clients):
            if not client.offer(text, preview):
                self.clients.discard(client)
                self._note_peak(client)
                self.lagging_disconnects += 1
                log.warning("event client %s fell %d messages (%d bytes) behind; disconnected", client.peer,
                            client.backlog_messages, client.backlog_bytes)
                client.close(LAGGING_CLOSE_CODE, LAGGING_REASON, self.limits.close_grace)

    def _note_peak(self, client: EventClient) -> None:
        self.peak_backlog_bytes = max(self.peak_backlog_bytes, client.peak_backlog_bytes)
        self.peak_backlog_messages = max(self.peak_backlog_messages, client.peak_backlog_messages)

    async def close_all(self) -> None:
        """Close every connection (server shutdown): an event stream never ends by itself."""
        clients, self.clients = list(self.clients), set()
        closing = [client.close(WSCloseCode.GOING_AWAY, "server shutdown", grace=1.0) for client in clients]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        """Delivery figures: clients, what waits for them, and how many were dropped for lagging."""
        for client in self.clients:
            self._note_peak(client)
        return {"clients": len(self.clients), "lagging_disconnects": self.lagging_disconnects,
                "backlog_bytes": sum(client.backlog_bytes for client in self.clients),
                "peak_backlog_bytes": self.peak_backlog_bytes, "peak_backlog_messages": self.peak_backlog_messages,
                "dropped_previews": sum(client.dropped_previews for client in self.clients)}
