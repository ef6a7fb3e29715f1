"""PixArt-α/Σ against diffusers' PixArtTransformer2DModel, and its key layouts and config from shapes.

Tiny configs keep 64-wide heads (192 wide: 3 heads, a multiple of 3 for the micro-conditions) so that
config-from-shapes is exercised honestly. Every parameter is random, the tables included.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from _kernel_fixtures import onednn_at_any_size  # noqa: F401 (a fixture)
from _random_weights import randomize_
from diffusers import PixArtTransformer2DModel
from nodegraph_diffusion.networks.dit import DiT, DiTConfig, is_dit_layout
from nodegraph_diffusion.networks.pixart import (
    PixArt,
    PixArtConfig,
    PixArtConfigError,
    PixArtInputError,
    PixArtMissingKeyError,
    is_diffusers_pixart_layout,
    is_pixart_layout,
    pixart_config_from_shapes,
    pixart_interpolation_scale,
    pixart_keys_from_diffusers,
)

TOLERANCE = 1e-4
BATCH = 2
TOKENS = 7
SMALL = {"hidden_size": 192, "depth": 2, "num_heads": 3, "caption_dim": 32, "sample_size": 16}
VARIANTS = {
    # α 1024-MS-like: image size and aspect ratio conditions, 120-token null caption.
    "alpha_ms": PixArtConfig(**SMALL, interpolation_scale=pixart_interpolation_scale(16)),
    # Σ-like: no micro-conditions, 300-token null caption.
    "sigma": PixArtConfig(
        **SMALL, micro_conditions=False, max_token_length=300, interpolation_scale=pixart_interpolation_scale(16)
    ),
}


def _diffusers_model(config: PixArtConfig, seed: int) -> PixArtTransformer2DModel:
    model = PixArtTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        cross_attention_dim=config.hidden_size,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        caption_channels=config.caption_dim,
        interpolation_scale=config.interpolation_scale,
        use_additional_conditions=config.micro_conditions,
    )
    return randomize_(model, seed=seed)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest) -> tuple[PixArtConfig, PixArtTransformer2DModel, PixArt, dict]:
    """(config, diffusers model, ours loaded through pixart_keys_from_diffusers, diffusers state dict).

    diffusers keeps no null caption, so ours is built without one here.
    """
    config = VARIANTS[request.param]
    reference = _diffusers_model(config, seed=len(request.param))
    diffusers_sd = reference.state_dict()
    ours = PixArt(dataclasses.replace(config, null_caption=False))
    ours.load_state_dict(pixart_keys_from_diffusers(diffusers_sd), strict=True)
    return config, reference, ours.eval(), diffusers_sd


def _inputs(config: PixArtConfig, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([999.0, 17.5]),
        "context": torch.randn(BATCH, TOKENS, config.caption_dim, generator=generator),
        # The first prompt is 3 tokens long, the second fills the context.
        "context_mask": torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * TOKENS]),
    }


def _reference(
    model: PixArtTransformer2DModel,
    inputs: dict[str, torch.Tensor],
    resolution: tuple[float, float] | None = None,
    aspect_ratio: float | None = None,
) -> torch.Tensor:
    """diffusers' forward; micro-conditions default to what its pipeline passes: the decoded image size."""
    height, width = inputs["x"].shape[-2:]
    added = {"resolution": None, "aspect_ratio": None}
    if model.config.use_additional_conditions:
        resolution = resolution or (8.0 * height, 8.0 * width)
        aspect_ratio = aspect_ratio or height / width
        added = {
            "resolution": torch.tensor([resolution] * BATCH),
            "aspect_ratio": torch.tensor([[aspect_ratio]] * BATCH),
        }
    return model(
        inputs["x"],
        encoder_hidden_states=inputs["context"],
        timestep=inputs["timesteps"],
        encoder_attention_mask=inputs.get("context_mask"),
        added_cond_kwargs=added,
    ).sample


# --------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("height, width", [(16, 16), (8, 12), (12, 6), (20, 20)])
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
    assert any(call[3:] == ("gelu", [], "tanh") for call in onednn_at_any_size)  # MLPs with GELU fused
    # The first prompt's cross-attention: scores against its 3 unmasked caption tokens alone.
    assert any(call[2] is None and call[1].shape[0] == 3 for call in onednn_at_any_size)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_explicit_micro_conditions_match_diffusers() -> None:
    config = VARIANTS["alpha_ms"]
    reference = _diffusers_model(config, seed=3)
    ours = PixArt(dataclasses.replace(config, null_caption=False))
    ours.load_state_dict(pixart_keys_from_diffusers(reference.state_dict()), strict=True)
    inputs = _inputs(config, 8, 12, seed=1)
    # A size and ratio unlike the latent's, height != width, so a swap of the two would show.
    expected = _reference(reference, inputs, resolution=(1024.0, 768.0), aspect_ratio=1024 / 768)
    resolution, aspect_ratio = torch.tensor([[1024.0, 768.0]] * BATCH), torch.full((BATCH,), 1024 / 768)
    got = ours(**inputs, resolution=resolution, aspect_ratio=aspect_ratio)
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (got - ours(**inputs)).abs().max() > 1e-3  # the conditions reach the output


@torch.no_grad()
def test_latent_off_the_patch_grid_is_padded_circularly_and_cropped_back(pair) -> None:
    config, reference, ours, _ = pair
    inputs = _inputs(config, 9, 13, seed=2)
    padded = dict(inputs, x=F.pad(inputs["x"], (0, 1, 0, 1), mode="circular"))
    # Micro-conditions describe the image asked for, not the padded latent.
    expected = _reference(reference, padded, resolution=(72.0, 104.0), aspect_ratio=9 / 13)[:, :, :9, :13]
    got = ours(**inputs)
    assert got.shape == (BATCH, config.out_channels, 9, 13)
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_masked_caption_tokens_do_not_reach_the_output(pair) -> None:
    config, _, ours, _ = pair
    inputs = _inputs(config, 8, 8, seed=4)
    noisy_padding = inputs["context"].clone()
    noisy_padding[0, 3:] = 100.0
    masked = ours(**inputs)
    assert torch.equal(ours(**dict(inputs, context=noisy_padding)), masked)
    assert (ours(**dict(inputs, context_mask=None)) - masked)[0].abs().max() > 1e-3


@torch.no_grad()
def test_null_caption_is_the_learned_unconditional_context(pair) -> None:
    config, reference, _, diffusers_sd = pair
    ours = PixArt(config)
    generator = torch.Generator().manual_seed(5)
    null = torch.randn(config.max_token_length, config.caption_dim, generator=generator)
    ours.load_state_dict({**pixart_keys_from_diffusers(diffusers_sd), "y_embedder.y_embedding": null}, strict=True)
    ours.eval()
    negative = ours.null_context(BATCH)
    assert negative.shape == (BATCH, config.max_token_length, config.caption_dim)
    inputs = dict(_inputs(config, 8, 8, seed=6), context=negative, context_mask=None)
    expected = _reference(reference, {**inputs, "context": null.expand(BATCH, -1, -1)})
    assert (ours(**inputs) - expected).abs().max().item() <= TOLERANCE


def test_null_context_without_a_stored_null_caption_is_refused(pair) -> None:
    _, _, ours, _ = pair
    with pytest.raises(PixArtInputError, match="encode an empty prompt with T5"):
        ours.null_context(1)


def test_a_prompt_with_no_token_to_attend_is_refused(pair) -> None:
    config, _, ours, _ = pair
    inputs = dict(_inputs(config, 8, 8), context_mask=torch.tensor([[0] * TOKENS, [1] * TOKENS]))
    with pytest.raises(PixArtInputError, match="at least one token"):
        ours(**inputs)


def test_micro_conditions_for_a_model_without_them_are_refused() -> None:
    config = VARIANTS["sigma"]
    with pytest.raises(PixArtInputError, match="no micro-conditions"):
        PixArt(config)(**_inputs(config, 8, 8), resolution=torch.tensor([[64.0, 64.0]] * BATCH))


def test_wrong_context_width_is_refused() -> None:
    config = VARIANTS["sigma"]
    with pytest.raises(PixArtInputError, match=r"context: expected \(2, L, 32\) T5 states, got \(2, 7, 16\)"):
        PixArt(config)(**dict(_inputs(config, 8, 8), context=torch.zeros(BATCH, TOKENS, 16)))


# --------------------------------------------------------------------------- key layouts

# The original -> diffusers names of diffusers' scripts/convert_pixart_{alpha,sigma}_to_diffusers.py,
# written out here (from those scripts' names) as an independent inverse of the mapping under test.
_TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "final_layer.linear": "proj_out",
}
_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def _original_to_diffusers(original: dict[str, torch.Tensor], config: PixArtConfig) -> dict[str, torch.Tensor]:
    out = {"scale_shift_table": original["final_layer.scale_shift_table"]}
    for param in ("weight", "bias"):
        for name, target in _TOP_LEVEL.items():
            if f"{name}.{param}" in original:
                out[f"{target}.{param}"] = original[f"{name}.{param}"]
    for n in range(config.depth):
        d, o = f"transformer_blocks.{n}.", f"blocks.{n}."
        out[d + "scale_shift_table"] = original[o + "scale_shift_table"]
        for param in ("weight", "bias"):
            for name, target in _BLOCK.items():
                out[d + f"{target}.{param}"] = original[o + f"{name}.{param}"]
            q, k, v = original[o + f"attn.qkv.{param}"].chunk(3, dim=0)
            out[d + f"attn1.to_q.{param}"], out[d + f"attn1.to_k.{param}"], out[d + f"attn1.to_v.{param}"] = q, k, v
            k, v = original[o + f"cross_attn.kv_linear.{param}"].chunk(2, dim=0)
            out[d + f"attn2.to_k.{param}"], out[d + f"attn2.to_v.{param}"] = k, v
    return out


def test_diffusers_mapping_round_trips(pair) -> None:
    config, _, _, diffusers_sd = pair
    back = _original_to_diffusers(pixart_keys_from_diffusers(diffusers_sd), config)
    assert back.keys() == diffusers_sd.keys()
    assert all(torch.equal(back[key], diffusers_sd[key]) for key in back)

    own_config = dataclasses.replace(config, null_caption=False)
    own = randomize_(PixArt(own_config), seed=7).state_dict()
    round_trip = pixart_keys_from_diffusers(_original_to_diffusers(own, own_config))
    assert round_trip.keys() == own.keys()
    assert all(torch.equal(round_trip[key], own[key]) for key in own)


def test_diffusers_mapping_refuses_unknown_and_incomplete_keys(pair) -> None:
    _, _, _, diffusers_sd = pair
    with pytest.raises(PixArtConfigError, match=re.escape("'transformer_blocks.0.norm1.linear.weight'")):
        pixart_keys_from_diffusers({**diffusers_sd, "transformer_blocks.0.norm1.linear.weight": torch.zeros(1)})
    without_v = {k: v for k, v in diffusers_sd.items() if k != "transformer_blocks.1.attn2.to_v.weight"}
    with pytest.raises(PixArtConfigError, match=re.escape("blocks.1.cross_attn.kv_linear.weight")):
        pixart_keys_from_diffusers(without_v)


def test_original_files_with_their_stored_table_load_strictly(pair) -> None:
    config, _, ours, _ = pair
    own_config = dataclasses.replace(config, null_caption=False)
    stored = ours.positions(config.base_size, config.base_size, torch.device("cpu"))
    original = {**ours.state_dict(), "pos_embed": stored}
    PixArt(own_config).load_state_dict(original, strict=True)
    wrong = {**original, "pos_embed": torch.zeros(1, 4, config.hidden_size)}
    with pytest.raises(PixArtConfigError, match=r"the config's sample_size does not fit"):
        PixArt(own_config).load_state_dict(wrong, strict=True)


def test_layout_predicates(pair) -> None:
    _, _, ours, diffusers_sd = pair
    original_keys = ours.state_dict().keys()
    assert is_pixart_layout(original_keys) and not is_diffusers_pixart_layout(original_keys)
    assert is_diffusers_pixart_layout(diffusers_sd) and not is_pixart_layout(diffusers_sd)
    assert not is_dit_layout(original_keys)
    dit_keys = DiT(DiTConfig(hidden_size=128, depth=1, num_heads=2, num_classes=3, sample_size=8)).state_dict()
    assert not is_pixart_layout(dit_keys)


# --------------------------------------------------------------------------- config from shapes


def _original_shapes(config: PixArtConfig, stored_table: bool) -> dict[str, tuple[int, ...]]:
    """The shapes of an original PixArt file (null caption per config; ``pos_embed`` if stored)."""
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in PixArt(config).state_dict().items()}
    if stored_table:
        shapes["pos_embed"] = (1, config.base_size**2, config.hidden_size)
    return shapes


def test_config_from_shapes_recovers_the_config() -> None:
    alpha, sigma = VARIANTS["alpha_ms"], VARIANTS["sigma"]
    assert pixart_config_from_shapes(_original_shapes(alpha, stored_table=True)) == alpha
    # Σ files may lack the table: the trained side is then told.
    assert pixart_config_from_shapes(_original_shapes(sigma, stored_table=False), sample_size=16) == sigma


def test_config_from_shapes_of_converted_diffusers_weights(pair) -> None:
    config, _, _, diffusers_sd = pair
    converted = {key: tuple(t.shape) for key, t in pixart_keys_from_diffusers(diffusers_sd).items()}
    found = pixart_config_from_shapes(converted, sample_size=config.sample_size)
    # No null caption; the token length follows the layout's defaults (micro-conditions: α's 120, else Σ's 300).
    assert found == dataclasses.replace(config, null_caption=False)


@pytest.mark.parametrize(
    "release, stored_table, told",
    [
        (PixArtConfig(), True, {}),  # PixArt-α XL/2 1024-MS
        (PixArtConfig(micro_conditions=False, sample_size=64, interpolation_scale=1.0), True, {}),  # α 512
        (PixArtConfig(micro_conditions=False, sample_size=32, interpolation_scale=0.5), True, {}),  # α 256
        (PixArtConfig(micro_conditions=False, max_token_length=300), False, {}),  # Σ 1024-MS
        (PixArtConfig(micro_conditions=False, max_token_length=300, sample_size=256, interpolation_scale=4.0), False,
         {"sample_size": 256}),  # Σ 2K
    ],
)
def test_config_from_shapes_of_released_models(release: PixArtConfig, stored_table: bool, told: dict) -> None:
    found = pixart_config_from_shapes(_original_shapes(release, stored_table), **told)
    assert found == release and found.num_heads == 16


def test_config_from_shapes_refuses_told_values_the_weights_contradict() -> None:
    shapes = _original_shapes(VARIANTS["alpha_ms"], stored_table=True)
    with pytest.raises(PixArtConfigError, match="max_token_length 300 was given, but y_embedder.y_embedding holds 120"):
        pixart_config_from_shapes(shapes, max_token_length=300)
    with pytest.raises(PixArtConfigError, match="sample_size 32 was given, but pos_embed is a 8x8-patch grid"):
        pixart_config_from_shapes(shapes, sample_size=32)


@pytest.mark.parametrize(
    "missing",
    [
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_block.1.weight",
        "y_embedder.y_proj.fc1.weight",
        "final_layer.scale_shift_table",
        "final_layer.linear.weight",
        "ar_embedder.mlp.0.weight",
        "blocks.1.cross_attn.kv_linear.weight",
    ],
)
def test_config_from_shapes_names_a_missing_key(missing: str) -> None:
    shapes = _original_shapes(VARIANTS["alpha_ms"], stored_table=True)
    del shapes[missing]
    with pytest.raises(PixArtMissingKeyError, match=re.escape(repr(missing))) as caught:
        pixart_config_from_shapes(shapes)
    assert caught.value.key == missing
