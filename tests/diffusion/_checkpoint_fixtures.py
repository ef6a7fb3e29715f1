"""Tiny random-weight weight files in the real single-file layouts, for the checkpoint tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from nodegraph_diffusion.networks import controlnet
from nodegraph_diffusion.text import clip as text_encoder
from nodegraph_diffusion.networks import unet
from nodegraph_diffusion.vae import autoencoder as vae

MANIFESTS = Path(__file__).parent / "manifests"

# Scaled-down models of each layout: GroupNorm needs widths divisible by 32, the SD1 convention
# 8 heads, the SD2/SDXL one 64-wide heads, CLIP towers 64-wide heads.
TINY_SD1_UNET = unet.UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), context_dim=64
)
TINY_SD2_UNET = unet.UNetConfig(
    model_channels=64, channel_mult=(1, 1), num_res_blocks=1, transformer_depth=(0, 1), num_heads=None,
    head_dim=64, context_dim=64, use_linear_projection=True,
)
TINY_SDXL_UNET = unet.UNetConfig(
    model_channels=64, channel_mult=(1, 1), num_res_blocks=1, transformer_depth=(0, 2), num_heads=None,
    head_dim=64, context_dim=128, use_linear_projection=True, adm_in_channels=96,
)
TINY_REFINER_UNET = unet.UNetConfig(
    model_channels=64, channel_mult=(1, 1), num_res_blocks=1, transformer_depth=(0, 1), num_heads=None,
    head_dim=64, context_dim=64, use_linear_projection=True, adm_in_channels=80,
)
TINY_VAE = vae.VAEConfig(channels=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_CLIP = text_encoder.TextEncoderConfig(vocab_size=50, width=64, layers=2, heads=1, intermediate_size=128, max_positions=16, eos_token_id=49)
TINY_OPENCLIP = dict(vocab=50, width=64, layers=2, context=16, projection=64)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_like_module(module: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    """The module's state dict filled with seeded random values (so nothing equals an init by chance)."""
    g = seeded(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def unet_weights(config: unet.UNetConfig, seed: int = 0) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = unet.UNet(config)
    return random_like_module(model, seed)


def vae_weights(seed: int = 1, conv_attention: bool = True) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = vae.AutoencoderKL(TINY_VAE)
    weights = random_like_module(model, seed)
    if conv_attention:  # LDM files keep the mid attention projections as 1x1 convs
        for key in list(weights):
            if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                weights[key] = weights[key][:, :, None, None]
    return weights


def clip_hf_weights(seed: int = 2) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = text_encoder.CLIPTextEncoder(TINY_CLIP)
    weights = random_like_module(model, seed)
    weights["text_model.embeddings.position_ids"] = torch.arange(TINY_CLIP.max_positions)[None]
    return weights


def openclip_weights(seed: int = 3) -> dict[str, Tensor]:
    """An OpenCLIP text tower in its own layout (fused in_proj, text_projection as a matrix)."""
    t = TINY_OPENCLIP
    w = t["width"]
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (t["vocab"], w), "positional_embedding": (t["context"], w),
        "ln_final.weight": (w,), "ln_final.bias": (w,), "text_projection": (w, t["projection"]), "logit_scale": (),
    }
    for i in range(t["layers"]):
        b = f"transformer.resblocks.{i}."
        shapes |= {
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
            b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (4 * w, w),
            b + "mlp.c_fc.bias": (4 * w,), b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,),
        }
    g = seeded(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def controlnet_weights(config: unet.UNetConfig, seed: int = 4) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = controlnet.ControlNet(controlnet.ControlNetConfig(unet=config, hint_block_channels=(16, 32)))
    return random_like_module(model, seed)


def prefixed(prefix: str, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in weights.items()}


def schedule_buffers() -> dict[str, Tensor]:
    return {"alphas_cumprod": torch.linspace(1, 0.01, 10), "betas": torch.linspace(1e-4, 0.02, 10)}


def sd1_checkpoint(in_channels: int = 4) -> dict[str, Tensor]:
    config = TINY_SD1_UNET if in_channels == 4 else unet.UNetConfig(**{**TINY_SD1_UNET.__dict__, "in_channels": in_channels})
    return (
        prefixed("model.diffusion_model.", unet_weights(config))
        | prefixed("first_stage_model.", vae_weights())
        | prefixed("cond_stage_model.transformer.", clip_hf_weights())
        | schedule_buffers()
    )


def sd2_checkpoint() -> dict[str, Tensor]:
    return (
        prefixed("model.diffusion_model.", unet_weights(TINY_SD2_UNET))
        | prefixed("first_stage_model.", vae_weights())
        | prefixed("cond_stage_model.model.", openclip_weights())
        | schedule_buffers()
    )


def sdxl_checkpoint() -> dict[str, Tensor]:
    return (
        prefixed("model.diffusion_model.", unet_weights(TINY_SDXL_UNET))
        | prefixed("first_stage_model.", vae_weights())
        | prefixed("conditioner.embedders.0.transformer.", clip_hf_weights())
        | prefixed("conditioner.embedders.1.model.", openclip_weights())
    )


def sdxl_refiner_checkpoint() -> dict[str, Tensor]:
    return (
        prefixed("model.diffusion_model.", unet_weights(TINY_REFINER_UNET))
        | prefixed("first_stage_model.", vae_weights())
        | prefixed("conditioner.embedders.0.model.", openclip_weights())
    )


def write_safetensors(path: Path, weights: dict[str, Tensor], dtype: torch.dtype | None = torch.float16,
                      metadata: dict[str, str] | None = None) -> Path:
    stored = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(stored, str(path), metadata=metadata)
    return path


def read_manifest(name: str) -> dict:
    return json.loads(gzip.decompress((MANIFESTS / f"{name}.json.gz").read_bytes()))


def manifest_names() -> list[str]:
    return sorted(p.name.removesuffix(".json.gz") for p in MANIFESTS.glob("*.json.gz"))
