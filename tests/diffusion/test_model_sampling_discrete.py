"""ComfyUI's ModelSamplingDiscrete and SDTurboScheduler maths: the x0 and LCM predictions, LCM's
distilled timesteps, zero-terminal-SNR rescaling and the turbo schedule, each against its formula
written out and against diffusers where it implements the same thing (LCMScheduler, DDPMScheduler)."""

from __future__ import annotations

import math

import pytest
import torch

from nodegraph_diffusion.sampling import schedules as S
from nodegraph_diffusion.sampling.guidance import CondEntry, ControlSpec, controls_for_negative
from nodegraph_diffusion.sampling.model_sampling import (
    LCM_ORIGINAL_STEPS,
    ModelSampling,
    ModelSamplingError,
    Prediction,
    lcm_boundary_scalings,
)
from nodegraph_diffusion.sampling.run import SamplerChoice, sample

SD = S.sd_discrete_schedule()


def _x(seed: int = 0, shape: tuple[int, ...] = (2, 4, 6, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- x0 and LCM predictions ---------------------------------------------------------------------

def test_x0_prediction_is_the_network_output_with_eps_input_scaling() -> None:
    sampling = ModelSampling.discrete(SD, "x0")
    x, output, sigma = _x(0), _x(1), torch.tensor([3.0, 0.5], dtype=torch.float64)
    assert torch.equal(sampling.denoised(x, sigma, output), output)
    assert torch.allclose(sampling.input_scale(sigma), 1 / (sigma**2 + 1).sqrt())
    assert sampling.schedule.sigmas.numel() == 1000 and sampling.noise_form is ModelSampling.for_prediction("eps").noise_form


@pytest.mark.parity
def test_lcm_boundary_scalings_are_diffusers_lcm_schedulers() -> None:
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0.0, 1.0, 19.0, 259.0, 499.0, 999.0], dtype=torch.float64)
    c_skip, c_out = lcm_boundary_scalings(timesteps)
    for t, skip, out in zip(timesteps.tolist(), c_skip.tolist(), c_out.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert skip == pytest.approx(ref_skip, rel=1e-12, abs=1e-300) and out == pytest.approx(ref_out, rel=1e-12)
    assert (c_skip[0], c_out[0]) == (1.0, 0.0)  # the boundary condition: the identity at t = 0


def test_lcm_denoised_written_out_on_the_distilled_timestep() -> None:
    sampling = ModelSampling.discrete(SD, "lcm")
    x, eps = _x(2), _x(3)
    sigma = torch.tensor([5.0, 0.3], dtype=torch.float64)
    t = sampling.schedule.sigma_to_t(sigma)  # the nearest of the 50 kept timesteps
    assert set(t.tolist()) <= {19.0 + 20 * i for i in range(50)}
    u = (t * 10.0).reshape(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (u**2 + 0.25), u / (u**2 + 0.25).sqrt()
    s = sigma.reshape(-1, 1, 1, 1)
    expected = c_out * (x - s * eps) + c_skip * x
    assert torch.allclose(sampling.denoised(x, sigma, eps), expected, rtol=1e-6, atol=1e-9)


def test_distilled_schedule_keeps_every_twentieth_timestep_and_maps_to_the_nearest() -> None:
    lcm = ModelSampling.discrete(SD, "lcm").schedule
    assert isinstance(lcm, S.DistilledSchedule) and lcm.skip_steps == 20 and LCM_ORIGINAL_STEPS == 50
    kept = torch.arange(50) * 20 + 19
    assert torch.equal(lcm.sigmas, SD.sigmas[kept])
    assert torch.equal(lcm.sigma_to_t(SD.sigmas[kept]), kept.double())
    # Any sigma goes to the kept timestep nearest in log-sigma, never between.
    between = (SD.sigmas[kept[10]].log() * 0.7 + SD.sigmas[kept[11]].log() * 0.3).exp()
    assert float(lcm.sigma_to_t(between)) == float(kept[10])
    # timestep -> sigma interpolates in log-sigma over the kept steps, clamped at the ends.
    assert torch.allclose(lcm.t_to_sigma(kept.double()), SD.sigmas[kept])
    mid = lcm.t_to_sigma(torch.tensor(219.0 + 5.0, dtype=torch.float64))
    assert float(mid.log()) == pytest.approx(0.75 * float(SD.log_sigmas[219]) + 0.25 * float(SD.log_sigmas[239]))
    assert float(lcm.t_to_sigma(torch.tensor(0.0))) == pytest.approx(float(SD.sigmas[19]))
    # Progress is measured on the 1,000 training timesteps: 50% is timestep 499.5.
    assert lcm.percent_to_sigma(0.5) == pytest.approx(float(lcm.t_to_sigma(torch.tensor(499.5))))
    assert (lcm.percent_to_sigma(0.0), lcm.percent_to_sigma(1.0)) == (math.inf, 0.0)
    # The normal scheduler spans timesteps 999 .. 19 of it.
    assert torch.allclose(S.sigmas_normal(lcm, 2), torch.tensor([SD.sigmas[999], SD.sigmas[19], 0.0]).float())


@pytest.mark.parity
def test_lcm_run_matches_diffusers_lcm_scheduler() -> None:
    """Four LCM steps on diffusers' own timesteps (999, 759, 499, 259) with the same noise draws: the
    same timesteps reach the network and the results agree (seen: 4.3e-6 of a max 8.9). ComfyUI (and
    we) apply the boundary condition to the VE-form sample, diffusers to the VP-form one; at these
    timesteps c_skip < 4e-8 and c_out > 1 - 2e-6, so the condition itself moves the result by less
    than this tolerance: its formula is what the tests above check."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(4)
    sampling = ModelSampling.discrete(SD, "lcm")

    seen: list[float] = []

    def raw(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t[0]))
        return 0.4 * x_in + 0.2 * torch.sin(t.reshape(-1, 1, 1, 1) / 150.0 + x_in)

    alphas = scheduler.alphas_cumprod.double()
    sigmas = torch.cat([((1 - alphas[scheduler.timesteps]) / alphas[scheduler.timesteps]).sqrt(), torch.zeros(1)])
    assert torch.equal(sampling.timestep(sigmas[:-1]), scheduler.timesteps.float())
    start = _x(4, (1, 4, 8, 8)).float()
    ours = sample(sampling.denoiser(raw), SamplerChoice("lcm"), sigmas.float(), torch.zeros_like(start), start,
                  generator=torch.Generator().manual_seed(7))

    assert seen == scheduler.timesteps.tolist()
    generator = torch.Generator().manual_seed(7)
    x = (start.double() * sigmas[0] * alphas[999].sqrt()).float()  # the same start in VP form
    for t in scheduler.timesteps:
        x = scheduler.step(raw(x, t.float().reshape(1)), t, x, generator=generator).prev_sample
    assert (ours - x).abs().max() < 1e-5 * x.abs().max()


# --- zero terminal SNR ---------------------------------------------------------------------------

def test_zero_terminal_snr_written_out() -> None:
    rescaled = S.zero_terminal_snr(SD)
    root = SD.alphas_cumprod.sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert torch.allclose(rescaled.alphas_cumprod[:-1], expected[:-1], rtol=1e-12)
    assert float(rescaled.alphas_cumprod[-1]) == S.ZERO_TERMINAL_ALPHA_CUMPROD
    assert rescaled.sigma_min == pytest.approx(SD.sigma_min)  # the first level is kept
    assert rescaled.sigma_max == pytest.approx(math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08))


@pytest.mark.parity
def test_zero_terminal_snr_matches_diffusers_rescaled_betas() -> None:
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True).alphas_cumprod.double()
    ours = S.zero_terminal_snr(SD).alphas_cumprod
    assert float(reference[-1]) == 0.0  # diffusers keeps the exact zero; we keep a finite last sigma
    assert torch.allclose(ours[:-1], reference[:-1], rtol=2e-4, atol=1e-9)


def test_discrete_sampling_starts_from_the_training_schedule() -> None:
    twice = ModelSampling.discrete(ModelSampling.discrete(SD, "v", zero_terminal=True).schedule, "v", zero_terminal=True)
    assert torch.equal(twice.schedule.alphas_cumprod, S.zero_terminal_snr(SD).alphas_cumprod)
    back = ModelSampling.discrete(ModelSampling.discrete(SD, "lcm", zero_terminal=True).schedule, "eps")
    assert torch.equal(back.schedule.sigmas, SD.sigmas) and back.prediction is Prediction.EPS
    lcm_zsnr = ModelSampling.discrete(SD, "lcm", zero_terminal=True).schedule
    assert isinstance(lcm_zsnr, S.DistilledSchedule) and lcm_zsnr.sigmas.numel() == 50
    assert float(lcm_zsnr.alphas_cumprod[-1]) == S.ZERO_TERMINAL_ALPHA_CUMPROD
    linear = S.linear_discrete_schedule()  # DiT / PixArt keep their own training schedule
    assert torch.equal(ModelSampling.discrete(linear, "x0").schedule.sigmas, linear.sigmas)
    with pytest.raises(ModelSamplingError, match="flow"):
        ModelSampling.discrete(SD, "flow")


def test_v_prediction_on_a_zero_terminal_snr_schedule_denoises_pure_noise_to_minus_v() -> None:
    sampling = ModelSampling.discrete(SD, "v", zero_terminal=True)
    x, v = _x(5), _x(6)
    sigma = torch.full((2,), sampling.sigma_max, dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    expected = x / (s**2 + 1) - v * s / (s**2 + 1).sqrt()
    assert torch.allclose(sampling.denoised(x, sigma, v), expected)
    assert torch.allclose(sampling.denoised(x, sigma, v), -v, atol=1e-3 * float(x.abs().max()))


# --- SDTurboScheduler --------------------------------------------------------------------------

@pytest.mark.parametrize("steps, denoise, timesteps", [
    (1, 1.0, [999]), (4, 1.0, [999, 899, 799, 699]), (10, 1.0, [999 - 100 * i for i in range(10)]),
    (2, 0.5, [499, 399]), (4, 0.2, [199, 99]), (3, 0.7, [699, 599, 499]), (1, 0.0, []), (2, 0.29, [199, 99]),
])
def test_sd_turbo_schedule_written_out(steps: int, denoise: float, timesteps: list[int]) -> None:
    start = 10 - int(10 * denoise)
    assert [999 - 100 * i for i in range(10)][start: start + steps] == timesteps
    expected = torch.tensor([float(SD.sigmas[t]) for t in timesteps] + [0.0])
    assert torch.allclose(S.sigmas_sd_turbo(SD, steps, denoise), expected)


@pytest.mark.parity
def test_sd_turbo_one_step_is_diffusers_trailing_timestep() -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                timestep_spacing="trailing")
    scheduler.set_timesteps(1)
    assert torch.allclose(S.sigmas_sd_turbo(SD, 1), scheduler.sigmas.float(), rtol=1e-6)


def test_sd_turbo_schedule_reads_the_models_schedule() -> None:
    rescaled = S.zero_terminal_snr(SD)
    expected = torch.tensor([rescaled.sigma_max, float(rescaled.sigmas[899]), 0.0])
    assert torch.allclose(S.sigmas_sd_turbo(rescaled, 2), expected)
    with pytest.raises(S.ScheduleError, match="1 to 10"):
        S.sigmas_sd_turbo(SD, 11)


# --- ControlNetApply's negative side -------------------------------------------------------------

def _spec(name: str) -> ControlSpec:
    return ControlSpec(controlnet=name, hint=torch.zeros(1, 3, 8, 8))  # type: ignore[arg-type]


def test_controls_for_negative_follow_comfyuis_rule() -> None:
    a, b = _spec("a"), _spec("b")
    context = torch.zeros(1, 77, 8)
    pos = CondEntry(context=context, control=a, control_to_negative=True)
    neg1, neg2 = CondEntry(context=context + 1), CondEntry(context=context + 2)
    assert controls_for_negative([pos], [neg1])[0].control is a
    # Cycling over the negative entries; a second one goes to the second.
    pos_b = CondEntry(context=context, control=b, control_to_negative=True)
    assert [e.control for e in controls_for_negative([pos, pos_b], [neg1, neg2])] == [a, b]
    assert [e.control for e in controls_for_negative([pos, pos_b], [neg1])] == [b]  # the later one replaces
    # Nothing moves when the negative has a ControlNet of its own, for entries not so marked
    # (ControlNetApplyAdvanced), or for areas.
    own = CondEntry(context=context, control=b)
    assert controls_for_negative([pos], [neg1, own]) == (neg1, own)
    assert controls_for_negative([pos.with_(control_to_negative=False)], [neg1]) == (neg1,)
    assert controls_for_negative([pos.with_(area=(8, 8, 0, 0))], [neg1]) == (neg1,)
    area_neg = neg1.with_(area=(8, 8, 0, 0))
    assert controls_for_negative([pos], [area_neg, neg2]) == (area_neg, neg2.with_(control=a))
    assert controls_for_negative([pos], []) == ()
