"""End-to-end parity of ComfyUI's SD3 and Flux ControlNet graphs with diffusers' StableDiffusion3ControlNetPipeline
and FluxControlNetPipeline.

A tiny random SD3 or Flux single file (as test_transformer_pipelines builds them) and a tiny random
ControlNet file, in the layouts people download them in (InstantX's diffusers layout for SD3 medium
and Flux, here a union ControlNet told its type by SetUnionControlNetType; Stability's layout with
its control_type for SD3.5 large), are loaded by an imported ComfyUI API graph (ControlNetApplySD3
as ComfyUI's SD3 and Flux ControlNet examples use it; ControlNetApplyAdvanced with a VAE as its SD3.5
canny example does), and by the pipeline with the same modules, control image and start noise. The
pipelines sample the VAE's latent distribution for the control image; ComfyUI and this project take
its mean, so the test makes the pipelines take the mean too.

ComfyUI's own SD3 and Flux ControlNet example files of the corpus also run, unedited, on the tiny
files (model names, the control image, sizes and steps set as `nodegraph run --set` would).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _checkpoint_fixtures import write_safetensors
from _hf_tokenizers import clip_tokenizer, t5_tokenizer
from _pipeline_fixtures import folder_executor
from _random_weights import randomize_
from _transformer_fixtures import FLUX_DEV, SD3, SD35
from nodegraph_diffusion.nodes import comfyui
from nodegraph_diffusion.networks import flux as flux_module
from nodegraph_diffusion.networks import mmdit as mmdit_module
from PIL import Image
from test_transformer_pipelines import (
    FLUX_GUIDANCE,
    MAX_ERROR,
    MEAN_ERROR,
    PROMPT,
    SD3_CFG,
    T5_LENGTH,
    Components,
    flux_components,
    sd3_components,
    single_file,
    start_noise,
)
from torch import Tensor


pytestmark = [pytest.mark.slow, pytest.mark.parity]

API = comfyui.IMPORTERS[0]
CONTROL_IMAGE = "control.png"


def sd3_controlnet(main: mmdit_module.MMDiTConfig, kind: str, seed: int):
    """diffusers SD3ControlNetModel of InstantX's kind (own patch embedding and text) or of Stability's
    SD3.5-large kind (image-only blocks on the main model's patch embedding), random everywhere."""
    from diffusers import SD3ControlNetModel

    common = dict(patch_size=main.patch_size, in_channels=main.in_channels, num_layers=1,
                  attention_head_dim=main.head_dim, num_attention_heads=main.num_heads,
                  caption_projection_dim=main.hidden_size, pooled_projection_dim=main.pooled_dim,
                  out_channels=main.out_channels)
    if kind == "instantx":
        model = SD3ControlNetModel(sample_size=2 * main.pos_embed_max_size, joint_attention_dim=main.context_dim,
                                   pos_embed_max_size=main.pos_embed_max_size, **common)
        randomize_(model, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=generator))
        return model
    model = SD3ControlNetModel(joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None,
                               use_pos_embed=False, force_zeros_for_pooled_projection=False, **common)
    return randomize_(model, seed)


# The union ControlNet's type the Flux graph sets ("depth (InstantX)") and its index.
FLUX_TYPE, FLUX_MODE = "depth (InstantX)", 2


def flux_union_controlnet(main: flux_module.FluxConfig, seed: int):
    """InstantX's kind of Flux ControlNet (diffusers FluxControlNetModel) with three control types."""
    from diffusers import FluxControlNetModel

    model = FluxControlNetModel(
        patch_size=1, in_channels=main.packed_in_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=main.head_dim, num_attention_heads=main.num_heads, joint_attention_dim=main.context_dim,
        pooled_projection_dim=main.pooled_dim, guidance_embeds=main.guidance_embed,
        axes_dims_rope=flux_module.default_axes_dim(main.head_dim), num_mode=3)
    return randomize_(model, seed)


def stability_file(controlnet) -> dict[str, Tensor]:
    """Stability's SD3.5 ControlNet file layout (what diffusers' conversion script reads), control type blur."""
    state = controlnet.state_dict()
    own = ("controlnet_blocks.", "pos_embed_input.", "time_text_embed.")
    out = {k: v for k, v in state.items() if k.startswith(own)}
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in blocks:
        d = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{d}attn.qkv.{p}"] = torch.cat([state[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{d}attn.proj.{p}"] = state[f"{d}attn.to_out.0.{p}"]
            out[f"{d}mlp.fc1.{p}"] = state[f"{d}ff.net.0.proj.{p}"]
            out[f"{d}mlp.fc2.{p}"] = state[f"{d}ff.net.2.{p}"]
            out[f"{d}adaLN_modulation.1.{p}"] = state[f"{d}norm1.linear.{p}"]
    out["control_type"] = torch.tensor(0.0)
    return {k: v.detach().clone() for k, v in out.items()}


@dataclass(frozen=True)
class Case:
    model: str  # "sd3" (InstantX, ControlNetApplySD3), "sd35" (Stability's, ControlNetApplyAdvanced), "flux" (union)
    width: int
    height: int
    strength: float = 0.8
    steps: int = 5
    seed: int = 11

    @property
    def id(self) -> str:
        return f"{self.model}-{self.width}x{self.height}"


CASES = [Case("sd3", 64, 64), Case("sd3", 48, 80), Case("sd35", 80, 48, strength=0.6), Case("flux", 64, 64),
         Case("flux", 48, 80, strength=0.5)]
FILES = {"sd3": ("sd3_cn_parity.safetensors", "sd3_controlnet_canny.safetensors"),
         "sd35": ("sd35_cn_parity.safetensors", "sd3.5_large_controlnet_blur.safetensors"),
         "flux": ("flux_cn_parity.safetensors", "instantx_flux_union.safetensors")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("checkpoints", "controlnet"):
        (root / kind).mkdir()
    built: dict[str, tuple[Components, object]] = {}
    for name, config, kind, seed in (("sd3", SD3, "instantx", 400), ("sd35", SD35, "stability", 500),
                                     ("flux", FLUX_DEV, "instantx", 600)):
        checkpoint, controlnet_file = FILES[name]
        if name == "flux":
            components, controlnet = flux_components(config, checkpoint, seed), flux_union_controlnet(config, seed + 50)
        else:
            components, controlnet = sd3_components(config, checkpoint, seed), sd3_controlnet(config, kind, seed + 50)
        write_safetensors(root / "checkpoints" / checkpoint, single_file(components), dtype=None)
        weights = ({k: v.detach().clone() for k, v in controlnet.state_dict().items()} if kind == "instantx"
                   else stability_file(controlnet))
        write_safetensors(root / "controlnet" / controlnet_file, weights, dtype=None)
        built[name] = (components, controlnet)
    inputs = tmp_path_factory.mktemp("inputs")
    folder = tmp_path_factory.mktemp("tokenizers")
    tokenizers = {"clip_l": clip_tokenizer(folder / "clip_l"),
                  "clip_g": clip_tokenizer(folder / "clip_g", pad_token="!"), "t5xxl": t5_tokenizer(folder / "t5")}
    with folder_executor(root, tmp_path_factory.mktemp("out"), inputs) as executor:
        yield executor, built, tokenizers, inputs


def control_image(case: Case, folder: Path) -> Tensor:
    """A smooth, structured control image at the graph's size, written as the graph's LoadImage input;
    returns it as the graph reads it: (1, 3, H, W) in [0, 1]."""
    y, x = np.mgrid[0:case.height, 0:case.width]
    rgb = np.stack([np.sin(x / 5.0), np.cos(y / 7.0), np.sin((x + y) / 9.0)], axis=-1) * 0.5 + 0.5
    pixels = (rgb * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(folder / CONTROL_IMAGE)
    return torch.from_numpy(pixels).float().div(255).permute(2, 0, 1)[None]


def graph(case: Case) -> dict:
    checkpoint, controlnet_file = FILES[case.model]
    apply = {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["9", 0], "vae": ["1", 2],
             "image": ["10", 0], "strength": case.strength, "start_percent": 0.0, "end_percent": 1.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": case.width, "height": case.height,
                                                              "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["11", 0], "negative": ["11", 1], "latent_image": ["5", 0],
            "seed": case.seed, "steps": case.steps, "cfg": SD3_CFG, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sd3_controlnet"}},
        "9": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet_file}},
        "10": {"class_type": "LoadImage", "inputs": {"image": CONTROL_IMAGE, "upload": "image"}},
        "11": {"class_type": "ControlNetApplySD3" if case.model == "sd3" else "ControlNetApplyAdvanced",
               "inputs": apply},
    }


def flux_graph(case: Case) -> dict:
    """ComfyUI's Flux ControlNet example as BasicGuider + SamplerCustomAdvanced (FluxGuidance, no CFG),
    its union ControlNet told the control type."""
    checkpoint, controlnet_file = FILES[case.model]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": FLUX_GUIDANCE}},
        "4": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                            "width": case.width, "height": case.height}},
        "5": {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["15", 0]}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": case.seed}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": case.steps,
                                                         "denoise": 1.0}},
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": case.width, "height": case.height,
                                                              "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["5", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "flux_controlnet"}},
        "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet_file}},
        "14": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["13", 0], "type": FLUX_TYPE}},
        "15": {"class_type": "ControlNetApplySD3", "inputs": {
            "positive": ["3", 0], "negative": ["3", 0], "control_net": ["14", 0], "vae": ["1", 2],
            "image": ["16", 0], "strength": case.strength, "start_percent": 0.0, "end_percent": 1.0}},
        "16": {"class_type": "LoadImage", "inputs": {"image": CONTROL_IMAGE, "upload": "image"}},
    }


def run_flux_pipeline(case: Case, components: Components, controlnet, tokenizers: dict, image: Tensor) -> Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline, FluxPipeline

    noise, _ = start_noise_for(case)
    # FLUX.1-dev's scheduler config: the shift follows the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    encoders = components.text_encoders
    pipe = FluxControlNetPipeline(scheduler=scheduler, vae=components.vae, text_encoder=encoders["clip_l"],
                                  tokenizer=tokenizers["clip_l"], text_encoder_2=encoders["t5xxl"],
                                  tokenizer_2=tokenizers["t5xxl"], transformer=components.transformer,
                                  controlnet=controlnet)
    packed = FluxPipeline._pack_latents(noise.clone(), *noise.shape)
    return pipe(PROMPT, guidance_scale=FLUX_GUIDANCE, latents=packed, height=case.height, width=case.width,
                num_inference_steps=case.steps, output_type="pt", max_sequence_length=T5_LENGTH["flux"],
                control_image=image * 2 - 1, control_mode=FLUX_MODE,
                controlnet_conditioning_scale=case.strength).images


def run_pipeline(case: Case, components: Components, controlnet, tokenizers: dict, image: Tensor,
                 monkeypatch: pytest.MonkeyPatch) -> Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # ComfyUI (and this project) encode the control image to the posterior mean, diffusers samples it.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    if case.model == "flux":
        return run_flux_pipeline(case, components, controlnet, tokenizers, image)
    noise, _ = start_noise_for(case)
    encoders = components.text_encoders
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=components.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=components.vae, text_encoder=encoders["clip_l"], tokenizer=tokenizers["clip_l"],
        text_encoder_2=encoders["clip_g"], tokenizer_2=tokenizers["clip_g"], text_encoder_3=encoders["t5xxl"],
        tokenizer_3=tokenizers["t5xxl"], controlnet=controlnet)
    # A tensor control image goes to the VAE as it is: in [-1, 1].
    return pipe(PROMPT, negative_prompt="", guidance_scale=SD3_CFG, latents=noise.clone(), height=case.height,
                width=case.width, num_inference_steps=case.steps, output_type="pt",
                max_sequence_length=T5_LENGTH["sd3"], control_image=image * 2 - 1,
                controlnet_conditioning_scale=case.strength).images


def start_noise_for(case: Case) -> tuple[Tensor, torch.Generator]:
    return start_noise(case)  # type: ignore[arg-type]  # reads width, height and seed


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_comfyui_controlnet_graph_matches_diffusers_pipeline(case: Case, setup, monkeypatch) -> None:
    executor, built, tokenizers, inputs = setup
    components, controlnet = built[case.model]
    image = control_image(case, inputs)
    flux = case.model == "flux"
    with_control = flux_graph(case) if flux else graph(case)
    save, decode = ("12", "11") if flux else ("8", "7")
    result = executor.run(API.convert(with_control), outputs=[save, decode])
    assert result.status == "succeeded", result.error
    ours = result.results[decode].outputs.image.permute(0, 3, 1, 2)

    without = flux_graph(case) if flux else graph(case)
    if flux:
        without["5"]["inputs"]["conditioning"] = ["3", 0]
    else:
        without["6"]["inputs"].update(positive=["3", 0], negative=["4", 0])
    plain = executor.run(API.convert(without), outputs=[decode]).results[decode].outputs.image.permute(0, 3, 1, 2)

    reference = run_pipeline(case, components, controlnet, tokenizers, image, monkeypatch)
    difference = (ours.double() - reference.double()).abs()
    effect = (ours.double() - plain.double()).abs().max().item()
    figures = (f"{case.id}: image max {difference.max().item() * 255:.4f}/255 mean "
               f"{difference.mean().item() * 255:.4f}/255; ControlNet's effect max {effect * 255:.1f}/255")
    print(figures)
    assert ours.std() > 0.05, figures
    assert effect > 10 / 255, figures  # the ControlNet changes the image, so the comparison tests it
    assert difference.max().item() <= MAX_ERROR, figures
    assert difference.mean().item() <= MEAN_ERROR, figures


# --------------------------------------------------------------------------- the corpus files themselves

CORPUS_FILES = {  # ComfyUI's own SD3 and Flux ControlNet examples, in both forms -> the tiny models to run them on
    "examples__sd3__sd3_controlnet_example.png__png-api.json": "sd3",
    "examples__sd3__sd3_controlnet_example.png__png-ui.json": "sd3",
    "examples__flux__flux_controlnet_example.png__png-api.json": "flux",
    "examples__flux__flux_controlnet_example.png__png-ui.json": "flux",
}
CORPUS_SIZE = 64


def corpus_overrides(workflow, model: str, strength: float | None = None) -> list[str]:
    """`--set` assignments running an imported corpus file small on the tiny files: model names,
    the control image, 1024-pixel sizes to 64, 2 steps (the files themselves are not edited)."""
    checkpoint, controlnet_file = FILES[model]
    sets = []
    for node_id, node in workflow.nodes.items():
        if node.type == "LoadCheckpoint":
            sets.append(f"{node_id}.name={checkpoint}")
        elif node.type == "LoadControlNet":
            sets.append(f"{node_id}.name={controlnet_file}")
        elif node.type == "LoadImage":
            sets.append(f"{node_id}.image={CONTROL_IMAGE}")
        elif node.type in ("EmptyLatent", "ImageScale"):
            sets += [f"{node_id}.width={CORPUS_SIZE}", f"{node_id}.height={CORPUS_SIZE}"]
        elif node.type == "KSampler":
            sets.append(f"{node_id}.steps=2")
        elif node.type == "ApplyControlNet" and strength is not None:
            sets.append(f"{node_id}.strength={strength}")
    return sets


@pytest.mark.parametrize("name", sorted(CORPUS_FILES))
def test_comfyuis_controlnet_examples_run_on_tiny_models(name: str, setup, tmp_path) -> None:
    from nodegraph.cli import read_workflow
    from test_comfyui_corpus import CORPUS

    executor, _, _, inputs = setup
    control_image(Case(CORPUS_FILES[name], CORPUS_SIZE, CORPUS_SIZE), inputs)
    path = str(CORPUS / name)
    registry = executor.registry
    plain = read_workflow(path, [], registry)
    assert "ApplyControlNet" in {node.type for node in plain.nodes.values()}
    images = []
    for strength in (None, 0.0):
        workflow = read_workflow(path, corpus_overrides(plain, CORPUS_FILES[name], strength), registry)
        result = executor.run(workflow)
        assert result.status == "succeeded", f"{name}: {result.error}"
        decoded = [result.results[node_id].outputs.image for node_id, node in workflow.nodes.items()
                   if node.type == "VAEDecode"]
        assert len(decoded) == 1 and decoded[0].shape == (1, CORPUS_SIZE, CORPUS_SIZE, 3)
        assert bool(torch.isfinite(decoded[0]).all()) and float(decoded[0].std()) > 0.01
        images.append(decoded[0])
    # The file's ControlNet strength against none: the ControlNet is applied.
    assert (images[0] - images[1]).abs().max() > 1 / 255
