"""The run queue: one worker thread running submitted workflows in order, persisted in SQLite."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .. import events as ev
from ..events import Event
from ..executor import Executor, RunResult
from ..node import CancelToken
from ..validation import WorkflowInvalid

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)

# Queue-level events, beside the executor's run and node events. A queue event that concerns
# no single run (pause, say) has an empty run_id.
RUN_QUEUED = "run_queued"
QUEUE_CHANGED = "queue_changed"
QUEUE_EVENT_IDS = 20
"""A queue_changed event names only the next this many runs: with hundreds queued, every change
would otherwise send every id to every client (GET /api/queue has them all)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    workflow TEXT NOT NULL,
    outputs TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    seconds REAL,
    nodes TEXT NOT NULL DEFAULT '{}',
    files TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    rank REAL
);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JSON_COLUMNS = ("workflow", "outputs", "nodes", "files", "error")
_INTERNAL_COLUMNS = ("seq", "rank")


class UnknownRun(KeyError):
    """No run has this id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no run with id {self.run_id!r}"


class NotQueued(ValueError):
    """A queue re-ordering named runs that are not waiting in the queue."""

    def __init__(self, run_ids: list[str]) -> None:
        super().__init__(f"runs not in the queue: {', '.join(run_ids)}")
        self.run_ids = run_ids


class RunStore:
    """Runs and queue settings in one SQLite file; safe to use from the loop and the worker thread."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            # WAL: readers do not wait for the worker's writes, and a commit needs no fsync of the
            # whole file; synchronous=NORMAL keeps every commit across a process crash.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(runs)")}
            if "rank" not in columns:  # a database from before the queue could be re-ordered
                self._db.execute("ALTER TABLE runs ADD COLUMN rank REAL")
                self._db.execute("UPDATE runs SET rank = seq")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _to_json(row: sqlite3.Row) -> dict[str, Any]:
        run = {key: value for key, value in dict(row).items() if key not in _INTERNAL_COLUMNS}
        for column in _JSON_COLUMNS:
            if run[column] is not None:
                run[column] = json.loads(run[column])
        return run

    def add(self, run_id: str, workflow: dict[str, Any], outputs: list[str] | None) -> None:
        self._execute("INSERT INTO runs (id, status, workflow, outputs, created, rank) "
                      "VALUES (?, ?, ?, ?, ?, (SELECT COALESCE(MAX(rank), 0) + 1 FROM runs))",
                      (run_id, QUEUED, json.dumps(workflow), json.dumps(outputs), time.time()))

    def update(self, run_id: str, **fields: Any) -> None:
        names = sorted(fields)
        values = tuple(json.dumps(fields[n]) if n in _JSON_COLUMNS else fields[n] for n in names)
        self._execute(f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?", (*values, run_id))

    def get(self, run_id: str) -> dict[str, Any]:
        rows = self._execute("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return self._to_json(rows[0])

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        """Runs in submission order; queued runs (`status="queued"`) in queue order."""
        if status is None:
            rows = self._execute("SELECT * FROM runs ORDER BY seq")
        elif status == QUEUED:
            rows = self._execute("SELECT * FROM runs WHERE status = ? ORDER BY rank, seq", (status,))
        else:
            rows = self._execute("SELECT * FROM runs WHERE status = ? ORDER BY seq", (status,))
        return [self._to_json(row) for row in rows]

    def queued_ids(self) -> list[str]:
        """Ids of the waiting runs, next first."""
        return [row["id"] for row in self._execute("SELECT id FROM runs WHERE status = ? ORDER BY rank, seq", (QUEUED,))]

    def next_queued(self) -> dict[str, Any] | None:
        rows = self._execute("SELECT * FROM runs WHERE status = ? ORDER BY rank, seq LIMIT 1", (QUEUED,))
        return self._to_json(rows[0]) if rows else None

    def set_queue_order(self, run_ids: list[str]) -> None:
        """Rank the given queued runs in this order, before every other queued run."""
        with self._lock:
            self._db.execute("BEGIN")
            for position, run_id in enumerate(run_ids):
                self._db.execute("UPDATE runs SET rank = ? WHERE id = ? AND status = ?", (position, run_id, QUEUED))
            self._db.execute("COMMIT")

    def set_status_where(self, old: str, new: str, run_id: str | None = None) -> int:
        """Move runs (all, or one) from status `old` to `new`; returns how many moved."""
        now = time.time()
        with self._lock:
            if run_id is None:
                cursor = self._db.execute("UPDATE runs SET status = ?, finished = ? WHERE status = ?", (new, now, old))
            else:
                cursor = self._db.execute("UPDATE runs SET status = ?, finished = ? WHERE status = ? AND id = ?",
                                          (new, now, old, run_id))
            return cursor.rowcount

    def setting(self, name: str, default: str) -> str:
        rows = self._execute("SELECT value FROM settings WHERE name = ?", (name,))
        return rows[0]["value"] if rows else default

    def set_setting(self, name: str, value: str) -> None:
        self._execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, value))


def _node_state(nodes: dict[str, dict[str, Any]], event: Event) -> None:
    """Fold one event into the per-node state shown by the API."""
    if event.type == ev.RUN_STARTED:
        for node_id in event.data["nodes"]:
            nodes[node_id] = {"status": "pending"}
        return
    if event.type == ev.RUN_CANCELLED:
        for state in nodes.values():
            if state["status"] == "running":
                state["status"] = "cancelled"
        return
    if event.node_id is None:
        return
    state = nodes.setdefault(event.node_id, {"status": "pending"})
    if event.type == ev.NODE_STARTED:
        state.update(status="running", node_type=event.data["node_type"])
    elif event.type == ev.NODE_PROGRESS:
        state["progress"] = [event.data["value"], event.data["max"]]
    elif event.type == ev.NODE_CACHED:
        state.update(status="cached", files=event.data["files"])
    elif event.type == ev.NODE_FINISHED:
        state.update(status="executed", seconds=event.data["seconds"], files=event.data["files"])
    elif event.type == ev.NODE_FAILED:
        state["status"] = "failed"


class RunQueue:
    """Validates and queues workflows; one worker thread runs them with the executor's shared cache.

    Listeners get every run event on the worker thread; they must hand off to their own thread.
    """

    def __init__(self, executor: Executor, store: RunStore) -> None:
        self.executor = executor
        self.store = store
        self._listeners: list[Callable[[Event], None]] = []
        self._wake = threading.Condition()
        self._paused = store.setting("paused", "0") == "1"
        self._stopping = False
        self._current: tuple[str, CancelToken] | None = None
        self._live_nodes: dict[str, dict[str, Any]] = {}
        self._end_event: Event | None = None
        self._nodes_lock = threading.Lock()
        interrupted = store.set_status_where(RUNNING, INTERRUPTED)
        if interrupted:
            log.warning("%d run(s) were running when the server stopped; marked interrupted", interrupted)
        self._thread = threading.Thread(target=self._work, name="nodegraph-run-queue", daemon=True)

    # -- control, from any thread --

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; a run in progress is cancelled and recorded as interrupted."""
        with self._wake:
            self._stopping = True
            if self._current is not None:
                self._current[1].cancel()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def submit(self, workflow: dict[str, Any], outputs: list[str] | None = None) -> str:
        """Validate and queue a workflow; returns the run id. Raises WorkflowInvalid."""
        self.executor.compile(workflow, outputs)
        run_id = uuid.uuid4().hex
        # Under the lock the worker takes runs with, so `run_queued` goes out before `run_started`.
        with self._wake:
            self.store.add(run_id, workflow, outputs)
            self._broadcast(Event(RUN_QUEUED, run_id, data={"outputs": outputs}))
            self._queue_changed()
            self._wake.notify_all()
        return run_id

    def cancel(self, run_id: str) -> str:
        """Cancel a queued or running run; returns its status after the request. Raises UnknownRun."""
        with self._wake:
            if self.store.set_status_where(QUEUED, CANCELLED, run_id):
                self._broadcast(Event(ev.RUN_CANCELLED, run_id, data={"seconds": 0.0, "started": False}))
                self._queue_changed()
                return CANCELLED
            if self._current is not None and self._current[0] == run_id:
                self._current[1].cancel()
                return RUNNING
        return self.store.get(run_id)["status"]

    def clear(self) -> int:
        """Cancel every queued run; returns how many."""
        with self._wake:
            waiting = self.store.queued_ids()
            for run_id in waiting:
                self.store.set_status_where(QUEUED, CANCELLED, run_id)
                self._broadcast(Event(ev.RUN_CANCELLED, run_id, data={"seconds": 0.0, "started": False}))
            self._queue_changed()
            return len(waiting)

    def reorder(self, run_ids: list[str]) -> list[str]:
        """Move the given queued runs to the front, in this order; returns the new queue order.

        Raises NotQueued (and changes nothing) if any id is not waiting in the queue.
        """
        first = list(dict.fromkeys(run_ids))  # an id named twice keeps its first place
        with self._wake:
            waiting = self.store.queued_ids()
            missing = [run_id for run_id in first if run_id not in waiting]
            if missing:
                raise NotQueued(missing)
            order = first + [run_id for run_id in waiting if run_id not in first]
            self.store.set_queue_order(order)
            self._queue_changed()
            return order

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Start no further runs (the one in progress goes on); survives a restart."""
        with self._wake:
            self._paused = True
            self.store.set_setting("paused", "1")
            self._queue_changed()

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self.store.set_setting("paused", "0")
            self._queue_changed()
            self._wake.notify_all()

    def snapshot(self, limit: int | None = None) -> dict[str, Any]:
        """The queue as clients see it: waiting run ids in order (the first `limit`), how many
        wait, the running one, and whether paused."""
        with self._wake:
            return self._snapshot(limit)

    def _snapshot(self, limit: int | None = None) -> dict[str, Any]:
        running = self._current[0] if self._current is not None else None
        waiting = self.store.queued_ids()
        return {"queued": waiting[:limit], "queued_count": len(waiting), "running": running, "paused": self._paused}

    def _queue_changed(self) -> None:
        """Tell listeners the queue's new state; the caller holds `_wake`."""
        self._broadcast(Event(QUEUE_CHANGED, "", data=self._snapshot(QUEUE_EVENT_IDS)))

    def get(self, run_id: str) -> dict[str, Any]:
        run = self.store.get(run_id)
        if run["status"] == RUNNING:
            with self._nodes_lock:
                run["nodes"] = json.loads(json.dumps(self._live_nodes))
        return run

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(status)

    # -- the worker thread --

    def _take(self) -> tuple[dict[str, Any], CancelToken] | None:
        with self._wake:
            while True:
                if self._stopping:
                    return None
                run = None if self._paused else self.store.next_queued()
                if run is not None:
                    token = CancelToken()
                    self._current = (run["id"], token)
                    with self._nodes_lock:
                        self._live_nodes = {}
                    self.store.update(run["id"], status=RUNNING, started=time.time())
                    self._queue_changed()
                    return run, token
                self._wake.wait()

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            run, token = taken
            try:
                self._execute(run, token)
            finally:
                with self._wake:
                    self._current = None
                    self._queue_changed()

    def _emit(self, event: Event) -> None:
        with self._nodes_lock:
            _node_state(self._live_nodes, event)
        if event.type in ev.RUN_ENDED:
            # Held back until the result is stored, so a client reacting to it reads the final state.
            self._end_event = event
            return
        self._broadcast(event)

    def _broadcast(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not fail the run
                log.exception("run event listener failed on %s", event.type)

    def _execute(self, run: dict[str, Any], token: CancelToken) -> None:
        run_id = run["id"]
        self._end_event = None
        try:
            result = self.executor.run(run["workflow"], run["outputs"], on_event=self._emit, cancel=token,
                                       run_id=run_id)
        except WorkflowInvalid as invalid:
            # Valid when submitted, but the node packs changed since (a restart with other packs).
            self.store.update(run_id, status=FAILED, finished=time.time(),
                              error={"error": "invalid_workflow", "issues": [i.to_json() for i in invalid.issues]})
            return
        except Exception as error:  # outside any node (e.g. a fingerprint): fail this run, keep the worker
            log.exception("run %s failed outside its nodes", run_id)
            self.store.update(run_id, status=FAILED, finished=time.time(), nodes=self._live_nodes,
                              error={"error": "run_error", "exception": type(error).__name__, "message": str(error)})
            return
        self._record(run_id, result)
        if self._end_event is not None:
            self._broadcast(self._end_event)

    def _record(self, run_id: str, result: RunResult) -> None:
        status = INTERRUPTED if result.status == CANCELLED and self._stopping else result.status
        self.store.update(run_id, status=status, finished=time.time(), seconds=result.seconds,
                          nodes=self._live_nodes, files=result.files,
                          error=result.error.to_json() if result.error else None)
        log.info("run %s %s in %.2fs", run_id, status, result.seconds)
