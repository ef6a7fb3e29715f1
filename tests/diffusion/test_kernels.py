"""Tests for nodegraph_diffusion.networks.kernels: the oneDNN paths compute what the torch expressions do, and are left when they cannot apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nodegraph_diffusion.networks import kernels

from _kernel_fixtures import onednn_at_any_size  # noqa: F401 (a fixture)

needs_onednn = pytest.mark.skipif(not kernels._ONEDNN_AVAILABLE, reason="this torch build has no oneDNN ops")
# float32 rounding of sums of a few hundred products of O(1) values, in a different order.
TOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def random_linear(fan_in: int, fan_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, fan_in**-0.5)
        if bias:
            layer.bias.normal_(0.0, 0.5)
    return layer


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_takes_onednn_under_inference_and_matches_the_module(onednn_at_any_size, bias: bool) -> None:
    layer = random_linear(48, 40, bias)
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        assert kernels.onednn_usable(x, layer.weight, layer.bias)
        got = kernels.linear(x, layer)
        expected = layer(x)
    assert got.shape == (2, 9, 40)
    assert len(onednn_at_any_size) == 1  # the product went through oneDNN
    assert max_err(got, expected) <= TOL
    assert expected.abs().max() > 0.5


@needs_onednn
def test_linear_applies_a_1x1_conv_over_token_channels(onednn_at_any_size) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(24, 16, kernel_size=1)
    image = torch.randn(2, 24, 5, 3)
    tokens = image.permute(0, 2, 3, 1).reshape(2, 15, 24)
    with torch.no_grad():
        got = kernels.linear(tokens, conv)
        expected = conv(image).permute(0, 2, 3, 1).reshape(2, 15, 16)
    assert max_err(got, expected) <= TOL


def test_linear_refuses_a_conv_that_is_not_1x1() -> None:
    with pytest.raises(ValueError, match="1x1 Conv2d"):
        kernels.linear(torch.randn(1, 4, 8), nn.Conv2d(8, 8, kernel_size=3))


def test_gradients_flow_through_the_torch_path() -> None:
    # With autograd recording, oneDNN (no backward) must be left for the module itself.
    layer = random_linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    assert not kernels.onednn_usable(x, layer.weight)
    kernels.linear(x, layer).square().sum().backward()
    expected = torch.autograd.grad(layer(x).square().sum(), x)[0]
    assert x.grad is not None and torch.allclose(x.grad, expected)
    assert layer.weight.grad is not None


def test_other_dtypes_and_a_strided_weight_take_the_torch_path() -> None:
    layer = random_linear(16, 8).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        assert not kernels.onednn_usable(x, layer.weight)
        assert torch.equal(kernels.linear(x, layer), layer(x))
        strided = random_linear(16, 8)
        strided.weight = nn.Parameter(torch.randn(16, 8).t())  # (8, 16) viewed from a transpose
        x32 = torch.randn(3, 16)
        assert torch.equal(kernels.linear(x32, strided), strided(x32))


def test_disabled_onednn_gives_the_torch_results_exactly(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "ONEDNN_ENABLED", False)
    layer = random_linear(32, 64)
    x = torch.randn(2, 5, 32)
    q, k, v = torch.randn(2, 9, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, layer), layer(x))
        hidden, gate = layer(x).chunk(2, dim=-1)
        assert torch.equal(kernels.gated_gelu(x, layer), hidden * F.gelu(gate))
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        assert torch.equal(kernels.attention(q, k, v), sdpa.transpose(1, 2).reshape(2, 9, 16))


@needs_onednn
def test_gated_gelu_is_hidden_times_exact_gelu_of_gate(onednn_at_any_size) -> None:
    proj = random_linear(40, 2 * 96)
    x = torch.randn(2, 11, 40) * 2  # gate values spread over the range where GELU's tanh form differs
    with torch.inference_mode():
        got = kernels.gated_gelu(x, proj)
        hidden, gate = proj(x).chunk(2, dim=-1)
        expected = hidden * F.gelu(gate)
        tanh_form = hidden * F.gelu(gate, approximate="tanh")
    assert got.shape == (2, 11, 96)
    assert max_err(got, expected) <= TOL
    assert max_err(tanh_form, expected) > 100 * TOL  # so the comparison tells the two forms apart


@needs_onednn
@pytest.mark.parametrize("tokens, keys", [(37, 37), (37, 5), (6, 50)])
def test_attention_matches_sdpa_in_query_blocks(monkeypatch, onednn_at_any_size, tokens: int, keys: int) -> None:
    # Small blocks: several per head, the last one shorter; oneDNN whatever the thread count.
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ELEMENTS", 8 * keys)
    monkeypatch.setattr(kernels, "ATTENTION_MAX_THREADS", torch.get_num_threads())
    generator = torch.Generator().manual_seed(2)
    heads, head_dim = 3, 16
    # Views of (B, tokens, H*D) projections, as CrossAttention passes them.
    q = (torch.randn(2, tokens, heads * head_dim, generator=generator) * 2).view(2, tokens, heads, head_dim)
    k = torch.randn(2, keys, heads * head_dim, generator=generator).view(2, keys, heads, head_dim)
    v = torch.randn(2, keys, heads * head_dim, generator=generator).view(2, keys, heads, head_dim)
    with torch.inference_mode():
        assert kernels.onednn_usable(q, k, v)
        got = kernels.attention(q, k, v)
    scores = torch.einsum("bnhd,bthd->bhnt", q, k) / head_dim**0.5
    expected = torch.einsum("bhnt,bthd->bnhd", scores.softmax(-1), v).reshape(2, tokens, heads * head_dim)
    assert got.shape == (2, tokens, heads * head_dim)
    assert max_err(got, expected) <= TOL
    assert expected.std() > 0.1


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_nearest_upsampling_then_the_conv(monkeypatch, bias: bool, channels_last: bool) -> None:
    monkeypatch.setattr(kernels, "UPSAMPLE_PHASES_MIN_PIXELS", 0)
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 5, kernel_size=3, padding=1, bias=bias)
    x = torch.randn(2, 6, 5, 7)  # odd sizes: the edge phases read the zero padding
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = kernels.upsample_conv(x, conv)
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert got.shape == (2, 5, 10, 14)
    assert max_err(got, expected) <= TOL
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_upsample_phase_weights_are_sums_of_the_3x3_taps() -> None:
    weight = torch.arange(9.0).view(1, 1, 3, 3)  # taps 0..8, row-major
    phases = kernels.upsample_phase_weights(weight)
    # Phase (even row, odd column): rows 0 | 1+2, columns 0+1 | 2.
    assert phases[1, 0].tolist() == [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]]
    assert phases[2, 0].tolist() == [[0 + 3, 1 + 2 + 4 + 5], [6, 7 + 8]]
    assert phases.shape == (4, 1, 2, 2) and phases.sum().item() == 4 * weight.sum().item()


def test_upsample_conv_gradients_match_and_other_convs_run_as_given(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "UPSAMPLE_PHASES_MIN_PIXELS", 0)
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    kernels.upsample_conv(x, conv).square().sum().backward()
    got_x, got_w = x.grad.clone(), conv.weight.grad.clone()
    x.grad = conv.weight.grad = None
    conv(F.interpolate(x, scale_factor=2.0, mode="nearest")).square().sum().backward()
    assert max_err(got_x, x.grad) <= TOL * x.grad.abs().max().item()
    assert max_err(got_w, conv.weight.grad) <= TOL * conv.weight.grad.abs().max().item()
    unpadded = nn.Conv2d(3, 4, kernel_size=3)
    with torch.no_grad():
        y = torch.randn(1, 3, 4, 4)
        assert torch.equal(kernels.upsample_conv(y, unpadded), unpadded(F.interpolate(y, scale_factor=2.0, mode="nearest")))


def test_small_upsampler_inputs_take_the_plain_way(monkeypatch) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(kernels, "UPSAMPLE_PHASES_MIN_PIXELS", 2 * 4 * 4 + 1)
    with torch.no_grad():
        plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert torch.equal(kernels.upsample_conv(x, conv), plain)
        monkeypatch.setattr(kernels, "UPSAMPLE_PHASES_MIN_PIXELS", 2 * 4 * 4)
        phased = kernels.upsample_conv(x, conv)
    assert not torch.equal(phased, plain) and max_err(phased, plain) <= TOL  # the other summation order


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_matches_the_module(onednn_at_any_size, channels_last: bool) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(24, 16, kernel_size=1)
    x = torch.randn(2, 24, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = kernels.pointwise_conv(x, conv)
        expected = conv(x)
    assert max_err(got, expected) <= TOL
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    strided = nn.Conv2d(24, 16, kernel_size=1, stride=2)
    with torch.inference_mode():
        assert torch.equal(kernels.pointwise_conv(x, strided), strided(x))


def test_attention_leaves_onednn_to_sdpa_above_its_thread_limit(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "ATTENTION_MAX_THREADS", torch.get_num_threads() - 1)
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    with torch.inference_mode():
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        assert torch.equal(kernels.attention(q, k, v), sdpa.transpose(1, 2).reshape(1, 6, 16))


@needs_onednn
def test_small_products_take_the_torch_path(monkeypatch) -> None:
    # Below the sizes where oneDNN pays, the results are torch's own, bit for bit; at the
    # thresholds the oneDNN matmul runs (its results differ in the last bits). The thresholds are
    # scaled down so that small tensors show each limit.
    monkeypatch.setattr(kernels, "LINEAR_MIN_MACS", 16 * 32 * 64)
    monkeypatch.setattr(kernels, "ATTENTION_MIN_WORK", 6 * 5 * 8)
    monkeypatch.setattr(kernels, "ATTENTION_MAX_THREADS", torch.get_num_threads())
    layer, narrow = random_linear(32, 64, seed=3), random_linear(32, 8, seed=4)
    few, enough = torch.randn(kernels.LINEAR_MIN_ROWS - 1, 32), torch.randn(kernels.LINEAR_MIN_ROWS, 32)
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    conv, image = nn.Conv2d(32, 16, kernel_size=1), torch.randn(1, 32, 4, 4)
    calls = []
    product = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a) or product(*a))

    def sdpa(queries: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(1, queries.shape[1], 16)

    with torch.inference_mode():
        assert torch.equal(kernels.linear(few, layer), layer(few))  # too few rows
        assert torch.equal(kernels.linear(enough, narrow), narrow(enough))  # too few multiply-adds
        hidden, gate = layer(few).chunk(2, dim=-1)
        assert torch.equal(kernels.gated_gelu(few, layer), hidden * F.gelu(gate))
        assert torch.equal(kernels.attention(q[:, :5], k, v), sdpa(q[:, :5]))  # 5 x 5 x 8 < 6 x 5 x 8
        assert image.numel() * 16 < kernels.POINTWISE_MIN_MACS
        assert torch.equal(kernels.pointwise_conv(image, conv), conv(image))
        assert calls == []
        assert max_err(kernels.linear(enough, layer), layer(enough)) <= TOL
        assert len(calls) == 1
        assert max_err(kernels.attention(q, k, v), sdpa(q)) <= TOL
        assert len(calls) == 1 + 2 * 2  # two products per head


@needs_onednn
def test_linear_gelu_tanh_is_the_tanh_form_of_gelu_after_the_layer(onednn_at_any_size) -> None:
    layer = random_linear(40, 96, seed=7)
    x = torch.randn(2, 11, 40) * 2  # outputs spread over the range where the two GELU forms differ
    with torch.inference_mode():
        assert kernels.onednn_usable(x, layer.weight, layer.bias)
        got = kernels.linear_gelu_tanh(x, layer)
        expected = F.gelu(layer(x), approximate="tanh")
        exact_form = F.gelu(layer(x))
    assert got.shape == (2, 11, 96)
    assert max_err(got, expected) <= TOL
    assert max_err(exact_form, expected) > 30 * TOL  # so the comparison tells the two forms apart (at most 4.7e-4)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_gelu_tanh_splits_the_outputs_and_activates_the_tail(onednn_at_any_size, bias: bool) -> None:
    layer = random_linear(32, 3 * 16 + 64, bias, seed=8)  # q, k, v of width 16, then a 64-wide MLP input
    x = torch.randn(2, 9, 32) * 2
    with torch.inference_mode():
        head, tail = kernels.linear_and_gelu_tanh(x, layer, 48)
        expected_head, expected_tail = layer(x).split([48, 64], dim=-1)
        expected_tail = F.gelu(expected_tail, approximate="tanh")
    assert onednn_at_any_size, "the fused product went through oneDNN"
    assert head.shape == (2, 9, 48) and tail.shape == (2, 9, 64)
    assert max_err(head, expected_head) <= TOL
    assert max_err(tail, expected_tail) <= TOL
    assert expected_tail.abs().max() > 0.5


@needs_onednn
def test_small_gelu_products_take_the_torch_path(monkeypatch) -> None:
    # Below GELU_LINEAR_MIN_MACS (scaled down here) the results are torch's own, bit for bit; from it
    # the fused product runs. The split form needs both of its products to pay.
    monkeypatch.setattr(kernels, "GELU_LINEAR_MIN_MACS", 16 * 32 * 64)
    monkeypatch.setattr(kernels, "LINEAR_MIN_MACS", 16 * 32 * 48)
    layer, narrow = random_linear(32, 64, seed=9), random_linear(32, 48 + 63, seed=10)
    few, enough = torch.randn(15, 32), torch.randn(16, 32)
    calls = []
    product = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a) or product(*a))

    def split_then_gelu(x: torch.Tensor, linear: nn.Linear, plain: int) -> tuple[torch.Tensor, torch.Tensor]:
        head, tail = linear(x).split([plain, linear.out_features - plain], dim=-1)
        return head, F.gelu(tail, approximate="tanh")

    with torch.inference_mode():
        assert torch.equal(kernels.linear_gelu_tanh(few, layer), F.gelu(layer(few), approximate="tanh"))
        for got, expected in zip(kernels.linear_and_gelu_tanh(enough, narrow, 48), split_then_gelu(enough, narrow, 48)):
            assert torch.equal(got, expected)  # the tail's 16 x 32 x 63 falls short
        assert calls == []
        assert max_err(kernels.linear_gelu_tanh(enough, layer), F.gelu(layer(enough), approximate="tanh")) <= TOL
        assert len(calls) == 1
        monkeypatch.setattr(kernels, "ONEDNN_ENABLED", False)
        assert torch.equal(kernels.linear_gelu_tanh(enough, layer), F.gelu(layer(enough), approximate="tanh"))
        assert len(calls) == 1
