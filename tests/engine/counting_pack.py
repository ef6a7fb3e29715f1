"""Nodes for engine tests: each counts its executions so tests can assert what ran."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import ANY, IMAGE, MODEL

RUNS: collections.Counter[str] = collections.Counter()


class Value(Node):
    """A number, counting executions."""

    class Inputs(NodeInputs):
        value: float = Field(0.0, ge=-1000, le=1000)

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(value=inputs.value)


class Count(Node):
    """An integer, counting executions."""

    class Inputs(NodeInputs):
        value: int = 0

    class Outputs(NodeOutputs):
        value: int

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(value=inputs.value)


class Add(Node):
    """a + b, counting executions."""

    class Inputs(NodeInputs):
        a: float
        b: float = 0.0

    class Outputs(NodeOutputs):
        sum: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(sum=inputs.a + inputs.b)


class Choose(Node):
    """Picks a mode; exercises enum and integer bounds."""

    class Inputs(NodeInputs):
        mode: Literal["fast", "slow"] = "fast"
        count: int = Field(1, ge=1, le=10, multiple_of=1)
        flag: bool = False

    class Outputs(NodeOutputs):
        text: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(text=f"{inputs.mode}:{inputs.count}:{inputs.flag}")


class LoadModel(Node):
    """Returns a MODEL-typed object (a dict), counting executions."""

    class Inputs(NodeInputs):
        name: str = "m"

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(model={"name": inputs.name})


class UseModel(Node):
    """Takes a MODEL link (link-only input)."""

    class Inputs(NodeInputs):
        model: MODEL.annotation
        scale: float = 1.0

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(image=(inputs.model["name"], inputs.scale))


class PatchModel(Node):
    """MODEL in, MODEL out (a LoRA's shape): a bypass passes the model through. Its `tag` is a
    link-capable text input ahead of the model, so a bypass must pick the input by type."""

    class Inputs(NodeInputs):
        tag: str = "patched"
        model: MODEL.annotation

    class Outputs(NodeOutputs):
        model: MODEL.annotation
        tag: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(model={"name": f"{inputs.model['name']}+{inputs.tag}"}, tag=inputs.tag)


class Blob(Node):
    """Holds `size` bytes, to exercise the cache's byte bound and memory estimates."""

    class Inputs(NodeInputs):
        size: int = Field(1000, ge=0)
        tag: str = ""

    class Outputs(NodeOutputs):
        data: IMAGE.annotation

    @classmethod
    def estimated_bytes(cls, inputs) -> int | None:
        return inputs.get("size")

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(data=bytearray(inputs.size))


class ReadFile(Node):
    """Reads a file; its fingerprint is the file's size and mtime."""

    class Inputs(NodeInputs):
        path: str

    class Outputs(NodeOutputs):
        text: str

    @classmethod
    def fingerprint(cls, literals: dict) -> str:
        stat = Path(literals["path"]).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(text=Path(inputs.path).read_text())


class RandomValue(Node):
    """Never cached: stands for a node that reads the clock."""

    cache = "never"

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: NodeInputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(value=time.time())


class Steps(Node):
    """Reports progress for `steps` steps of `delay` seconds each."""

    class Inputs(NodeInputs):
        steps: int = Field(10, ge=1)
        delay: float = 0.0
        x: float = 0.0

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        for step in range(1, inputs.steps + 1):
            time.sleep(inputs.delay)
            ctx.progress(step, inputs.steps)
        return self.Outputs(value=inputs.x)


class Fail(Node):
    """Raises, to exercise failure reporting."""

    class Inputs(NodeInputs):
        x: float = 0.0

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        raise RuntimeError("boom")


class Sink(Node):
    """Output node collecting any value."""

    output_node = True

    class Inputs(NodeInputs):
        value: ANY.annotation = None

    class Outputs(NodeOutputs):
        value: ANY.annotation = None

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        RUNS[ctx.node_id] += 1
        return self.Outputs(value=inputs.value)


def link(node: str, output: str) -> dict:
    return {"from": node, "output": output}


def doc(**nodes: tuple[str, dict]) -> dict:
    """A version-1 workflow document from `node_id=(type, inputs)` pairs."""
    return {"version": 1, "nodes": {n: {"type": t, "inputs": i} for n, (t, i) in nodes.items()}}


NODES = [Value, Count, Add, Choose, LoadModel, UseModel, PatchModel, Blob, ReadFile, RandomValue, Steps, Fail, Sink]
