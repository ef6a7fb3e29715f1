"""End-to-end graphs of the SD3/SD3.5 and Flux.1 nodes on tiny random models: ComfyUI API-format
graphs (UNETLoader, DualCLIPLoader, TripleCLIPLoader, EmptySD3LatentImage, FluxGuidance,
ModelSamplingSD3/Flux, BasicGuider, KSampler, SamplerCustomAdvanced) imported and run through the
executor at a non-square size, the ready workflows validated and run, text-encoder files combined
from their weights, flow schedules against their written-out formulas, and what cannot be built
refused by name."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.importers import WorkflowImportError
from nodegraph.plugins import build_registry
from nodegraph.validation import WorkflowInvalid
from nodegraph_diffusion.nodes import comfyui

from _checkpoint_fixtures import write_safetensors
from _transformer_fixtures import CLIP_G, CLIP_L, SD3_POOLED, T5, write_transformer_models

pytestmark = pytest.mark.slow

API = comfyui.IMPORTERS[0]
ROOT = Path(__file__).resolve().parents[2]
# A non-square image: 80 rows, 48 columns (latent 10 x 6, an odd number of MMDiT/Flux patches across).
WIDTH, HEIGHT = 48, 80
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_transformer_models(tmp_path_factory.mktemp("models"))
    # An AuraFlow-layout file (a known architecture this library cannot build), alone and as a checkpoint.
    aura = {"double_layers.0.attn.w1q.weight": torch.zeros(8, 8), "final_linear.weight": torch.zeros(4, 8)}
    write_safetensors(root / "diffusion_models" / "aura_flow_0.3.safetensors", aura, dtype=None)
    write_safetensors(root / "checkpoints" / "aura_flow_0.3.safetensors",
                      {f"model.diffusion_model.{k}": v for k, v in aura.items()}, dtype=None)
    return root


@pytest.fixture(scope="module")
def executor(models, tmp_path_factory):
    """One executor for the module, so the model files load once (as in a long-running server)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(models))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=4 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("out"))


def run(executor: Executor, graph: dict, *outputs: str):
    """Import a ComfyUI API-format graph and run it for `outputs` (node ids); returns the result."""
    result = executor.run(API.convert(graph), outputs=list(outputs))
    assert result.status == "succeeded", result.error
    return result


def failure(executor: Executor, graph: dict, *outputs: str) -> str:
    result = executor.run(API.convert(graph), outputs=list(outputs))
    assert result.status == "failed"
    return str(result.error)


def output(result, node_id: str, name: str):
    return getattr(result.results[node_id].outputs, name)


def check_image(image: torch.Tensor, width: int = WIDTH, height: int = HEIGHT) -> None:
    assert image.shape == (1, height, width, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0.0  # a picture, not a constant


def flux_dev_graph(guidance: float = 3.5, seed: int = 3) -> dict:
    """Flux.1-dev as ComfyUI's example builds it: diffusion model + DualCLIPLoader + VAELoader,
    FluxGuidance, BasicGuider and SamplerCustomAdvanced."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                         "clip_name2": "clip_l.safetensors", "type": "flux",
                                                         "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": guidance}},
        "6": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["5", 0]}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed, "control_after_generate": "fixed"}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "9": {"class_type": "BasicScheduler", "inputs": {"model": ["12", 0], "scheduler": "simple", "steps": 3,
                                                         "denoise": 1.0}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["7", 0], "guider": ["6", 0],
                                                                 "sampler": ["8", 0], "sigmas": ["9", 0],
                                                                 "latent_image": ["10", 0]}},
        "12": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": WIDTH, "height": HEIGHT}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "flux_dev"}},
    }


def test_flux_dev_diffusion_model_dual_clip_flux_guidance_and_custom_sampler(executor):
    graph = flux_dev_graph()
    # The empty latent's model is found through the sampler's guider and the model-sampling node.
    assert API.convert(graph)["nodes"]["10"]["inputs"]["model"] == {"from": "1", "output": "model"}
    first = run(executor, graph, "14", "13")
    check_image(output(first, "13", "image"))
    latent = output(first, "11", "latent").samples
    assert latent.shape == (1, 16, HEIGHT // 8, WIDTH // 8) and torch.isfinite(latent).all()
    assert output(first, "5", "conditioning")[0].guidance == 3.5

    # The distilled guidance reaches the model; nothing upstream of FluxGuidance runs again.
    second = run(executor, flux_dev_graph(guidance=1.0), "14", "13")
    assert set(second.executed) == {"5", "6", "11", "13", "14"}
    assert (output(second, "13", "image") - output(first, "13", "image")).abs().max() > 1e-3


def test_flux_schnell_in_fp8_through_ksampler(executor):
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors",
                                                     "weight_dtype": "fp8_e4m3fn"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 5,
            "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux_schnell"}},
    }
    result = run(executor, graph, "9", "8")
    check_image(output(result, "8", "image"))
    network = output(result, "1", "model").network
    stored = {p.dtype for p in network.parameters()}
    assert stored == {torch.float8_e4m3fn}, stored  # kept in 8 bits, upcast per layer when it runs


def sd3_graph(checkpoint: str = "sd3.5_large.safetensors", encoders: tuple[str, ...] = (
        "t5xxl_fp16.safetensors", "clip_g.safetensors", "clip_l.safetensors"), shift: float = 3.0) -> dict:
    """SD3.5 as ComfyUI's example builds it: checkpoint (MMDiT + VAE) + TripleCLIPLoader,
    ModelSamplingSD3, CLIPTextEncode and KSampler with cfg."""
    name1, name2, name3 = encoders
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": name1, "clip_name2": name2,
                                                           "clip_name3": name3}},
        "3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 2,
            "steps": 4, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "sgm_uniform", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sd35"}},
    }


@pytest.mark.parametrize("checkpoint", ["sd3.5_large.safetensors", "sd3.5_medium.safetensors"])
def test_sd3_checkpoint_triple_clip_model_sampling_sd3_and_ksampler(executor, checkpoint):
    """sd3.5_large is the qk-norm + dual-attention (MMDiT-X) variant, sd3.5_medium the plain MMDiT."""
    result = run(executor, sd3_graph(checkpoint), "9", "8")
    check_image(output(result, "8", "image"))
    assert output(result, "1", "clip") is None  # SD3.5 files carry no text encoders
    positive = output(result, "4", "conditioning")[0]
    # CLIP-L and CLIP-G states (77 tokens, padded to T5's width), then T5's 77; pooled L + G.
    assert positive.context.shape == (1, 77 + 77, T5.width)
    assert positive.pooled.shape == (1, SD3_POOLED)


def test_triple_clip_in_any_order_equals_the_checkpoint_text_encoders(executor):
    """The separate files hold the same weights as the checkpoint's text_encoders.*: which file is
    CLIP-L, CLIP-G (exact GELU) and T5 is read from the weights, whatever the order."""
    graph = sd3_graph("sd3_medium_incl_clips_t5.safetensors")
    graph["10"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}}
    graph["11"] = {"class_type": "TripleCLIPLoader", "inputs": {
        "clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "clip_name3": "t5xxl_fp16.safetensors"}}
    graph["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": PROMPT}}
    result = run(executor, graph, "2", "4", "10", "12")
    from_checkpoint = output(result, "10", "conditioning")[0]
    for node in ("4", "12"):
        entry = output(result, node, "conditioning")[0]
        torch.testing.assert_close(entry.context, from_checkpoint.context, rtol=0, atol=1e-6)
        torch.testing.assert_close(entry.pooled, from_checkpoint.pooled, rtol=0, atol=1e-6)
    assert output(result, "2", "clip").encoders.keys() == {"clip_l", "clip_g", "t5xxl"}
    assert output(result, "2", "clip").encoders["clip_g"].config.activation == "gelu"
    assert output(result, "2", "clip").encoders["clip_l"].config.activation == "quick_gelu"


def test_text_encode_sd3_per_encoder_prompts_and_empty_padding(executor):
    def encode(clip_l: str, clip_g: str, t5xxl: str, padding: str) -> dict:
        return {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["2", 0], "clip_l": clip_l, "clip_g": clip_g,
                                                              "t5xxl": t5xxl, "empty_padding": padding}}

    graph = {"2": sd3_graph()["2"], "4": sd3_graph()["4"],
             "20": encode(PROMPT, PROMPT, PROMPT, "none"),
             "21": encode("", "", "", "none"),
             "22": encode("", "", "", "empty_prompt"),
             "23": encode("a cat", "", "", "none"),
             "24": encode("a cat", "", "", "empty_prompt"),
             "25": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}}}
    result = run(executor, graph, *graph)
    conditioning = {node: output(result, node, "conditioning")[0] for node in graph if node != "2"}
    # One prompt for all three encoders is what CLIPTextEncode does.
    torch.testing.assert_close(conditioning["20"].context, conditioning["4"].context, rtol=0, atol=0)
    # "none": empty prompts are left out: no CLIP states, a zero pooled vector, T5's end token alone.
    assert conditioning["21"].context.shape == (1, 1, T5.width)
    assert not conditioning["21"].pooled.any()
    # "empty_prompt": the empty prompt, exactly what CLIPTextEncode("") gives.
    torch.testing.assert_close(conditioning["22"].context, conditioning["25"].context, rtol=0, atol=0)
    # With CLIP-L's prompt given, CLIP-G's empty one is encoded as the empty prompt either way; T5's is not.
    torch.testing.assert_close(conditioning["23"].context[:, :77], conditioning["24"].context[:, :77], rtol=0, atol=0)
    assert conditioning["23"].context.shape == (1, 77 + 1, T5.width)
    assert conditioning["24"].context.shape == (1, 77 + 77, T5.width)


def test_dual_clip_sd3_without_clip_g_fills_it_with_zeros(executor):
    graph = {
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "sd3"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
    }
    entry = output(run(executor, graph, "4"), "4", "conditioning")[0]
    assert entry.context[:, :77, :CLIP_L.width].abs().sum() > 0
    assert not entry.context[:, :77, CLIP_L.width:].any()  # CLIP-G's place and the padding to T5's width
    assert not entry.pooled[:, CLIP_L.projection_dim:].any()


def test_flux_checkpoint_with_text_encode_flux_and_ksampler(executor):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev-all-in-one.safetensors"}},
        "2": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["1", 1], "clip_l": "a circle",
                                                             "t5xxl": PROMPT, "guidance": 2.0}},
        "3": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                            "width": WIDTH, "height": HEIGHT}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "beta", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "flux_ckpt"}},
    }
    result = run(executor, graph, "7", "6", "2")
    check_image(output(result, "6", "image"))
    entry = output(result, "2", "conditioning")[0]
    assert entry.guidance == 2.0
    assert entry.context.shape == (1, 256, T5.width)  # T5 padded to ComfyUI's Flux length
    assert entry.pooled.shape == (1, CLIP_L.width)  # CLIP-L's pooled output, unprojected


def _shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def test_flow_schedules_follow_the_shift_formulas(executor):
    """ComfyUI's "simple" scheduler takes every (table size / steps)-th entry of the model's table
    from the top; with 4 steps that is t = 1, 3/4, 1/2, 1/4 for both SD3's 1,000 and Flux's 10,000."""
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)

    def sigmas(model: list) -> dict:
        return {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": 4,
                                                           "denoise": 1.0}}

    def flux_sampling(model: list, width: int, height: int) -> dict:
        return {"class_type": "ModelSamplingFlux", "inputs": {"model": model, "max_shift": 1.15, "base_shift": 0.5,
                                                              "width": width, "height": height}}

    graph = {
        "sd3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "dev": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                       "weight_dtype": "default"}},
        "schnell": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors",
                                                           "weight_dtype": "default"}},
        "shift6": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["sd3", 0], "shift": 6.0}},
        "flux1024": flux_sampling(["dev", 0], 1024, 1024),
        "flux512": flux_sampling(["dev", 0], 512, 512),
        "s_sd3": sigmas(["sd3", 0]), "s_shift6": sigmas(["shift6", 0]), "s_dev": sigmas(["dev", 0]),
        "s_flux1024": sigmas(["flux1024", 0]), "s_flux512": sigmas(["flux512", 0]), "s_schnell": sigmas(["schnell", 0]),
    }
    nodes = [n for n in graph if n.startswith("s_")]
    result = run(executor, graph, *nodes)
    got = {n: output(result, n, "sigmas").double() for n in nodes}

    def expect(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values, torch.zeros(1, dtype=torch.float64)])

    def flux_shift(width: int, height: int) -> float:
        mu = 0.5 + (1.15 - 0.5) * (width * height / 256 - 256) / (4096 - 256)
        return math.exp(mu)

    tolerance = {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(got["s_sd3"], expect(_shifted(t, 3.0)), **tolerance)  # SD3's default shift 3
    torch.testing.assert_close(got["s_shift6"], expect(_shifted(t, 6.0)), **tolerance)
    torch.testing.assert_close(got["s_dev"], expect(_shifted(t, math.exp(1.15))), **tolerance)  # mu 1.15
    torch.testing.assert_close(got["s_flux1024"], got["s_dev"], **tolerance)
    torch.testing.assert_close(got["s_flux512"], expect(_shifted(t, flux_shift(512, 512))), **tolerance)
    torch.testing.assert_close(got["s_schnell"], expect(t), **tolerance)  # schnell: no shift


def test_model_sampling_nodes_refuse_a_u_net_model(executor, models):
    from _pipeline_fixtures import sd1_weights

    write_safetensors(models / "checkpoints" / "tiny-sd1.safetensors", sd1_weights(), dtype=None)
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
             "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}}
    message = failure(executor, graph, "2")
    assert "ModelSamplingSD3 applies to rectified-flow models (SD3, Flux.1); this model is SD1.x" in message


@pytest.mark.parametrize("loader, inputs", [
    ("UNETLoader", {"unet_name": "aura_flow_0.3.safetensors", "weight_dtype": "default"}),
    ("CheckpointLoaderSimple", {"ckpt_name": "aura_flow_0.3.safetensors"}),
])
def test_an_unsupported_architecture_is_refused_by_name(executor, loader, inputs):
    # Refused at validation, from the file's header (tests/diffusion/test_loader_validation.py).
    with pytest.raises(WorkflowInvalid) as caught:
        executor.run(API.convert({"1": {"class_type": loader, "inputs": inputs}}), outputs=["1"])
    message = str(caught.value)
    assert "aura_flow_0.3.safetensors is a AuraFlow model, an architecture nodegraph cannot run yet" in message


def test_text_encoder_loaders_check_what_the_files_are(executor):
    def dual(name1: str, name2: str, kind: str) -> dict:
        return {"1": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": name1, "clip_name2": name2,
                                                                 "type": kind}}}

    message = failure(executor, dual("clip_l.safetensors", "clip_g.safetensors", "flux"), "1")
    assert "clip_g.safetensors is a clip_g text encoder, which type 'flux' does not take" in message
    message = failure(executor, dual("clip_l.safetensors", "clip_l_legacy.safetensors", "sdxl"), "1")
    assert "are CLIP towers of the same size (64, 2)" in message
    # Two CLIPs for SDXL: the larger is CLIP-G, in either order.
    clip = output(run(executor, dual("clip_g.safetensors", "clip_l.safetensors", "sdxl"), "1"), "1", "clip")
    assert list(clip.encoders) == ["clip_l", "clip_g"] and clip.family.value == "sdxl"
    assert clip.encoders["clip_g"].config.width == CLIP_G.width
    # A lone CLIP-L from ComfyUI's older `clip` folder, for SD1.x; a lone T5 for SD3.
    single = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_legacy.safetensors",
                                                           "type": "stable_diffusion"}},
              "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl_fp16.safetensors", "type": "sd3",
                                                           "device": "cpu"}}}
    result = run(executor, single, "1", "2")
    sd1_clip, t5_clip = output(result, "1", "clip"), output(result, "2", "clip")
    assert list(sd1_clip.encoders) == ["clip_l"] and sd1_clip.family.value == "sd1"
    assert list(t5_clip.encoders) == ["t5xxl"] and t5_clip.family.value == "sd3"
    # Types ComfyUI has for models nodegraph cannot build are refused when the graph is imported.
    with pytest.raises(WorkflowImportError) as caught:
        API.convert({"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5.safetensors", "type": "wan"}}})
    assert "'wan' is not supported here (supported: stable_diffusion, sd3, pixart)" in str(caught.value)


def test_a_model_from_the_older_unet_folder_and_a_checkpoint_without_text_encoders(executor):
    graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev-unet.safetensors",
                                                          "weight_dtype": "fp8_e5m2"}},
             "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large.safetensors"}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": PROMPT}}}
    result = run(executor, graph, "1")
    assert {p.dtype for p in output(result, "1", "model").network.parameters()} == {torch.float8_e5m2}
    assert "this checkpoint has no text encoders; load them with LoadTextEncoders" in failure(executor, graph, "3")


def test_a_flux_lora_patches_the_model_and_clip_l_while_it_runs(executor, models):
    """A kohya-format Flux LoRA on the fused qkv of a double block and on CLIP-L, applied to an fp8 model."""
    generator = torch.Generator().manual_seed(9)
    d, rank = 128, 4
    write_safetensors(models / "loras" / "flux_style.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, d, generator=generator),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * d, rank, generator=generator),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
            torch.randn(rank, CLIP_L.width, generator=generator),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
            torch.randn(CLIP_L.width, rank, generator=generator),
    }, dtype=None)

    def graph(strength: float) -> dict:
        graph = flux_dev_graph()
        graph["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
        graph["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0],
                                                              "lora_name": "flux_style.safetensors",
                                                              "strength_model": strength, "strength_clip": strength}}
        graph["12"]["inputs"]["model"] = ["20", 0]
        graph["4"]["inputs"]["clip"] = ["20", 1]
        return graph

    plain = flux_dev_graph()
    plain["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    base = run(executor, plain, "11", "4")
    off = run(executor, graph(0.0), "11", "4")
    on = run(executor, graph(0.5), "11", "4")
    latent = {name: output(result, "11", "latent").samples for name, result in
              (("base", base), ("off", off), ("on", on))}
    torch.testing.assert_close(latent["off"], latent["base"], rtol=0, atol=0)
    assert (latent["on"] - latent["base"]).abs().max() > 1e-3
    pooled = {name: output(result, "4", "conditioning")[0].pooled for name, result in (("base", base), ("on", on))}
    assert (pooled["on"] - pooled["base"]).abs().max() > 1e-4
    # The stored 8-bit weights are not touched by the patch.
    network = output(on, "1", "model").network
    assert network.double_blocks[0].img_attn.qkv._parameters["weight"].dtype == torch.float8_e4m3fn


# --- the ready workflows ------------------------------------------------------------------------

WORKFLOWS = ["sd35", "flux_dev", "flux_schnell"]
# The sizes and step counts the tiny models can run in a test (the files ask for 1024x1024).
SMALL = {"sd35": {"latent": {"width": WIDTH, "height": HEIGHT}, "sampler": {"steps": 2}},
         "flux_dev": {"latent": {"width": WIDTH, "height": HEIGHT}, "sigmas": {"steps": 2},
                      "model_sampling": {"width": WIDTH, "height": HEIGHT}},
         "flux_schnell": {"latent": {"width": WIDTH, "height": HEIGHT}}}


def workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ready_workflows_name_the_files_to_download_and_validate_with_them_in_place(executor, name):
    document = workflow(name)
    description = document["ui"]["description"]
    files = [value for node in document["nodes"].values() for key, value in node["inputs"].items()
             if key.startswith("name")]
    for file_name in files:
        assert file_name in description, file_name
    for folder in ("models/text_encoders",
                   "models/checkpoints" if name == "sd35" else "models/diffusion_models"):
        assert folder in description
    executor.compile(document)  # raises WorkflowInvalid if a file or input is not right


def test_ready_workflows_report_only_their_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    registry, _ = build_registry()
    for name in WORKFLOWS:
        with pytest.raises(WorkflowInvalid) as caught:
            Executor(registry, OutputCache(max_bytes=1 << 20), device="cpu").compile(workflow(name))
        issues = caught.value.issues
        assert {issue.code for issue in issues} == {"value_not_in_choices"}, issues
        assert {issue.input for issue in issues} <= {"name", "name1", "name2", "name3"}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ready_workflows_run_on_the_tiny_models(executor, name):
    document = copy.deepcopy(workflow(name))
    for node_id, changes in SMALL[name].items():
        document["nodes"][node_id]["inputs"].update(changes)
    result = executor.run(document, outputs=["save", "decode"])
    assert result.status == "succeeded", result.error
    check_image(result.results["decode"].outputs.image)
    assert [Path(f).suffix for f in result.files] == [".png"]
