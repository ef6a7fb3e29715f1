"""Tests for nodegraph_diffusion.weights.storage: fp8 (and fp16/bf16) weights kept in their storage dtype and upcast per layer at compute, scaled-fp8 files, and the Materializer keeping file dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _random_weights import randomize_
from _unet_fixtures import TINY_SD1, unet_inputs
from nodegraph_diffusion.networks.flux import Flux, FluxConfig, flux_config_from_shapes
from nodegraph_diffusion.networks.mmdit import MMDiT, MMDiTConfig
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.text.t5 import T5Config, T5Encoder, load_t5_encoder
from nodegraph_diffusion.weights.loading import Materializer, instantiate
from nodegraph_diffusion.weights.safetensors_io import SafetensorsFile
from nodegraph_diffusion.weights.storage import (
    FLOAT8_DTYPES,
    StorageError,
    WeightScaleError,
    compute_dtype,
    compute_in,
    dequantize,
    split_weight_scales,
    storage_bytes,
)
from safetensors.torch import save_file
from torch import Tensor, nn

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLUX_AXES = (4, 4, 8)


class Tiny(nn.Module):
    """Every kind of layer compute_in has to cover, plus a custom module that reads its own parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.group = nn.GroupNorm(2, 4)
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, ids: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """ids: (B, T) -> (B, T, 8); image: (B, 3, H, W) -> (B, 4, H, W)."""
        text = self.rms(self.norm(self.proj(self.embed(ids))))
        return text, self.group(self.conv(image)) * self.gain[:, None, None]


def tiny_inputs(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 11, (2, 5), generator=generator), torch.randn(2, 3, 6, 6, generator=generator).to(dtype)


def stored_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with every floating parameter converted to ``dtype`` (as an fp8 file would hold it)."""
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.to(dtype)
    return module


def upcast_copy(module: nn.Module, stored: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` (a fresh instance) loaded with ``stored``'s tensors converted to ``dtype``: the whole-model copy compute_in avoids."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in stored.state_dict().items()}
    module.load_state_dict(state, assign=True)
    return module.eval()


def assert_outputs_equal(got: Tensor | tuple[Tensor, ...], want: Tensor | tuple[Tensor, ...]) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("storage", FP8)
def test_fp8_layers_compute_exactly_as_their_upcast_copy_and_stay_fp8(storage):
    model = stored_in(randomize_(Tiny(), seed=1), storage)
    params_before = dict(model.named_parameters())
    bytes_before = {name: p.detach().view(torch.uint8).clone() for name, p in params_before.items()}
    reference = upcast_copy(Tiny(), model, torch.float32)

    assert compute_in(model, torch.float32) is model
    with torch.no_grad():
        got = model(*tiny_inputs())
        want = reference(*tiny_inputs())
    assert_outputs_equal(got, want)
    # Nothing converted or replaced: the same Parameter objects, in fp8, with the same bits.
    for name, param in model.named_parameters():
        assert param is params_before[name] and param.dtype == storage
        assert torch.equal(param.detach().view(torch.uint8), bytes_before[name]), name
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(t.dtype == storage for t in model.state_dict().values())
    assert compute_dtype(model) == torch.float32 and next(model.parameters()).dtype == storage
    assert isinstance(model.proj, nn.Linear) and repr(model.proj) == repr(reference.proj)


def test_bf16_compute_of_fp8_storage_is_exact_and_fp16_storage_computes_in_fp32():
    model = stored_in(randomize_(Tiny(), seed=2), torch.float8_e4m3fn)
    reference = upcast_copy(Tiny(), model, torch.bfloat16)
    compute_in(model, torch.bfloat16)
    with torch.no_grad():
        # Every e4m3 value is a bf16 value: the upcast copy is exact, so are the outputs.
        assert_outputs_equal(model(*tiny_inputs(torch.bfloat16)), reference(*tiny_inputs(torch.bfloat16)))

    half = stored_in(randomize_(Tiny(), seed=2), torch.float16)
    reference = upcast_copy(Tiny(), half, torch.float32)
    compute_in(half, torch.float32)
    with torch.no_grad():
        assert_outputs_equal(half(*tiny_inputs()), reference(*tiny_inputs()))
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_compute_in_again_switches_the_compute_dtype():
    model = stored_in(randomize_(Tiny(), seed=4), torch.float8_e5m2)
    compute_in(model, torch.float32)
    compute_in(model, torch.bfloat16)
    reference = upcast_copy(Tiny(), model, torch.bfloat16)
    with torch.no_grad():
        assert_outputs_equal(model(*tiny_inputs(torch.bfloat16)), reference(*tiny_inputs(torch.bfloat16)))
    assert compute_dtype(model) == torch.bfloat16


def test_compute_in_refuses_a_storage_only_dtype_and_unknown_scales():
    model = Tiny()
    with pytest.raises(StorageError, match="compute dtype must be one of"):
        compute_in(model, torch.float8_e4m3fn)
    with pytest.raises(StorageError, match="does not have: proj.scale"):
        compute_in(model, torch.float32, scales={"proj.scale": torch.tensor(2.0)})
    with pytest.raises(StorageError, match=r"scale of 'proj.weight' has shape \(3,\)"):
        compute_in(model, torch.float32, scales={"proj.weight": torch.ones(3)})


# --------------------------------------------------------------------------- the networks


def flux_config() -> FluxConfig:
    return FluxConfig(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, context_dim=40, pooled_dim=24,
                      axes_dim=FLUX_AXES)


def flux_inputs(config: FluxConfig, dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(5)
    return (
        torch.randn(2, config.in_channels, 6, 10, generator=generator).to(dtype),
        torch.tensor([0.9, 0.2]),
        torch.randn(2, 7, config.context_dim, generator=generator).to(dtype),
        torch.randn(2, config.pooled_dim, generator=generator).to(dtype),
        torch.tensor([3.5, 1.0]),
    )


def save_fp8_flux(path: Path, storage: torch.dtype, scaled: bool = False) -> dict[str, Tensor]:
    """A tiny random Flux in the BFL layout, every tensor in ``storage`` (as flux1-dev-fp8 files hold
    them: biases and norm scales too). ``scaled``: the ComfyUI scaled-fp8 layout, each Linear weight
    stored as W / s with ``scale_weight`` s (per tensor; one per output channel for img_in),
    ``scale_input`` and the ``scaled_fp8`` marker. Returns what was written."""
    state = randomize_(Flux(flux_config()), seed=6, scale=0.3).state_dict()
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if scaled and key.endswith(".weight") and tensor.ndim == 2:
            layer = key[: -len(".weight")]
            per_channel = key == "img_in.weight"
            scale = tensor.abs().amax(dim=1) / 448 if per_channel else tensor.abs().max().reshape(()) / 448
            divisor = scale[:, None] if per_channel else scale
            out[key] = (tensor / divisor).to(storage)
            out[f"{layer}.scale_weight"] = scale.float()
            out[f"{layer}.scale_input"] = torch.ones(())
        else:
            out[key] = tensor.to(storage)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=storage)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return out


def load_flux(path: Path, keep_fp8: bool) -> Flux:
    """What a loader does: tensors from the file (fp8 kept, or converted to fp32), module built on meta, run in fp32."""
    source = SafetensorsFile(path)
    materializer = Materializer(source, torch.device("cpu"), torch.float32, keep_dtypes=FLOAT8_DTYPES if keep_fp8 else ())
    weights, scales = split_weight_scales(materializer.state_dict("", lambda key: False), str(path))
    config = flux_config_from_shapes({k: v.shape for k, v in weights.items()}, axes_dim=FLUX_AXES)
    model, unexpected = instantiate(lambda: Flux(config), weights, "Flux", str(path), strict=True)
    assert unexpected == []
    return compute_in(model, torch.float32, scales)


@pytest.mark.parametrize("storage", FP8)
def test_tiny_flux_file_in_fp8_runs_as_its_fp32_upcast(tmp_path, storage):
    path = tmp_path / "flux-fp8.safetensors"
    written = save_fp8_flux(path, storage)
    kept = load_flux(path, keep_fp8=True)
    upcast = load_flux(path, keep_fp8=False)

    assert all(p.dtype == storage for p in kept.parameters())
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    # The model holds the file's bytes and no more (4x less than the upcast one).
    assert storage_bytes(kept) == sum(t.numel() * t.element_size() for t in written.values())
    assert storage_bytes(upcast) == 4 * storage_bytes(kept)
    with torch.no_grad():
        assert_outputs_equal(kept(*flux_inputs(kept.config)), upcast(*flux_inputs(upcast.config)))
    assert all(p.dtype == storage for p in kept.parameters())
    assert set(kept.state_dict()) == set(written)


def test_scaled_fp8_flux_file_equals_weight_times_scale(tmp_path):
    path = tmp_path / "flux-fp8-scaled.safetensors"
    written = save_fp8_flux(path, torch.float8_e4m3fn, scaled=True)
    model = load_flux(path, keep_fp8=True)

    # The reference: a plain fp32 Flux holding fp8 weight (upcast) * scale, computed by hand.
    expected_state = {}
    for key, tensor in written.items():
        if key.endswith(("scale_weight", "scale_input")) or key == "scaled_fp8":
            continue
        scale_key = key[: -len("weight")] + "scale_weight"
        weight = tensor.float()
        if scale_key in written:
            scale = written[scale_key]
            weight = weight * (scale[:, None] if scale.ndim else scale)
        expected_state[key] = weight
    reference = Flux(model.config)
    reference.load_state_dict(expected_state)
    with torch.no_grad():
        assert_outputs_equal(model(*flux_inputs(model.config)), reference.eval()(*flux_inputs(model.config)))
    assert all(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    assert set(model.state_dict()) == set(expected_state)  # scales are not state, the file keys are unchanged


def test_mmdit_unet_and_t5_in_fp8_equal_their_upcast_copies():
    config = MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=2, hidden_size=128, num_heads=2,
                         pos_embed_max_size=8, context_dim=32, pooled_dim=48, qk_norm=True, dual_attention_layers=(0,))
    mmdit = stored_in(randomize_(MMDiT(config), seed=7), torch.float8_e4m3fn)
    # pos_embed is a buffer stored in every file: fp8 there too.
    mmdit.pos_embed = mmdit.pos_embed.to(torch.float8_e4m3fn)
    reference = upcast_copy(MMDiT(config), mmdit, torch.float32)
    compute_in(mmdit, torch.float32)
    generator = torch.Generator().manual_seed(8)
    x, context, y = torch.randn(1, 16, 6, 8, generator=generator), torch.randn(1, 5, 32, generator=generator), torch.randn(1, 48, generator=generator)
    with torch.no_grad():
        assert_outputs_equal(mmdit(x, torch.tensor([500.0]), context, y), reference(x, torch.tensor([500.0]), context, y))

    unet = stored_in(randomize_(UNet(TINY_SD1), seed=9), torch.float8_e5m2)
    reference = upcast_copy(UNet(TINY_SD1), unet, torch.float32)
    compute_in(unet, torch.float32)
    inputs = unet_inputs(TINY_SD1, batch=1, height=8, width=8)
    with torch.no_grad():
        assert_outputs_equal(unet(inputs["x"], inputs["timesteps"], inputs["context"]),
                             reference(inputs["x"], inputs["timesteps"], inputs["context"]))

    t5_config = T5Config(vocab_size=160, width=48, heads=4, head_dim=16, ff_width=80, layers=2)
    t5 = stored_in(randomize_(T5Encoder(t5_config), seed=10), torch.float8_e4m3fn)
    reference = upcast_copy(T5Encoder(t5_config), t5, torch.float32)
    compute_in(t5, torch.float32)
    ids = torch.randint(2, 160, (2, 9), generator=generator)
    with torch.no_grad():
        assert_outputs_equal(t5(ids), reference(ids))


def test_scaled_fp8_t5_as_comfyui_ships_it():
    """t5xxl_fp8_e4m3fn_scaled: projections in fp8 with ``scale_weight``/``scale_input``, a ``scaled_fp8`` marker; norms and the table fp16."""
    config = T5Config(vocab_size=160, width=48, heads=4, head_dim=16, ff_width=80, layers=2)
    state = randomize_(T5Encoder(config), seed=11).state_dict()
    file_state: dict[str, Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    expected: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            scale = tensor.abs().max() / 448
            stored = (tensor / scale).to(torch.float8_e4m3fn)
            file_state[key] = stored
            file_state[key.replace(".weight", ".scale_weight")] = scale
            file_state[key.replace(".weight", ".scale_input")] = torch.ones(())
            expected[key] = stored.float() * scale
        else:
            file_state[key] = tensor.half()
            expected[key] = tensor.half().float()
    weights, scales = split_weight_scales(file_state, "t5xxl_fp8_e4m3fn_scaled.safetensors")
    assert len(scales) == 7 * config.layers and set(weights) == set(state)
    model = compute_in(load_t5_encoder(weights), torch.float32, scales)
    reference = load_t5_encoder(expected)
    ids = torch.randint(2, 160, (1, 12), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert_outputs_equal(model(ids), reference(ids))


# --------------------------------------------------------------------------- scales and files


def test_split_weight_scales_reads_both_spellings_and_drops_activation_scales():
    weight = torch.randn(4, 3).to(torch.float8_e4m3fn)
    config = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    weights, scales = split_weight_scales({
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "a.weight": weight, "a.bias": torch.zeros(4), "a.scale_weight": torch.tensor(0.5), "a.scale_input": torch.ones(()),
        "b.weight": weight, "b.weight_scale": torch.full((4,), 2.0), "b.input_scale": torch.ones(()), "b.comfy_quant": config,
        "c.weight": weight,
    })
    assert set(weights) == {"a.weight", "a.bias", "b.weight", "c.weight"}
    assert set(scales) == {"a.weight", "b.weight"}
    assert torch.equal(dequantize(weight, scales["a.weight"], torch.float32), weight.float() * 0.5)
    assert torch.equal(dequantize(weight, scales["b.weight"], torch.float32), weight.float() * 2.0)


@pytest.mark.parametrize(("entries", "message"), [
    ({"a.scale_weight": torch.tensor(1.0)}, "scale for 'a.weight' but the file has no such weight"),
    ({"a.weight": torch.zeros(4, 3), "a.scale_weight": torch.ones(3)}, r"scale of 'a.weight' has shape \(3,\)"),
    ({"a.weight": torch.zeros(4, 3), "a.scale_weight": torch.ones(()), "a.weight_scale": torch.ones(())}, "second scale"),
    ({"a.weight": torch.zeros(4, 3), "a.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)},
     "'a.comfy_quant': quantisation format 'nvfp4' is not supported"),
])
def test_split_weight_scales_names_the_file_and_key_it_cannot_use(entries, message):
    with pytest.raises(WeightScaleError, match=message) as error:
        split_weight_scales(entries, "flux-scaled.safetensors")
    assert error.value.path == "flux-scaled.safetensors"


def test_scaled_embedding_rows_and_per_channel_conv():
    model = stored_in(randomize_(Tiny(), seed=13), torch.float8_e4m3fn)
    scales = {"embed.weight": torch.tensor(0.25), "conv.weight": torch.linspace(0.5, 2.0, 4), "proj.weight": torch.tensor(3.0)}
    reference = Tiny()
    state = {k: v.float() for k, v in model.state_dict().items()}
    for name, scale in scales.items():
        state[name] = state[name] * scale.reshape(-1, *[1] * (state[name].ndim - 1))
    reference.load_state_dict(state)
    compute_in(model, torch.float32, scales)
    with torch.no_grad():
        assert_outputs_equal(model(*tiny_inputs()), reference.eval()(*tiny_inputs()))
    assert "_storage_scale_weight" not in model.embed.state_dict()


def test_materializer_keeps_fp8_and_scales_and_converts_the_rest(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({
        "a.weight": torch.randn(4, 3).to(torch.float8_e4m3fn),
        "a.scale_weight": torch.tensor(0.1234567),
        "a.bias": torch.randn(4).half(),
        "steps": torch.arange(3),
    }, str(path))
    kept = Materializer(SafetensorsFile(path), torch.device("cpu"), torch.bfloat16, keep_dtypes=FLOAT8_DTYPES)
    dtypes = {name: kept.tensor(name).dtype for name in ("a.weight", "a.scale_weight", "a.bias", "steps")}
    assert dtypes == {"a.weight": torch.float8_e4m3fn, "a.scale_weight": torch.float32, "a.bias": torch.bfloat16,
                      "steps": torch.int64}
    converted = Materializer(SafetensorsFile(path), torch.device("cpu"), torch.bfloat16)
    assert converted.tensor("a.weight").dtype == torch.bfloat16
    assert converted.tensor("a.scale_weight").dtype == torch.bfloat16
