"""The T5 v1.1 text encoder (T5-XXL layout, as SD3 and Flux use it) in Hugging Face ``T5EncoderModel`` key names.

Module names equal the keys of the single files ComfyUI users keep in ``models/text_encoders``
(``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``, diffusers' ``text_encoder_2`` /
``text_encoder_3`` folders): ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``
(``k``, ``v``, ``o``), ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight``,
``encoder.block.N.layer.0.layer_norm.weight``, ``encoder.block.N.layer.1.DenseReluDense.wi_0.weight``
(``wi_1``, ``wo``), ``encoder.block.N.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``.
Files that store the tied table as ``encoder.embed_tokens.weight`` load too; decoder and LM-head
entries of a full T5 file are left out. :func:`t5_config_from_shapes` reads the architecture off
key names and shapes alone.

The layout (T5 v1.1): pre-norm blocks with an RMS norm that has a scale but no bias and subtracts
no mean; self-attention without 1/sqrt(d) scaling of the logits and with a learned relative
position bias (bidirectional buckets) that only the first block owns and every block adds; a
gated-GELU feed-forward ``wo(gelu_tanh(wi_0 x) * wi_1 x)``; a final RMS norm. No absolute positions,
so any sequence length works.

Precision. T5-XXL's activations outgrow float16 (the residual stream and the feed-forward output
pass 65504), which is why transformers keeps ``wo`` in float32 and clamps. Here, when the compute
dtype is float16 or bfloat16, only the input projections (``q``, ``k``, ``v``, ``wi_0``, ``wi_1``)
run in it; attention, the gated product, the output projections ``o``/``wo``, the norms and the
residual stream run in float32, so nothing overflows and nothing is clamped. Weights stay in the
dtype they were loaded in: every projection casts its weight to the dtype it computes in
(:class:`CastLinear`), which is the seam for upcasting 8-bit storage at compute time.

No attention mask is needed for SD3/Flux: ComfyUI (``t5_attention_mask`` off by default) and
diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` run T5 unmasked over the padded
sequence, so the padding length changes the result. ``attention_mask`` is there for models that
mask (PixArt).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..weights.storage import compute_dtype as storage_compute_dtype

logger = logging.getLogger(__name__)

NORM_EPS = 1e-6  # T5's layer_norm_epsilon
# Dtypes torch computes in; anything else (8-bit storage) needs an explicit compute dtype.
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)

EMBEDDING_KEY = "shared.weight"
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"  # the same (tied) table, as some files name it
RELATIVE_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.")
_IGNORED_PREFIXES = ("decoder.", "lm_head.")  # a full encoder-decoder T5 file


class T5LoadError(ValueError):
    """A T5 encoder state dict does not fit the T5 v1.1 layout; ``key`` names the offending key when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 v1.1 encoder (defaults: T5-XXL v1.1, the encoder of SD3 and Flux).

    ``relative_max_distance`` cannot be read from weights; every T5 v1.1 model uses 128.
    """

    vocab_size: int = 32128
    width: int = 4096  # d_model
    heads: int = 64
    head_dim: int = 64  # d_kv; heads * head_dim need not equal width
    ff_width: int = 10240  # d_ff
    layers: int = 24
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = NORM_EPS

    def __post_init__(self) -> None:
        if self.relative_buckets < 4 or self.relative_buckets % 4:
            raise ValueError(
                f"T5Config: relative_buckets must be a positive multiple of 4, got {self.relative_buckets}"
            )
        if self.relative_max_distance <= self.relative_buckets // 4:
            raise ValueError(
                f"T5Config: relative_max_distance {self.relative_max_distance} must exceed "
                f"relative_buckets / 4 = {self.relative_buckets // 4}"
            )

    @property
    def inner_width(self) -> int:
        return self.heads * self.head_dim


# --------------------------------------------------------------------------- config from shapes


def t5_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> T5Config:
    """Derive a :class:`T5Config` from key names and shapes (prefix removed; a safetensors header is enough).

    vocab and width from the embedding table, heads and bucket count from the relative attention
    bias (buckets, heads), head_dim from ``q`` (heads * head_dim, width), the feed-forward width
    from ``wi_0``, the layer count from the block numbers. Raises :class:`T5LoadError` naming the
    key that is missing or does not fit.
    """

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise T5LoadError(
                f"T5 encoder state dict has no {key!r}; is it a T5 v1.1 encoder (T5EncoderModel keys)?", key
            )
        value = tuple(int(n) for n in shapes[key])
        if len(value) != ndim:
            raise T5LoadError(f"T5 encoder key {key!r} has shape {value}, expected {ndim} dimensions", key)
        return value

    embedding_key = EMBEDDING_KEY if EMBEDDING_KEY in shapes or EMBEDDING_ALIAS not in shapes else EMBEDDING_ALIAS
    vocab_size, width = shape(embedding_key, 2)
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise T5LoadError(f"T5 encoder blocks are not numbered 0..N-1: {sorted(blocks)}", "encoder.block")
    later_bias = sorted(
        k for k in shapes if k.endswith("relative_attention_bias.weight") and k != RELATIVE_BIAS_KEY
    )
    if later_bias:
        raise T5LoadError(
            f"T5 encoder key {later_bias[0]!r}: a relative attention bias in every block is the umT5 layout; "
            "only T5 v1.1 (one bias in block 0, shared) is supported",
            later_bias[0],
        )
    buckets, heads = shape(RELATIVE_BIAS_KEY, 2)
    q_key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    inner, q_in = shape(q_key, 2)
    if q_in != width or inner % heads:
        raise T5LoadError(
            f"T5 encoder key {q_key!r} has shape {(inner, q_in)}: expected (heads * head_dim, {width}) "
            f"with {heads} heads (from {RELATIVE_BIAS_KEY!r})",
            q_key,
        )
    ff_key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    if ff_key not in shapes and "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise T5LoadError(
            "T5 encoder has 'encoder.block.0.layer.1.DenseReluDense.wi.weight': that is the original T5 "
            "(ReLU feed-forward); only the T5 v1.1 gated-GELU layout (wi_0, wi_1) is supported",
            "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        )
    ff_width, _ = shape(ff_key, 2)
    try:
        return T5Config(
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            head_dim=inner // heads,
            ff_width=ff_width,
            layers=len(blocks),
            relative_buckets=buckets,
        )
    except ValueError as error:
        raise T5LoadError(f"T5 encoder key {RELATIVE_BIAS_KEY!r}: {error}", RELATIVE_BIAS_KEY) from error


# --------------------------------------------------------------------------- building blocks


class CastLinear(nn.Module):
    """A bias-free linear layer whose weight is cast to the input's dtype at compute time.

    The weight keeps its storage dtype (fp32, fp16, bf16, or 8-bit once a weights layer upcasts
    it); ``x`` decides the compute dtype. weight: (out, in).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in) -> (..., out) in x's dtype."""
        return F.linear(x, self.weight.to(dtype=x.dtype))


class T5LayerNorm(nn.Module):
    """RMS norm with a learned scale, no bias and no mean subtraction, computed in float32 (or float64)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, W) -> (B, T, W) float32 (float64 for float64 input)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(wide), (x.shape[-1],), weight=self.weight.to(wide), eps=self.eps)


def relative_position_buckets(
    length: int, buckets: int, max_distance: int, device: torch.device | None = None
) -> Tensor:
    """Bucket index of every (query, key) offset for bidirectional attention -> (T, T) long.

    Half of the buckets take keys after the query, half keys at or before it. Within a half,
    offsets below a quarter of the buckets get a bucket each; larger offsets share buckets
    spaced logarithmically up to ``max_distance``, beyond which all fall in the last bucket.
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    offset = positions[None, :] - positions[:, None]  # key - query
    half = buckets // 2
    exact = half // 2
    distance = offset.abs()
    # log(distance / exact) spread over the remaining (half - exact) buckets; clamp avoids log(0),
    # whose bucket the exact branch gives anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).to(torch.long)).clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, far)


class T5SelfAttention(nn.Module):
    """Multi-head self-attention with an additive position bias and unscaled logits."""

    def __init__(self, config: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.q = CastLinear(config.width, config.inner_width)
        self.k = CastLinear(config.width, config.inner_width)
        self.v = CastLinear(config.width, config.inner_width)
        self.o = CastLinear(config.inner_width, config.width)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_buckets, config.heads)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x: (B, T, W) in the compute dtype; bias: (B or 1, H, T, T) -> (B, T, W) in bias's dtype.

        The projections q, k, v run in x's dtype; the logits, softmax and ``o`` in bias's (float32
        for half compute: unscaled T5 logits and their sums can leave float16's range).
        """
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2).to(bias.dtype)
            for proj in (self.q, self.k, self.v)
        )
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(attended.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class T5SelfAttentionLayer(nn.Module):
    """Pre-norm self-attention (``layer.0`` of a block)."""

    def __init__(self, config: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5SelfAttention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.width, config.norm_eps)


class T5GatedFeedForward(nn.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)``: the gate and the output projection in float32."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi_0 = CastLinear(config.width, config.ff_width)
        self.wi_1 = CastLinear(config.width, config.ff_width)
        self.wo = CastLinear(config.ff_width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, W) in the compute dtype -> (B, T, W) float32 (or float64 when computing in it)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        gated = F.gelu(self.wi_0(x).to(wide), approximate="tanh") * self.wi_1(x).to(wide)
        return self.wo(gated)


class T5FeedForwardLayer(nn.Module):
    """Pre-norm feed-forward (``layer.1`` of a block)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(config)
        self.layer_norm = T5LayerNorm(config.width, config.norm_eps)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(config, has_relative_bias), T5FeedForwardLayer(config)])

    def forward(self, x: Tensor, bias: Tensor, compute_dtype: torch.dtype) -> Tensor:
        """x: (B, T, W) residual stream (float32, or float64) -> (B, T, W) same dtype."""
        attention, feed_forward = self.layer
        x = x + attention.SelfAttention(attention.layer_norm(x).to(compute_dtype), bias).to(x.dtype)
        return x + feed_forward.DenseReluDense(feed_forward.layer_norm(x).to(compute_dtype)).to(x.dtype)


class T5Stack(nn.Module):
    """The block list and the final norm (HF's ``encoder``)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, has_relative_bias=i == 0) for i in range(config.layers))
        self.final_layer_norm = T5LayerNorm(config.width, config.norm_eps)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids -> last hidden state after the final norm."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.width)
        self.encoder = T5Stack(config)

    def position_bias(self, length: int, device: torch.device | None = None) -> Tensor:
        """The relative position bias every block adds to its attention logits -> (1, H, T, T) float32."""
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        buckets = relative_position_buckets(
            length, self.config.relative_buckets, self.config.relative_max_distance, device=device or table.device
        )
        return table.float()[buckets].permute(2, 0, 1).unsqueeze(0)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Encode token ids.

        input_ids: (B, T) token ids (EOS 1 after the text, padding 0 after it, as the tokenizer makes them).
        attention_mask: optional (B, T), nonzero/True for tokens that may be attended to; None
            attends to every position, padding included (what SD3 and Flux do).
        compute_dtype: dtype of the input projections (see the module docstring); default the
            embedding table's dtype, float32 when that is a storage-only dtype (8-bit).
        Returns (B, T, W) in ``compute_dtype``.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if compute_dtype is None:
            # The dtype weights.storage.compute_in chose, else the storage dtype (never reading the
            # table itself, which under compute_in would upcast all of it).
            compute_dtype = storage_compute_dtype(self)
            if compute_dtype not in _COMPUTE_DTYPES:
                compute_dtype = torch.float32
        elif compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype}")
        residual_dtype = torch.float32 if compute_dtype in _HALF_DTYPES else compute_dtype
        # Gathers the prompt's rows first and converts only those.
        x = self.shared(input_ids.to(next(self.parameters()).device)).to(residual_dtype)
        bias = self.position_bias(input_ids.shape[1], device=x.device)
        if attention_mask is not None:
            blocked = ~attention_mask.to(device=x.device, dtype=torch.bool)
            # Blocked keys get the most negative float32, not -inf: a row with every key blocked
            # then averages all values instead of producing NaN.
            bias = bias.masked_fill(blocked[:, None, None, :], torch.finfo(torch.float32).min)
        bias = bias.to(residual_dtype)
        for block in self.encoder.block:
            x = block(x, bias, compute_dtype)
        return self.encoder.final_layer_norm(x).to(compute_dtype)


# --------------------------------------------------------------------------- loading


def is_t5_layout(keys: Iterable[str]) -> bool:
    """True if ``keys`` (prefix removed) are a T5 encoder in transformers' naming."""
    present = set(keys)
    return RELATIVE_BIAS_KEY in present and (EMBEDDING_KEY in present or EMBEDDING_ALIAS in present)


def t5_encoder_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A T5 encoder state dict (prefix removed) -> keys ready for strict loading.

    ``encoder.embed_tokens.weight`` becomes ``shared.weight`` when only the former is present
    (and is dropped when both are: they are one tied table); decoder / LM-head entries are dropped.
    """
    out: dict[str, Tensor] = {}
    dropped = []
    for key, tensor in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES):
            dropped.append(key)
        elif key == EMBEDDING_ALIAS:
            if EMBEDDING_KEY not in state_dict:
                out[EMBEDDING_KEY] = tensor
        else:
            out[key] = tensor
    if dropped:
        logger.info("T5 encoder: %d decoder/LM-head entries left out (e.g. %s)", len(dropped), dropped[0])
    return out


def load_t5_encoder(
    state_dict: Mapping[str, Tensor],
    *,
    config: T5Config | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> T5Encoder:
    """Build a :class:`T5Encoder` from a state dict in ``T5EncoderModel`` names (prefix removed).

    The config comes from the shapes unless given. Tensors are taken as they are (no copy, their
    dtype kept) unless ``device``/``dtype`` ask for a move or cast. Raises :class:`T5LoadError`
    naming missing, unexpected or misshapen keys.
    """
    state_dict = t5_encoder_state_dict(state_dict)
    if config is None:
        config = t5_config_from_shapes({k: v.shape for k, v in state_dict.items()})
    with torch.device("meta"):
        model = T5Encoder(config)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise T5LoadError(f"T5 encoder state dict does not fit {config}: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise T5LoadError(
            f"T5 encoder state dict does not fit {config}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}",
            first,
        )
    return model.to(device=device, dtype=dtype).eval()
