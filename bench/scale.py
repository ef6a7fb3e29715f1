"""Throughput of the run queue on one and two Ray workers, and the Ray path's cost per run (prints JSON).

    python bench/scale.py [--runs 12] [--steps 8] [--cpus 2]

Starts a one-machine Ray cluster of `--cpus` CPUs, then, for each way of running, queues `--runs`
independent runs of the shipped text-to-image graph (workflows/txt2img.json on the embedded
tiny-shapes checkpoint, 64x64, `--steps` sampler steps, each run its own seed) and measures the
wall time from the queue's resume to the last run's end:

- `local`: the default backend, in this process (torch on one thread, as a worker reserving one CPU);
- `ray_1_worker` and `ray_2_workers`: the Ray backend, one CPU per worker.

Every worker first runs one warm-up run, so the checkpoint is loaded before timing starts: the
figures are for a warm pool, the steady state of a server. The same is done with a trivial graph
(three arithmetic nodes) to isolate the fixed cost per run of the Ray path (placing, the actor
call, streaming events back, storing outputs). Reports throughput (runs per second), the 2:1
worker ratio, and the Ray path's extra seconds per run over the local path. The machine's load
average is reported before and after: other work on the same cores changes every figure.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nodegraph import events as ev
from nodegraph.events import Event
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph.server.queue import RunBackend, RunQueue, RunStore

try:
    import ray

    from nodegraph.server.ray_backend import RayBackend, RayPoolConfig
except ImportError as missing:
    sys.exit(f"bench/scale.py needs Ray ({missing}): pip install 'nodegraph[ray]'")

REPO = Path(__file__).resolve().parents[1]
WORKER_THREADS = 1


def txt2img(seed: int, steps: int) -> dict[str, Any]:
    workflow = copy.deepcopy(json.loads((REPO / "workflows" / "txt2img.json").read_text()))
    workflow["nodes"]["sampler"]["inputs"].update(seed=seed, steps=steps)
    return workflow


def trivial(number: int) -> dict[str, Any]:
    """Three arithmetic nodes; `number` makes every run's cache keys its own."""
    return {"version": 1, "nodes": {
        "n": {"type": "Integer", "inputs": {"value": number}},
        "text": {"type": "FormatText", "inputs": {"template": "{a}", "a": {"from": "n", "output": "value"}}},
        "save": {"type": "SaveText", "inputs": {"text": {"from": "text", "output": "text"}}}}}


class Ends:
    """Run end events as they arrive."""

    def __init__(self) -> None:
        self.ended: dict[str, Event] = {}
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        if event.type in ev.RUN_ENDED:
            with self._changed:
                self.ended[event.run_id] = event
                self._changed.notify_all()

    def wait(self, run_ids: list[str], timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: all(run_id in self.ended for run_id in run_ids), timeout):
                raise TimeoutError(f"runs did not end within {timeout} s")


def batch(queue: RunQueue, ends: Ends, workflows: list[dict[str, Any]], timeout: float) -> float:
    """Queue every workflow, then let them run; seconds from the start to the last end. All must succeed."""
    queue.pause()
    ids = [queue.submit(workflow) for workflow in workflows]
    started = time.perf_counter()
    queue.resume()
    ends.wait(ids, timeout)
    seconds = time.perf_counter() - started
    failed = [queue.get(run_id) for run_id in ids if queue.get(run_id)["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) did not succeed; first: {failed[0]['status']} {failed[0]['error']}")
    return seconds


def measure(name: str, backend: RunBackend | None, workers: int, make: Callable[[int], dict[str, Any]], runs: int,
            folder: Path, timeout: float) -> dict[str, Any]:
    registry, _ = build_registry([])
    place = folder / name
    queue = RunQueue(Executor(registry, device="cpu", output_dir=place / "outputs"), RunStore(place.with_suffix(".sqlite")),
                     backend)
    ends = Ends()
    queue.subscribe(ends)
    queue.start()
    try:
        if isinstance(backend, RayBackend):
            deadline = time.monotonic() + timeout
            while sum(1 for worker in backend.workers() if worker["ready"]) < workers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{workers} Ray worker(s) did not start within {timeout} s")
                time.sleep(0.1)
        batch(queue, ends, [make(10_000 + index) for index in range(workers)], timeout)  # one warm-up each
        seconds = batch(queue, ends, [make(index) for index in range(runs)], timeout)
    finally:
        queue.stop()
        queue.store.close()
    return {"workers": workers, "runs": runs, "seconds": round(seconds, 3), "runs_per_second": round(runs / seconds, 3),
            "seconds_per_run": round(seconds / runs, 4)}


def ray_backend(workers: int) -> RayBackend:
    return RayBackend(RayPoolConfig(device="cpu", workers_per_node=workers, cpus_per_worker=1, poll_seconds=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="timed runs per measurement")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps of each text-to-image run")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one batch")
    args = parser.parse_args()
    os.environ.setdefault("NODEGRAPH_MODELS", str(REPO / "models"))  # before Ray starts: its workers inherit it
    torch.set_num_threads(WORKER_THREADS)
    load_before = os.getloadavg()
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "ray_cpus": args.cpus, "torch_threads_per_run": WORKER_THREADS,
                              "steps": args.steps, "load_average_before": [round(x, 2) for x in load_before]}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(temporary)
            for graph, make in (("txt2img", functools.partial(txt2img, steps=args.steps)), ("trivial", trivial)):
                figures = {"local": measure(f"{graph}-local", None, 1, make, args.runs, folder, args.timeout),
                           "ray_1_worker": measure(f"{graph}-ray1", ray_backend(1), 1, make, args.runs, folder,
                                                   args.timeout)}
                if graph == "txt2img":
                    figures["ray_2_workers"] = measure(f"{graph}-ray2", ray_backend(2), 2, make, args.runs, folder,
                                                       args.timeout)
                    figures["two_to_one_worker_throughput"] = round(
                        figures["ray_2_workers"]["runs_per_second"] / figures["ray_1_worker"]["runs_per_second"], 3)
                figures["ray_overhead_seconds_per_run"] = round(
                    figures["ray_1_worker"]["seconds_per_run"] - figures["local"]["seconds_per_run"], 4)
                result[graph] = figures
    finally:
        ray.shutdown()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
