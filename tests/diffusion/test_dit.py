"""Class-conditional DiT against diffusers' DiTTransformer2DModel, and its key layouts and config from shapes.

Tiny configs keep 64-wide heads so that config-from-shapes (which assumes them for unreleased widths)
is exercised honestly. Every parameter is random; diffusers' per-block copies of the one timestep/class
embedder are made equal, as a converted original checkpoint has them.
"""

from __future__ import annotations

import re

import pytest
import torch
from _kernel_fixtures import onednn_at_any_size  # noqa: F401 (a fixture)
from _random_weights import randomize_
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from nodegraph_diffusion.networks.dit import (
    DiT,
    DiTConfig,
    DiTConfigError,
    DiTInputError,
    DiTMissingKeyError,
    dit_config_from_shapes,
    dit_keys_from_diffusers,
    is_diffusers_dit_layout,
    is_dit_layout,
)
from nodegraph_diffusion.networks.pixart import PixArt, PixArtConfig

TOLERANCE = 1e-4
BATCH = 2
SMALL = {"patch_size": 2, "in_channels": 4, "hidden_size": 128, "depth": 2, "num_heads": 2, "num_classes": 10}
VARIANTS = {
    "learned_sigma": DiTConfig(**SMALL, sample_size=8),  # 8 output channels, as every released DiT
    "eps_only": DiTConfig(**SMALL, learn_sigma=False, sample_size=12),
}


def _diffusers_model(config: DiTConfig, seed: int) -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
        norm_eps=1e-6,  # the original's LayerNorm eps (diffusers' DiT default is 1e-5 for the MLP norm)
    )
    randomize_(model, seed=seed)
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(first.state_dict())
        # facebookresearch/DiT spaces its timestep frequencies exp(-ln(10000) * i / half); diffusers'
        # DiT embedder uses i / (half - 1) (downscale_freq_shift=1), which changes every output. Ours
        # follows the original, whose weights these are.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest) -> tuple[DiTConfig, DiTTransformer2DModel, DiT, dict]:
    """(config, diffusers model, ours loaded through dit_keys_from_diffusers, diffusers state dict)."""
    config = VARIANTS[request.param]
    reference = _diffusers_model(config, seed=len(request.param))
    diffusers_sd = reference.state_dict()
    ours = DiT(config)
    ours.load_state_dict(dit_keys_from_diffusers(diffusers_sd), strict=True)
    return config, reference, ours.eval(), diffusers_sd


def _inputs(config: DiTConfig, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, config.in_channels, height, width, generator=generator),
        "timesteps": torch.tensor([999.0, 17.5]),
        "class_labels": torch.tensor([3, config.null_class]),  # a class and the CFG null class
    }


def _reference(model: DiTTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], timestep=inputs["timesteps"], class_labels=inputs["class_labels"]).sample


class _Captured(Exception):
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


def _reference_any_shape(model: DiTTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' DiT up to its last linear layer, unpatchified here: its own unpatchify assumes a
    square grid (as the original's does), while its positions already follow the grid's rows and columns."""

    def capture(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> None:
        raise _Captured(output)

    handle = model.proj_out_2.register_forward_hook(capture)
    try:
        _reference(model, inputs)
    except _Captured as captured:
        patches = captured.output
    finally:
        handle.remove()
    p = model.config.patch_size
    rows, cols = inputs["x"].shape[-2] // p, inputs["x"].shape[-1] // p
    grid = patches.reshape(BATCH, rows, cols, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", grid).reshape(BATCH, -1, rows * p, cols * p)


# --------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("size", ["trained", "larger_square"])
@torch.no_grad()
def test_forward_matches_diffusers(pair, size: str) -> None:
    config, reference, ours, _ = pair
    side = config.sample_size if size == "trained" else config.sample_size + 4
    inputs = _inputs(config, side, side)
    expected = _reference(reference, inputs)
    got = ours(**inputs)
    assert got.shape == (BATCH, config.out_channels, side, side)
    assert expected.abs().max() > 0.1  # the comparison below means something
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.inference_mode()
def test_forward_through_the_cpu_fast_paths_matches_diffusers(pair, onednn_at_any_size) -> None:
    # Full-size models multiply through kernels' oneDNN paths; forced here at the tiny model's sizes.
    config, reference, ours, _ = pair
    side = config.sample_size
    inputs = _inputs(config, side, side)
    expected = _reference(reference, inputs)
    got = ours(**inputs)
    assert any(call[2] is None for call in onednn_at_any_size)  # attention
    assert any(call[3:] == ("gelu", [], "tanh") for call in onednn_at_any_size)  # MLPs with GELU fused
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("height, width", [(8, 12), (12, 6)])
@torch.no_grad()
def test_non_square_latent_matches_diffusers_positions_and_blocks(pair, height: int, width: int) -> None:
    config, reference, ours, _ = pair
    inputs = _inputs(config, height, width, seed=1)
    expected = _reference_any_shape(reference, inputs)
    got = ours(**inputs)
    assert got.shape == (BATCH, config.out_channels, height, width)
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_latent_off_the_patch_grid_is_padded_circularly_and_cropped_back(pair) -> None:
    config, reference, ours, _ = pair
    inputs = _inputs(config, 9, 9, seed=2)
    padded = dict(inputs, x=torch.nn.functional.pad(inputs["x"], (0, 1, 0, 1), mode="circular"))
    expected = _reference(reference, padded)[:, :, :9, :9]
    got = ours(**inputs)
    assert got.shape == (BATCH, config.out_channels, 9, 9)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_positions_are_the_original_sine_cosine_table() -> None:
    config = VARIANTS["learned_sigma"]
    grid = config.grid_size
    table = DiT(config).positions(grid, grid, torch.device("cpu"))
    expected = get_2d_sincos_pos_embed(config.hidden_size, grid, base_size=grid, output_type="pt").float()
    assert torch.allclose(table[0], expected, atol=1e-6)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([3, 11]), r"classes 0\.\.9 or the null class 10, got values in 3\.\.11"),
        (torch.tensor([-1, 2]), r"got values in -1\.\.2"),
        (torch.tensor([3.0, 1.0]), r"class_labels: expected \(2,\) integers"),
        (torch.tensor([3]), r"class_labels: expected \(2,\) integers, got \(1,\)"),
    ],
)
def test_bad_class_labels_are_refused(labels: torch.Tensor, match: str) -> None:
    config = VARIANTS["learned_sigma"]
    with pytest.raises(DiTInputError, match=match):
        DiT(config)(**dict(_inputs(config, 8, 8), class_labels=labels))


def test_wrong_latent_channels_are_refused() -> None:
    config = VARIANTS["learned_sigma"]
    with pytest.raises(DiTInputError, match=r"x: expected \(B, 4, H, W\), got \(2, 3, 8, 8\)"):
        DiT(config)(**dict(_inputs(config, 8, 8), x=torch.zeros(2, 3, 8, 8)))


# --------------------------------------------------------------------------- key layouts

# The original -> diffusers names of diffusers' scripts/convert_dit_to_diffusers.py, written out here
# (from that script's names) so the mapping under test is checked against an independent inverse.


def _original_to_diffusers(original: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {
        "pos_embed.proj.weight": original["x_embedder.proj.weight"],
        "pos_embed.proj.bias": original["x_embedder.proj.bias"],
        "proj_out_1.weight": original["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": original["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": original["final_layer.linear.weight"],
        "proj_out_2.bias": original["final_layer.linear.bias"],
    }
    for n in range(depth):
        d, o = f"transformer_blocks.{n}.", f"blocks.{n}."
        for param in ("weight", "bias"):
            out[d + f"norm1.emb.timestep_embedder.linear_1.{param}"] = original[f"t_embedder.mlp.0.{param}"]
            out[d + f"norm1.emb.timestep_embedder.linear_2.{param}"] = original[f"t_embedder.mlp.2.{param}"]
            out[d + f"norm1.linear.{param}"] = original[o + f"adaLN_modulation.1.{param}"]
            q, k, v = original[o + f"attn.qkv.{param}"].chunk(3, dim=0)
            out[d + f"attn1.to_q.{param}"], out[d + f"attn1.to_k.{param}"], out[d + f"attn1.to_v.{param}"] = q, k, v
            out[d + f"attn1.to_out.0.{param}"] = original[o + f"attn.proj.{param}"]
            out[d + f"ff.net.0.proj.{param}"] = original[o + f"mlp.fc1.{param}"]
            out[d + f"ff.net.2.{param}"] = original[o + f"mlp.fc2.{param}"]
        out[d + "norm1.emb.class_embedder.embedding_table.weight"] = original["y_embedder.embedding_table.weight"]
    return out


def test_diffusers_mapping_round_trips(pair) -> None:
    config, _, _, diffusers_sd = pair
    # diffusers -> original (ours) -> diffusers (the script's names): the same tensors under the same names.
    back = _original_to_diffusers(dit_keys_from_diffusers(diffusers_sd), config.depth)
    assert back.keys() == diffusers_sd.keys()
    assert all(torch.equal(back[key], diffusers_sd[key]) for key in back)

    # original (a random model of ours) -> diffusers -> original (ours).
    own = randomize_(DiT(config), seed=7).state_dict()
    round_trip = dit_keys_from_diffusers(_original_to_diffusers(own, config.depth))
    assert round_trip.keys() == own.keys()
    assert all(torch.equal(round_trip[key], own[key]) for key in own)


def test_diffusers_mapping_refuses_per_block_embedders_that_differ(pair) -> None:
    _, _, _, diffusers_sd = pair
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    diverged = {**diffusers_sd, key: diffusers_sd[key] + 1.0}
    with pytest.raises(DiTConfigError, match=re.escape(f"{key!r} differs from")):
        dit_keys_from_diffusers(diverged)


def test_diffusers_mapping_refuses_unknown_and_incomplete_keys(pair) -> None:
    _, _, _, diffusers_sd = pair
    with pytest.raises(DiTConfigError, match=re.escape("'transformer_blocks.0.attn2.to_q.weight'")):
        dit_keys_from_diffusers({**diffusers_sd, "transformer_blocks.0.attn2.to_q.weight": torch.zeros(1)})
    without_k = {k: v for k, v in diffusers_sd.items() if k != "transformer_blocks.1.attn1.to_k.bias"}
    with pytest.raises(DiTConfigError, match=re.escape("blocks.1.attn.qkv.bias")):
        dit_keys_from_diffusers(without_k)


def test_original_files_with_their_stored_table_load_strictly(pair) -> None:
    config, _, ours, _ = pair
    grid = config.grid_size
    stored = get_2d_sincos_pos_embed(config.hidden_size, grid, base_size=grid, output_type="pt").float()
    original = {**ours.state_dict(), "pos_embed": stored[None]}
    DiT(config).load_state_dict(original, strict=True)
    wrong = {**original, "pos_embed": torch.zeros(1, (grid + 2) ** 2, config.hidden_size)}
    with pytest.raises(DiTConfigError, match=rf"not the \(1, {grid * grid}, 128\) table of the configured"):
        DiT(config).load_state_dict(wrong, strict=True)


def test_layout_predicates(pair) -> None:
    _, _, ours, diffusers_sd = pair
    original_keys = ours.state_dict().keys()
    assert is_dit_layout(original_keys) and not is_diffusers_dit_layout(original_keys)
    assert is_diffusers_dit_layout(diffusers_sd) and not is_dit_layout(diffusers_sd)
    pixart_keys = PixArt(PixArtConfig(hidden_size=192, depth=1, num_heads=3, caption_dim=32)).state_dict().keys()
    assert not is_dit_layout(pixart_keys)


# --------------------------------------------------------------------------- config from shapes


def _original_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of an original DiT file: our state dict plus the stored positional table."""
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in DiT(config).state_dict().items()}
    shapes["pos_embed"] = (1, config.grid_size**2, config.hidden_size)
    return shapes


def test_config_from_shapes_recovers_the_config(pair) -> None:
    config, _, _, diffusers_sd = pair
    assert dit_config_from_shapes(_original_shapes(config)) == config
    # diffusers stores no positional table: the trained size comes from its config.json.
    converted = {key: tuple(t.shape) for key, t in dit_keys_from_diffusers(diffusers_sd).items()}
    assert dit_config_from_shapes(converted, sample_size=config.sample_size) == config


@pytest.mark.parametrize("sample_size, heads", [(32, 16), (64, 16)])
def test_config_from_shapes_of_released_dit_xl_2(sample_size: int, heads: int) -> None:
    xl = DiTConfig(sample_size=sample_size)  # DiT-XL/2 at 256 or 512 pixels
    found = dit_config_from_shapes(_original_shapes(xl))
    assert found == xl and found.num_heads == heads and found.num_classes == 1000 and found.out_channels == 8


def test_config_from_shapes_refuses_a_sample_size_the_table_contradicts() -> None:
    with pytest.raises(DiTConfigError, match="sample_size 16 was given, but pos_embed is a 4x4-patch grid"):
        dit_config_from_shapes(_original_shapes(VARIANTS["learned_sigma"]), sample_size=16)


@pytest.mark.parametrize(
    "missing",
    [
        "x_embedder.proj.weight",
        "pos_embed",
        "t_embedder.mlp.0.weight",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "blocks.1.attn.qkv.weight",
    ],
)
def test_config_from_shapes_names_a_missing_key(missing: str) -> None:
    shapes = _original_shapes(VARIANTS["learned_sigma"])
    del shapes[missing]
    with pytest.raises(DiTMissingKeyError, match=re.escape(repr(missing))) as caught:
        dit_config_from_shapes(shapes)
    assert caught.value.key == missing
