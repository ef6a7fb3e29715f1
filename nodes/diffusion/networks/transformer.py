"""Blocks shared by the patch-based diffusion transformers (MMDiT, DiT, PixArt): patches, positions, adaLN.

Every module here keeps the key names the original DiT-family checkpoints use (``x_embedder.proj``,
``t_embedder.mlp.0/2``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``, ``adaLN_modulation.1``,
``final_layer.linear``), so a network built from them loads those files unrenamed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

# Every LayerNorm of these networks (DiT, PixArt, SD3; diffusers agrees except where noted).
NORM_EPS = 1e-6
MLP_RATIO = 4
# Width of the sinusoidal embedding the timestep (and PixArt's size conditions) enter with.
TIMESTEP_FREQUENCY_DIM = 256
# Enough for every size a session samples at; each table is rows * cols * width floats.
_POSITION_CACHE_SIZE = 8


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x: (B, L, D) scaled by (1 + scale) and shifted by shift, both (B, D)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def layer_norm(x: Tensor) -> Tensor:
    """The parameter-free LayerNorm in front of every modulation: x: (B, L, D) -> (B, L, D)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def modulated_residual(x: Tensor, module: nn.Module, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
    """One adaLN-Zero residual branch: x + gate * module(modulate(LayerNorm(x), shift, scale)).

    x: (B, L, D); shift, scale, gate: (B, D) -> (B, L, D).
    """
    return x + gate[:, None] * module(modulate(layer_norm(x), shift, scale))


class EmbedderMLP(nn.Module):
    """Linear, SiLU, linear: lifts timestep frequencies (or a pooled vector, or a size) to a width.

    ``mlp.1`` is the parameter-free SiLU, keeping the original's ``mlp.0`` / ``mlp.2`` keys.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> (B, out_dim)."""
        return self.mlp(x)


class FusedQKVAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows q, k, v), optional per-head
    RMS qk-norm (SD3.5) and an output projection (absent in SD3's "pre-only" context stream).

    ``heads`` and ``out`` are separate so that MMDiT can attend over two streams' tokens at once.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, L, D) -> q, k, v, each (B, L, heads, head_dim), the layout kernels.attention takes."""
        batch, length, _ = x.shape
        q, k, v = kernels.linear(x, self.qkv).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        return self.ln_q(q), self.ln_k(k), v

    def out(self, attended: Tensor) -> Tensor:
        """attended: (B, L, heads * head_dim), heads side by side -> (B, L, D) through the output projection."""
        return kernels.linear(attended, self.proj)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention of one sequence: x: (B, L, D) -> (B, L, D)."""
        return self.out(kernels.attention(*self.heads(x)))


class Mlp(nn.Module):
    """fc1, tanh-approximated GELU, fc2 (timm's Mlp, as the DiT family uses it)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, in_dim) -> (B, L, out_dim)."""
        return kernels.linear(kernels.linear_gelu_tanh(x, self.fc1), self.fc2)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches projected to the width by one strided conv."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W), H and W multiples of the patch size -> (B, H/p * W/p, D), row-major."""
        # Contiguous once here: the transposed view's layout would otherwise carry through every
        # residual add of the blocks, and each LayerNorm and product would copy it again.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from each token to its patch of the output (DiT, SD3)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, L, D), c: (B, D) -> (B, L, p * p * out_channels)."""
        # (shift, scale) in the original; diffusers' SD3 stores the same rows as (scale, shift).
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return kernels.linear(modulate(layer_norm(x), shift, scale), self.linear)


def pad_to_patches(x: Tensor, patch_size: int) -> Tensor:
    """x: (B, C, H, W) padded up (circularly, as ComfyUI does) to multiples of the patch size.

    The original networks and diffusers floor such a latent instead, dropping its last rows or
    columns; padding keeps the output the input's size once :func:`unpatchify` crops it back.
    """
    pad_h, pad_w = -x.shape[-2] % patch_size, -x.shape[-1] % patch_size
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    return x


def unpatchify(patches: Tensor, rows: int, cols: int, patch_size: int, height: int, width: int) -> Tensor:
    """patches: (B, rows * cols, p * p * C), each token's patch row-major with channels last ->
    (B, C, height, width), the top-left height x width of the rows*p x cols*p image."""
    batch, p = patches.shape[0], patch_size
    channels = patches.shape[-1] // (p * p)
    out = patches.view(batch, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(batch, channels, rows * p, cols * p)[:, :, :height, :width]


def sincos_pos_embed_2d(
    dim: int,
    rows: int,
    cols: int | None = None,
    base_size: int | None = None,
    interpolation_scale: float = 1.0,
) -> Tensor:
    """Fixed 2-D sine/cosine positions of a rows x cols patch grid: (rows * cols, dim), row-major.

    The first half of the channels encodes the column, the second the row; each half is
    [sin, cos] of the position times 10000 ** (-i / (dim / 4)). Row i sits at
    ``i * base_size / rows / interpolation_scale`` (columns alike), so any grid spans the
    ``base_size`` positions the model was trained on (DiT and PixArt at other sizes; PixArt's
    ``interpolation_scale`` stretches that further). The defaults (a square grid, ``base_size`` the
    grid itself, scale 1) give integer positions: the table DiT and SD3 store.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine/cosine embedding needs a width divisible by 4, got {dim}")
    cols = rows if cols is None else cols
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def positions(count: int) -> Tensor:
        base = count if base_size is None else base_size
        return torch.arange(count, dtype=torch.float64) / (count / base) / interpolation_scale

    row_pos, col_pos = torch.meshgrid(positions(rows), positions(cols), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col_pos), encode(row_pos)], dim=1).float()


class SincosPositions:
    """The fixed positional table of one network, made for each grid size it meets and kept.

    Not a module and holds no state dict entry: the table follows from the config alone, so the
    network needs no weights for it (and builds on the meta device like every other part).
    """

    def __init__(self, dim: int, base_size: int, interpolation_scale: float = 1.0) -> None:
        self.dim = dim
        self.base_size = base_size
        self.interpolation_scale = interpolation_scale
        self._tables: dict[tuple[int, int, torch.device], Tensor] = {}

    def __call__(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """(1, rows * cols, dim) float32 on `device`."""
        key = (rows, cols, device)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= _POSITION_CACHE_SIZE:
                self._tables.clear()
            # float64 on the CPU as the originals (numpy) compute it; some devices have no float64.
            table = sincos_pos_embed_2d(self.dim, rows, cols, self.base_size, self.interpolation_scale)
            table = self._tables[key] = table.unsqueeze(0).to(device)
        return table
