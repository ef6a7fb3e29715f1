"""ComfyUI files as users have them (issue 15): requests that carry a workflow (the body of
ComfyUI's POST /prompt, a hosted worker's {"input": {"workflow": ...}}) are read, or refused with
the shape that was expected, by `nodegraph run/validate/convert` and the server's convert route;
editor-only fields of old files are ignored; a missing model is not blamed on a node that only
follows from another problem."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
from nodegraph_diffusion.nodes import comfyui

from nodegraph.cli import main
from nodegraph.importers import UNSUPPORTED_NODE_TYPES, WorkflowImportError
from nodegraph.plugins import build_registry
from nodegraph.server.app import create_app

API, UI = comfyui.IMPORTERS
DATA = Path(__file__).with_name("data")


@pytest.fixture
def api_graph() -> dict:
    return json.loads((DATA / "comfyui_txt2img_api.json").read_text())


@pytest.fixture
def ui_graph() -> dict:
    return json.loads((DATA / "comfyui_txt2img_ui.json").read_text())


def import_error(importer, document) -> WorkflowImportError:
    with pytest.raises(WorkflowImportError) as caught:
        importer.convert(document)
    return caught.value


def requests(api_graph: dict, ui_graph: dict) -> dict[str, tuple[dict, object]]:
    """Each request shape with the importer that reads it."""
    return {
        "prompt": ({"prompt": api_graph, "client_id": "abc"}, API),
        "worker": ({"input": {"workflow": api_graph, "images": [{"name": "x.png", "image": "data:..."}]}}, API),
        "worker ui": ({"input": {"workflow": ui_graph}}, UI),
    }


def test_requests_carrying_a_workflow_are_read_as_the_workflow(api_graph, ui_graph, caplog):
    expected = API.convert(api_graph)["nodes"]
    for name, (document, importer) in requests(api_graph, ui_graph).items():
        assert importer.detect(document) and not (UI if importer is API else API).detect(document), name
        assert importer.convert(document)["nodes"] == expected, name
    caplog.set_level(logging.WARNING)
    API.convert(requests(api_graph, ui_graph)["worker"][0])
    assert "uploads 1 input image(s) with its workflow; they are not imported" in caplog.text


@pytest.mark.parametrize("document, shape, found", [
    ({"input": {"images": []}}, '{"input": {"workflow": <API- or UI-format graph>}}', "found nothing there"),
    ({"input": {"workflow": "a cat"}}, '{"input": {"workflow": <API- or UI-format graph>}}', "found a JSON str there"),
    ({"input": "a cat"}, '{"input": {"workflow": <API- or UI-format graph>}}', "found nothing there"),
    ({"prompt": {"3": {"inputs": {}}}}, '{"prompt": <API-format graph>}', "found an object with keys 3 there"),
    ({"prompt": "a cat", "client_id": "abc"}, '{"prompt": <API-format graph>}', "found a JSON str there"),
])
def test_a_request_without_a_readable_workflow_is_refused_naming_the_expected_shape(document, shape, found):
    assert API.detect(document) and not UI.detect(document)
    (issue,) = import_error(API, document).issues
    assert issue.code == "invalid_request" and issue.details == {"expected": shape}
    assert issue.message.startswith(f"a ComfyUI request is expected as {shape}, carrying a workflow in ComfyUI's "
                                    'API format ({"<node id>": {"class_type": ..., "inputs": {...}}})')
    assert issue.message.endswith(found)


def test_an_api_graph_with_nodes_called_prompt_or_input_is_no_request(api_graph):
    graph = {"prompt": api_graph["6"], "input": api_graph["7"], **{k: v for k, v in api_graph.items() if k not in "67"}}
    graph["3"]["inputs"].update(positive=["prompt", 0], negative=["input", 0])
    nodes = API.convert(graph)["nodes"]
    assert nodes["prompt"]["type"] == "TextEncode" and nodes["input"]["type"] == "TextEncode"


def test_cli_reads_and_refuses_requests(tmp_path, api_graph, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no model folders: validation names the missing checkpoint, not the format
    wrapped = tmp_path / "request.json"
    wrapped.write_text(json.dumps({"input": {"workflow": api_graph}}))
    assert main(["convert", str(wrapped), str(tmp_path / "ours.json")]) == 0
    assert json.loads((tmp_path / "ours.json").read_text())["nodes"] == API.convert(api_graph)["nodes"]
    assert main(["validate", str(wrapped)]) == 2
    out = capsys.readouterr().out
    assert "4.name: input 'name': no checkpoints file 'tiny-sd1.safetensors'" in out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"input": {"images": []}}))
    for command in (["validate", str(broken)], ["run", str(broken)]):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert "expected as {\"input\": {\"workflow\": <API- or UI-format graph>}}" in captured.out + captured.err


@pytest.mark.asyncio
async def test_server_convert_route_reads_and_refuses_requests(aiohttp_client, tmp_path, api_graph):
    registry, problems = build_registry()
    assert not problems, problems
    app = create_app(registry, tmp_path / "runs.sqlite", output_dir=tmp_path / "out", device="cpu",
                     inputs_dir=tmp_path / "inputs", workflows_dir=tmp_path / "workflows",
                     editor_dir=tmp_path / "editor")
    client = await aiohttp_client(app)
    response = await client.post("/api/workflows/convert", json={"input": {"workflow": api_graph}})
    body = await response.json()
    assert response.status == 200 and body["importer"] == comfyui.API_FORMAT
    assert body["workflow"]["nodes"] == API.convert(api_graph)["nodes"]
    refused = await client.post("/api/workflows/convert", json={"prompt": "a cat"})
    body = await refused.json()
    assert refused.status == 400 and [issue["code"] for issue in body["issues"]] == ["invalid_request"]
    assert '{"prompt": <API-format graph>}' in body["message"]


def test_old_load_image_fields_and_the_image_preview_placeholder_are_ignored(api_graph, ui_graph):
    api_graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "cat.png", "choose file to upload": "image"}}
    api_graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    api_graph["3"]["inputs"]["latent_image"] = ["11", 0]
    del api_graph["5"]
    nodes = API.convert(api_graph)["nodes"]
    assert nodes["10"] == {"type": "LoadImage", "inputs": {"image": "cat.png"}}
    # Newer editors save an empty value for the image preview of nodes that show an image.
    for node in ui_graph["nodes"]:
        if node["type"] == "SaveImage":
            node["widgets_values"] = ["ComfyUI", ""]
    ui_graph["nodes"].append({"id": 20, "type": "LoadImage", "mode": 0, "outputs": [],
                              "widgets_values": ["cat.png", "image", ""]})
    nodes = UI.convert(ui_graph)["nodes"]
    assert nodes["9"]["inputs"]["filename_prefix"] == "ComfyUI"
    assert nodes["20"] == {"type": "LoadImage", "inputs": {"image": "cat.png"}}
    # Only an empty value is the placeholder: anything else is one widget too many, as before.
    ui_graph["nodes"][-1]["widgets_values"] = ["cat.png", "image", "x"]
    error = import_error(UI, ui_graph)
    assert [(issue.code, issue.node_id) for issue in error.issues] == [("invalid_widgets", "20")]


def test_a_latent_whose_sampler_cannot_be_imported_is_not_blamed(api_graph):
    graph = copy.deepcopy(api_graph)
    graph["13"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    graph["3"]["class_type"] = "KSamplerEfficient"  # an unsupported sampler: the only problem to report
    error = import_error(API, graph)
    assert error.unsupported_types == {"KSamplerEfficient": ["3"]}
    assert [issue.code for issue in error.issues] == [UNSUPPORTED_NODE_TYPES]
    # The sampler's model comes from a node that cannot be imported (a custom pack's merge): the same.
    graph = copy.deepcopy(api_graph)
    graph["13"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    graph["14"] = {"class_type": "CustomPackModelMerge", "inputs": {"model1": ["4", 0], "model2": ["13", 0]}}
    graph["3"]["inputs"]["model"] = ["14", 0]
    error = import_error(API, graph)
    assert [issue.code for issue in error.issues] == [UNSUPPORTED_NODE_TYPES]
    # A latent that feeds nothing while two models are loaded is left out, as ComfyUI never runs it.
    graph = copy.deepcopy(api_graph)
    graph["13"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    graph["12"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    assert "12" not in API.convert(graph)["nodes"]
