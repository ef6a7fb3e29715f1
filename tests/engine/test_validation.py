"""Every validation error kind: code, node id and input, all reported at once, nothing run."""

from __future__ import annotations

import json

import pytest

from counting_pack import doc, link
from nodegraph.validation import WorkflowInvalid, compile_workflow


def issues_of(data, registry, outputs=None):
    with pytest.raises(WorkflowInvalid) as caught:
        compile_workflow(data, registry, outputs)
    return caught.value.issues


def only(issues, code):
    found = [i for i in issues if i.code == code]
    assert len(found) == 1, issues
    return found[0]


def test_valid_workflow_compiles_in_dependency_order(registry):
    plan = compile_workflow(doc(
        out=("Sink", {"value": link("sum", "sum")}),
        sum=("Add", {"a": link("x", "value"), "b": 2}),
        x=("Value", {"value": 1}),
        unused=("Value", {"value": 5}),
    ), registry)
    assert plan.order == ["x", "sum", "out"]  # `unused` is not needed by any output
    assert plan.nodes["sum"].literals == {"b": 2.0}


def test_malformed_json_reports_line_and_column(registry):
    text = '{\n  "version": 1,\n  "nodes": {\n    "a": {"type": "Value",}\n  }\n}'
    issue = only(issues_of(text, registry), "invalid_json")
    assert issue.details["line"] == 4
    assert issue.details["column"] == 27  # the stray "}"
    assert "line 4, column 27" in issue.message


def test_document_structure_errors_name_the_node(registry):
    issue = only(issues_of({"version": 1, "nodes": {"a": {"inputs": {}}}}, registry), "invalid_document")
    assert issue.node_id == "a"
    assert "type" in issue.message


def test_newer_version_is_refused(registry):
    issue = only(issues_of({"version": 99, "nodes": {}}, registry), "unsupported_version")
    assert "99" in issue.message


def test_unknown_node_type_suggests_closest(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": 1}), v=("Valeu", {})), registry), "unknown_node_type")
    assert issue.node_id == "v"
    assert issue.details["suggestions"][0] == "Value"
    assert "'Value'" in issue.message


def test_missing_required_input(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": link("a", "sum")}), a=("Add", {"b": 1})), registry),
                 "missing_input")
    assert (issue.node_id, issue.input) == ("a", "a")
    assert "FLOAT" in issue.message


def test_unknown_input_name(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": link("v", "value")}), v=("Value", {"valeu": 1})), registry),
                 "unknown_input")
    assert (issue.node_id, issue.input) == ("v", "valeu")
    assert "'value'" in issue.message


def test_link_to_missing_node(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": link("ghost", "value")})), registry), "missing_node")
    assert (issue.node_id, issue.input) == ("s", "value")
    assert "ghost" in issue.message


def test_link_to_missing_output(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": link("v", "result")}), v=("Value", {})), registry),
                 "missing_output")
    assert (issue.node_id, issue.input) == ("s", "value")
    assert issue.details["outputs"] == ["value"]


def test_type_mismatch_names_both_types(registry):
    issues = issues_of(doc(
        s=("Sink", {"value": link("u", "image")}),
        m=("LoadModel", {}),
        u=("UseModel", {"model": link("m", "model"), "scale": link("c", "text")}),
        c=("Choose", {}),
    ), registry)
    issue = only(issues, "type_mismatch")
    assert (issue.node_id, issue.input) == ("u", "scale")
    assert issue.details == {"expected_type": "FLOAT", "got_type": "STRING"}
    assert "FLOAT" in issue.message and "STRING" in issue.message


def test_int_feeds_float_and_any_accepts_everything(registry):
    registry.add_pack("extra", [])
    compile_workflow(doc(
        s=("Sink", {"value": link("m", "model")}),  # MODEL into ANY
        m=("LoadModel", {}),
    ), registry)
    assert registry.types.compatible("INT", "FLOAT")
    assert not registry.types.compatible("FLOAT", "INT")


def test_cycle_names_its_nodes(registry):
    issue = only(issues_of(doc(
        s=("Sink", {"value": link("a", "sum")}),
        a=("Add", {"a": link("b", "sum")}),
        b=("Add", {"a": link("c", "sum")}),
        c=("Add", {"a": link("a", "sum")}),
    ), registry), "cycle")
    assert issue.details["nodes"] == ["a", "b", "c"]
    assert issue.node_id == "a"


def test_self_loop_is_a_cycle(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": link("a", "sum")}), a=("Add", {"a": link("a", "sum")})),
                           registry), "cycle")
    assert issue.details["nodes"] == ["a"]


@pytest.mark.parametrize("inputs, code, name", [
    ({"value": 5000}, "value_out_of_bounds", "value"),
    ({"value": "high"}, "wrong_value_type", "value"),
    ({"value": True}, "wrong_value_type", "value"),
])
def test_bad_values_on_value_node(registry, inputs, code, name):
    issue = only(issues_of(doc(s=("Sink", {"value": link("v", "value")}), v=("Value", inputs)), registry), code)
    assert (issue.node_id, issue.input) == ("v", name)


@pytest.mark.parametrize("inputs, code, name", [
    ({"mode": "medium"}, "value_not_in_choices", "mode"),
    ({"count": 0}, "value_out_of_bounds", "count"),
    ({"count": 2.5}, "wrong_value_type", "count"),
    ({"flag": "yes"}, "wrong_value_type", "flag"),
])
def test_bad_values_on_choose_node(registry, inputs, code, name):
    issue = only(issues_of(doc(s=("Sink", {"value": link("c", "text")}), c=("Choose", inputs)), registry), code)
    assert (issue.node_id, issue.input) == ("c", name)
    if code == "value_not_in_choices":
        assert issue.details["choices"] == ["fast", "slow"]


def test_literal_for_link_only_input(registry):
    issue = only(issues_of(doc(s=("Sink", {"value": link("u", "image")}), u=("UseModel", {"model": "sd15"})),
                           registry), "link_required")
    assert (issue.node_id, issue.input) == ("u", "model")


def test_no_output_node(registry):
    issue = only(issues_of(doc(v=("Value", {})), registry), "no_output_node")
    assert issue.node_id is None


def test_unknown_requested_output(registry):
    issue = only(issues_of(doc(v=("Value", {})), registry, outputs=["nope"]), "unknown_output_node")
    assert issue.node_id == "nope"


def test_all_errors_reported_at_once(registry, runs):
    issues = issues_of(doc(
        s=("Sink", {"value": link("a", "sum")}),
        a=("Add", {"b": 1, "extra": 2}),
        v=("Value", {"value": 10_000}),
        t=("Nope", {}),
        u=("UseModel", {"model": link("ghost", "model")}),
    ), registry)
    assert {(i.code, i.node_id, i.input) for i in issues} == {
        ("missing_input", "a", "a"),
        ("unknown_input", "a", "extra"),
        ("value_out_of_bounds", "v", "value"),
        ("unknown_node_type", "t", None),
        ("missing_node", "u", "model"),
    }
    assert not runs


def test_issues_serialise_to_json(registry):
    issues = issues_of(doc(v=("Value", {"value": "x"})), registry)
    encoded = json.loads(json.dumps([i.to_json() for i in issues]))
    assert {e["code"] for e in encoded} == {"wrong_value_type", "no_output_node"}


# -- what the document may hold: standard JSON only, bounded in depth and size --

def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("value, code", [
    (float("nan"), "not_finite"), (float("inf"), "not_finite"), (-float("inf"), "not_finite"),
    ("a lone \ud800 surrogate", "invalid_text"), (nested(900), "too_deep"), ({1: "int key"}, "not_json"),
])
def test_values_that_are_not_standard_json_are_refused_naming_node_and_input(registry, executor, runs, value, code):
    workflow = doc(v=("Sink", {"value": value}))
    issue = only(issues_of(workflow, registry), code)
    assert (issue.node_id, issue.input) == ("v", "value")
    assert issue.details["path"].startswith("nodes/v/inputs/value")
    with pytest.raises(WorkflowInvalid):
        executor.run(workflow)
    assert runs == {}  # nothing reached a node


def test_ui_block_and_node_ids_are_checked_too(registry):
    deep_ui = {**doc(v=("Sink", {"value": 1})), "ui": {"groups": nested(900)}}
    issue = only(issues_of(deep_ui, registry), "too_deep")
    assert issue.node_id is None and issue.details["path"].startswith("ui/groups/0/0")
    assert "64 levels" in issue.message
    issue = only(issues_of(doc(**{"v\udc00": ("Sink", {"value": 1})}), registry), "invalid_text")
    assert issue.details["path"] == "nodes/v\\udc00"
    issue = only(issues_of({**doc(v=("Sink", {"value": 1})), "ui": {"zoom": float("nan")}}, registry), "not_finite")
    assert issue.details["path"] == "ui/zoom"


def test_nan_and_huge_numbers_in_json_text_are_refused_with_the_reason(registry):
    for text, problem in (('{"version": 1, "nodes": {"v": {"type": "Sink", "inputs": {"value": NaN}}}}', "not_finite"),
                          ('{"version": 1, "nodes": {"v": {"type": "Sink", "inputs": {"value": 1e400}}}}', "not_finite"),
                          ('{"nodes": {"v": {"type": "Sink", "inputs": {"value": ' + "9" * 5000 + '}}}}', "number_too_long"),
                          ("[" * 100_000 + "]" * 100_000, "too_deep"), (b'{"nodes": "caf\xe9"}', "not_utf8")):
        issue = only(issues_of(text, registry), "invalid_json")
        assert issue.details["problem"] == problem, issue


def test_deep_but_allowed_values_compile(registry):
    plan = compile_workflow(doc(v=("Sink", {"value": nested(60)})), registry)
    assert plan.order == ["v"]


def test_too_many_nodes_is_one_issue_before_the_nodes_are_checked(registry):
    workflow = doc(**{f"n{i}": ("NoSuchType", {}) for i in range(11)})
    issue = only(issues_of_limited(workflow, registry, max_nodes=10), "too_many_nodes")
    assert issue.details == {"nodes": 11, "max_nodes": 10}


def issues_of_limited(data, registry, **limits):
    with pytest.raises(WorkflowInvalid) as caught:
        compile_workflow(data, registry, **limits)
    return caught.value.issues


def test_a_long_value_is_not_echoed_back_whole(registry):
    issue = only(issues_of(doc(v=("Value", {"value": "x" * 100_000}), s=("Sink", {"value": link("v", "value")})),
                           registry), "wrong_value_type")
    assert len(issue.message) < 500 and "100002 characters" in issue.message
    assert "value" not in issue.details


# -- resource bounds: a node's declared memory estimate against what the device holds --

def test_node_estimated_beyond_the_device_is_refused_at_validation(registry):
    workflow = doc(b=("Blob", {"size": 2 * 1024**3}), s=("Sink", {"value": link("b", "data")}))
    issue = only(issues_of_limited(workflow, registry, memory_budget=1024**3), "exceeds_memory")
    assert issue.node_id == "b"
    assert issue.details == {"estimated_bytes": 2 * 1024**3, "device_bytes": 1024**3}
    assert "2.0 GiB" in issue.message and "1.0 GiB" in issue.message
    assert compile_workflow(workflow, registry, memory_budget=4 * 1024**3).order == ["b", "s"]
    assert compile_workflow(workflow, registry).order == ["b", "s"]  # no budget: nothing to check against
