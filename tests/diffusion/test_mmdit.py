"""MMDiT (SD3 / SD3.5) against diffusers' SD3Transformer2DModel, and its key layouts and detection.

Tiny configs keep 64-wide heads so that config-from-shapes (which assumes them, as the original
does) is exercised honestly; every parameter and the stored positional table are random.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _kernel_fixtures import onednn_at_any_size  # noqa: F401 (a fixture)
from _random_weights import randomize_
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from nodegraph_diffusion.networks.mmdit import (
    MMDiT,
    MMDiTConfig,
    MMDiTConfigError,
    MMDiTInputError,
    is_diffusers_mmdit_layout,
    is_mmdit_layout,
    mmdit_config_from_shapes,
    mmdit_keys_from_diffusers,
)

TOLERANCE = 1e-4
BATCH = 2
CONTEXT_TOKENS = 7
SMALL = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "depth": 3,
    "hidden_size": 128,
    "num_heads": 2,
    "pos_embed_max_size": 10,
    "context_dim": 32,
    "pooled_dim": 48,
}
# SD3-medium-like (no qk-norm, no dual attention) and SD3.5-like (RMS qk-norm, MMDiT-X block 0).
VARIANTS = {
    "sd3": MMDiTConfig(**SMALL),
    "sd35": MMDiTConfig(**SMALL, qk_norm=True, dual_attention_layers=(0,)),
}


def _diffusers_model(config: MMDiTConfig, seed: int) -> SD3Transformer2DModel:
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        num_layers=config.depth,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim,
        caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_dim,
        out_channels=config.out_channels,
        pos_embed_max_size=config.pos_embed_max_size,
        dual_attention_layers=config.dual_attention_layers,
        qk_norm="rms_norm" if config.qk_norm else None,
    )
    randomize_(model, seed=seed)
    # A buffer, so randomize_ leaves diffusers' sine table; random values catch a wrong crop.
    generator = torch.Generator().manual_seed(seed + 1)
    model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest) -> tuple[MMDiTConfig, SD3Transformer2DModel, MMDiT, dict]:
    """(config, diffusers model, ours loaded through mmdit_keys_from_diffusers, diffusers state dict)."""
    config = VARIANTS[request.param]
    reference = _diffusers_model(config, seed=len(request.param))
    diffusers_sd = reference.state_dict()
    ours = MMDiT(config)
    ours.load_state_dict(mmdit_keys_from_diffusers(diffusers_sd), strict=True)
    return config, reference, ours.eval(), diffusers_sd


def _inputs(config: MMDiTConfig, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([700.0, 35.5]),  # sigma * 1000
        "context": torch.randn(BATCH, CONTEXT_TOKENS, config.context_dim, generator=generator),
        "y": torch.randn(BATCH, config.pooled_dim, generator=generator),
    }


def _reference(model: SD3Transformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        hidden_states=inputs["x"],
        encoder_hidden_states=inputs["context"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
    ).sample


# --------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("height, width", [(8, 12), (8, 8), (12, 6)])
@torch.no_grad()
def test_forward_matches_diffusers(pair, height: int, width: int) -> None:
    config, reference, ours, _ = pair
    inputs = _inputs(config, height, width)
    expected = _reference(reference, inputs)
    got = ours(**inputs)
    assert got.shape == (BATCH, config.out_channels, height, width)
    assert expected.abs().max() > 0.1  # the comparison below means something
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.inference_mode()
def test_forward_through_the_cpu_fast_paths_matches_diffusers(pair, onednn_at_any_size) -> None:
    # Full-size models multiply through kernels' oneDNN paths; forced here at the tiny model's sizes.
    config, reference, ours, _ = pair
    inputs = _inputs(config, 8, 12)
    expected = _reference(reference, inputs)
    got = ours(**inputs)
    assert any(call[2] is not None for call in onednn_at_any_size)  # linear layers
    assert any(call[2] is None for call in onednn_at_any_size)  # attention
    assert any(call[3:] == ("gelu", [], "tanh") for call in onednn_at_any_size)  # MLPs with GELU fused
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_latent_off_the_patch_grid_is_padded_circularly_and_cropped_back(pair) -> None:
    # The original and diffusers floor such a latent (dropping its last row/column, returning a
    # smaller output); ours pads it like ComfyUI, so the output keeps the input's size.
    config, reference, ours, _ = pair
    inputs = _inputs(config, 9, 13, seed=3)
    padded = dict(inputs, x=F.pad(inputs["x"], (0, 1, 0, 1), mode="circular"))
    expected = _reference(reference, padded)[:, :, :9, :13]
    got = ours(**inputs)
    assert got.shape == (BATCH, config.out_channels, 9, 13)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_latent_larger_than_the_positional_grid_is_refused() -> None:
    config = VARIANTS["sd3"]
    with pytest.raises(MMDiTInputError, match="positional grid of 10x10"):
        MMDiT(config)(**_inputs(config, 8, 22))


def test_fresh_model_has_the_sine_cosine_positional_table() -> None:
    config = VARIANTS["sd3"]
    grid = config.pos_embed_max_size
    expected = get_2d_sincos_pos_embed(config.hidden_size, grid, base_size=grid, output_type="pt")
    assert torch.allclose(MMDiT(config).pos_embed[0], expected.float(), atol=1e-6)


# --------------------------------------------------------------------------- key layouts


def test_diffusers_conversion_inverts_diffusers_single_file_converter(pair) -> None:
    config, _, _, diffusers_sd = pair
    original = mmdit_keys_from_diffusers(diffusers_sd)
    # diffusers -> original (ours) -> diffusers (theirs): the same tensors under the same names.
    prefixed = {f"model.diffusion_model.{key}": tensor for key, tensor in original.items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(prefixed)
    assert back.keys() == diffusers_sd.keys()
    assert all(torch.equal(back[key], diffusers_sd[key]) for key in back)

    # original (a random model of ours) -> diffusers (theirs) -> original (ours).
    own = randomize_(MMDiT(config), seed=7).state_dict()
    round_trip = mmdit_keys_from_diffusers(convert_sd3_transformer_checkpoint_to_diffusers(dict(own)))
    assert round_trip.keys() == own.keys()
    assert all(torch.equal(round_trip[key], own[key]) for key in own)


def test_diffusers_conversion_refuses_unknown_keys(pair) -> None:
    _, _, _, diffusers_sd = pair
    with pytest.raises(MMDiTConfigError, match=re.escape("'image_proj.proj_in.weight'")):
        mmdit_keys_from_diffusers({**diffusers_sd, "image_proj.proj_in.weight": torch.zeros(1)})
    without_v = {k: v for k, v in diffusers_sd.items() if k != "transformer_blocks.1.attn.to_v.weight"}
    with pytest.raises(MMDiTConfigError, match=re.escape("joint_blocks.1.x_block.attn.qkv.weight")):
        mmdit_keys_from_diffusers(without_v)


def test_layout_predicates(pair) -> None:
    _, _, ours, diffusers_sd = pair
    original_keys = ours.state_dict().keys()
    assert is_mmdit_layout(original_keys) and not is_diffusers_mmdit_layout(original_keys)
    assert is_diffusers_mmdit_layout(diffusers_sd) and not is_mmdit_layout(diffusers_sd)
    unet_keys = ["input_blocks.0.0.weight", "middle_block.0.in_layers.2.weight", "out.2.weight"]
    assert not is_mmdit_layout(unet_keys) and not is_diffusers_mmdit_layout(unet_keys)


# --------------------------------------------------------------------------- config from shapes


def test_config_from_shapes_recovers_the_config(pair) -> None:
    config, _, _, diffusers_sd = pair
    shapes = {key: tuple(t.shape) for key, t in mmdit_keys_from_diffusers(diffusers_sd).items()}
    assert mmdit_config_from_shapes(shapes) == config


def test_config_from_shapes_reads_every_dual_layer_and_a_full_last_context_block() -> None:
    config = MMDiTConfig(
        **{**SMALL, "depth": 4}, qk_norm=True, dual_attention_layers=(1, 2), last_context_pre_only=False
    )
    shapes = {key: tuple(t.shape) for key, t in MMDiT(config).state_dict().items()}
    assert mmdit_config_from_shapes(shapes) == config


@pytest.mark.parametrize(
    "missing",
    [
        "x_embedder.proj.weight",
        "pos_embed",
        "context_embedder.weight",
        "y_embedder.mlp.0.weight",
        "final_layer.linear.weight",
        "joint_blocks.2.context_block.attn.qkv.weight",
    ],
)
def test_config_from_shapes_names_a_missing_key(missing: str) -> None:
    shapes = {key: tuple(t.shape) for key, t in MMDiT(VARIANTS["sd35"]).state_dict().items()}
    del shapes[missing]
    with pytest.raises(MMDiTConfigError, match=re.escape(repr(missing))):
        mmdit_config_from_shapes(shapes)
