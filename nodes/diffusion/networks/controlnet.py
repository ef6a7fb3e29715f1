"""ControlNet (SD1.x / SD2.x / SDXL layouts) in the original single-file layout, producing U-Net residuals.

A ControlNet is a trainable copy of the U-Net's encoder (``time_embed``, ``label_emb``,
``input_blocks``, ``middle_block``, built by :class:`~nodegraph_diffusion.unet.UNetEncoder`) fed with
the latents plus an embedding of a control image (``input_hint_block``); 1x1 convs
(``zero_convs.N.0`` per input block, ``middle_block_out.0``) turn its activations into residuals
the U-Net adds to its skip connections and middle block (:class:`~nodegraph_diffusion.unet.ControlResiduals`).
Module names equal the keys of the original ``control_*.pth`` / ``.safetensors`` files after their
``control_model.`` prefix (if any) is removed; diffusers ControlNetModel weights go through
:func:`ldm_controlnet_keys_from_diffusers`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .unet import (
    ControlResiduals,
    DiffusersUNetLayout,
    UNetConfig,
    UNetConfigError,
    UNetEncoder,
    UNetInputError,
    ldm_key_from_diffusers,
    unet_config_from_shapes,
)

# Channels of the hint embedder's conv stages (each stage after the first halves the resolution).
DEFAULT_HINT_BLOCK_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the U-Net encoder it copies, and the hint embedder's input and stage widths."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = DEFAULT_HINT_BLOCK_CHANNELS

    @property
    def hint_downscale(self) -> int:
        """How many times larger the hint image is than the latents (8 for the usual 4 stages)."""
        return 2 ** (len(self.hint_block_channels) - 1)


def hint_block(in_channels: int, widths: Sequence[int], out_channels: int) -> nn.Sequential:
    """conv, SiLU, then per stage (conv, SiLU, stride-2 conv, SiLU), then a conv to out_channels:
    (B, in_channels, H, W) -> (B, out_channels, H / 2^(stages), W / 2^(stages)). Also XLabs' Flux
    ControlNets' image embedder.

    Original indices: 0 first conv, 2/4, 6/8, 10/12 the stages, 14 the last conv.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1), nn.SiLU()]
    for width, next_width in zip(widths[:-1], widths[1:]):
        layers += [
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, next_width, kernel_size=3, padding=1, stride=2),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1))
    return nn.Sequential(*layers)


def _hint_block(config: ControlNetConfig) -> nn.Sequential:
    return hint_block(config.hint_channels, config.hint_block_channels, config.unet.model_channels)


class ControlNet(UNetEncoder):
    """(latents, control image, timesteps, context[, y]) -> residuals for the matching U-Net."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__(config.unet)
        self.controlnet_config = config
        self.input_hint_block = _hint_block(config)
        # Sequentials so the keys read ``zero_convs.N.0`` / ``middle_block_out.0`` like the original's.
        self.zero_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1)) for channels in self.skip_channels
        )
        self.middle_block_out = nn.Sequential(
            nn.Conv2d(self.middle_channels, self.middle_channels, kernel_size=1)
        )

    def forward(
        self,
        x: Tensor,
        hint: Tensor,
        timesteps: Tensor | float,
        context: Tensor,
        y: Tensor | None = None,
        strength: float = 1.0,
    ) -> ControlResiduals:
        """x: (B, C, H, W) latents, hint: (B, hint_channels, 8H, 8W) control image (in [0, 1] for the
        usual models), timesteps: (B,) or (), context: (B, T, context_dim), y: (B, adm) or None.

        Returns one residual per U-Net input block plus one for the middle block, each multiplied
        by ``strength``.
        """
        batch = x.shape[0]
        self._check_context(context, batch)
        scale = self.controlnet_config.hint_downscale
        expected = (batch, self.controlnet_config.hint_channels, x.shape[2] * scale, x.shape[3] * scale)
        if tuple(hint.shape) != expected:
            raise UNetInputError(
                f"ControlNet hint must have shape {expected} for latents {tuple(x.shape)}, got {tuple(hint.shape)}"
            )
        emb = self.embed(timesteps, y, batch, x.dtype)
        guide = self.input_hint_block(hint.to(x.dtype))

        down: list[Tensor] = []
        h = x
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guide
            down.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        middle = self.middle_block_out(h)
        if strength != 1.0:
            down = [residual * strength for residual in down]
            middle = middle * strength
        return ControlResiduals(down, middle)


def controlnet_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    *,
    num_heads: int | None = None,
    head_dim: int | None = None,
) -> ControlNetConfig:
    """The :class:`ControlNetConfig` of an original-layout ControlNet state dict, from key names and
    shapes alone (keys without a ``control_model.`` prefix). Head counts follow
    :func:`~nodegraph_diffusion.unet.unet_config_from_shapes`'s convention unless given."""
    unet_config = unet_config_from_shapes(shapes, num_heads=num_heads, head_dim=head_dim, encoder_only=True)
    convs = sorted(
        int(match.group(1))
        for key in shapes
        if (match := re.match(r"^input_hint_block\.(\d+)\.weight$", key))
    )
    # First conv, two per stage transition, last conv: indices 0, 2, 4, ..., an even count >= 4.
    if not convs or convs != list(range(0, 2 * len(convs), 2)) or len(convs) % 2:
        raise UNetConfigError(f"ControlNet input_hint_block convs at unexpected indices {convs}")
    first = tuple(int(n) for n in shapes["input_hint_block.0.weight"])
    stage_outputs = [int(shapes[f"input_hint_block.{i}.weight"][0]) for i in convs[2:-1:2]]
    return ControlNetConfig(
        unet=unet_config,
        hint_channels=first[1],
        hint_block_channels=(first[0], *stage_outputs),
    )


_DIFFUSERS_HINT_KEY = re.compile(r"^controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)$")
_DIFFUSERS_ZERO_CONV_KEY = re.compile(r"^controlnet_down_blocks\.(\d+)\.(weight|bias)$")


def ldm_controlnet_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ControlNetModel state dict renamed to this module's (original) names.

    The encoder copy is renamed exactly as the U-Net's is; tensors are passed through, not copied.
    """
    layout = DiffusersUNetLayout.of(state_dict)
    hint_blocks = {
        int(match.group(2)) for key in state_dict if (match := _DIFFUSERS_HINT_KEY.match(key)) and match.group(2)
    }
    renamed: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("controlnet_cond_embedding."):
            match = _DIFFUSERS_HINT_KEY.match(key)
            if not match:
                raise UNetConfigError(f"diffusers ControlNet key {key!r} is not part of a known hint embedder")
            part, block, param = match.groups()
            if part == "conv_in":
                index = 0
            elif part == "conv_out":
                index = 2 * (len(hint_blocks) + 1)
            else:
                index = 2 * (int(block) + 1)
            renamed[f"input_hint_block.{index}.{param}"] = tensor
        elif key.startswith("controlnet_down_blocks."):
            match = _DIFFUSERS_ZERO_CONV_KEY.match(key)
            if not match:
                raise UNetConfigError(f"diffusers ControlNet key {key!r} is not a zero conv")
            renamed[f"zero_convs.{match.group(1)}.0.{match.group(2)}"] = tensor
        elif key.startswith("controlnet_mid_block."):
            renamed[f"middle_block_out.0.{key[len('controlnet_mid_block.'):]}"] = tensor
        else:
            renamed[ldm_key_from_diffusers(key, layout)] = tensor
    return renamed
