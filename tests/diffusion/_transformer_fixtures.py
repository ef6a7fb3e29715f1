"""Tiny random SD3 (MMDiT) and Flux.1 weight files in the original single-file layouts, for graph
and loader tests: whole checkpoints (with or without text encoders and VAE), diffusion-model-only
files and separate text-encoder files laid out as ComfyUI users keep them.

Sizes follow what shape-based detection reads: MMDiT heads are 64 wide, Flux heads 128 wide (the
rotary split (16, 56, 56) cannot be read from weights), CLIP towers have 64-wide heads. The real
CLIP and T5 vocabularies (49408 / 32128 rows) and 77 CLIP positions let the real tokenizers feed
them. CLIP-G is wider and deeper than CLIP-L (as bigG is), and T5 is wider than CLIP-L + CLIP-G
together, so SD3's conditioning (the two CLIPs side by side, zero-padded to T5's width) fits.
The 16-channel VAE is narrow but has SD3's and Flux's four levels (downscale factor 8), the factor a
diffusion model loaded without its VAE assumes. Every file is float32, so results do not depend on
rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from nodegraph_diffusion.networks import flux, mmdit
from nodegraph_diffusion.text import clip as clip_module
from nodegraph_diffusion.text import t5 as t5_module
from nodegraph_diffusion.vae import autoencoder as vae_module

from _checkpoint_fixtures import prefixed, write_safetensors
from _random_weights import randomize_

CLIP_VOCAB, CLIP_POSITIONS = 49408, 77
T5_VOCAB = 32128

CLIP_L = clip_module.TextEncoderConfig(vocab_size=CLIP_VOCAB, width=64, layers=2, heads=1, intermediate_size=128,
                                       max_positions=CLIP_POSITIONS, projection_dim=64, eos_token_id=CLIP_VOCAB - 1)
CLIP_G = clip_module.TextEncoderConfig(vocab_size=CLIP_VOCAB, width=128, layers=3, heads=2, intermediate_size=256,
                                       activation="gelu", max_positions=CLIP_POSITIONS, projection_dim=128,
                                       eos_token_id=CLIP_VOCAB - 1)
T5 = t5_module.T5Config(vocab_size=T5_VOCAB, width=192, heads=2, head_dim=32, ff_width=256, layers=2)
# SD3 takes CLIP-L's and CLIP-G's projected pooled outputs side by side; Flux CLIP-L's unprojected one.
SD3_POOLED = CLIP_L.projection_dim + CLIP_G.projection_dim  # type: ignore[operator]

SD3 = mmdit.MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=2, hidden_size=128, num_heads=2,
                        pos_embed_max_size=16, context_dim=T5.width, pooled_dim=SD3_POOLED)
# SD3.5's MMDiT-X: RMS qk-norm in every block and a second image-only attention in the first.
SD35 = mmdit.MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=2, hidden_size=128, num_heads=2,
                         pos_embed_max_size=16, context_dim=T5.width, pooled_dim=SD3_POOLED, qk_norm=True,
                         dual_attention_layers=(0,))
FLUX_DEV = flux.FluxConfig(in_channels=16, out_channels=16, hidden_size=128, num_heads=1, depth=1,
                           depth_single_blocks=1, context_dim=T5.width, pooled_dim=CLIP_L.width,
                           guidance_embed=True)
FLUX_SCHNELL = flux.FluxConfig(in_channels=16, out_channels=16, hidden_size=128, num_heads=1, depth=1,
                               depth_single_blocks=1, context_dim=T5.width, pooled_dim=CLIP_L.width,
                               guidance_embed=False)
VAE16 = vae_module.VAEConfig(channels=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16, latent_channels=16,
                             use_quant_conv=False, use_post_quant_conv=False)
VAE_DOWNSCALE = VAE16.downscale_factor

# Where each text encoder lies in an SD3 / Flux single file (HF CLIP naming, transformers T5 naming).
TEXT_ENCODER_PREFIX = "text_encoders.{slot}.transformer."


def _weights(module: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in randomize_(module, seed).state_dict().items()}


def mmdit_weights(config: mmdit.MMDiTConfig = SD3, seed: int = 30) -> dict[str, Tensor]:
    """An MMDiT in the original (SD3 reference) naming, no prefix; pos_embed is its sine/cosine table."""
    return _weights(mmdit.MMDiT(config), seed)


def flux_weights(config: flux.FluxConfig = FLUX_DEV, seed: int = 40) -> dict[str, Tensor]:
    """A Flux transformer in BFL naming, no prefix (as ComfyUI's models/diffusion_models files)."""
    return _weights(flux.Flux(config), seed)


def clip_weights(config: clip_module.TextEncoderConfig, seed: int) -> dict[str, Tensor]:
    """A CLIP text tower in transformers naming (``text_model.*`` and ``text_projection.weight``)."""
    weights = _weights(clip_module.CLIPTextEncoder(config), seed)
    weights["text_model.embeddings.position_ids"] = torch.arange(config.max_positions)[None]
    return weights


def t5_weights(seed: int = 50) -> dict[str, Tensor]:
    """A T5 v1.1 encoder in transformers' T5EncoderModel naming (``shared.weight``, ``encoder.block.*``)."""
    return _weights(t5_module.T5Encoder(T5), seed)


def vae_weights(seed: int = 60) -> dict[str, Tensor]:
    """A 16-channel LDM-layout AutoencoderKL without quant convs (as SD3's and Flux's VAEs)."""
    weights = _weights(vae_module.AutoencoderKL(VAE16), seed)
    for key in list(weights):  # LDM files keep the mid attention projections as 1x1 convs
        if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            weights[key] = weights[key][:, :, None, None]
    return weights


def text_encoder_weights(slots: tuple[str, ...], seed: int = 70) -> dict[str, Tensor]:
    """The text encoders of an SD3/Flux single file, each under ``text_encoders.<slot>.transformer.``."""
    makers = {"clip_l": lambda: clip_weights(CLIP_L, seed), "clip_g": lambda: clip_weights(CLIP_G, seed + 1),
              "t5xxl": lambda: t5_weights(seed + 2)}
    out: dict[str, Tensor] = {}
    for slot in slots:
        out |= prefixed(TEXT_ENCODER_PREFIX.format(slot=slot), makers[slot]())
    return out


def sd3_checkpoint(config: mmdit.MMDiTConfig = SD3, text_encoders: tuple[str, ...] = ("clip_l", "clip_g", "t5xxl"),
                   vae: bool = True, seed: int = 30) -> dict[str, Tensor]:
    """An SD3/SD3.5 single file: ``model.diffusion_model.`` + ``first_stage_model.`` + ``text_encoders.*``."""
    weights = prefixed("model.diffusion_model.", mmdit_weights(config, seed))
    if vae:
        weights |= prefixed("first_stage_model.", vae_weights())
    return weights | text_encoder_weights(text_encoders)


def flux_checkpoint(config: flux.FluxConfig = FLUX_DEV, text_encoders: tuple[str, ...] = ("clip_l", "t5xxl"),
                    vae: bool = True, seed: int = 40) -> dict[str, Tensor]:
    """A Flux all-in-one file as ComfyUI saves it: ``model.diffusion_model.`` + ``vae.`` + ``text_encoders.*``."""
    weights = prefixed("model.diffusion_model.", flux_weights(config, seed))
    if vae:
        weights |= prefixed("vae.", vae_weights())
    return weights | text_encoder_weights(text_encoders)


# The names users download (ComfyUI's model pages), so workflows can be checked against the fixtures.
SD35_CHECKPOINT = "sd3.5_large.safetensors"
SD35_MEDIUM_CHECKPOINT = "sd3.5_medium.safetensors"
FLUX_DEV_MODEL = "flux1-dev.safetensors"
FLUX_SCHNELL_MODEL = "flux1-schnell.safetensors"
FLUX_VAE = "ae.safetensors"
CLIP_L_FILE, CLIP_G_FILE, T5_FILE = "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"


def write_transformer_models(root: Path) -> Path:
    """A models folder holding, under the names users download them by:

    - checkpoints/sd3.5_large.safetensors: SD3.5-like MMDiT (qk-norm, dual attention) with VAE, no
      text encoders (as Stability ships SD3.5); checkpoints/sd3.5_medium.safetensors: plain MMDiT;
    - checkpoints/sd3_medium_incl_clips_t5.safetensors: MMDiT with VAE and all three text encoders;
    - checkpoints/flux1-dev-all-in-one.safetensors: Flux-dev with VAE, CLIP-L and T5;
    - diffusion_models/flux1-dev.safetensors, diffusion_models/flux1-schnell.safetensors: bare
      BFL-named transformers; unet/flux1-dev-unet.safetensors (ComfyUI's older folder name);
    - text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors (bare
      transformers names) and clip/clip_l_legacy.safetensors (the older folder name);
    - vae/ae.safetensors: the 16-channel VAE alone.
    """
    for kind in ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    def write(path: str, weights: dict[str, Tensor]) -> None:
        write_safetensors(root / path, weights, dtype=None)

    write(f"checkpoints/{SD35_CHECKPOINT}", sd3_checkpoint(SD35, text_encoders=(), seed=31))
    write(f"checkpoints/{SD35_MEDIUM_CHECKPOINT}", sd3_checkpoint(SD3, text_encoders=()))
    write("checkpoints/sd3_medium_incl_clips_t5.safetensors", sd3_checkpoint(SD3))
    write("checkpoints/flux1-dev-all-in-one.safetensors", flux_checkpoint(FLUX_DEV))
    write(f"diffusion_models/{FLUX_DEV_MODEL}", flux_weights(FLUX_DEV))
    write(f"diffusion_models/{FLUX_SCHNELL_MODEL}", flux_weights(FLUX_SCHNELL, seed=41))
    write("unet/flux1-dev-unet.safetensors", flux_weights(FLUX_DEV))
    write(f"text_encoders/{CLIP_L_FILE}", clip_weights(CLIP_L, 70))
    write(f"text_encoders/{CLIP_G_FILE}", clip_weights(CLIP_G, 71))
    write(f"text_encoders/{T5_FILE}", t5_weights(72))
    write("clip/clip_l_legacy.safetensors", clip_weights(CLIP_L, 70))
    write(f"vae/{FLUX_VAE}", vae_weights())
    return root
