"""Faster CPU kernels for the networks' hot spots: linear layers, gated GELU, attention, upsampling convolutions.

On the CPU, ``nn.Linear`` and ``scaled_dot_product_attention`` multiply through MKL's sgemm. torch
also ships oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's
inductor emits for CPU linear layers), which fuses the bias and an activation into the product.
On the development machine (AMD EPYC, AVX-512, one thread) it takes 0.45-0.6x the time of
``F.linear`` at the U-Net's shapes; attention written with it, a block of queries at a time so the
scores stay in cache, takes 0.6-0.8x the time of SDPA's flash kernel at head widths 40-160.
:func:`upsample_conv` does a nearest 2x upsampling and 3x3 conv with 4/9 of the multiplications.

Every function here computes the same thing as the torch expression in its docstring. oneDNN is
taken only for float32 CPU tensors when no gradient is wanted (the fused ops have no backward) and
not while torch.compile traces (inductor chooses its own kernels); otherwise the torch expression
runs. Results differ from it by float32 rounding only (summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# False: always the torch expressions (the tests compare both paths).
ONEDNN_ENABLED = True
_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Batch x height x width of an upsampler's input from which the phase form pays for forming its
# kernels (one thread): 2048 pixels 0.57-0.58x the plain time at 320-640 channels, 4096-16384 pixels
# 0.63-0.65x at 256-512; 512 pixels 1.0x at 640 channels and 1.5x at 1280 (the kernels dominate).
UPSAMPLE_PHASES_MIN_PIXELS = 2048
# Scores computed at once per (batch, head) in attention: query rows x key tokens, 1 MiB of float32,
# so a block stays in cache between the two products (against 4096 keys: 64-128 rows 0.7x the time
# of SDPA's flash kernel, 512 rows 0.9x, all 4096 rows at once 2.5x).
ATTENTION_BLOCK_ELEMENTS = 1 << 18
# Multiply-adds per (batch, head) of one product, query rows x key tokens x head width, from which
# attention takes the oneDNN blocks (one thread, against SDPA): 6e6 and more (1024x77 tokens at width
# 80, 256x256 at 160, 4096x77 at 40, 512x512 at 40) 0.6-0.76x its time, 2.6-3.2e6 (256x256 or
# 1024x77 at width 40) 1.0x, 4096 (16x16 at 16, the demo model's) 34x: two small products and a
# softmax per head cost far more than SDPA's one call.
ATTENTION_MIN_WORK = 1 << 22
# A linear layer goes through oneDNN from LINEAR_MIN_ROWS rows (all dimensions but the last) and
# LINEAR_MIN_MACS multiply-adds (rows x in x out): at 2-8 rows (the time embedding, pooled vectors)
# it takes 1.06-1.3x torch's time whatever the width, at 32 rows x 128 x 128 (5e5) 1.4x; from 2e6
# (32 x 128 x 1024, 128 x 128 x 128, 32 x 256 x 256) 0.68-0.83x, at SD1.5's sizes 0.45x.
LINEAR_MIN_ROWS = 16
LINEAR_MIN_MACS = 1 << 21
# Multiply-adds (batch x pixels x in x out channels) from which a 1x1 conv goes through oneDNN: at
# 3-4e6 (192-384 channels at 4x4-8x8 pixels) it takes 0.97-1.15x torch's time, from 1.7e7 0.5-0.75x.
POINTWISE_MIN_MACS = 1 << 23
# Multiply-adds (rows x in x out) from which a linear layer followed by GELU's tanh form goes through
# oneDNN with the activation fused, whatever the row count (one thread, against
# ``F.gelu(F.linear(...), approximate="tanh")``): from 2^20 (16 x 64 x 1024, 16 x 256 x 256, 8 x 256 x 512,
# 4 x 512 x 1024) 0.69-0.96x its time, from 2e6 0.4-0.72x, at SD3's and Flux's MLPs 0.45x (and 0.93-0.96x
# the time of the unfused oneDNN product and a separate GELU); 5e5 (16 x 128 x 256, 32 x 128 x 128)
# 1.06-1.08x, 2.6e5 (16 x 64 x 256) 1.27x, 3e4 (2 x 64 x 256) 2.3x.
GELU_LINEAR_MIN_MACS = 1 << 20
# Most intra-op threads for which attention takes the oneDNN blocks. They parallelise only inside
# each product, SDPA's flash kernel over heads and blocks: against 4096 keys 0.75x SDPA's time on
# one thread, 0.91x on two; with more (not measurable on the 2-core development machine) SDPA runs.
ATTENTION_MAX_THREADS = 2


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


def _linear_pays(x: Tensor, weight: Tensor) -> bool:
    """Whether a linear map of ``x`` by ``weight`` (out, in) is big enough for oneDNN to pay."""
    fan_in = weight.shape[-1]
    return fan_in > 0 and x.numel() >= LINEAR_MIN_ROWS * fan_in and x.numel() * weight.shape[0] >= LINEAR_MIN_MACS


def _gelu_linear_pays(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x`` by ``weight`` (out, in) followed by GELU is big enough for the fused product to pay."""
    return weight.shape[-1] > 0 and x.numel() * weight.shape[0] >= GELU_LINEAR_MIN_MACS


def linear(x: Tensor, layer: nn.Linear | nn.Conv2d) -> Tensor:
    """``layer(x)`` for a Linear; for a 1x1 Conv2d, the same map over the channels of token-major
    ``x``: ``F.linear(x, layer.weight.flatten(1), layer.bias)``. x: (..., in) -> (..., out)."""
    weight, bias = layer.weight, layer.bias
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1:
            raise ValueError(f"kernels.linear takes a 1x1 Conv2d without groups, got {layer}")
        weight = weight.flatten(1)
    # A strided weight sends oneDNN down a path many times slower than torch's.
    if weight.is_contiguous() and _linear_pays(x, weight) and onednn_usable(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if isinstance(layer, nn.Linear):
        return layer(x)
    return F.linear(x, weight, bias)


def gated_gelu(x: Tensor, proj: nn.Linear) -> Tensor:
    """GEGLU: ``hidden, gate = proj(x).chunk(2, -1); hidden * F.gelu(gate)`` (exact GELU).

    x: (..., in) -> (..., proj.out_features // 2).
    """
    weight, bias = proj.weight, proj.bias
    if not (weight.is_contiguous() and _linear_pays(x, weight) and onednn_usable(x, weight, bias)):
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


def linear_gelu_tanh(x: Tensor, layer: nn.Linear) -> Tensor:
    """``F.gelu(layer(x), approximate="tanh")``: a linear layer and GELU's tanh form (the MLPs of
    DiT, PixArt, SD3 and Flux), the activation fused into oneDNN's product. x: (..., in) -> (..., out)."""
    weight, bias = layer.weight, layer.bias
    if weight.is_contiguous() and _gelu_linear_pays(x, weight) and onednn_usable(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    return F.gelu(layer(x), approximate="tanh")


def linear_and_gelu_tanh(x: Tensor, layer: nn.Linear, plain: int) -> tuple[Tensor, Tensor]:
    """One layer whose first ``plain`` outputs are used as they are and the others through GELU's tanh
    form (Flux's single blocks: q, k and v, then the MLP's input): ``head, tail = layer(x).split([plain,
    layer.out_features - plain], -1)``, returning ``head, F.gelu(tail, approximate="tanh")``.

    On the oneDNN path two products over the weight's row ranges (contiguous views), GELU fused into
    the second; each range must pay on its own (:data:`LINEAR_MIN_MACS`, :data:`GELU_LINEAR_MIN_MACS`).
    x: (..., in) -> (..., plain), (..., out - plain).
    """
    weight, bias = layer.weight, layer.bias
    head_weight, tail_weight = weight[:plain], weight[plain:]
    if (weight.is_contiguous() and 0 < plain < weight.shape[0] and _linear_pays(x, head_weight)
            and _gelu_linear_pays(x, tail_weight) and onednn_usable(x, weight, bias)):
        head_bias = None if bias is None else bias[:plain]
        tail_bias = None if bias is None else bias[plain:]
        product = torch.ops.mkldnn._linear_pointwise
        return (product(x, head_weight, head_bias, "none", [], ""),
                product(x, tail_weight, tail_bias, "gelu", [], "tanh"))
    head, tail = layer(x).split([plain, weight.shape[0] - plain], dim=-1)
    return head, F.gelu(tail, approximate="tanh")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, scale ``head_dim ** -0.5``, heads side by side in the last dimension.

    ``F.scaled_dot_product_attention`` over ``(B, H, tokens, D)`` transposes of the inputs, the
    result transposed back and flattened. q: (B, N, H, D), k and v: (B, T, H, D) -> (B, N, H*D).
    """
    batch, tokens, heads, head_dim = q.shape
    if (tokens * k.shape[1] * head_dim < ATTENTION_MIN_WORK or torch.get_num_threads() > ATTENTION_MAX_THREADS
            or not onednn_usable(q, k, v)):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    rows = max(1, ATTENTION_BLOCK_ELEMENTS // max(1, k.shape[1]))
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


def pointwise_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a 1x1 conv without stride, padding or groups. x: (B, C, H, W) -> (B, out, H, W).

    torch runs such a conv on one thread through its own GEMM-based kernel; oneDNN's convolution
    takes 0.5-0.65x its time at the U-Net's shortcut shapes (batch 2, 640-1920 channels at 16-64
    pixels), but 0.96-1.1x at the VAE decoder's (128-512 channels at 256-512 pixels), which
    therefore calls its shortcut convs directly.
    """
    weight, bias = conv.weight, conv.bias
    if (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and x.numel() * weight.shape[0] >= POINTWISE_MIN_MACS
        and onednn_usable(x, weight, bias)
    ):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, [0, 0], [1, 1], [1, 1], 1)
    return conv(x)


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))`` for a 3x3 conv, stride 1, padding 1.

    On the CPU computed without the upsampled image: each of the four output phases (even/odd
    row, even/odd column) sees only a 2x2 neighbourhood of the input, through a 2x2 kernel whose
    taps are sums of the 3x3 kernel's (rows 0 | 1+2 for even rows, 0+1 | 2 for odd rows; columns
    alike). One 2x2 convolution with all four phases as output channels does 4/9 of the
    multiplications; the phases are then interleaved. Forming the phase kernels costs a pass over
    the weights per call, so inputs of fewer than ``UPSAMPLE_PHASES_MIN_PIXELS`` pixels (batch
    included) take the plain way. x: (B, C, H, W) -> (B, out, 2H, 2W), in the memory format the
    conv gives (channels-last input stays channels-last).
    """
    if not (
        x.device.type == "cpu"
        and x.shape[0] * x.shape[-2] * x.shape[-1] >= UPSAMPLE_PHASES_MIN_PIXELS
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not torch.compiler.is_compiling()
    ):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    batch, _, height, width = x.shape
    weight, bias = conv.weight, conv.bias
    out_channels = weight.shape[0]
    # Padding 1 on a 2x2 kernel gives (H+1, W+1) positions; phase (a, c) reads positions (i+a, j+c).
    y = F.conv2d(x, upsample_phase_weights(weight), None if bias is None else bias.repeat(4), padding=1)
    if y.is_contiguous():
        phases = y.view(batch, 2, 2, out_channels, height + 1, width + 1)
        out = y.new_empty(batch, out_channels, height, 2, width, 2)
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, :, a, :, c] = phases[:, a, c, :, a : a + height, c : c + width]
        return out.view(batch, out_channels, 2 * height, 2 * width)
    # Channels-last (the conv keeps its input's layout): y's memory is (B, H+1, W+1, 4*out), the
    # result's (B, H, 2, W, 2, out).
    phases = y.permute(0, 2, 3, 1).reshape(batch, height + 1, width + 1, 2, 2, out_channels)
    out = y.new_empty(batch, height, 2, width, 2, out_channels)
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, a, :, c] = phases[:, a : a + height, c : c + width, a, c]
    return out.view(batch, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)


def upsample_phase_weights(weight: Tensor) -> Tensor:
    """3x3 kernels (O, I, 3, 3) -> the 2x2 kernels of the four phases of a nearest-2x upsampling
    followed by them: (4*O, I, 2, 2), phase (row a, column c) at channels ``(2a + c) * O ...``."""
    out_channels, in_channels = weight.shape[:2]
    combine = _UPSAMPLE_TAP_SUMS.to(device=weight.device, dtype=weight.dtype)
    # One product: every 3x3 kernel (9 taps) -> its 16 phase taps (a, c, r, s); then phase-major.
    taps = (weight.reshape(out_channels * in_channels, 9) @ combine).view(out_channels, in_channels, 2, 2, 2, 2)
    return taps.permute(2, 3, 0, 1, 4, 5).reshape(4 * out_channels, in_channels, 2, 2)


def _upsample_tap_sums() -> Tensor:
    """(9, 16): which 3x3 taps (k, l) add up to tap (r, s) of phase (a, c). Along one axis, phase 0
    (even outputs) reads input offsets -1, 0 with kernel taps 0 | 1+2; phase 1 reads 0, +1 with 0+1 | 2."""
    rows = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase, tap, k)
    return torch.einsum("ark,csl->klacrs", rows, rows).reshape(9, 16)


_UPSAMPLE_TAP_SUMS = _upsample_tap_sums()
