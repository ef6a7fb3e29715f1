"""The Stable Diffusion U-Net (SD1.x, SD2.x, SDXL, inpainting) in the original LDM single-file layout.

Module names equal the keys of an LDM single-file checkpoint after its ``model.diffusion_model.``
prefix is removed (``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``,
``middle_block.2.out_layers.3.bias``, ``output_blocks.2.1.conv.weight``, ``time_embed.0.weight``,
``label_emb.0.0.weight``, ``out.2.weight``), so such a state dict loads with
``load_state_dict(strict=True)`` and no renaming. Diffusers-format weights go through
:func:`ldm_unet_keys_from_diffusers` first. :func:`unet_config_from_shapes` reads the architecture
off key names and tensor shapes alone (a safetensors header is enough).

Layout: ``input_blocks.0`` is the input conv; then per resolution level ``num_res_blocks`` blocks of
``[ResBlock, SpatialTransformer?]`` and, except on the last level, a ``Downsample``. The
``middle_block`` is ``[ResBlock, SpatialTransformer, ResBlock]``. ``output_blocks`` mirror the
input side with ``num_res_blocks + 1`` blocks per level, each concatenating one skip connection,
the last of a level (except the top one) ending in an ``Upsample``. ``out`` is GroupNorm, SiLU, conv.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .attention import NORM_GROUPS, SpatialTransformer
from .timestep import timestep_embedding

logger = logging.getLogger(__name__)

# GroupNorm epsilon of the ResBlocks and the output norm (the SpatialTransformer's is 1e-6).
RESBLOCK_GROUPNORM_EPS = 1e-5
# Timestep embedding width is model_channels times this.
TIME_EMBED_MULT = 4
# Each SDXL size/crop/aesthetic value is embedded sinusoidally into this many dims.
SDXL_VECTOR_EMBED_DIM = 256
# What unet_config_from_shapes assumes, since head counts leave no trace in weight shapes.
CONV_PROJECTION_NUM_HEADS = 8  # SD1.x
LINEAR_PROJECTION_HEAD_DIM = 64  # SD2.x, SDXL


class UNetConfigError(ValueError):
    """A U-Net config is inconsistent, or a state dict's keys/shapes do not fit the U-Net layout."""


class UNetInputError(ValueError):
    """The inputs of a U-Net / ControlNet forward do not fit the model (names what was expected)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net. Exactly one of ``num_heads`` / ``head_dim`` is set.

    ``transformer_depth[level]`` is the number of transformer blocks of each SpatialTransformer on
    that level of the input side (0: the level has no attention). ``transformer_depth_output``
    optionally gives one depth per output block (``len(channel_mult) * (num_res_blocks + 1)``,
    deepest level first) for models whose decoder differs from their encoder; None mirrors the
    input side. ``adm_in_channels`` is the width of the extra vector conditioning ``y`` (SDXL's
    pooled text + size embedding: 2816; refiner: 2560), None when the model takes none.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    transformer_depth_output: tuple[int, ...] | None = None
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    use_linear_projection: bool = False
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if levels == 0 or self.num_res_blocks < 1:
            raise UNetConfigError(f"UNetConfig needs at least one level and one res block, got {self}")
        if len(self.transformer_depth) != levels:
            raise UNetConfigError(
                f"UNetConfig.transformer_depth has {len(self.transformer_depth)} entries, "
                f"expected one per level ({levels})"
            )
        if self.transformer_depth_middle < 1:
            raise UNetConfigError("UNetConfig.transformer_depth_middle must be >= 1 (the middle block has attention)")
        if self.transformer_depth_output is not None and len(self.transformer_depth_output) != self.num_output_blocks:
            raise UNetConfigError(
                f"UNetConfig.transformer_depth_output has {len(self.transformer_depth_output)} entries, "
                f"expected one per output block ({self.num_output_blocks})"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise UNetConfigError(
                f"UNetConfig needs exactly one of num_heads / head_dim, got num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}"
            )
        widths = {self.model_channels * mult for mult in self.channel_mult}
        for width in sorted(widths):
            if width % NORM_GROUPS:
                raise UNetConfigError(f"U-Net width {width} is not divisible by the {NORM_GROUPS} GroupNorm groups")
        attention_widths = {
            self.model_channels * mult
            for mult, depth in zip(self.channel_mult, self.transformer_depth, strict=True)
            if depth
        } | {self.model_channels * self.channel_mult[-1]}
        for width in sorted(attention_widths):
            self.attention_heads(width)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * TIME_EMBED_MULT

    @property
    def num_output_blocks(self) -> int:
        return len(self.channel_mult) * (self.num_res_blocks + 1)

    @property
    def output_depths(self) -> tuple[int, ...]:
        """Transformer depth of each output block, deepest level first."""
        if self.transformer_depth_output is not None:
            return self.transformer_depth_output
        per_level = reversed(self.transformer_depth)
        return tuple(depth for depth in per_level for _ in range(self.num_res_blocks + 1))

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a SpatialTransformer over ``channels`` channels."""
        divisor = self.num_heads if self.num_heads is not None else self.head_dim
        assert divisor is not None
        if divisor <= 0 or channels % divisor:
            raise UNetConfigError(
                f"attention over {channels} channels cannot be split with "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}"
            )
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // divisor, divisor


SD1_CONFIG = UNetConfig()
SD2_CONFIG = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)
SDXL_CONFIG = UNetConfig(
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    num_heads=None,
    head_dim=64,
    context_dim=2048,
    use_linear_projection=True,
    adm_in_channels=2816,
)
SDXL_REFINER_CONFIG = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4,
    num_heads=None,
    head_dim=64,
    context_dim=1280,
    use_linear_projection=True,
    adm_in_channels=2560,
)


# --------------------------------------------------------------------------- embeddings


def sdxl_vector_conditioning(
    pooled: Tensor,
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
) -> Tensor:
    """SDXL's ``y``: pooled text embedding followed by sinusoidal embeddings of the size conditioning.

    Sizes are ``(height, width)`` in pixels, ``crop_top_left`` is ``(top, left)``. The base model
    takes ``target_size`` (pooled (B, 1280) -> y (B, 2816)); the refiner takes ``aesthetic_score``
    instead (-> (B, 2560)). Each value is embedded on its own into 256 dims, in the order
    original size, crop, target size / score.

    pooled: (B, P) -> (B, P + 256 * number of values), in ``pooled``'s dtype.
    """
    if (target_size is None) == (aesthetic_score is None):
        raise UNetInputError(
            "sdxl_vector_conditioning needs exactly one of target_size (base) / aesthetic_score (refiner)"
        )
    values: list[float] = [*original_size, *crop_top_left]
    values += list(target_size) if target_size is not None else [aesthetic_score]  # type: ignore[list-item]
    scalars = torch.tensor(values, dtype=torch.float32, device=pooled.device)
    embedded = timestep_embedding(scalars, SDXL_VECTOR_EMBED_DIM).reshape(1, -1)
    embedded = embedded.to(pooled.dtype).expand(pooled.shape[0], -1)
    return torch.cat([pooled, embedded], dim=-1)


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between, plus a skip path."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        # The SiLUs act on fresh GroupNorm outputs, so they may work in place.
        self.in_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, channels, eps=RESBLOCK_GROUPNORM_EPS),
            nn.SiLU(inplace=True),
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 stands where the original has a dropout, keeping ``out_layers.3`` for the conv.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, out_channels, eps=RESBLOCK_GROUPNORM_EPS),
            nn.SiLU(inplace=True),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        if channels == out_channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C, H, W), emb: (B, E) -> (B, out_channels, H, W)."""
        h = self.in_layers(x)
        # Conv outputs are fresh and their backward does not read them: in-place adds are safe.
        h += self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        h += x if isinstance(self.skip_connection, nn.Identity) else kernels.pointwise_conv(x, self.skip_connection)
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (to ``size``, default twice the size) then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """x: (B, C, H, W) -> (B, C, *size) or (B, C, 2H, 2W)."""
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return kernels.upsample_conv(x, self.conv)
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """A U-Net block: layers run in order, each given the inputs its kind needs."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """x: (B, C, H, W), emb: (B, E), context: (B, T, D); ``size`` is an Upsample's target (H', W')."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------- models


@dataclass
class ControlResiduals:
    """What a ControlNet adds to a U-Net: one tensor per skip connection plus one after the middle block.

    ``down[i]`` has the shape of the output of ``input_blocks[i]``; ``middle`` that of the middle block.
    Residuals of several ControlNets add up (``a + b``).
    """

    down: list[Tensor]
    middle: Tensor

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        if len(self.down) != len(other.down):
            raise UNetInputError(
                f"cannot add ControlNet residuals of different layouts ({len(self.down)} vs {len(other.down)} skips)"
            )
        return ControlResiduals([a + b for a, b in zip(self.down, other.down)], self.middle + other.middle)


class UNetEncoder(nn.Module):
    """The half of the U-Net that a ControlNet copies: embeddings, input blocks, middle block."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.model_channels
        emb_dim = config.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(inplace=True), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb: nn.Sequential | None = None
        if config.adm_in_channels is not None:
            # Nested so the keys read ``label_emb.0.0`` like the original's.
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(inplace=True), nn.Linear(emb_dim, emb_dim)
                )
            )

        self.input_blocks = nn.ModuleList(
            [EmbedSequential([nn.Conv2d(config.in_channels, channels, kernel_size=3, padding=1)])]
        )
        # Channels of every skip connection, in input-block order; the decoder consumes them in reverse.
        self.skip_channels: list[int] = [channels]
        for level, mult in enumerate(config.channel_mult):
            width = config.model_channels * mult
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(channels, emb_dim, width)]
                channels = width
                if config.transformer_depth[level]:
                    layers.append(self._transformer(config, channels, config.transformer_depth[level]))
                self.input_blocks.append(EmbedSequential(layers))
                self.skip_channels.append(channels)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([Downsample(channels)]))
                self.skip_channels.append(channels)

        self.middle_block = EmbedSequential(
            [
                ResBlock(channels, emb_dim, channels),
                self._transformer(config, channels, config.transformer_depth_middle),
                ResBlock(channels, emb_dim, channels),
            ]
        )
        self.middle_channels = channels

    @staticmethod
    def _transformer(config: UNetConfig, channels: int, depth: int) -> SpatialTransformer:
        heads, head_dim = config.attention_heads(channels)
        return SpatialTransformer(
            channels, heads, head_dim, depth, config.context_dim, config.use_linear_projection
        )

    def embed(self, timesteps: Tensor | float, y: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        """Timestep (+ vector conditioning) embedding: timesteps (B,) or (), y (B, adm) -> (B, E)."""
        timesteps = torch.as_tensor(timesteps, device=self.time_embed[0].weight.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise UNetInputError(f"timesteps must have shape ({batch},) or (), got {tuple(timesteps.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.label_emb is None:
            if y is not None:
                raise UNetInputError("this model takes no vector conditioning y (adm_in_channels is None)")
            return emb
        if y is None or y.shape != (batch, self.config.adm_in_channels):
            got = None if y is None else tuple(y.shape)
            raise UNetInputError(f"this model needs y of shape ({batch}, {self.config.adm_in_channels}), got {got}")
        emb += self.label_emb(y.to(dtype))
        return emb

    def _check_context(self, context: Tensor, batch: int) -> None:
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.config.context_dim:
            raise UNetInputError(
                f"context must have shape ({batch}, tokens, {self.config.context_dim}), got {tuple(context.shape)}"
            )


class UNet(UNetEncoder):
    """The denoising U-Net: (noisy latents, timesteps, text context[, y][, control]) -> model output.

    What the output means (epsilon, v, ...) is the sampler's business, not the U-Net's.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        emb_dim = config.time_embed_dim
        skip_channels = list(self.skip_channels)
        channels = self.middle_channels
        depths = iter(config.output_depths)
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(config.channel_mult))):
            width = config.model_channels * config.channel_mult[level]
            for index in range(config.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(channels + skip_channels.pop(), emb_dim, width)]
                channels = width
                depth = next(depths)
                if depth:
                    layers.append(self._transformer(config, channels, depth))
                if level and index == config.num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(EmbedSequential(layers))
        self.out = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, channels, eps=RESBLOCK_GROUPNORM_EPS),
            nn.SiLU(inplace=True),
            nn.Conv2d(channels, config.out_channels, kernel_size=3, padding=1),
        )

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | float,
        context: Tensor,
        y: Tensor | None = None,
        control: ControlResiduals | None = None,
    ) -> Tensor:
        """x: (B, in_channels, H, W), timesteps: (B,) or (), context: (B, T, context_dim),
        y: (B, adm_in_channels) or None -> (B, out_channels, H, W).

        ``control`` residuals (one per input block plus the middle) are added to the skip
        connections and to the middle block's output.
        """
        batch = x.shape[0]
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise UNetInputError(f"x must have shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_context(context, batch)
        if control is not None and len(control.down) != len(self.input_blocks):
            raise UNetInputError(
                f"control must hold {len(self.input_blocks)} skip residuals (one per input block), "
                f"got {len(control.down)}"
            )
        emb = self.embed(timesteps, y, batch, x.dtype)

        skips: list[Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control.middle
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control.down[len(skips)]
            h = torch.cat([h, skip], dim=1)
            # Upsampling targets the next skip's size, so latents not divisible by 2**levels work.
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)


# --------------------------------------------------------------------------- config from shapes

_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_KEY = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_TRANSFORMER_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UNetConfigError(f"U-Net state dict has no key {key!r}; not an LDM-layout U-Net")
    return tuple(int(n) for n in shapes[key])


def _transformer_depth(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """How many transformer blocks the SpatialTransformer at ``prefix`` (ending in '.') has."""
    indices = set()
    for key in shapes:
        if key.startswith(prefix):
            match = _TRANSFORMER_BLOCK.match(key[len(prefix) :])
            if match:
                indices.add(int(match.group(1)))
    if indices != set(range(len(indices))):
        raise UNetConfigError(f"{prefix}transformer_blocks has non-consecutive indices {sorted(indices)}")
    return len(indices)


def _layer_kinds(shapes: Mapping[str, Sequence[int]], group: str) -> dict[int, dict[int, tuple[str, int]]]:
    """For input/output blocks: block -> layer -> (kind, value), kinds being "res" (value: out
    channels), "attn" (transformer depth), "down", "up" and "conv" (input_blocks.0; out channels)."""
    blocks: dict[int, dict[int, tuple[str, int]]] = {}
    for key in shapes:
        match = _BLOCK_KEY.match(key)
        if not match or match.group(1) != group:
            continue
        block, layer, rest = int(match.group(2)), int(match.group(3)), match.group(4)
        layers = blocks.setdefault(block, {})
        if rest == "in_layers.2.weight":
            layers[layer] = ("res", _shape(shapes, key)[0])
        elif rest == "op.weight":
            layers[layer] = ("down", 0)
        elif rest == "conv.weight":
            layers[layer] = ("up", 0)
        elif rest == "proj_in.weight":
            layers[layer] = ("attn", _transformer_depth(shapes, f"{group}.{block}.{layer}."))
        elif rest == "weight" and block == 0 and layer == 0:
            layers[layer] = ("conv", _shape(shapes, key)[0])
    if sorted(blocks) != list(range(len(blocks))):
        raise UNetConfigError(f"U-Net {group} indices are not consecutive: {sorted(blocks)}")
    return blocks


def unet_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    *,
    num_heads: int | None = None,
    head_dim: int | None = None,
    encoder_only: bool = False,
) -> UNetConfig:
    """The :class:`UNetConfig` of an LDM-layout U-Net state dict, from key names and shapes alone.

    ``shapes`` maps keys without the ``model.diffusion_model.`` prefix to tensor shapes (a
    safetensors header is enough). Head counts leave no trace in the weights, so unless
    ``num_heads`` or ``head_dim`` is given, the original models' convention is assumed: 8 heads
    where the transformers project with 1x1 convs (SD1.x), 64-wide heads where they project
    linearly (SD2.x, SDXL). ``encoder_only`` reads a ControlNet's copy of the encoder: output
    blocks are not expected and ``out_channels`` is set to ``in_channels``.
    """
    if num_heads is not None and head_dim is not None:
        raise UNetConfigError("give at most one of num_heads / head_dim")
    conv_in = _shape(shapes, "input_blocks.0.0.weight")
    model_channels, in_channels = conv_in[0], conv_in[1]

    inputs = _layer_kinds(shapes, "input_blocks")
    # Split the input blocks after input_blocks.0 into levels at each Downsample.
    levels: list[list[dict[int, tuple[str, int]]]] = [[]]
    for block in range(1, len(inputs)):
        layers = inputs[block]
        if layers.get(0, ("",))[0] == "down":
            levels.append([])
        elif layers.get(0, ("",))[0] == "res":
            levels[-1].append(layers)
        else:
            raise UNetConfigError(f"input_blocks.{block} is neither a ResBlock block nor a Downsample")
    num_res_blocks = len(levels[0])
    channel_mult: list[int] = []
    transformer_depth: list[int] = []
    for level, blocks in enumerate(levels):
        if len(blocks) != num_res_blocks or not blocks:
            raise UNetConfigError(
                f"U-Net level {level} has {len(blocks)} res blocks, level 0 has {num_res_blocks}; "
                "levels with differing block counts are not supported"
            )
        width = blocks[0][0][1]
        depths = {layers.get(1, ("attn", 0))[1] for layers in blocks}
        if any(layers[0][1] != width for layers in blocks) or len(depths) != 1:
            raise UNetConfigError(f"U-Net level {level}: res blocks differ in width or transformer depth")
        if width % model_channels:
            raise UNetConfigError(f"U-Net level {level} width {width} is not a multiple of {model_channels}")
        channel_mult.append(width // model_channels)
        transformer_depth.append(depths.pop())

    middle_depth = _transformer_depth(shapes, "middle_block.1.")
    if not middle_depth:
        raise UNetConfigError("middle_block.1 has no transformer blocks; not an LDM-layout U-Net")

    attention_keys = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    proj_keys = sorted(k for k in shapes if k.endswith("proj_in.weight"))
    context_dims = {_shape(shapes, k)[1] for k in attention_keys}
    projection_ranks = {len(_shape(shapes, k)) for k in proj_keys}
    if len(context_dims) != 1 or len(projection_ranks) != 1:
        raise UNetConfigError(
            f"U-Net attention layers disagree: context dims {sorted(context_dims)}, "
            f"projection ranks {sorted(projection_ranks)}"
        )
    use_linear_projection = projection_ranks.pop() == 2
    if num_heads is None and head_dim is None:
        if use_linear_projection:
            head_dim = LINEAR_PROJECTION_HEAD_DIM
        else:
            num_heads = CONV_PROJECTION_NUM_HEADS

    adm_in_channels = _shape(shapes, "label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in shapes else None

    out_channels = in_channels
    transformer_depth_output: tuple[int, ...] | None = None
    if not encoder_only:
        out_channels = _shape(shapes, "out.2.weight")[0]
        outputs = _layer_kinds(shapes, "output_blocks")
        expected = len(channel_mult) * (num_res_blocks + 1)
        if len(outputs) != expected:
            raise UNetConfigError(f"U-Net has {len(outputs)} output blocks, its input side implies {expected}")
        depths = tuple(
            next((value for kind, value in outputs[block].values() if kind == "attn"), 0) for block in sorted(outputs)
        )
        mirrored = tuple(d for d in reversed(transformer_depth) for _ in range(num_res_blocks + 1))
        transformer_depth_output = None if depths == mirrored else depths

    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(transformer_depth),
        transformer_depth_middle=middle_depth,
        transformer_depth_output=transformer_depth_output,
        num_heads=num_heads,
        head_dim=head_dim,
        context_dim=context_dims.pop(),
        use_linear_projection=use_linear_projection,
        adm_in_channels=adm_in_channels,
    )


# --------------------------------------------------------------------------- diffusers key mapping

# The renaming's vocabulary, public for modules that map diffusers names themselves (LoRA keys):
# top-level layers and the layers of one res block, diffusers name -> LDM name.
DIFFUSERS_TOP_LEVEL_LAYERS: Mapping[str, str] = MappingProxyType({
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
})
DIFFUSERS_RESNET_LAYERS: Mapping[str, str] = MappingProxyType({
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
})
_DIFFUSERS_BLOCK_KEY = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_DIFFUSERS_MID_KEY = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class DiffusersUNetLayout:
    """What renaming diffusers U-Net keys needs to know: res blocks per down level, and which
    up levels have attention (it moves the upsampler from slot 1 to slot 2)."""

    res_blocks: int
    up_levels_with_attention: frozenset[int]

    @classmethod
    def of(cls, keys: Sequence[str] | Mapping[str, object]) -> DiffusersUNetLayout:
        resnets: dict[int, set[int]] = {}
        with_attention: set[int] = set()
        for key in keys:
            match = _DIFFUSERS_BLOCK_KEY.match(key)
            if not match:
                continue
            group, level, kind, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            if group == "down_blocks" and kind == "resnets":
                resnets.setdefault(level, set()).add(index)
            elif group == "up_blocks" and kind == "attentions":
                with_attention.add(level)
        counts = {len(indices) for indices in resnets.values()}
        if len(counts) != 1:
            raise UNetConfigError(
                f"diffusers U-Net down blocks have differing resnet counts {sorted(counts)}; "
                "expected the same count on every level"
            )
        return cls(counts.pop(), frozenset(with_attention))


def ldm_key_from_diffusers(key: str, layout: DiffusersUNetLayout) -> str:
    """The LDM name of one diffusers UNet2DConditionModel / ControlNetModel encoder parameter."""
    module, _, param = key.rpartition(".")
    if module in DIFFUSERS_TOP_LEVEL_LAYERS:
        return f"{DIFFUSERS_TOP_LEVEL_LAYERS[module]}.{param}"
    per_level = layout.res_blocks + 1

    def resnet(rest: str) -> str:
        name, _, tail = rest.partition(".")
        if name not in DIFFUSERS_RESNET_LAYERS:
            raise UNetConfigError(f"diffusers key {key!r}: unknown resnet part {name!r}")
        return f"{DIFFUSERS_RESNET_LAYERS[name]}.{tail}"

    match = _DIFFUSERS_BLOCK_KEY.match(key)
    if match:
        group, level, kind, index, rest = match.groups()
        level_i, index_i = int(level), int(index)
        if group == "down_blocks":
            block = 1 + level_i * per_level
            if kind == "resnets":
                return f"input_blocks.{block + index_i}.0.{resnet(rest)}"
            if kind == "attentions":
                return f"input_blocks.{block + index_i}.1.{rest}"
            if kind == "downsamplers" and rest.startswith("conv."):
                return f"input_blocks.{block + layout.res_blocks}.0.op.{rest[len('conv.'):]}"
        else:
            block = level_i * per_level
            if kind == "resnets":
                return f"output_blocks.{block + index_i}.0.{resnet(rest)}"
            if kind == "attentions":
                return f"output_blocks.{block + index_i}.1.{rest}"
            if kind == "upsamplers" and rest.startswith("conv."):
                slot = 2 if level_i in layout.up_levels_with_attention else 1
                return f"output_blocks.{block + layout.res_blocks}.{slot}.{rest}"
    match = _DIFFUSERS_MID_KEY.match(key)
    if match:
        kind, index, rest = match.groups()
        if kind == "attentions" and index == "0":
            return f"middle_block.1.{rest}"
        if kind == "resnets" and index in ("0", "1"):
            return f"middle_block.{0 if index == '0' else 2}.{resnet(rest)}"
    raise UNetConfigError(f"diffusers U-Net key {key!r} has no counterpart in the LDM layout")


def ldm_unet_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict renamed to this module's (LDM) names.

    Tensors are passed through, not copied; every diffusers key must have a counterpart
    (raises :class:`UNetConfigError` naming the first that does not).
    """
    layout = DiffusersUNetLayout.of(state_dict)
    renamed = {ldm_key_from_diffusers(key, layout): tensor for key, tensor in state_dict.items()}
    if len(renamed) != len(state_dict):
        raise UNetConfigError(
            "diffusers U-Net keys collide after renaming; the state dict is not a UNet2DConditionModel"
        )
    return renamed
