"""The run queue: submitted workflows in order, persisted in SQLite, executed by a backend.

The default backend runs one workflow at a time in this process; another (the Ray backend) places
runs on a pool of workers elsewhere. The queue keeps the order, the history and the events either way.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .. import events as ev
from ..events import Event, EventSink
from ..executor import Executor
from ..node import CancelToken
from ..validation import WorkflowInvalid

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)

# Queue-level events, beside the executor's run and node events. A queue event that concerns
# no single run (pause, say) has an empty run_id.
RUN_QUEUED = "run_queued"
RUN_RETRIED = "run_retried"
"""A run's worker was lost mid-run and the run starts again on another; data: the lost attempt."""
RUN_DELETED = "run_deleted"
"""A finished run's record was deleted from the history (its files stay)."""
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
    rank REAL,
    worker TEXT,
    attempts TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JSON_COLUMNS = ("workflow", "outputs", "nodes", "files", "error", "attempts")
# Columns added since the first release, added to older databases when opened.
_LATER_COLUMNS = {"rank": "REAL", "worker": "TEXT", "attempts": "TEXT NOT NULL DEFAULT '[]'"}
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


class RunNotFinished(ValueError):
    """A queued or running run cannot be deleted from the history: it must be cancelled first."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is {status}; cancel it first, then delete it")
        self.run_id = run_id
        self.status = status


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
            for name, declaration in _LATER_COLUMNS.items():
                if name not in columns:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {declaration}")
            if "rank" not in columns:  # a database from before the queue could be re-ordered
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

    def delete_finished(self, run_id: str) -> None:
        """Delete the record of a finished run (not its files). Raises UnknownRun, or RunNotFinished
        (and deletes nothing) for a queued or running run."""
        with self._lock:
            finished = ", ".join("?" * len(FINISHED))
            cursor = self._db.execute(f"DELETE FROM runs WHERE id = ? AND status IN ({finished})", (run_id, *FINISHED))
            if cursor.rowcount:
                return
            rows = self._db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchall()
        if not rows:
            raise UnknownRun(run_id)
        raise RunNotFinished(run_id, rows[0]["status"])

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


@dataclass
class RunOutcome:
    """How a run ended, as its history keeps it."""

    status: str
    """succeeded, failed or cancelled."""
    seconds: float | None = None
    files: list[str] = field(default_factory=list)
    """The files of the requested outputs, in the server's output folder."""
    error: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """Earlier attempts, lost with their worker: worker, error, message, started, ended."""


def run_error(error: BaseException) -> dict[str, Any]:
    """The stored error of a run that failed outside its nodes."""
    return {"error": "run_error", "exception": type(error).__name__, "message": str(error)}


def execute_run(executor: Executor, run: dict[str, Any], emit: EventSink, cancel: CancelToken) -> RunOutcome:
    """Run a queued run (`id`, `workflow`, `outputs`) with an executor. Never raises: a workflow
    the executor's packs no longer accept, or a fault outside every node, is a failed outcome."""
    run_id = run["id"]
    try:
        result = executor.run(run["workflow"], run["outputs"], on_event=emit, cancel=cancel, run_id=run_id)
    except WorkflowInvalid as invalid:
        # Valid when submitted, but the node packs changed since (a restart with other packs).
        return RunOutcome(FAILED, error={"error": "invalid_workflow", "issues": [i.to_json() for i in invalid.issues]})
    except Exception as error:  # outside any node (e.g. a fingerprint): fail this run, keep the worker
        log.exception("run %s failed outside its nodes", run_id)
        return RunOutcome(FAILED, error=run_error(error))
    return RunOutcome(result.status, result.seconds, result.files, result.error.to_json() if result.error else None)


class Placement(Protocol):
    """A queued run given a place to execute by a backend."""

    worker: str
    """Who executes it, as the run's history shows it; may change when the run is retried."""
    token: CancelToken
    """Cancelling it stops the run within one step of its current node, wherever it executes."""

    def execute(self, emit: EventSink) -> RunOutcome:
        """Run to the end, sending the run's events to `emit`; called on a thread of its own."""

    def release(self) -> None:
        """The outcome is stored: what the run held may take the next run."""


class RunBackend(Protocol):
    """Where the queue's runs execute."""

    def start(self, executor: Executor, wake: Callable[[], None]) -> None:
        """Begin; `executor` is the one runs were validated with. Call `wake` (never while holding
        a lock `place` takes) whenever a run that found no place might now find one."""

    def place(self, run: dict[str, Any]) -> Placement | None:
        """Claim a place for this run now, or None when there is none free. Must not block."""

    def stop(self) -> None:
        """Release everything; called after every placed run ended."""

    def workers(self) -> list[dict[str, Any]]:
        """Where runs execute now, one entry per worker with at least :data:`WORKER_FIELDS`."""


# What every backend reports per worker: its name (recorded as a run's `worker`), the cluster
# machine it is on (None on a single machine), whether it takes runs yet, the run it is executing
# (or None) and how many runs it has finished.
WORKER_FIELDS = ("name", "node_id", "ready", "run_id", "runs")


class LocalBackend:
    """Runs execute in this process one at a time, with the queue's executor and its cross-run cache."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: str | None = None
        self._finished = 0
        self._executor: Executor | None = None
        self._wake: Callable[[], None] = lambda: None

    def start(self, executor: Executor, wake: Callable[[], None]) -> None:
        self._executor, self._wake = executor, wake

    def place(self, run: dict[str, Any]) -> Placement | None:
        if self._executor is None:
            raise RuntimeError("the backend was not started")
        with self._lock:
            if self._running is not None:
                return None
            self._running = run["id"]
        return _LocalPlacement(self, self._executor, run)

    def _free(self) -> None:
        with self._lock:
            self._running = None
            self._finished += 1
        self._wake()

    def stop(self) -> None:
        """Nothing to release: the executor and its cache belong to the queue."""

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": _LocalPlacement.worker, "node_id": None, "ready": self._executor is not None,
                     "run_id": self._running, "runs": self._finished}]


class _LocalPlacement:
    worker = "local"

    def __init__(self, backend: LocalBackend, executor: Executor, run: dict[str, Any]) -> None:
        self._backend = backend
        self._executor = executor
        self._run = run
        self.token = CancelToken()

    def execute(self, emit: EventSink) -> RunOutcome:
        return execute_run(self._executor, self._run, emit, self.token)

    def release(self) -> None:
        self._backend._free()


class RunQueue:
    """Validates and queues workflows; a backend executes them, by default one at a time in this
    process with the executor's shared cache.

    Listeners get every run event on the thread of the run; they must hand off to their own thread.
    """

    def __init__(self, executor: Executor, store: RunStore, backend: RunBackend | None = None) -> None:
        self.executor = executor
        self.store = store
        self.backend = backend if backend is not None else LocalBackend()
        self._listeners: list[Callable[[Event], None]] = []
        self._wake = threading.Condition()
        self._paused = store.setting("paused", "0") == "1"
        self._stopping = False
        self._running: dict[str, Placement] = {}  # in the order the runs started
        self._run_threads: set[threading.Thread] = set()
        self._live_nodes: dict[str, dict[str, dict[str, Any]]] = {}
        self._end_events: dict[str, Event] = {}
        self._nodes_lock = threading.Lock()
        interrupted = store.set_status_where(RUNNING, INTERRUPTED)
        if interrupted:
            log.warning("%d run(s) were running when the server stopped; marked interrupted", interrupted)
        self._thread = threading.Thread(target=self._dispatch, name="nodegraph-run-queue", daemon=True)

    # -- control, from any thread --

    def start(self) -> None:
        self.backend.start(self.executor, self._placement_freed)
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching; runs in progress are cancelled and recorded as interrupted."""
        with self._wake:
            self._stopping = True
            for placement in self._running.values():
                placement.token.cancel()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        with self._wake:
            threads = list(self._run_threads)
        for thread in threads:
            thread.join()
        self.backend.stop()

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def submit(self, workflow: dict[str, Any], outputs: list[str] | None = None) -> str:
        """Validate and queue a workflow; returns the run id. Raises WorkflowInvalid."""
        self.executor.compile(workflow, outputs)
        run_id = uuid.uuid4().hex
        # Under the lock runs are placed with, so `run_queued` goes out before `run_started`.
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
            placement = self._running.get(run_id)
            if placement is not None:
                placement.token.cancel()
                return RUNNING
        return self.store.get(run_id)["status"]

    def delete(self, run_id: str) -> None:
        """Delete a finished run from the history (its files stay) and tell listeners.
        Raises UnknownRun, or RunNotFinished for a queued or running run."""
        # Under the lock runs are placed with, so a queued run cannot start while it is checked.
        with self._wake:
            self.store.delete_finished(run_id)
            self._broadcast(Event(RUN_DELETED, run_id))

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
        wait, the running ones (`running`: the one that started first), and whether paused."""
        with self._wake:
            return self._snapshot(limit)

    def _snapshot(self, limit: int | None = None) -> dict[str, Any]:
        running = list(self._running)
        waiting = self.store.queued_ids()
        return {"queued": waiting[:limit], "queued_count": len(waiting), "running": running[0] if running else None,
                "running_ids": running, "paused": self._paused}

    def _queue_changed(self) -> None:
        """Tell listeners the queue's new state; the caller holds `_wake`."""
        self._broadcast(Event(QUEUE_CHANGED, "", data=self._snapshot(QUEUE_EVENT_IDS)))

    def get(self, run_id: str) -> dict[str, Any]:
        run = self.store.get(run_id)
        if run["status"] == RUNNING:
            with self._nodes_lock:
                live = self._live_nodes.get(run_id)
                if live is not None:
                    run["nodes"] = json.loads(json.dumps(live))
        return run

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(status)

    # -- dispatching, and a thread per running run --

    def _placement_freed(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _take(self) -> tuple[dict[str, Any], Placement] | None:
        with self._wake:
            while True:
                if self._stopping:
                    return None
                run = None if self._paused else self.store.next_queued()
                placement = self.backend.place(run) if run is not None else None
                if run is not None and placement is not None:
                    self._running[run["id"]] = placement
                    with self._nodes_lock:
                        self._live_nodes[run["id"]] = {}
                    self.store.update(run["id"], status=RUNNING, started=time.time(), worker=placement.worker)
                    self._queue_changed()
                    return run, placement
                self._wake.wait()

    def _dispatch(self) -> None:
        while (taken := self._take()) is not None:
            thread = threading.Thread(target=self._execute, args=taken, name=f"nodegraph-run-{taken[0]['id'][:8]}",
                                      daemon=True)
            with self._wake:
                self._run_threads.add(thread)
            thread.start()

    def _emit(self, run_id: str, event: Event) -> None:
        with self._nodes_lock:
            _node_state(self._live_nodes[run_id], event)
        if event.type in ev.RUN_ENDED:
            # Held back until the result is stored, so a client reacting to it reads the final state.
            self._end_events[run_id] = event
            return
        self._broadcast(event)

    def _broadcast(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not fail the run
                log.exception("run event listener failed on %s", event.type)

    def _execute(self, run: dict[str, Any], placement: Placement) -> None:
        run_id = run["id"]
        try:
            outcome = placement.execute(lambda event: self._emit(run_id, event))
        except Exception as error:  # a backend fault: fail this run, keep the queue
            log.exception("run %s failed in its backend", run_id)
            outcome = RunOutcome(FAILED, error=run_error(error))
        self._record(run_id, placement, outcome)
        end_event = self._end_events.pop(run_id, None)
        if end_event is not None:
            self._broadcast(end_event)
        with self._wake:
            del self._running[run_id]
            self._run_threads.discard(threading.current_thread())
            self._queue_changed()
        with self._nodes_lock:
            del self._live_nodes[run_id]
        placement.release()

    def _record(self, run_id: str, placement: Placement, outcome: RunOutcome) -> None:
        status = INTERRUPTED if outcome.status == CANCELLED and self._stopping else outcome.status
        with self._nodes_lock:
            nodes = self._live_nodes[run_id]
            self.store.update(run_id, status=status, finished=time.time(), seconds=outcome.seconds, nodes=nodes,
                              files=outcome.files, error=outcome.error, worker=placement.worker,
                              attempts=outcome.attempts)
        log.info("run %s %s on %s%s", run_id, status, placement.worker,
                 "" if outcome.seconds is None else f" in {outcome.seconds:.2f}s")
