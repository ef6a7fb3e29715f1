"""Tests for nodegraph_diffusion.networks.flux: parity with diffusers FluxTransformer2DModel, the
diffusers -> BFL key conversion, config from shapes, layout detection."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from _kernel_fixtures import onednn_at_any_size  # noqa: F401 (a fixture)
from _random_weights import randomize_
from nodegraph_diffusion.networks.flux import (
    FLUX_AXES_DIM,
    FLUX_HEAD_DIM,
    Flux,
    FluxConfig,
    FluxConfigError,
    FluxInputError,
    FluxMissingKeyError,
    default_axes_dim,
    flux_config_from_shapes,
    flux_diffusers_sources,
    flux_keys_from_diffusers,
    is_flux_layout,
)
from torch import Tensor

TOL = 1e-4
AXES = (4, 4, 8)  # diffusers' own tiny Flux test split of a 16-wide head
TEXT_LEN = 7


def tiny_config(guidance: bool, depth: int = 2, single: int = 2) -> FluxConfig:
    return FluxConfig(
        hidden_size=32, num_heads=2, depth=depth, depth_single_blocks=single, context_dim=40, pooled_dim=24,
        guidance_embed=guidance, axes_dim=AXES,
    )


def diffusers_flux(config: FluxConfig, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.packed_in_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim,
        pooled_projection_dim=config.pooled_dim,
        guidance_embeds=config.guidance_embed,
        axes_dims_rope=config.axes_dim,
    )
    return randomize_(reference, seed=seed, scale=0.3)


def converted_flux(reference) -> Flux:
    state = flux_keys_from_diffusers(reference.state_dict())
    model = Flux(flux_config_from_shapes({k: v.shape for k, v in state.items()}, axes_dim=AXES))
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_forward(reference, x: Tensor, t: Tensor, context: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
    """diffusers' transformer fed as FluxPipeline feeds it: packed latents, 2-D position ids."""
    from diffusers import FluxPipeline

    batch, channels, height, width = x.shape
    packed = FluxPipeline._pack_latents(x, batch, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    txt_ids = torch.zeros(context.shape[1], 3)
    out = reference(
        hidden_states=packed, encoder_hidden_states=context, pooled_projections=y, timestep=t,
        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
    )[0]
    # _unpack_latents takes the image size in pixels (latent x vae_scale_factor).
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)


def inputs(config: FluxConfig, height: int, width: int, seed: int = 1) -> dict[str, Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, config.in_channels, height, width, generator=generator),
        "t": torch.tensor([0.93, 0.28]),
        "context": torch.randn(2, TEXT_LEN, config.context_dim, generator=generator),
        "y": torch.randn(2, config.pooled_dim, generator=generator),
        "guidance": torch.tensor([3.5, 1.0]) if config.guidance_embed else None,
    }


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("size", [(8, 12), (10, 10)], ids=["8x12", "10x10"])
def test_matches_diffusers(guidance: bool, size: tuple[int, int]) -> None:
    config = tiny_config(guidance)
    reference = diffusers_flux(config)
    model = converted_flux(reference)
    assert model.config == config
    args = inputs(config, *size)
    with torch.no_grad():
        expected = reference_forward(reference, **args)
        got = model(args["x"], args["t"], args["context"], args["y"], args["guidance"])
    assert got.shape == args["x"].shape
    assert expected.abs().max() > 0.1  # a live output, not a zero-initialised path
    assert max_err(got, expected) <= TOL


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_forward_through_the_cpu_fast_paths_matches_diffusers(guidance: bool, onednn_at_any_size) -> None:
    # Full-size models multiply through kernels' oneDNN paths; forced here at the tiny model's sizes.
    config = tiny_config(guidance)
    reference = diffusers_flux(config)
    model = converted_flux(reference)
    args = inputs(config, 8, 12)
    with torch.inference_mode():
        expected = reference_forward(reference, **args)
        got = model(args["x"], args["t"], args["context"], args["y"], args["guidance"])
    assert any(call[2] is not None for call in onednn_at_any_size)  # linear layers
    assert any(call[2] is None for call in onednn_at_any_size)  # attention
    assert any(call[3:] == ("gelu", [], "tanh") for call in onednn_at_any_size)  # MLPs with GELU fused
    assert expected.abs().max() > 0.1
    assert max_err(got, expected) <= TOL


@pytest.mark.parametrize("size", [(7, 9), (8, 5)], ids=["7x9", "8x5"])
def test_odd_size_is_padded_circularly(size: tuple[int, int]) -> None:
    """The reference packs even sizes only: feed it the circularly padded latent and crop."""
    config = tiny_config(True, depth=1, single=1)
    reference = diffusers_flux(config, seed=3)
    model = converted_flux(reference)
    args = inputs(config, *size)
    height, width = size
    padded = F.pad(args["x"], (0, width % 2, 0, height % 2), mode="circular")
    with torch.no_grad():
        expected = reference_forward(reference, **{**args, "x": padded})[:, :, :height, :width]
        got = model(args["x"], args["t"], args["context"], args["y"], args["guidance"])
    assert got.shape == args["x"].shape
    assert max_err(got, expected) <= TOL


def test_guidance_required_by_dev_and_ignored_by_schnell() -> None:
    dev = randomize_(Flux(tiny_config(True, depth=1, single=1)))
    args = inputs(dev.config, 4, 4)
    with pytest.raises(FluxInputError, match="guidance"):
        dev(args["x"], args["t"], args["context"], args["y"])
    with torch.no_grad():
        low = dev(args["x"], args["t"], args["context"], args["y"], torch.tensor([1.0, 1.0]))
        high = dev(args["x"], args["t"], args["context"], args["y"], torch.tensor([4.0, 4.0]))
    assert max_err(low, high) > 1e-3

    schnell = randomize_(Flux(tiny_config(False, depth=1, single=1)))
    with torch.no_grad():
        plain = schnell(args["x"], args["t"], args["context"], args["y"])
        given = schnell(args["x"], args["t"], args["context"], args["y"], torch.tensor([4.0, 4.0]))
    assert torch.equal(plain, given)


def test_wrong_inputs_name_what_was_expected() -> None:
    model = Flux(tiny_config(False, depth=1, single=1))
    args = inputs(model.config, 4, 4)
    with pytest.raises(FluxInputError, match="latent"):
        model(args["x"][:, :4], args["t"], args["context"], args["y"])
    with pytest.raises(FluxInputError, match="context"):
        model(args["x"], args["t"], args["context"][..., :8], args["y"])
    with pytest.raises(FluxInputError, match="pooled"):
        model(args["x"], args["t"], args["context"], args["y"][:, :8])


# --------------------------------------------------------------------------- key conversion


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_every_bfl_key_comes_from_diffusers_keys_used_once(guidance: bool) -> None:
    config = tiny_config(guidance)
    with torch.device("meta"):
        reference_keys = list(diffusers_flux_meta(config).state_dict())
        bfl_keys = set(Flux(config).state_dict())
    plan = flux_diffusers_sources(reference_keys)
    assert set(plan) == bfl_keys
    uses = Counter(source for sources in plan.values() for source in sources)
    assert set(uses) == set(reference_keys)
    assert max(uses.values()) == 1
    # Fused tensors in the original's order: q, k, v, then the single block's MLP input.
    assert plan["double_blocks.1.txt_attn.qkv.weight"] == tuple(
        f"transformer_blocks.1.attn.add_{p}_proj.weight" for p in "qkv"
    )
    assert plan["single_blocks.0.linear1.bias"] == (
        "single_transformer_blocks.0.attn.to_q.bias",
        "single_transformer_blocks.0.attn.to_k.bias",
        "single_transformer_blocks.0.attn.to_v.bias",
        "single_transformer_blocks.0.proj_mlp.bias",
    )


def diffusers_flux_meta(config: FluxConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=config.packed_in_channels, num_layers=config.depth,
        num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embed,
        axes_dims_rope=config.axes_dim,
    )


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_bfl_names_match_diffusers_single_file_converter(guidance: bool) -> None:
    """diffusers' own BFL -> diffusers converter hardcodes width 3072, so it runs on a full-width
    model on the meta device (names and shapes only; values are the parity tests' job)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    config = FluxConfig(depth=1, depth_single_blocks=1, guidance_embed=guidance)
    with torch.device("meta"):
        bfl = dict(Flux(config).state_dict())
        expected = {k: tuple(v.shape) for k, v in diffusers_flux_meta(config).state_dict().items()}
    unconsumed = dict(bfl)
    converted = convert_flux_transformer_checkpoint_to_diffusers(unconsumed)
    assert unconsumed == {}  # the converter pops every key it knows: ours are all known
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    ours = flux_keys_from_diffusers(converted)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in bfl.items()}


def test_final_adaln_halves_are_swapped_to_shift_scale() -> None:
    reference = diffusers_flux(tiny_config(False, depth=1, single=1))
    state = reference.state_dict()
    converted = flux_keys_from_diffusers(state)
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(converted["final_layer.adaLN_modulation.1.weight"], torch.cat((shift, scale)))


def test_conversion_rejects_partial_and_foreign_state_dicts() -> None:
    state = dict(diffusers_flux(tiny_config(False, depth=1, single=1)).state_dict())
    missing = dict(state)
    del missing["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(FluxMissingKeyError, match="transformer_blocks.0.attn.to_k.weight") as caught:
        flux_keys_from_diffusers(missing)
    assert caught.value.key == "transformer_blocks.0.attn.to_k.weight"
    with pytest.raises(FluxConfigError, match="controlnet_blocks.0.weight"):
        flux_keys_from_diffusers({**state, "controlnet_blocks.0.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- config from shapes


def shapes_of(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in Flux(config).state_dict().items()}


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(True),
        tiny_config(False, depth=1, single=3),
        FluxConfig(hidden_size=48, num_heads=3, mlp_ratio=2.5, depth=3, depth_single_blocks=0, context_dim=8,
                   pooled_dim=12, guidance_embed=False, axes_dim=AXES, in_channels=24, out_channels=16),
    ],
    ids=["dev", "schnell", "fill-like"],
)
def test_config_from_shapes_recovers_config(config: FluxConfig) -> None:
    assert flux_config_from_shapes(shapes_of(config), axes_dim=config.axes_dim) == config


def test_released_head_size_gets_flux_rope_axes() -> None:
    # 2 heads of 128 (released models: 24): heads come from the head size, not a hardcoded width.
    config = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_dim=64, pooled_dim=32)
    derived = flux_config_from_shapes(shapes_of(config))
    assert derived == config
    assert derived.axes_dim == FLUX_AXES_DIM and derived.num_heads == 2 and derived.guidance_embed


def test_other_head_sizes_get_proportional_rope_axes_unless_given() -> None:
    shapes = shapes_of(tiny_config(True))
    assert flux_config_from_shapes(shapes).axes_dim == (4, 6, 6)
    assert default_axes_dim(FLUX_HEAD_DIM) == FLUX_AXES_DIM and default_axes_dim(64) == (8, 28, 28)
    with pytest.raises(FluxConfigError, match="cannot be split"):
        default_axes_dim(4)
    with pytest.raises(FluxConfigError, match="summing to the head size 16"):
        flux_config_from_shapes(shapes, axes_dim=(4, 4, 4))


def test_dev_and_schnell_told_apart_by_guidance_in() -> None:
    dev = shapes_of(tiny_config(True))
    schnell = shapes_of(tiny_config(False))
    assert {k for k in dev if k not in schnell} == {
        f"guidance_in.{layer}.{p}" for layer in ("in_layer", "out_layer") for p in ("weight", "bias")
    }
    assert flux_config_from_shapes(dev, axes_dim=AXES).guidance_embed
    assert not flux_config_from_shapes(schnell, axes_dim=AXES).guidance_embed


@pytest.mark.parametrize(
    "key",
    [
        "img_in.weight",
        "txt_in.weight",
        "vector_in.in_layer.weight",
        "time_in.in_layer.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.img_mlp.0.weight",
        "single_blocks.0.linear1.weight",
        "final_layer.linear.weight",
    ],
)
def test_missing_key_is_named(key: str) -> None:
    shapes = shapes_of(tiny_config(True))
    del shapes[key]
    with pytest.raises(FluxMissingKeyError, match=key.replace(".", r"\.")) as caught:
        flux_config_from_shapes(shapes, axes_dim=AXES)
    assert caught.value.key == key


def test_gap_in_block_numbers_is_an_error() -> None:
    shapes = {k: v for k, v in shapes_of(tiny_config(True, depth=3)).items() if not k.startswith("double_blocks.1.")}
    with pytest.raises(FluxConfigError, match="double blocks"):
        flux_config_from_shapes(shapes, axes_dim=AXES)


# --------------------------------------------------------------------------- layout detection


def test_is_flux_layout() -> None:
    shapes = shapes_of(tiny_config(True))
    assert is_flux_layout(shapes)
    assert is_flux_layout([f"model.diffusion_model.{k}" for k in shapes], prefix="model.diffusion_model.")
    assert not is_flux_layout([f"model.diffusion_model.{k}" for k in shapes])
    with torch.device("meta"):
        assert not is_flux_layout(diffusers_flux_meta(tiny_config(True)).state_dict())
    # Chroma keeps double/single blocks but has no time_in / vector_in.
    assert not is_flux_layout(k for k in shapes if not k.startswith(("time_in.", "vector_in.")))
