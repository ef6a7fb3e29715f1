"""MMDiT, the joint text/image diffusion transformer of Stable Diffusion 3 and 3.5, in SAI's key layout.

Module names follow the original single files (under ``model.diffusion_model.``): ``x_embedder.proj``,
``pos_embed``, ``t_embedder.mlp.0/2``, ``y_embedder.mlp.0/2``, ``context_embedder``,
``joint_blocks.N.{x_block,context_block}.{adaLN_modulation.1, attn.qkv, attn.ln_q, attn.ln_k,
attn.proj, mlp.fc1, mlp.fc2}``, ``joint_blocks.N.x_block.attn2.*`` in the dual-attention (MMDiT-X)
layers of SD3.5, ``final_layer.{adaLN_modulation.1, linear}``. The last block's context stream is
"pre-only": it feeds keys and values to the joint attention and is not updated, so it has no
``attn.proj`` and no ``mlp``.

Each block keeps two streams, image tokens and text tokens, with their own weights; they meet in one
attention over the concatenated sequence. Every stream is modulated (adaLN) by one vector
``c = t_embedder(timestep) + y_embedder(pooled text)``. The output is the flow-matching velocity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import kernels
from .timestep import timestep_embedding
from .transformer import (
    MLP_RATIO,
    TIMESTEP_FREQUENCY_DIM,
    EmbedderMLP,
    FinalLayer,
    FusedQKVAttention,
    Mlp,
    PatchEmbed,
    layer_norm,
    modulate,
    modulated_residual,
    pad_to_patches,
    sincos_pos_embed_2d,
    unpatchify,
)
from .transformer_control import TransformerControl

# Head counts leave no trace in the weights. The original ties width to depth (64 * depth wide,
# depth heads), i.e. always 64-wide heads; config-from-shapes assumes that.
HEAD_DIM = 64


class MMDiTConfigError(ValueError):
    """An MMDiT config is inconsistent, or a state dict's keys/shapes do not fit the MMDiT layout."""


class MMDiTInputError(ValueError):
    """The inputs of an MMDiT forward do not fit the model (names what was expected)."""


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of an MMDiT. Defaults are SD3-medium's.

    ``pos_embed_max_size`` is the side of the stored square positional-embedding grid (in patches);
    latents up to that many patches per side are accepted. ``dual_attention_layers`` lists the
    blocks whose image stream has a second, image-only self-attention (SD3.5's MMDiT-X).
    ``last_context_pre_only``: the last block's text stream has no output projection and MLP (true
    of every released SD3 model).
    """

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    pos_embed_max_size: int = 192
    context_dim: int = 4096
    pooled_dim: int = 2048
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    last_context_pre_only: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise MMDiTConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise MMDiTConfigError(f"hidden_size {self.hidden_size} is not a multiple of 4 (2-D sine/cosine positions)")
        outside = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if outside:
            raise MMDiTConfigError(f"dual_attention_layers {outside} are outside the {self.depth} blocks")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------- blocks


class StreamBlock(nn.Module):
    """One stream's half of a joint block (``x_block`` or ``context_block``): its modulation, its
    attention projections and its MLP.

    The modulation vector splits into (shift, scale, gate) for the attention and for the MLP, plus
    a third triple for ``attn2`` in a dual-attention block; a pre-only block has (shift, scale) only.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False, dual: bool = False) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.num_mods = 2 if pre_only else 9 if dual else 6
        # Index 0 is the parameter-free SiLU, keeping the original's ``adaLN_modulation.1`` key.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_mods * dim))
        self.attn = FusedQKVAttention(dim, num_heads, qk_norm, pre_only=pre_only)
        self.attn2 = FusedQKVAttention(dim, num_heads, qk_norm) if dual else None
        self.mlp = None if pre_only else Mlp(dim, MLP_RATIO * dim, dim)

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        """c: (B, D) -> num_mods tensors of (B, D)."""
        return self.adaLN_modulation(c).chunk(self.num_mods, dim=1)

    def update(self, x: Tensor, x_norm: Tensor, attended: Tensor, mods: Sequence[Tensor]) -> Tensor:
        """The residual updates after the joint attention.

        x, x_norm (x layer-normed before the attention): (B, L, D); attended: this stream's part
        of the joint attention, heads side by side (B, L, D) -> (B, L, D).
        """
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_attn[:, None] * self.attn.out(attended)
        if self.attn2 is not None:
            # The second attention reads the same normalised input as the first, not the updated x.
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2[:, None] * self.attn2(modulate(x_norm, shift2, scale2))
        return modulated_residual(x, self.mlp, shift_mlp, scale_mlp, gate_mlp)


class JointBlock(nn.Module):
    """Image and text streams attending jointly over their concatenated tokens."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, context_pre_only: bool, dual: bool) -> None:
        super().__init__()
        self.context_block = StreamBlock(dim, num_heads, qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(dim, num_heads, qk_norm, dual=dual)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, last: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, Lx, D) image tokens, context: (B, Lc, D) text tokens, c: (B, D) ->
        (x, context) updated; context is None after the last block (``last``), where nothing reads it.
        """
        x_mods = self.x_block.modulations(c)
        context_mods = self.context_block.modulations(c)
        x_norm = layer_norm(x)
        context_norm = layer_norm(context)
        x_qkv = self.x_block.attn.heads(modulate(x_norm, x_mods[0], x_mods[1]))
        context_qkv = self.context_block.attn.heads(modulate(context_norm, context_mods[0], context_mods[1]))
        # Text first, as in the original; the order does not change the result (no positions here).
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(context_qkv, x_qkv))
        attended = kernels.attention(q, k, v)
        context_attended, x_attended = attended.split([context.shape[1], x.shape[1]], dim=1)

        x = self.x_block.update(x, x_norm, x_attended, x_mods)
        if last or self.context_block.pre_only:
            return x, None
        return x, self.context_block.update(context, context_norm, context_attended, context_mods)


# --------------------------------------------------------------------------- the model


class MMDiT(nn.Module):
    """The SD3 / SD3.5 denoiser: latent, timestep, text tokens and pooled text -> velocity."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, width)
        # Fixed, not trained, but stored in every file (a persistent buffer, as in the original).
        grid = config.pos_embed_max_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, grid).unsqueeze(0))
        self.t_embedder = EmbedderMLP(TIMESTEP_FREQUENCY_DIM, width)
        self.y_embedder = EmbedderMLP(config.pooled_dim, width)
        self.context_embedder = nn.Linear(config.context_dim, width)
        last = config.depth - 1
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                width,
                config.num_heads,
                config.qk_norm,
                context_pre_only=config.last_context_pre_only and i == last,
                dual=i in config.dual_attention_layers,
            )
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(width, config.patch_size, config.out_channels)

    def cropped_pos_embed(self, rows: int, cols: int) -> Tensor:
        """The centre rows x cols of the stored positional grid: (1, rows * cols, D)."""
        return crop_positions(self.pos_embed, self.config.pos_embed_max_size, self.config.patch_size, rows, cols)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor,
                control: TransformerControl | None = None) -> Tensor:
        """x: (B, C, H, W) latent; timesteps: (B,) raw model timesteps (SD3: sigma * 1000);
        context: (B, L, context_dim) text tokens; y: (B, pooled_dim) pooled text -> (B, out_channels, H, W).
        control: ControlNet residuals added to the image tokens after each joint block.

        H and W need not be multiples of the patch size: the latent is padded up (circularly, as
        ComfyUI does) and the output cropped back.
        """
        self._check_inputs(x, timesteps, context, y)
        if control is not None:
            control.check_fits(self.config.depth)
        height, width = x.shape[-2:]
        p = self.config.patch_size
        x = pad_to_patches(x, p)
        rows, cols = x.shape[-2] // p, x.shape[-1] // p

        tokens = self.x_embedder(x) + self.cropped_pos_embed(rows, cols).to(x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps, TIMESTEP_FREQUENCY_DIM).to(tokens.dtype))
        c = c + self.y_embedder(y)
        text = kernels.linear(context, self.context_embedder)
        last = len(self.joint_blocks) - 1
        for i, block in enumerate(self.joint_blocks):
            tokens, text = block(tokens, text, c, last=i == last)
            if control is not None and control.double[i] is not None:
                tokens = tokens + control.double[i]
        return unpatchify(self.final_layer(tokens, c), rows, cols, p, height, width)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise MMDiTInputError(f"x: expected (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        if timesteps.shape != (batch,):
            raise MMDiTInputError(f"timesteps: expected ({batch},), got {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            raise MMDiTInputError(f"context: expected ({batch}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if y.shape != (batch, cfg.pooled_dim):
            raise MMDiTInputError(f"y: expected ({batch}, {cfg.pooled_dim}), got {tuple(y.shape)}")


def crop_positions(table: Tensor, grid: int, patch_size: int, rows: int, cols: int) -> Tensor:
    """The centre rows x cols of a stored square positional grid. table: (1, grid * grid, D) ->
    (1, rows * cols, D); raises MMDiTInputError for a latent larger than the grid."""
    if rows > grid or cols > grid:
        raise MMDiTInputError(
            f"a latent of {rows}x{cols} patches is larger than this model's positional grid of "
            f"{grid}x{grid} patches ({grid * patch_size} latent pixels a side)"
        )
    top, left = (grid - rows) // 2, (grid - cols) // 2
    cropped = table.view(grid, grid, -1)[top : top + rows, left : left + cols]
    return cropped.reshape(1, rows * cols, -1)


# --------------------------------------------------------------------------- config from shapes

_JOINT_BLOCK_KEY = re.compile(r"^joint_blocks\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise MMDiTConfigError(f"MMDiT state dict has no key {key!r}; not an SD3-layout MMDiT")
    return tuple(int(n) for n in shapes[key])


def is_mmdit_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys (without the ``model.diffusion_model.`` prefix) are an SD3-layout MMDiT."""
    keys = set(keys)
    return {"x_embedder.proj.weight", "joint_blocks.0.x_block.attn.qkv.weight", "final_layer.linear.weight"} <= keys


def mmdit_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> MMDiTConfig:
    """The :class:`MMDiTConfig` of an SD3-layout state dict, from key names and shapes alone.

    ``shapes`` maps keys without the ``model.diffusion_model.`` prefix to tensor shapes (a
    safetensors header is enough). The head count assumes 64-wide heads (:data:`HEAD_DIM`), as
    every original model has.
    """
    hidden_size, in_channels, patch_size, patch_size_w = _shape(shapes, "x_embedder.proj.weight")
    if patch_size != patch_size_w:
        raise MMDiTConfigError(f"x_embedder.proj.weight has non-square patches {patch_size}x{patch_size_w}")
    if hidden_size % HEAD_DIM:
        raise MMDiTConfigError(
            f"width {hidden_size} (x_embedder.proj.weight) is not a multiple of {HEAD_DIM}-wide heads"
        )

    positions = _shape(shapes, "pos_embed")[1]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise MMDiTConfigError(f"pos_embed has {positions} positions, not a square grid")

    frequency_dim = _shape(shapes, "t_embedder.mlp.0.weight")[1]
    if frequency_dim != TIMESTEP_FREQUENCY_DIM:
        raise MMDiTConfigError(
            f"t_embedder.mlp.0.weight reads {frequency_dim} frequencies, expected {TIMESTEP_FREQUENCY_DIM}"
        )

    out_features = _shape(shapes, "final_layer.linear.weight")[0]
    if out_features % (patch_size * patch_size):
        raise MMDiTConfigError(
            f"final_layer.linear.weight has {out_features} outputs, not a multiple of {patch_size}x{patch_size}"
        )

    blocks = sorted({int(m.group(1)) for key in shapes if (m := _JOINT_BLOCK_KEY.match(key))})
    if not blocks:
        raise MMDiTConfigError("MMDiT state dict has no joint_blocks.* keys; not an SD3-layout MMDiT")
    if blocks != list(range(len(blocks))):
        raise MMDiTConfigError(f"joint_blocks indices are not consecutive: {blocks}")
    depth = len(blocks)
    if "joint_blocks.0.x_block.attn.ln_q.bias" in shapes:
        raise MMDiTConfigError("joint_blocks.0.x_block.attn.ln_q has a bias: LayerNorm qk-norm is not supported")
    _shape(shapes, f"joint_blocks.{depth - 1}.context_block.attn.qkv.weight")

    return MMDiTConfig(
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=out_features // (patch_size * patch_size),
        depth=depth,
        hidden_size=hidden_size,
        num_heads=hidden_size // HEAD_DIM,
        pos_embed_max_size=grid,
        context_dim=_shape(shapes, "context_embedder.weight")[1],
        pooled_dim=_shape(shapes, "y_embedder.mlp.0.weight")[1],
        qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
        dual_attention_layers=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        last_context_pre_only=f"joint_blocks.{depth - 1}.context_block.attn.proj.weight" not in shapes,
    )


# --------------------------------------------------------------------------- diffusers key mapping

# diffusers' SD3Transformer2DModel names -> the original's, for the modules renamed one to one.
_DIFFUSERS_TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}
_DIFFUSERS_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # halves swapped when pre-only
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# Separate q, k, v projections in diffusers, one fused qkv (rows q, k, v) in the original.
_DIFFUSERS_FUSED_QKV = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv",
}
_DIFFUSERS_QKV_PART = {part: (group, index) for group in _DIFFUSERS_FUSED_QKV for index, part in enumerate(group)}
_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _swap_halves(tensor: Tensor) -> Tensor:
    """(scale, shift) rows <-> (shift, scale) rows of a continuous-adaLN projection."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def is_diffusers_mmdit_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are a diffusers ``SD3Transformer2DModel``."""
    keys = set(keys)
    return {"pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight", "proj_out.weight"} <= keys


def mmdit_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in the original SD3 layout (no prefix).

    q/k/v are fused into ``qkv``; the final layer's modulation, and the pre-only last block's
    context modulation, have their (scale, shift) halves swapped to the original's (shift, scale).
    A key the mapping does not know raises :class:`MMDiTConfigError` rather than being dropped.
    """
    converted: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[int, Tensor]] = {}
    pre_only_blocks = set()
    for key, tensor in state_dict.items():
        if key == "pos_embed.pos_embed":
            converted["pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        if module in _DIFFUSERS_TOP_LEVEL:
            converted[f"{_DIFFUSERS_TOP_LEVEL[module]}.{param}"] = tensor
            continue
        match = _DIFFUSERS_BLOCK_KEY.match(key)
        if not match:
            raise MMDiTConfigError(f"diffusers SD3 state dict: no original-layout name for {key!r}")
        block, module, param = match.groups()
        prefix = f"joint_blocks.{block}."
        if module in _DIFFUSERS_BLOCK:
            converted[prefix + f"{_DIFFUSERS_BLOCK[module]}.{param}"] = tensor
        elif module in _DIFFUSERS_QKV_PART:
            group, index = _DIFFUSERS_QKV_PART[module]
            qkv_parts.setdefault(prefix + f"{_DIFFUSERS_FUSED_QKV[group]}.{param}", {})[index] = tensor
        else:
            raise MMDiTConfigError(f"diffusers SD3 state dict: no original-layout name for {key!r}")
        if module == "norm1_context.linear" and f"transformer_blocks.{block}.attn.to_add_out.weight" not in state_dict:
            pre_only_blocks.add(prefix + f"context_block.adaLN_modulation.1.{param}")

    for fused_key, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            raise MMDiTConfigError(f"diffusers SD3 state dict: {fused_key!r} lacks one of its q/k/v parts")
        converted[fused_key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for key in ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", *pre_only_blocks):
        if key in converted:
            converted[key] = _swap_halves(converted[key])
    return converted
