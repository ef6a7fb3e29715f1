"""Tiny random DiT and PixArt-α/Σ models for loader, guidance and graph tests, made from diffusers'
classes so that parity tests can run the reference on the very weights the files hold.

Files are in the original layouts (facebookresearch/DiT, PixArt-alpha/sigma): DiT with its stored
``pos_embed`` table, PixArt-α with its 120-token null caption and micro-conditions, PixArt-Σ with a
300-token null caption and no positional table (as PixArtMS files), one α file with VAE and T5 as
ComfyUI saves a whole model. Widths keep 64-wide heads (what config-from-shapes assumes); DiT keeps
ImageNet's 1000 classes (diffusers' DiTPipeline hard-codes the null class 1000). The T5 is narrow
but has the real vocabulary, so the real tokenizer feeds it. The VAE is SD-like (4 channels, quant
convs, four levels: downscale 8) in diffusers' layout. Every file is float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, PixArtTransformer2DModel
from torch import Tensor

from nodegraph_diffusion.networks.dit import DiTConfig, dit_keys_from_diffusers
from nodegraph_diffusion.networks.pixart import PixArtConfig, pixart_interpolation_scale, pixart_keys_from_diffusers
from nodegraph_diffusion.networks.transformer import SincosPositions
from nodegraph_diffusion.text import t5 as t5_module

from _checkpoint_fixtures import prefixed, write_safetensors
from _random_weights import randomize_

DIT = DiTConfig(patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2, num_classes=1000,
                sample_size=8)
T5 = t5_module.T5Config(vocab_size=32128, width=32, heads=2, head_dim=16, ff_width=64, layers=2)
_PIXART = {"hidden_size": 192, "depth": 2, "num_heads": 3, "caption_dim": T5.width}
# α 1024-MS-like (micro-conditions, 120 tokens, a stored positional table of its 8x8-patch grid).
PIXART_ALPHA = PixArtConfig(**_PIXART, sample_size=16, interpolation_scale=pixart_interpolation_scale(16))
# Σ-like: what a file without a positional table is taken to be (the 1024 px side, scale 2).
PIXART_SIGMA = PixArtConfig(**_PIXART, micro_conditions=False, max_token_length=300, sample_size=128,
                            interpolation_scale=2.0)
VAE_BLOCKS = (32, 32, 32, 32)

DIT_FILE = "DiT-tiny-2-64.safetensors"
PIXART_ALPHA_FILE = "PixArt-tiny-alpha-MS.safetensors"
PIXART_ALPHA_ALL_IN_ONE = "PixArt-tiny-alpha-all-in-one.safetensors"
PIXART_SIGMA_FILE = "PixArt-Sigma-tiny.safetensors"
T5_FILE = "t5xxl_tiny.safetensors"
VAE_FILE = "sd-vae-tiny.safetensors"


def dit_reference(seed: int = 11) -> DiTTransformer2DModel:
    """diffusers' DiT with random weights that an original file can hold: one timestep/class embedder
    shared by every block, timestep frequencies spaced as the original's (diffusers' DiT embedder
    shifts them, ``downscale_freq_shift=1``), LayerNorm eps 1e-6 as the original's."""
    model = DiTTransformer2DModel(
        num_attention_heads=DIT.num_heads, attention_head_dim=DIT.head_dim, in_channels=DIT.in_channels,
        out_channels=DIT.out_channels, num_layers=DIT.depth, sample_size=DIT.sample_size,
        patch_size=DIT.patch_size, num_embeds_ada_norm=DIT.num_classes, norm_eps=1e-6,
    )
    randomize_(model, seed=seed)
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(first.state_dict())
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def _positions(hidden: int, grid: int, interpolation_scale: float = 1.0) -> Tensor:
    """The stored ``pos_embed`` of an original file: the sine/cosine table of its trained grid."""
    return SincosPositions(hidden, grid, interpolation_scale)(grid, grid, torch.device("cpu")).clone()


def dit_weights(reference: DiTTransformer2DModel) -> dict[str, Tensor]:
    """The reference's weights in facebookresearch/DiT's layout, ``pos_embed`` included."""
    weights = dit_keys_from_diffusers({k: v.clone() for k, v in reference.state_dict().items()})
    return weights | {"pos_embed": _positions(DIT.hidden_size, DIT.grid_size)}


def pixart_reference(config: PixArtConfig, seed: int) -> PixArtTransformer2DModel:
    model = PixArtTransformer2DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, in_channels=config.in_channels,
        out_channels=config.out_channels, num_layers=config.depth, cross_attention_dim=config.hidden_size,
        sample_size=config.sample_size, patch_size=config.patch_size, caption_channels=config.caption_dim,
        interpolation_scale=config.interpolation_scale, use_additional_conditions=config.micro_conditions,
    )
    return randomize_(model, seed=seed)


def null_caption(config: PixArtConfig, seed: int) -> Tensor:
    """A random learned null caption (max_token_length, caption_dim): diffusers keeps none."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(config.max_token_length, config.caption_dim, generator=generator)


def pixart_weights(reference: PixArtTransformer2DModel, config: PixArtConfig, seed: int,
                   positions: bool) -> dict[str, Tensor]:
    """The reference's weights in the original PixArt layout with a null caption (and ``pos_embed``)."""
    weights = pixart_keys_from_diffusers({k: v.clone() for k, v in reference.state_dict().items()})
    weights["y_embedder.y_embedding"] = null_caption(config, seed)
    if positions:
        weights["pos_embed"] = _positions(config.hidden_size, config.base_size, config.interpolation_scale)
    return weights


def t5_weights(seed: int = 70) -> dict[str, Tensor]:
    """A T5 v1.1 encoder in transformers' naming (``shared.weight``, ``encoder.block.*``)."""
    return {k: v.clone() for k, v in randomize_(t5_module.T5Encoder(T5), seed).state_dict().items()}


def vae_reference(seed: int = 60) -> AutoencoderKL:
    """An SD-like AutoencoderKL (scaling 0.18215, 4 latent channels, downscale 8). Its last layer is
    scaled down so that decoded images mostly lie inside [-1, 1]: compared images then differ where
    they are not clamped."""
    model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_BLOCKS, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS), norm_num_groups=32,
    )
    randomize_(model, seed=seed)
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(0.3)
        model.decoder.conv_out.bias.mul_(0.3)
    return model


def write_dit_models(root: Path) -> Path:
    """A models folder with, under checkpoints/ and diffusion_models/, the DiT and PixArt files named
    above; text_encoders/ the T5; vae/ the VAE (diffusers naming). Returns `root`."""
    for kind in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "embeddings"):
        (root / kind).mkdir(parents=True, exist_ok=True)

    def write(path: str, weights: dict[str, Tensor]) -> None:
        write_safetensors(root / path, weights, dtype=None)

    write(f"checkpoints/{DIT_FILE}", dit_weights(dit_reference()))
    alpha = pixart_weights(pixart_reference(PIXART_ALPHA, 21), PIXART_ALPHA, 22, positions=True)
    sigma = pixart_weights(pixart_reference(PIXART_SIGMA, 23), PIXART_SIGMA, 24, positions=False)
    t5, vae = t5_weights(), vae_reference().state_dict()
    write(f"diffusion_models/{PIXART_ALPHA_FILE}", alpha)
    write(f"diffusion_models/{PIXART_SIGMA_FILE}", sigma)
    write(f"checkpoints/{PIXART_ALPHA_ALL_IN_ONE}",
          prefixed("model.diffusion_model.", alpha) | prefixed("vae.", vae)
          | prefixed("text_encoders.t5xxl.transformer.", t5))
    write(f"text_encoders/{T5_FILE}", t5)
    write(f"vae/{VAE_FILE}", vae)
    return root
