"""Which kernels run linear layers and gated GELU: oneDNN for float32 inference on the CPU, torch's usual ops otherwise.

On the CPU, ``nn.Linear`` multiplies through MKL's sgemm. torch also ships oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's inductor emits for CPU linear
layers), which fuses the bias and an activation into the product. On the development machine (AMD
EPYC, AVX-512, one thread) it takes 0.45-0.6x the time of ``F.linear`` at the U-Net's shapes.

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

