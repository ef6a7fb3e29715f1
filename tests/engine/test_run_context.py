"""RunContext carries the run id and the workflow document being run, for nodes that embed them in files."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.registry import NodeRegistry

SEEN: list[tuple[str, str, dict[str, Any]]] = []


class RecordContext(Node):
    """Notes the run id and workflow its context carries."""

    output_node = True

    class Inputs(NodeInputs):
        label: str = Field("x", description="Anything.")

    class Outputs(NodeOutputs):
        label: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        SEEN.append((ctx.node_id, ctx.run_id, ctx.workflow))
        return self.Outputs(label=inputs.label)


def _executor(tmp_path) -> Executor:
    registry = NodeRegistry()
    registry.add_pack("context-test", [RecordContext])
    return Executor(registry, OutputCache(max_bytes=10**6), device="cpu", output_dir=tmp_path / "out")


def test_nodes_see_the_run_id_and_the_document_with_its_ui_block(tmp_path):
    SEEN.clear()
    document = {"version": 1,
                "nodes": {"a": {"type": "RecordContext", "inputs": {"label": "first"}},
                          "b": {"type": "RecordContext", "inputs": {"label": "second"}}},
                "ui": {"nodes": {"a": {"pos": [10, 20]}}, "groups": []}}
    result = _executor(tmp_path).run(json.dumps(document))
    assert result.status == "succeeded"
    assert sorted(node_id for node_id, _, _ in SEEN) == ["a", "b"]
    for _, run_id, workflow in SEEN:
        assert run_id == result.run_id and run_id
        assert workflow == document


def test_a_given_run_id_and_an_upgraded_old_document(tmp_path):
    SEEN.clear()
    old = {"nodes": {"a": {"type": "RecordContext", "inputs": {"label": "v0"}}}}  # version 0: no version key
    result = _executor(tmp_path).run(old, run_id="run-42")
    assert result.status == "succeeded"
    [(_, run_id, workflow)] = SEEN
    assert run_id == "run-42"
    assert workflow["version"] == 1
    assert workflow["nodes"]["a"] == {"type": "RecordContext", "inputs": {"label": "v0"}}
