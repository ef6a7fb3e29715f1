"""Tests for nodegraph_diffusion.weights.patching: weights patched inside the block, restored bit for bit after it (also on errors), strength 0 is no patch."""

from __future__ import annotations

import pytest
import torch
from _random_weights import randomize_
from _unet_fixtures import TINY_SD1, unet_inputs
from nodegraph_diffusion.architectures.lora import LoraDelta
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.weights.patching import PatchError, WeightPatches, patched
from nodegraph_diffusion.weights.storage import compute_in
from torch import Tensor, nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.untouched = nn.Linear(5, 5)

    def forward(self, x: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.untouched(self.proj(x)), self.conv(image)


def random_delta(source: str, shape: tuple[int, ...], rank: int = 2, seed: int = 0, alpha: float | None = 1.0) -> LoraDelta:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=generator)
    up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=generator)
    return LoraDelta(source, down, up, alpha=alpha)


def tiny_deltas(seed: int = 0) -> dict[str, LoraDelta]:
    return {"proj.weight": random_delta("proj", (5, 6), seed=seed),
            "conv.weight": random_delta("conv", (4, 3, 3, 3), seed=seed + 1)}


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_bit_identical(module: nn.Module, before: dict[str, Tensor]) -> None:
    for name, param in module.named_parameters():
        assert param.dtype == before[name].dtype and torch.equal(param, before[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_adds_strength_times_delta_and_unpatch_restores_bit_identical(dtype):
    module = Tiny().to(dtype)
    before = snapshot(module)
    params_before = {name: p for name, p in module.named_parameters()}
    deltas = tiny_deltas()
    with patched(module, [(deltas, 0.8)]) as same:
        assert same is module
        for name, delta in deltas.items():
            base = before[name]
            want = (base.float() + 0.8 * delta.tensor(base.shape, torch.float32, "cpu")).to(dtype)
            assert torch.equal(module.get_parameter(name), want), name
        assert torch.equal(module.untouched.weight, before["untouched.weight"])
    assert_bit_identical(module, before)
    # In place: the module keeps its Parameter objects (optimizers, hooks and offloaders hold them).
    assert all(p is params_before[name] for name, p in module.named_parameters())


def test_patches_stack_as_a_sum():
    module = Tiny()
    before = snapshot(module)
    first, second = tiny_deltas(seed=0), {"proj.weight": random_delta("proj2", (5, 6), seed=7)}
    with patched(module, WeightPatches().plus(first, 1.5).plus(second, -0.5)):
        proj = module.proj.weight.detach().clone()
    want = (before["proj.weight"] + 1.5 * first["proj.weight"].tensor((5, 6), torch.float32, "cpu")
            - 0.5 * second["proj.weight"].tensor((5, 6), torch.float32, "cpu"))
    assert (proj - want).abs().max() <= 1e-6
    assert_bit_identical(module, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strength_zero_is_no_lora(dtype):
    module = Tiny().to(dtype)
    before = snapshot(module)
    x, image = torch.randn(2, 6).to(dtype), torch.randn(1, 3, 5, 5).to(dtype)
    without = module(x, image)
    with patched(module, [(tiny_deltas(), 0.0)]):
        assert_bit_identical(module, before)
        with_zero = module(x, image)
    assert all(torch.equal(a, b) for a, b in zip(without, with_zero))


def test_error_inside_the_block_restores_the_weights():
    module = Tiny().half()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="sampling failed"):
        with patched(module, [(tiny_deltas(), 1.0)]):
            assert not torch.equal(module.proj.weight, before["proj.weight"])
            raise RuntimeError("sampling failed")
    assert_bit_identical(module, before)


def test_bad_patch_leaves_the_module_untouched():
    module = Tiny()
    before = snapshot(module)
    wrong_name = {"proj.weight": random_delta("ok", (5, 6)), "missing.weight": random_delta("lora_unet_x", (5, 6))}
    with pytest.raises(PatchError, match="lora_unet_x.*missing.weight"):
        with patched(module, [(wrong_name, 1.0)]):
            pass
    wrong_shape = {"proj.weight": random_delta("ok", (5, 6)), "conv.weight": random_delta("too_small", (4, 2, 3, 3))}
    with pytest.raises(ValueError, match="too_small"):
        with patched(module, [(wrong_shape, 1.0)]):
            pass
    with pytest.raises(PatchError, match="finite"):
        with patched(module, [(tiny_deltas(), float("nan"))]):
            pass
    assert_bit_identical(module, before)


def test_nested_blocks_unwind_in_order_and_backups_can_wait_on_cpu():
    module = Tiny()
    before = snapshot(module)
    with patched(module, [(tiny_deltas(0), 1.0)], backup_device="cpu"):
        once = snapshot(module)
        with patched(module, [(tiny_deltas(5), 1.0)]):
            assert not torch.equal(module.proj.weight, once["proj.weight"])
        assert_bit_identical(module, once)
    assert_bit_identical(module, before)


def test_weight_patches_are_immutable_values():
    base = WeightPatches()
    with_lora = base.plus(tiny_deltas(), 1.0)
    assert len(base) == 0 and len(with_lora) == 1
    with pytest.raises(AttributeError):
        with_lora.entries = ()  # type: ignore[misc]


def test_two_graphs_share_one_unet_and_the_one_without_lora_sees_base_weights():
    unet = randomize_(UNet(TINY_SD1), seed=3)
    before = snapshot(unet)
    inputs = unet_inputs(TINY_SD1, batch=1, height=8, width=8)
    x, t, context = inputs["x"], inputs["timesteps"], inputs["context"]
    with torch.no_grad():
        base_out = unet(x, t, context)
        name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        deltas = {name: random_delta("to_k", tuple(before[name].shape), seed=4)}
        with patched(unet, WeightPatches().plus(deltas, 1.0)):
            lora_out = unet(x, t, context)
        again = unet(x, t, context)
    assert (lora_out - base_out).abs().max() > 1e-4
    assert torch.equal(again, base_out)
    assert_bit_identical(unet, before)


def test_fp16_text_encoder_unpatch_is_bit_identical():
    config = TextEncoderConfig(vocab_size=64, width=32, layers=2, heads=2, intermediate_size=48, eos_token_id=63)
    encoder = randomize_(CLIPTextEncoder(config), seed=5).half()
    before = snapshot(encoder)
    deltas = {name: random_delta(name, tuple(p.shape), seed=i)
              for i, (name, p) in enumerate(before.items()) if name.endswith("proj.weight")}
    assert len(deltas) == 8
    with patched(encoder, [(deltas, 0.3)]):
        assert sum(not torch.equal(encoder.get_parameter(n), before[n]) for n in deltas) == len(deltas)
    assert_bit_identical(encoder, before)


def fp8_tiny(seed: int = 0) -> Tiny:
    """Tiny with every parameter stored in float8_e4m3fn (as an fp8 file holds it), run in float32."""
    module = Tiny()
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.to(torch.float8_e4m3fn)
    return compute_in(module, torch.float32)


def stored_bits(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().view(torch.uint8).clone() for name, p in module.named_parameters()}


def test_patch_on_fp8_weight_applies_at_compute_and_restores_bit_for_bit():
    module = fp8_tiny()
    bits = stored_bits(module)
    params_before = dict(module.named_parameters())
    x, image = torch.randn(2, 6), torch.randn(1, 3, 5, 5)
    deltas = tiny_deltas()
    # The reference: the upcast fp32 weights with the patch added in fp32.
    reference = Tiny()
    state = {name: p.float() for name, p in module.state_dict().items()}
    for name, delta in deltas.items():
        state[name] = state[name] + 0.8 * delta.tensor(state[name].shape, torch.float32, "cpu")
    reference.load_state_dict(state)
    with torch.no_grad():
        base = module(x, image)
        with patched(module, [(deltas, 0.8)]) as same:
            assert same is module
            inside = module(x, image)
            # fp8 cannot hold W + delta: the stored bits never change, not even inside the block.
            assert all(torch.equal(p.detach().view(torch.uint8), bits[n]) for n, p in module.named_parameters())
        after = module(x, image)
        want = reference(x, image)
    for got, expected in zip(inside, want):
        assert (got - expected).abs().max() <= 1e-6
    assert not torch.equal(inside[0], base[0]) and not torch.equal(inside[1], base[1])
    assert all(torch.equal(a, b) for a, b in zip(after, base))
    assert all(p is params_before[n] and p.dtype == torch.float8_e4m3fn for n, p in module.named_parameters())
    assert all(torch.equal(p.detach().view(torch.uint8), bits[n]) for n, p in module.named_parameters())


def test_fp8_patches_nest_and_unwind_also_on_errors():
    module = fp8_tiny()
    x, image = torch.randn(2, 6), torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        base = module(x, image)
        with patched(module, [(tiny_deltas(0), 1.0)]):
            once = module(x, image)
            with pytest.raises(RuntimeError, match="sampling failed"):
                with patched(module, [(tiny_deltas(5), 1.0)]):
                    assert not torch.equal(module(x, image)[0], once[0])
                    raise RuntimeError("sampling failed")
            assert all(torch.equal(a, b) for a, b in zip(module(x, image), once))
        assert all(torch.equal(a, b) for a, b in zip(module(x, image), base))


def test_bad_patch_on_fp8_fails_before_sampling_and_leaves_no_patch():
    module = fp8_tiny()
    x, image = torch.randn(2, 6), torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        base = module(x, image)
        wrong_shape = {"proj.weight": random_delta("ok", (5, 6)), "conv.weight": random_delta("too_small", (4, 2, 3, 3))}
        with pytest.raises(ValueError, match="too_small"):
            with patched(module, [(wrong_shape, 1.0)]):
                pass
        assert all(torch.equal(a, b) for a, b in zip(module(x, image), base))


def test_fp8_weight_that_is_not_upcast_at_compute_is_refused():
    module = Tiny()
    module.proj.weight.data = module.proj.weight.data.to(torch.float8_e4m3fn)
    before = module.proj.weight.detach().view(torch.uint8).clone()
    with pytest.raises(PatchError, match="'proj.weight' is stored in torch.float8_e4m3fn.*compute_in"):
        with patched(module, [(tiny_deltas(), 1.0)]):
            pass
    assert torch.equal(module.proj.weight.detach().view(torch.uint8), before)
