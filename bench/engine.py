"""Engine overhead per node on 1,000-node graphs (chain and wide), first run and cached re-run.

Prints JSON. The nodes do almost nothing, so the time measured is the engine's: validation,
planning, cache keys, input checking, events and cache bookkeeping. A cached re-run reuses the
compiled plan of the identical document (Executor.compile); full validation is timed apart.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from pydantic import Field

from nodegraph.executor import Executor
from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.registry import NodeRegistry
from nodegraph.validation import compile_workflow

N = 1000
REPEATS = 9


class Source(Node):
    """A number."""

    class Inputs(NodeInputs):
        value: float = Field(0.0, ge=-1e9, le=1e9)

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class Step(Node):
    """x + delta."""

    class Inputs(NodeInputs):
        x: float
        delta: float = Field(1.0, ge=-10, le=10)

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.x + inputs.delta)


class Out(Node):
    """Output node."""

    output_node = True

    class Inputs(NodeInputs):
        x: float

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.x)


def chain(seed: float) -> dict:
    nodes = {"n0": {"type": "Source", "inputs": {"value": seed}}}
    for i in range(1, N - 1):
        nodes[f"n{i}"] = {"type": "Step", "inputs": {"x": {"from": f"n{i - 1}", "output": "value"}, "delta": 1}}
    nodes[f"n{N - 1}"] = {"type": "Out", "inputs": {"x": {"from": f"n{N - 2}", "output": "value"}}}
    return {"version": 1, "nodes": nodes}


def wide(seed: float) -> dict:
    nodes = {"src": {"type": "Source", "inputs": {"value": seed}}}
    for i in range(N - 1):
        nodes[f"o{i}"] = {"type": "Out", "inputs": {"x": {"from": "src", "output": "value"}}}
    return {"version": 1, "nodes": nodes}


class Timer:
    """Wall time and this process's CPU time of each timed block. On a shared machine the CPU time
    is what the engine itself spent; the wall time adds the waits for a core."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)

    def ms(self) -> dict:
        return {"median": round(statistics.median(self.wall) * 1e3, 2), "min": round(min(self.wall) * 1e3, 2),
                "cpu_median": round(statistics.median(self.cpu) * 1e3, 2)}


def measure(make_doc) -> dict:
    registry = NodeRegistry()
    registry.add_pack("bench", [Source, Step, Out])
    first, cached, cached_copy, reuse, validate = Timer(), Timer(), Timer(), Timer(), Timer()
    events = []
    for repeat in range(REPEATS):
        executor = Executor(registry)
        data = make_doc(float(repeat))
        with first:
            result = executor.run(data, on_event=events.append)
        assert result.status == "succeeded" and len(result.executed) == N
        with cached:
            result = executor.run(data, on_event=events.append)
        assert result.executed == []
        # An equal document in new objects, as the server decodes each request: reuse goes by content.
        same = json.loads(json.dumps(data))
        with cached_copy:
            result = executor.run(same, on_event=events.append)
        assert result.executed == []
        with reuse:
            executor.compile(same)
        with validate:
            compile_workflow(same, registry, memory_budget=executor.memory_budget)
        events.clear()
    return {
        "nodes": N,
        "first_run_ms": first.ms(),
        "first_run_us_per_node": round(statistics.median(first.wall) / N * 1e6, 1),
        "first_run_cpu_us_per_node": round(statistics.median(first.cpu) / N * 1e6, 1),
        "cached_rerun_ms": cached.ms(),
        "cached_rerun_equal_copy_ms": cached_copy.ms(),
        "plan_reuse_ms": reuse.ms(),
        "full_validation_ms": validate.ms(),
    }


def main() -> None:
    load_before = os.getloadavg()
    report = {"chain": measure(chain), "wide": measure(wide),
              "targets": {"first_run_us_per_node": 60, "cached_rerun_ms": 5},
              "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
              "cpus": os.cpu_count(),
              "note": "times include validation (or plan reuse), planning and events; median and min of %d "
                      "repeats, wall and CPU time; the load average says how busy the machine was" % REPEATS}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
