"""The HTTP/WebSocket server: a persistent run queue behind a local JSON API."""

from .app import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, create_app, serve
from .queue import RunQueue, RunStore, UnknownRun

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "MAX_BODY_BYTES", "RunQueue", "RunStore", "UnknownRun", "create_app", "serve"]
