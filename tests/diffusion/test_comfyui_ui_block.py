"""What the ComfyUI editor's files hold beyond what runs, kept by the import: bypassed and muted
nodes with their modes, groups, notes, node titles, colours and collapsed state, and the points
of legacy Reroute nodes. Real corpus files whose PNG also carries ComfyUI's API export of the
same graph (what ComfyUI's executor was sent) show that what runs is unchanged: the imported UI
file, with the engine's bypass and mute rules applied, is the imported API export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodegraph.executor import Executor
from nodegraph.importers import WorkflowImportError
from nodegraph.plugins import build_registry
from nodegraph.validation import pass_through
from nodegraph.workflow import Workflow, as_link
from nodegraph_diffusion.nodes import comfyui
from test_comfyui_corpus import CORPUS, validate, without_user_files

API, UI = comfyui.IMPORTERS
EDIT = "examples__edit_models__sdxl_edit_model.png__png"  # a bypassed rescale, group nodes with reroutes, notes
TURBO = "examples__sdturbo__sdxlturbo_example.png__png"  # a muted SaveImage in a group that says so
SDXL = "examples__sdxl__sdxl_simple_example.png__png"  # 8 groups, 9 notes, titled and coloured nodes


def corpus(name: str) -> dict[str, Any]:
    return json.loads((CORPUS / name).read_text(encoding="utf-8"))


def link(node: str, output: str) -> dict[str, str]:
    return {"from": node, "output": output}


@pytest.fixture(scope="module")
def registry():
    registry, problems = build_registry()
    assert not problems, problems
    return registry


def as_run(document: dict[str, Any], registry) -> dict[str, Any]:
    """The nodes that run, each input a literal (defaults filled in) or the link the engine follows
    (through bypassed nodes, as validation compiles it)."""
    workflow = Workflow.model_validate(document)
    classes = {node_id: registry.get(entry.type) for node_id, entry in workflow.nodes.items()}
    run = {}
    for node_id, entry in workflow.nodes.items():
        if not entry.runs:
            continue
        inputs = {}
        for name, spec in classes[node_id].specs().inputs.items():
            value = entry.inputs.get(name, spec.default if not spec.required else None)
            found = as_link(value)
            inputs[name] = pass_through(workflow, classes, found).source.to_json() if found is not None else value
        run[node_id] = {"type": entry.type, "inputs": inputs}
    return run


def test_bypassed_node_is_kept_and_runs_as_comfyui_ran_the_file(registry):
    converted = UI.convert(corpus(f"{EDIT}-ui.json"))
    rescale = converted["nodes"]["38"]
    assert rescale["mode"] == "bypass" and rescale["type"] == "ImageScaleToTotalPixels"
    assert rescale["inputs"]["image"] == link("13", "image")
    assert converted["nodes"]["37:6"]["inputs"]["image"] == link("38", "image")  # the editor shows the bypass
    # ComfyUI's API export of the same graph left the bypassed node out and wired the image past it.
    api = API.convert(corpus(f"{EDIT}-api.json"))
    assert "38" not in api["nodes"]
    assert as_run(converted, registry) == as_run(api, registry)
    with without_user_files():
        outcome = validate(CORPUS / f"{EDIT}-ui.json", registry, Executor(registry, device="cpu"))
    assert outcome.validates and set(outcome.absent_files) == {"checkpoints/cosxl_edit.safetensors",
                                                               "inputs/mountains.png"}


def test_muted_node_is_kept_and_does_not_run(registry):
    converted = UI.convert(corpus(f"{TURBO}-ui.json"))
    assert converted["nodes"]["27"] == {"type": "SaveImage", "mode": "mute", "inputs": {
        "filename_prefix": "ComfyUI", "images": link("8", "image")}}
    api = API.convert(corpus(f"{TURBO}-api.json"))
    assert "27" not in api["nodes"] and as_run(converted, registry) == as_run(api, registry)
    assert converted["ui"]["groups"] == [{"id": "group1", "title": "Unmute (CTRL-M) if you want to save images.",
                                          "color": "#3f789e", "bounds": [1808.0, -260.0, 536.0, 676.0]}]
    with without_user_files():
        assert validate(CORPUS / f"{TURBO}-ui.json", registry, Executor(registry, device="cpu")).validates


def test_groups_notes_and_node_looks_of_a_real_file():
    document = corpus(f"{EDIT}-ui.json")
    ui = UI.convert(document)["ui"]
    # The file's one group has no id (older editors): it is numbered.
    assert ui["groups"] == [{"id": "group1", "title": "Optional Image Rescale", "color": "#3f789e",
                             "bounds": [201.0, 373.0, 419.0, 211.0]}]
    assert [(note["id"], note["text"][:40], note["pos"], note["color"]) for note in ui["notes"]] == [
        ("39", "Enable this (CTRL-B or right click -> By", [254.0, 600.0], "#665533"),
        ("40", "This IP2PSampler node is a group node, y", [1152.0, 624.0], "#665533")]
    assert ui["notes"][0]["size"] == [306.53076171875, 148.01629638671875]  # saved as {"0": w, "1": h}
    # Titles and colours (ComfyUI's #rgb body colours written out), none for untouched nodes.
    assert ui["nodes"]["7"] == {"pos": [670.0, 401.0], "title": "Negative", "color": "#553333"}
    assert ui["nodes"]["6"] == {"pos": [672.0, 192.0], "title": "Positive", "color": "#335533"}
    assert ui["nodes"]["13"] == {"pos": [-329.0, 471.0]}
    assert not {note["id"] for note in ui["notes"]} & set(ui["nodes"])


def test_reroutes_inside_a_group_node_become_points_on_the_joined_links():
    converted = UI.convert(corpus(f"{EDIT}-ui.json"))
    # The IP2PSampler group node routes the model to its scheduler and guider through reroute 2, and
    # the prompts through reroutes 4 and 5; reroute 5 also carries the negative prompt to the guider.
    assert [(point["id"], point["to"]) for point in converted["ui"]["reroutes"]] == [
        ("37:2", {"node": "37:3", "input": "model"}), ("37:4", {"node": "37:6", "input": "positive"}),
        ("37:5", {"node": "37:6", "input": "negative"}), ("37:2/2", {"node": "37:7", "input": "model"}),
        ("37:5/2", {"node": "37:7", "input": "negative"})]
    nodes = converted["nodes"]
    assert nodes["37:3"]["inputs"]["model"] == nodes["37:7"]["inputs"]["model"] == link("4", "model")
    assert nodes["37:6"]["inputs"]["negative"] == nodes["37:7"]["inputs"]["negative"] == link("7", "conditioning")
    assert not any(node["type"] == "Reroute" for node in nodes.values())
    # Placed where the group node put them: its inner layout moved to the instance's position.
    points = {point["id"]: point["pos"] for point in converted["ui"]["reroutes"]}
    assert points["37:2"] == points["37:2/2"] == [1302.0, 528.0]


def test_a_file_with_many_groups_and_notes_runs_as_its_api_export(registry):
    document = corpus(f"{SDXL}-ui.json")
    converted = UI.convert(document)
    assert len(converted["ui"]["groups"]) == len(document["groups"]) == 8
    notes = [node for node in document["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    assert [note["id"] for note in converted["ui"]["notes"]] == [str(note["id"]) for note in notes]
    assert [note["text"] for note in converted["ui"]["notes"]] == [note["widgets_values"][0] for note in notes]
    assert as_run(converted, registry) == as_run(API.convert(corpus(f"{SDXL}-api.json")), registry)
    titled = {node_id: entry["title"] for node_id, entry in converted["ui"]["nodes"].items() if "title" in entry}
    assert titled == {str(node["id"]): node["title"] for node in document["nodes"]
                      if "title" in node and str(node["id"]) in converted["nodes"]}


def test_collapsed_nodes_stay_collapsed():
    document = corpus("examples__flux__flux_dev_checkpoint_example.png__png-ui.json")
    collapsed = {str(node["id"]) for node in document["nodes"] if (node.get("flags") or {}).get("collapsed")}
    assert collapsed  # the file has some
    ui = UI.convert(document)["ui"]["nodes"]
    assert {node_id for node_id, entry in ui.items() if entry.get("collapsed")} == collapsed


def test_muted_node_that_does_not_convert_is_left_out_as_before(registry):
    # The muted SaveImage holding a widget value too many: the import cannot keep it, so it leaves
    # it out, as it did before muted nodes were kept (ComfyUI does not run it either).
    document = corpus(f"{TURBO}-ui.json")
    save = next(node for node in document["nodes"] if node["id"] == 27)
    save["widgets_values"] = ["ComfyUI", "extra"]
    converted = UI.convert(document)
    assert "27" not in converted["nodes"]
    assert as_run(converted, registry) == as_run(API.convert(corpus(f"{TURBO}-api.json")), registry)


def test_bypass_that_our_engine_would_pass_differently_is_resolved_at_import():
    # The rescale's input slot renamed to a type ComfyUI does not pass to an IMAGE output: ComfyUI
    # finds nothing to pass, and the import says so rather than keeping a bypass that would run
    # differently here.
    document = corpus(f"{EDIT}-ui.json")
    rescale = next(node for node in document["nodes"] if node["id"] == 38)
    rescale["inputs"][0]["type"] = "*"
    with pytest.raises(WorkflowImportError) as caught:
        UI.convert(document)
    [issue] = caught.value.issues
    assert (issue.code, issue.node_id, issue.input) == ("invalid_link", "37:6", "pixels")
    assert "bypassed ImageScaleToTotalPixels node 38" in issue.message


def test_combine_bypass_follows_comfyuis_slot_order():
    # ComfyUI's default graph with a bypassed ConditioningCombine before the sampler's positive
    # input, its second input listed first: ComfyUI passes that one. Our node declares `a` first,
    # so the import resolves this bypass the way ComfyUI does instead of keeping it.
    document = json.loads((Path(__file__).with_name("data") / "comfyui_txt2img_ui.json").read_text())
    document["nodes"].append({"id": 90, "type": "ConditioningCombine", "mode": 4, "pos": [0, 0],
                              "inputs": [{"name": "conditioning_2", "type": "CONDITIONING", "link": 901},
                                         {"name": "conditioning_1", "type": "CONDITIONING", "link": 902}],
                              "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}]})
    document["links"] = [entry for entry in document["links"] if entry[0] != 4]
    document["links"] += [[901, 7, 0, 90, 0, "CONDITIONING"], [902, 6, 0, 90, 1, "CONDITIONING"],
                          [4, 90, 0, 3, 1, "CONDITIONING"]]
    nodes = UI.convert(document)["nodes"]
    assert "90" not in nodes
    assert nodes["3"]["inputs"]["positive"] == link("7", "conditioning")  # conditioning_2's source
    # Listed in ComfyUI's own order, the bypass is kept: the engine passes the same input.
    document["nodes"][-1]["inputs"].reverse()
    document["links"][-3][4], document["links"][-2][4] = 1, 0
    nodes = UI.convert(document)["nodes"]
    assert nodes["90"]["mode"] == "bypass" and nodes["3"]["inputs"]["positive"] == link("90", "conditioning")
    assert nodes["90"]["inputs"] == {"a": link("6", "conditioning"), "b": link("7", "conditioning")}
