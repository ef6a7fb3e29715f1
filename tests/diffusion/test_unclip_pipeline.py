"""SD2.1-unCLIP end to end against diffusers' StableUnCLIPImg2ImgPipeline.

A tiny SD2.1-unCLIP single file in the released layout: the SD2 parts of test_sd_pipelines (U-Net
through the library's diffusers -> LDM mapping, OpenCLIP-H text tower, VAE) with a U-Net that takes
the image vector (diffusers: class_embed_type "projection", the LDM file's label_emb) and a CLIP
vision tower (transformers' CLIPVisionModelWithProjection, random values everywhere) under
``embedder.model.visual.`` in OpenCLIP's layout. ComfyUI's unCLIP example graph (unCLIPCheckpointLoader,
CLIPVisionEncode, unCLIPConditioning at noise augmentation 0.25, KSampler) is imported and run; the
pipeline runs the same modules on the same start noise with noise_level 250 (= round(999 * 0.25)),
its generator seeded as the graph seeds the embedding noise (the sampling seed - 10), and the image
the graph's CLIPVisionEncode made (an image already at the tower's size is only normalised; the
preprocessing itself is compared with transformers' in test_clip_vision). Both give the negative
side a zero vector. Euler on whole timesteps, as in test_sd_pipelines, so the bounds are theirs.
The pipeline starts from given latents as they are (it scales only the ones it draws), so it gets
the graph's start, which is ComfyUI's start of a full denoise: the noise times sqrt(1 + sigma_max^2)
(diffusers' own 'leading' spacing uses the same sqrt(sigma^2 + 1) as its init_noise_sigma).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _checkpoint_fixtures import prefixed, write_safetensors
from _hf_tokenizers import clip_tokenizer
from _random_weights import randomize_
from _unet_fixtures import _diffusers_common_kwargs
from test_clip_vision import openclip_layout
from test_sd_pipelines import (
    CFG, CLIP_H, MAX_ERROR, MEAN_ERROR, NEGATIVE, PROMPT, SD2_UNET, Case, Components, FirstInput, clip_model,
    scheduler, single_file, start_noise, vae, without_last_layer,
)

from nodegraph.cache import OutputCache
from nodegraph.cli import read_workflow
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.architectures.detection import FileKind, ModelFamily, detect, detect_from_shapes
from nodegraph_diffusion.nodes import comfyui
from nodegraph_diffusion.weights.safetensors_io import read_safetensors_header
from nodegraph_diffusion.vision.clip_vision import clip_preprocess

pytestmark = [pytest.mark.slow, pytest.mark.parity]

EMBED = 32  # the image embedding width; the U-Net's vector is twice that
IMAGE_SIZE = 28
AUGMENTATION, NOISE_LEVEL = 0.25, 250
CASE = Case("sd2", 64, 96)


def unclip_unet(seed: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    kwargs = _diffusers_common_kwargs(SD2_UNET) | {
        "out_channels": SD2_UNET.out_channels, "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 2 * EMBED,
        "up_block_types": tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(SD2_UNET.transformer_depth))}
    return randomize_(UNet2DConditionModel(**kwargs), seed)


def vision_tower(seed: int) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # One 64-wide head and GELU: what the loader reads from a tower of this unknown size.
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                              image_size=IMAGE_SIZE, patch_size=7, projection_dim=EMBED, hidden_act="gelu")
    return randomize_(CLIPVisionModelWithProjection(config), seed)


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    clip_h = clip_model(CLIP_H, 702)
    unet = unclip_unet(700)
    # The file's U-Net names the image vector's embedding as SDXL's: the library's mapping reads it there.
    renamed = {k.replace("class_embedding.", "add_embedding."): v for k, v in unet.state_dict().items()}
    file_unet = nn.Module()
    file_unet.state_dict = lambda: renamed  # single_file reads only the state dict
    components = Components("sd2", "unclip_parity.safetensors", file_unet, vae("sd2", 701), {"clip_h": clip_h})
    tower = vision_tower(703)
    weights = single_file(components) | prefixed("embedder.model.visual.", openclip_layout(tower.state_dict()))
    # What released unCLIP files carry beside: the embedder's text parts and the image-noise schedule.
    weights |= {"embedder.model.logit_scale": torch.tensor(4.6), "noise_augmentor.betas": torch.zeros(1000)}
    write_safetensors(root / "checkpoints" / components.file_name, weights, dtype=None)
    inputs = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), "RGB").save(inputs / "in.png")
    return root, inputs, unet, components.vae, clip_h, tower


def graph() -> dict:
    """ComfyUI's unCLIP example (unclip_example.png), at the case's size and steps."""
    return {
        "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "unclip_parity.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "in.png", "upload": "image"}},
        "5": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 3], "image": ["4", 0],
                                                           "crop": "center"}},
        "6": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["2", 0], "clip_vision_output": ["5", 0],
                                                             "strength": 1.0, "noise_augmentation": AUGMENTATION}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": CASE.width, "height": CASE.height,
                                                           "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["6", 0], "negative": ["3", 0], "latent_image": ["7", 0],
            "seed": CASE.seed, "steps": CASE.steps, "cfg": CFG, "sampler_name": CASE.sampler, "scheduler": "normal",
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "unclip"}},
    }


def test_unclip_graph_matches_diffusers_stable_unclip_pipeline(unclip, tmp_path):
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor

    root, inputs, unet, vae_model, clip_h, tower = unclip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        executor = Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu", output_dir=tmp_path)
        document = comfyui.IMPORTERS[0].convert(graph())
        loaded = executor.run(document, outputs=["1", "4"])
        assert loaded.status == "succeeded", loaded.error
        model = loaded.results["1"].outputs.model
        assert model.sampling.prediction.value == "v" and model.network.config.adm_in_channels == 2 * EMBED
        y_input = FirstInput(model.network.label_emb)
        try:
            result = executor.run(document, outputs=["10", "9"])
        finally:
            y = y_input.remove()
        assert result.status == "succeeded", result.error
    ours = result.results["9"].outputs.image.permute(0, 3, 1, 2)
    pixels = clip_preprocess(loaded.results["4"].outputs.image, IMAGE_SIZE)

    noise, _ = start_noise(CASE)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(), image_encoder=tower, image_normalizer=StableUnCLIPImageNormalizer(EMBED),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=clip_tokenizer(tmp_path / "tokenizer", pad_token="!"), text_encoder=without_last_layer(clip_h, CLIP_H),
        unet=unet, scheduler=scheduler(CASE, "sd2"), vae=vae_model)
    # This pipeline takes given latents as the start itself (it scales only latents it draws), so
    # they go in as the graph starts a full denoise (as ComfyUI): noise x sqrt(1 + sigma_max^2).
    pipe.scheduler.set_timesteps(CASE.steps)
    sigma_max = float(pipe.scheduler.init_noise_sigma)
    assert sigma_max == float(pipe.scheduler.sigmas.max())
    start = noise * (1.0 + sigma_max**2) ** 0.5
    class_input = FirstInput(unet.class_embedding)
    try:
        theirs = pipe(image=pixels, prompt=PROMPT, negative_prompt=NEGATIVE, height=CASE.height, width=CASE.width,
                      num_inference_steps=CASE.steps, guidance_scale=CFG, noise_level=NOISE_LEVEL,
                      generator=torch.Generator().manual_seed(CASE.seed - 10), latents=start,
                      output_type="pt").images
    finally:
        batched = class_input.remove()

    # The image vector as each U-Net received it at the first step: (positive, negative).
    negative_y, positive_y = batched.chunk(2)  # diffusers batches (negative, positive)
    assert y is not None and y.shape == (2, 2 * EMBED)
    assert torch.equal(y[1], torch.zeros(2 * EMBED)) and torch.equal(negative_y[0], torch.zeros(2 * EMBED))
    assert (y[0] - positive_y[0]).abs().max() < 1e-5  # seen: 4.3e-7
    errors = (ours - theirs).abs()  # seen: max 0.0016/255, mean 0.00020/255
    assert float(errors.max()) <= MAX_ERROR and float(errors.mean()) <= MEAN_ERROR, (errors.max(), errors.mean())


def test_unclip_files_are_detected_by_layout(unclip):
    root = unclip[0]
    path = root / "checkpoints" / "unclip_parity.safetensors"
    detection = detect(path)
    assert (detection.family, detection.kind) == (ModelFamily.SD2, FileKind.CHECKPOINT)
    assert list(detection.components) == ["unet", "vae", "clip_h", "image_encoder"]
    assert {"embedder.model.logit_scale", "noise_augmentor.betas"} <= set(detection.ignored_keys)
    assert not detection.unclaimed_keys
    # The U-Net alone: attention at its first level tells it from SDXL's (which has none there).
    shapes = {k: v for k, v in read_safetensors_header(path).tensors.items() if k.startswith("model.diffusion_model.")}
    alone = detect_from_shapes({k: v.shape for k, v in shapes.items()})
    assert (alone.family, alone.kind) == (ModelFamily.SD2, FileKind.CHECKPOINT)


CORPUS = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"


@pytest.mark.parametrize("name, sets", [
    ("examples__unclip__unclip_example.png__png-api.json", ['34.image="in.png"']),
    # Two images: each noised and weighted, the sum noised again at the merge level.
    ("examples__unclip__unclip_example_multiple.png__png-ui.json", ['34.image="in.png"', '38.image="in.png"']),
])
def test_unclip_corpus_files_run_small(unclip, tmp_path, name, sets):
    root, inputs = unclip[0], unclip[1]
    sets = [*sets, '32.name="unclip_parity.safetensors"', "5.width=32", "5.height=48", "3.steps=2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        executor = Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu", output_dir=tmp_path)
        result = executor.run(read_workflow(str(CORPUS / name), sets, registry))
    assert result.status == "succeeded", result.error
    image = result.results["8"].outputs.image
    assert image.shape == (1, 48, 32, 3) and float(image.std()) > 0
