"""The Ray backend on a one-machine Ray cluster with two CPU workers: results equal to the local
executor's, a worker killed mid-run, cancellation, failures, cache affinity, events over the API."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'nodegraph[ray]'")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _ray_fixtures import OBJECT_STORE_BYTES, WAIT, wait_until  # noqa: E402
from _server_fixtures import PICTURE_PACK_DIR, PICTURE_WORKFLOW, make_client_factory, submit, wait_status  # noqa: E402
from nodegraph import events as ev  # noqa: E402
from nodegraph.events import Event  # noqa: E402
from nodegraph.executor import Executor  # noqa: E402
from nodegraph.plugins import build_registry  # noqa: E402
from nodegraph.server.queue import RUN_RETRIED, RunQueue, RunStore  # noqa: E402
from nodegraph.server.ray_backend import (SCRATCH_PREFIX, RayBackend, RayPoolConfig, RunOutputs,  # noqa: E402
                                          WrittenFile, choose_worker, sweep_scratch)

REPO = Path(__file__).resolve().parents[2]
RAY_PACK_DIR = Path(__file__).resolve().parent / "ray_packs"
CHECKPOINT = "tiny-shapes.safetensors"
COPY = "tiny-shapes-copy.safetensors"
"""The same weights under another name (and file time): another content key, loaded by no worker yet."""
STEPS = 6
WORKER_THREADS = 1
"""Ray limits a worker's threads to the CPUs it reserves (at least one). The local reference runs
with as many: a reduction split over another number of threads rounds differently, which moves a
few pixels by one level."""


def txt2img(seed: int, checkpoint: str = CHECKPOINT, gate: Path | None = None) -> dict[str, Any]:
    """The shipped text-to-image graph, small; with `gate`, the sampler waits for that file to exist."""
    workflow = copy.deepcopy(json.loads((REPO / "workflows" / "txt2img.json").read_text()))
    nodes = workflow["nodes"]
    nodes["checkpoint"]["inputs"]["name"] = checkpoint
    nodes["sampler"]["inputs"].update(seed=seed, steps=STEPS)
    if gate is not None:
        nodes["gate"] = {"type": "WaitForFile", "inputs": {"path": str(gate), "value": seed}}
        nodes["sampler"]["inputs"]["seed"] = {"from": "gate", "output": "value"}
    return workflow


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run_of_file(path: Path) -> str:
    """The run id a PNG of SaveImage names in its `parameters` text."""
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])["run_id"]


class Recorder:
    """Every event the queue sends, and waits for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, run_id: str, types: tuple[str, ...], node_id: str | None = None) -> Event:
        def found() -> Event | None:
            return next((e for e in self.events if e.run_id == run_id and e.type in types
                         and (node_id is None or e.node_id == node_id)), None)
        with self._changed:
            event = self._changed.wait_for(found, WAIT)
        assert event is not None, f"run {run_id}: no {types} event"
        return event

    def of(self, run_id: str) -> list[Event]:
        with self._changed:
            return [e for e in self.events if e.run_id == run_id]


@dataclass
class Pool:
    queue: RunQueue
    backend: RayBackend
    events: Recorder
    folder: Path

    @property
    def outputs(self) -> Path:
        return self.folder / "outputs"

    def ended(self, run_id: str) -> dict[str, Any]:
        """The run's record once it ended (its end event goes out after the record is stored)."""
        self.events.wait_for(run_id, ev.RUN_ENDED)
        return self.queue.get(run_id)

    def run(self, workflow: dict[str, Any]) -> dict[str, Any]:
        return self.ended(self.queue.submit(workflow))

    def ready(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in self.backend.workers() if w["ready"]}

    def files_of(self, run_id: str) -> list[Path]:
        return [path for path in sorted(self.outputs.rglob("*.png")) if run_of_file(path) == run_id]


def test_the_worker_holding_most_of_a_run_goes_first_then_the_least_used():
    @dataclass
    class Worker:
        held: dict[str, None]
        runs: int

    fresh, busy_with_it, other = Worker({}, 0), Worker({"ckpt": None, "clip": None}, 9), Worker({"x": None}, 1)
    assert choose_worker([fresh, busy_with_it, other], {"ckpt", "clip", "sampler"}) is busy_with_it
    assert choose_worker([fresh, busy_with_it, other], {"another checkpoint"}) is fresh


def test_scratch_folders_of_dead_workers_are_swept(tmp_path):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f"{SCRATCH_PREFIX}{finished.stdout.strip()}"
    (dead / "run-1234").mkdir(parents=True)
    (dead / "run-1234" / "out_00001.png").write_bytes(b"left behind")
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}"
    (alive / "run-5678").mkdir(parents=True)
    other = tmp_path / "someone-else"
    other.mkdir()
    assert sweep_scratch(tmp_path) == [dead]
    assert not dead.exists() and alive.is_dir() and other.is_dir()


def test_files_of_a_node_are_stored_once_per_run_even_when_it_runs_again(tmp_path):
    (tmp_path / "txt2img_00001.png").write_bytes(b"another run's")
    outputs = RunOutputs(tmp_path)
    first = [WrittenFile("/worker-a/run-1/txt2img_00001.png", "txt2img_00001.png", b"first"),
             WrittenFile("/worker-a/run-1/previews/3f2a.png", "previews/3f2a.png", b"preview")]
    event = Event(ev.NODE_FINISHED, "run", "save", {"seconds": 1.0, "files": [f.worker_path for f in first]})
    stored = outputs.receive(event, first)
    # A numbered name takes the next free number here; another name is kept.
    assert stored.data["files"] == [str(tmp_path / "txt2img_00002.png"), str(tmp_path / "previews" / "3f2a.png")]
    assert stored.data["seconds"] == 1.0

    # The run, retried on another worker, finishes the node again: reported with the stored files.
    again = [dataclasses.replace(f, worker_path=f.worker_path.replace("worker-a/run-1", "worker-b/run-2"), data=b"x")
             for f in first]
    restored = outputs.receive(dataclasses.replace(event, data={"files": [f.worker_path for f in again]}), again)
    assert restored.data["files"] == stored.data["files"] == outputs.paths([f.worker_path for f in again])
    assert (tmp_path / "txt2img_00002.png").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["3f2a.png", "txt2img_00001.png", "txt2img_00002.png"]

    escaping = WrittenFile("/worker-a/run-1/../x.png", "../x.png", b"")
    with pytest.raises(ValueError, match="outside its run's folder"):
        outputs.receive(Event(ev.NODE_FINISHED, "run", "bad", {"files": [escaping.worker_path]}), [escaping])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-machine Ray cluster of two CPUs; the models folders also offer a copy of the checkpoint."""
    models = tmp_path_factory.mktemp("models")
    (models / "checkpoints").mkdir()
    shutil.copyfile(REPO / "models" / "checkpoints" / CHECKPOINT, models / "checkpoints" / COPY)
    previous = os.environ.get("NODEGRAPH_MODELS")
    # Set before Ray starts: the workers it starts inherit this process's environment.
    os.environ["NODEGRAPH_MODELS"] = os.pathsep.join([str(models), str(REPO / "models")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=OBJECT_STORE_BYTES)
    yield
    ray.shutdown()
    if previous is None:
        del os.environ["NODEGRAPH_MODELS"]
    else:
        os.environ["NODEGRAPH_MODELS"] = previous


@pytest.fixture(scope="module")
def pool(cluster, tmp_path_factory):
    """A queue on two CPU workers (half a CPU each, leaving room for the API test's own pool)."""
    folder = tmp_path_factory.mktemp("pool")
    registry, problems = build_registry([RAY_PACK_DIR])
    assert problems == []
    backend = RayBackend(RayPoolConfig(device="cpu", workers_per_node=2, cpus_per_worker=0.5,
                                       nodes_dirs=(RAY_PACK_DIR,), poll_seconds=0.5))
    queue = RunQueue(Executor(registry, device="cpu", output_dir=folder / "outputs"), RunStore(folder / "runs.sqlite"),
                     backend)
    events = Recorder()
    queue.subscribe(events)
    queue.start()
    pool = Pool(queue, backend, events, folder)
    wait_until(lambda: len(pool.ready()) == 2, "two workers")
    yield pool
    queue.stop()
    queue.store.close()


@pytest.fixture(scope="module")
def local_pixels(tmp_path_factory) -> Callable[[int], np.ndarray]:
    """The picture the single-machine executor makes for a seed."""
    registry, _ = build_registry([])
    executor = Executor(registry, device="cpu", output_dir=tmp_path_factory.mktemp("local"))
    made: dict[int, np.ndarray] = {}

    def picture(seed: int) -> np.ndarray:
        if seed not in made:
            threads = torch.get_num_threads()
            torch.set_num_threads(WORKER_THREADS)
            try:
                result = executor.run(txt2img(seed))
            finally:
                torch.set_num_threads(threads)
            assert result.status == "succeeded"
            made[seed] = pixels(result.files[0])
        return made[seed]
    return picture


def test_a_batch_runs_on_both_workers_with_the_pixels_of_the_local_executor(pool, local_pixels):
    seeds = [11, 12, 13, 14]
    pool.queue.pause()  # all queued before the first is placed: the first two take one worker each
    ids = [pool.queue.submit(txt2img(seed)) for seed in seeds]
    pool.queue.resume()
    runs = [pool.ended(run_id) for run_id in ids]

    assert [run["status"] for run in runs] == ["succeeded"] * 4
    assert {run["worker"] for run in runs} == set(pool.ready())
    for seed, run in zip(seeds, runs):
        assert [Path(path) for path in run["files"]] == pool.files_of(run["id"])
        assert Path(run["files"][0]).parent == pool.outputs
        np.testing.assert_array_equal(pixels(run["files"][0]), local_pixels(seed))
        progress = [e for e in pool.events.of(run["id"]) if e.type == ev.NODE_PROGRESS and e.node_id == "sampler"]
        assert [e.data["value"] for e in progress] == list(range(1, STEPS + 1))
        assert any(e.type == ev.NODE_PREVIEW for e in pool.events.of(run["id"]))


def test_runs_of_one_checkpoint_go_back_to_the_worker_that_loaded_it(pool):
    before = {name: worker["runs"] for name, worker in pool.ready().items()}
    runs = [pool.run(txt2img(seed, checkpoint=COPY)) for seed in (21, 22, 23)]

    assert [run["status"] for run in runs] == ["succeeded"] * 3
    # Loaded once: the later runs found it in their worker's cache...
    assert [run["nodes"]["checkpoint"]["status"] for run in runs] == ["executed", "cached", "cached"]
    # ...on the worker that ran the first, though the other, idle all along, had run fewer runs.
    gained = {name: worker["runs"] - before[name] for name, worker in pool.ready().items()}
    assert sorted(gained.values()) == [0, 3]
    assert {run["worker"] for run in runs} == {name for name, count in gained.items() if count}


def test_a_run_whose_worker_is_killed_completes_on_the_other(pool, local_pixels, tmp_path):
    gate = tmp_path / "open"
    run_id = pool.queue.submit(txt2img(14, gate=gate))
    pool.events.wait_for(run_id, (ev.NODE_PROGRESS,), node_id="gate")  # held on its worker, mid-run
    killed = wait_until(lambda: next((w for w in pool.backend.workers() if w["run_id"] == run_id), None),
                        "the run's worker")
    ray.kill(killed["actor"])
    retried = pool.events.wait_for(run_id, (RUN_RETRIED,))
    gate.touch()
    run = pool.ended(run_id)

    assert run["status"] == "succeeded"
    assert run["worker"] != killed["name"]
    assert run["attempts"] == [retried.data]
    assert run["attempts"][0]["worker"] == killed["name"] and run["attempts"][0]["error"] == "worker_died"
    types = [e.type for e in pool.events.of(run_id)]
    assert types.count(ev.RUN_STARTED) == 2 and types.count(ev.RUN_FINISHED) == 1
    # Its picture, stored once, and the same as the single-machine executor's.
    assert [Path(path) for path in run["files"]] == pool.files_of(run_id)
    np.testing.assert_array_equal(pixels(run["files"][0]), local_pixels(14))
    # The pool made a worker in place of the killed one.
    wait_until(lambda: len(pool.ready()) == 2 and killed["name"] not in pool.ready(), "a replacement worker")


def test_cancel_a_running_run_by_id(pool, tmp_path):
    run_id = pool.queue.submit(txt2img(31, gate=tmp_path / "never"))
    pool.events.wait_for(run_id, (ev.NODE_PROGRESS,), node_id="gate")
    worker = wait_until(lambda: next((w for w in pool.backend.workers() if w["run_id"] == run_id), None),
                        "the run's worker")
    assert pool.queue.cancel(run_id) == "running"
    run = pool.ended(run_id)

    assert run["status"] == "cancelled" and run["attempts"] == []
    assert run["nodes"]["gate"]["status"] == "cancelled" and run["nodes"]["sampler"]["status"] == "pending"
    assert pool.events.of(run_id)[-1].type == ev.RUN_CANCELLED
    # The worker lives on and takes the next run.
    assert pool.run(txt2img(32))["status"] == "succeeded"
    assert worker["name"] in pool.ready()


def test_a_run_that_fails_by_itself_is_not_retried(pool):
    workflow = {"version": 1, "nodes": {"fail": {"type": "Fail", "inputs": {"message": "no pixels today"}}}}
    run = pool.run(workflow)

    assert run["status"] == "failed" and run["attempts"] == []
    assert run["error"]["node_id"] == "fail" and run["error"]["message"] == "no pixels today"
    assert RUN_RETRIED not in [e.type for e in pool.events.of(run["id"])]
    assert run["worker"] in pool.ready()


@pytest.mark.asyncio
async def test_steps_previews_and_files_reach_the_api(cluster, aiohttp_client, tmp_path):
    """Through the HTTP app: a worker's step events and previews on the WebSocket, its file served."""
    registry, problems = build_registry([PICTURE_PACK_DIR])
    assert problems == []
    backend = RayBackend(RayPoolConfig(device="cpu", cpus_per_worker=0.5, nodes_dirs=(PICTURE_PACK_DIR,)))
    client = await make_client_factory(aiohttp_client, registry, tmp_path)(backend=backend)
    socket = await client.ws_connect("/api/events")
    run_id = await submit(client, PICTURE_WORKFLOW)
    events = []
    while not events or events[-1]["type"] != "run_finished":
        events.append(await asyncio.wait_for(socket.receive_json(), WAIT))

    assert [(e["value"], e["max"]) for e in events if e["type"] == "node_progress"] == [(1, 3), (2, 3), (3, 3)]
    assert [e["image"][:23] for e in events if e["type"] == "node_preview"] == ["data:image/jpeg;base64,"] * 3
    finished = next(e for e in events if e["type"] == "node_finished" and e["node_id"] == "save")
    assert finished["file_urls"] == ["/api/files/outputs/picture_00001.png"]
    image = await client.get(finished["file_urls"][0])
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    run = await wait_status(client, run_id, ("succeeded",))
    assert run["file_urls"] == finished["file_urls"] and run["worker"] == backend.workers()[0]["name"]
    listed = (await (await client.get("/api/workers")).json())["workers"]
    assert [w["name"] for w in listed] == [w["name"] for w in backend.workers()]
    assert run["worker"] in {w["name"] for w in listed}
    assert all(set(w) == {"name", "node_id", "ready", "run_id", "runs"} and w["node_id"] for w in listed)
    await socket.close()
