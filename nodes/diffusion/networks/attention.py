"""Transformer blocks shared by the U-Net and ControlNet: cross-attention, GEGLU feed-forward, SpatialTransformer.

Module names follow the original LDM layout (``attn1.to_q``, ``ff.net.0.proj``, ``proj_in``, ...),
which diffusers also kept, so U-Net checkpoints of either format reach these modules unrenamed.
Attention and the linear layers run through :mod:`.kernels`: oneDNN for float32 inference on the
CPU, :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient where the
device has them) and the modules themselves otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from . import kernels

# GroupNorm in front of every SpatialTransformer (LDM and diffusers agree); ResBlocks use 1e-5.
TRANSFORMER_GROUPNORM_EPS = 1e-6
NORM_GROUPS = 32
# Width of the GEGLU feed-forward hidden layer relative to the model width.
FEED_FORWARD_MULT = 4

# (key input, value input) -> new ones, both (B, T, context_dim): a hypernetwork's change of what
# to_k and to_v see (installed on CrossAttention.kv_hooks while a model runs).
KeyValueHook = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


class CrossAttention(nn.Module):
    """Multi-head attention of a token sequence over itself or over a context sequence.

    ``to_q``/``to_k``/``to_v`` have no bias; ``to_out.0`` has one.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # A list so the checkpoint key is ``to_out.0``; the original's dropout at index 1 has no weights.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])
        # Applied in order to the key and value inputs (hypernetworks); empty but while one is installed.
        self.kv_hooks: list[KeyValueHook] = []

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, N, query_dim), context: (B, T, context_dim) or None (self-attention) -> (B, N, query_dim)."""
        context = x if context is None else context
        batch, tokens, _ = x.shape
        key_in = value_in = context
        for hook in self.kv_hooks:
            key_in, value_in = hook(key_in, value_in)
        # (B, N, H*D) viewed as (B, N, H, D) without a copy.
        q = kernels.linear(x, self.to_q).view(batch, tokens, self.heads, self.head_dim)
        k = kernels.linear(key_in, self.to_k).view(batch, -1, self.heads, self.head_dim)
        v = kernels.linear(value_in, self.to_v).view(batch, -1, self.heads, self.head_dim)
        return kernels.linear(kernels.attention(q, k, v), self.to_out[0])


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, the second half (exact GELU) gates the first."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, dim_in) -> (B, N, dim_out)."""
        return kernels.gated_gelu(x, self.proj)


class FeedForward(nn.Module):
    """GEGLU projection up, linear projection back down."""

    def __init__(self, dim: int, mult: int = FEED_FORWARD_MULT) -> None:
        super().__init__()
        inner_dim = dim * mult
        # Index 1 stands where the original has a dropout, keeping ``net.2`` for the output layer.
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        return kernels.linear(self.net[0](x), self.net[2])


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        # x (B, N, dim) -> x, applied in order between self- and cross-attention (GLIGEN's gated
        # self-attention over grounding tokens); empty but while one is installed.
        self.middle_hooks: list[Callable[[Tensor], Tensor]] = []

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, N, dim), context: (B, T, context_dim) -> (B, N, dim)."""
        x = self.attn1(self.norm1(x)) + x
        for hook in self.middle_hooks:
            x = hook(x)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context sequence.

    GroupNorm, projection in (1x1 conv in SD1.x, linear in SD2.x/SDXL), ``depth`` transformer
    blocks over the ``H*W`` tokens, projection out, residual.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int,
        context_dim: int,
        use_linear_projection: bool,
    ) -> None:
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, head_dim, context_dim) for _ in range(depth)
        )
        if use_linear_projection:
            self.proj_out: nn.Module = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W), context: (B, T, context_dim) -> (B, C, H, W)."""
        batch, _, height, width = x.shape
        # (B, C, H, W) -> (B, H*W, C): one explicit copy into the token-major layout, so the norms,
        # matmuls and residual adds downstream all read contiguous memory. A 1x1 conv projection
        # (SD1.x) is the same map over channels as a linear one, so both run on the tokens.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        h = kernels.linear(h, self.proj_in)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = kernels.linear(h, self.proj_out)
        # Back to (B, C, H, W) as a strided view; the residual add writes x's layout.
        return x + h.view(batch, height, width, -1).permute(0, 3, 1, 2)
