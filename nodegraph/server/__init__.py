"""The HTTP/WebSocket server: a persistent run queue behind a local JSON API, and the editor."""

from .access import LOOPBACK_NAMES, new_token
from .app import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, create_app, serve
from .openapi import openapi_document
from .queue import NotQueued, RunNotFinished, RunQueue, RunStore, UnknownRun

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "LOOPBACK_NAMES", "MAX_BODY_BYTES", "NotQueued", "RunNotFinished", "RunQueue",
           "RunStore", "UnknownRun", "create_app", "new_token", "openapi_document", "serve"]
