"""End-to-end parity of edit-model graphs with diffusers' pipelines: Flux.1 Fill (InpaintModelConditioning,
FluxFillPipeline), Canny/Depth (InstructPixToPixConditioning, FluxControlPipeline) and Kontext
(ReferenceLatent, FluxKontextPipeline, the reference image of another size than the output), and
an SD1.5-layout InstructPix2Pix model under DualCFGGuider (StableDiffusionInstructPix2PixPipeline).

Tiny diffusers components with random values in every parameter (FluxTransformer2DModel taking 384 or
128 packed input channels and giving 64, a 16-channel AutoencoderKL, CLIP-L, T5) are written as one
single file in the original key layout, as in test_transformer_pipelines. A ComfyUI API-format graph
shaped like ComfyUI's Flux examples, imported as a user's file is, loads it and samples; the diffusers
pipeline runs the same modules from the same start noise. Both pipelines draw the conditioning image's
latent from the VAE's posterior; ComfyUI and the graph take its mean, so the pipelines are given the
mean too (the only change made to them). The InstructPix2Pix pipeline multiplies its latents by
init_noise_sigma = sigma_max, so it is handed noise x sqrt(1 + sigma_max^2) / sigma_max: the graph's
start, which is ComfyUI's for a full denoise (diffusers' 'leading' spacing uses the same
sqrt(sigma^2 + 1) as init_noise_sigma); the Flux start is unchanged. Images must agree within 3/255
at every pixel and 1/255 on average; the conditioning latents and the final latent are compared as well.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.networks import flux as flux_module

from _checkpoint_fixtures import write_safetensors
from _hf_tokenizers import clip_tokenizer, t5_tokenizer
from _random_weights import randomize_
from _transformer_fixtures import CLIP_L, FLUX_DEV
from test_transformer_pipelines import (
    API,
    MAX_ERROR,
    MEAN_ERROR,
    T5_LENGTH,
    Components,
    clip_without_projection,
    single_file,
    start_noise,
    t5_encoder,
    vae16,
)

pytestmark = [pytest.mark.slow, pytest.mark.parity]

PROMPT = "a red circle on a blue background"
GUIDANCE = 3.5
IMAGE = "source.png"


def flux_transformer(config: flux_module.FluxConfig, seed: int) -> nn.Module:
    """FluxTransformer2DModel taking the variant's packed input channels and giving 64 (Fill, Canny)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=config.packed_in_channels, out_channels=config.packed_out_channels,
        num_layers=config.depth, num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=True,
        axes_dims_rope=flux_module.default_axes_dim(config.head_dim))
    return randomize_(model, seed)


def components(in_channels: int, file_name: str, seed: int) -> Components:
    config = replace(FLUX_DEV, in_channels=in_channels)
    return Components("flux", file_name, flux_transformer(config, seed), vae16("flux", seed + 1), {
        "clip_l": clip_without_projection(CLIP_L, seed + 2), "t5xxl": t5_encoder(seed + 3)})


MODELS = {"fill": lambda: components(96, "flux1-fill-parity.safetensors", 700),
          "canny": lambda: components(32, "flux1-canny-parity.safetensors", 800),
          "kontext": lambda: components(16, "flux1-kontext-parity.safetensors", 900)}
# Kontext's reference image: its own size (multiples of 16, which FluxKontextPipeline keeps as they are).
KONTEXT_IMAGE = (80, 48)  # width, height


def _write_source(path: Path, height: int, width: int) -> None:
    """An RGBA image: smooth colours (a VAE-friendly input), transparent (LoadImage's mask) in a block."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 0] = 255 * cols / (width - 1)
    pixels[..., 1] = 255 * rows / (height - 1)
    pixels[..., 2] = 128 + 100 * np.sin(rows / 5)
    pixels[..., 3] = 255
    pixels[height // 4: height // 2 + 8, width // 4: 3 * width // 4, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)


@dataclass(frozen=True)
class Case:
    model: str  # a MODELS key
    width: int
    height: int
    steps: int = 4
    seed: int = 11

    @property
    def id(self) -> str:
        return f"{self.model}-{self.width}x{self.height}"


CASES = [Case("fill", 64, 64), Case("fill", 48, 80), Case("canny", 64, 64), Case("canny", 80, 48),
         Case("kontext", 64, 64), Case("kontext", 48, 80)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    built = {name: make() for name, make in MODELS.items()}
    for made in built.values():
        write_safetensors(root / "checkpoints" / made.file_name, single_file(made), dtype=None)
    inputs = tmp_path_factory.mktemp("inputs")
    for width, height in {(case.width, case.height) for case in CASES} | {KONTEXT_IMAGE}:
        _write_source(inputs / f"{width}x{height}.png", height, width)
    folder = tmp_path_factory.mktemp("tokenizers")
    tokenizers = {"clip_l": clip_tokenizer(folder / "clip_l"), "t5xxl": t5_tokenizer(folder / "t5")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        executor = Executor(registry, OutputCache(max_bytes=4 << 30), device="cpu",
                            output_dir=tmp_path_factory.mktemp("out"))
        yield executor, built, tokenizers, inputs


def graph(case: Case, file_name: str) -> dict:
    """ComfyUI's Flux Fill / Canny / Kontext examples with the sampling of its Flux-dev example
    (ModelSamplingFlux for the image size, BasicGuider, SamplerCustomAdvanced), so the schedule is
    FluxPipeline's."""
    if case.model == "kontext":
        return kontext_graph(case, file_name)
    conditioning = "InpaintModelConditioning" if case.model == "fill" else "InstructPixToPixConditioning"
    inputs = {"positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "pixels": ["5", 0]}
    if case.model == "fill":
        inputs |= {"mask": ["5", 1], "noise_mask": False}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": file_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": GUIDANCE}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "LoadImage", "inputs": {"image": f"{case.width}x{case.height}.png"}},
        "6": {"class_type": conditioning, "inputs": inputs},
        "7": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                            "width": case.width, "height": case.height}},
        "8": {"class_type": "BasicGuider", "inputs": {"model": ["7", 0], "conditioning": ["6", 0]}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": case.seed}},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["7", 0], "scheduler": "simple",
                                                          "steps": case.steps, "denoise": 1.0}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["8", 0],
                                                                 "sampler": ["10", 0], "sigmas": ["11", 0],
                                                                 "latent_image": ["6", 2]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": case.model}},
    }


def kontext_graph(case: Case, file_name: str) -> dict:
    """ComfyUI's Flux Kontext example (VAEEncode, ReferenceLatent after FluxGuidance), small, without
    its FluxKontextImageScale (a megapixel)."""
    nodes = graph(replace(case, model="canny"), file_name)
    width, height = KONTEXT_IMAGE
    nodes["5"]["inputs"]["image"] = f"{width}x{height}.png"
    nodes["6"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["15", 0]}}
    nodes["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}}
    nodes["16"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": case.width, "height": case.height,
                                                                   "batch_size": 1}}
    nodes["12"]["inputs"]["latent_image"] = ["16", 0]
    del nodes["4"]
    return nodes


@dataclass
class Side:
    latent: Tensor  # (1, 16, h, w)
    image: Tensor  # (1, 3, H, W) in [0, 1]
    condition: Tensor  # the conditioning image's latent in the model's space (1, 16, h, w)


def run_graph(executor: Executor, case: Case, made: Components) -> tuple[Side, Tensor, Tensor]:
    """-> the graph's side, the loaded image (1, 3, H, W) and its mask (1, 1, H, W)."""
    result = executor.run(API.convert(graph(case, made.file_name)), outputs=["14", "13", "6", "5"])
    assert result.status == "succeeded", result.error
    outputs = result.results["6"].outputs
    entry = outputs.conditioning[0] if case.model == "kontext" else outputs.positive[0]
    loaded = result.results["5"].outputs
    condition = entry.reference_latents[0] if case.model == "kontext" else entry.concat_latent
    side = Side(latent=result.results["12"].outputs.latent.samples,
                image=result.results["13"].outputs.image.permute(0, 3, 1, 2), condition=condition)
    return side, loaded.image.permute(0, 3, 1, 2), loaded.mask[:, None]


def run_pipeline(case: Case, made: Components, tokenizers: dict, image: Tensor, mask: Tensor) -> Side:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxControlPipeline,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
    )
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    noise, _ = start_noise(replace(case))  # type: ignore[arg-type]
    latents: list[Tensor] = []
    encoded: list[Tensor] = []

    def keep_latents(pipe, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    def mean(self, generator=None):  # the posterior's mean, as the graph (and ComfyUI) encode
        encoded.append(self.mean.clone())
        return self.mean

    def mode(self):  # FluxKontextPipeline takes the mode (the mean): only recorded
        encoded.append(self.mean.clone())
        return self.mean

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    encoders = made.text_encoders
    parts = dict(scheduler=scheduler, vae=made.vae, text_encoder=encoders["clip_l"], tokenizer=tokenizers["clip_l"],
                 text_encoder_2=encoders["t5xxl"], tokenizer_2=tokenizers["t5xxl"], transformer=made.transformer)
    packed = FluxPipeline._pack_latents(noise.clone(), *noise.shape)
    common = dict(height=case.height, width=case.width, num_inference_steps=case.steps, guidance_scale=GUIDANCE,
                  latents=packed, output_type="pt", max_sequence_length=T5_LENGTH["flux"],
                  callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(DiagonalGaussianDistribution, "sample", mean)
        patch.setattr(DiagonalGaussianDistribution, "mode", mode)
        if case.model == "kontext":
            picture = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy())
            # max_area: the output size as asked (the pipeline scales it to a megapixel otherwise).
            out = FluxKontextPipeline(**parts)(image=picture, prompt=PROMPT, _auto_resize=False,
                                               max_area=case.width * case.height, **common).images
        elif case.model == "fill":
            out = FluxFillPipeline(**parts)(PROMPT, image=image, mask_image=mask, **common).images
        else:
            # FluxControlPipeline hands a tensor to the VAE as it is: in the VAE's range [-1, 1].
            out = FluxControlPipeline(**parts)(PROMPT, control_image=image * 2 - 1, **common).images
    assert len(latents) == case.steps and len(encoded) == 1
    scale, shift = made.vae.config.scaling_factor, made.vae.config.shift_factor
    final = FluxPipeline._unpack_latents(latents[-1], case.height, case.width, 8)
    return Side(latent=final, image=out, condition=(encoded[0] - shift) * scale)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_flux_tool_graph_matches_diffusers_pipeline(case: Case, world) -> None:
    executor, built, tokenizers, _ = world
    made = built[case.model]
    ours, image, mask = run_graph(executor, case, made)
    if case.model == "fill":
        assert 0 < mask.mean() < 1  # a real hole, not all or nothing
    reference = run_pipeline(case, made, tokenizers, image, mask)
    condition = (ours.condition - reference.condition).abs().max().item()
    latent = (ours.latent - reference.latent).abs().max().item()
    difference = (ours.image.double() - reference.image.double()).abs()
    figures = (f"{case.id}: image max {difference.max().item() * 255:.4f}/255 mean "
               f"{difference.mean().item() * 255:.4f}/255; conditioning latent {condition:.2e}, latent {latent:.2e}")
    print(figures)
    assert condition <= 1e-4, figures  # the masked (Fill) or control (Canny) image's latent
    assert latent <= 2e-3, figures
    assert ours.image.std() > 0.05, figures
    assert difference.max().item() <= MAX_ERROR, figures
    assert difference.mean().item() <= MEAN_ERROR, figures


# --------------------------------------------------------------------------- InstructPix2Pix (SD1.5 layout)

IP2P_CFG, IP2P_IMAGE_CFG = 7.0, 1.5


@pytest.fixture(scope="module")
def ip2p_world(tmp_path_factory: pytest.TempPathFactory):
    """An SD1.5-layout InstructPix2Pix checkpoint (an 8-channel U-Net) and an input image."""
    import test_sd_pipelines as sd

    from _unet_fixtures import diffusers_unet

    clip_l = sd.clip_model(sd.CLIP_L, 1002)
    made = sd.Components("sd1", "ip2p_parity.safetensors", diffusers_unet(replace(sd.SD1_UNET, in_channels=8), 1000),
                         sd.vae("sd1", 1001), {"clip_l": clip_l}, [clip_l])
    root = tmp_path_factory.mktemp("ip2p_models")
    (root / "checkpoints").mkdir()
    write_safetensors(root / "checkpoints" / made.file_name, sd.single_file(made), dtype=None)
    inputs = tmp_path_factory.mktemp("ip2p_inputs")
    _write_source(inputs / "source.png", 64, 96)
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("ip2p_tokenizer") / "clip_l")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("ip2p_out")), made, tokenizer


def ip2p_graph(file_name: str, steps: int, seed: int) -> dict:
    """ComfyUI's SDXL edit example (examples/edit_models) on an SD1.5 InstructPix2Pix checkpoint:
    InstructPixToPixConditioning, DualCFGGuider (cond1 = prompt and image, cond2 = empty prompt and
    image, negative = empty prompt alone), SamplerCustomAdvanced."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": file_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "source.png"}},
        "5": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["4", 0]}},
        "6": {"class_type": "DualCFGGuider", "inputs": {
            "model": ["1", 0], "cond1": ["5", 0], "cond2": ["5", 1], "negative": ["3", 0],
            "cfg_conds": IP2P_CFG, "cfg_cond2_negative": IP2P_IMAGE_CFG, "style": "regular"}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "9": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": steps,
                                                         "denoise": 1.0}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["7", 0], "guider": ["6", 0], "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["5", 2]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "ip2p"}},
    }


def test_instructpix2pix_graph_with_dual_cfg_matches_diffusers_pipeline(ip2p_world) -> None:
    """diffusers' StableDiffusionInstructPix2PixPipeline guides with uncond + guidance_scale * (text -
    image) + image_guidance_scale * (image - uncond) over (prompt + image, empty prompt + image, empty
    prompt + zero image): ComfyUI's DualCFGGuider, regular style, with cfg_conds the guidance scale
    and cfg_cond2_negative the image guidance scale. Its image latent is the VAE's unscaled mean."""
    import test_sd_pipelines as sd
    from diffusers import StableDiffusionInstructPix2PixPipeline

    executor, made, tokenizer = ip2p_world
    case = sd.Case("sd1", 96, 64, steps=10)
    result = executor.run(API.convert(ip2p_graph(made.file_name, case.steps, case.seed)),
                          outputs=["12", "11", "5", "4"])
    assert result.status == "succeeded", result.error
    ours_latent = result.results["10"].outputs.latent.samples
    ours_image = result.results["11"].outputs.image.permute(0, 3, 1, 2)
    encoded = result.results["5"].outputs.positive[0].concat_latent

    noise, generator = sd.start_noise(case)
    latents: list[Tensor] = []

    def keep_latents(pipe, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=made.vae, text_encoder=made.pipeline_text_encoders[0], tokenizer=tokenizer, unet=made.unet,
        scheduler=sd.scheduler(case, "sd1"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    image = result.results["4"].outputs.image.permute(0, 3, 1, 2)
    start = sd.comfyui_start(noise, float(pipe.scheduler.init_noise_sigma))  # the graph's: ComfyUI's full denoise
    with torch.no_grad():
        reference_latent = made.vae.encode(image * 2 - 1).latent_dist.mode()
        reference_image = pipe(PROMPT, image=image, num_inference_steps=case.steps, guidance_scale=IP2P_CFG,
                               image_guidance_scale=IP2P_IMAGE_CFG, latents=start, output_type="pt",
                               generator=generator, callback_on_step_end=keep_latents,
                               callback_on_step_end_tensor_inputs=["latents"]).images
    assert len(latents) == case.steps
    # The graph keeps the image's latent scaled (its latent space); the model is given it unscaled.
    condition = (encoded / sd.VAE_SCALING["sd1"] - reference_latent).abs().max().item()
    latent = (ours_latent - latents[-1]).abs().max().item()
    difference = (ours_image.double() - reference_image.double()).abs()
    figures = (f"ip2p-96x64: image max {difference.max().item() * 255:.4f}/255 mean "
               f"{difference.mean().item() * 255:.4f}/255; image latent {condition:.2e}, latent {latent:.2e}")
    print(figures)
    assert condition <= 1e-4, figures
    assert latent <= 2e-3, figures
    assert ours_image.std() > 0.05, figures
    assert difference.max().item() <= MAX_ERROR, figures
    assert difference.mean().item() <= MEAN_ERROR, figures
