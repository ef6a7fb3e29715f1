"""PixArt-α and PixArt-Σ, the T5-conditioned DiT, in the original (PixArt-alpha/PixArt-sigma) key layout.

Module names equal the keys of the released ``PixArt-XL-2-*.pth`` / ``PixArt-Sigma-XL-2-*.pth``
state dicts: ``x_embedder.proj``, ``t_embedder.mlp.0/2``, ``t_block.1``, ``y_embedder.y_proj.fc1/fc2``,
``y_embedder.y_embedding`` (the learned null caption), ``csize_embedder.mlp.0/2`` and
``ar_embedder.mlp.0/2`` (α-1024-MS only), ``blocks.N.{scale_shift_table, attn.qkv, attn.proj,
cross_attn.q_linear, cross_attn.kv_linear, cross_attn.proj, mlp.fc1, mlp.fc2}``,
``final_layer.{scale_shift_table, linear}``, and in some files ``pos_embed``. Diffusers
``PixArtTransformer2DModel`` weights go through :func:`pixart_keys_from_diffusers`.

Data flow: DiT blocks (see :mod:`.dit`) with two changes. adaLN-single: the timestep embedding ``t``
(plus, with micro-conditions, embeddings of the image size and aspect ratio) goes through one shared
``t_block`` to six width-vectors; each block adds its own learned ``scale_shift_table`` to get its
shift/scale/gate for attention and MLP; the final layer adds its table to ``t`` itself. And a
cross-attention to the projected T5 states sits between self-attention and MLP (no norm, no gate),
masked to the prompt's real tokens.

What differs between releases, and whether the weights show it:

=====================  =========================================  ==========================
fact                   values                                     in the shapes?
=====================  =========================================  ==========================
micro-conditions       α 1024-MS: image size + aspect ratio       yes (``csize_embedder``)
T5 token length        α 120, Σ 300                               rows of ``y_embedding``
trained latent side    256 px: 32, 512: 64, 1024: 128, 2048: 256   ``pos_embed`` if stored
position interp.       side / 64: 0.5, 1, 2, 4                    no (follows the side)
VAE                    α: SD's (0.18215), Σ: SDXL's (0.13025)       no
=====================  =========================================  ==========================

Output: learned sigma, 2C channels, eps first (as DiT); trained on the linear beta schedule (1e-4 to
0.02, 1000 steps), timesteps 0..999 as they are.

Positions: sine/cosine of a rows x cols grid, row i at ``i * base / rows / interpolation_scale``
(columns alike) with ``base = sample_size / patch_size``; made from the config for each grid met.
A file's stored ``pos_embed`` (the table at the trained size) is checked against the config's grid
on loading and dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import kernels
from .dit import check_stored_positions, num_heads_for_width
from .timestep import timestep_embedding
from .transformer import (
    MLP_RATIO,
    TIMESTEP_FREQUENCY_DIM,
    EmbedderMLP,
    FusedQKVAttention,
    Mlp,
    PatchEmbed,
    SincosPositions,
    layer_norm,
    modulate,
    modulated_residual,
    pad_to_patches,
    unpatchify,
)

# Every released PixArt model uses the SD-style f8 VAE: micro-conditions default to the image size
# a latent decodes to.
VAE_SCALE = 8
T5_WIDTH = 4096
ALPHA_TOKENS = 120
SIGMA_TOKENS = 300
# Latent side whose positions need no interpolation (512 px); PixArt's inference scripts use
# interpolation_scale = side / 64 for every released size.
_UNINTERPOLATED_SIDE = 64


def pixart_interpolation_scale(sample_size: int) -> float:
    """The position interpolation scale of a PixArt model trained at this latent side (side / 64)."""
    return sample_size / _UNINTERPOLATED_SIDE


class PixArtConfigError(ValueError):
    """A PixArt config is inconsistent, or a state dict's keys/shapes do not fit the PixArt layout."""


class PixArtMissingKeyError(PixArtConfigError):
    """A state dict lacks a key the PixArt layout needs; ``key`` names it."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"PixArt state dict has no {key!r}; is it a PixArt-α/Σ transformer in the original layout?")


class PixArtInputError(ValueError):
    """The inputs of a PixArt forward do not fit the model (names what was expected)."""


@dataclass(frozen=True)
class PixArtConfig:
    """Architecture of a PixArt-α/Σ transformer. Defaults are PixArt-α XL/2 1024-MS's.

    ``micro_conditions``: the timestep embedding also carries the image size and aspect ratio
    (α 1024-MS). ``max_token_length``: T5 tokens a prompt is padded/truncated to in training (α
    120, Σ 300). ``null_caption``: the weights hold the learned unconditional caption
    ``y_embedder.y_embedding`` of that many tokens (original files do, diffusers-converted ones
    do not). ``sample_size``: the trained latent side (1024 px / 8 = 128); positions span its
    ``sample_size / patch_size`` grid, stretched by ``interpolation_scale`` (default
    :func:`pixart_interpolation_scale` of the side: 2 at 1024 px).
    """

    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    caption_dim: int = T5_WIDTH
    learn_sigma: bool = True
    micro_conditions: bool = True
    max_token_length: int = ALPHA_TOKENS
    null_caption: bool = True
    sample_size: int = 128
    interpolation_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise PixArtConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise PixArtConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of 4 (2-D sine/cosine positions)"
            )
        if self.micro_conditions and self.hidden_size % 3:
            raise PixArtConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of 3: micro-conditions embed height, width and "
                "aspect ratio in a third of the width each"
            )
        if self.sample_size % self.patch_size:
            raise PixArtConfigError(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        if not self.interpolation_scale > 0:
            raise PixArtConfigError(f"interpolation_scale must be positive, got {self.interpolation_scale}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def base_size(self) -> int:
        """Patches a side of the trained latent: the span every positional grid is fitted to."""
        return self.sample_size // self.patch_size


# --------------------------------------------------------------------------- blocks


class CaptionEmbedder(nn.Module):
    """Projects T5 states to the width (``y_proj``); holds the learned null caption when present."""

    def __init__(self, caption_dim: int, hidden_size: int, null_tokens: int | None) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_dim, hidden_size, hidden_size)
        self.y_embedding = nn.Parameter(torch.empty(null_tokens, caption_dim)) if null_tokens else None

    def forward(self, context: Tensor) -> Tensor:
        """context: (B, L, caption_dim) -> (B, L, D)."""
        return self.y_proj(context)


class CrossAttention(nn.Module):
    """Image tokens attending to the caption tokens: ``q_linear``, fused ``kv_linear`` (rows k, v), ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B, N, D), context: (B, L, D), mask: (B, 1, 1, L) bool (True = attend) or None -> (B, N, D)."""
        batch, tokens, _ = x.shape
        q = kernels.linear(x, self.q_linear).view(batch, tokens, self.num_heads, self.head_dim)
        k, v = kernels.linear(context, self.kv_linear).view(batch, -1, 2, self.num_heads, self.head_dim).unbind(2)
        if mask is None:
            return kernels.linear(kernels.attention(q, k, v), self.proj)
        # A masked-out caption token gets no weight, so each sample attending to its kept tokens alone
        # is the same softmax, in the layout kernels.attention takes (it has no mask).
        keep = mask.reshape(batch, -1)
        attended = [kernels.attention(q[i : i + 1], k[i : i + 1, keep[i]], v[i : i + 1, keep[i]]) for i in range(batch)]
        return kernels.linear(torch.cat(attended), self.proj)


class PixArtBlock(nn.Module):
    """Self-attention (adaLN-single), cross-attention to the caption, MLP (adaLN-single)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))
        self.attn = FusedQKVAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, MLP_RATIO * dim, dim)

    def forward(self, x: Tensor, t_mod: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B, N, D); t_mod: (B, 6, D), the shared ``t_block`` output; context: (B, L, D) -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + t_mod).unbind(1)
        x = modulated_residual(x, self.attn, shift_msa, scale_msa, gate_msa)
        x = x + self.cross_attn(x, context, mask)
        return modulated_residual(x, self.mlp, shift_mlp, scale_mlp, gate_mlp)


class PixArtFinalLayer(nn.Module):
    """LayerNorm modulated by the timestep embedding plus a learned (shift, scale) table, then linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(2, hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, N, D), t: (B, D) the embedded timestep (before ``t_block``) -> (B, N, p * p * out_channels)."""
        shift, scale = (self.scale_shift_table + t[:, None]).unbind(1)
        return kernels.linear(modulate(layer_norm(x), shift, scale), self.linear)


# --------------------------------------------------------------------------- the model


class PixArt(nn.Module):
    """The PixArt-α/Σ denoiser: latent, timestep and T5 caption states -> eps (and variance)."""

    def __init__(self, config: PixArtConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, width)
        self.t_embedder = EmbedderMLP(TIMESTEP_FREQUENCY_DIM, width)
        # Index 0 is the parameter-free SiLU, keeping the original's ``t_block.1`` key.
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.y_embedder = CaptionEmbedder(
            config.caption_dim, width, config.max_token_length if config.null_caption else None
        )
        if config.micro_conditions:
            self.csize_embedder = EmbedderMLP(TIMESTEP_FREQUENCY_DIM, width // 3)
            self.ar_embedder = EmbedderMLP(TIMESTEP_FREQUENCY_DIM, width // 3)
        self.blocks = nn.ModuleList(PixArtBlock(width, config.num_heads) for _ in range(config.depth))
        self.final_layer = PixArtFinalLayer(width, config.patch_size, config.out_channels)
        self.positions = SincosPositions(width, config.base_size, config.interpolation_scale)
        check_stored_positions(self, config.base_size, PixArtConfigError)
        self._init_tables()

    def _init_tables(self) -> None:
        # The original's initialisation of the learned tables (others keep torch's defaults); a
        # loaded file replaces them all.
        with torch.no_grad():
            for block in self.blocks:
                block.scale_shift_table.normal_(std=self.config.hidden_size**-0.5)
            self.final_layer.scale_shift_table.normal_(std=self.config.hidden_size**-0.5)
            if self.y_embedder.y_embedding is not None:
                self.y_embedder.y_embedding.normal_(std=self.config.caption_dim**-0.5)

    def null_context(self, batch: int) -> Tensor:
        """The learned unconditional caption, the original's negative for classifier-free guidance:
        (batch, max_token_length, caption_dim), used with no mask (every token attended)."""
        if self.y_embedder.y_embedding is None:
            raise PixArtInputError(
                "these PixArt weights hold no null caption (y_embedder.y_embedding; diffusers-format weights "
                "drop it): encode an empty prompt with T5 as the negative instead"
            )
        return self.y_embedder.y_embedding.expand(batch, -1, -1)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W) latent; timesteps: (B,) training timesteps (0..999); context: (B, L,
        caption_dim) T5 states; context_mask: (B, L), nonzero/True for the tokens to attend (the
        prompt and its EOS), or None for all -> (B, out_channels, H, W): eps, then the variance
        interpolation.

        With micro-conditions: resolution (B, 2), the image's (height, width) in pixels, and
        aspect_ratio (B,), height / width; they default to the image the latent decodes to
        (``VAE_SCALE * (H, W)`` and H / W), which is what the reference pipeline passes. H and W need
        not be multiples of the patch size: the latent is padded up circularly and cropped back.
        """
        self._check_inputs(x, timesteps, context, context_mask, resolution, aspect_ratio)
        batch = x.shape[0]
        height, width = x.shape[-2:]
        p = self.config.patch_size
        x = pad_to_patches(x, p)
        rows, cols = x.shape[-2] // p, x.shape[-1] // p

        tokens = self.x_embedder(x) + self.positions(rows, cols, x.device).to(x.dtype)
        t = self.t_embedder(timestep_embedding(timesteps, TIMESTEP_FREQUENCY_DIM).to(tokens.dtype))
        if self.config.micro_conditions:
            if resolution is None:
                resolution = torch.tensor([[VAE_SCALE * height, VAE_SCALE * width]], device=x.device).expand(batch, 2)
            if aspect_ratio is None:
                aspect_ratio = torch.full((batch,), height / width, device=x.device)
            # Height and width each get their own third of the width; the aspect ratio the last.
            size = self.csize_embedder(self._frequencies(resolution.reshape(-1), tokens.dtype)).reshape(batch, -1)
            ratio = self.ar_embedder(self._frequencies(aspect_ratio.reshape(-1), tokens.dtype))
            t = t + torch.cat([size, ratio], dim=1)
        t_mod = self.t_block(t).view(batch, 6, -1)
        caption = self.y_embedder(context.to(tokens.dtype))
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]

        for block in self.blocks:
            tokens = block(tokens, t_mod, caption, mask)
        return unpatchify(self.final_layer(tokens, t), rows, cols, p, height, width)

    @staticmethod
    def _frequencies(values: Tensor, dtype: torch.dtype) -> Tensor:
        return timestep_embedding(values, TIMESTEP_FREQUENCY_DIM).to(dtype)

    def _check_inputs(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        context_mask: Tensor | None,
        resolution: Tensor | None,
        aspect_ratio: Tensor | None,
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise PixArtInputError(f"x: expected (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        if timesteps.shape != (batch,):
            raise PixArtInputError(f"timesteps: expected ({batch},), got {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.caption_dim:
            raise PixArtInputError(
                f"context: expected ({batch}, L, {cfg.caption_dim}) T5 states, got {tuple(context.shape)}"
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise PixArtInputError(
                    f"context_mask: expected {tuple(context.shape[:2])} like the context, "
                    f"got {tuple(context_mask.shape)}"
                )
            # A row with no token to attend has no defined attention (NaN); the original never makes one.
            if not bool(context_mask.bool().any(dim=1).all()):
                raise PixArtInputError("context_mask: every sample needs at least one token to attend (its EOS)")
        if not cfg.micro_conditions:
            if resolution is not None or aspect_ratio is not None:
                raise PixArtInputError("resolution/aspect_ratio given, but this PixArt has no micro-conditions")
            return
        if resolution is not None and resolution.shape != (batch, 2):
            raise PixArtInputError(
                f"resolution: expected ({batch}, 2) (height, width) in pixels, got {tuple(resolution.shape)}"
            )
        if aspect_ratio is not None and aspect_ratio.reshape(-1).shape != (batch,):
            raise PixArtInputError(f"aspect_ratio: expected ({batch},) height / width, got {tuple(aspect_ratio.shape)}")


# --------------------------------------------------------------------------- config from shapes

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise PixArtMissingKeyError(key)
    return tuple(int(n) for n in shapes[key])


def is_pixart_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys (no prefix) are a PixArt-α/Σ transformer in the original layout."""
    keys = set(keys)
    return {
        "x_embedder.proj.weight",
        "t_block.1.weight",
        "y_embedder.y_proj.fc1.weight",
        "blocks.0.cross_attn.q_linear.weight",
        "final_layer.scale_shift_table",
    } <= keys


def pixart_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    *,
    sample_size: int | None = None,
    interpolation_scale: float | None = None,
    max_token_length: int | None = None,
    num_heads: int | None = None,
) -> PixArtConfig:
    """The :class:`PixArtConfig` of an original-layout state dict, from key names and shapes alone.

    Read off the shapes: width, depth, patch, channels, learned sigma, micro-conditions
    (``csize_embedder``), the null caption and its token length (``y_embedder.y_embedding``: 120
    α, 300 Σ) and the trained latent side (``pos_embed``, when stored). What the weights do not
    show takes the arguments, else documented defaults: ``sample_size`` 128 (the 1024 px models),
    ``interpolation_scale`` :func:`pixart_interpolation_scale` of the side, ``max_token_length``
    120 with micro-conditions (only α has them) else 300 (Σ; α 256/512 files in diffusers format
    look the same and need 120 passed), ``num_heads`` per :func:`~.dit.num_heads_for_width`.
    """
    hidden_size, in_channels, patch_size, patch_size_w = _shape(shapes, "x_embedder.proj.weight")
    if patch_size != patch_size_w:
        raise PixArtConfigError(f"x_embedder.proj.weight has non-square patches {patch_size}x{patch_size_w}")
    frequency_dim = _shape(shapes, "t_embedder.mlp.0.weight")[1]
    if frequency_dim != TIMESTEP_FREQUENCY_DIM:
        raise PixArtConfigError(
            f"t_embedder.mlp.0.weight reads {frequency_dim} frequencies, expected {TIMESTEP_FREQUENCY_DIM}"
        )
    if _shape(shapes, "t_block.1.weight") != (6 * hidden_size, hidden_size):
        raise PixArtConfigError(
            f"t_block.1.weight is {tuple(shapes['t_block.1.weight'])}, expected {(6 * hidden_size, hidden_size)}"
        )
    caption_dim = _shape(shapes, "y_embedder.y_proj.fc1.weight")[1]
    _shape(shapes, "final_layer.scale_shift_table")

    out_features = _shape(shapes, "final_layer.linear.weight")[0]
    out_channels, rest = divmod(out_features, patch_size * patch_size)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise PixArtConfigError(
            f"final_layer.linear.weight has {out_features} outputs: not {patch_size}x{patch_size} patches of "
            f"{in_channels} or {2 * in_channels} channels"
        )

    micro_conditions = "csize_embedder.mlp.0.weight" in shapes
    if micro_conditions:
        _shape(shapes, "ar_embedder.mlp.0.weight")

    null_caption = "y_embedder.y_embedding" in shapes
    if null_caption:
        stored_tokens = _shape(shapes, "y_embedder.y_embedding")[0]
        if max_token_length is not None and max_token_length != stored_tokens:
            raise PixArtConfigError(
                f"max_token_length {max_token_length} was given, "
                f"but y_embedder.y_embedding holds {stored_tokens} tokens"
            )
        max_token_length = stored_tokens
    elif max_token_length is None:
        max_token_length = ALPHA_TOKENS if micro_conditions else SIGMA_TOKENS

    if "pos_embed" in shapes:
        positions = _shape(shapes, "pos_embed")[1]
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise PixArtConfigError(f"pos_embed has {positions} positions, not a square grid")
        if sample_size is not None and sample_size != grid * patch_size:
            raise PixArtConfigError(f"sample_size {sample_size} was given, but pos_embed is a {grid}x{grid}-patch grid")
        sample_size = grid * patch_size
    elif sample_size is None:
        sample_size = 128

    blocks = sorted({int(m.group(1)) for key in shapes if (m := _BLOCK_KEY.match(key))})
    if not blocks:
        raise PixArtMissingKeyError("blocks.0.scale_shift_table")
    if blocks != list(range(len(blocks))):
        raise PixArtConfigError(f"blocks indices are not consecutive: {blocks}")
    depth = len(blocks)
    for part in ("scale_shift_table", "attn.qkv.weight", "cross_attn.kv_linear.weight"):
        _shape(shapes, f"blocks.{depth - 1}.{part}")

    return PixArtConfig(
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads if num_heads is not None else num_heads_for_width(hidden_size, PixArtConfigError),
        caption_dim=caption_dim,
        learn_sigma=out_channels == 2 * in_channels,
        micro_conditions=micro_conditions,
        max_token_length=max_token_length,
        null_caption=null_caption,
        sample_size=sample_size,
        interpolation_scale=(
            interpolation_scale if interpolation_scale is not None else pixart_interpolation_scale(sample_size)
        ),
    )


# --------------------------------------------------------------------------- diffusers key mapping

# diffusers' PixArtTransformer2DModel names -> the original's (as in diffusers' convert_pixart_alpha/
# sigma_to_diffusers.py). diffusers stores no null caption and no positional table.
_DIFFUSERS_TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
    "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "proj_out": "final_layer.linear",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
# Separate projections in diffusers, fused in the original (rows in this order).
_DIFFUSERS_FUSED = {
    ("attn1.to_q", "attn1.to_k", "attn1.to_v"): "attn.qkv",
    ("attn2.to_k", "attn2.to_v"): "cross_attn.kv_linear",
}
_DIFFUSERS_PART = {part: (group, index) for group in _DIFFUSERS_FUSED for index, part in enumerate(group)}
_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def is_diffusers_pixart_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are a diffusers ``PixArtTransformer2DModel``."""
    keys = set(keys)
    return {
        "pos_embed.proj.weight",
        "adaln_single.linear.weight",
        "caption_projection.linear_1.weight",
        "transformer_blocks.0.attn2.to_q.weight",
        "scale_shift_table",
    } <= keys


def pixart_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``PixArtTransformer2DModel`` state dict in the original PixArt layout (no prefix).

    diffusers' ``adaln_single`` splits into ``t_embedder`` (+ ``csize_embedder``/``ar_embedder``)
    and ``t_block``; self-attention q/k/v fuse into ``attn.qkv``, cross-attention k/v into
    ``cross_attn.kv_linear``. The result has no ``y_embedder.y_embedding`` (build with
    ``null_caption=False``) and no ``pos_embed``. An unknown key raises rather than being dropped.
    """
    converted: dict[str, Tensor] = {}
    fused_parts: dict[str, dict[int, Tensor]] = {}
    for key, tensor in state_dict.items():
        if key == "scale_shift_table":
            converted["final_layer.scale_shift_table"] = tensor
            continue
        if key == "pos_embed.pos_embed":
            converted["pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        if module in _DIFFUSERS_TOP_LEVEL:
            converted[f"{_DIFFUSERS_TOP_LEVEL[module]}.{param}"] = tensor
            continue
        if match := re.fullmatch(r"transformer_blocks\.(\d+)\.scale_shift_table", key):
            converted[f"blocks.{match.group(1)}.scale_shift_table"] = tensor
            continue
        match = _DIFFUSERS_BLOCK_KEY.match(key)
        if not match:
            raise PixArtConfigError(f"diffusers PixArt state dict: no original-layout name for {key!r}")
        block, module, param = match.groups()
        if module in _DIFFUSERS_BLOCK:
            converted[f"blocks.{block}.{_DIFFUSERS_BLOCK[module]}.{param}"] = tensor
        elif module in _DIFFUSERS_PART:
            group, index = _DIFFUSERS_PART[module]
            fused_parts.setdefault(f"blocks.{block}.{_DIFFUSERS_FUSED[group]}.{param}", {})[index] = tensor
        else:
            raise PixArtConfigError(f"diffusers PixArt state dict: no original-layout name for {key!r}")

    for fused_key, parts in fused_parts.items():
        count = 3 if ".attn.qkv." in fused_key else 2
        if sorted(parts) != list(range(count)):
            raise PixArtConfigError(f"diffusers PixArt state dict: {fused_key!r} lacks one of its parts")
        converted[fused_key] = torch.cat([parts[i] for i in range(count)], dim=0)
    return converted
