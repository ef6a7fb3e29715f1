"""Tiny U-Net / ControlNet configs and their diffusers twins, shared by test_unet.py and test_controlnet.py."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from nodegraph_diffusion.networks.unet import SDXL_VECTOR_EMBED_DIM, UNetConfig
from _random_weights import randomize_

TOL = 1e-4
CONTEXT_DIM = 32
CONTEXT_TOKENS = 7
POOLED_DIM = 32
# SDXL's y: pooled text, then 256 dims for each of original size (2), crop (2), target size (2).
SDXL_BASE_ADM = POOLED_DIM + 6 * SDXL_VECTOR_EMBED_DIM
SDXL_REFINER_ADM = POOLED_DIM + 5 * SDXL_VECTOR_EMBED_DIM

# Three levels so every slot occurs: attention levels with and without an upsampler after them,
# a level without attention, and a channel change inside the res blocks.
TINY_SD1 = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    transformer_depth=(1, 1, 0),
    transformer_depth_middle=1,
    num_heads=8,
    context_dim=CONTEXT_DIM,
)
# 64-wide heads (the linear-projection convention) so the model is read back without hints.
TINY_SD2 = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    transformer_depth=(1, 1, 0),
    transformer_depth_middle=1,
    num_heads=None,
    head_dim=64,
    context_dim=CONTEXT_DIM,
    use_linear_projection=True,
)
TINY_SDXL = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    num_heads=None,
    head_dim=64,
    context_dim=CONTEXT_DIM,
    use_linear_projection=True,
    adm_in_channels=SDXL_BASE_ADM,
)
TINY_SDXL_REFINER = replace(TINY_SDXL, adm_in_channels=SDXL_REFINER_ADM)
# A decoder deeper/shallower than its encoder (the SSD-1B kind of distillation).
TINY_SDXL_UNEVEN = replace(TINY_SDXL, transformer_depth_output=(2, 1, 3, 1, 2, 1, 0, 0, 0))
TINY_INPAINT = replace(TINY_SD1, in_channels=9)


def _diffusers_common_kwargs(config: UNetConfig) -> dict:
    """Keyword arguments UNet2DConditionModel and ControlNetModel share, for a model equal to ``config``."""
    widths = tuple(config.model_channels * mult for mult in config.channel_mult)
    has_attention = [depth > 0 for depth in config.transformer_depth]
    # diffusers gives the middle block the last level's depth and heads; a level without attention
    # ignores its entry, so the middle depth can sit there.
    depths = [depth if depth else 1 for depth in config.transformer_depth]
    if has_attention[-1]:
        assert depths[-1] == config.transformer_depth_middle, "diffusers ties the middle depth to the last level's"
    depths[-1] = config.transformer_depth_middle
    if config.num_heads is not None:
        heads: int | list[int] = config.num_heads
    else:
        heads = [config.attention_heads(width)[0] for width in widths]
    kwargs = dict(
        in_channels=config.in_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        block_out_channels=widths,
        layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim,
        attention_head_dim=heads,
        use_linear_projection=config.use_linear_projection,
        transformer_layers_per_block=depths,
    )
    if config.adm_in_channels is not None:
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_VECTOR_EMBED_DIM,
            projection_class_embeddings_input_dim=config.adm_in_channels,
        )
    return kwargs


def diffusers_unet(config: UNetConfig, seed: int = 0):
    """A randomly weighted diffusers UNet2DConditionModel with the architecture of ``config``."""
    from diffusers import UNet2DConditionModel

    kwargs = _diffusers_common_kwargs(config)
    kwargs["out_channels"] = config.out_channels
    kwargs["up_block_types"] = tuple(
        "CrossAttnUpBlock2D" if depth else "UpBlock2D" for depth in reversed(config.transformer_depth)
    )
    if config.transformer_depth_output is not None:
        per_level = config.num_res_blocks + 1
        output = list(config.transformer_depth_output)
        kwargs["reverse_transformer_layers_per_block"] = [
            output[i : i + per_level] for i in range(0, len(output), per_level)
        ]
    return randomize_(UNet2DConditionModel(**kwargs), seed)


def diffusers_controlnet(config: UNetConfig, hint_block_channels: tuple[int, ...], seed: int = 1):
    """A randomly weighted diffusers ControlNetModel whose encoder has the architecture of ``config``."""
    from diffusers import ControlNetModel

    kwargs = _diffusers_common_kwargs(config)
    kwargs["conditioning_embedding_out_channels"] = hint_block_channels
    return randomize_(ControlNetModel(**kwargs), seed)


def unet_inputs(
    config: UNetConfig, batch: int = 2, height: int = 16, width: int = 16, seed: int = 2
) -> dict[str, Tensor]:
    """Random latents, timesteps, context and (for SDXL-style configs) the pooled text embedding."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([981.0, 17.5, 500.0, 3.0][:batch]),
        "context": torch.randn(batch, CONTEXT_TOKENS, config.context_dim, generator=generator),
        "pooled": torch.randn(batch, POOLED_DIM, generator=generator),
    }


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()
