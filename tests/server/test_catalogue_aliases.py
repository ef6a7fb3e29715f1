"""GET /api/nodes lists, per node type, the names other tools give it (`aliases`): with the built-in
packs, the ComfyUI node types that import as it, which the editor's node search finds it by."""

from __future__ import annotations

import pytest

from _server_fixtures import make_client_factory
from nodegraph.plugins import build_registry
from nodegraph_diffusion.nodes import comfyui


@pytest.mark.asyncio
async def test_the_catalogue_lists_comfyui_names_as_aliases(aiohttp_client, tmp_path):
    registry, problems = build_registry([])
    assert problems == []
    client = await make_client_factory(aiohttp_client, registry, tmp_path)()
    response = await client.get("/api/nodes")
    assert response.status == 200
    nodes = (await response.json())["nodes"]
    # The names a ComfyUI user types first, each listed on the node it imports as.
    for comfy_type, ours in [("CLIPTextEncode", "TextEncode"), ("KSampler", "KSampler"),
                             ("EmptyLatentImage", "EmptyLatent"), ("LoraLoader", "LoadLora"),
                             ("CheckpointLoaderSimple", "LoadCheckpoint"), ("VAEDecode", "VAEDecode")]:
        assert comfy_type in nodes[ours]["aliases"], (comfy_type, ours, nodes[ours]["aliases"])
    # Every mapped ComfyUI type is listed, on exactly the node the importer converts it into.
    listed = {alias: ours for ours, node in nodes.items() for alias in node["aliases"]}
    assert listed == {comfy_type: mapping.type for comfy_type, mapping in comfyui.MAPPINGS.items()}
    # Nodes no ComfyUI type maps to (the basic pack's) carry an empty list.
    assert nodes["Math"]["aliases"] == [] and nodes["Math"]["pack"] == "basic"
