"""Classifier-free guidance, conditioning areas/ranges, prediction types, masks and img2img starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nodegraph_diffusion.sampling import schedules
from nodegraph_diffusion.sampling.model_sampling import Prediction
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.sampling.guidance import CFGGuider, CondEntry, GuidanceError, SizeFromLatent
from nodegraph_diffusion.sampling.run import SamplerChoice, sample
from nodegraph_diffusion.networks.unet import UNetConfig, sdxl_vector_conditioning


class FakeUNet(nn.Module):
    """Output = scaled input + mean of the context (so each prompt gives a distinct prediction); records calls."""

    def __init__(self, context_dim: int = 8) -> None:
        super().__init__()
        self.config = UNetConfig(model_channels=32, channel_mult=(1,), transformer_depth=(0,), context_dim=context_dim)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x, timesteps, context, y=None, control=None):
        self.calls.append((x.shape[0], context.clone()))
        return x * self.scale + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def entry(value: float, **kw) -> CondEntry:
    return CondEntry(context=torch.full((1, 77, 8), value), **kw)


SAMPLING = ModelSampling.for_prediction("eps")


def single(unet: FakeUNet, cond: CondEntry, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return CFGGuider(unet, SAMPLING, [cond], [], 1.0)(x, sigma)


def test_cond_and_uncond_share_one_batched_call_and_combine_by_cfg():
    unet = FakeUNet()
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.full((2,), 3.0)
    guider = CFGGuider(unet, SAMPLING, [entry(1.0)], [entry(-1.0)], cfg=7.5)
    out = guider(x, sigma)
    assert [calls for calls, _ in unet.calls] == [4]  # one call, batch 2 x 2
    cond = single(FakeUNet(), entry(1.0), x, sigma)
    uncond = single(FakeUNet(), entry(-1.0), x, sigma)
    torch.testing.assert_close(out, uncond + 7.5 * (cond - uncond))


def test_cfg_one_skips_the_negative_pass():
    unet = FakeUNet()
    guider = CFGGuider(unet, SAMPLING, [entry(1.0)], [entry(-1.0)], cfg=1.0)
    guider(torch.randn(1, 4, 8, 8), torch.full((1,), 2.0))
    assert len(unet.calls) == 1 and unet.calls[0][0] == 1
    assert torch.all(unet.calls[0][1] == 1.0)


def test_area_entries_average_inside_their_area_only():
    x = torch.randn(1, 4, 8, 8)
    sigma = torch.full((1,), 2.0)
    whole, corner = entry(1.0), entry(3.0, area=(32, 32, 0, 0))  # 32 px = 4 latent cells at factor 8
    out = CFGGuider(FakeUNet(), SAMPLING, [whole, corner], [], 1.0)(x, sigma)
    a = single(FakeUNet(), whole, x, sigma)
    b = single(FakeUNet(), corner.with_(area=None), x, sigma)
    torch.testing.assert_close(out[..., :4, :4], (a[..., :4, :4] + b[..., :4, :4]) / 2)
    torch.testing.assert_close(out[..., 4:, :], a[..., 4:, :])
    torch.testing.assert_close(out[..., :, 4:], a[..., :, 4:])


def test_timestep_range_switches_entries_by_sigma():
    early, late = entry(1.0, end=0.5), entry(5.0, start=0.5)
    guider = CFGGuider(FakeUNet(), SAMPLING, [early, late], [], 1.0)
    x = torch.randn(1, 4, 8, 8)
    high = torch.full((1,), SAMPLING.sigma_max * 0.99)
    low = torch.full((1,), SAMPLING.sigma_min * 1.01)
    torch.testing.assert_close(guider(x, high), single(FakeUNet(), early.with_(end=1.0), x, high))
    torch.testing.assert_close(guider(x, low), single(FakeUNet(), late.with_(start=0.0), x, low))


def test_conditioning_for_another_model_is_refused():
    with pytest.raises(GuidanceError, match="expects"):
        CFGGuider(FakeUNet(context_dim=16), SAMPLING, [entry(1.0)], [entry(0.0)], 5.0)


@pytest.mark.parity
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoised_estimate_matches_diffusers_euler(prediction):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type=prediction)
    scheduler.set_timesteps(10)
    ours = ModelSampling.for_prediction(Prediction.EPS if prediction == "epsilon" else Prediction.V)
    g = torch.Generator().manual_seed(0)
    for i in (0, 4, 9):
        sigma = scheduler.sigmas[i]
        x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        output = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        scheduler._step_index = i
        reference = scheduler.step(output, scheduler.timesteps[i], x).pred_original_sample
        ours_x0 = ours.denoised(x, torch.tensor([float(sigma)], dtype=torch.float64), output)
        assert (ours_x0 - reference).abs().max() < 1e-4
        # the timestep given to the U-Net is the training timestep of that sigma
        assert abs(float(ours.timestep(sigma.reshape(1))) - float(scheduler.timesteps[i])) < 1e-3


def test_noise_mask_keeps_unmasked_latent_at_every_step():
    latent = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    seen = []

    def denoiser(x, sigma):
        return x * 0.3  # anything that is not the original latent

    def callback(i, n, x, denoised):
        seen.append(denoised.clone())

    sigmas = schedules.sigmas_karras(6, 0.03, 14.6)
    out = sample(denoiser, SamplerChoice("euler_ancestral"), sigmas, latent, noise, noise_mask=mask,
                 generator=torch.Generator().manual_seed(1), callback=callback)
    keep = mask == 0
    assert len(seen) == 6
    for denoised in seen:
        assert torch.equal(denoised.expand_as(latent)[keep.expand_as(latent)], latent[keep.expand_as(latent)])
    assert torch.equal(out[keep.expand_as(out)], latent[keep.expand_as(latent)])
    assert not torch.allclose(out[(~keep).expand_as(out)], latent[(~keep).expand_as(latent)])


def test_img2img_starts_at_the_sigma_its_denoise_implies():
    schedule = SAMPLING.schedule
    steps, denoise = 10, 0.4
    sigmas = schedules.sigmas_for_denoise(lambda n: schedules.sigmas_normal(schedule, n), steps, denoise)
    full = schedules.sigmas_normal(schedule, round(steps / denoise))
    assert sigmas.numel() == steps + 1 and float(sigmas[0]) == pytest.approx(float(full[-(steps + 1)]))
    latent, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    first = {}

    def denoiser(x, sigma):
        first.setdefault("x", x.clone())
        first.setdefault("sigma", float(sigma[0]))
        return torch.zeros_like(x)

    sample(denoiser, SamplerChoice("euler"), sigmas, latent, noise)
    assert first["sigma"] == pytest.approx(float(sigmas[0]), rel=1e-6)
    torch.testing.assert_close(first["x"], latent + noise * sigmas[0])


class VectorUNet(FakeUNet):
    """A FakeUNet that takes SDXL's vector conditioning and records each call's y."""

    def __init__(self, pooled: int = 8, values: int = 6) -> None:
        super().__init__()
        self.config = UNetConfig(model_channels=32, channel_mult=(1,), transformer_depth=(0,), context_dim=8,
                                 adm_in_channels=pooled + values * 256)
        self.vectors: list[torch.Tensor] = []

    def forward(self, x, timesteps, context, y=None, control=None):
        self.vectors.append(y.clone())
        return super().forward(x, timesteps, context)


def test_sdxl_sizes_left_open_are_the_sampled_latents_pixel_size():
    # ComfyUI and diffusers: a prompt without sizes is told original = target = the image's (height,
    # width), crop (0, 0); an explicit y (TextEncodeSDXL) is passed as it is.
    pooled = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    open_sizes = entry(1.0, pooled=pooled, size_from_latent=SizeFromLatent())
    explicit = entry(-1.0, pooled=pooled, y=sdxl_vector_conditioning(pooled, (1024, 1024), (0, 0), (1024, 1024)))
    unet = VectorUNet()
    CFGGuider(unet, SAMPLING, [open_sizes], [explicit], cfg=7.0, downscale=8)(torch.randn(1, 4, 12, 7),
                                                                              torch.full((1,), 2.0))
    (y,) = unet.vectors  # one batched call: positive row, then negative row
    torch.testing.assert_close(y[0:1], sdxl_vector_conditioning(pooled, (96, 56), (0, 0), (96, 56)))
    torch.testing.assert_close(y[1:2], explicit.y)
    assert not torch.allclose(y[0:1], y[1:2])


def test_sdxl_refiner_sizes_left_open_take_the_latent_size_and_the_scores_by_side():
    pooled = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    open_sizes = entry(1.0, pooled=pooled, size_from_latent=SizeFromLatent(refiner=True))
    unet = VectorUNet(values=5)
    CFGGuider(unet, SAMPLING, [open_sizes], [open_sizes], cfg=3.0, downscale=8)(torch.randn(1, 4, 6, 10),
                                                                               torch.full((1,), 2.0))
    (y,) = unet.vectors
    for row, score in ((0, 6.0), (1, 2.5)):
        expected = sdxl_vector_conditioning(pooled, (48, 80), (0, 0), aesthetic_score=score)
        torch.testing.assert_close(y[row:row + 1], expected)


def test_sdxl_sizes_left_open_need_a_pooled_vector_of_the_models_width():
    pooled = torch.randn(1, 16)  # 16 + 6 * 256 does not fit a model taking 8 + 6 * 256
    with pytest.raises(GuidanceError, match="vector conditioning"):
        CFGGuider(VectorUNet(), SAMPLING, [entry(1.0, pooled=pooled, size_from_latent=SizeFromLatent())], [], 1.0)
