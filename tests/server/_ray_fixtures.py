"""Shared pieces of the Ray backend tests: how long to wait, and the small object store they use."""

from __future__ import annotations

import time
from typing import Any, Callable

OBJECT_STORE_BYTES = 128 * 1024**2
"""Small, so that it fits the shared memory of a CI container."""
WAIT = 300.0
"""Seconds before a wait gives up: a bound against hanging, not a speed requirement."""


def wait_until(condition: Callable[[], Any], what: str) -> Any:
    """Poll `condition` until it returns something true, and return that."""
    deadline = time.monotonic() + WAIT
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value
