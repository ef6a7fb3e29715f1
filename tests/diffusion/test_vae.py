"""Tests for nodegraph_diffusion.vae: parity with diffusers AutoencoderKL (4-channel SD and 16-channel SD3/Flux
layouts), config from shapes, tiling, latent scaling, latent previews."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from nodegraph_diffusion.vae import autoencoder as vae
from nodegraph_diffusion.vae import previews
from nodegraph_diffusion.vae.autoencoder import AutoencoderKL, LatentScaling, VAEConfig, VAELoadError
from _random_weights import randomize_

TOL = 1e-4

# Three levels (f = 4), one ResNet per level: every layer kind occurs and it runs in milliseconds.
TINY = VAEConfig(channels=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
# The SD3/Flux layout: 16 latent channels, no quant_conv / post_quant_conv.
TINY16 = VAEConfig(channels=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, z_channels=16,
                   latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)


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
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor,
    )
    return randomize_(reference, scale=0.3)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# Every test taking this fixture runs on the 4-channel SD layout and on the 16-channel SD3/Flux layout.
@pytest.fixture(scope="module", params=[TINY, TINY16], ids=["4ch", "16ch"])
def reference_and_ours(request):
    reference = diffusers_vae(request.param)
    state_dict = vae.ldm_vae_keys_from_diffusers(reference.state_dict())
    ours = AutoencoderKL(request.param).eval()
    ours.load_state_dict(state_dict, strict=True)
    return reference, ours, state_dict


def assert_same_vae(reference, ours: AutoencoderKL) -> None:
    channels = ours.config.latent_channels
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 24, 32, generator=generator) * 2 - 1
    latent = torch.randn(2, channels, 6, 8, generator=generator)
    with torch.no_grad():
        expected = reference.encode(image).latent_dist
        got = ours.encode(image)
        assert got.mean.shape == (2, channels, 6, 8)
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
    ours = AutoencoderKL(reference_and_ours[1].config).eval()
    ours.load_state_dict(conv_state, strict=True)
    assert ours.encoder.mid.attn_1.q.weight.ndim == 2
    assert_same_vae(reference, ours)


@pytest.mark.parity
def test_load_vae_accepts_diffusers_layout_directly(reference_and_ours) -> None:
    reference, ours, _ = reference_and_ours
    # Shapes cannot reveal norm_groups=8 (SD VAEs all use 32), so pass the config.
    assert_same_vae(reference, vae.load_vae(reference.state_dict(), config=ours.config))


@pytest.mark.parity
def test_16_channel_layout_has_no_quant_convs_and_is_recognised_from_shapes() -> None:
    reference = diffusers_vae(TINY16)
    assert not any("quant_conv" in k for k in reference.state_dict())
    state_dict = vae.ldm_vae_keys_from_diffusers(reference.state_dict())
    assert set(state_dict) == set(AutoencoderKL(TINY16).state_dict())
    shapes = {k: v.shape for k, v in state_dict.items()}
    assert vae.vae_config_from_shapes(shapes, family="flux", norm_groups=8) == TINY16
    sd3 = vae.vae_config_from_shapes(shapes, family="sd3", norm_groups=8)
    assert (sd3.latent_channels, sd3.use_quant_conv, sd3.use_post_quant_conv) == (16, False, False)
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)
    with pytest.raises(VAELoadError, match="16 latent channels, but the 'sdxl' latent space has 4.*'flux', 'sd3'"):
        vae.vae_config_from_shapes(shapes, family="sdxl", norm_groups=8)
    four = {k: v.shape for k, v in AutoencoderKL(TINY).state_dict().items()}
    with pytest.raises(VAELoadError, match="4 latent channels, but the 'flux' latent space has 16"):
        vae.vae_config_from_shapes(four, family="flux", norm_groups=8)


@pytest.mark.parity
def test_16_channel_latent_scaling_matches_the_flux_pipeline() -> None:
    # FluxPipeline / FluxImg2ImgPipeline: (z - shift_factor) * scaling_factor in, z / scaling_factor + shift_factor out
    reference = diffusers_vae(TINY16)
    ours = AutoencoderKL(TINY16).eval()
    ours.load_state_dict(vae.ldm_vae_keys_from_diffusers(reference.state_dict()))
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = reference.encode(image).latent_dist.mean
        expected = (z - reference.config.shift_factor) * reference.config.scaling_factor
        latents = ours.latents_to_diffusion(ours.encode(image).mean)
        assert max_err(latents, expected) <= TOL
        expected_image = reference.decode(expected / reference.config.scaling_factor + reference.config.shift_factor).sample
        assert max_err(ours.decode(ours.latents_from_diffusion(latents)), expected_image) <= TOL


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
        # family unknown: the placeholder scaling of the first family of that width (sd3 for 16 channels)
        VAEConfig(channels=8, ch_mult=(2, 3), num_res_blocks=1, z_channels=16, latent_channels=16,
                  norm_groups=4, use_quant_conv=False, use_post_quant_conv=False, in_channels=4, out_channels=1,
                  scaling_factor=1.5305, shift_factor=0.0609),
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
    latent = torch.randn(1, ours.config.latent_channels, 32, 32, generator=generator)
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
    latent = torch.randn(1, ours.config.latent_channels, 32, 32)
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


# --------------------------------------------------------------------------- latent previews

TINY_SHAPES = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "tiny-shapes.safetensors"
# The fixed table previews used before they were fitted per VAE: published for SD1's latent space.
SD1_TABLE = previews.LatentColours(
    torch.tensor(((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                  (-0.2120, -0.2616, -0.7177))), torch.zeros(3))


def shape_picture(foreground: tuple[int, int, int], background: tuple[int, int, int], shape: str) -> Tensor:
    """A 64x64 tiny-shapes-like render (one filled shape on a plain background): (64, 64, 3) in [0, 1]."""
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((14, 18, 46, 50), fill=foreground)
    else:
        draw.rectangle((20, 12, 50, 42), fill=foreground)
    return torch.tensor(np.array(image), dtype=torch.float32) / 255.0


PICTURES = torch.stack([
    shape_picture((220, 30, 30), (30, 60, 200), "circle"), shape_picture((240, 220, 40), (120, 40, 160), "square"),
    shape_picture((255, 255, 255), (20, 140, 40), "circle"), shape_picture((0, 0, 0), (255, 140, 0), "square"),
    shape_picture((128, 128, 128), (200, 200, 255), "circle"),
])


@pytest.fixture(scope="module")
def tiny_shapes_vae():
    from nodegraph_diffusion.architectures.stable_diffusion import load_checkpoint

    loaded = load_checkpoint(TINY_SHAPES, device="cpu", dtype=torch.float32)
    scaling = LatentScaling(loaded.latent_format.scaling_factor, loaded.latent_format.shift_factor)
    return loaded.vae, scaling


def preview_error(colours: previews.LatentColours | None, model: AutoencoderKL, scaling: LatentScaling) -> float:
    """Mean abs RGB error in [0, 1] between previews of the encoded PICTURES and the pictures at latent size."""
    with torch.no_grad():
        latents = scaling.to_diffusion(model.encode(PICTURES.permute(0, 3, 1, 2) * 2 - 1).mean)
    target = F.avg_pool2d(PICTURES.permute(0, 3, 1, 2), model.config.downscale_factor).permute(0, 2, 3, 1)
    rgb = [colours.to_rgb(lat) if colours is not None else previews.neutral_rgb(lat) for lat in latents]
    return (torch.stack(rgb) - target).abs().mean().item()


def test_tiny_shapes_preview_shows_the_image_colours(tiny_shapes_vae) -> None:
    model, scaling = tiny_shapes_vae
    fitted = preview_error(previews.latent_colours(model, scaling), model, scaling)
    table = preview_error(SD1_TABLE, model, scaling)
    # measured: fitted 0.178, SD1 table 0.344 (the tiny VAE's latent space is its own, not SD1's)
    assert fitted < 0.22 and fitted < 0.65 * table, (fitted, table)


def fold_into_16_channels(model: AutoencoderKL, seed: int = 0) -> AutoencoderKL:
    """The same autoencoder in the SD3/Flux layout: 16 latent channels (a random mix of the 4 after
    post_quant_conv), no quant convs. Folding 1x1 convs into 3x3 ones is exact, so it decodes the
    images the 4-channel one does, from latents whose channels are not the old ones."""
    config = model.config
    # (16, 4) with orthonormal columns: mix^T mix = I
    mix = torch.linalg.qr(torch.randn(16, 4, generator=torch.Generator().manual_seed(seed)))[0]
    q = model.quant_conv.weight[:4, :, 0, 0]  # the mean rows: (4, 8)
    p = model.post_quant_conv.weight[:, :, 0, 0]  # (4, 4)
    conv_out = model.encoder.conv_out
    # z16 = mix (p (q conv_out(h) + q_bias) + p_bias)
    linear = mix @ p @ q
    folded = AutoencoderKL(replace(config, z_channels=16, latent_channels=16, use_quant_conv=False,
                                   use_post_quant_conv=False)).eval()
    state = {k: v for k, v in model.state_dict().items() if "quant_conv" not in k}
    state["encoder.conv_out.weight"] = torch.cat([
        torch.einsum("oi,ichw->ochw", linear, conv_out.weight), torch.zeros(16, *conv_out.weight.shape[1:])])
    state["encoder.conv_out.bias"] = torch.cat([
        linear @ conv_out.bias + mix @ (p @ model.quant_conv.bias[:4] + model.post_quant_conv.bias),
        torch.full((16,), -10.0)])
    # decoder: conv_in(mix^T z16) = conv_in(post_quant(z4))
    state["decoder.conv_in.weight"] = torch.einsum("oihw,ij->ojhw", model.decoder.conv_in.weight, mix.T)
    folded.load_state_dict(state, strict=True)
    return folded


def test_16_channel_preview_shows_the_image_colours(tiny_shapes_vae) -> None:
    model, _ = tiny_shapes_vae
    folded = fold_into_16_channels(model)
    pixels = PICTURES.permute(0, 3, 1, 2)[:2] * 2 - 1
    with torch.no_grad():
        assert max_err(folded.decode(folded.encode(pixels).mean), model.decode(model.encode(pixels).mean)) <= 1e-4
    flux = LatentScaling(0.3611, 0.1159)
    colours = previews.latent_colours(folded, flux)
    assert colours.weight.shape == (16, 3)
    fitted = preview_error(colours, folded, flux)
    neutral = preview_error(None, folded, flux)  # the first three channels, as previews showed other widths
    # measured: fitted 0.183, first three channels 0.402
    assert fitted < 0.22 and fitted < 0.65 * neutral, (fitted, neutral)


def test_preview_map_follows_the_latent_scaling() -> None:
    raw = previews.LatentColours(torch.randn(16, 3, generator=torch.Generator().manual_seed(4)), torch.randn(3))
    scaling = LatentScaling(0.3611, 0.1159)
    z = torch.randn(16, 5, 7) * 0.3
    assert torch.allclose(raw.for_scaling(scaling).to_rgb(scaling.to_diffusion(z)), raw.to_rgb(z), atol=1e-5)


def test_preview_fit_is_cached_per_vae(monkeypatch) -> None:
    calls = []
    fit = previews.fit_latent_colours
    monkeypatch.setattr(previews, "fit_latent_colours", lambda model: calls.append(model) or fit(model))
    model = randomize_(AutoencoderKL(TINY16), seed=5, scale=0.3).eval()
    first = previews.latent_colours(model)
    second = previews.latent_colours(model, LatentScaling(1.0))
    assert len(calls) == 1
    assert torch.allclose(first.weight * TINY16.scaling_factor, second.weight)
    other = randomize_(AutoencoderKL(TINY16), seed=6, scale=0.3).eval()
    previews.latent_colours(other)
    assert len(calls) == 2


def test_preview_image_sizes_and_neutral_fallback() -> None:
    latent = torch.randn(2, 16, 12, 20)
    colours = previews.LatentColours(torch.randn(16, 3), torch.zeros(3))
    image = previews.preview_image(latent, colours, max_size=256)
    assert image.size == (20 * 8, 12 * 8) and image.mode == "RGB"
    # no VAE at hand: the neutral preview, the first three channels standardised
    neutral = np.array(previews.preview_image(latent))[::8, ::8] / 255.0
    assert np.abs(neutral - previews.neutral_rgb(latent[0]).numpy()).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="4 latent channels cannot show a 16-channel latent"):
        previews.preview_image(latent, SD1_TABLE)
