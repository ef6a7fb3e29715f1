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
REPEATS = 7


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


def _ms(values: list[float]) -> dict:
    return {"median": round(statistics.median(values) * 1e3, 2), "min": round(min(values) * 1e3, 2)}


def measure(make_doc) -> dict:
    registry = NodeRegistry()
    registry.add_pack("bench", [Source, Step, Out])
    first, cached, cached_copy, reuse, validate = [], [], [], [], []
    events = []
    for repeat in range(REPEATS):
        executor = Executor(registry)
        data = make_doc(float(repeat))
        start = time.perf_counter()
        result = executor.run(data, on_event=events.append)
        first.append(time.perf_counter() - start)
        assert result.status == "succeeded" and len(result.executed) == N
        start = time.perf_counter()
        result = executor.run(data, on_event=events.append)
        cached.append(time.perf_counter() - start)
        assert result.executed == []
        # An equal document in new objects, as the server decodes each request: reuse goes by content.
        same = json.loads(json.dumps(data))
        start = time.perf_counter()
        result = executor.run(same, on_event=events.append)
        cached_copy.append(time.perf_counter() - start)
        assert result.executed == []
        start = time.perf_counter()
        executor.compile(same)
        reuse.append(time.perf_counter() - start)
        start = time.perf_counter()
        compile_workflow(same, registry, memory_budget=executor.memory_budget)
        validate.append(time.perf_counter() - start)
        events.clear()
    return {
        "nodes": N,
        "first_run_ms": _ms(first),
        "first_run_us_per_node": round(statistics.median(first) / N * 1e6, 1),
        "cached_rerun_ms": _ms(cached),
        "cached_rerun_equal_copy_ms": _ms(cached_copy),
        "plan_reuse_ms": _ms(reuse),
        "full_validation_ms": _ms(validate),
    }


def main() -> None:
    load_before = os.getloadavg()
    report = {"chain": measure(chain), "wide": measure(wide),
              "targets": {"first_run_us_per_node": 60, "cached_rerun_ms": 5},
              "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
              "cpus": os.cpu_count(),
              "note": "times include validation (or plan reuse), planning and events; median and min of %d "
                      "repeats; the load average says how busy the machine was" % REPEATS}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
