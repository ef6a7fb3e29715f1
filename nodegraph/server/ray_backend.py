"""The Ray backend: queued runs execute on a pool of Ray actors, each with its own engine and cache.

The server keeps the queue, the history and the event stream (nodegraph.server.queue); this
module places each run on a worker: one per GPU of the cluster, or a configured number per
machine on CPU. A worker is a Ray actor holding an executor and its cross-run cache, so models it
loaded stay loaded for its next runs; a run goes preferably to a free worker that already holds
the outputs its graph starts from (its checkpoint, by content key). Events stream back as the run
goes; files the run writes come back to the server's output folder. A run whose worker is lost
is retried once on another; a run that fails by itself (bad input, a node's exception) is not.

This is the only module of nodegraph that imports Ray (`pip install 'nodegraph[ray]'`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue as queues
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Protocol, TypeVar

import ray
from ray.exceptions import ObjectLostError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import events as ev
from ..cache import DEFAULT_MAX_BYTES, OutputCache
from ..events import Event, EventSink
from ..executor import Executor
from ..files import atomic_write, numbered_parts, write_numbered
from ..node import CancelToken
from ..plugins import build_registry
from .queue import CANCELLED, FAILED, RUN_RETRIED, RunOutcome, execute_run

log = logging.getLogger(__name__)

_WORKER_LOST = (RayActorError, ObjectLostError)
"""What a run's stream raises when its worker, or the machine under it, is gone."""
RETRIES = 1
"""How many times a run lost with its worker starts again on another."""
HELD_KEYS = 4096
"""Content keys remembered per worker for placing runs (the newest; a worker's cache may hold fewer)."""


@dataclass(frozen=True)
class RayPoolConfig:
    """How the pool of workers is made."""

    address: str | None = None
    """The cluster to join (`auto`, `HOST:6379`); None: $RAY_ADDRESS, else a new one-machine cluster."""
    device: str = "auto"
    """`cuda`: one worker per GPU of the cluster; `cpu`: `workers_per_node` per machine; `auto`: per
    GPU if the cluster has GPUs when the pool starts, else per machine. Also the workers' torch device."""
    workers_per_node: int = 1
    """CPU workers per machine, when the pool is not one worker per GPU."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker (Ray also limits the worker's threads to this many)."""
    nodes_dirs: tuple[Path, ...] = ()
    """Node pack folders, as workers find them (the same paths on every machine)."""
    cache_bytes: int = DEFAULT_MAX_BYTES
    """The bound of each worker's cross-run cache."""
    poll_seconds: float = 5.0
    """How often the pool looks for machines and GPUs that joined the cluster."""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda for Ray workers, got {self.device!r}")
        if self.workers_per_node < 1 or self.cpus_per_worker <= 0 or self.poll_seconds <= 0:
            raise ValueError("workers_per_node must be at least 1; cpus_per_worker and poll_seconds above 0")


# -- the worker side --

@dataclass(frozen=True)
class WrittenFile:
    """A file a node wrote on a worker, sent back with the node's `node_finished` event."""

    worker_path: str
    relative: str
    """Its path inside the run's folder on the worker, in POSIX form."""
    data: bytes


def _written_files(event: Event, folder: Path) -> list[WrittenFile]:
    """The files a finished node wrote into the run's folder, with their bytes."""
    if event.type != ev.NODE_FINISHED:
        return []
    written = []
    for path in event.data["files"]:
        try:
            relative = Path(path).relative_to(folder)
        except ValueError:  # not written for this run (a file outside the output folder)
            continue
        written.append(WrittenFile(path, relative.as_posix(), Path(path).read_bytes()))
    return written


SCRATCH_PREFIX = "nodegraph-worker-"
"""A worker's scratch folder in the machine's temporary directory is this prefix and its process id."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_scratch(temp_dir: Path) -> list[Path]:
    """Remove the scratch folders of workers that are gone (killed mid-run, their machine's
    temporary folder kept); returns what was removed."""
    removed = []
    for folder in temp_dir.glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name[len(SCRATCH_PREFIX):]
        if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class RunWorker:
    """One engine on a Ray worker: an executor with its own cross-run cache, one run at a time.

    The pool makes it an actor with two threads, so that `cancel` reaches it while `run` runs.
    Runs write their files under the worker's scratch folder; a starting worker removes those of
    workers on its machine that died without cleaning up.
    """

    def __init__(self, nodes_dirs: list[Path], device: str, cache_bytes: int) -> None:
        temp_dir = Path(tempfile.gettempdir())
        for stale in sweep_scratch(temp_dir):
            log.info("removed %s, left by a worker that is gone", stale)
        self._scratch = temp_dir / f"{SCRATCH_PREFIX}{os.getpid()}"
        self._scratch.mkdir(exist_ok=True)
        registry, problems = build_registry(nodes_dirs)
        self._problems = [str(problem) for problem in problems]
        self._executor = Executor(registry, OutputCache(cache_bytes), device=device)  # output_dir: set per run
        self._lock = threading.Lock()
        self._current: tuple[str, CancelToken] | None = None
        self._cancelled: set[str] = set()

    def describe(self) -> dict[str, Any]:
        """`name` (host:pid), Ray's `node_id` of its machine, and the node packs it could not load."""
        return {"name": f"{socket.gethostname()}:{os.getpid()}", "node_id": ray.get_runtime_context().get_node_id(),
                "pack_problems": self._problems}

    def cancel(self, run_id: str) -> None:
        """Cancel the run if it is this worker's, within one step; or when it starts, if it has not yet."""
        with self._lock:
            if self._current is not None and self._current[0] == run_id:
                self._current[1].cancel()
            else:  # a separate call from `run`: it can arrive first
                self._cancelled.add(run_id)

    def run(self, run: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
        """Execute a queued run (`id`, `workflow`, `outputs`), as a stream: `("event", Event,
        [WrittenFile])` as the run goes, then `("outcome", RunOutcome)` with this worker's file paths.

        Output files go to a new temporary folder of this run alone (so output nodes never reuse
        another run's files from the cache), removed once their bytes are sent.
        """
        token = CancelToken()
        with self._lock:
            if run["id"] in self._cancelled:
                token.cancel()
            # The pool gives a worker one run at a time: what is left is for runs that ended.
            self._cancelled.clear()
            self._current = (run["id"], token)
        folder = Path(tempfile.mkdtemp(prefix=f"run-{run['id'][:8]}-", dir=self._scratch))
        self._executor.output_dir = folder
        messages: queues.SimpleQueue[tuple[Any, ...] | None] = queues.SimpleQueue()

        def emit(event: Event) -> None:
            messages.put(("event", event, _written_files(event, folder)))

        def work() -> None:
            try:
                messages.put(("outcome", execute_run(self._executor, run, emit, token)))
            finally:
                messages.put(None)

        thread = threading.Thread(target=work, name=f"nodegraph-run-{run['id'][:8]}")
        thread.start()
        try:
            while (message := messages.get()) is not None:
                yield message
        finally:
            thread.join()
            shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._current = None


_RemoteRunWorker = ray.remote(RunWorker)


# -- the server side --

@dataclass(eq=False)
class _Worker:
    """The pool's view of one actor."""

    actor: Any
    node_id: str | None
    """The machine it runs on: set when made for one machine, else once it is ready."""
    name: str = "starting"
    ready: bool = False
    run_id: str | None = None
    runs: int = 0
    held: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Content keys of the outputs its runs computed or reused, newest last."""


class Candidate(Protocol):
    """What placing a run looks at in a worker."""

    held: Mapping[str, None]
    runs: int


CandidateT = TypeVar("CandidateT", bound=Candidate)


def choose_worker(free: list[CandidateT], keys: set[str]) -> CandidateT:
    """The free worker holding most of a run's content keys (`held`), so a graph whose checkpoint a
    worker loaded goes back to it; among equals, the one that has run the fewest runs (`runs`)."""
    return max(free, key=lambda worker: (len(keys.intersection(worker.held)), -worker.runs))


class RunOutputs:
    """The files one run's workers wrote, stored in the server's output folder once per run.

    A node that finished in a lost attempt and again in the retry keeps the files its first attempt
    stored. Numbered names (`txt2img_00001.png`) take the next free number here; other names are
    written atomically under the same name, as the node would have done locally.
    """

    def __init__(self, output_dir: Path) -> None:
        self._output_dir = output_dir
        self._by_node: dict[str, list[str]] = {}
        self._paths: dict[str, str] = {}

    def receive(self, event: Event, written: list[WrittenFile]) -> Event:
        """Store what a finished node wrote; the event with the server's file paths."""
        if written:
            stored = self._by_node.get(event.node_id or "")
            if stored is None:
                stored = self._by_node[event.node_id or ""] = [str(self._store(file)) for file in written]
            self._paths.update(zip((file.worker_path for file in written), stored))
        if "files" not in event.data:
            return event
        return dataclasses.replace(event, data={**event.data, "files": self.paths(event.data["files"])})

    def paths(self, worker_paths: list[str]) -> list[str]:
        """Worker file paths as the server stored them (unknown ones unchanged)."""
        return [self._paths.get(path, path) for path in worker_paths]

    def _store(self, file: WrittenFile) -> Path:
        relative = PurePosixPath(file.relative)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"a worker sent an output file outside its run's folder: {file.relative!r}")
        numbered = numbered_parts(file.relative)
        if numbered is not None:
            return write_numbered(self._output_dir, numbered[0], numbered[1], file.data)
        path = self._output_dir.joinpath(*relative.parts)
        atomic_write(path, file.data)
        return path


class _ForwardedCancel(CancelToken):
    """A run's cancel token on the server: cancelling it also cancels the run on its worker."""

    def __init__(self, run_id: str, cancelled: Callable[[], None]) -> None:
        super().__init__()
        self._run_id = run_id
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._actor: Any = None

    def forward_to(self, actor: Any) -> None:
        """The worker now executing the run."""
        with self._lock:
            self._actor = actor
        if self.cancelled:
            actor.cancel.remote(self._run_id)

    def cancel(self) -> None:
        super().cancel()
        with self._lock:
            actor = self._actor
        if actor is not None:
            actor.cancel.remote(self._run_id)
        self._cancelled()


class _RayPlacement:
    """A run placed on a worker (see queue.Placement); lost with its worker, it moves to another."""

    def __init__(self, backend: RayBackend, run: dict[str, Any], worker: _Worker, keys: dict[str, str]) -> None:
        self._backend = backend
        self._run = run
        self._worker = worker
        self._keys = keys
        self.worker = worker.name
        self.token = _ForwardedCancel(run["id"], backend._changed_state)

    def execute(self, emit: EventSink) -> RunOutcome:
        try:
            return self._execute(emit)
        finally:
            # Free as soon as its stream ended, before the run's end event goes out: a client that
            # submits the next run on that event finds the worker holding its checkpoint free.
            self._backend._free(self._worker)

    def _execute(self, emit: EventSink) -> RunOutcome:
        run_id = self._run["id"]
        outputs = RunOutputs(self._backend.output_dir)
        attempts: list[dict[str, Any]] = []
        started = time.perf_counter()
        while True:
            attempt_started = time.time()
            try:
                outcome = self._attempt(emit, outputs)
            except _WORKER_LOST as lost:
                self._backend._lost(self._worker, replace=True)
                message = str(lost).strip().splitlines()[0]
                attempts.append({"worker": self.worker, "error": "worker_died", "message": message,
                                 "started": attempt_started, "ended": time.time()})
                log.warning("run %s: worker %s was lost (%s)", run_id, self.worker, message)
            else:
                outcome.attempts = attempts
                return outcome
            seconds = time.perf_counter() - started
            if len(attempts) > RETRIES:
                error = {"error": "worker_died",
                         "message": f"lost with its worker {len(attempts)} times; last: {attempts[-1]['message']}"}
                emit(Event(ev.RUN_FAILED, run_id, data={"error": error, "seconds": seconds}))
                return RunOutcome(FAILED, seconds, error=error, attempts=attempts)
            if not self.token.cancelled:
                emit(Event(RUN_RETRIED, run_id, data=attempts[-1]))
                worker = self._backend._worker_for_retry(run_id, self._keys, self.token)
                if worker is not None:
                    self._worker, self.worker = worker, worker.name
                    continue
            emit(Event(ev.RUN_CANCELLED, run_id, data={"seconds": seconds}))
            return RunOutcome(CANCELLED, seconds, attempts=attempts)

    def _attempt(self, emit: EventSink, outputs: RunOutputs) -> RunOutcome:
        worker = self._worker
        self.token.forward_to(worker.actor)
        outcome: RunOutcome | None = None
        stream = worker.actor.run.remote(self._run)
        try:
            for ref in stream:
                message = ray.get(ref)
                if message[0] == "outcome":
                    outcome = message[1]
                    continue
                event: Event = message[1]
                if event.type in (ev.NODE_FINISHED, ev.NODE_CACHED) and event.node_id in self._keys:
                    self._backend._hold(worker, self._keys[event.node_id])
                emit(outputs.receive(event, message[2]))
        except _WORKER_LOST:
            raise
        except BaseException:  # storing a file failed here (a full disk, say): end the run there too
            worker.actor.cancel.remote(self._run["id"])
            try:
                for _ in stream:  # the worker is free once its stream ends
                    pass
            except _WORKER_LOST:
                pass
            raise
        if outcome is None:
            raise RuntimeError(f"worker {worker.name} ended run {self._run['id']} without an outcome")
        outcome.files = outputs.paths(outcome.files)
        return outcome

    def release(self) -> None:
        """Nothing left to release: `execute` freed the worker."""


class RayBackend:
    """Places queued runs on a pool of Ray workers (see queue.RunBackend).

    Workers are made as the cluster offers room for them: when the pool starts, and whenever a
    machine or GPU joins (looked for every `poll_seconds`); a lost worker is replaced the same way.
    """

    def __init__(self, config: RayPoolConfig) -> None:
        self.config = config
        self.output_dir = Path("outputs")
        self._executor: Executor | None = None
        self._wake: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._workers: list[_Worker] = []
        self._retrying = 0
        self._stopping = False
        self._owns_ray = False
        self._gpus = False
        self._look = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="nodegraph-ray-pool", daemon=True)

    def connect(self) -> None:
        """Join the cluster (or start a one-machine one), unless this process already has.
        Raises ConnectionError when the cluster cannot be reached."""
        if not ray.is_initialized():
            ray.init(address=self.config.address)
            self._owns_ray = True

    def start(self, executor: Executor, wake: Callable[[], None]) -> None:
        self.connect()
        self._executor, self._wake = executor, wake
        self.output_dir = executor.output_dir
        self._gpus = self.config.device == "cuda" or (
            self.config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        log.info("Ray worker pool: %s", "one worker per GPU" if self._gpus else
                 f"{self.config.workers_per_node} CPU worker(s) per machine")
        self._grow()
        self._watcher.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            workers, self._workers = self._workers, []
            self._changed.notify_all()
        self._look.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for worker in workers:
            ray.kill(worker.actor)
        if self._owns_ray:
            ray.shutdown()

    def workers(self) -> list[dict[str, Any]]:
        """The pool now: each worker's `name`, `node_id`, `ready`, `run_id` (or None), `runs` and
        `actor` (its Ray handle)."""
        with self._lock:
            return [{"name": w.name, "node_id": w.node_id, "ready": w.ready, "run_id": w.run_id, "runs": w.runs,
                     "actor": w.actor} for w in self._workers]

    # -- placing runs --

    def place(self, run: dict[str, Any]) -> _RayPlacement | None:
        with self._lock:
            free = self._free_workers()
            if self._stopping or self._retrying or not free:
                return None
            keys = self._content_keys(run)
            worker = self._claim(choose_worker(free, set(keys.values())), run["id"])
        return _RayPlacement(self, run, worker, keys)

    def _content_keys(self, run: dict[str, Any]) -> dict[str, str]:
        """The run's cache keys by node id, as this server computes them."""
        assert self._executor is not None
        try:
            return self._executor.cache_keys(self._executor.compile(run["workflow"], run["outputs"]), run["id"])
        except Exception:  # packs changed, a fingerprint failed: the worker meets it too, as the run's failure
            log.debug("no content keys for run %s", run["id"], exc_info=True)
            return {}

    def _free_workers(self) -> list[_Worker]:
        return [worker for worker in self._workers if worker.ready and worker.run_id is None]

    @staticmethod
    def _claim(worker: _Worker, run_id: str) -> _Worker:
        worker.run_id = run_id
        worker.runs += 1
        return worker

    def _worker_for_retry(self, run_id: str, keys: dict[str, str], token: CancelToken) -> _Worker | None:
        """A free worker for a run whose worker was lost, ahead of queued runs; None if the run is
        cancelled or the pool stops first."""
        worker = None
        with self._changed:
            self._retrying += 1
            while worker is None and not (self._stopping or token.cancelled):
                free = self._free_workers()
                if free:
                    worker = self._claim(choose_worker(free, set(keys.values())), run_id)
                else:
                    self._changed.wait()
            self._retrying -= 1
        self._wake()  # queued runs may be placed again
        return worker

    def _hold(self, worker: _Worker, key: str) -> None:
        with self._lock:
            worker.held[key] = None
            worker.held.move_to_end(key)
            while len(worker.held) > HELD_KEYS:
                worker.held.popitem(last=False)

    def _free(self, worker: _Worker) -> None:
        with self._lock:
            worker.run_id = None
            self._changed.notify_all()
        self._wake()

    def _lost(self, worker: _Worker, replace: bool) -> None:
        """Forget a worker; with `replace`, look for room for another now rather than at the next poll."""
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        if replace:
            self._look.set()

    def _changed_state(self) -> None:
        with self._lock:
            self._changed.notify_all()

    # -- growing the pool --

    def _watch(self) -> None:
        while True:
            self._look.wait(self.config.poll_seconds)
            self._look.clear()
            if self._stopping:
                return
            try:
                self._grow()
            except Exception:  # the cluster may be unreachable for a while; try again later
                log.exception("could not look at the Ray cluster")

    def _grow(self) -> None:
        """Make the workers the cluster has room for now; forget idle ones whose machine left."""
        alive = [node for node in ray.nodes() if node["Alive"]]
        alive_ids = {node["NodeID"] for node in alive}
        with self._lock:
            if self._stopping:
                return
            self._workers = [w for w in self._workers if w.node_id is None or w.node_id in alive_ids or w.run_id]
            if self._gpus:
                gpus = int(sum(node["Resources"].get("GPU", 0) for node in alive))
                wanted: list[str | None] = [None] * (gpus - len(self._workers))
            else:
                wanted = []
                for node in alive:
                    if node["Resources"].get("CPU", 0) < self.config.cpus_per_worker:
                        continue  # a machine kept free of work (a head node with num-cpus=0, say)
                    present = sum(1 for w in self._workers if w.node_id == node["NodeID"])
                    wanted.extend([node["NodeID"]] * (self.config.workers_per_node - present))
            made = [self._new_worker(node_id) for node_id in wanted]
            self._workers.extend(made)

    def _new_worker(self, node_id: str | None) -> _Worker:
        options: dict[str, Any] = {"num_cpus": self.config.cpus_per_worker, "num_gpus": 1 if self._gpus else 0,
                                   "max_concurrency": 2, "max_restarts": 0}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        actor = _RemoteRunWorker.options(**options).remote(
            list(self.config.nodes_dirs), self.config.device, self.config.cache_bytes)
        worker = _Worker(actor, node_id)
        actor.describe.remote().future().add_done_callback(lambda future: self._started(worker, future))
        return worker

    def _started(self, worker: _Worker, future: Any) -> None:
        try:
            info = future.result()
        except Exception as error:  # the actor could not start: its machine has no room, or a broken install
            log.error("a Ray worker could not start: %s", error)
            self._lost(worker, replace=False)  # tried again at the next poll, not in a tight loop
            return
        for problem in info["pack_problems"]:
            log.warning("worker %s: %s", info["name"], problem)
        with self._lock:
            worker.name, worker.node_id, worker.ready = info["name"], info["node_id"], True
            count = len(self._workers)
            self._changed.notify_all()
        log.info("worker %s ready (%d in the pool)", worker.name, count)
        self._wake()
