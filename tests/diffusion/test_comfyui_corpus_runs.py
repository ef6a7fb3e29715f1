"""Every SD1-family ComfyUI corpus workflow that validates (tests/data/comfyui_corpus, manifest.json)
runs to completion on the embedded model (models/checkpoints/tiny-shapes.safetensors, 64x64), as a
user would run it with `nodegraph run FILE --set ...`: the files are not edited; the overrides map
every model name to the embedded files, scale every pixel size so the largest latent is 64 pixels,
cut sampling to 2 steps and batches to 1, and point image inputs at a small generated image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nodegraph_diffusion.networks.gligen import (
    GatedSelfAttention,
    PositionNet,
    fuser_heads,
)
from nodegraph_diffusion.nodes import folders
from PIL import Image
from safetensors.torch import load_file, save_file
from test_comfyui_corpus import CORPUS, MANIFEST

from nodegraph.cache import OutputCache
from nodegraph.cli import read_workflow
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph.registry import NodeRegistry
from nodegraph.workflow import Workflow

MODELS = Path(__file__).resolve().parents[2] / "models"
CHECKPOINT = "tiny-shapes.safetensors"
LORA = "tiny-shapes-outlined.safetensors"
CONTROLNET = "tiny-shapes-silhouette.safetensors"
VAE = "tiny-shapes-vae.safetensors"  # the checkpoint's own VAE, written alone for LoadVAE
HYPERNETWORK = "tiny-hypernetwork.pt"  # made in the test: small random MLPs for the embedded U-Net's widths
GLIGEN = "tiny-gligen.safetensors"  # made in the test: random fusers and position net for the embedded model
INPUT_IMAGE = "in.png"
SIZE = 64  # the embedded model's image size: the largest latent of each file is scaled to it
STEPS = 2

# Inputs the overrides set, by our node type (the importer's targets): model files, input images,
# pixel sizes (scaled, multiples of 8, at least 8), pixel offsets (scaled, multiples of 8), steps
# and batch sizes. A node type outside both tables fails the test: a corpus file that starts to
# validate with it needs its overrides decided here first.
MODEL_NAMES = {"LoadCheckpoint": CHECKPOINT, "LoadLora": LORA, "LoadControlNet": CONTROLNET, "LoadVAE": VAE,
               "LoadDiffControlNet": CONTROLNET, "LoadHypernetwork": HYPERNETWORK, "LoadGligen": GLIGEN,
               "CreateLoraHook": LORA}  # the embedded LoRA has U-Net and text-encoder modules
IMAGE_NAMES = ("LoadImage", "LoadMask")
SIZES: dict[str, tuple[str, ...]] = {
    "EmptyLatent": ("width", "height"),
    "LatentUpscale": ("width", "height"),
    "ConditioningSetArea": ("width", "height"),
    "ImageScale": ("width", "height"),
    "ApplyGligenTextBox": ("width", "height"),
}
OFFSETS: dict[str, tuple[str, ...]] = {
    "ConditioningSetArea": ("x", "y"),
    "PadForOutpaint": ("left", "top", "right", "bottom", "feathering"),
    "LatentComposite": ("x", "y", "feather"),
    "ApplyGligenTextBox": ("x", "y"),
}
STEP_INPUTS: dict[str, tuple[str, ...]] = {"KSampler": ("steps",), "Scheduler": ("steps",)}
BATCH_INPUTS: dict[str, tuple[str, ...]] = {"EmptyLatent": ("batch_size",), "RepeatLatentBatch": ("amount",)}
# Node types with nothing in them that depends on the model, the image size or the run length.
AS_THEY_ARE = frozenset({
    "TextEncode", "VAEDecode", "VAEEncode", "VAEEncodeForInpaint", "SaveImage", "PreviewImage",
    "ConditioningCombine", "ConditioningConcat", "SetClipSkip", "ApplyControlNet", "ApplyControlNetSimple",
    "LatentUpscaleBy", "ImageScaleBy", "InvertImage", "InvertMask", "SetLatentNoiseMask",
    # Merges: every checkpoint is the embedded one, so these merge it with itself (a difference is 0).
    "MergeModels", "AddModels", "SubtractModels", "MergeModelBlocks", "MergeModelBlocksSD1",
    # LoRA hooks and their keyframes: percents of sampling, whatever its length.
    "SetClipHooks", "SetHookKeyframes", "InterpolateHookKeyframes", "CreateHookKeyframe", "CombineHooks",
    "SetConditioningProperties", "SetConditioningPairProperties", "AddConditioningWithProperties",
    "AddConditioningPairWithProperties", "SetModelHooksOnConditioning", "TimestepsRange",
})
HANDLED = (frozenset(MODEL_NAMES) | frozenset(IMAGE_NAMES) | frozenset(SIZES) | frozenset(OFFSETS)
           | frozenset(STEP_INPUTS) | frozenset(BATCH_INPUTS) | AS_THEY_ARE)

SD1_FILES = [entry["file"] for entry in MANIFEST if entry["family"] == "sd1" and entry["validates"]]


def _linked(value: Any) -> bool:
    return isinstance(value, dict) and "from" in value


def _scaled(value: int, scale: float, least: int) -> int:
    return max(least, round(value * scale / 8) * 8)


def overrides(workflow: Workflow) -> list[str]:
    """The `--set NODE.INPUT=VALUE` assignments that make an imported SD1 workflow run small."""
    unknown = sorted({node.type for node in workflow.nodes.values()} - HANDLED)
    assert not unknown, f"decide the overrides for node types {unknown} in this test"
    latent_sizes = [value for node in workflow.nodes.values() if node.type == "EmptyLatent"
                    for name in ("width", "height") if not _linked(value := node.inputs.get(name, 512))]
    scale = SIZE / max(latent_sizes, default=512)
    sets: list[tuple[str, str, Any]] = []
    for node_id, node in workflow.nodes.items():
        literal = {name: value for name, value in node.inputs.items() if not _linked(value)}
        if node.type in MODEL_NAMES:
            sets.append((node_id, "name", MODEL_NAMES[node.type]))
        if node.type in IMAGE_NAMES:
            sets.append((node_id, "image", INPUT_IMAGE))
        sets += [(node_id, name, _scaled(literal[name], scale, 8))
                 for name in SIZES.get(node.type, ()) if name in literal]
        sets += [(node_id, name, _scaled(literal[name], scale, 0))
                 for name in OFFSETS.get(node.type, ()) if name in literal]
        sets += [(node_id, name, STEPS) for name in STEP_INPUTS.get(node.type, ()) if name in literal]
        sets += [(node_id, name, 1) for name in BATCH_INPUTS.get(node.type, ()) if name in literal]
    return [f"{node_id}.{name}={json.dumps(value)}" for node_id, name, value in sets]


def _write_input_image(path: Path) -> None:
    """A 64x64 RGBA image: colour gradients, transparent in the middle (LoadImage's mask for inpainting)."""
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    pixels = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    pixels[..., 0] = ramp[None, :]
    pixels[..., 1] = ramp[:, None]
    pixels[..., 2] = 255 - ramp[None, :]
    pixels[..., 3] = 255
    pixels[16:48, 16:48, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)


def _write_hypernetwork(path: Path, widths: tuple[int, ...] = (64, 128)) -> None:
    """A hypernetwork in the A1111 / ComfyUI format for the embedded U-Net: per attention input
    width (its text's 64, its self-attention's 128) a key and a value MLP width -> 2 width -> width."""
    generator = torch.Generator().manual_seed(0)

    def mlp(width: int) -> dict[str, torch.Tensor]:
        return {"linear.0.weight": 0.05 * torch.randn(2 * width, width, generator=generator),
                "linear.0.bias": torch.zeros(2 * width),
                "linear.2.weight": 0.05 * torch.randn(width, 2 * width, generator=generator),
                "linear.2.bias": torch.zeros(width)}

    torch.save({**{width: [mlp(width), mlp(width)] for width in widths}, "activation_func": "relu",
                "is_layer_norm": False, "activate_output": False}, path)


def _write_gligen(path: Path, checkpoint: dict[str, torch.Tensor]) -> None:
    """A GLIGEN file in ComfyUI's layout for the embedded model: for each transformer block of its
    U-Net a fuser (torch's initial weights, queries and keys 6x, gates open at tanh(1)), and a
    position net from its CLIP's width to its text states' width (hidden 128)."""
    unet, query = "model.diffusion_model.", ".attn1.to_q.weight"
    phrase_dim = checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"].shape[0]
    state: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for key in sorted(checkpoint):
            if key.startswith(unet) and key.endswith(query):
                block = key[len(unet):-len(query)]
                width, token_dim = checkpoint[key].shape[0], checkpoint[f"{unet}{block}.attn2.to_k.weight"].shape[1]
                fuser = GatedSelfAttention(width, token_dim, *fuser_heads(width, token_dim))
                with torch.no_grad():
                    fuser.alpha_attn.fill_(1.0)
                    fuser.alpha_dense.fill_(1.0)
                    # Sharp attention, so the boxes' two tokens stand out among the 28 null ones.
                    fuser.attn.to_q.weight.mul_(6.0)
                    fuser.attn.to_k.weight.mul_(6.0)
                state |= {f"{block}.fuser.{name}": value for name, value in fuser.state_dict().items()}
        position = PositionNet(phrase_dim, token_dim, 128, 8)
        with torch.no_grad():
            position.null_positive_feature.normal_()
            position.null_position_feature.normal_()
        state |= {f"position_net.{name}": value for name, value in position.state_dict().items()}
    save_file({key: value.contiguous() for key, value in state.items()}, path)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Iterator[NodeRegistry]:
    """A models folder holding only the embedded files (and the checkpoint's VAE alone), an inputs
    folder with one image, and the registry with these folders in effect."""
    root = tmp_path_factory.mktemp("corpus_models")
    for kind, name in (("checkpoints", CHECKPOINT), ("loras", LORA), ("controlnet", CONTROLNET)):
        (root / kind).mkdir()
        (root / kind / name).symlink_to(MODELS / kind / name)
    prefix = "first_stage_model."
    weights = load_file(MODELS / "checkpoints" / CHECKPOINT)
    (root / "vae").mkdir()
    save_file({key[len(prefix):]: value.contiguous() for key, value in weights.items() if key.startswith(prefix)},
              root / "vae" / VAE)
    (root / "hypernetworks").mkdir()
    _write_hypernetwork(root / "hypernetworks" / HYPERNETWORK)
    (root / "gligen").mkdir()
    _write_gligen(root / "gligen" / GLIGEN, weights)
    inputs = tmp_path_factory.mktemp("corpus_inputs")
    _write_input_image(inputs / INPUT_IMAGE)
    with pytest.MonkeyPatch.context() as patch:
        for name in (folders.MODELS_ENV, folders.CONFIG_ENV):
            patch.delenv(name, raising=False)
        patch.setenv(folders.MODELS_ENV, str(root))
        patch.setenv(folders.INPUTS_ENV, str(inputs))
        patch.setenv("XDG_CONFIG_HOME", str(inputs))
        patch.chdir(inputs)  # no ./models of the checkout: only the files above are found
        registry, problems = build_registry()
        assert not problems, problems
        yield registry


def test_the_corpus_has_sd1_workflows_to_run():
    assert len(SD1_FILES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("name", SD1_FILES)
def test_sd1_corpus_workflow_runs_on_the_embedded_model(name, small_world, tmp_path):
    registry = small_world
    # A cache of its own: the API and UI forms of one example are the same graph, and each must run.
    executor = Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu", output_dir=tmp_path)
    path = str(CORPUS / name)
    sets = overrides(read_workflow(path, [], registry))
    workflow = read_workflow(path, sets, registry)
    result = executor.run(workflow)
    assert result.status == "succeeded", f"{name} with --set {' '.join(sets)}: {result.error}"

    decoded = [result.results[node_id].outputs.image for node_id, node in workflow.nodes.items()
               if node.type == "VAEDecode" and node_id in result.results]
    assert decoded, "no image was decoded"
    for image in decoded:
        assert image.shape[0] == 1 and image.shape[-1] == 3 and max(image.shape[1:3]) <= 2 * SIZE
        assert bool(torch.isfinite(image).all()) and float(image.std()) > 0.01
    saved = sorted(tmp_path.rglob("*.png"))
    savers = [node_id for node_id, node in workflow.nodes.items() if node.type == "SaveImage"]
    assert len(saved) == len(savers)
    sizes = sorted(Image.open(file).size for file in saved)
    shown = [getattr(result.results[link["from"]].outputs, link["output"])
             for node_id in savers for link in [workflow.nodes[node_id].inputs["images"]]]
    assert sizes == sorted((int(image.shape[2]), int(image.shape[1])) for image in shown)


GLIGEN_EXAMPLE = "examples__gligen__gligen_textbox_example.png__png-api.json"


@pytest.mark.slow
def test_gligen_boxes_change_the_image(small_world, tmp_path):
    """ComfyUI's GLIGEN example as the runs above make it, and again with its two boxes moved
    elsewhere (the sun to the bottom right, the bottle to the top left): where the boxes are changes
    the image (a run is deterministic, so boxes that were not read would give the same image)."""
    path = str(CORPUS / GLIGEN_EXAMPLE)
    sets = overrides(read_workflow(path, [], small_world))
    images = []
    for moved in ([], ["27.x=40", "27.y=40", "21.x=0", "21.y=0"]):
        executor = Executor(small_world, OutputCache(max_bytes=1 << 30), device="cpu", output_dir=tmp_path)
        workflow = read_workflow(path, sets + moved, small_world)
        result = executor.run(workflow)
        assert result.status == "succeeded", result.error
        images.append(result.results["8"].outputs.image)
    change = (images[0] - images[1]).abs() * 255
    print(f"GLIGEN example: moving the boxes changes the image by {float(change.mean()):.2f}/255 on average, "
          f"{float(change.max()):.1f}/255 at most")
    assert float(change.mean()) > 0.25 and float(change.max()) > 4.0
