"""Validation-time checks a node declares: `Node.validate_inputs` (what a named file holds, say) and
`Choices.explain_missing` (why a value is not among the dynamic choices), reported like every other
validation issue: all at once, naming the node and input, before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import pytest

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.node import InputProblem, Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.registry import NodeRegistry
from nodegraph.types import Choices
from nodegraph.validation import WorkflowInvalid, compile_workflow

# What the "shelf" holds: name -> what the file is.
SHELF = {"good.bin": "model", "odd.bin": "AuraFlow"}
LOADS: list[str] = []
CHECKS: list[dict[str, Any]] = []


def _explain(name: str) -> str:
    return f"no shelf file {name!r}; searched /shelf"


class LoadFromShelf(Node):
    """Loads a file from the shelf; refuses at validation what it could not build."""

    output_node = True

    class Inputs(NodeInputs):
        name: Annotated[str, Choices(lambda: sorted(SHELF), kind="shelf", explain_missing=_explain)]
        strength: float = 1.0

    class Outputs(NodeOutputs):
        value: str

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        CHECKS.append(dict(literals))
        if literals["strength"] == 13:
            raise RuntimeError("unlucky")
        held = SHELF[literals["name"]]
        if held != "model":
            return [InputProblem("name", f"{literals['name']} is a {held} model", "unsupported_architecture",
                                 {"architecture": held})]
        return []

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        LOADS.append(inputs.name)
        return self.Outputs(value=inputs.name)


class PlainChoice(Node):
    """Dynamic choices without an explanation: the message counts them."""

    output_node = True

    class Inputs(NodeInputs):
        name: Annotated[str, Choices(lambda: ["a", "b"])]

    class Outputs(NodeOutputs):
        value: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.name)


@pytest.fixture
def registry() -> NodeRegistry:
    LOADS.clear()
    CHECKS.clear()
    registry = NodeRegistry()
    registry.add_pack("shelf", [LoadFromShelf, PlainChoice])
    return registry


def workflow(**nodes: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "nodes": {node_id: {"type": "LoadFromShelf", "inputs": inputs}
                                    for node_id, inputs in nodes.items()}}


def issues(registry: NodeRegistry, document: dict[str, Any]) -> list:
    with pytest.raises(WorkflowInvalid) as caught:
        compile_workflow(document, registry)
    return caught.value.issues


def test_a_node_refuses_what_it_cannot_use_at_validation_naming_node_and_input(registry, tmp_path):
    found = issues(registry, workflow(a={"name": "good.bin"}, b={"name": "odd.bin"}))
    assert [(i.code, i.node_id, i.input) for i in found] == [("unsupported_architecture", "b", "name")]
    assert found[0].message == "input 'name': odd.bin is a AuraFlow model"
    assert found[0].details == {"architecture": "AuraFlow"}
    # The check sees the literal values with defaults filled in.
    assert {"name": "good.bin", "strength": 1.0} in CHECKS
    # Nothing runs on a workflow refused this way.
    executor = Executor(registry, OutputCache(max_bytes=10**6), device="cpu", output_dir=tmp_path)
    with pytest.raises(WorkflowInvalid):
        executor.run(workflow(b={"name": "odd.bin"}))
    assert LOADS == []
    assert executor.run(workflow(a={"name": "good.bin"})).status == "succeeded" and LOADS == ["good.bin"]


def test_the_check_runs_only_on_inputs_that_passed_their_own_checks(registry):
    found = issues(registry, workflow(a={"name": "good.bin", "strength": "strong"}))
    assert [(i.code, i.node_id, i.input) for i in found] == [("wrong_value_type", "a", "strength")]
    assert CHECKS == []


def test_a_check_that_breaks_is_reported_not_raised(registry):
    found = issues(registry, workflow(a={"name": "good.bin", "strength": 13}))
    assert [(i.code, i.node_id) for i in found] == [("input_check_failed", "a")]
    assert "LoadFromShelf could not check its inputs: RuntimeError: unlucky" in found[0].message


def test_a_value_outside_dynamic_choices_is_explained_by_its_provider(registry):
    found = issues(registry, workflow(a={"name": "goood.bin"}))
    assert [(i.code, i.node_id, i.input) for i in found] == [("value_not_in_choices", "a", "name")]
    assert found[0].message == "input 'name': no shelf file 'goood.bin'; searched /shelf; did you mean 'good.bin' or 'odd.bin'?"
    assert found[0].details["value"] == "goood.bin"
    plain = {"version": 1, "nodes": {"p": {"type": "PlainChoice", "inputs": {"name": "c"}}}}
    (issue,) = issues(registry, plain)
    assert issue.message == "input 'name': 'c' is not one of the 2 available choices"
