"""The tiny-shapes model's architecture and the conditioning path it shares with the product.

The configs here are the single source of the shipped model's shapes; the loader re-derives them
from the checkpoint's tensor shapes, and the shipped-model test checks the two agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from nodegraph_diffusion.text.clip import HIDDEN_STATE_BY_FAMILY, CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.clip_tokenizer import PAD_ID_BY_ENCODER, CLIPTokenizer
from nodegraph_diffusion.components import SD3_CLIP_WIDTHS, SD3_CONTEXT_WIDTH
from nodegraph_diffusion.networks.mmdit import HEAD_DIM, MMDiTConfig
from nodegraph_diffusion.networks.unet import UNetConfig
from nodegraph_diffusion.vae.autoencoder import VAEConfig

# Where intermediate training state lives (resumable checkpoints, rendered data, latents).
STATE_DIR = Path(os.environ.get("TINY_SHAPES_STATE", "/work/train_state"))
REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_PATH = REPO_ROOT / "models" / "checkpoints" / "tiny-shapes.safetensors"
CONTROLNET_PATH = REPO_ROOT / "models" / "controlnet" / "tiny-shapes-silhouette.safetensors"
LORA_PATH = REPO_ROOT / "models" / "loras" / "tiny-shapes-outlined.safetensors"
# Named to sort after tiny-shapes.safetensors, which a file list (the editor's first choice) offers first.
MMDIT_CHECKPOINT_PATH = REPO_ROOT / "models" / "checkpoints" / "tiny-shapes.sd3.safetensors"

# 64 -> 32 -> 16: the SD1 AutoencoderKL layout with three levels (f=4) at the smallest widths
# GroupNorm(32) allows. At f=8 the shapes (18-40 px) cover only 2-5 latent cells and even the
# VAE's own reconstructions lose the shape class (83% detector accuracy); at f=4 they span 4-10.
VAE_CONFIG = VAEConfig(channels=32, ch_mult=(1, 2, 2), num_res_blocks=1)

# Two 64-wide quick_gelu layers over CLIP's full vocabulary and 77 positions.
TEXT_ENCODER_CONFIG = TextEncoderConfig(width=64, layers=2, heads=1, intermediate_size=256)

# conv proj_in/out and 8 heads: what the loader assumes for an SD1 layout. Levels at 16, 8 and 4
# latent cells; no attention on the 16x16 level (it would double the step time).
UNET_CONFIG = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    num_heads=8,
    context_dim=TEXT_ENCODER_CONFIG.width,
    use_linear_projection=False,
)

FAMILY = "sd1"

# The product's SD3 conditioning of one CLIP-L without CLIP-G or T5: states padded to T5-XXL's
# width; pooled = CLIP-L's pooled output + CLIP-G's zeros.
SD3_POOLED_DIM = TEXT_ENCODER_CONFIG.width + SD3_CLIP_WIDTHS["clip_g"]
# Positions for latents up to this many cells a side (128 px images).
MMDIT_MAX_LATENT_SIDE = 32


def mmdit_config(depth: int, width: int, patch_size: int) -> MMDiTConfig:
    """The tiny-shapes MMDiT at a depth, width and patch size: 64-wide heads (what the loader assumes),
    4 latent channels in and out, the SD3 conditioning widths of the shipped CLIP alone."""
    return MMDiTConfig(patch_size=patch_size, in_channels=4, out_channels=4, depth=depth, hidden_size=width,
                       num_heads=width // HEAD_DIM, pos_embed_max_size=MMDIT_MAX_LATENT_SIDE // patch_size,
                       context_dim=SD3_CONTEXT_WIDTH, pooled_dim=SD3_POOLED_DIM)


MMDIT_CONFIG = mmdit_config(depth=6, width=192, patch_size=2)


def configure_torch(threads: int | None = None) -> None:
    """Training runs on a 2-core CPU: pin the thread count (default 2, or ``TINY_SHAPES_THREADS``).

    Two single-threaded jobs side by side get more done than one job on two threads: these
    small kernels scale poorly past one core.
    """
    torch.set_num_threads(threads or int(os.environ.get("TINY_SHAPES_THREADS", "2")))


class PromptEncoder:
    """Captions -> U-Net context exactly as the product conditions an SD1 model.

    The real CLIP BPE tokenizer, CLIP-L's pad id, and the hidden state SD1 uses
    (:data:`HIDDEN_STATE_BY_FAMILY`); captions are tokenized once and cached.
    """

    def __init__(self) -> None:
        self.tokenizer = CLIPTokenizer.from_default()
        self.pad_id = PAD_ID_BY_ENCODER["clip_l"]
        self.hidden_state = HIDDEN_STATE_BY_FAMILY[FAMILY]
        self._ids: dict[str, list[int]] = {}

    def ids(self, captions: list[str]) -> Tensor:
        """captions -> token ids (B, 77) int64; each caption must fit in one 77-token chunk."""
        rows = []
        for caption in captions:
            if caption not in self._ids:
                chunks = self.tokenizer.tokenize_prompt(caption, pad_id=self.pad_id)
                if len(chunks) != 1:
                    raise ValueError(f"caption {caption!r} does not fit in one 77-token chunk")
                self._ids[caption] = chunks[0].ids
            rows.append(self._ids[caption])
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, encoder: CLIPTextEncoder, ids: Tensor) -> Tensor:
        """ids: (B, 77) -> context (B, 77, width), the hidden state the product feeds the U-Net."""
        choice = self.hidden_state
        return encoder(ids, clip_skip=choice.clip_skip, final_norm=choice.final_norm).hidden_state
