"""The workflow document: links, version upgrades, the JSON Schema."""

from __future__ import annotations

import json

import pytest

from counting_pack import doc, link
from nodegraph.validation import compile_workflow, parse_document
from nodegraph.workflow import WORKFLOW_VERSION, Workflow, as_link, document_schema, upgrade


def test_version_0_document_is_upgraded():
    old = {"nodes": {"v": {"type": "Value", "inputs": {"value": 2}},
                     "s": {"type": "Sink", "inputs": {"value": ["v", "value"]}}}}
    new = upgrade(old)
    assert new["version"] == WORKFLOW_VERSION
    assert new["nodes"]["s"]["inputs"]["value"] == {"from": "v", "output": "value"}
    assert old["nodes"]["s"]["inputs"]["value"] == ["v", "value"]  # input untouched


def test_upgraded_document_runs(executor):
    result = executor.run({"nodes": {"v": {"type": "Value", "inputs": {"value": 2}},
                                     "s": {"type": "Sink", "inputs": {"value": ["v", "value"]}}}})
    assert result.results["s"].outputs.value == 2


def test_ui_block_never_changes_what_runs(executor, runs):
    data = doc(v=("Value", {"value": 1}), s=("Sink", {"value": link("v", "value")}))
    executor.run(data)
    runs.clear()
    data["ui"] = {"nodes": {"v": {"pos": [10, 20]}}, "groups": []}
    result = executor.run(data)
    assert dict(runs) == {}
    assert result.status == "succeeded"


def test_round_trip_keeps_links_and_ui():
    data = doc(v=("Value", {"value": 1}), s=("Sink", {"value": link("v", "value")}))
    data["ui"] = {"nodes": {"v": {"pos": [1, 2]}}}
    assert parse_document(json.dumps(data)).to_json() == data


def test_as_link_distinguishes_links_from_literals():
    assert as_link({"from": "a", "output": "b"}).source == "a"
    assert as_link({"from": "a"}) is None
    assert as_link({"from": "a", "output": "b", "x": 1}) is None
    assert as_link("a") is None


def test_schema_describes_documents_and_node_inputs(registry):
    schema = document_schema(registry)
    assert schema["properties"]["version"]["default"] == WORKFLOW_VERSION
    value_node = schema["$defs"]["node_Value"]["properties"]["inputs"]["properties"]["value"]
    assert value_node["anyOf"][0] == {"type": "number", "maximum": 1000, "minimum": -1000}
    use_model = schema["$defs"]["node_UseModel"]["properties"]["inputs"]
    assert use_model["properties"]["model"] == {"$ref": "#/$defs/Link"}
    assert use_model["required"] == ["model"]
    json.dumps(schema)


def test_schema_validates_a_real_document(registry):
    jsonschema = pytest.importorskip("jsonschema")
    schema = document_schema(registry)
    good = doc(v=("Value", {"value": 1}), s=("Sink", {"value": link("v", "value")}))
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc(v=("Value", {"value": 5000})), schema)
    compile_workflow(Workflow.model_validate(good), registry)
