"""Bypassed and muted nodes (a node's `mode`): what runs, what passes through, what validation
reports, and cache keys that see through a bypass."""

from __future__ import annotations

import json

import pytest

from counting_pack import doc, link
from nodegraph.validation import WorkflowInvalid, compile_workflow, parse_document
from nodegraph.workflow import document_schema


def with_modes(data: dict, **modes: str) -> dict:
    for node_id, mode in modes.items():
        data["nodes"][node_id]["mode"] = mode
    return data


def issues_of(data, registry, outputs=None):
    with pytest.raises(WorkflowInvalid) as caught:
        compile_workflow(data, registry, outputs)
    return caught.value.issues


def chain(**modes: str) -> dict:
    """v (3) -> add (+10) -> out; add's first input a literal, the value arriving on its second."""
    return with_modes(doc(v=("Value", {"value": 3}), add=("Add", {"a": 1, "b": link("v", "value")}),
                          out=("Sink", {"value": link("add", "sum")})), **modes)


def test_bypassed_node_passes_its_first_linked_input_of_the_output_type(executor, runs):
    result = executor.run(chain(add="bypass"))
    assert result.status == "succeeded"
    assert result.results["out"].outputs.value == 3  # v's value, not 1 + 3: `a` is a literal, `b` the link
    assert dict(runs) == {"v": 1, "out": 1}
    assert "add" not in result.results


def test_bypass_picks_the_input_by_type_not_position(executor, runs, registry):
    # PatchModel declares a text input before its model: the model output takes the model input.
    data = with_modes(doc(load=("LoadModel", {"name": "base"}), text=("Choose", {}),
                          patch=("PatchModel", {"tag": link("text", "text"), "model": link("load", "model")}),
                          use=("UseModel", {"model": link("patch", "model")}), out=("Sink", {"value": link("use", "image")})),
                      patch="bypass")
    plan = compile_workflow(data, registry)
    assert plan.nodes["use"].links["model"].source == "load"
    assert plan.order == ["load", "use", "out"]  # text fed only the bypassed node
    assert executor.run(plan).results["out"].outputs.value == ("base", 1.0)
    del data["nodes"]["patch"]["mode"]
    assert executor.run(data).results["out"].outputs.value == ("base+fast:1:False", 1.0)


def test_bypassed_node_literals_are_not_checked_but_its_links_are(registry):
    data = with_modes(doc(v=("Value", {"value": 2}), s=("Steps", {"steps": 0, "x": link("v", "value")}),
                          out=("Sink", {"value": link("s", "value")})), s="bypass")
    assert compile_workflow(data, registry).nodes["out"].links["value"].source == "v"  # steps 0 is below its minimum
    data["nodes"]["s"]["inputs"]["x"] = link("ghost", "value")
    issue = next(i for i in issues_of(data, registry) if i.code == "missing_node")
    assert (issue.node_id, issue.input) == ("s", "x")


def test_bypass_without_a_linked_input_of_the_output_type_is_named(registry):
    # The bypassed Add's FLOAT `a` is a literal and `b` is left out: nothing to pass to the required
    # `a` of the Add it feeds.
    data = with_modes(doc(add=("Add", {"a": 1}), use=("Add", {"a": link("add", "sum")}),
                          out=("Sink", {"value": link("use", "sum")})), add="bypass")
    [issue] = issues_of(data, registry)
    assert (issue.code, issue.node_id, issue.input) == ("bypass_unfed", "use", "a")
    assert issue.details == {"from": "add", "output": "sum", "type": "FLOAT", "via": ["add"]}
    assert "'add' (Add) is bypassed" in issue.message and "FLOAT" in issue.message and "'sum'" in issue.message


def test_bypass_feeding_nothing_into_an_optional_input_leaves_it_unconnected(executor, runs):
    # As ComfyUI drops the link: Sink's optional `value` reads its default, and the bypassed
    # UseModel (MODEL in, IMAGE out) and the loader only it needed do not run.
    data = with_modes(doc(load=("LoadModel", {}), use=("UseModel", {"model": link("load", "model")}),
                          out=("Sink", {"value": link("use", "image")})), use="bypass")
    result = executor.run(data)
    assert result.status == "succeeded"
    assert result.results["out"].outputs.value is None
    assert dict(runs) == {"out": 1}


def test_muted_output_node_does_not_run(executor, runs):
    data = with_modes(doc(v=("Value", {"value": 1}), w=("Value", {"value": 2}), kept=("Sink", {"value": link("v", "value")}),
                          muted=("Sink", {"value": link("w", "value")})), muted="mute")
    result = executor.run(data)
    assert result.status == "succeeded" and result.outputs == ["kept"]
    assert dict(runs) == {"v": 1, "kept": 1}  # neither the muted sink nor the value only it needed


def test_muted_node_feeding_a_needed_node_is_named(registry):
    data = with_modes(chain(), v="mute")
    [issue] = issues_of(data, registry)
    assert (issue.code, issue.node_id, issue.input) == ("muted_source", "add", "b")
    assert issue.details["muted"] == "v" and "'v' (Value), which is muted" in issue.message


def test_muted_node_feeding_only_unneeded_nodes_is_fine(executor, runs):
    # A muted head and a muted tail: the nodes between them are needed by no output.
    data = doc(v=("Value", {"value": 1}), add=("Add", {"a": link("v", "value")}), tail=("Sink", {"value": link("add", "sum")}),
               other=("Sink", {"value": 5}))
    result = executor.run(with_modes(data, v="mute", tail="mute"))
    assert result.status == "succeeded" and dict(runs) == {"other": 1}


def test_muted_node_reached_through_a_bypass_is_named(registry):
    [issue] = issues_of(chain(add="bypass", v="mute"), registry)
    assert (issue.code, issue.node_id, issue.details["muted"], issue.details["via"]) == ("muted_source", "out", "v", ["add"])


def test_chain_of_bypassed_nodes(executor, runs, registry):
    data = doc(v=("Value", {"value": 7}), first=("Add", {"a": link("v", "value"), "b": 100}),
               second=("Add", {"a": link("first", "sum"), "b": 1000}), out=("Sink", {"value": link("second", "sum")}))
    with_modes(data, first="bypass", second="bypass")
    plan = compile_workflow(data, registry)
    assert plan.order == ["v", "out"] and plan.nodes["out"].links["value"].source == "v"
    assert executor.run(plan).results["out"].outputs.value == 7
    assert dict(runs) == {"v": 1, "out": 1}
    # Only the second bypassed: the first runs and its sum passes on.
    del data["nodes"]["first"]["mode"]
    assert executor.run(data).results["out"].outputs.value == 107


def test_bypassed_nodes_feeding_each_other_are_a_cycle(registry):
    data = doc(first=("Add", {"a": link("second", "sum")}), second=("Add", {"a": link("first", "sum")}),
               out=("Sink", {"value": link("second", "sum")}))
    [issue] = issues_of(with_modes(data, first="bypass", second="bypass"), registry)
    assert (issue.code, issue.node_id) == ("cycle", "out")
    assert sorted(issue.details["nodes"]) == ["first", "second"]


def test_type_mismatch_through_a_bypass_names_the_bypassed_node(registry):
    # The bypassed node passes a MODEL into an input that wants a FLOAT.
    data = with_modes(doc(load=("LoadModel", {}), patch=("PatchModel", {"model": link("load", "model")}),
                          add=("Add", {"a": link("patch", "model")}), out=("Sink", {"value": link("add", "sum")})),
                      patch="bypass")
    issue = next(i for i in issues_of(data, registry) if i.node_id == "add")
    assert issue.code == "type_mismatch" and issue.details["via"] == ["patch"]
    assert "load.model (passed through bypassed node 'patch') is MODEL" in issue.message


@pytest.mark.parametrize("mode", ["skip", 4, True, ["bypass"], "Bypass"])
def test_invalid_mode_is_named_with_its_node_and_field(registry, mode):
    data = doc(v=("Value", {"value": 1}), out=("Sink", {"value": link("v", "value")}))
    data["nodes"]["v"]["mode"] = mode
    [issue] = issues_of(data, registry)
    assert (issue.code, issue.node_id) == ("invalid_mode", "v")
    assert issue.details["field"] == "mode" and issue.details["path"] == "nodes/v/mode"
    assert issue.details["choices"] == ["bypass", "mute"]
    assert "'mode'" in issue.message and "'bypass' or 'mute'" in issue.message


def test_requested_output_that_does_not_run_is_named(registry):
    data = with_modes(chain(), out="mute")
    [issue] = issues_of(data, registry, outputs=["out"])
    assert (issue.code, issue.node_id, issue.details) == ("output_not_run", "out", {"mode": "mute"})
    [issue] = issues_of(data, registry)  # no output node left that runs
    assert issue.code == "no_output_node" and issue.details == {"idle_outputs": ["out"]}


def test_cache_keys_see_through_a_bypass(executor, runs):
    direct = doc(v=("Value", {"value": 3}), out=("Sink", {"value": link("v", "value")}))
    executor.run(direct)
    runs.clear()
    # v -> add (bypassed) -> out is the same computation as v -> out: out's result is reused.
    result = executor.run(chain(add="bypass"))
    assert result.cached == ["out"] and dict(runs) == {} and result.results["out"].outputs.value == 3
    assert executor.cache_keys(executor.compile(chain(add="bypass")), "r") == executor.cache_keys(executor.compile(direct), "r")


def test_toggling_a_bypass_reuses_both_results(executor, runs):
    executor.run(chain())
    assert dict(runs) == {"v": 1, "add": 1, "out": 1}
    runs.clear()
    bypassed = executor.run(chain(add="bypass"))
    assert bypassed.results["out"].outputs.value == 3
    assert bypassed.executed == ["out"] and dict(runs) == {"out": 1}  # out's key changed: it is fed by v now
    runs.clear()
    again = executor.run(chain())
    assert again.results["out"].outputs.value == 4 and again.cached == ["out"] and dict(runs) == {}
    runs.clear()
    assert executor.run(chain(add="bypass")).cached == ["out"] and dict(runs) == {}


def test_a_saved_document_leaves_mode_out_for_nodes_that_run():
    data = chain(add="bypass")
    saved = parse_document(json.dumps(data)).to_json()
    assert saved["nodes"]["add"]["mode"] == "bypass"
    assert "mode" not in saved["nodes"]["v"] and "mode" not in saved["nodes"]["out"]
    assert saved == {**data, "ui": {}}


def test_schema_accepts_modes_and_refuses_others(registry):
    jsonschema = pytest.importorskip("jsonschema")
    schema = document_schema(registry)
    for mode in ("bypass", "mute"):
        jsonschema.validate(chain(add=mode), schema)
        jsonschema.validate(chain(add=mode), document_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chain(add="skip"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chain(add="skip"), document_schema())
