"""Rectified-flow (SD3/Flux) model sampling against diffusers' flow-matching schedulers and pipelines,
and every sampler's flow form against written-out formulas."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

from nodegraph_diffusion.sampling import samplers as K
from nodegraph_diffusion.sampling import schedules as S
from nodegraph_diffusion.sampling.model_sampling import (
    FLUX_TIMESTEPS,
    ModelSampling,
    ModelSamplingError,
    Prediction,
    masked_denoiser,
)
from nodegraph_diffusion.sampling.run import SamplerChoice, SamplingError, sample
from nodegraph_diffusion.sampling.samplers import NoiseForm

FLOW = NoiseForm.FLOW
SHAPE = (2, 16, 4, 6)
TOL = 1e-5


def toy_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for a velocity-predicting network at noise level sigma (B,)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return 0.8 * torch.tanh(x) + 0.1 * x - 0.3 * torch.sin(3 * x) * s


def sd3_raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The toy as an SD3-style network: timestep = sigma * 1000."""
    return toy_velocity(x, t / 1000.0)


def flux_raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The toy as a Flux-style network: it takes sigma itself."""
    return toy_velocity(x, t)


def flow_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The toy in the denoiser interface, written out: denoised = x - sigma * v."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return x - s * toy_velocity(x, sigma)


def _noise(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _record(steps: list[torch.Tensor]) -> Callable:
    return lambda i, x, denoised: steps.append(x.clone())


# -------------------------------------------------------------------------------- model sampling


def test_flow_model_sampling_drives_the_network_unscaled_with_multiplied_timesteps() -> None:
    assert Prediction.FLOW.value == "flow"
    seen: dict[str, torch.Tensor] = {}

    def raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["x"], seen["t"] = x, t
        return toy_velocity(x, t / 1000.0)

    ms = ModelSampling.flow(shift=3.0, multiplier=1000.0)
    x, sigma = _noise(), torch.tensor([0.7, 0.25])
    denoised = ms.denoiser(raw)(x, sigma)
    assert torch.equal(seen["x"], x)  # no input scaling
    assert torch.allclose(seen["t"], sigma * 1000.0)
    assert torch.allclose(denoised, x - sigma[:, None, None, None] * toy_velocity(x, sigma), atol=1e-6)
    assert ms.noise_form is FLOW and ModelSampling.for_prediction("v").noise_form is NoiseForm.VE
    flux = ModelSampling.flux(mu=1.15)
    assert torch.allclose(flux.timestep(sigma), sigma)  # the Flux network scales sigma itself
    assert flux.schedule.sigmas.numel() == FLUX_TIMESTEPS and flux.schedule.shift == pytest.approx(math.exp(1.15))


def test_flow_percent_to_sigma_and_table_ends() -> None:
    ms = ModelSampling.flow(shift=3.0)
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.25) == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))
    assert ms.sigma_max == 1.0 and ms.sigma_min == pytest.approx(3 / (1000 + 2))


def test_noise_mixing_and_its_inverse() -> None:
    ms = ModelSampling.flow(shift=3.0)
    latent, noise, sigma = _noise(1), _noise(2), torch.tensor([0.4, 0.9])
    x = ms.noise_latent(latent, noise, sigma)
    s = sigma[:, None, None, None]
    assert torch.allclose(x, s * noise + (1 - s) * latent)
    # handing a sample on at sigma: noising it again with zero noise gives it back
    assert torch.allclose(ms.noise_latent(ms.latent_from_noisy(x, sigma), torch.zeros_like(x), sigma), x, atol=1e-6)
    ve = ModelSampling.for_prediction("eps")
    assert torch.allclose(ve.noise_latent(latent, noise, sigma), latent + s * noise)
    assert torch.equal(ve.latent_from_noisy(x, sigma), x)


def test_model_sampling_rejects_mismatched_parts() -> None:
    with pytest.raises(ModelSamplingError, match="flow prediction needs a FlowSchedule"):
        ModelSampling(S.sd_discrete_schedule(), Prediction.FLOW)
    with pytest.raises(ModelSamplingError, match="FlowSchedule"):
        ModelSampling(S.FlowSchedule(), Prediction.EPS)
    with pytest.raises(ModelSamplingError, match="ModelSampling.flow"):
        ModelSampling.for_prediction("flow")
    with pytest.raises(ModelSamplingError, match="shift > 0"):
        ModelSampling.flow(shift=0.0)
    with pytest.raises(SamplingError, match="noise_form"):
        SamplerChoice("euler", {"noise_form": 1.0})


@pytest.mark.parity
@pytest.mark.parametrize("width,height", [(1024, 1024), (512, 512), (1024, 768), (256, 256), (2048, 1024)])
def test_flux_mu_matches_flux_pipeline(width: int, height: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # FluxPipeline: image_seq_len = (H / 8 / 2) * (W / 8 / 2) packed latent tokens
    tokens = (height // 16) * (width // 16)
    assert S.flux_mu(width, height) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)


# -------------------------------------------------------------------------------- diffusers: txt2img


def _drive_flow_scheduler(sched, x: torch.Tensor, raw: Callable,  # noqa: ANN001
                          model_t: Callable) -> list[torch.Tensor]:
    """Run a diffusers flow scheduler with the toy network; returns x before each step and the result."""
    steps = [x.clone()]
    for t in sched.timesteps:
        x = sched.step(raw(x, model_t(t).expand(x.shape[0])), t, x).prev_sample
        steps.append(x.clone())
    return steps


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 4, 8, 28])
def test_sd3_shift_euler_matches_flow_match_euler_step_by_step(steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    ms = ModelSampling.flow(shift=3.0, multiplier=1000.0)
    sigmas = S.sigmas_normal(ms.schedule, steps)
    assert _max_err(sigmas, sched.sigmas) <= TOL
    noise = _noise()
    # StableDiffusion3Pipeline passes the scheduler's timestep (sigma * 1000) to the transformer
    ref = _drive_flow_scheduler(sched, noise.clone(), sd3_raw, lambda t: t)
    ours: list[torch.Tensor] = []
    out = sample(ms.denoiser(sd3_raw), SamplerChoice("euler"), sigmas, torch.zeros(SHAPE), noise,
                 noise_form=ms.noise_form, callback=lambda i, n, x, d: ours.append(x.clone()))
    ours.append(out)
    assert len(ours) == len(ref) == steps + 1
    assert max(_max_err(a, b) for a, b in zip(ours, ref)) <= TOL


def test_measured_sigma_tables_from_the_notes() -> None:
    # SD3 shift 3 "normal" and Flux mu 1.15 "simple", 8 steps (transformer-family-facts.md)
    sd3 = S.sigmas_normal(ModelSampling.flow(3.0).schedule, 8)
    flux = S.sigmas_simple(ModelSampling.flux(1.15).schedule, 8)
    assert torch.allclose(sd3, torch.tensor([1, .9475, .8828, .8008, .6938, .548, .338, .0089, 0]), atol=6e-5)
    assert torch.allclose(flux, torch.tensor([1, .9567, .9045, .8403, .7595, .6546, .5128, .3109, 0]), atol=6e-5)


def _flux_scheduler():  # noqa: ANN202
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                           max_shift=1.15)


@pytest.mark.parity
@pytest.mark.parametrize("steps,width,height", [(8, 1024, 1024), (20, 768, 1344), (25, 512, 512), (4, 1024, 1024)])
def test_flux_dynamic_shift_matches_flow_match_euler_step_by_step(steps: int, width: int, height: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = _flux_scheduler()
    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    # FluxPipeline's schedule: linspace(1, 1/N, N) through the dynamic shift
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    # ComfyUI's ModelSamplingFlux with the "simple" scheduler picks the same points from its table when
    # the step count divides the table length (10,000), as here
    ms = ModelSampling.flux(S.flux_mu(width, height))
    sigmas = S.sigmas_simple(ms.schedule, steps)
    assert _max_err(sigmas, sched.sigmas) <= TOL
    noise = _noise(3)
    # FluxPipeline passes timestep / 1000 = sigma; our Flux network takes sigma (multiplier 1)
    ref = _drive_flow_scheduler(sched, noise.clone(), flux_raw, lambda t: t / 1000.0)
    ours: list[torch.Tensor] = []
    out = sample(ms.denoiser(flux_raw), SamplerChoice("euler"), sigmas, torch.zeros(SHAPE), noise,
                 noise_form=ms.noise_form, callback=lambda i, n, x, d: ours.append(x.clone()))
    ours.append(out)
    assert max(_max_err(a, b) for a, b in zip(ours, ref)) <= TOL


def test_flux_simple_schedule_for_step_counts_not_dividing_the_table() -> None:
    # ComfyUI's table lookup truncates: off from diffusers' linspace(1, 1/N, N) by < 1/10,000 in t
    ms = ModelSampling.flux(1.15)
    sigmas = S.sigmas_simple(ms.schedule, 28)
    ideal = S.flow_time_shift(torch.linspace(1.0, 1 / 28, 28, dtype=torch.float64), math.exp(1.15))
    assert 1e-6 < _max_err(sigmas[:-1], ideal) < math.exp(1.15) / FLUX_TIMESTEPS


# -------------------------------------------------------------------------------- diffusers: img2img


def _img2img_reference(pipeline_cls, sched, steps: int, strength: float, latent: torch.Tensor,  # noqa: ANN001
                       noise: torch.Tensor, raw: Callable, model_t: Callable) -> list[torch.Tensor]:
    timesteps, remaining = pipeline_cls.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    x = sched.scale_noise(latent, timesteps[:1].repeat(latent.shape[0]), noise)
    out = [x.clone()]
    for t in timesteps:
        x = sched.step(raw(x, model_t(t).expand(x.shape[0])), t, x).prev_sample
        out.append(x.clone())
    assert len(out) == remaining + 1
    return out


@pytest.mark.parity
@pytest.mark.parametrize("steps,strength", [(10, 0.6), (20, 0.35), (8, 1.0)])
def test_sd3_img2img_matches_diffusers_timesteps_and_scale_noise(steps: int, strength: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    latent, noise = _noise(4) * 0.8 + 0.1, _noise(5)
    ref = _img2img_reference(StableDiffusion3Img2ImgPipeline, sched, steps, strength, latent, noise, sd3_raw,
                             lambda t: t)
    ms = ModelSampling.flow(shift=3.0)
    run_steps = len(ref) - 1
    sigmas = S.sigmas_for_denoise(lambda n: S.sigmas_normal(ms.schedule, n), run_steps, strength)
    ours: list[torch.Tensor] = []
    out = sample(ms.denoiser(sd3_raw), SamplerChoice("euler"), sigmas, latent, noise, noise_form=ms.noise_form,
                 callback=lambda i, n, x, d: ours.append(x.clone()))
    ours.append(out)
    # the start mixes sigma * noise + (1 - sigma) * latent
    s0 = float(sigmas[0])
    assert torch.allclose(ours[0], s0 * noise + (1 - s0) * latent, atol=1e-6)
    assert max(_max_err(a, b) for a, b in zip(ours, ref)) <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("steps,strength", [(20, 0.6), (8, 0.5)])
def test_flux_img2img_matches_diffusers_timesteps_and_scale_noise(steps: int, strength: float) -> None:
    from diffusers import FluxImg2ImgPipeline
    from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift

    width, height = 1024, 768
    sched = _flux_scheduler()
    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    latent, noise = _noise(6) * 0.5 - 0.2, _noise(7)
    ref = _img2img_reference(FluxImg2ImgPipeline, sched, steps, strength, latent, noise, flux_raw,
                             lambda t: t / 1000.0)
    ms = ModelSampling.flux(S.flux_mu(width, height))
    sigmas = S.sigmas_for_denoise(lambda n: S.sigmas_simple(ms.schedule, n), len(ref) - 1, strength)
    ours: list[torch.Tensor] = []
    out = sample(ms.denoiser(flux_raw), SamplerChoice("euler"), sigmas, latent, noise, noise_form=ms.noise_form,
                 callback=lambda i, n, x, d: ours.append(x.clone()))
    ours.append(out)
    assert max(_max_err(a, b) for a, b in zip(ours, ref)) <= TOL


# -------------------------------------------------------------------------------- diffusers: other flow solvers


def _flow_solver_run(sched, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Drive a diffusers solver with use_flow_sigmas; the network sees sigma * 1000 (its int timesteps are rounded)."""
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        v = sd3_raw(x, (sched.sigmas[i] * 1000.0).expand(x.shape[0]))
        extra = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(v, t, x, **extra).prev_sample
    return x


@pytest.mark.parity
@pytest.mark.parametrize(
    "name,sampler,kw,config",
    [
        ("DPMSolverMultistepScheduler", K.sample_dpmpp_2m, {},
         dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")),
        ("DPMSolverMultistepScheduler", K.sample_dpmpp_3m_sde, {"eta": 0.0},
         dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun")),
        ("DPMSolverMultistepScheduler", K.sample_dpmpp_2m_sde, {},
         dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint")),
        ("UniPCMultistepScheduler", K.sample_uni_pc_bh2, {"order": 2},
         dict(predict_x0=True, solver_type="bh2", solver_order=2)),
        ("UniPCMultistepScheduler", K.sample_uni_pc_bh2, {"order": 3},
         dict(predict_x0=True, solver_type="bh2", solver_order=3)),
    ],
)
def test_multistep_flow_solvers_match_diffusers_flow_prediction(name: str, sampler: Callable, kw: dict,
                                                                 config: dict) -> None:
    import diffusers

    steps = 16  # 3rd-order solvers keep their order to the end from 15 steps on
    sched = getattr(diffusers, name)(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=3.0,
                                     prediction_type="flow_prediction", final_sigmas_type="zero",
                                     lower_order_final=True, **config)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas
    assert sigmas[0] < 1 and sigmas[-1] == 0
    x0 = _noise(8)
    noise = None
    if "sde" in config.get("algorithm_type", ""):
        # diffusers draws one randn per step from its generator after the update; ours takes that draw too
        g = torch.Generator().manual_seed(1)
        noise = lambda s, s_next: torch.randn(SHAPE, generator=g)  # noqa: E731
        kw = dict(kw, noise_sampler=noise)
    ours = sampler(ModelSampling.flow(3.0).denoiser(sd3_raw), x0.clone(), sigmas, noise_form=FLOW, **kw)
    err = _max_err(ours, _flow_solver_run(sched, x0.clone()))
    assert err <= 1e-4, err


@pytest.mark.parity
def test_heun_matches_flow_match_heun() -> None:
    from diffusers import FlowMatchHeunDiscreteScheduler

    sched = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(8)
    sigmas = torch.unique_consecutive(sched.sigmas)
    x0 = _noise(9)
    ref = x0.clone()
    for t in sched.timesteps:
        ref = sched.step(sd3_raw(ref, t.expand(ref.shape[0])), t, ref).prev_sample
    ours = K.sample_heun(ModelSampling.flow(3.0).denoiser(sd3_raw), x0.clone(), sigmas, noise_form=FLOW)
    assert _max_err(ours, ref) <= TOL


@pytest.mark.parity
def test_lcm_matches_flow_match_euler_stochastic_sampling() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, stochastic_sampling=True)
    sched.set_timesteps(6)
    x0 = _noise(10)
    g = torch.Generator().manual_seed(1)
    ref = x0.clone()
    for t in sched.timesteps:
        ref = sched.step(sd3_raw(ref, t.expand(ref.shape[0])), t, ref, generator=g).prev_sample
    g = torch.Generator().manual_seed(1)
    ours = K.sample_lcm(ModelSampling.flow(3.0).denoiser(sd3_raw), x0.clone(), sched.sigmas, noise_form=FLOW,
                        noise_sampler=lambda s, s_next: torch.randn(SHAPE, generator=g))
    assert _max_err(ours, ref) <= TOL


# -------------------------------------------------------------------------------- written-out formulas


def _shared_noise(n: int) -> tuple[list[torch.Tensor], Callable]:
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]
    pending = list(draws)
    return draws, lambda s, s_next: pending.pop(0)


def _flow_sigmas(n: int = 8) -> torch.Tensor:
    return S.sigmas_normal(S.FlowSchedule(shift=3.0), n).to(torch.float64)


def _rf_split(s: torch.Tensor, s_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # deterministic part to s_down, then scale the signal from alpha_down to alpha_next and top the noise up
    down = s_next * (1 + (s_next / s - 1) * eta)
    scale = (1 - s_next) / (1 - down)
    return down, scale, (s_next**2 - (down * scale) ** 2).sqrt()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_ancestral_flow_matches_written_out_rf_step(eta: float) -> None:
    sigmas = _flow_sigmas()
    draws, noise = _shared_noise(8)
    x = _noise(12, torch.float64)
    ours = K.sample_euler_ancestral(flow_denoiser, x.clone(), sigmas, eta=eta, noise_sampler=noise, noise_form=FLOW)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = flow_denoiser(x, s.reshape(1))
        if s_next == 0:
            x = d
            continue
        down, scale, up = _rf_split(s, s_next, eta)
        x = scale * ((down / s) * x + (1 - down / s) * d) + up * draws[i]
    assert _max_err(ours, x) <= 1e-10


def test_dpm_2_ancestral_flow_matches_written_out_rf_step() -> None:
    sigmas = _flow_sigmas()
    draws, noise = _shared_noise(8)
    x = _noise(13, torch.float64)
    ours = K.sample_dpm_2_ancestral(flow_denoiser, x.clone(), sigmas, noise_sampler=noise, noise_form=FLOW)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - flow_denoiser(x, s.reshape(1))) / s
        if s_next == 0:
            x = x - d * s
            continue
        down, scale, up = _rf_split(s, s_next, 1.0)
        mid = (s.log() + down.log()).mul(0.5).exp()
        x_mid = x + d * (mid - s)
        d_mid = (x_mid - flow_denoiser(x_mid, mid.reshape(1))) / mid
        x = scale * (x + d_mid * (down - s)) + up * draws[i]
    assert _max_err(ours, x) <= 1e-10


def test_dpmpp_2s_ancestral_flow_matches_written_out_dpm_solver_pp_2s() -> None:
    sigmas = _flow_sigmas()
    draws, noise = _shared_noise(8)
    x = _noise(14, torch.float64)
    ours = K.sample_dpmpp_2s_ancestral(flow_denoiser, x.clone(), sigmas, noise_sampler=noise, noise_form=FLOW)
    # sigma 1 (lambda = -inf) starts just below it
    sigmas = sigmas.clone()
    sigmas[0] = 1 - 1e-4
    lam = lambda s: torch.log((1 - s) / s)  # noqa: E731
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = flow_denoiser(x, s.reshape(1))
        if s_next == 0:
            x = d
            continue
        down, scale, up = _rf_split(s, s_next, 1.0)
        # DPM-Solver++(2S), r = 1/2, data prediction with alpha = 1 - sigma: first-order steps are the
        # straight-line interpolation u = (s_to/s) x + (1 - s_to/s) d
        s_mid = 1 / (1 + torch.exp(0.5 * (lam(s) + lam(down))))
        u = (s_mid / s) * x + (1 - s_mid / s) * d
        d_mid = flow_denoiser(u, s_mid.reshape(1))
        x = scale * ((down / s) * x + (1 - down / s) * d_mid) + up * draws[i]
    assert _max_err(ours, x) <= 1e-10


def _lagrange_integral(sig: np.ndarray, order: int, i: int, j: int) -> float:
    # the Lagrange basis of node sig[i-j] integrated over [sig[i], sig[i+1]] with a fine trapezoid rule
    s = np.linspace(sig[i], sig[i + 1], 20001)
    prod = np.ones_like(s)
    for k in range(order):
        if k != j:
            prod *= (s - sig[i - k]) / (sig[i - j] - sig[i - k])
    return float(np.trapezoid(prod, s))


def test_dpm_2_and_lms_flow_match_written_out_velocity_ode_steps() -> None:
    # in flow form (x - denoised) / sigma is the velocity, so these sigma-ODE solvers need no change
    sigmas = _flow_sigmas(7)
    sig = sigmas.numpy()
    x = _noise(23, torch.float64)
    v = lambda x, s: toy_velocity(x, s.reshape(1))  # noqa: E731
    ref_dpm2, ref_lms, vs = x.clone(), x.clone(), []
    for i in range(7):
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            ref_dpm2 = ref_dpm2 - s * v(ref_dpm2, s)
        else:
            mid = (s * s_next).sqrt()
            ref_dpm2 = ref_dpm2 + (s_next - s) * v(ref_dpm2 + (mid - s) * v(ref_dpm2, s), mid)
        vs.append(v(ref_lms, s))
        order = min(i + 1, 4)
        ref_lms = ref_lms + sum(_lagrange_integral(sig, order, i, j) * vs[-1 - j] for j in range(order))
    assert _max_err(K.sample_dpm_2(flow_denoiser, x.clone(), sigmas, noise_form=FLOW), ref_dpm2) <= 1e-10
    assert _max_err(K.sample_lms(flow_denoiser, x.clone(), sigmas, noise_form=FLOW), ref_lms) <= 1e-6


def test_ddpm_flow_matches_written_out_posterior() -> None:
    sigmas = _flow_sigmas()
    draws, noise = _shared_noise(8)
    x = _noise(15, torch.float64)
    ours = K.sample_ddpm(flow_denoiser, x.clone(), sigmas, noise_sampler=noise, noise_form=FLOW)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = flow_denoiser(x, s.reshape(1))
        a, a_next = 1 - s, 1 - s_next
        # q(x_t | x_next) = N((a/a_next) x_next, s^2 - (a/a_next)^2 s_next^2);
        # Bayes with x_next ~ N(a_next x0, s_next^2)
        prec = 1 / s_next**2 + (a / a_next) ** 2 / (s**2 - (a / a_next) ** 2 * s_next**2) if s_next > 0 else None
        if prec is None:
            x = x0
            continue
        mean = (a_next * x0 / s_next**2 + (a / a_next) * x / (s**2 - (a / a_next) ** 2 * s_next**2)) / prec
        x = mean + prec.rsqrt() * draws[i]
    assert _max_err(ours, x) <= 1e-10


# Rescaling x_ve = x / alpha, s = sigma / alpha turns the flow process into the VE one with the same
# half-log-SNR; the DPM-Solver family, DDIM, DDPM and LCM are defined on lambda alone, so their flow
# form must equal their (diffusers-checked) VE form on the rescaled model. The Euler step coincides too.
def _ve_equivalent(model: K.Denoiser) -> K.Denoiser:
    def ve_model(x_ve: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sigma = s / (1 + s)
        alpha = (1 - sigma).reshape(-1, *([1] * (x_ve.ndim - 1)))
        return model(x_ve * alpha, sigma)

    return ve_model


@pytest.mark.parametrize(
    "sampler,kw,draws",
    [
        (K.sample_euler, {}, 0), (K.sample_ddim, {}, 0), (K.sample_dpmpp_2m, {}, 0),
        (K.sample_dpmpp_sde, {}, 2), (K.sample_dpmpp_sde, {"eta": 0.0}, 2), (K.sample_dpmpp_2m_sde, {}, 1),
        (K.sample_dpmpp_3m_sde, {}, 1), (K.sample_dpmpp_3m_sde, {"eta": 0.0}, 0),
        (K.sample_uni_pc, {"order": 3}, 0), (K.sample_ddpm, {}, 1), (K.sample_lcm, {}, 1),
    ],
)
def test_flow_form_is_the_written_out_ve_form_on_the_rescaled_process(sampler: Callable, kw: dict, draws: int) -> None:
    sigmas = S.sigmas_normal(S.FlowSchedule(shift=3.0), 12).to(torch.float64)
    sigmas[0] = 0.97  # a finite VE-equivalent start, s = 0.97 / 0.03
    x = _noise(16, torch.float64)
    if draws:
        kw = dict(kw, noise_sampler=_shared_noise(12 * draws)[1])
    ours = sampler(flow_denoiser, x.clone(), sigmas, noise_form=FLOW, **kw)
    if draws:
        kw = dict(kw, noise_sampler=_shared_noise(12 * draws)[1])
    ve_sigmas = sigmas / (1 - sigmas)
    ve = sampler(_ve_equivalent(flow_denoiser), x.clone() / (1 - sigmas[0]), ve_sigmas, **kw)
    err = _max_err(ours, ve)
    assert err <= 1e-9, err


# -------------------------------------------------------------------------------- sampler behaviour


# For Gaussian data N(0, v) in flow form x = (1 - s) x0 + s eps, the exact denoiser is
# x * (1 - s) v / ((1 - s)^2 v + s^2) and the probability-flow ODE solution is
# x(s) = x(s0) * sqrt(((1 - s)^2 v + s^2) / ((1 - s0)^2 v + s0^2)).
VAR = 0.5


def gaussian_flow_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x * (1 - s) * VAR / ((1 - s) ** 2 * VAR + s**2)


def _marginal_var(s: float) -> float:
    return (1 - s) ** 2 * VAR + s**2


@pytest.mark.parametrize(
    "sampler,order",
    [
        (K.sample_euler, 1), (K.sample_ddim, 1), (K.sample_heun, 2), (K.sample_dpm_2, 2), (K.sample_lms, 2),
        (K.sample_dpmpp_2m, 2), (lambda m, x, s, **kw: K.sample_uni_pc_bh2(m, x, s, order=2, **kw), 2),
        (lambda m, x, s, **kw: K.sample_euler_ancestral(m, x, s, eta=0.0, **kw), 1),
        (lambda m, x, s, **kw: K.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0, **kw), 2),
        (lambda m, x, s, **kw: K.sample_dpmpp_2m_sde(m, x, s, eta=0.0, **kw), 2),
        (lambda m, x, s, **kw: K.sample_dpmpp_sde(m, x, s, eta=0.0, **kw), 2),
        (lambda m, x, s, **kw: K.sample_dpmpp_3m_sde(m, x, s, eta=0.0, **kw), 2),
    ],
)
def test_deterministic_samplers_converge_to_the_exact_flow_ode_solution(sampler: Callable, order: int) -> None:
    s0, s_end = 0.95, 0.05
    x0 = _noise(17, torch.float64) * math.sqrt(_marginal_var(s0))
    exact = x0 * math.sqrt(_marginal_var(s_end) / _marginal_var(s0))
    errs = []
    for n in (20, 40):
        # uniform in lambda, ending above 0 so that no last-step special case hides the order
        lam = torch.linspace(math.log((1 - s0) / s0), math.log((1 - s_end) / s_end), n + 1, dtype=torch.float64)
        sigmas = torch.sigmoid(-lam)
        errs.append(_max_err(sampler(gaussian_flow_denoiser, x0.clone(), sigmas, noise_form=FLOW), exact))
    assert errs[1] < 0.05 * exact.abs().max().item()
    assert errs[0] / errs[1] > 2**order * 0.7, errs


@pytest.mark.parametrize(
    "sampler",
    [K.sample_euler_ancestral, K.sample_dpm_2_ancestral, K.sample_dpmpp_2s_ancestral, K.sample_dpmpp_sde,
     K.sample_dpmpp_2m_sde, K.sample_dpmpp_3m_sde, K.sample_ddpm],
)
def test_stochastic_flow_samplers_from_pure_noise_produce_the_data_distribution(sampler: Callable) -> None:
    # from sigma 1 (pure noise), as text-to-image runs; sampling error shrinks with the step count and
    # 120 Karras steps bring every sampler here within ~6% (LCM is left out: jumping to the posterior
    # mean each step loses variance, 0.24 for VAR 0.5 however many steps)
    table = S.FlowSchedule(shift=3.0)
    sigmas = S.sigmas_karras(120, table.sigma_min, table.sigma_max).to(torch.float64)
    assert sigmas[0] == 1.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, 32, 32, generator=g, dtype=torch.float64)
    out = sampler(gaussian_flow_denoiser, x, sigmas, generator=g, noise_form=FLOW)
    assert torch.isfinite(out).all()
    assert out.var().item() == pytest.approx(VAR, rel=0.1)


class _WithUncond:
    """The toy and, for the CFG++ samplers, an unconditional prediction guided by cfg 2."""

    def __init__(self, ms: ModelSampling) -> None:
        self.cond, self.uncond = ms.denoiser(sd3_raw), ms.denoiser(lambda x, t: 0.9 * sd3_raw(x, t))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.cond(x, sigma)

    def denoise_with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uncond = self.uncond(x, sigma)
        return uncond + 2.0 * (self.cond(x, sigma) - uncond), uncond


@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_every_sampler_runs_a_flow_model_through_run_sample(name: str) -> None:
    ms = ModelSampling.flow(shift=3.0)
    sigmas = S.sigmas_normal(ms.schedule, 6)
    out = sample(_WithUncond(ms), SamplerChoice(name), sigmas, torch.zeros(SHAPE), _noise(18),
                 noise_form=ms.noise_form, generator=torch.Generator().manual_seed(0),
                 percent_to_sigma=ms.percent_to_sigma)
    assert out.shape == SHAPE and torch.isfinite(out).all()


def test_split_schedule_continues_exactly_in_flow_form() -> None:
    # a run that stops at sigma > 0 hands its sample on so that the next run (no new noise) continues it
    ms = ModelSampling.flow(shift=3.0)
    sigmas = S.sigmas_normal(ms.schedule, 10)
    latent, noise = _noise(19) * 0.3, _noise(20)
    model = ms.denoiser(sd3_raw)
    whole = sample(model, SamplerChoice("euler"), sigmas, latent, noise, noise_form=FLOW)
    first = sample(model, SamplerChoice("euler"), sigmas[:5], latent, noise, noise_form=FLOW)
    assert not torch.allclose(first, sample(model, SamplerChoice("euler"), sigmas[:5], latent, noise))
    second = sample(model, SamplerChoice("euler"), sigmas[4:], first, torch.zeros(SHAPE), noise_form=FLOW)
    assert _max_err(second, whole) <= 1e-5


def test_inpainting_mask_noises_the_kept_region_in_flow_form() -> None:
    ms = ModelSampling.flow(shift=3.0)
    latent, noise = _noise(21) * 0.5, _noise(22)
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    mask[..., :, :3] = 1.0
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), sigma.clone()))
        return ms.denoiser(sd3_raw)(x, sigma)

    wrapped = masked_denoiser(recording, latent, noise, mask, FLOW)
    sigma = torch.full((SHAPE[0],), 0.6)
    wrapped(torch.randn(SHAPE), sigma)
    x_seen = seen[0][0]
    assert torch.allclose(x_seen[..., 3:], (0.6 * noise + 0.4 * latent)[..., 3:])
    out = sample(recording, SamplerChoice("euler"), S.sigmas_normal(ms.schedule, 4), latent, noise,
                 noise_mask=mask, noise_form=FLOW)
    assert torch.equal(out[..., 3:], latent[..., 3:])


def test_every_sampler_has_a_flow_reference_test() -> None:
    # a flow reference test is a parity test or one named "..._written_out_..."; the samplers it runs
    # are read from its source (body and parametrize decorator)
    # (test_comfyui_samplers holds the flow tests of the samplers added from ComfyUI's list: its "flow" tests)
    by_function = {fn.__name__: name for name, fn in K.SAMPLERS.items()}
    covered: set[str] = set()
    tests = [(name, test) for name, test in vars(sys.modules[__name__]).items()]
    tests += [(name, test) for name, test in vars(importlib.import_module("test_comfyui_samplers")).items()
              if "flow" in name]
    for test_name, test in tests:
        if not (test_name.startswith("test_") and callable(test)):
            continue
        marks = {m.name for m in getattr(test, "pytestmark", [])}
        if "parity" not in marks and "written_out" not in test_name:
            continue
        for fn_name in re.findall(r"\bK\.(sample_\w+)", inspect.getsource(test)):
            covered.add(by_function[fn_name])
    missing = sorted(set(K.SAMPLERS) - covered)
    assert not missing, f"samplers without a flow parity or written-out formula test: {missing}"
