"""Image-conditioned denoisers (sampling.concat): which variant a network is (detection of Flux.1
Canny/Depth and Fill, InstructPix2Pix and inpainting U-Nets), the extra input channels each takes
against diffusers' Flux Fill / Flux Control input layouts and ComfyUI's formulas, and DualCFGGuider's
two-condition guidance against its formula."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from _checkpoint_fixtures import TINY_SD1_UNET, prefixed, unet_weights
from _transformer_fixtures import FLUX_DEV, flux_weights
from nodegraph_diffusion.architectures.detection import detect_from_shapes
from nodegraph_diffusion.networks.flux import pack_latent
from nodegraph_diffusion.networks.unet import UNetConfig
from nodegraph_diffusion.sampling.concat import (
    ConcatError,
    ImageInput,
    classify_image_input,
    concat_channels,
    fold_mask,
    image_input,
)
from nodegraph_diffusion.sampling.guidance import CFGGuider, CondEntry, DualCFGGuider
from nodegraph_diffusion.sampling.model_sampling import ModelSampling

FLUX_SCALING = (0.3611, 0.1159)  # Flux's VAE: diffusion = (vae - 0.1159) * 0.3611
SD_SCALING = (0.18215, 0.0)
CANNY = replace(FLUX_DEV, in_channels=32)
FILL = replace(FLUX_DEV, in_channels=96)


def shapes(weights: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


# --------------------------------------------------------------------------- variants


def test_variant_is_told_from_input_and_output_channels() -> None:
    assert classify_image_input(4, 4, 1) is ImageInput.NONE
    assert classify_image_input(8, 4, 1) is ImageInput.IMAGE  # InstructPix2Pix
    assert classify_image_input(9, 4, 1) is ImageInput.INPAINT  # SD inpainting
    assert classify_image_input(32, 16, 64) is ImageInput.IMAGE  # Flux Canny/Depth: img_in 128
    assert classify_image_input(96, 16, 64) is ImageInput.INPAINT  # Flux Fill: img_in 384
    with pytest.raises(ConcatError, match="10 input channels for 4 output"):
        classify_image_input(10, 4, 1)
    assert image_input(FILL) is ImageInput.INPAINT and image_input(FLUX_DEV) is ImageInput.NONE


@pytest.mark.parametrize(("in_channels", "kind", "words"), [
    (16, ImageInput.NONE, "a Flux.1-dev "),
    (32, ImageInput.IMAGE, "a Flux.1-dev image-conditioned "),
    (96, ImageInput.INPAINT, "a Flux.1-dev inpainting "),
], ids=["dev", "canny-depth", "fill"])
def test_detection_tells_flux_canny_depth_and_fill(in_channels: int, kind: ImageInput, words: str) -> None:
    weights = flux_weights(replace(FLUX_DEV, in_channels=in_channels))
    assert weights["img_in.weight"].shape[1] == 4 * in_channels  # 64, 128, 384 packed channels
    for found in (detect_from_shapes(shapes(weights)),
                  detect_from_shapes(shapes(prefixed("model.diffusion_model.", weights)))):
        assert found.image_input is kind
        assert found.inpainting == (kind is ImageInput.INPAINT)
        assert found.describe().startswith(words)  # ... diffusion model (flux) / checkpoint (flux)


@pytest.mark.parametrize(("in_channels", "kind"), [(4, ImageInput.NONE), (8, ImageInput.IMAGE),
                                                   (9, ImageInput.INPAINT)])
def test_detection_tells_instructpix2pix_and_inpainting_unets(in_channels: int, kind: ImageInput) -> None:
    weights = unet_weights(replace(TINY_SD1_UNET, in_channels=in_channels))
    found = detect_from_shapes(shapes(prefixed("model.diffusion_model.", weights)))
    assert found.image_input is kind and found.inpainting == (kind is ImageInput.INPAINT)


def test_unknown_channel_count_is_refused_by_name() -> None:
    weights = flux_weights(replace(FLUX_DEV, in_channels=20))
    with pytest.raises(ValueError, match="flux: a denoiser taking 20 input channels"):
        detect_from_shapes(shapes(weights), "odd.safetensors")


# --------------------------------------------------------------------------- Flux layouts against diffusers


def _fake_pipeline(pipeline_class, scaling: tuple[float, float]) -> SimpleNamespace:
    """What diffusers' Flux pipelines read from `self` when preparing the conditioning latents."""
    scale, shift = scaling
    return SimpleNamespace(vae_scale_factor=8, _pack_latents=pipeline_class._pack_latents,
                           vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=scale, shift_factor=shift)))


def test_flux_fill_input_matches_diffusers_fill_pipeline() -> None:
    """Flux Fill's 384 packed input channels: 64 of the noisy latent, 64 of the masked image's latent,
    256 of the pixel mask folded 8 x 8 per latent cell, then packed 2 x 2 (FluxFillPipeline)."""
    from diffusers import FluxFillPipeline

    generator = torch.Generator().manual_seed(3)
    batch, h, w = 2, 6, 10
    vae_latent = torch.randn(1, 16, h, w, generator=generator)  # the VAE's raw latent of the masked image
    mask = (torch.rand(1, 1, 8 * h, 8 * w, generator=generator) > 0.5).float()
    x = torch.randn(batch, 16, h, w, generator=generator)
    scale, shift = FLUX_SCALING
    with torch.no_grad():
        mask_tokens, image_tokens = FluxFillPipeline.prepare_mask_latents(
            _fake_pipeline(FluxFillPipeline, FLUX_SCALING), mask.clone(), vae_latent.clone(), batch, 16, 1, 8 * h,
            8 * w, torch.float32, "cpu", None)
    expected = torch.cat([pack_latent(x), image_tokens, mask_tokens], dim=2)
    extra = concat_channels(FILL, x, image_latent=(vae_latent - shift) * scale, mask=mask, scaling=FLUX_SCALING,
                            downscale=8)
    assert extra.shape == (batch, 80, h, w)
    got = pack_latent(torch.cat([x, extra], dim=1))
    assert got.shape == (batch, h * w // 4, 384)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_flux_canny_depth_input_matches_diffusers_control_pipeline() -> None:
    """Flux Canny/Depth's 128 packed input channels: the noisy latent's 64, then the control image's
    latent in the model's space (FluxControlPipeline concatenates the packed tokens)."""
    from diffusers import FluxControlPipeline

    generator = torch.Generator().manual_seed(4)
    vae_latent = torch.randn(1, 16, 4, 6, generator=generator)
    x = torch.randn(1, 16, 4, 6, generator=generator)
    scale, shift = FLUX_SCALING
    control = (vae_latent - shift) * scale  # what the pipeline makes of the encoded control image
    expected = torch.cat([pack_latent(x), FluxControlPipeline._pack_latents(control, 1, 16, 4, 6)], dim=2)
    extra = concat_channels(CANNY, x, image_latent=control, mask=None, scaling=FLUX_SCALING, downscale=8)
    torch.testing.assert_close(pack_latent(torch.cat([x, extra], dim=1)), expected, rtol=0, atol=1e-6)


def test_flux_without_an_image_gets_the_latent_of_a_zero_vae_latent_and_a_full_mask() -> None:
    x = torch.randn(1, 16, 2, 4)
    scale, shift = FLUX_SCALING
    canny = concat_channels(CANNY, x, image_latent=None, mask=None, scaling=FLUX_SCALING, downscale=8)
    torch.testing.assert_close(canny, torch.full_like(x, -shift * scale))
    fill = concat_channels(FILL, x, image_latent=None, mask=None, scaling=FLUX_SCALING, downscale=8)
    torch.testing.assert_close(fill[:, 16:], torch.ones(1, 64, 2, 4))


def test_fold_mask_puts_pixel_dy_dx_of_each_cell_in_channel_dy_times_8_plus_dx() -> None:
    mask = torch.rand(1, 1, 16, 24)
    folded = fold_mask(mask, 8)
    for row, col, dy, dx in ((0, 0, 0, 0), (1, 2, 3, 7), (0, 1, 7, 0)):
        assert folded[0, dy * 8 + dx, row, col] == mask[0, 0, 8 * row + dy, 8 * col + dx]


# --------------------------------------------------------------------------- U-Nets (ComfyUI's formulas)


def test_instructpix2pix_unet_takes_the_unscaled_vae_latent() -> None:
    """InstructPix2Pix was trained on the encoder's mean without the scaling factor (diffusers'
    StableDiffusionInstructPix2PixPipeline: latent_dist.mode()); CosXL edit on the scaled one."""
    config = replace(TINY_SD1_UNET, in_channels=8)
    image = torch.randn(1, 4, 4, 4)  # diffusion space
    x = torch.randn(2, 4, 4, 4)
    extra = concat_channels(config, x, image_latent=image, mask=None, scaling=SD_SCALING, downscale=8)
    torch.testing.assert_close(extra, (image / 0.18215).expand(2, -1, -1, -1))
    scaled = concat_channels(config, x, image_latent=image, mask=None, scaling=SD_SCALING, downscale=8,
                             scaled_image=True)
    torch.testing.assert_close(scaled, image.expand(2, -1, -1, -1))
    without = concat_channels(config, x, image_latent=None, mask=None, scaling=SD_SCALING, downscale=8)
    assert torch.all(without == 0)


def test_inpainting_unet_takes_the_rounded_mask_then_the_image_latent() -> None:
    config = replace(TINY_SD1_UNET, in_channels=9)
    x = torch.randn(1, 4, 4, 4)
    image = torch.randn(1, 4, 4, 4)
    mask = torch.full((1, 1, 32, 32), 0.4)  # latent row 3: 0.4 rounds to 0
    mask[..., :16, :] = 1.0  # latent rows 0 and 1
    mask[..., 16:24, :] = 0.6  # latent row 2: rounds to 1
    extra = concat_channels(config, x, image_latent=image, mask=mask, scaling=SD_SCALING, downscale=8)
    expected_mask = torch.zeros(1, 1, 4, 4)
    expected_mask[..., :3, :] = 1.0
    torch.testing.assert_close(extra, torch.cat([expected_mask, image], dim=1))
    # No conditioning image: the sampled latent (VAEEncodeForInpaint's blanked image) with its noise mask.
    from_latent = concat_channels(config, x, image_latent=None, mask=None, noise_mask=mask, scaling=SD_SCALING,
                                  downscale=8)
    torch.testing.assert_close(from_latent, torch.cat([expected_mask, x], dim=1))


def test_image_of_another_size_is_centre_cropped_and_resized_and_batches_must_divide() -> None:
    config = replace(TINY_SD1_UNET, in_channels=8)
    image = torch.arange(2 * 4 * 4 * 8, dtype=torch.float32).reshape(2, 4, 4, 8)
    extra = concat_channels(config, torch.zeros(4, 4, 4, 4), image_latent=image, mask=None, scaling=(1.0, 0.0),
                            downscale=8)
    torch.testing.assert_close(extra, image[..., 2:6].repeat(2, 1, 1, 1))  # the centre 4 x 4, batch 2 -> 4
    with pytest.raises(ConcatError, match="image batch 2 does not divide the latent batch 3"):
        concat_channels(config, torch.zeros(3, 4, 4, 4), image_latent=image, mask=None, scaling=(1.0, 0.0),
                        downscale=8)


def test_a_plain_model_refuses_an_image_but_not_a_noise_mask() -> None:
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ConcatError, match="takes no image beside the latent"):
        concat_channels(TINY_SD1_UNET, x, image_latent=x, mask=None, scaling=SD_SCALING, downscale=8)
    assert concat_channels(TINY_SD1_UNET, x, image_latent=None, mask=None, noise_mask=torch.ones(1, 1, 4, 4),
                           scaling=SD_SCALING, downscale=8) is None


# --------------------------------------------------------------------------- DualCFGGuider


class EchoUNet(nn.Module):
    """An 8-channel U-Net stand-in: x's first half scaled, plus the context's mean, plus the extra
    channels' mean, so every prompt and every image gives a distinct prediction; records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.config = UNetConfig(model_channels=32, channel_mult=(1,), transformer_depth=(0,), context_dim=8,
                                 in_channels=8)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.batches: list[int] = []

    def forward(self, x, timesteps, context, y=None, control=None):
        self.batches.append(x.shape[0])
        latent, extra = x[:, :4], x[:, 4:]
        return latent * self.scale + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + extra.mean(dim=1, keepdim=True)


SAMPLING = ModelSampling.for_prediction("eps")


def prompt(value: float, image: Tensor | None = None) -> CondEntry:
    return CondEntry(context=torch.full((1, 77, 8), value),
                     concat=torch.zeros(1, 4, 6, 6) if image is None else image)


def alone(entry: CondEntry, x: Tensor, sigma: Tensor) -> Tensor:
    return CFGGuider(EchoUNet(), SAMPLING, [entry], [], 1.0)(x, sigma)


@pytest.mark.parametrize("nested", [False, True], ids=["regular", "nested"])
def test_dual_cfg_combines_three_predictions_by_comfyuis_formula(nested: bool) -> None:
    image = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    cond1, cond2, negative = prompt(1.0, image), prompt(-0.5, image), prompt(0.25)
    x, sigma = torch.randn(2, 4, 6, 6), torch.full((2,), 2.0)
    unet = EchoUNet()
    got = DualCFGGuider(unet, SAMPLING, [cond1], [cond2], [negative], cfg=5.0, cfg_middle=1.5, nested=nested)(x, sigma)
    p, m, n = (alone(e, x, sigma) for e in (cond1, cond2, negative))
    expected = n + 1.5 * (m + 5.0 * (p - m) - n) if nested else n + 1.5 * (m - n) + 5.0 * (p - m)
    torch.testing.assert_close(got, expected)
    assert unet.batches == [6]  # the three sides in one batched call


def test_dual_cfg_skips_the_sides_its_scales_leave_out() -> None:
    cond1, cond2, negative = prompt(1.0), prompt(-0.5), prompt(0.25)
    x, sigma = torch.randn(1, 4, 6, 6), torch.full((1,), 2.0)
    unet = EchoUNet()
    got = DualCFGGuider(unet, SAMPLING, [cond1], [cond2], [negative], cfg=3.0, cfg_middle=1.0)(x, sigma)
    p, m = alone(cond1, x, sigma), alone(cond2, x, sigma)
    torch.testing.assert_close(got, m + 3.0 * (p - m))
    assert unet.batches == [2]  # the negative is not evaluated at cfg_cond2_negative 1
    unet = EchoUNet()
    torch.testing.assert_close(DualCFGGuider(unet, SAMPLING, [cond1], [cond2], [negative], 1.0, 1.0)(x, sigma), p)
    assert unet.batches == [1]


def test_entries_concat_is_the_extra_input_of_their_own_rows() -> None:
    """Two prompts with different images share one call, each row with its own image channels."""
    a, b = prompt(1.0, torch.ones(1, 4, 6, 6)), prompt(1.0, -torch.ones(1, 4, 6, 6))
    x, sigma = torch.zeros(1, 4, 6, 6), torch.full((1,), 1.0)
    unet = EchoUNet()
    guided = CFGGuider(unet, SAMPLING, [a], [b], cfg=2.0)(x, sigma)
    assert unet.batches == [2]
    torch.testing.assert_close(guided, 2 * alone(a, x, sigma) - alone(b, x, sigma))
    assert not torch.allclose(alone(a, x, sigma), alone(b, x, sigma))


# --------------------------------------------------------------------------- DifferentialDiffusion


def comfy_differential_mask(mask: Tensor, sigma: float, sigmas: Tensor, sampling: ModelSampling,
                            strength: float) -> Tensor:
    """ComfyUI's DifferentialDiffusion.forward, written out: the timestep thresholds in plain floats."""
    sigma_to = max(sampling.sigma_min, float(sigmas[-1]))
    ts = [float(sampling.timestep(torch.tensor([s]))[0]) for s in (float(sigmas[0]), sigma_to, sigma)]
    threshold = (ts[2] - ts[1]) / (ts[0] - ts[1])
    binary = (mask >= threshold).float()
    return strength * binary + (1 - strength) * mask if strength < 1 else binary


@pytest.mark.parametrize("sampling", [ModelSampling.for_prediction("eps"), ModelSampling.flux(mu=1.15)],
                         ids=["discrete", "flux"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_differential_mask_thresholds_by_the_models_timesteps(sampling: ModelSampling, strength: float) -> None:
    from nodegraph_diffusion.sampling.run import differential_mask

    mask = torch.linspace(0, 1, 24).reshape(1, 1, 4, 6)
    sigmas = torch.linspace(sampling.sigma_max, 0, 9)
    sigmas[-1] = 0.0
    for sigma in sigmas[:-1]:
        got = differential_mask(mask, sigma.reshape(1), sigmas, sampling.timestep, sampling.sigma_min, strength)
        torch.testing.assert_close(got, comfy_differential_mask(mask, float(sigma), sigmas, sampling, strength))
    first = differential_mask(mask, sigmas[:1], sigmas, sampling.timestep, sampling.sigma_min, 1.0)
    last = differential_mask(mask, sigmas[-2:-1], sigmas, sampling.timestep, sampling.sigma_min, 1.0)
    assert torch.all(first[mask < 1] == 0)  # at the first step only the cells masked fully
    assert torch.all(last >= first) and last.sum() > first.sum()  # the others join as sampling goes on


def test_sampling_uses_each_steps_mask_and_composites_with_the_last() -> None:
    from nodegraph_diffusion.sampling.run import SamplerChoice, sample

    latent = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    mask = torch.linspace(0, 1, 24).reshape(1, 1, 4, 6)
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.0])
    seen: list[Tensor] = []

    def step_mask(sigma: Tensor, m: Tensor) -> Tensor:
        out = (m >= float(sigma[0]) / 10.0).float()
        seen.append(out)
        return out

    calls: list[Tensor] = []

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        calls.append(x.clone())
        return torch.full_like(x, 3.0)

    result = sample(denoiser, SamplerChoice("euler"), sigmas, latent, noise, noise_mask=mask, step_mask=step_mask)
    assert len(seen) == len(calls) == 4
    for m, x, sigma in zip(seen, calls, sigmas):  # outside each step's mask, x is the latent noised to sigma
        kept = (m == 0).expand_as(x)
        assert kept.any()
        torch.testing.assert_close(x[kept], (latent + sigma * noise)[kept])
    final = seen[-1]
    torch.testing.assert_close(result, torch.full_like(latent, 3.0) * final + latent * (1 - final))


def test_reference_latents_are_for_flux_models() -> None:
    from nodegraph_diffusion.sampling.guidance import GuidanceError

    entry = prompt(1.0).with_(reference_latents=(torch.zeros(1, 4, 6, 6),))
    with pytest.raises(GuidanceError, match="reference latents .* are for Flux.1 Kontext"):
        CFGGuider(EchoUNet(), SAMPLING, [entry], [], 1.0)
