"""Tests for nodegraph_diffusion.vae.autoencoder: parity with diffusers AutoencoderKL, layouts, config from shapes, tiling, scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodegraph_diffusion.vae import autoencoder as vae
from nodegraph_diffusion.vae.autoencoder import AutoencoderKL, VAEConfig, VAELoadError
from _random_weights import randomize_

TOL = 1e-4

# Three levels (f = 4), one ResNet per level: every layer kind occurs and it runs in milliseconds.
TINY = VAEConfig(channels=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)


def diffusers_vae(config: VAEConfig):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = len(config.ch_mult)
    reference = DiffusersAutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
    )
    return randomize_(reference, scale=0.3)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def reference_and_ours():
    reference = diffusers_vae(TINY)
    state_dict = vae.ldm_vae_keys_from_diffusers(reference.state_dict())
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(state_dict, strict=True)
    return reference, ours, state_dict


def assert_same_vae(reference, ours: AutoencoderKL) -> None:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 24, 32, generator=generator) * 2 - 1
    latent = torch.randn(2, 4, 6, 8, generator=generator)
    with torch.no_grad():
        expected = reference.encode(image).latent_dist
        got = ours.encode(image)
        assert got.mean.shape == (2, 4, 6, 8)
        assert max_err(got.mean, expected.mean) <= TOL
        assert max_err(got.logvar, expected.logvar) <= TOL
        decoded = ours.decode(latent)
        assert decoded.shape == (2, 3, 24, 32)
        assert max_err(decoded, reference.decode(latent).sample) <= TOL
    # The check is only meaningful if the outputs are not trivially small.
    assert expected.mean.abs().max() > 0.1 and decoded.abs().max() > 0.1


@pytest.mark.parity
def test_matches_diffusers_autoencoder_kl(reference_and_ours) -> None:
    reference, ours, _ = reference_and_ours
    assert_same_vae(reference, ours)


@pytest.mark.parity
def test_matches_diffusers_with_conv_attention_weights(reference_and_ours) -> None:
    """LDM files store the mid attention q/k/v/proj_out as 1x1 convs: (C, C, 1, 1)."""
    reference, _, state_dict = reference_and_ours
    conv_state = dict(state_dict)
    attention_weights = [k for k in conv_state if ".mid.attn_1." in k and k.endswith(".weight") and not k.endswith("norm.weight")]
    assert len(attention_weights) == 8
    for key in attention_weights:
        conv_state[key] = conv_state[key][:, :, None, None].clone()
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(conv_state, strict=True)
    assert ours.encoder.mid.attn_1.q.weight.ndim == 2
    assert_same_vae(reference, ours)


@pytest.mark.parity
def test_load_vae_accepts_diffusers_layout_directly(reference_and_ours) -> None:
    reference, _, _ = reference_and_ours
    # Shapes cannot reveal norm_groups=8 (SD VAEs all use 32), so pass the config.
    ours = vae.load_vae(reference.state_dict(), config=TINY)
    assert_same_vae(reference, ours)


def test_module_names_are_the_ldm_single_file_layout() -> None:
    keys = AutoencoderKL(TINY).state_dict().keys()
    for expected in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.mid.block_2.norm2.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.up.2.block.1.conv2.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.norm_out.bias",
    ]:
        assert expected in keys
    # The last encoder level does not downsample; the first decoder level does not upsample.
    assert not any(k.startswith(("encoder.down.2.downsample", "decoder.up.0.upsample")) for k in keys)
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in keys


def test_diffusers_mapping_rejects_unknown_key() -> None:
    with pytest.raises(VAELoadError, match="encoder.bogus.weight"):
        vae.ldm_vae_keys_from_diffusers({"encoder.down_blocks.0.resnets.0.norm1.weight": torch.zeros(1),
                                         "encoder.bogus.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        VAEConfig(channels=8, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=4, mid_attention=False),
        VAEConfig(channels=8, ch_mult=(2, 3), num_res_blocks=1, z_channels=16, latent_channels=16,
                  norm_groups=4, use_quant_conv=False, use_post_quant_conv=False, in_channels=4, out_channels=1),
    ],
)
def test_config_from_shapes_round_trip(config: VAEConfig) -> None:
    shapes = {k: v.shape for k, v in AutoencoderKL(config).state_dict().items()}
    assert vae.vae_config_from_shapes(shapes, norm_groups=config.norm_groups) == config


def test_config_from_shapes_takes_scaling_from_family() -> None:
    shapes = {k: v.shape for k, v in AutoencoderKL(TINY).state_dict().items()}
    sdxl = vae.vae_config_from_shapes(shapes, family="sdxl", norm_groups=8)
    assert (sdxl.scaling_factor, sdxl.shift_factor) == (0.13025, 0.0)
    assert vae.vae_config_from_shapes(shapes, family="sd2", norm_groups=8).scaling_factor == 0.18215
    with pytest.raises(VAELoadError, match="unknown model family 'sd9'"):
        vae.vae_config_from_shapes(shapes, family="sd9", norm_groups=8)


def test_load_vae_reports_missing_keys() -> None:
    state_dict = AutoencoderKL(TINY).state_dict()
    del state_dict["decoder.norm_out.weight"]
    with pytest.raises(VAELoadError, match="decoder.norm_out.weight"):
        vae.load_vae(state_dict, config=TINY)


def test_load_vae_builds_from_ldm_state_dict_with_training_keys() -> None:
    source = randomize_(AutoencoderKL(TINY), seed=3, scale=0.3)
    state_dict = dict(source.state_dict())
    state_dict["loss.logvar"] = torch.zeros(())
    loaded = vae.load_vae(state_dict, family="sdxl", config=vae.vae_config_from_shapes(
        {k: v.shape for k, v in source.state_dict().items()}, family="sdxl", norm_groups=8))
    assert loaded.config.scaling_factor == 0.13025
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), source.decode(z))


def test_latent_scaling_round_trip_and_values() -> None:
    z = torch.randn(2, 4, 8, 8)
    for family, scaling in vae.LATENT_SCALING.items():
        assert torch.allclose(scaling.to_vae(scaling.to_diffusion(z)), z, atol=1e-6), family
    flux = vae.LATENT_SCALING["flux"]
    assert torch.allclose(flux.to_diffusion(z), (z - 0.1159) * 0.3611)
    model = AutoencoderKL(VAEConfig(channels=8, ch_mult=(1,), num_res_blocks=1, norm_groups=4, scaling_factor=0.13025))
    assert torch.allclose(model.latents_to_diffusion(z), z * 0.13025)
    assert torch.allclose(model.latents_from_diffusion(z * 0.13025), z, atol=1e-6)


def test_gaussian_sample_is_seeded_and_mode_is_mean(reference_and_ours) -> None:
    _, ours, _ = reference_and_ours
    with torch.no_grad():
        posterior = ours.encode(torch.zeros(1, 3, 16, 16))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, posterior.mean + torch.exp(0.5 * posterior.logvar) * noise)
    assert posterior.mode() is posterior.mean


# --------------------------------------------------------------------------- tiling


def smooth_image(height: int, width: int) -> Tensor:
    """A low-frequency picture: tiles then see similar statistics, as they do in real photos."""
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    channels = [torch.sin(3 * ys + 2 * xs), torch.cos(2 * ys - 3 * xs), torch.sin(4 * xs * ys)]
    return torch.stack(channels)[None] * 0.8


class PeakActivation:
    """Largest tensor (elements) any submodule outputs while active."""

    def __init__(self, module: nn.Module) -> None:
        self.peak = 0
        self.handles = [m.register_forward_hook(self._record) for m in module.modules()]

    def _record(self, _module, _inputs, output) -> None:
        if isinstance(output, Tensor):
            self.peak = max(self.peak, output.numel())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def peak_of(fn, model: nn.Module) -> int:
    probe = PeakActivation(model)
    try:
        with torch.no_grad():
            fn()
    finally:
        probe.close()
    return probe.peak


def test_tile_spans_cover_with_overlap() -> None:
    for length, tile, overlap, unit in [(200, 64, 16, 4), (64, 64, 8, 8), (65, 32, 0, 1), (1000, 512, 64, 8)]:
        spans = vae._tile_spans(length, tile, overlap, unit)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(start % unit == 0 and end - start == min(tile, length) for start, end in spans)
        assert all(prev_end - start >= overlap for (_, prev_end), (start, _) in zip(spans, spans[1:]))


def test_tiled_stitching_is_exact_for_a_local_map() -> None:
    """With a map that sees nothing beyond its own cells, tiling must reproduce it exactly:
    this pins tile placement, the output coordinates and the blend normalisation."""
    image = torch.randn(2, 3, 72, 104)

    def shrink(x: Tensor) -> Tensor:  # like an encoder: f = 4, per-cell
        return torch.tanh(F.avg_pool2d(x, 4)).repeat(1, 2, 1, 1)

    def grow(x: Tensor) -> Tensor:  # like a decoder: f = 4, per-cell
        return F.interpolate(torch.sin(x), scale_factor=4.0, mode="nearest")

    shrunk = vae._run_tiled(shrink, image, tile=32, overlap=12, unit=4, out_num=1, out_den=4)
    assert max_err(shrunk, shrink(image)) <= 1e-6
    grown = vae._run_tiled(grow, image, tile=20, overlap=6, unit=1, out_num=4, out_den=1)
    assert max_err(grown, grow(image)) <= 1e-6


def test_tiled_encode_and_decode_are_close_to_untiled(reference_and_ours) -> None:
    """On a statistically uniform image tiles see the statistics the whole image has, so tiled
    and untiled agree up to each tile's own GroupNorm statistics and its border.

    Measured with this tiny random VAE (f = 4) on a 128x128 noise image, tiles of 32 / 48 / 64 /
    96 px with overlaps 8 / 16 / 32 / 32: mean abs error over the output's std 0.42 / 0.24 / 0.15 /
    0.07 (encode mean) and 0.30 / 0.15 / 0.09 / 0.05 (decode); max abs error 1.27 / 0.68 / 0.36 /
    0.28 on encode means up to 3.4, 1.53 / 0.82 / 0.53 / 0.29 on decoded pixels up to 3.9. Random
    weights are far more sensitive to per-tile statistics than a trained VAE; diffusers and ComfyUI
    tile the same way.
    """
    _, ours, _ = reference_and_ours
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1
    latent = torch.randn(1, 4, 32, 32, generator=generator)
    with torch.no_grad():
        full, decoded = ours.encode(image).mean, ours.decode(latent)
        errors = []
        for tile, overlap in [(32, 8), (96, 32)]:
            tiled = ours.encode_tiled(image, tile_size=tile, overlap=overlap).mean
            decoded_tiled = ours.decode_tiled(latent, tile_size=tile, overlap=overlap)
            assert tiled.shape == full.shape and decoded_tiled.shape == decoded.shape
            errors.append(((tiled - full).abs().mean() / full.std(), (decoded_tiled - decoded).abs().mean() / decoded.std()))
    (small_enc, small_dec), (large_enc, large_dec) = errors
    assert large_enc <= 0.1 and large_dec <= 0.1
    # Larger tiles approach the untiled result; and the tiles were really run separately.
    assert large_enc < small_enc and large_dec < small_dec
    assert large_enc > 1e-4 and large_dec > 1e-4


def test_single_tile_equals_untiled(reference_and_ours) -> None:
    _, ours, _ = reference_and_ours
    image = smooth_image(32, 32)
    with torch.no_grad():
        assert torch.equal(ours.encode_tiled(image, tile_size=32, overlap=8).mean, ours.encode(image).mean)


def test_tile_size_bounds_peak_activation(reference_and_ours) -> None:
    _, ours, _ = reference_and_ours
    image = smooth_image(128, 128)
    tile = 32
    untiled = peak_of(lambda: ours.encode(image), ours)
    tiled = peak_of(lambda: ours.encode_tiled(image, tile_size=tile, overlap=8), ours)
    one_tile = peak_of(lambda: ours.encode(image[..., :tile, :tile]), ours)
    assert tiled == one_tile
    assert tiled * 8 <= untiled
    latent = torch.randn(1, 4, 32, 32)
    untiled_dec = peak_of(lambda: ours.decode(latent), ours)
    tiled_dec = peak_of(lambda: ours.decode_tiled(latent, tile_size=tile, overlap=8), ours)
    assert tiled_dec == peak_of(lambda: ours.decode(latent[..., : tile // 4, : tile // 4]), ours)
    assert tiled_dec * 8 <= untiled_dec


def test_tiling_rejects_misaligned_tiles(reference_and_ours) -> None:
    _, ours, _ = reference_and_ours
    with pytest.raises(ValueError, match="multiples of 4"):
        ours.encode_tiled(torch.zeros(1, 3, 32, 32), tile_size=30, overlap=8)
    with pytest.raises(ValueError, match="overlap < tile_size"):
        ours.decode_tiled(torch.zeros(1, 4, 8, 8), tile_size=16, overlap=16)
