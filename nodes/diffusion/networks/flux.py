"""The Flux.1 transformer (dev, schnell and derivatives keeping their layout) in the original BFL key layout.

Module names equal the keys of ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (and of the
``model.diffusion_model.`` part of single files once that prefix is removed): ``img_in``,
``txt_in``, ``time_in.in_layer``, ``vector_in.out_layer``, ``guidance_in.*`` (dev only),
``double_blocks.N.img_attn.qkv``, ``double_blocks.N.txt_mlp.0``, ``single_blocks.N.linear1``,
``single_blocks.N.norm.query_norm.scale``, ``final_layer.adaLN_modulation.1``, ... so such a state
dict loads with ``load_state_dict(strict=True)``. Diffusers ``FluxTransformer2DModel`` weights go
through :func:`flux_keys_from_diffusers` first; :func:`flux_config_from_shapes` reads the
architecture off key names and tensor shapes alone (a safetensors header is enough).

Data flow: the latent (B, C, H, W) is cut into 2x2 patches, giving (B, H/2 * W/2, 4C) image
tokens; T5 hidden states are the text tokens. The timestep (plus, for dev, the distilled guidance
scale) and the CLIP pooled vector sum into one conditioning vector ``vec`` that modulates every
block. Double-stream blocks keep separate weights for text and image tokens and attend jointly;
single-stream blocks run on the concatenated sequence ``[text, image]``, attention and MLP in
parallel. Positions enter only through 3-axis rotary embeddings on queries and keys: text tokens
sit at (0, 0, 0), image token (row, col) at (0, row, col).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .timestep import timestep_embedding
from .transformer_control import TransformerControl

logger = logging.getLogger(__name__)

PATCH_SIZE = 2  # Flux packs 2x2 latent pixels into one token; every released model does
ROPE_THETA = 10000.0
# Rotary dims per position axis (index, row, column) of the released models' 128-wide heads.
FLUX_AXES_DIM = (16, 56, 56)
FLUX_HEAD_DIM = sum(FLUX_AXES_DIM)
TIMESTEP_EMBED_DIM = 256  # width of the sinusoidal embedding of the timestep and of the guidance
TIME_FACTOR = 1000.0  # timesteps arrive as sigmas in [0, 1]; the embedding sees them x 1000
NORM_EPS = 1e-6


class FluxConfigError(ValueError):
    """A Flux config is inconsistent, or a state dict's keys/shapes do not fit the Flux layout."""


class FluxMissingKeyError(FluxConfigError):
    """A state dict lacks a key the Flux layout needs; ``key`` names it."""

    def __init__(self, key: str, what: str = "Flux state dict") -> None:
        self.key = key
        super().__init__(f"{what} has no {key!r}; is it a Flux.1 transformer in the original (BFL) layout?")


class FluxInputError(ValueError):
    """The inputs of a Flux forward do not fit the model (names what was expected)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FluxConfig:
    """Architecture of a Flux transformer. Defaults are Flux.1-dev's.

    ``in_channels`` / ``out_channels`` count latent channels before 2x2 packing (16 for the Flux
    VAE: 64 packed); derivatives with extra conditioning channels (Fill, Depth, Canny) take more in.
    ``axes_dim`` splits each head's width among the rotary position axes (index, row, column).
    ``guidance_embed`` is True for guidance-distilled models (dev), False for schnell.
    """

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth: int = 19
    depth_single_blocks: int = 38
    context_dim: int = 4096
    pooled_dim: int = 768
    guidance_embed: bool = True
    axes_dim: tuple[int, ...] = FLUX_AXES_DIM
    qkv_bias: bool = True
    theta: float = ROPE_THETA

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise FluxConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise FluxConfigError(
                f"rotary axes_dim {self.axes_dim} must be even numbers summing to the head size {self.head_dim}"
            )
        if self.mlp_hidden_dim < 1:
            raise FluxConfigError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def packed_in_channels(self) -> int:
        return self.in_channels * PATCH_SIZE * PATCH_SIZE

    @property
    def packed_out_channels(self) -> int:
        return self.out_channels * PATCH_SIZE * PATCH_SIZE


# --------------------------------------------------------------------------- building blocks


class MLPEmbedder(nn.Module):
    """Linear, SiLU, linear: embeds the timestep, guidance and pooled-text vectors. (B, in) -> (B, D)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned ``scale`` (the original's parameter name)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32 and cast back before scaling, as the original does for half precision.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=NORM_EPS)
        return normed.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMS norms of queries and keys."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class SelfAttention(nn.Module):
    """The weights of one stream's attention: fused q/k/v projection, qk norm, output projection.

    The joint attention itself runs in :class:`DoubleStreamBlock`, over both streams at once.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, L, D) -> normed q, k and v, each (B, L, heads, head_dim)."""
        return split_heads(kernels.linear(x, self.qkv), self.num_heads, self.norm)


class Modulation(nn.Module):
    """adaLN modulation from ``vec``: ``count`` (shift, scale, gate) triples, each (B, 1, D)."""

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.lin = nn.Linear(dim, 3 * count * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return list(self.lin(F.silu(vec))[:, None, :].chunk(3 * self.count, dim=-1))


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """qkv: (B, L, 3 * H * Dh), laid out [q | k | v], heads inside each -> normed q, k, v: (B, L, H, Dh),
    the layout kernels.attention takes."""
    batch, length, _ = qkv.shape
    q, k, v = qkv.view(batch, length, 3, num_heads, -1).unbind(2)
    return norm.query_norm(q), norm.key_norm(k), v


def mlp(layers: nn.Sequential, x: Tensor) -> Tensor:
    """A double block's MLP, ``layers`` = (Linear, tanh GELU, Linear): x: (B, L, D) -> (B, L, D)."""
    return kernels.linear(kernels.linear_gelu_tanh(x, layers[0]), layers[2])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Parameter-free LayerNorm, then the adaLN scale and shift. x: (B, L, D)."""
    return (1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS) + shift


# --------------------------------------------------------------------------- rotary positions


def rope_angles(ids: Tensor, axes_dim: Sequence[int], theta: float) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotary angles. ids: (L, n_axes) positions -> two (L, head_dim / 2).

    Axis ``a`` rotates ``axes_dim[a] / 2`` consecutive channel pairs with frequencies
    ``theta ** (-2i / axes_dim[a])``; computed in float64 as the original does.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        frequencies = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].to(torch.float64)[:, None] * frequencies[None, :])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent channel pair (2i, 2i+1) of x: (B, L, H, Dh) by its angle; cos/sin: (L, Dh/2)."""
    # A pair as a complex number times cos + i sin: (even cos - odd sin, even sin + odd cos), the
    # same products and sums as written out, in one pass (12x faster on the CPU than six
    # half-size temporaries and a stack).
    rotation = torch.complex(cos, sin)[:, None]  # the same angle for every head
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary-embedded scaled dot-product attention. q, k, v: (B, L, H, Dh) -> (B, L, H * Dh)."""
    return kernels.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


# --------------------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
    """Text and image tokens with their own weights, one joint attention over both."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        dim, hidden = config.hidden_size, config.mlp_hidden_dim
        self.img_mod = Modulation(dim, 2)
        self.img_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.img_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.txt_mod = Modulation(dim, 2)
        self.txt_attn = SelfAttention(dim, config.num_heads, config.qkv_bias)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """img: (B, Li, D), txt: (B, Lt, D), vec: (B, D) -> updated (img, txt)."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(txt, txt_shift1, txt_scale1))
        # Text first: the rotary tables are built for the sequence [text, image].
        joint = attention(
            torch.cat((txt_q, img_q), dim=1), torch.cat((txt_k, img_k), dim=1), torch.cat((txt_v, img_v), dim=1),
            *rope,
        )
        txt_out, img_out = joint.split((txt.shape[1], img.shape[1]), dim=1)

        img = img + img_gate1 * kernels.linear(img_out, self.img_attn.proj)
        img = img + img_gate2 * mlp(self.img_mlp, modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * kernels.linear(txt_out, self.txt_attn.proj)
        txt = txt + txt_gate2 * mlp(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One sequence, attention and MLP side by side: ``linear1`` makes q, k, v and the MLP input at
    once, ``linear2`` maps the attention output and the activated MLP input back together."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv_width = 3 * dim  # linear1: q, k, v, then the MLP input
        self.linear1 = nn.Linear(dim, 3 * dim + config.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + config.mlp_hidden_dim, dim)
        self.norm = QKNorm(config.head_dim)
        self.modulation = Modulation(dim, 1)

    def forward(self, x: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, L, D), vec: (B, D) -> (B, L, D)."""
        shift, scale, gate = self.modulation(vec)
        qkv, hidden = kernels.linear_and_gelu_tanh(modulate(x, shift, scale), self.linear1, self.qkv_width)
        q, k, v = split_heads(qkv, self.num_heads, self.norm)
        out = torch.cat((attention(q, k, v, *rope), hidden), dim=-1)
        return x + gate * kernels.linear(out, self.linear2)


class LastLayer(nn.Module):
    """adaLN (stored as shift then scale), then the projection to packed latent channels."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return kernels.linear(modulate(x, shift, scale), self.linear)


# --------------------------------------------------------------------------- latent packing


def pack_latent(x: Tensor) -> Tensor:
    """x: (B, C, H, W) with even H, W -> tokens (B, H/2 * W/2, 4C), channels ordered (c, dy, dx)."""
    batch, channels, height, width = x.shape
    patches = x.view(batch, channels, height // PATCH_SIZE, PATCH_SIZE, width // PATCH_SIZE, PATCH_SIZE)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * PATCH_SIZE * PATCH_SIZE)


def unpack_latent(tokens: Tensor, rows: int, cols: int) -> Tensor:
    """tokens: (B, rows * cols, 4C) -> (B, C, 2 rows, 2 cols); inverse of :func:`pack_latent`."""
    batch, _, packed = tokens.shape
    patches = tokens.view(batch, rows, cols, packed // PATCH_SIZE**2, PATCH_SIZE, PATCH_SIZE)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, -1, rows * PATCH_SIZE, cols * PATCH_SIZE)


def image_position_ids(rows: int, cols: int, device: torch.device | None = None) -> Tensor:
    """Position ids (index 0, row, column) of a rows x cols token grid, row-major: (rows * cols, 3)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.view(-1, 3)


# Reference images (Flux.1 Kontext) sit at this index of the first rotary axis; the image at 0.
REFERENCE_INDEX = 1


def reference_position_ids(sizes: Sequence[tuple[int, int]], device: torch.device | None = None) -> list[Tensor]:
    """Position ids of reference latents' tokens (Flux.1 Kontext, ComfyUI's "offset" placement):
    each at index 1, the first at row and column 0, each next one right of the ones before when
    that keeps the whole closer to square, else below them. sizes: (height, width) of each latent
    in latent cells -> one (tokens, 3) table per reference."""
    tables, height_so_far, width_so_far = [], 0, 0
    for height, width in sizes:
        top = left = 0
        if height + height_so_far > width + width_so_far:
            left = width_so_far
        else:
            top = height_so_far
        height_so_far, width_so_far = max(height_so_far, height + top), max(width_so_far, width + left)
        ids = image_position_ids(-(-height // PATCH_SIZE), -(-width // PATCH_SIZE), device)
        # Offsets count latent cells; a token covers PATCH_SIZE of them (rounded as the image's own size is).
        ids += torch.tensor([REFERENCE_INDEX, -(-top // PATCH_SIZE), -(-left // PATCH_SIZE)], device=device)
        tables.append(ids)
    return tables


# --------------------------------------------------------------------------- the model


def modulation_vector(net: nn.Module, guidance_embed: bool, timesteps: Tensor, guidance: Tensor | None, y: Tensor,
                      dtype: torch.dtype) -> Tensor:
    """The vector every block is modulated by: embedded timesteps (+ distilled guidance when the
    network embeds it) + the pooled text, through ``net``'s ``time_in``, ``guidance_in`` and
    ``vector_in`` (a Flux or a Flux ControlNet). timesteps, guidance: (B,); y: (B, pooled) -> (B, dim)."""
    vec = net.time_in(timestep_embedding(timesteps * TIME_FACTOR, TIMESTEP_EMBED_DIM).to(dtype))
    if guidance_embed:
        assert guidance is not None  # the callers' _check_inputs
        vec = vec + net.guidance_in(timestep_embedding(guidance * TIME_FACTOR, TIMESTEP_EMBED_DIM).to(dtype))
    return vec + net.vector_in(y)


class Flux(nn.Module):
    """The Flux.1 transformer; ``state_dict()`` keys are the original BFL names."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = nn.Linear(config.packed_in_channels, dim)
        self.time_in = MLPEmbedder(TIMESTEP_EMBED_DIM, dim)
        self.vector_in = MLPEmbedder(config.pooled_dim, dim)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(TIMESTEP_EMBED_DIM, dim)
        self.txt_in = nn.Linear(config.context_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(dim, config.packed_out_channels)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        control: TransformerControl | None = None,
        reference_latents: Sequence[Tensor] = (),
    ) -> Tensor:
        """Velocity prediction for a latent batch.

        x: (B, in_channels, H, W) latent (odd H or W are padded circularly to even and the output
        cropped back); timesteps: (B,) sigmas in [0, 1]; context: (B, L, context_dim) T5 hidden
        states; y: (B, pooled_dim) CLIP pooled output; guidance: (B,) distilled guidance scale,
        required by guidance-embedding models (dev) and ignored by the others (schnell); control:
        ControlNet residuals added to the image tokens after each double- and single-stream block;
        reference_latents: (B or 1, in_channels, h, w) each, images the model attends to as extra
        tokens (Flux.1 Kontext, :meth:`reference_tokens`). Returns (B, out_channels, H, W).
        """
        self._check_inputs(x, timesteps, context, y, guidance)
        if control is not None:
            control.check_fits(self.config.depth, self.config.depth_single_blocks)
        height, width = x.shape[-2:]
        # Odd sizes wrap around (circular padding), as ComfyUI's Flux does; the extra row/column is cropped.
        x = F.pad(x, (0, width % PATCH_SIZE, 0, height % PATCH_SIZE), mode="circular")
        rows, cols = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE

        img = kernels.linear(pack_latent(x), self.img_in)
        vec = modulation_vector(self, self.config.guidance_embed, timesteps, guidance, y, img.dtype)
        txt = kernels.linear(context, self.txt_in)

        text_ids = torch.zeros(txt.shape[1], 3, device=x.device)
        ids = torch.cat((text_ids, image_position_ids(rows, cols, x.device)), dim=0)
        image_tokens = img.shape[1]
        if reference_latents:
            if control is not None:
                raise FluxInputError("ControlNets and reference latents (Kontext) together are not supported")
            references, reference_ids = self.reference_tokens(reference_latents, x.shape[0])
            img, ids = torch.cat((img, references), dim=1), torch.cat((ids, reference_ids), dim=0)
        rope = rope_angles(ids, self.config.axes_dim, self.config.theta)

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, rope)
            if control is not None and control.double[i] is not None:
                img = img + control.double[i]
        joint = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            joint = block(joint, vec, rope)
            if control is not None and control.single[i] is not None:
                joint = torch.cat((joint[:, :txt.shape[1]], joint[:, txt.shape[1]:] + control.single[i]), dim=1)
        img = self.final_layer(joint[:, txt.shape[1]: txt.shape[1] + image_tokens], vec)
        return unpack_latent(img, rows, cols)[:, :, :height, :width]

    def reference_tokens(self, latents: Sequence[Tensor], batch: int) -> tuple[Tensor, Tensor]:
        """Reference latents (each (B or 1, in_channels, h, w)) as tokens after the image's, embedded
        like it (odd sizes padded circularly), with their positions (:func:`reference_position_ids`):
        -> tokens (B, N, hidden_size), ids (N, 3)."""
        tokens = []
        for latent in latents:
            if latent.ndim != 4 or latent.shape[1] != self.config.in_channels or latent.shape[0] not in (1, batch):
                raise FluxInputError(f"a reference latent is (B={batch} or 1, {self.config.in_channels}, h, w), "
                                     f"got {tuple(latent.shape)}")
            h, w = latent.shape[-2:]
            padded = F.pad(latent, (0, w % PATCH_SIZE, 0, h % PATCH_SIZE), mode="circular")
            tokens.append(kernels.linear(pack_latent(padded), self.img_in).expand(batch, -1, -1))
        ids = reference_position_ids([tuple(latent.shape[-2:]) for latent in latents], latents[0].device)
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor, guidance: Tensor | None) -> None:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise FluxInputError(f"Flux expects a latent (B, {config.in_channels}, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.context_dim:
            raise FluxInputError(
                f"Flux expects context (B={batch}, L, {config.context_dim}) T5 states, got {tuple(context.shape)}"
            )
        if tuple(y.shape) != (batch, config.pooled_dim):
            raise FluxInputError(f"Flux expects y (B={batch}, {config.pooled_dim}) pooled text, got {tuple(y.shape)}")
        if tuple(timesteps.shape) != (batch,):
            raise FluxInputError(f"Flux expects timesteps (B={batch},), got {tuple(timesteps.shape)}")
        if config.guidance_embed:
            if guidance is None:
                raise FluxInputError("this Flux model embeds a guidance scale (dev-like); pass guidance (B,)")
            if tuple(guidance.shape) != (batch,):
                raise FluxInputError(f"Flux expects guidance (B={batch},), got {tuple(guidance.shape)}")


# --------------------------------------------------------------------------- config from shapes

_DOUBLE_INDEX = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE_INDEX = re.compile(r"^single_blocks\.(\d+)\.")


def _block_count(keys: Iterable[str], pattern: re.Pattern[str], what: str) -> int:
    indices = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise FluxConfigError(f"Flux {what} are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """The rotary split of a head when nothing says otherwise: Flux's (16, 56, 56) for 128-wide heads;
    for other widths the same proportions, rounded down to even numbers (the two spatial axes equal)."""
    if head_dim == FLUX_HEAD_DIM:
        return FLUX_AXES_DIM  # type: ignore[return-value]
    spatial = int(head_dim * FLUX_AXES_DIM[1] / FLUX_HEAD_DIM / 2) * 2
    index = head_dim - 2 * spatial
    if head_dim % 2 or spatial < 2 or index < 2:
        raise FluxConfigError(f"Flux heads {head_dim} wide cannot be split among 3 rotary axes; pass axes_dim")
    return index, spatial, spatial


def flux_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    *,
    axes_dim: Sequence[int] | None = None,
) -> FluxConfig:
    """The :class:`FluxConfig` of a BFL-layout Flux state dict, from key names and shapes alone.

    ``shapes`` maps keys without the ``model.diffusion_model.`` prefix to tensor shapes. The head
    size is the length of ``query_norm.scale`` and the head count the width divided by it. The split
    of a head among the rotary axes leaves no trace in the weights: unless ``axes_dim`` is given it is
    :func:`default_axes_dim` ((16, 56, 56) for the released models' 128-wide heads).
    The latent is assumed packed 2x2, as in every released model.
    """

    def shape(key: str) -> tuple[int, ...]:
        try:
            return tuple(shapes[key])
        except KeyError:
            raise FluxMissingKeyError(key) from None

    hidden_size, packed_in = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if hidden_size % head_dim:
        raise FluxConfigError(f"Flux width {hidden_size} is not a multiple of its head size {head_dim}")
    if axes_dim is None:
        axes_dim = default_axes_dim(head_dim)
    mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
    packed_out = shape("final_layer.linear.weight")[0]
    for packed, key in ((packed_in, "img_in.weight"), (packed_out, "final_layer.linear.weight")):
        if packed % PATCH_SIZE**2:
            raise FluxConfigError(f"Flux {key} has {packed} packed channels, not a multiple of {PATCH_SIZE**2}")
    config = FluxConfig(
        in_channels=packed_in // PATCH_SIZE**2,
        out_channels=packed_out // PATCH_SIZE**2,
        hidden_size=hidden_size,
        num_heads=hidden_size // head_dim,
        mlp_ratio=mlp_hidden / hidden_size,
        depth=_block_count(shapes, _DOUBLE_INDEX, "double blocks"),
        depth_single_blocks=_block_count(shapes, _SINGLE_INDEX, "single blocks"),
        context_dim=shape("txt_in.weight")[1],
        pooled_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embed="guidance_in.in_layer.weight" in shapes,
        axes_dim=tuple(axes_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
    )
    if config.mlp_hidden_dim != mlp_hidden:
        raise FluxConfigError(f"Flux MLP width {mlp_hidden} is not a whole-number multiple of its width {hidden_size}")
    time_width = shape("time_in.in_layer.weight")[1]
    if time_width != TIMESTEP_EMBED_DIM:
        raise FluxConfigError(f"Flux time_in takes {time_width} inputs, expected {TIMESTEP_EMBED_DIM}")
    if config.depth_single_blocks:
        linear1 = shape("single_blocks.0.linear1.weight")[0]
        if linear1 != 3 * hidden_size + mlp_hidden:
            raise FluxConfigError(
                f"Flux single_blocks.0.linear1 has {linear1} outputs, expected {3 * hidden_size + mlp_hidden} "
                "(q, k, v and the MLP input)"
            )
    return config


# Keys whose presence marks the BFL Flux layout. Chroma keeps double/single blocks but has no
# time_in/vector_in; SD3's MMDiT uses joint_blocks.
_FLUX_MARKERS = (
    "img_in.weight",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_mod.lin.weight",
    "final_layer.linear.weight",
)


def is_flux_layout(keys: Iterable[str], prefix: str = "") -> bool:
    """True if ``keys`` (each starting with ``prefix``, e.g. ``"model.diffusion_model."``) are a
    Flux.1 transformer in the original BFL layout."""
    present = {key[len(prefix):] for key in keys if key.startswith(prefix)}
    return all(marker in present for marker in _FLUX_MARKERS)


def is_diffusers_flux_layout(keys: Iterable[str]) -> bool:
    """True if ``keys`` are a diffusers ``FluxTransformer2DModel``."""
    present = set(keys)
    return {"x_embedder.weight", "context_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight",
            "transformer_blocks.0.attn.add_q_proj.weight"} <= present


# --------------------------------------------------------------------------- diffusers layout

# BFL module -> the diffusers modules whose outputs it fuses, concatenated in this order (dim 0).
_TOP_LEVEL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_DOUBLE_BLOCK = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_BLOCK_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_SINGLE_BLOCK = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
_SINGLE_BLOCK_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}

# diffusers stores the final adaLN output as (scale, shift), the original as (shift, scale).
SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"})

_DIFFUSERS_DOUBLE_INDEX = re.compile(r"^transformer_blocks\.(\d+)\.")
_DIFFUSERS_SINGLE_INDEX = re.compile(r"^single_transformer_blocks\.(\d+)\.")


def flux_diffusers_sources(diffusers_keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """For each BFL key, the diffusers ``FluxTransformer2DModel`` keys it is made of (concatenated
    along dim 0 in this order; see :data:`SWAPPED_HALVES` for the one reordered tensor).

    Only entries whose sources are all present in ``diffusers_keys`` are returned (biases are
    optional, guidance only for dev); :func:`flux_keys_from_diffusers` reports what is left over.
    """
    keys = set(diffusers_keys)
    plan: dict[str, tuple[str, ...]] = {}

    def add(target: str, sources: tuple[str, ...]) -> None:
        for suffix in ("weight", "bias"):
            wanted = tuple(f"{source}.{suffix}" for source in sources)
            if any(key in keys for key in wanted):
                plan[f"{target}.{suffix}"] = wanted

    for target, sources in _TOP_LEVEL.items():
        add(target, sources)
    for index in range(_block_count(keys, _DIFFUSERS_DOUBLE_INDEX, "diffusers transformer_blocks")):
        bfl, hf = f"double_blocks.{index}.", f"transformer_blocks.{index}."
        for target, sources in _DOUBLE_BLOCK.items():
            add(bfl + target, tuple(hf + source for source in sources))
        for target, source in _DOUBLE_BLOCK_NORMS.items():
            plan[f"{bfl}{target}.scale"] = (f"{hf}{source}.weight",)
    for index in range(_block_count(keys, _DIFFUSERS_SINGLE_INDEX, "diffusers single_transformer_blocks")):
        bfl, hf = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
        for target, sources in _SINGLE_BLOCK.items():
            add(bfl + target, tuple(hf + source for source in sources))
        for target, source in _SINGLE_BLOCK_NORMS.items():
            plan[f"{bfl}{target}.scale"] = (f"{hf}{source}.weight",)
    return plan


def flux_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL names: q/k/v (and, in single
    blocks, the MLP input) fused, the final adaLN halves swapped to (shift, scale).

    Raises :class:`FluxMissingKeyError` for a missing part of a fused tensor and
    :class:`FluxConfigError` for keys this layout does not have.
    """
    plan = flux_diffusers_sources(state_dict)
    converted: dict[str, Tensor] = {}
    for target, sources in plan.items():
        for source in sources:
            if source not in state_dict:
                raise FluxMissingKeyError(source, "diffusers Flux state dict")
        tensor = torch.cat([state_dict[source] for source in sources], dim=0)
        if target in SWAPPED_HALVES:
            scale, shift = tensor.chunk(2, dim=0)
            tensor = torch.cat((shift, scale), dim=0)
        converted[target] = tensor
    used = {source for sources in plan.values() for source in sources}
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise FluxConfigError(
            f"{len(unknown)} diffusers keys have no place in the Flux layout, e.g. {unknown[:5]}; "
            "is it a FluxTransformer2DModel state dict?"
        )
    logger.debug("converted %d diffusers Flux tensors to %d BFL tensors", len(state_dict), len(converted))
    return converted
