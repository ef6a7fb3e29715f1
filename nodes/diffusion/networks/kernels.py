"""Which kernels run linear layers, gated GELU and attention: oneDNN for float32 inference on the CPU, torch's usual ops otherwise.

On the CPU, ``nn.Linear`` and ``scaled_dot_product_attention`` multiply through MKL's sgemm. torch
also ships oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's
inductor emits for CPU linear layers), which fuses the bias and an activation into the product.
On the development machine (AMD EPYC, AVX-512, one thread) it takes 0.45-0.6x the time of
``F.linear`` at the U-Net's shapes; attention written with it, a block of queries at a time so the
scores stay in cache, takes 0.6-0.8x the time of SDPA's flash kernel at head widths 40-160.

Every function here computes the same thing as the torch expression in its docstring. oneDNN is
taken only for float32 CPU tensors when no gradient is wanted (the fused ops have no backward) and
not while torch.compile traces (inductor chooses its own kernels); otherwise the torch expression
runs. Results differ from it by float32 rounding only (summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# False: always the torch expressions (tests compare both paths; a user can rule oneDNN out).
ONEDNN_ENABLED = True
_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Scores computed at once per (batch, head) in attention: query rows x key tokens, 1 MiB of float32,
# so a block stays in cache between the two products (against 4096 keys: 64-128 rows 0.7x the time
# of SDPA's flash kernel, 512 rows 0.9x, all 4096 rows at once 2.5x).
ATTENTION_BLOCK_ELEMENTS = 1 << 18


def onednn_usable(*tensors: Tensor | None) -> bool:
    """Whether these tensors (None entries ignored) may go through oneDNN: float32 on the CPU,
    no gradient wanted for any of them, not being traced by torch.compile."""
    if not (ONEDNN_ENABLED and _ONEDNN_AVAILABLE) or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != "cpu" or tensor.dtype != torch.float32 or (grad and tensor.requires_grad):
            return False
    return True


def linear(x: Tensor, layer: nn.Linear | nn.Conv2d) -> Tensor:
    """``layer(x)`` for a Linear; for a 1x1 Conv2d, the same map over the channels of token-major
    ``x``: ``F.linear(x, layer.weight.flatten(1), layer.bias)``. x: (..., in) -> (..., out)."""
    weight, bias = layer.weight, layer.bias
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1:
            raise ValueError(f"kernels.linear takes a 1x1 Conv2d without groups, got {layer}")
        weight = weight.flatten(1)
    # A strided weight sends oneDNN down a path many times slower than torch's.
    if weight.is_contiguous() and onednn_usable(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if isinstance(layer, nn.Linear):
        return layer(x)
    return F.linear(x, weight, bias)


def gated_gelu(x: Tensor, proj: nn.Linear) -> Tensor:
    """GEGLU: ``hidden, gate = proj(x).chunk(2, -1); hidden * F.gelu(gate)`` (exact GELU).

    x: (..., in) -> (..., proj.out_features // 2).
    """
    weight, bias = proj.weight, proj.bias
    if not (weight.is_contiguous() and onednn_usable(x, weight, bias)):
        hidden, gate = proj(x).chunk(2, dim=-1)
        gated = F.gelu(gate)
        # gelu's output is a fresh tensor nobody else holds; multiplying into it saves one
        # allocation the size of the widest activation in the block (not when autograd needs it).
        return gated * hidden if gated.requires_grad else gated.mul_(hidden)
    width = weight.shape[0] // 2
    # Row halves of the weight are contiguous views: two products, GELU fused into the gate's,
    # the hidden half's product multiplied into it in the same pass.
    gate_bias = None if bias is None else bias[width:]
    hidden_bias = None if bias is None else bias[:width]
    gated = torch.ops.mkldnn._linear_pointwise(x, weight[width:], gate_bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gated, weight[:width], hidden_bias, "mul")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, scale ``head_dim ** -0.5``, heads side by side in the last dimension.

    ``F.scaled_dot_product_attention`` over ``(B, H, tokens, D)`` transposes of the inputs, the
    result transposed back and flattened. q: (B, N, H, D), k and v: (B, T, H, D) -> (B, N, H*D).
    """
    batch, tokens, heads, head_dim = q.shape
    if not onednn_usable(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    rows = max(1, ATTENTION_BLOCK_ELEMENTS // k.shape[1])
    scale = head_dim**-0.5
    out = q.new_empty(batch, tokens, heads, head_dim)
    product = torch.ops.mkldnn._linear_pointwise
    for b in range(batch):
        for h in range(heads):
            # product(a, w) is a @ w.T: the keys serve as the weight, the values transposed. Each
            # operand is made contiguous once per head: oneDNN is many times slower on a strided
            # weight, and the per-head copies are small next to the scores.
            queries = q[b, :, h] * scale
            keys = k[b, :, h].contiguous()
            values_t = v[b, :, h].t().contiguous()
            for start in range(0, tokens, rows):
                scores = product(queries[start : start + rows], keys, None, "none", [], "")
                weights = torch.softmax(scores, dim=-1)
                out[b, start : start + rows, h] = product(weights, values_t, None, "none", [], "")
    return out.view(batch, tokens, heads * head_dim)
