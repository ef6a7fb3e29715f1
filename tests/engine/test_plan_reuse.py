"""Executor.compile reuses the plan of an identical document, and never a stale one: a changed
document, changed node packs, a changed file that a node fingerprints or checks, or a file gone
from its choices all validate afresh."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Mapping

import pytest

from nodegraph.cache import OutputCache
from nodegraph.executor import PLAN_CACHE_SIZE, Executor
from nodegraph.node import InputProblem, Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.registry import NodeRegistry
from nodegraph.types import Choices
from nodegraph.validation import WorkflowInvalid

import counting_pack

FOLDER: dict[str, Path] = {}  # where the file nodes below look; set by the `folder` fixture
LOADS: list[str] = []


def _folder_files() -> list[str]:
    return sorted(path.name for path in FOLDER["path"].iterdir())


class ReadFile(Node):
    """Reads a file of the folder: fingerprints it (size, mtime) and refuses at validation a file
    that does not start with 'ok'."""

    output_node = True

    class Inputs(NodeInputs):
        name: str

    class Outputs(NodeOutputs):
        text: str

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        stat = (FOLDER["path"] / literals["name"]).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        if not (FOLDER["path"] / literals["name"]).read_text().startswith("ok"):
            return [InputProblem("name", f"{literals['name']} does not start with 'ok'")]
        return []

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        LOADS.append(inputs.name)
        return self.Outputs(text=(FOLDER["path"] / inputs.name).read_text())


class PickFile(Node):
    """Names a file among the folder's (dynamic choices); reads nothing itself."""

    output_node = True

    class Inputs(NodeInputs):
        name: Annotated[str, Choices(_folder_files, kind="files")]

    class Outputs(NodeOutputs):
        name: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(name=inputs.name)


class CheckFlag(Node):
    """Checks its input against a flag file at validation, without a fingerprint."""

    output_node = True

    class Inputs(NodeInputs):
        value: int = 0

    class Outputs(NodeOutputs):
        value: int

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        if (FOLDER["path"] / "forbid").exists():
            return [InputProblem("value", "forbidden by the flag file")]
        return []

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.value)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "files"
    path.mkdir()
    (path / "a.txt").write_text("ok a")
    FOLDER["path"] = path
    LOADS.clear()
    return path


@pytest.fixture
def file_executor(folder: Path, tmp_path: Path) -> Executor:
    registry = NodeRegistry()
    registry.add_pack("files", [ReadFile, PickFile, CheckFlag])
    return Executor(registry, OutputCache(), device="cpu", output_dir=tmp_path / "out", memory_budget=None)


def _document(node_type: str, **inputs: Any) -> dict[str, Any]:
    return {"version": 1, "nodes": {"n": {"type": node_type, "inputs": inputs}}}


def test_identical_document_reuses_its_plan_whatever_objects_carry_it(executor: Executor) -> None:
    document = {"version": 1, "nodes": {"a": {"type": "Value", "inputs": {"value": 2.0}},
                                        "s": {"type": "Add", "inputs": {"a": {"from": "a", "output": "value"}}}}}
    plan = executor.compile(document, ["s"])
    assert executor.compile(document, ["s"]) is plan
    assert executor.compile(json.loads(json.dumps(document)), ["s"]) is plan  # equal content, new objects
    text = json.dumps(document)
    from_text = executor.compile(text, ["s"])
    assert executor.compile(text, ["s"]) is from_text
    assert executor.compile(text.encode(), ["s"]) is executor.compile(text.encode(), ["s"])


def test_cached_rerun_of_a_reused_plan_runs_nothing(executor: Executor, runs) -> None:
    document = {"version": 1, "nodes": {"a": {"type": "Value", "inputs": {"value": 2.0}},
                                        "s": {"type": "Add", "inputs": {"a": {"from": "a", "output": "value"}}}}}
    first = executor.run(document, ["s"])
    second = executor.run(json.loads(json.dumps(document)), ["s"])
    assert first.executed == ["a", "s"] and second.executed == [] and second.cached == ["s"]
    assert runs == {"a": 1, "s": 1}


@pytest.mark.parametrize("equal_in_python", [1.0, True])
def test_values_equal_in_python_but_not_in_json_are_not_confused(executor: Executor, equal_in_python: Any) -> None:
    document = {"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": 1}}}}
    plan = executor.compile(document, ["a"])
    assert {"value": equal_in_python} == {"value": 1}
    with pytest.raises(WorkflowInvalid) as invalid:  # Count.value is strictly an integer
        executor.compile({"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": equal_in_python}}}},
                         ["a"])
    assert [i.code for i in invalid.value.issues] == ["wrong_value_type"]
    assert executor.compile(document, ["a"]) is plan


def test_value_change_reruns_only_what_changed(executor: Executor, runs) -> None:
    document = {"version": 1, "nodes": {"a": {"type": "Value", "inputs": {"value": 2.0}},
                                        "b": {"type": "Value", "inputs": {"value": 5.0}},
                                        "s": {"type": "Add", "inputs": {"a": {"from": "a", "output": "value"},
                                                                        "b": {"from": "b", "output": "value"}}}}}
    assert executor.run(document, ["s"]).results["s"].outputs.sum == 7.0
    document["nodes"]["a"]["inputs"]["value"] = 3.0  # the same dict object, changed in place
    result = executor.run(document, ["s"])
    assert result.results["s"].outputs.sum == 8.0
    assert sorted(result.executed) == ["a", "s"]


def test_a_tuple_is_not_taken_for_the_list_of_a_valid_document(executor: Executor) -> None:
    valid = {"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": 1}}}, "ui": {"pos": [1, 2]}}
    executor.compile(valid, ["a"])
    with pytest.raises(WorkflowInvalid) as invalid:
        executor.compile({**valid, "ui": {"pos": (1, 2)}}, ["a"])
    assert invalid.value.issues[0].code == "not_json"


def test_changes_to_the_callers_objects_do_not_reach_a_kept_plan(executor: Executor) -> None:
    document = {"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": 1}}}, "ui": {"pos": [1, 2]}}
    plan = executor.compile(document, ["a"])
    document["ui"]["pos"].append(3)
    document["nodes"]["a"]["inputs"]["value"] = 9
    again = executor.compile({"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": 1}}},
                              "ui": {"pos": [1, 2]}}, ["a"])
    assert again is plan
    assert plan.workflow.ui == {"pos": [1, 2]} and plan.nodes["a"].literals["value"] == 1


def test_outputs_and_memory_budget_are_part_of_the_identity(registry: NodeRegistry, tmp_path: Path) -> None:
    executor = Executor(registry, device="cpu", output_dir=tmp_path, memory_budget=None)
    document = {"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": 1}},
                                        "b": {"type": "Count", "inputs": {"value": 2}}}}
    only_a = executor.compile(document, ["a"])
    only_b = executor.compile(document, ["b"])
    assert only_a.order == ["a"] and only_b.order == ["b"]
    other_budget = Executor(registry, device="cpu", output_dir=tmp_path, memory_budget=10**6)
    other_budget._plans = executor._plans  # the same store, another budget: not the same plan
    assert other_budget.compile(document, ["a"]) is not only_a


def test_a_new_node_pack_invalidates_kept_plans(executor: Executor) -> None:
    document = {"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": 1}}}}
    plan = executor.compile(document, ["a"])
    executor.registry.add_pack("more", [CheckFlag])
    assert executor.compile(document, ["a"]) is not plan
    fresh = executor.compile(document, ["a"])
    assert executor.compile(document, ["a"]) is fresh
    other = NodeRegistry()
    other.add_pack("counting", counting_pack.NODES)
    executor.registry = other  # same generation number, another registry
    assert executor.compile(document, ["a"]) is not fresh


def test_a_changed_fingerprinted_file_is_validated_again(file_executor: Executor, folder: Path) -> None:
    document = _document("ReadFile", name="a.txt")
    plan = file_executor.compile(document)
    assert file_executor.compile(document) is plan
    (folder / "a.txt").write_text("bad now")  # size and contents change; the node's check now refuses it
    with pytest.raises(WorkflowInvalid) as invalid:
        file_executor.compile(document)
    assert [(i.node_id, i.input) for i in invalid.value.issues] == [("n", "name")]


def test_a_fingerprint_change_alone_recompiles_and_reruns(file_executor: Executor, folder: Path) -> None:
    document = _document("ReadFile", name="a.txt")
    plan = file_executor.compile(document)
    assert file_executor.run(document).results["n"].outputs.text == "ok a"
    stat = (folder / "a.txt").stat()
    os.utime(folder / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, still valid
    assert file_executor.compile(document) is not plan
    (folder / "a.txt").write_text("ok b")
    result = file_executor.run(document)
    assert result.executed == ["n"] and result.results["n"].outputs.text == "ok b"


def test_a_file_gone_from_its_choices_is_validated_again(file_executor: Executor, folder: Path) -> None:
    document = _document("PickFile", name="a.txt")
    plan = file_executor.compile(document)
    assert file_executor.compile(document) is plan
    (folder / "a.txt").unlink()
    with pytest.raises(WorkflowInvalid) as invalid:
        file_executor.compile(document)
    assert [(i.code, i.node_id, i.input) for i in invalid.value.issues] == [("value_not_in_choices", "n", "name")]


def test_a_nodes_own_check_is_made_again_on_reuse(file_executor: Executor, folder: Path) -> None:
    document = _document("CheckFlag", value=1)
    plan = file_executor.compile(document)
    assert file_executor.compile(document) is plan
    (folder / "forbid").write_text("")
    with pytest.raises(WorkflowInvalid) as invalid:
        file_executor.compile(document)
    assert [(i.node_id, i.input) for i in invalid.value.issues] == [("n", "value")]


def test_outside_checks_cover_nodes_the_outputs_do_not_need(file_executor: Executor, folder: Path) -> None:
    document = {"version": 1, "nodes": {"keep": {"type": "CheckFlag", "inputs": {"value": 1}},
                                        "pick": {"type": "PickFile", "inputs": {"name": "a.txt"}}}}
    plan = file_executor.compile(document, ["keep"])
    assert plan.order == ["keep"]
    (folder / "a.txt").unlink()
    with pytest.raises(WorkflowInvalid) as invalid:
        file_executor.compile(document, ["keep"])
    assert [(i.code, i.node_id) for i in invalid.value.issues] == [("value_not_in_choices", "pick")]


def test_kept_plans_are_bounded(executor: Executor) -> None:
    documents = [{"version": 1, "nodes": {"a": {"type": "Count", "inputs": {"value": i}}}}
                 for i in range(PLAN_CACHE_SIZE + 1)]
    first = executor.compile(documents[0], ["a"])
    for document in documents[1:]:
        executor.compile(document, ["a"])
    assert len(executor._plans) == PLAN_CACHE_SIZE
    assert executor.compile(documents[0], ["a"]) is not first  # the least recently used went first
