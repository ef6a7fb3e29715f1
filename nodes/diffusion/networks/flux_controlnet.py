"""ControlNets for Flux.1: InstantX's (and Shakker-Labs' union) kind on VAE latents, and XLabs' kind on images.

A Flux ControlNet is a shallow copy of the Flux trunk (``img_in``, ``time_in``, ``vector_in``,
``guidance_in``, ``txt_in``, ``double_blocks.N``, ``single_blocks.N`` in BFL's names, built from
:mod:`.flux`'s blocks) whose image tokens get the control image added through ``pos_embed_input``;
a linear per block (``controlnet_blocks.N``, ``controlnet_single_blocks.N``) projects the image
tokens into residuals for the main model's double- and single-stream blocks
(:class:`~nodegraph_diffusion.networks.transformer_control.TransformerControl`).

- **latent** (InstantX, Shakker-Labs; diffusers' ``FluxControlNetModel``): the control image enters
  as VAE latents packed 2x2 like the main latent. Each output serves ceil(N / M) consecutive main
  blocks. A union ControlNet (``controlnet_mode_embedder``) is told which kind of control image it
  gets (canny, depth, ...) by one extra text token in front of the prompt.
- **image** (XLabs): the control image itself (in [0, 1], taken to [-1, 1]) goes through a small
  conv stack (``input_hint_block``, 8x down) and is packed; its few outputs repeat cyclically over
  the main blocks (block i takes output i mod M), as XLabs' code and diffusers do.

Module names are the layout ComfyUI converts these files into, which XLabs' files already have;
diffusers' files go through :func:`flux_controlnet_keys_from_diffusers`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import kernels
from .controlnet import hint_block
from .flux import (
    PATCH_SIZE,
    TIMESTEP_EMBED_DIM,
    DoubleStreamBlock,
    Flux,
    FluxConfig,
    FluxConfigError,
    FluxInputError,
    MLPEmbedder,
    SingleStreamBlock,
    flux_config_from_shapes,
    flux_keys_from_diffusers,
    image_position_ids,
    modulation_vector,
    pack_latent,
    rope_angles,
)
from .transformer import pad_to_patches
from .transformer_control import ControlShapeError, TransformerControl, spread

# XLabs' image embedder: 16 channels through three stride-2 stages (8x down), as Flux's VAE.
XLABS_HINT_WIDTHS = (16, 16, 16, 16)
XLABS_HINT_DOWNSCALE = 2 ** (len(XLABS_HINT_WIDTHS) - 1)


@dataclass(frozen=True)
class FluxControlNetConfig:
    """A Flux ControlNet: its trunk (a :class:`~.flux.FluxConfig`, output channels unused) and how
    the control image enters.

    hint_channels: latent channels of the control image (latent kind: 16; InstantX's inpainting
    ControlNets 17), or the image's (image kind: 3). image_input: the XLabs kind. num_modes: how many
    control types a union ControlNet knows (0 for the others).
    """

    flux: FluxConfig
    hint_channels: int = 16
    image_input: bool = False
    num_modes: int = 0

    @property
    def hint_downscale(self) -> int:
        """Control-image pixels per latent cell: the image kind reads images (8x), the latent kind latents (1x)."""
        return XLABS_HINT_DOWNSCALE if self.image_input else 1


class FluxControlNet(nn.Module):
    """(latents, control latents or image, sigmas, text, pooled[, guidance, mode]) -> residuals for a Flux."""

    def __init__(self, config: FluxControlNetConfig) -> None:
        super().__init__()
        self.config = config
        trunk, dim = config.flux, config.flux.hidden_size
        self.img_in = nn.Linear(trunk.packed_in_channels, dim)
        self.time_in = MLPEmbedder(TIMESTEP_EMBED_DIM, dim)
        self.vector_in = MLPEmbedder(trunk.pooled_dim, dim)
        if trunk.guidance_embed:
            self.guidance_in = MLPEmbedder(TIMESTEP_EMBED_DIM, dim)
        self.txt_in = nn.Linear(trunk.context_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(trunk) for _ in range(trunk.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(trunk) for _ in range(trunk.depth_single_blocks))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(trunk.depth))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(trunk.depth_single_blocks))
        if config.image_input:
            self.input_hint_block = hint_block(config.hint_channels, XLABS_HINT_WIDTHS, XLABS_HINT_WIDTHS[-1])
            packed_hint = XLABS_HINT_WIDTHS[-1] * PATCH_SIZE**2
        else:
            packed_hint = config.hint_channels * PATCH_SIZE**2
        self.pos_embed_input = nn.Linear(packed_hint, dim)
        if config.num_modes:
            self.controlnet_mode_embedder = nn.Embedding(config.num_modes, dim)

    def forward(
        self,
        x: Tensor,
        hint: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor,
        strength: float = 1.0,
        *,
        base: Flux,
        guidance: Tensor | None = None,
        mode: int | None = None,
    ) -> TransformerControl:
        """x: (B, C, H, W) latents as the main model gets them; hint: (B, hint_channels, H, W) control
        latents (latent kind) or (B, 3, 8H, 8W) control image in [0, 1] (image kind); timesteps: (B,)
        sigmas; context: (B, L, context_dim) T5 states; y: (B, pooled_dim) pooled CLIP; guidance: (B,)
        distilled guidance (needed when the ControlNet embeds one); mode: a union ControlNet's control
        type (None: no type token, as ComfyUI's "auto"); base: the Flux being guided.

        Returns each block's projected image tokens times ``strength``, spread over base's blocks.
        """
        self._check_inputs(x, hint, guidance, mode, base)
        config, trunk = self.config, self.config.flux
        x = pad_to_patches(x, PATCH_SIZE)
        rows, cols = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        img = kernels.linear(pack_latent(x), self.img_in)
        if config.image_input:
            cond = self.input_hint_block(hint.to(img.dtype) * 2.0 - 1.0)
        else:
            cond = pad_to_patches(hint.to(img.dtype), PATCH_SIZE)
        img = img + kernels.linear(pack_latent(cond), self.pos_embed_input)

        vec = modulation_vector(self, trunk.guidance_embed, timesteps, guidance, y, img.dtype)
        txt = kernels.linear(context, self.txt_in)
        if mode is not None:
            token = self.controlnet_mode_embedder(torch.tensor([mode], device=img.device)).to(txt.dtype)
            txt = torch.cat((token.expand(txt.shape[0], 1, -1), txt), dim=1)
        ids = torch.cat((torch.zeros(txt.shape[1], 3, device=x.device), image_position_ids(rows, cols, x.device)))
        rope = rope_angles(ids, trunk.axes_dim, trunk.theta)

        double = []
        for block, projection in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, vec, rope)
            double.append(kernels.linear(img, projection) * strength)
        joint = torch.cat((txt, img), dim=1)
        single = []
        for block, projection in zip(self.single_blocks, self.controlnet_single_blocks):
            joint = block(joint, vec, rope)
            single.append(kernels.linear(joint[:, txt.shape[1]:], projection) * strength)
        return TransformerControl(self._spread(double, base.config.depth),
                                  self._spread(single, base.config.depth_single_blocks))

    def _spread(self, samples: list[Tensor], blocks: int) -> list[Tensor | None]:
        if self.config.image_input:
            return spread(samples, blocks, cyclic=True)
        return spread(samples, blocks, stride=math.ceil(blocks / len(samples)) if samples else 1)

    def _check_inputs(self, x: Tensor, hint: Tensor, guidance: Tensor | None, mode: int | None, base: Flux) -> None:
        config = self.config
        if base.config.hidden_size != config.flux.hidden_size:
            raise ControlShapeError(f"this Flux ControlNet is {config.flux.hidden_size} wide; the model it guides is "
                                    f"{base.config.hidden_size} wide (a ControlNet for another model?)")
        f = config.hint_downscale
        expected = (x.shape[0], config.hint_channels, x.shape[2] * f, x.shape[3] * f)
        if tuple(hint.shape) != expected:
            what = "image" if config.image_input else "latents"
            raise FluxInputError(f"Flux ControlNet hint must be {what} of shape {expected}, got {tuple(hint.shape)}")
        if config.flux.guidance_embed and (guidance is None or tuple(guidance.shape) != (x.shape[0],)):
            raise FluxInputError(f"this Flux ControlNet embeds a guidance scale: pass guidance ({x.shape[0]},)")
        if mode is not None and not 0 <= mode < config.num_modes:
            raise FluxInputError(f"control type {mode} does not fit this Flux ControlNet, which knows "
                                 f"{config.num_modes} types" if config.num_modes else
                                 "this Flux ControlNet is not a union ControlNet: it takes no control type")


# --------------------------------------------------------------------------- layouts and config

_CONTROL_BLOCK_KEY = re.compile(r"^controlnet_(single_)?blocks\.(\d+)\.weight$")


def flux_controlnet_layout(keys: Collection[str]) -> str | None:
    """``original`` (XLabs' files, or either kind in BFL names), ``diffusers`` (``FluxControlNetModel``)
    or None when the keys are no Flux ControlNet."""
    keys = set(keys)
    if "controlnet_blocks.0.weight" not in keys:
        return None
    if {"controlnet_x_embedder.weight", "transformer_blocks.0.attn.to_q.weight"} <= keys:
        return "diffusers"
    if {"double_blocks.0.img_attn.norm.key_norm.scale", "pos_embed_input.weight"} <= keys:
        return "original"
    return None


def flux_controlnet_config_from_shapes(
    shapes: Mapping[str, Sequence[int]], *, axes_dim: Sequence[int] | None = None
) -> FluxControlNetConfig:
    """The :class:`FluxControlNetConfig` of a state dict in this module's names, from names and shapes
    alone (rotary split as :func:`~.flux.flux_config_from_shapes` assumes unless `axes_dim` is given)."""
    if "img_in.weight" not in shapes or "pos_embed_input.weight" not in shapes:
        raise FluxConfigError("Flux ControlNet state dict lacks img_in.weight or pos_embed_input.weight")
    width, packed_in = (int(n) for n in shapes["img_in.weight"])
    # The trunk is Flux's without the final layer: read it as a Flux whose output is as wide as its input.
    trunk = flux_config_from_shapes({**shapes, "final_layer.linear.weight": (packed_in, width)}, axes_dim=axes_dim)
    for single in (False, True):
        blocks = sorted(int(m.group(2)) for key in shapes
                        if (m := _CONTROL_BLOCK_KEY.match(key)) and bool(m.group(1)) == single)
        wanted = trunk.depth_single_blocks if single else trunk.depth
        if blocks != list(range(wanted)):
            kind = "controlnet_single_blocks" if single else "controlnet_blocks"
            raise FluxConfigError(f"Flux ControlNet has {kind} {blocks} for {wanted} transformer blocks")
    image_input = "input_hint_block.0.weight" in shapes
    packed_hint = int(shapes["pos_embed_input.weight"][1])
    if image_input:
        hint_channels = int(shapes["input_hint_block.0.weight"][1])
        if packed_hint != XLABS_HINT_WIDTHS[-1] * PATCH_SIZE**2:
            raise FluxConfigError(f"XLabs Flux ControlNet pos_embed_input takes {packed_hint} channels, expected "
                                  f"{XLABS_HINT_WIDTHS[-1] * PATCH_SIZE**2}")
    else:
        if packed_hint % PATCH_SIZE**2:
            raise FluxConfigError(f"Flux ControlNet pos_embed_input takes {packed_hint} channels, not 2x2 packed")
        hint_channels = packed_hint // PATCH_SIZE**2
    modes = shapes.get("controlnet_mode_embedder.weight")
    return FluxControlNetConfig(trunk, hint_channels, image_input, int(modes[0]) if modes is not None else 0)


# diffusers' names of the ControlNet's own modules -> this module's.
_DIFFUSERS_OWN = {
    "controlnet_x_embedder.": "pos_embed_input.",
    "controlnet_mode_embedder.": "controlnet_mode_embedder.",
    "controlnet_blocks.": "controlnet_blocks.",
    "controlnet_single_blocks.": "controlnet_single_blocks.",
}


def flux_controlnet_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``FluxControlNetModel`` state dict in this module's names: the trunk as Flux's
    (:func:`~.flux.flux_keys_from_diffusers`), ``controlnet_x_embedder`` as ``pos_embed_input``.
    A diffusers export of an XLabs ControlNet (``input_hint_block.*``) raises :class:`~.flux.FluxConfigError`:
    XLabs' own files load as they are."""
    if any(key.startswith("input_hint_block.") for key in state_dict):
        raise FluxConfigError("a diffusers-layout XLabs Flux ControlNet (input_hint_block) is not supported; "
                              "use XLabs' original file")
    own: dict[str, Tensor] = {}
    trunk: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in _DIFFUSERS_OWN if key.startswith(p)), None)
        if prefix is None:
            trunk[key] = tensor
        else:
            own[_DIFFUSERS_OWN[prefix] + key[len(prefix):]] = tensor
    return flux_keys_from_diffusers(trunk) | own
