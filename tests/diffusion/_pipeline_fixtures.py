"""Small random SD1-layout and SDXL-layout checkpoints (plus a ControlNet) in a models folder, for
end-to-end graph tests. Real CLIP vocabulary and 77 positions so the real tokenizer feeds them; a
two-level VAE (downscale factor 2) keeps images small and proves nothing assumes 8."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry

from nodegraph_diffusion.networks import controlnet
from nodegraph_diffusion.text import clip as text_encoder
from nodegraph_diffusion.networks import unet
from nodegraph_diffusion.vae import autoencoder as vae

from _checkpoint_fixtures import prefixed, write_safetensors
from _random_weights import randomize_

VOCAB, POSITIONS = 49408, 77
SD1_UNET = unet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                           context_dim=64)
SDXL_UNET = unet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                            num_heads=None, head_dim=32, context_dim=128, use_linear_projection=True,
                            adm_in_channels=64 + 6 * 256)
SMALL_VAE = vae.VAEConfig(channels=32, ch_mult=(1, 2), num_res_blocks=1)
CLIP_L = text_encoder.TextEncoderConfig(vocab_size=VOCAB, width=64, layers=2, heads=1, intermediate_size=128,
                                        max_positions=POSITIONS, eos_token_id=VOCAB - 1)
CONTROL = controlnet.ControlNetConfig(unet=SD1_UNET, hint_block_channels=(16, 32))
CONTROL_XL = controlnet.ControlNetConfig(unet=SDXL_UNET, hint_block_channels=(16, 32))


def _weights(module: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in randomize_(module, seed).state_dict().items()}


def _vae_weights(seed: int) -> dict[str, Tensor]:
    weights = _weights(vae.AutoencoderKL(SMALL_VAE), seed)
    for key in list(weights):  # LDM files keep the mid attention projections as 1x1 convs
        if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            weights[key] = weights[key][:, :, None, None]
    return weights


def _clip_l_weights(seed: int) -> dict[str, Tensor]:
    weights = _weights(text_encoder.CLIPTextEncoder(CLIP_L), seed)
    weights["text_model.embeddings.position_ids"] = torch.arange(POSITIONS)[None]
    return weights


def _openclip_weights(seed: int, width: int = 64, layers: int = 2, projection: int = 64) -> dict[str, Tensor]:
    """A small OpenCLIP-layout text tower (SDXL's CLIP-G slot) with the real vocabulary."""
    g = torch.Generator().manual_seed(seed)

    def matrix(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5

    def vector(n: int, around: float = 0.0) -> Tensor:
        return around + 0.2 * torch.randn(n, generator=g)

    w = width
    weights = {"token_embedding.weight": matrix(VOCAB, w), "positional_embedding": matrix(POSITIONS, w),
               "ln_final.weight": vector(w, 1.0), "ln_final.bias": vector(w), "text_projection": matrix(w, projection),
               "logit_scale": torch.tensor(4.6)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        weights |= {
            b + "ln_1.weight": vector(w, 1.0), b + "ln_1.bias": vector(w), b + "attn.in_proj_weight": matrix(3 * w, w),
            b + "attn.in_proj_bias": vector(3 * w), b + "attn.out_proj.weight": matrix(w, w),
            b + "attn.out_proj.bias": vector(w), b + "ln_2.weight": vector(w, 1.0), b + "ln_2.bias": vector(w),
            b + "mlp.c_fc.weight": matrix(4 * w, w), b + "mlp.c_fc.bias": vector(4 * w),
            b + "mlp.c_proj.weight": matrix(w, 4 * w), b + "mlp.c_proj.bias": vector(w),
        }
    return weights


def sd1_weights(seed: int = 0) -> dict[str, Tensor]:
    return (prefixed("model.diffusion_model.", _weights(unet.UNet(SD1_UNET), seed))
            | prefixed("first_stage_model.", _vae_weights(seed + 1))
            | prefixed("cond_stage_model.transformer.", _clip_l_weights(seed + 2)))


def sdxl_weights(seed: int = 10) -> dict[str, Tensor]:
    return (prefixed("model.diffusion_model.", _weights(unet.UNet(SDXL_UNET), seed))
            | prefixed("first_stage_model.", _vae_weights(seed + 1))
            | prefixed("conditioner.embedders.0.transformer.", _clip_l_weights(seed + 2))
            | prefixed("conditioner.embedders.1.model.", _openclip_weights(seed + 3)))


def controlnet_weights(config: controlnet.ControlNetConfig = CONTROL, seed: int = 20) -> dict[str, Tensor]:
    return prefixed("control_model.", _weights(controlnet.ControlNet(config), seed))


def write_models(root: Path) -> Path:
    """A models folder with checkpoints/tiny-sd1.safetensors, checkpoints/tiny-sdxl.safetensors and
    controlnet/tiny-sd1-control.safetensors, controlnet/tiny-sdxl-control.safetensors (fp32, so
    results do not depend on rounding)."""
    for kind in ("checkpoints", "loras", "controlnet", "vae", "embeddings"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    write_safetensors(root / "checkpoints" / "tiny-sd1.safetensors", sd1_weights(), dtype=None)
    write_safetensors(root / "checkpoints" / "tiny-sdxl.safetensors", sdxl_weights(), dtype=None)
    write_safetensors(root / "controlnet" / "tiny-sd1-control.safetensors", controlnet_weights(), dtype=None)
    write_safetensors(root / "controlnet" / "tiny-sdxl-control.safetensors", controlnet_weights(CONTROL_XL, 21),
                      dtype=None)
    return root


@contextmanager
def folder_executor(models: Path, output_dir: Path, inputs: Path | None = None,
                    cache_bytes: int = 4 << 30) -> Iterator[Executor]:
    """An executor over every node (the registry built without a problem) that reads model files from
    `models` and, when given, input images from `inputs` while it is open."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(models))
        if inputs is not None:
            patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=cache_bytes), device="cpu", output_dir=output_dir)
