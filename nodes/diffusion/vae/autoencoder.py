"""The Stable Diffusion VAE (AutoencoderKL) in the original LDM single-file layout, with tiled encode/decode and latent scaling.

Module names equal the keys of an LDM single-file checkpoint after its ``first_stage_model.`` prefix
is removed (``encoder.down.0.block.1.norm1.weight``, ``decoder.up.3.upsample.conv.weight``,
``quant_conv.weight``, ...), so such a state dict loads with ``load_state_dict(strict=True)`` and no
renaming. Files in the diffusers layout go through :func:`ldm_vae_keys_from_diffusers` first.

Images are ``(B, 3, H, W)`` in ``[-1, 1]``. The encoder halves the resolution once per level
except the last (4 levels: factor 8). Diffusion models do not see raw VAE latents but
``(z - shift_factor) * scaling_factor`` (:class:`LatentScaling`), with factors per model family in
:data:`LATENT_SCALING`. SD1/SD2/SDXL VAEs have 4 latent channels and quant/post-quant 1x1 convs;
the SD3 and Flux VAEs are the same network with 16 latent channels and neither conv.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks import kernels

logger = logging.getLogger(__name__)

# GroupNorm epsilon of every LDM/SD VAE norm layer.
NORM_EPS = 1e-6
# Bounds applied to the predicted log-variance before exponentiating (LDM and diffusers agree).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAELoadError(ValueError):
    """A VAE state dict does not fit the expected layout (names the offending keys)."""


# --------------------------------------------------------------------------- latent scaling


@dataclass(frozen=True)
class LatentScaling:
    """How raw VAE latents relate to the latents a diffusion model works on.

    ``diffusion = (vae - shift_factor) * scaling_factor``; the factors were chosen per model
    family so the diffusion latents have roughly unit variance.
    """

    scaling_factor: float
    shift_factor: float = 0.0

    def to_diffusion(self, latents: Tensor) -> Tensor:
        """VAE latents ``(B, C, h, w)`` -> diffusion latents of the same shape."""
        if self.shift_factor:
            latents = latents - self.shift_factor
        return latents * self.scaling_factor

    def to_vae(self, latents: Tensor) -> Tensor:
        """Diffusion latents ``(B, C, h, w)`` -> VAE latents of the same shape."""
        latents = latents / self.scaling_factor
        if self.shift_factor:
            latents = latents + self.shift_factor
        return latents


LATENT_SCALING: Mapping[str, LatentScaling] = MappingProxyType(
    {
        "sd1": LatentScaling(0.18215),
        "sd2": LatentScaling(0.18215),
        "sdxl": LatentScaling(0.13025),
        # The 16-channel VAEs: the scaling_factor/shift_factor of their diffusers configs
        # (stable-diffusion-3-medium-diffusers/vae, FLUX.1-dev/vae) and ComfyUI's latent_formats.SD3/Flux.
        "sd3": LatentScaling(1.5305, 0.0609),
        "flux": LatentScaling(0.3611, 0.1159),
    }
)

# Latent channels of each family's VAE.
LATENT_CHANNELS: Mapping[str, int] = MappingProxyType({"sd1": 4, "sd2": 4, "sdxl": 4, "sd3": 16, "flux": 16})


def latent_scaling_for(family: str) -> LatentScaling:
    """The latent scaling of a model family (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``, ``"flux"``)."""
    try:
        return LATENT_SCALING[family]
    except KeyError:
        raise VAELoadError(
            f"unknown model family {family!r} for VAE latent scaling; expected one of {sorted(LATENT_SCALING)}"
        ) from None


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an LDM AutoencoderKL (defaults: the SD1/SD2/SDXL VAE).

    ``channels * ch_mult[i]`` is the width of level ``i``; ``z_channels`` is the width of the
    encoder/decoder bottleneck and ``latent_channels`` (LDM's ``embed_dim``) that of the latent
    after ``quant_conv``; the two are equal in every SD VAE.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    latent_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult:
            raise ValueError("VAEConfig.ch_mult must name at least one level")
        bad = [c for c in (self.channels, *self.block_channels) if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: channel counts {bad} are not divisible by norm_groups={self.norm_groups}"
            )
        if not self.use_quant_conv and self.z_channels != self.latent_channels:
            raise ValueError("VAEConfig: without quant_conv, z_channels must equal latent_channels")
        if not self.use_post_quant_conv and self.z_channels != self.latent_channels:
            raise ValueError("VAEConfig: without post_quant_conv, z_channels must equal latent_channels")

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Width of each resolution level, highest resolution first."""
        return tuple(self.channels * m for m in self.ch_mult)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent cell along one side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_scaling(self) -> LatentScaling:
        return LatentScaling(self.scaling_factor, self.shift_factor)


_LEVEL_KEY = re.compile(r"^encoder\.down\.(\d+)\.")
_ENC_BLOCK_KEY = re.compile(r"^encoder\.down\.0\.block\.(\d+)\.")
_DEC_LEVEL_KEY = re.compile(r"^decoder\.up\.(\d+)\.")


def _indices(keys: Sequence[str], pattern: re.Pattern[str]) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := pattern.match(k))}


def vae_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    family: str | None = None,
    norm_groups: int = 32,
) -> VAEConfig:
    """Derive a :class:`VAEConfig` from LDM-layout key names and tensor shapes alone.

    ``shapes`` maps keys without the ``first_stage_model.`` prefix to shapes. The 4-channel SD
    VAEs and the 16-channel SD3/Flux VAEs (no quant_conv/post_quant_conv) are told apart by their
    shapes. The latent scaling cannot be seen in the weights (SD1 and SDXL VAEs, SD3 and Flux VAEs
    have identical shapes), so it comes from ``family``, which must have this VAE's latent width;
    None: the scaling is a placeholder (the first family of that width, sd1 or sd3; neutral for
    other widths) that callers must not rely on. Nor can the GroupNorm group count be seen, which
    is 32 in every SD VAE.
    """
    keys = list(shapes)

    def shape(key: str) -> tuple[int, ...]:
        try:
            return tuple(shapes[key])
        except KeyError:
            raise VAELoadError(f"VAE state dict has no {key!r}; is it an LDM AutoencoderKL?") from None

    levels = _indices(keys, _LEVEL_KEY)
    if not levels:
        raise VAELoadError("VAE state dict has no 'encoder.down.N.*' keys; is it an LDM AutoencoderKL?")
    if levels != set(range(len(levels))):
        raise VAELoadError(f"VAE encoder levels are not numbered 0..N-1: {sorted(levels)}")
    num_res_blocks = len(_indices(keys, _ENC_BLOCK_KEY))
    dec_levels = _indices(keys, _DEC_LEVEL_KEY)
    if dec_levels != levels:
        raise VAELoadError(f"VAE decoder levels {sorted(dec_levels)} do not match encoder levels {sorted(levels)}")

    conv_in = shape("encoder.conv_in.weight")
    channels, in_channels = conv_in[0], conv_in[1]
    widths = [shape(f"encoder.down.{i}.block.{num_res_blocks - 1}.conv2.weight")[0] for i in range(len(levels))]
    if any(w % channels for w in widths):
        raise VAELoadError(f"VAE level widths {widths} are not multiples of encoder.conv_in width {channels}")
    z_channels = shape("encoder.conv_out.weight")[0] // 2
    use_quant_conv = "quant_conv.weight" in shapes
    latent_channels = shape("quant_conv.weight")[0] // 2 if use_quant_conv else z_channels
    scaling = _scaling_for_width(family, latent_channels)
    return VAEConfig(
        in_channels=in_channels,
        out_channels=shape("decoder.conv_out.weight")[0],
        channels=channels,
        ch_mult=tuple(w // channels for w in widths),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        latent_channels=latent_channels,
        norm_groups=norm_groups,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        scaling_factor=scaling.scaling_factor,
        shift_factor=scaling.shift_factor,
    )


def _scaling_for_width(family: str | None, latent_channels: int) -> LatentScaling:
    if family is None:
        placeholder = next((name for name, width in LATENT_CHANNELS.items() if width == latent_channels), None)
        return LATENT_SCALING[placeholder] if placeholder is not None else LatentScaling(1.0)
    scaling = latent_scaling_for(family)
    if LATENT_CHANNELS[family] != latent_channels:
        fitting = sorted(name for name, width in LATENT_CHANNELS.items() if width == latent_channels)
        raise VAELoadError(
            f"this VAE has {latent_channels} latent channels, but the {family!r} latent space has "
            f"{LATENT_CHANNELS[family]}; families with {latent_channels}-channel VAEs: {fitting or 'none known'}"
        )
    return scaling


# --------------------------------------------------------------------------- diffusers layout

def _diffusers_rules(num_levels: int) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    """Regex -> LDM-name rules; diffusers numbers decoder blocks from the lowest resolution up."""
    attn_names = {
        "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
        # diffusers before 0.14 named them like this
        "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
    }
    resnet_names = {
        "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut",
    }
    top = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    attn_alt = "|".join(re.escape(n) for n in attn_names)
    resnet_alt = "|".join(resnet_names)
    return [
        (re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$"), lambda m: m.group(0)),
        (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$"),
         lambda m: f"{m.group(1)}.{top[m.group(2)]}.{m.group(3)}"),
        (re.compile(rf"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.({resnet_alt})\.(weight|bias)$"),
         lambda m: f"encoder.down.{m.group(1)}.block.{m.group(2)}.{resnet_names[m.group(3)]}.{m.group(4)}"),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$"),
         lambda m: f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"),
        (re.compile(rf"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.({resnet_alt})\.(weight|bias)$"),
         lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.block.{m.group(2)}."
                   f"{resnet_names[m.group(3)]}.{m.group(4)}"),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$"),
         lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"),
        (re.compile(rf"^(encoder|decoder)\.mid_block\.resnets\.([01])\.({resnet_alt})\.(weight|bias)$"),
         lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{resnet_names[m.group(3)]}.{m.group(4)}"),
        (re.compile(rf"^(encoder|decoder)\.mid_block\.attentions\.0\.({attn_alt})\.(weight|bias)$"),
         lambda m: f"{m.group(1)}.mid.attn_1.{attn_names[m.group(2)]}.{m.group(3)}"),
    ]


def is_diffusers_vae_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are in the diffusers AutoencoderKL layout (rather than LDM's)."""
    return any(k.startswith("encoder.down_blocks.") for k in keys)


def ldm_vae_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM names this module uses.

    Tensors are passed through unchanged (the mid-block attention keeps its linear weights, which
    :class:`AutoencoderKL` accepts as well as LDM's 1x1 convolutions).
    """
    levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
    rules = _diffusers_rules(len(levels))
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        for pattern, rename in rules:
            if m := pattern.match(key):
                out[rename(m)] = tensor
                break
        else:
            raise VAELoadError(f"diffusers VAE key {key!r} has no LDM equivalent")
    return out


# --------------------------------------------------------------------------- modules


def _group_norm(config: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv stages with a residual; a 1x1 conv shortcut when widths differ."""

    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)"""
        # SiLU acts on fresh GroupNorm outputs, the residual lands on a fresh conv output (whose
        # backward does not read it): all in place, no extra image-sized allocations.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the VAE's mid-block attention).

    Projections are ``nn.Linear``; LDM files store them as 1x1 convolutions (4-D weights), which
    load equally (squeezed on load).
    """

    _PROJECTIONS = ("q", "k", "v", "proj_out")

    def __init__(self, config: VAEConfig, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(config, channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)"""
        b, c, h, w = x.shape
        # (B, HW, C), copied to be contiguous for oneDNN.
        tokens = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        q, k, v = (kernels.linear(tokens, proj).unsqueeze(2) for proj in (self.q, self.k, self.v))
        attended = kernels.attention(q, k, v)  # one head: (B, HW, 1, C) -> (B, HW, C)
        return x + kernels.linear(attended, self.proj_out).transpose(1, 2).reshape(b, c, h, w)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # type: ignore[override]
        # torch hands us its own copy of the state dict, so rewriting entries here is local.
        for name in self._PROJECTIONS:
            key = f"{prefix}{name}.weight"
            weight = state_dict.get(key)
            if weight is not None and weight.ndim > 2 and all(s == 1 for s in weight.shape[2:]):
                state_dict[key] = weight.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom (LDM's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H/2, W/2)"""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)"""
        return kernels.upsample_conv(x, self.conv)


class MidBlock(nn.Module):
    """ResNet, optional attention, ResNet at the lowest resolution."""

    def __init__(self, config: VAEConfig, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        self.attn_1 = AttnBlock(config, channels) if config.mid_attention else None
        self.block_2 = ResnetBlock(config, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class DownLevel(nn.Module):
    """One encoder resolution level (LDM ``encoder.down.N``): ResNet blocks, then an optional downsampler."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level (LDM ``decoder.up.N``): ResNet blocks, then an optional upsampler."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> Gaussian moments ``(B, 2*z_channels, H/f, W/f)``."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = config.block_channels
        self.conv_in = nn.Conv2d(config.in_channels, config.channels, 3, padding=1)
        self.down = nn.ModuleList()
        width_in = config.channels
        for i, width in enumerate(widths):
            blocks = [ResnetBlock(config, width_in if j == 0 else width, width) for j in range(config.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(width)))
            width_in = width
        self.mid = MidBlock(config, widths[-1])
        self.norm_out = _group_norm(config, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, out_channels, h*f, w*f)``.

    ``up[i]`` works at the resolution of ``encoder.down[i]``; it runs from the last level to the first.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = config.block_channels
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(config, widths[-1])
        levels: list[UpLevel] = []
        width_in = widths[-1]
        for i in reversed(range(len(widths))):
            width = widths[i]
            blocks = [
                ResnetBlock(config, width_in if j == 0 else width, width) for j in range(config.num_res_blocks + 1)
            ]
            levels.append(UpLevel(blocks, Upsample(width) if i != 0 else None))
            width_in = width
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _group_norm(config, widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


@dataclass
class DiagonalGaussian:
    """The encoder's posterior: independent Gaussians per latent element.

    mean, logvar: (B, C, h, w); logvar is clamped to [-30, 20].
    """

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """moments: (B, 2C, h, w), mean channels first."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A draw ``(B, C, h, w)``; the noise is made on the generator's device so a seed gives
        the same latent whatever device the VAE runs on."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of Stable Diffusion, LDM module names."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z, latent = config.z_channels, config.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, z, 1) if config.use_post_quant_conv else None

    # -- plain ----------------------------------------------------------------

    def _moments(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f)."""
        return DiagonalGaussian.from_moments(self._moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, latent_channels, h, w) raw VAE latents -> image (B, out_channels, h*f, w*f), about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- latent scaling ---------------------------------------------------------

    def latents_to_diffusion(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> the scaled latents a diffusion model uses (same shape)."""
        return self.config.latent_scaling.to_diffusion(z)

    def latents_from_diffusion(self, latents: Tensor) -> Tensor:
        """Diffusion-model latents -> raw VAE latents for :meth:`decode` (same shape)."""
        return self.config.latent_scaling.to_vae(latents)

    # -- tiled ------------------------------------------------------------------

    def encode_tiled(self, x: Tensor, tile_size: int = 512, overlap: int = 64) -> DiagonalGaussian:
        """Like :meth:`encode`, a tile at a time, blending overlapping tiles' moments.

        x: (B, in_channels, H, W) with H, W multiples of the downscale factor f. ``tile_size`` and
        ``overlap`` are in image pixels and multiples of f. Peak activation memory is that of
        encoding one ``tile_size`` square; the result differs slightly from :meth:`encode` because
        GroupNorm statistics and the attention see one tile only.
        """
        f = self.config.downscale_factor
        _check_tiling(tile_size, overlap, f, "encode_tiled")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode_tiled: image size {tuple(x.shape[-2:])} is not a multiple of {f}")
        moments = _run_tiled(self._moments, x, tile_size, overlap, unit=f, out_num=1, out_den=f)
        return DiagonalGaussian.from_moments(moments)

    def decode_tiled(self, z: Tensor, tile_size: int = 512, overlap: int = 64) -> Tensor:
        """Like :meth:`decode`, a tile at a time, blending overlapping tiles' pixels.

        z: (B, latent_channels, h, w). ``tile_size`` and ``overlap`` are in image pixels and
        multiples of the downscale factor f (a 512 tile is a 64-cell latent tile at f = 8).
        """
        f = self.config.downscale_factor
        _check_tiling(tile_size, overlap, f, "decode_tiled")
        return _run_tiled(self.decode, z, tile_size // f, overlap // f, unit=1, out_num=f, out_den=1)


def _check_tiling(tile_size: int, overlap: int, factor: int, where: str) -> None:
    if tile_size % factor or overlap % factor:
        raise ValueError(f"{where}: tile_size={tile_size} and overlap={overlap} must be multiples of {factor}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"{where}: need 0 <= overlap < tile_size, got overlap={overlap}, tile_size={tile_size}")


def _tile_spans(length: int, tile: int, overlap: int, unit: int) -> list[tuple[int, int]]:
    """(start, end) of tiles covering ``[0, length)``, starts on multiples of ``unit``, neighbours
    overlapping by at least ``overlap``; spread evenly so no tile is a thin sliver."""
    if length <= tile:
        return [(0, length)]
    length_u, tile_u, overlap_u = length // unit, tile // unit, overlap // unit
    count = math.ceil((length_u - overlap_u) / (tile_u - overlap_u))
    # Floor of an evenly spaced grid: steps never exceed tile_u - overlap_u, so overlaps never shrink.
    return [((i * (length_u - tile_u)) // (count - 1) * unit, (i * (length_u - tile_u)) // (count - 1) * unit + tile)
            for i in range(count)]


def _edge_ramp(size: int, ramp_start: int, ramp_end: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """1-D blend weights: linear ramps over the first/last ``ramp_*`` entries (0 = no ramp), 1 elsewhere."""
    pos = torch.arange(size, device=device, dtype=dtype) + 0.5
    weight = torch.ones(size, device=device, dtype=dtype)
    if ramp_start:
        weight = torch.minimum(weight, pos / ramp_start)
    if ramp_end:
        weight = torch.minimum(weight, (size - pos) / ramp_end)
    return weight


def _run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, unit: int,
               out_num: int, out_den: int) -> Tensor:
    """Apply a resolution-scaling ``fn`` (out = in * out_num / out_den) tile by tile.

    Overlapping outputs are averaged with weights that ramp linearly across each interior
    overlap, so seams fade instead of cutting.
    """
    height, width = x.shape[-2:]
    rows = _tile_spans(height, tile, overlap, unit)
    cols = _tile_spans(width, tile, overlap, unit)
    ramp = overlap * out_num // out_den
    out = weight_sum = None
    for y0, y1 in rows:
        for x0, x1 in cols:
            tile_out = fn(x[..., y0:y1, x0:x1])
            if out is None:
                # Allocated from the first tile: only then are channels, dtype and device known.
                shape = (*tile_out.shape[:-2], height * out_num // out_den, width * out_num // out_den)
                out = tile_out.new_zeros(shape)
                weight_sum = tile_out.new_zeros(shape[-2:])
            oy0, oy1 = y0 * out_num // out_den, y1 * out_num // out_den
            ox0, ox1 = x0 * out_num // out_den, x1 * out_num // out_den
            wy = _edge_ramp(oy1 - oy0, ramp if y0 > 0 else 0, ramp if y1 < height else 0, out.device, out.dtype)
            wx = _edge_ramp(ox1 - ox0, ramp if x0 > 0 else 0, ramp if x1 < width else 0, out.device, out.dtype)
            w = wy[:, None] * wx[None, :]
            out[..., oy0:oy1, ox0:ox1].addcmul_(tile_out, w)
            weight_sum[oy0:oy1, ox0:ox1] += w
            del tile_out
    return out.div_(weight_sum)


# --------------------------------------------------------------------------- loading

# Training-only entries found in some standalone VAE files (discriminator, LPIPS, learned loss
# weight); they play no part in encoding or decoding.
TRAINING_ONLY_PREFIXES = ("loss.",)


def load_vae(
    state_dict: Mapping[str, Tensor],
    family: str | None = None,
    *,
    config: VAEConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` from a state dict (prefix already removed).

    Accepts the LDM layout (1x1-conv or linear attention) and the diffusers layout. The config
    comes from the shapes unless given; ``family`` picks the latent scaling (see
    :func:`vae_config_from_shapes`; None leaves a placeholder). The module is built
    on the meta device and takes the given tensors, so no time goes into random initialisation.
    """
    training_only = [k for k in state_dict if k.startswith(TRAINING_ONLY_PREFIXES)]
    if training_only:
        logger.info("VAE: ignoring %d training-only keys (%s...)", len(training_only), training_only[0])
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    if is_diffusers_vae_layout(state_dict):
        state_dict = ldm_vae_keys_from_diffusers(state_dict)
    if config is None:
        config = vae_config_from_shapes({k: v.shape for k, v in state_dict.items()}, family=family)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches: the file contradicts its own shapes/config
        raise VAELoadError(f"VAE state dict does not fit {config}: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        raise VAELoadError(
            f"VAE state dict does not fit {config}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model.to(device=device, dtype=dtype).eval()
