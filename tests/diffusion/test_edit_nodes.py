"""The nodes of image-conditioned and edit models as ComfyUI declares them, and graphs that use them
on tiny random models: Flux.1 Canny/Depth with InstructPixToPixConditioning, SDXL/InstructPix2Pix
edits with DualCFGGuider."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.nodes import comfyui

from _checkpoint_fixtures import write_safetensors
from _transformer_fixtures import FLUX_DEV, flux_weights, write_transformer_models
from test_comfyui import LINK, check_comfyui_inputs

pytestmark = pytest.mark.slow

API = comfyui.IMPORTERS[0]
SIZE = 32  # pixels: a 4 x 4 latent, 2 x 2 Flux tokens
PROMPT = "a red circle on a blue background"
CANNY_MODEL = "flux1-canny-dev.safetensors"

# ComfyUI's declarations (comfy_extras/nodes_ip2p.py, nodes_custom_sampler.py).
EDIT_NODE_INPUTS: dict[str, dict[str, dict]] = {
    "InstructPixToPixConditioning": {"positive": LINK, "negative": LINK, "vae": LINK, "pixels": LINK},
    "DualCFGGuider": {"model": LINK, "cond1": LINK, "cond2": LINK, "negative": LINK,
                      "cfg_conds": {"default": 8.0, "min": 0.0, "max": 100.0},
                      "cfg_cond2_negative": {"default": 8.0, "min": 0.0, "max": 100.0},
                      "style": {"choices": ["regular", "nested"]}},
}


def test_edit_nodes_take_comfyuis_inputs_names_defaults_and_choices() -> None:
    check_comfyui_inputs(EDIT_NODE_INPUTS, set(), {})


def test_dual_cfg_guider_maps_from_files_with_and_without_its_style_widget() -> None:
    node = {"id": 7, "type": "DualCFGGuider", "mode": 0, "widgets_values": [5, 1.5],
            "inputs": [{"name": name, "type": "X", "link": None} for name in ("model", "cond1", "cond2", "negative")]}
    document = {"nodes": [node], "links": [], "version": 0.4}
    converted = comfyui.read_ui_nodes(document, comfyui._Problems(comfyui.UI_FORMAT))
    assert converted[0].inputs == {"cfg_conds": 5, "cfg_cond2_negative": 1.5}
    node["widgets_values"] = [3, 1.5, "nested"]
    converted = comfyui.read_ui_nodes(document, comfyui._Problems(comfyui.UI_FORMAT))
    assert converted[0].inputs["style"] == "nested"


def _write_image(path: Path, seed: int) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return torch.from_numpy(pixels).float()[None] / 255


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_transformer_models(tmp_path_factory.mktemp("models"))
    write_safetensors(root / "diffusion_models" / CANNY_MODEL, flux_weights(replace(FLUX_DEV, in_channels=32), 43),
                      dtype=None)
    inputs = tmp_path_factory.mktemp("inputs")
    images = {name: _write_image(inputs / name, seed) for seed, name in enumerate(("edges.png", "other.png"))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("out")), images


def flux_canny_graph(image: str) -> dict:
    """ComfyUI's Flux Canny example (examples/flux), its Canny node left out and small."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["31", 0], "positive": ["35", 0], "negative": ["35", 1], "latent_image": ["35", 2]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["34", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["32", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "canny", "images": ["8", 0]}},
        "17": {"class_type": "LoadImage", "inputs": {"image": image, "upload": "image"}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["34", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 30.0, "conditioning": ["23", 0]}},
        "31": {"class_type": "UNETLoader", "inputs": {"unet_name": CANNY_MODEL, "weight_dtype": "default"}},
        "32": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "34": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "35": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["26", 0], "negative": ["7", 0], "vae": ["32", 0], "pixels": ["17", 0]}},
    }


def test_flux_canny_graph_conditions_every_step_on_the_control_image(world) -> None:
    executor, images = world
    outputs = ["9", "8", "35", "32"]
    first = executor.run(API.convert(flux_canny_graph("edges.png")), outputs=outputs)
    assert first.status == "succeeded", first.error
    node = first.results["35"].outputs
    encoded = first.results["32"].outputs.vae.encode(images["edges.png"])
    for side in (node.positive, node.negative):
        torch.testing.assert_close(side[0].concat_latent, encoded)  # the control image's latent, on both sides
    assert node.positive[0].guidance == 30.0
    assert torch.all(node.latent.samples == 0) and node.latent.samples.shape == (1, 16, SIZE // 8, SIZE // 8)
    image = first.results["8"].outputs.image
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()

    second = executor.run(API.convert(flux_canny_graph("other.png")), outputs=outputs)
    assert second.status == "succeeded", second.error
    assert (second.results["8"].outputs.image - image).abs().max() > 1e-3  # the control image steers the result


def test_image_conditioning_on_a_plain_model_is_refused_by_name(world) -> None:
    executor, _ = world
    graph = flux_canny_graph("edges.png")
    graph["31"]["inputs"]["unet_name"] = "flux1-dev.safetensors"
    result = executor.run(API.convert(graph), outputs=["9"])
    assert result.status == "failed"
    assert "takes no image beside the latent" in str(result.error)
