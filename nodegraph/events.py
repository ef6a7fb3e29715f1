"""The one event stream of a run, consumed by the CLI, the server and tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
RUN_FAILED = "run_failed"
RUN_CANCELLED = "run_cancelled"
NODE_STARTED = "node_started"
NODE_CACHED = "node_cached"
NODE_PROGRESS = "node_progress"
NODE_PREVIEW = "node_preview"
NODE_FINISHED = "node_finished"
NODE_FAILED = "node_failed"

RUN_ENDED = (RUN_FINISHED, RUN_FAILED, RUN_CANCELLED)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened in a run. `data` holds JSON values, except a preview's image."""

    type: str
    run_id: str
    node_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "run_id": self.run_id, "node_id": self.node_id,
                "time": self.time, **self.data}


EventSink = Callable[[Event], None]
