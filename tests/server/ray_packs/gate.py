"""A test node pack for the Ray backend tests: a node that waits for a file, and one that fails."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext


class WaitForFile(Node):
    """Passes `value` on once the file `path` exists; until then it reports step 0 of 1 and checks for
    cancellation, so a test can hold a run on its worker for as long as it needs."""

    category = "test"
    cache = "never"

    class Inputs(NodeInputs):
        path: str = Field(description="The file to wait for.")
        value: int = Field(0, ge=0, le=2**32 - 1, description="What to pass on.")

    class Outputs(NodeOutputs):
        value: int

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        ctx.progress(0, 1)
        while not Path(inputs.path).exists():
            ctx.check_cancelled()
            time.sleep(0.02)
        ctx.progress(1, 1)
        return self.Outputs(value=inputs.value)


class Fail(Node):
    """Always raises: a run that fails by itself, wherever it runs."""

    category = "test"
    output_node = True

    class Inputs(NodeInputs):
        message: str = Field("broken on purpose", description="The exception's message.")

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        raise ValueError(inputs.message)


NODES: list[type[Node]] = [WaitForFile, Fail]
