"""ControlNets for SD3 and SD3.5 (MMDiT): InstantX's joint-attention kind and Stability's SD3.5-large kind.

Both read the control image as VAE latents, add its patch embedding (``pos_embed_input``) to the
image tokens, run a few transformer blocks and project each block's image tokens with a linear
``controlnet_blocks.N``; the outputs are spread over the main model's joint blocks
(:class:`~nodegraph_diffusion.networks.transformer_control.TransformerControl`).

- **joint** (InstantX SD3 ControlNets, diffusers' ``SD3ControlNetModel`` with a text encoder width):
  a small MMDiT of its own (``x_embedder``, ``pos_embed``, ``t_embedder``, ``y_embedder``,
  ``context_embedder``, ``joint_blocks.N`` in SD3's names, every block updating both streams). It
  was trained with a zero pooled vector, so the pooled text it is given is replaced by zeros
  (ComfyUI does the same; diffusers' pipeline zeroes it by the config's
  ``force_zeros_for_pooled_projection``).
- **image-only** (Stability's SD3.5-large canny, depth and blur files): blocks of image tokens alone
  (``transformer_blocks.N`` with ``adaLN_modulation.1``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``)
  on the main model's patch embedding and cropped positions, conditioned on the timestep and the
  real pooled text. Stability's reference code and diffusers take the main model's cropped table;
  ComfyUI computes a different sine/cosine table here, so its results differ slightly.

Module names are the layout ComfyUI converts these files into (SD3's original names plus the
ControlNet's own); Stability's files name the embedders ``time_text_embed.*`` and go through
:func:`sd3_controlnet_keys_from_original`, diffusers' through :func:`sd3_controlnet_keys_from_diffusers`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import kernels
from .mmdit import (
    HEAD_DIM,
    JointBlock,
    MMDiT,
    MMDiTConfigError,
    MMDiTInputError,
    StreamBlock,
    crop_positions,
    mmdit_keys_from_diffusers,
)
from .timestep import timestep_embedding
from .transformer import (
    TIMESTEP_FREQUENCY_DIM,
    EmbedderMLP,
    PatchEmbed,
    layer_norm,
    modulate,
    pad_to_patches,
    sincos_pos_embed_2d,
)
from .transformer_control import ControlShapeError, TransformerControl, spread


@dataclass(frozen=True)
class SD3ControlNetConfig:
    """Architecture of an SD3 ControlNet.

    context_dim: the text-state width of a joint ControlNet; None for the image-only kind, which
    has no text stream and borrows the main model's patch embedding and positions.
    hint_channels: latent channels of the control image (16; InstantX's inpainting ControlNet 17).
    pos_embed_max_size: the side of a joint ControlNet's stored positional grid.
    """

    hidden_size: int
    num_heads: int
    depth: int
    pooled_dim: int
    patch_size: int = 2
    in_channels: int = 16
    hint_channels: int = 16
    context_dim: int | None = None
    pos_embed_max_size: int | None = None
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise MMDiTConfigError(f"ControlNet width {self.hidden_size} does not fit {self.num_heads} heads and "
                                   "2-D sine/cosine positions")
        if self.joint and self.pos_embed_max_size is None:
            raise MMDiTConfigError("a joint SD3 ControlNet needs its positional grid size (pos_embed_max_size)")

    @property
    def joint(self) -> bool:
        """True for the InstantX kind (own patch embedding and text stream)."""
        return self.context_dim is not None


class SD3ControlNet(nn.Module):
    """(latents, control latents, timesteps, text, pooled) -> residuals for an SD3/SD3.5 MMDiT."""

    def __init__(self, config: SD3ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        if config.joint:
            assert config.context_dim is not None and config.pos_embed_max_size is not None  # __post_init__
            self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, width)
            self.register_buffer("pos_embed", sincos_pos_embed_2d(width, config.pos_embed_max_size).unsqueeze(0))
            self.context_embedder = nn.Linear(config.context_dim, width)
            self.joint_blocks = nn.ModuleList(
                JointBlock(width, config.num_heads, config.qk_norm, context_pre_only=False,
                           dual=i in config.dual_attention_layers)
                for i in range(config.depth))
        else:
            self.transformer_blocks = nn.ModuleList(
                StreamBlock(width, config.num_heads, config.qk_norm) for _ in range(config.depth))
        self.t_embedder = EmbedderMLP(TIMESTEP_FREQUENCY_DIM, width)
        self.y_embedder = EmbedderMLP(config.pooled_dim, width)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(config.depth))
        self.pos_embed_input = PatchEmbed(config.patch_size, config.hint_channels, width)

    def forward(
        self,
        x: Tensor,
        hint: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor,
        strength: float = 1.0,
        *,
        base: MMDiT,
    ) -> TransformerControl:
        """x: (B, C, H, W) latents as the main model gets them; hint: (B, hint_channels, H, W) control
        latents; timesteps: (B,) the main model's timesteps (sigma * 1000); context: (B, L, D_text)
        text states (unused by the image-only kind); y: (B, pooled_dim) pooled text (zeroed for the
        joint kind); base: the MMDiT being guided.

        Returns each block's projected image tokens times ``strength``, spread over base's joint blocks
        (block i of N takes output floor(i * M / N) of M; a pre-only last block takes none).
        """
        self._check_inputs(x, hint, base)
        config, p = self.config, self.config.patch_size
        x, hint = pad_to_patches(x, p), pad_to_patches(hint, p)
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        if config.joint:
            tokens = self.x_embedder(x)
            positions = crop_positions(self.pos_embed, config.pos_embed_max_size, p, rows, cols)  # type: ignore[arg-type]
            # Trained on a zero pooled vector (InstantX); the prompt's would shift every modulation.
            y = torch.zeros_like(y)
        else:
            tokens = base.x_embedder(x)
            positions = base.cropped_pos_embed(rows, cols)
        tokens = tokens + positions.to(tokens.dtype) + self.pos_embed_input(hint.to(tokens.dtype))
        c = self.t_embedder(timestep_embedding(timesteps, TIMESTEP_FREQUENCY_DIM).to(tokens.dtype)) + self.y_embedder(y)

        samples = []
        if config.joint:
            text = kernels.linear(context, self.context_embedder)
            last = len(self.joint_blocks) - 1
            for i, block in enumerate(self.joint_blocks):
                tokens, text = block(tokens, text, c, last=i == last)
                samples.append(tokens)
        else:
            for block in self.transformer_blocks:
                tokens = image_block(block, tokens, c)
                samples.append(tokens)
        outputs = [kernels.linear(sample, projection) * strength
                   for projection, sample in zip(self.controlnet_blocks, samples)]
        return TransformerControl(spread(outputs, base.config.depth, skip_last=base.config.last_context_pre_only))

    def _check_inputs(self, x: Tensor, hint: Tensor, base: MMDiT) -> None:
        config = self.config
        if base.config.hidden_size != config.hidden_size or base.config.patch_size != config.patch_size:
            raise ControlShapeError(
                f"this SD3 ControlNet is {config.hidden_size} wide with {config.patch_size}x{config.patch_size} "
                f"patches; the model it guides is {base.config.hidden_size} wide with "
                f"{base.config.patch_size}x{base.config.patch_size} patches (a ControlNet for another SD3 model?)")
        expected = (x.shape[0], config.hint_channels, *x.shape[2:])
        if tuple(hint.shape) != expected:
            raise MMDiTInputError(f"SD3 ControlNet hint must be latents of shape {expected}, got {tuple(hint.shape)}")


def image_block(block: StreamBlock, x: Tensor, c: Tensor) -> Tensor:
    """One adaLN-Zero transformer block on image tokens alone (SD3.5-large ControlNets): self-attention
    then MLP, each gated. x: (B, L, D), c: (B, D) -> (B, L, D)."""
    mods = block.modulations(c)
    x_norm = layer_norm(x)
    attended = kernels.attention(*block.attn.heads(modulate(x_norm, mods[0], mods[1])))
    return block.update(x, x_norm, attended, mods)


# --------------------------------------------------------------------------- layouts and config

_CONTROL_BLOCK_KEY = re.compile(r"^controlnet_blocks\.(\d+)\.weight$")
_JOINT_BLOCK_KEY = re.compile(r"^joint_blocks\.(\d+)\.")
_IMAGE_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")


def sd3_controlnet_layout(keys: Collection[str]) -> str | None:
    """``original`` (Stability's SD3.5 files, or the joint kind in SD3's names), ``diffusers``
    (``SD3ControlNetModel``) or None when the keys are no SD3 ControlNet."""
    keys = set(keys)
    if not {"pos_embed_input.proj.weight", "controlnet_blocks.0.weight"} <= keys:
        return None
    if "transformer_blocks.0.norm1.linear.weight" in keys:
        return "diffusers"
    if {"transformer_blocks.0.adaLN_modulation.1.weight", "joint_blocks.0.x_block.attn.qkv.weight"} & keys:
        return "original"
    return None


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise MMDiTConfigError(f"SD3 ControlNet state dict has no key {key!r}")
    return tuple(int(n) for n in shapes[key])


def sd3_controlnet_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> SD3ControlNetConfig:
    """The :class:`SD3ControlNetConfig` of a state dict in this module's names, from key names and
    shapes alone (64-wide heads, as every SD3 model has)."""
    blocks = sorted(int(m.group(1)) for key in shapes if (m := _CONTROL_BLOCK_KEY.match(key)))
    if not blocks or blocks != list(range(len(blocks))):
        raise MMDiTConfigError(f"SD3 ControlNet controlnet_blocks are not numbered 0..N-1: {blocks}")
    width, hint_channels, patch, _ = _shape(shapes, "pos_embed_input.proj.weight")
    if width % HEAD_DIM:
        raise MMDiTConfigError(f"SD3 ControlNet width {width} is not a multiple of {HEAD_DIM}-wide heads")
    y_out, pooled = _shape(shapes, "y_embedder.mlp.0.weight")
    if y_out != width:
        raise MMDiTConfigError(f"y_embedder.mlp.0.weight has {y_out} outputs, expected the width {width}")
    common = dict(hidden_size=width, num_heads=width // HEAD_DIM, depth=len(blocks), pooled_dim=pooled,
                  patch_size=patch, hint_channels=hint_channels)
    if "context_embedder.weight" not in shapes:
        if pooled == width:
            # ComfyUI's "double y" form: a vector made from the main model's pooled embedding. No file of it
            # is known to exist, and neither diffusers nor Stability's reference code build it.
            raise MMDiTConfigError("an SD3 ControlNet whose y_embedder reads the main model's pooled embedding "
                                   f"({width} -> {width}) is not supported")
        image_only = sorted({int(m.group(1)) for key in shapes if (m := _IMAGE_BLOCK_KEY.match(key))})
        if image_only != blocks:
            raise MMDiTConfigError(f"SD3 ControlNet has transformer_blocks {image_only} but controlnet_blocks {blocks}")
        return SD3ControlNetConfig(**common, in_channels=hint_channels)  # type: ignore[arg-type]
    joint = sorted({int(m.group(1)) for key in shapes if (m := _JOINT_BLOCK_KEY.match(key))})
    if joint != blocks:
        raise MMDiTConfigError(f"SD3 ControlNet has joint_blocks {joint} but controlnet_blocks {blocks}")
    positions = _shape(shapes, "pos_embed")[1]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise MMDiTConfigError(f"SD3 ControlNet pos_embed has {positions} positions, not a square grid")
    return SD3ControlNetConfig(
        **common,  # type: ignore[arg-type]
        in_channels=_shape(shapes, "x_embedder.proj.weight")[1],
        context_dim=_shape(shapes, "context_embedder.weight")[1],
        pos_embed_max_size=grid,
        qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
        dual_attention_layers=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
    )


# --------------------------------------------------------------------------- key mappings

# Stability's SD3.5 ControlNet files name the embedders as diffusers does.
_ORIGINAL_EMBEDDERS = {
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
}
# The ControlNet's own modules, named alike in every layout.
_CONTROLNET_OWN = ("controlnet_blocks.", "pos_embed_input.")
# Stability's files record which control image they were trained on (0 blur, 1 canny, 2 depth).
CONTROL_TYPE_KEY = "control_type"


def sd3_controlnet_keys_from_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Stability SD3.5 ControlNet state dict in this module's names: the embedders renamed,
    ``control_type`` left out (read it with :data:`CONTROL_TYPE_KEY`); every other key as it is."""
    converted: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key == CONTROL_TYPE_KEY:
            continue
        prefix = next((p for p in _ORIGINAL_EMBEDDERS if key.startswith(p)), None)
        converted[key if prefix is None else _ORIGINAL_EMBEDDERS[prefix] + key[len(prefix):]] = tensor
    return converted


_DIFFUSERS_IMAGE_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.x_block\.(.+)$")


def sd3_controlnet_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``SD3ControlNetModel`` state dict in this module's names.

    The transformer part is renamed as the MMDiT's is (:func:`~.mmdit.mmdit_keys_from_diffusers`); in
    the image-only kind (``SD3SingleTransformerBlock``) the blocks' image stream becomes
    ``transformer_blocks.N``. Unknown keys raise :class:`~.mmdit.MMDiTConfigError`.
    """
    own = {k: v for k, v in state_dict.items() if k.startswith(_CONTROLNET_OWN)}
    converted = mmdit_keys_from_diffusers({k: v for k, v in state_dict.items() if k not in own})
    if "context_embedder.weight" not in converted:
        image_only: dict[str, Tensor] = {}
        for key, tensor in converted.items():
            match = _DIFFUSERS_IMAGE_BLOCK.match(key)
            if key.startswith("joint_blocks.") and not match:
                raise MMDiTConfigError(f"diffusers SD3 ControlNet without text has a text-stream key: {key!r}")
            image_only[f"transformer_blocks.{match.group(1)}.{match.group(2)}" if match else key] = tensor
        converted = image_only
    return converted | own
