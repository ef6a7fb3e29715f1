"""ComfyUI subgraphs and legacy group nodes are imported by expanding them into plain nodes: links
through an instance's inputs and outputs rewired, the instance's widget values applied, nested
subgraphs, ids `<instance>:<inner>` unique and stable, positions kept. The documents are small
hand-made ones shaped like ComfyUI's current templates (subgraphs) and its older example images
(group nodes); tests/diffusion/test_comfyui_corpus.py imports the real ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from nodegraph_diffusion.nodes import comfyui

from nodegraph.importers import UNSUPPORTED_NODE_TYPES, WorkflowImportError

API, UI = comfyui.IMPORTERS
DATA = Path(__file__).with_name("data")
CORPUS = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
TXT2IMG = "6f1d2c3e-0000-4000-8000-000000000001"
PROMPT = "6f1d2c3e-0000-4000-8000-000000000002"
PASS = "6f1d2c3e-0000-4000-8000-000000000003"


def slot(name: str, kind: str, link: int | None = None, widget: bool = False) -> dict[str, Any]:
    return {"name": name, "type": kind, "link": link, **({"widget": {"name": name}} if widget else {})}


def node(node_id: Any, kind: str, widgets: list | None = None, inputs: tuple = (), outputs: tuple = (),
         pos: tuple[float, float] = (0, 0), mode: int = 0) -> dict[str, Any]:
    return {"id": node_id, "type": kind, "pos": list(pos), "mode": mode, "inputs": list(inputs),
            "outputs": [{"name": name, "type": name, "links": []} for name in outputs],
            "widgets_values": widgets}


def link(link_id: int, origin: int, origin_slot: int, target: int, target_slot: int, kind: str) -> dict[str, Any]:
    return {"id": link_id, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
            "target_slot": target_slot, "type": kind}


def txt2img_subgraph() -> dict[str, Any]:
    """ComfyUI's default text-to-image graph as a subgraph, like the templates': the prompt, size
    and seed are inputs shown as widgets on the instance; the image is its output."""
    return {
        "id": TXT2IMG, "name": "Text to Image", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "text", "type": "STRING"}, {"name": "width", "type": "INT"},
                   {"name": "height", "type": "INT"}, {"name": "seed", "type": "INT"}],
        "outputs": [{"name": "IMAGE", "type": "IMAGE"}],
        "nodes": [
            node(4, "CheckpointLoaderSimple", ["tiny-sd1.safetensors"], outputs=("MODEL", "CLIP", "VAE"),
                 pos=(100, 300)),
            node(6, "CLIPTextEncode", ["a red circle on a blue background"],
                 (slot("clip", "CLIP", 3), slot("text", "STRING", 10, widget=True)), ("CONDITIONING",), (400, 200)),
            node(7, "CLIPTextEncode", ["text, watermark"], (slot("clip", "CLIP", 5),), ("CONDITIONING",), (400, 400)),
            node(5, "EmptyLatentImage", [32, 32, 1],
                 (slot("width", "INT", 11, widget=True), slot("height", "INT", 12, widget=True)), ("LATENT",),
                 (400, 600)),
            node(3, "KSampler", [8566257, "randomize", 2, 8, "euler", "normal", 1],
                 (slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 4),
                  slot("negative", "CONDITIONING", 6), slot("latent_image", "LATENT", 2),
                  slot("seed", "INT", 13, widget=True)), ("LATENT",), (800, 200)),
            node(8, "VAEDecode", [], (slot("samples", "LATENT", 7), slot("vae", "VAE", 8)), ("IMAGE",), (1100, 200)),
        ],
        "links": [
            link(1, 4, 0, 3, 0, "MODEL"), link(2, 5, 0, 3, 3, "LATENT"), link(3, 4, 1, 6, 0, "CLIP"),
            link(4, 6, 0, 3, 1, "CONDITIONING"), link(5, 4, 1, 7, 0, "CLIP"), link(6, 7, 0, 3, 2, "CONDITIONING"),
            link(7, 3, 0, 8, 0, "LATENT"), link(8, 4, 2, 8, 1, "VAE"), link(9, 8, 0, -20, 0, "IMAGE"),
            link(10, -10, 0, 6, 1, "STRING"), link(11, -10, 1, 5, 0, "INT"), link(12, -10, 2, 5, 1, "INT"),
            link(13, -10, 3, 3, 4, "INT"),
        ],
    }


def template(*instances: dict[str, Any], subgraphs: tuple = ()) -> dict[str, Any]:
    """A UI document: the instances of Text to Image given, each feeding a SaveImage of its own."""
    nodes, links = [], []
    for number, instance in enumerate(instances):
        save_id, link_id = 90 + number, 100 + number
        instance["outputs"] = [{"name": "IMAGE", "type": "IMAGE", "links": [link_id]}]
        nodes += [instance, node(save_id, "SaveImage", ["ComfyUI"], (slot("images", "IMAGE", link_id),),
                                 pos=(1500, 100 * number))]
        links.append([link_id, instance["id"], 0, save_id, 0, "IMAGE"])
    return {"last_node_id": 100, "last_link_id": 200, "nodes": nodes, "links": links,
            "definitions": {"subgraphs": [txt2img_subgraph(), *subgraphs]}, "version": 0.4}


def instance(node_id: int, widgets: list | None = None, inputs: tuple = (), pos=(-100, 50), kind=TXT2IMG,
             mode: int = 0) -> dict[str, Any]:
    return {**node(node_id, kind, widgets, inputs, pos=pos, mode=mode),
            "properties": {"proxyWidgets": [["6", "text"], ["5", "width"], ["5", "height"], ["3", "seed"]]}}


def expected_nodes(prefix: str, save_id: str = "90") -> dict[str, Any]:
    """ComfyUI's default API graph converted, its nodes numbered inside instance `prefix` and its
    SaveImage the document's `save_id`."""
    nodes = API.convert(json.loads((DATA / "comfyui_txt2img_api.json").read_text()))["nodes"]
    renamed = {}
    for node_id, entry in nodes.items():
        inputs = {name: {"from": f"{prefix}:{value['from']}", "output": value["output"]}
                  if isinstance(value, dict) else value for name, value in entry["inputs"].items()}
        renamed[save_id if entry["type"] == "SaveImage" else f"{prefix}:{node_id}"] = {**entry, "inputs": inputs}
    return renamed


def import_error(document: dict[str, Any]) -> WorkflowImportError:
    with pytest.raises(WorkflowImportError) as caught:
        UI.convert(document)
    return caught.value


def issues_at(error: WorkflowImportError) -> dict[tuple[str | None, str | None], str]:
    return {(issue.node_id, issue.input): issue.code for issue in error.issues if issue.code != UNSUPPORTED_NODE_TYPES}


def test_a_subgraph_instance_becomes_its_nodes_numbered_inside_it_and_placed_where_it_was():
    converted = UI.convert(template(instance(56, [])))
    assert converted["nodes"] == expected_nodes("56")
    positions = converted["ui"]["nodes"]
    # The inner layout keeps its shape, its top-left corner (100, 200) moved to the instance's (-100, 50).
    assert positions["56:4"] == {"pos": [-100.0, 150.0]} and positions["56:8"] == {"pos": [900.0, 50.0]}
    assert positions["90"] == {"pos": [1500.0, 0.0]}
    assert UI.convert(template(instance(56, []))) == converted  # the same ids on every import


def test_values_set_on_the_instance_replace_the_inner_nodes_own():
    # An instance saved by older editors: one value per input shown as a widget, in input order.
    nodes = UI.convert(template(instance(56, ["a blue square", 48, 40, 7])))["nodes"]
    assert nodes["56:6"]["inputs"]["text"] == "a blue square"
    assert (nodes["56:5"]["inputs"]["width"], nodes["56:5"]["inputs"]["height"]) == (48, 40)
    assert nodes["56:3"]["inputs"]["seed"] == 7
    # Even older ones saved the seed's control_after_generate value after it.
    nodes = UI.convert(template(instance(56, ["a blue square", 48, 40, 7, "fixed"])))["nodes"]
    assert nodes["56:3"]["inputs"]["seed"] == 7 and nodes["56:5"]["inputs"]["width"] == 48


def test_links_into_the_instance_reach_the_inner_nodes():
    document = template(instance(56, ["ignored", 48, 40, 7],
                                 (slot("text", "STRING", 150, widget=True), slot("seed", "INT", 151, widget=True))))
    # The prompt comes from a primitive node outside, the seed from a reroute of another primitive.
    document["nodes"] += [
        {**node(60, "PrimitiveNode", ["a green triangle"]), "outputs": [{"name": "STRING", "type": "STRING",
                                                                          "links": [150]}]},
        node(61, "PrimitiveNode", [1234, "fixed"]), node(62, "Reroute", None, (slot("", "*", 152),), ("*",))]
    document["links"] += [[150, 60, 0, 56, 0, "STRING"], [151, 62, 0, 56, 1, "INT"], [152, 61, 0, 62, 0, "INT"]]
    nodes = UI.convert(document)["nodes"]
    assert nodes["56:6"]["inputs"]["text"] == "a green triangle"  # the link wins over the instance's value
    assert nodes["56:3"]["inputs"]["seed"] == 1234
    assert nodes["56:5"]["inputs"]["width"] == 48  # unconnected inputs keep the instance's value


def prompt_subgraph() -> dict[str, Any]:
    """A subgraph encoding its text input with its CLIP input, nested in Text to Image below."""
    return {
        "id": PROMPT, "name": "Prompt", "inputs": [{"name": "clip", "type": "CLIP"}, {"name": "text", "type": "STRING"}],
        "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}],
        "nodes": [node(6, "CLIPTextEncode", ["unused"], (slot("clip", "CLIP", 1), slot("text", "STRING", 2, widget=True)),
                       ("CONDITIONING",), (0, 0))],
        "links": [link(1, -10, 0, 6, 0, "CLIP"), link(2, -10, 1, 6, 1, "STRING"), link(3, 6, 0, -20, 0, "CONDITIONING")],
    }


def test_nested_subgraphs_and_two_instances_of_one_are_numbered_by_their_path():
    document = template(instance(56, []), instance(57, ["a blue square", 48, 40, 7], pos=(0, 900)),
                        subgraphs=(prompt_subgraph(),))
    inner = document["definitions"]["subgraphs"][0]
    # The positive prompt now comes from a Prompt instance (40) inside Text to Image; the text widget
    # of Text to Image feeds the nested instance's text input.
    inner["nodes"] = [n for n in inner["nodes"] if n["id"] != 6]
    inner["nodes"].append(node(40, PROMPT, [], (slot("clip", "CLIP", 3), slot("text", "STRING", 10, widget=True)),
                               ("CONDITIONING",), (400, 200)))
    inner["links"] = [{**entry, "target_id": 40} if entry["id"] == 3 else
                      {**entry, "origin_id": 40} if entry["id"] == 4 else
                      {**entry, "target_id": 40} if entry["id"] == 10 else entry for entry in inner["links"]]
    # The nested instance's text input arrives at its slot 1: the link says so.
    inner["links"] = [{**entry, "target_slot": 1} if entry["id"] == 10 else entry for entry in inner["links"]]
    nodes = UI.convert(document)["nodes"]

    first, second = expected_nodes("56", "90"), expected_nodes("57", "91")
    for expected, prefix in ((first, "56"), (second, "57")):
        expected[f"{prefix}:40:6"] = expected.pop(f"{prefix}:6")
        expected[f"{prefix}:3"]["inputs"]["positive"] = {"from": f"{prefix}:40:6", "output": "conditioning"}
    # The nested prompt node takes Text to Image's own value when its instance sets none.
    first["56:40:6"]["inputs"]["text"] = "unused"
    second["57:40:6"]["inputs"]["text"] = "a blue square"
    second["57:5"]["inputs"].update(width=48, height=40)
    second["57:3"]["inputs"]["seed"] = 7
    assert nodes == {**first, **second}


def group_node_document(kind: str) -> dict[str, Any]:
    """A legacy group node shaped like the IP2PSampler of ComfyUI's edit-model example: the custom
    sampler's nodes grouped, the model entering through a reroute; its widgets are those of the
    inner nodes in order."""
    group = {
        "nodes": [
            {"type": "KSamplerSelect", "outputs": [{"name": "SAMPLER", "type": "SAMPLER", "links": []}],
             "widgets_values": ["euler"], "index": 0, "pos": [900, 1500]},
            {"type": "RandomNoise", "outputs": [{"name": "NOISE", "type": "NOISE", "links": []}],
             "widgets_values": [1, "fixed"], "index": 1, "pos": [900, 1200]},
            {"type": "Reroute", "inputs": [slot("", "*")], "outputs": [{"name": "", "type": "*", "links": None}],
             "index": 2, "pos": [700, 1500]},
            {"type": "BasicScheduler", "inputs": [slot("model", "MODEL")], "outputs": [{"name": "SIGMAS"}],
             "widgets_values": ["normal", 20, 1], "index": 3, "pos": [900, 1600]},
            {"type": "CFGGuider", "inputs": [slot("model", "MODEL"), slot("positive", "CONDITIONING"),
                                             slot("negative", "CONDITIONING")],
             "outputs": [{"name": "GUIDER"}], "widgets_values": [8], "index": 4, "pos": [900, 1300]},
            {"type": "Note", "widgets_values": ["the sampler, grouped"], "index": 5, "pos": [1000, 1400]},
            {"type": "SamplerCustomAdvanced",
             "inputs": [slot("noise", "NOISE"), slot("guider", "GUIDER"), slot("sampler", "SAMPLER"),
                        slot("sigmas", "SIGMAS"), slot("latent_image", "LATENT")],
             "outputs": [{"name": "output", "type": "LATENT"}, {"name": "denoised_output", "type": "LATENT"}],
             "index": 6, "pos": [1300, 1200]},
        ],
        "links": [[None, 0, 2, 0, 4, "MODEL"], [2, 0, 3, 0, 26, "MODEL"], [2, 0, 4, 0, 26, "MODEL"],
                  [None, 0, 4, 1, 6, "CONDITIONING"], [None, 0, 4, 2, 7, "CONDITIONING"], [1, 0, 6, 0, 19, "NOISE"],
                  [4, 0, 6, 1, 28, "GUIDER"], [0, 0, 6, 2, 20, "SAMPLER"], [3, 0, 6, 3, 21, "SIGMAS"],
                  [None, 0, 6, 4, 5, "LATENT"]],
        "external": [[6, 0, "LATENT"]],
        "config": {"2": {"input": {"MODEL": {"name": "model"}}}},
    }
    api = json.loads((DATA / "comfyui_txt2img_api.json").read_text())
    document = {
        "nodes": [
            node(4, "CheckpointLoaderSimple", ["tiny-sd1.safetensors"], outputs=("MODEL", "CLIP", "VAE")),
            node(6, "CLIPTextEncode", [api["6"]["inputs"]["text"]], (slot("clip", "CLIP", 3),)),
            node(7, "CLIPTextEncode", [api["7"]["inputs"]["text"]], (slot("clip", "CLIP", 5),)),
            node(5, "EmptyLatentImage", [32, 32, 1]),
            node(37, f"{kind}Sampler", ["dpmpp_2m", 42, "fixed", "karras", 3, 1, 7.5],
                 (slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 4),
                  slot("negative", "CONDITIONING", 6), slot("latent_image", "LATENT", 2)),
                 ("output", "denoised_output"), pos=(1000, 100)),
            node(8, "VAEDecode", [], (slot("samples", "LATENT", 7), slot("vae", "VAE", 8))),
            node(9, "SaveImage", ["ComfyUI"], (slot("images", "IMAGE", 9),)),
        ],
        "links": [[1, 4, 0, 37, 0, "MODEL"], [2, 5, 0, 37, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
                  [4, 6, 0, 37, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 37, 2, "CONDITIONING"],
                  [7, 37, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
        "extra": {"groupNodes": {"Sampler": group}},
    }
    return document


@pytest.mark.parametrize("kind", ["workflow/", "workflow>"])
def test_a_group_node_becomes_its_nodes_with_the_instances_widget_values(kind):
    api = json.loads((DATA / "comfyui_txt2img_api.json").read_text())
    del api["3"]
    api.update({
        "37:0": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "37:1": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "37:3": {"class_type": "BasicScheduler", "inputs": {"scheduler": "karras", "steps": 3, "denoise": 1,
                                                            "model": ["4", 0]}},
        "37:4": {"class_type": "CFGGuider", "inputs": {"cfg": 7.5, "model": ["4", 0], "positive": ["6", 0],
                                                       "negative": ["7", 0]}},
        "37:6": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["37:1", 0], "guider": ["37:4", 0], "sampler": ["37:0", 0], "sigmas": ["37:3", 0],
            "latent_image": ["5", 0]}},
    })
    api["8"]["inputs"]["samples"] = ["37:6", 0]
    converted = UI.convert(group_node_document(kind))
    assert converted["nodes"] == API.convert(api)["nodes"]
    # Placed where the group node was: the inner layout's top-left corner (700, 1200) at (1000, 100).
    assert converted["ui"]["nodes"]["37:6"] == {"pos": [1600.0, 100.0]}


def test_group_node_widget_values_that_do_not_line_up_are_named():
    document = group_node_document("workflow>")
    document["nodes"][4]["widgets_values"] = ["dpmpp_2m", 42, "fixed"]
    # A widget turned into an input and linked: the group node does not save which inner widget it feeds.
    document["nodes"][4]["inputs"].append(slot("cfg", "FLOAT", 10, widget=True))
    document["nodes"].append({**node(50, "PrimitiveNode", [7.5]), "outputs": [{"name": "FLOAT", "links": [10]}]})
    document["links"].append([10, 50, 0, 37, 4, "FLOAT"])
    error = import_error(document)
    assert issues_at(error) == {("37", None): "invalid_widgets", ("37", "cfg"): "invalid_link"}
    assert "group node 'Sampler': the node holds 3 widget values, its inner nodes have 7" in str(error)
    assert "group node 'Sampler': a widget turned into an input cannot be imported" in str(error)


def test_what_cannot_be_expanded_is_named_with_the_inner_nodes_ids():
    document = template(instance(56, ["a", 48]), instance(57, []))
    inner = document["definitions"]["subgraphs"][0]
    inner["nodes"].append(node(12, "CR Prompt Text", ["x"]))
    inner["nodes"].append(node(13, TXT2IMG, [], pos=(0, 0)))  # a subgraph holding itself
    document["links"][0] = [100, 56, 3, 90, 0, "IMAGE"]  # an output Text to Image does not have
    error = import_error(document)
    assert error.unsupported_types == {"CR Prompt Text": ["56:12", "57:12"]}
    assert issues_at(error) == {("56", None): "invalid_widgets", ("56:13", None): "invalid_subgraph",
                                ("57:13", None): "invalid_subgraph", ("90", "images"): "invalid_link"}
    message = str(error)
    assert "subgraph 'Text to Image': the node holds 2 widget values, it has 4 inputs shown as widgets" in message
    assert "subgraph 'Text to Image' contains itself" in message
    assert "linked to output 3 of subgraph 'Text to Image' (node 56), which nothing inside it feeds" in message


def pass_through_subgraph() -> dict[str, Any]:
    return {"id": PASS, "name": "Upscale latent", "inputs": [{"name": "samples", "type": "LATENT"}],
            "outputs": [{"name": "LATENT", "type": "LATENT"}],
            "nodes": [node(1, "LatentUpscaleBy", ["nearest-exact", 1.5], (slot("samples", "LATENT", 1),), ("LATENT",))],
            "links": [link(1, -10, 0, 1, 0, "LATENT"), link(2, 1, 0, -20, 0, "LATENT")]}


@pytest.mark.parametrize("mode, upscaled", [(0, True), (4, False)])
def test_a_bypassed_instance_passes_its_input_through_and_a_muted_one_is_left_out(mode, upscaled):
    document = template(instance(56, []), subgraphs=(pass_through_subgraph(),))
    inner = document["definitions"]["subgraphs"][0]
    # Text to Image's sampler feeds the decoder through an Upscale latent instance (30).
    inner["nodes"].append(node(30, PASS, [], (slot("samples", "LATENT", 20),), ("LATENT",), mode=mode))
    inner["links"] = [entry for entry in inner["links"] if entry["id"] != 7]
    inner["links"] += [link(20, 3, 0, 30, 0, "LATENT"), link(7, 30, 0, 8, 0, "LATENT")]
    inner["nodes"].append(node(31, PASS, [], (slot("samples", "LATENT", 21),), ("LATENT",), mode=2))
    inner["links"].append(link(21, 3, 0, 31, 0, "LATENT"))
    nodes = UI.convert(document)["nodes"]
    expected = expected_nodes("56")
    if upscaled:
        expected["56:30:1"] = {"type": "LatentUpscaleBy", "inputs": {
            "method": "nearest-exact", "scale_by": 1.5, "latent": {"from": "56:3", "output": "latent"}}}
        expected["56:8"]["inputs"]["latent"] = {"from": "56:30:1", "output": "latent"}
    assert nodes == expected


def test_the_official_flux_template_imports_with_its_prompt_and_models():
    document = json.loads((CORPUS / "templates__templates__flux_dev_checkpoint_example.json").read_text())
    before = copy.deepcopy(document)
    nodes = UI.convert(document)["nodes"]
    assert document == before  # the document read is not changed
    assert nodes["9"]["inputs"]["images"] == {"from": "56:53", "output": "image"}
    assert nodes["56:48"] == {"type": "LoadDiffusionModel", "inputs": {"name": "flux1-dev.safetensors",
                                                                       "weight_dtype": "default"}}
    assert nodes["56:51"]["inputs"]["text"].startswith("Beautiful photography of a gorgeous-haired female artist")
    assert nodes["56:52"]["inputs"]["model"] == {"from": "56:48", "output": "model"}
    assert sorted(nodes) == ["56:47", "56:48", "56:49", "56:50", "56:51", "56:52", "56:53", "56:54", "9"]


def _paths(value: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def test_damaged_documents_are_refused_with_issues_never_a_crash():
    """Files from outside may hold anything anywhere: each of these documents, with one to three
    values replaced by something of another shape, converts or raises WorkflowImportError."""
    import random

    rng = random.Random(15)
    odd = [None, [], {}, "x", -1, 10**30, 1.5, True, [1, 2], {"a": 1}, "-10", -10, -20, 0]
    bases = [template(instance(56, ["a", 48, 40, 7]), instance(57, [])), group_node_document("workflow>"),
             template(instance(56, []), subgraphs=(prompt_subgraph(),))]
    outcomes = {"converted": 0, "refused": 0}
    for _ in range(600):
        document = copy.deepcopy(rng.choice(bases))
        for path in rng.sample([p for p in _paths(document) if p], rng.randint(1, 3)):
            holder = document
            try:
                for key in path[:-1]:
                    holder = holder[key]
                holder[path[-1]] = copy.deepcopy(rng.choice(odd))
            except (KeyError, IndexError, TypeError):  # an earlier replacement removed this path
                continue
        if not UI.detect(document):
            continue
        try:
            UI.convert(document)
            outcomes["converted"] += 1
        except WorkflowImportError:
            outcomes["refused"] += 1
    assert outcomes["converted"] > 50 and outcomes["refused"] > 200, outcomes
