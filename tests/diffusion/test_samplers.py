"""Samplers against diffusers' schedulers (same sigmas, same noise) and against their published formulas."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from typing import Callable

import numpy as np
import pytest
import torch

from nodegraph_diffusion.sampling import samplers as K
from nodegraph_diffusion.sampling import schedules as S

SHAPE = (2, 3, 4, 4)


def fake_eps(u: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear stand-in for an epsilon-predicting U-Net on its scaled input u = x/sqrt(1+sigma^2)."""
    return 0.8 * torch.tanh(u) + 0.1 * u + 0.05 * torch.sin(3 * u)


def fake_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The same model in the denoiser interface: denoised = x - sigma * eps(x / sqrt(1 + sigma^2))."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x - s * fake_eps(x / (s**2 + 1) ** 0.5)


def _start(sigma0: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g) * sigma0


def _diffusers_scheduler(name: str, **kw: object):  # noqa: ANN202
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, name)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, **kw
    )


def _run_diffusers(sched, x: torch.Tensor, seed: int = 1) -> torch.Tensor:  # noqa: ANN001
    """Drive a diffusers scheduler with fake_eps; x in whatever variable that scheduler steps."""
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        eps = fake_eps(sched.scale_model_input(x, t))
        extra = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(eps, t, x, **extra).prev_sample
    return x


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err}"


# the Euler-family schedulers of diffusers step the VE variable x = x0 + sigma * eps directly
@pytest.mark.parity
@pytest.mark.parametrize(
    "diffusers_name,sampler,kw",
    [
        ("EulerDiscreteScheduler", K.sample_euler, {}),
        ("EulerDiscreteScheduler", K.sample_euler, {"use_karras_sigmas": True}),
        ("HeunDiscreteScheduler", K.sample_heun, {}),
        ("KDPM2DiscreteScheduler", K.sample_dpm_2, {}),
    ],
)
def test_deterministic_ve_samplers_match_diffusers(diffusers_name: str, sampler: Callable, kw: dict) -> None:
    sched = _diffusers_scheduler(diffusers_name, timestep_spacing="linspace", **kw)
    sched.set_timesteps(8)
    if kw.get("use_karras_sigmas"):
        # our own Karras schedule drives our sampler: checks schedule and sampler together
        table = S.sd_discrete_schedule()
        sigmas = S.sigmas_karras(8, table.sigma_min, table.sigma_max)
    else:
        # Heun/KDPM2 keep interleaved copies of each sigma; the distinct schedule is one of each
        sigmas = torch.unique_consecutive(sched.sigmas)
    assert sigmas.numel() == 9
    x0 = _start(sigmas[0])
    ours = sampler(fake_denoiser, x0.clone(), sigmas)
    _assert_close(ours, _run_diffusers(sched, x0.clone()))


@pytest.mark.parity
def test_euler_ancestral_matches_diffusers_with_shared_noise() -> None:
    sched = _diffusers_scheduler("EulerAncestralDiscreteScheduler", timestep_spacing="linspace")
    sched.set_timesteps(8)
    x0 = _start(sched.sigmas[0])
    g = torch.Generator().manual_seed(1)
    ours = K.sample_euler_ancestral(fake_denoiser, x0.clone(), sched.sigmas, generator=g)
    _assert_close(ours, _run_diffusers(sched, x0.clone(), seed=1))


@pytest.mark.parity
def test_ddim_matches_diffusers() -> None:
    sched = _diffusers_scheduler("DDIMScheduler", set_alpha_to_one=True, clip_sample=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(8)
    sigmas = S.sigmas_ddim_uniform(S.sd_discrete_schedule(), 8)
    x0 = _start(sigmas[0])
    ours = K.sample_ddim(fake_denoiser, x0.clone(), sigmas)
    # DDIM steps the variance-preserving variable x / sqrt(1 + sigma^2); at sigma=0 both coincide
    ref = _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5)
    _assert_close(ours, ref)


@pytest.mark.parity
def test_dpmpp_2m_matches_diffusers_multistep() -> None:
    sched = _diffusers_scheduler(
        "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        timestep_spacing="linspace", final_sigmas_type="zero", lower_order_final=True,
    )
    sched.set_timesteps(8)
    sigmas = sched.sigmas
    x0 = _start(sigmas[0])
    ours = K.sample_dpmpp_2m(fake_denoiser, x0.clone(), sigmas)
    ref = _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5)
    _assert_close(ours, ref)


@pytest.mark.parity
def test_dpm_2_ancestral_matches_diffusers_with_shared_noise() -> None:
    sched = _diffusers_scheduler("KDPM2AncestralDiscreteScheduler", timestep_spacing="linspace")
    sched.set_timesteps(8)
    sigmas = torch.unique_consecutive(sched.sigmas)
    assert sigmas.numel() == 9
    x0 = _start(sigmas[0])
    g = torch.Generator().manual_seed(1)
    ours = K.sample_dpm_2_ancestral(fake_denoiser, x0.clone(), sigmas, generator=g)
    _assert_close(ours, _run_diffusers(sched, x0.clone(), seed=1))


@pytest.mark.parity
def test_dpmpp_2m_sde_matches_diffusers_sde_multistep() -> None:
    sched = _diffusers_scheduler(
        "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint",
        timestep_spacing="linspace", final_sigmas_type="zero", lower_order_final=True,
    )
    sched.set_timesteps(8)
    sigmas = sched.sigmas
    x0 = _start(sigmas[0])
    g = torch.Generator().manual_seed(1)
    ours = K.sample_dpmpp_2m_sde(fake_denoiser, x0.clone(), sigmas, generator=g)
    _assert_close(ours, _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5, seed=1))


@pytest.mark.parity
def test_dpmpp_3m_sde_without_noise_matches_diffusers_3rd_order_multistep() -> None:
    # 16 steps: below 15 diffusers also drops to 2nd order on the second-to-last step
    sched = _diffusers_scheduler(
        "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=3, solver_type="heun",
        timestep_spacing="linspace", final_sigmas_type="zero", lower_order_final=True,
    )
    sched.set_timesteps(16)
    sigmas = sched.sigmas
    x0 = _start(sigmas[0])
    ours = K.sample_dpmpp_3m_sde(fake_denoiser, x0.clone(), sigmas, eta=0.0)
    _assert_close(ours, _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5))


@pytest.mark.parity
@pytest.mark.parametrize(
    "solver_type,sampler", [("bh1", K.sample_uni_pc), ("bh2", K.sample_uni_pc_bh2)], ids=["uni_pc", "uni_pc_bh2"]
)
@pytest.mark.parametrize("order,steps", [(2, 8), (3, 16), (3, 5)])
def test_uni_pc_matches_diffusers(solver_type: str, sampler: Callable, order: int, steps: int) -> None:
    # diffusers' bh1 step to sigma 0 is B(h) * 0 with B(h) = -inf (NaN): bh1 is compared ending at sigma_min
    final = "zero" if solver_type == "bh2" else "sigma_min"
    sched = _diffusers_scheduler(
        "UniPCMultistepScheduler", predict_x0=True, solver_type=solver_type, solver_order=order,
        timestep_spacing="linspace", final_sigmas_type=final, lower_order_final=True,
    )
    sched.set_timesteps(steps)
    sigmas = sched.sigmas
    assert (sigmas[-1] == 0) == (final == "zero")
    x0 = _start(sigmas[0])
    ours = sampler(fake_denoiser, x0.clone(), sigmas, order=order)
    # diffusers steps the variance-preserving variable: back to VE at the last sigma
    ref = _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5) * (1 + sigmas[-1] ** 2) ** 0.5
    _assert_close(ours, ref)


def test_uni_pc_variants_differ_and_default_to_comfyui_order_3() -> None:
    # bh1 and bh2 are different correctors (B(h) = h vs e^h - 1); ComfyUI runs both at order 3
    sigmas = S.sigmas_karras(10, 0.03, 14.6)
    x0 = _start(sigmas[0])
    bh1, bh2 = K.sample_uni_pc(fake_denoiser, x0.clone(), sigmas), K.sample_uni_pc_bh2(fake_denoiser, x0.clone(), sigmas)
    assert (bh1 - bh2).abs().max() > 1e-4
    _assert_close(bh1, K.sample_uni_pc(fake_denoiser, x0.clone(), sigmas, order=3))
    assert (bh1 - K.sample_uni_pc(fake_denoiser, x0.clone(), sigmas, order=2)).abs().max() > 1e-4


@pytest.mark.parity
def test_ddpm_matches_diffusers_with_shared_noise() -> None:
    sched = _diffusers_scheduler("DDPMScheduler", clip_sample=False, variance_type="fixed_small")
    timesteps = [876, 751, 626, 501, 376, 251, 126, 1]
    sched.set_timesteps(timesteps=timesteps)
    ac = sched.alphas_cumprod[torch.tensor(timesteps)]
    sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    x0 = _start(sigmas[0])
    g = torch.Generator().manual_seed(1)
    ours = K.sample_ddpm(fake_denoiser, x0.clone(), sigmas, generator=g)
    _assert_close(ours, _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5, seed=1))


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_diffusers_with_shared_noise(steps: int) -> None:
    sched = _diffusers_scheduler("LCMScheduler", original_inference_steps=50, timestep_scaling=10.0)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod[sched.timesteps]
    # the scheduler's last step lands on its prediction: our schedule ends at sigma 0
    sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    # diffusers mixes its prediction with the input through LCM's boundary condition
    # (c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25)); that is the model's
    # parameterisation, not the sampler's, and on LCM's timesteps (t >= 19) it is the identity to ~1e-5
    for t in sched.timesteps:
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) < 1e-5 and abs(1 - float(c_out)) < 1e-5
    x0 = _start(sigmas[0])
    g = torch.Generator().manual_seed(1)
    ours = K.sample_lcm(fake_denoiser, x0.clone(), sigmas, generator=g)
    _assert_close(ours, _run_diffusers(sched, x0.clone() / (1 + sigmas[0] ** 2) ** 0.5, seed=1))


def _reference_lms_coefficient(sig: np.ndarray, order: int, i: int, j: int) -> float:
    # the Lagrange basis integrated with a fine composite trapezoid rule
    s = np.linspace(sig[i], sig[i + 1], 20001)
    prod = np.ones_like(s)
    for k in range(order):
        if k != j:
            prod *= (s - sig[i - k]) / (sig[i - j] - sig[i - k])
    return float(np.trapezoid(prod, s))


def test_lms_coefficients_and_run_match_written_out_multistep() -> None:
    sigmas = S.sigmas_karras(7, 0.03, 14.6).to(torch.float64)
    sig = sigmas.numpy()
    for i, order in [(0, 1), (1, 2), (3, 4), (5, 4)]:
        for j in range(order):
            assert K.lms_coefficient(order, sig, i, j) == pytest.approx(_reference_lms_coefficient(sig, order, i, j), abs=1e-6)
    x = _start(sigmas[0]).to(torch.float64)
    ref, ds = x.clone(), []
    for i in range(7):
        ds.append((ref - fake_denoiser(ref, sigmas[i : i + 1])) / sigmas[i])
        cur = min(i + 1, 4)
        ref = ref + sum(_reference_lms_coefficient(sig, cur, i, j) * ds[-1 - j] for j in range(cur))
    _assert_close(K.sample_lms(fake_denoiser, x, sigmas), ref)


@pytest.mark.parity
@pytest.mark.parametrize("kw", [{}, {"use_karras_sigmas": True}])
def test_lms_matches_diffusers(kw: dict) -> None:
    pytest.importorskip("scipy")  # diffusers integrates its LMS coefficients with scipy.integrate.quad
    # LMS steps the VE variable like the Euler family; its sigmas end with 0
    sched = _diffusers_scheduler("LMSDiscreteScheduler", timestep_spacing="linspace", **kw)
    sched.set_timesteps(8)
    sigmas = sched.sigmas
    assert sigmas.numel() == 9 and sigmas[-1] == 0
    x0 = _start(sigmas[0])
    ours = K.sample_lms(fake_denoiser, x0.clone(), sigmas)
    _assert_close(ours, _run_diffusers(sched, x0.clone()))



# DPM-Solver++ (Lu et al. 2022) written out in the paper's variance-preserving notation: x_vp = alpha * x0
# + sig * eps with alpha = 1/sqrt(1+s^2), sig = s/sqrt(1+s^2), lambda = log(alpha/sig) for VE sigma s.
def _vp(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha = 1 / (1 + s**2) ** 0.5
    sig = s * alpha
    return alpha, sig, (alpha / sig).log()


def _vp_data_prediction(x_vp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    alpha, sig, _ = _vp(s)
    return (x_vp - sig * fake_eps(x_vp)) / alpha


def _dpmpp_1(x_vp: torch.Tensor, s: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++ first-order update from s to t with the data prediction x0."""
    (_, sig_s, lam_s), (alpha_t, sig_t, lam_t) = _vp(s), _vp(t)
    return (sig_t / sig_s) * x_vp - alpha_t * torch.expm1(-(lam_t - lam_s)) * x0


def _ancestral_split(s: torch.Tensor, s_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # k-diffusion's split (eta=1): VE noise of std sigma_up re-added after a deterministic step to sigma_down
    up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
    return (s_next**2 - up**2) ** 0.5, up


def _renoise(x_vp: torch.Tensor, down: torch.Tensor, up: torch.Tensor, s_next: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # adding VE noise: x_ve(s_next) = x_ve(down) + up * z, with x_ve = x_vp / alpha
    return _vp(s_next)[0] * (x_vp / _vp(down)[0] + up * z)


def _shared_noise(n: int) -> tuple[list[torch.Tensor], Callable]:
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]
    pending = list(draws)
    return draws, lambda s, s_next: pending.pop(0)


def test_dpmpp_2s_ancestral_matches_written_out_dpm_solver_pp_2s() -> None:
    sigmas = S.sigmas_karras(8, 0.03, 14.6).to(torch.float64)
    draws, noise = _shared_noise(7)
    x = _start(sigmas[0]).to(torch.float64)
    ours = K.sample_dpmpp_2s_ancestral(fake_denoiser, x.clone(), sigmas, noise_sampler=noise)
    x_vp = x * _vp(sigmas[0])[0]
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x_vp = _vp_data_prediction(x_vp, s)
            continue
        down, up = _ancestral_split(s, s_next)
        # Algorithm 1 of the paper with r = 1/2: the intermediate point halves the step in lambda
        lam_mid = 0.5 * (_vp(s)[2] + _vp(down)[2])
        s_mid = (-lam_mid).exp()
        u = _dpmpp_1(x_vp, s, s_mid, _vp_data_prediction(x_vp, s))
        x_vp = _dpmpp_1(x_vp, s, down, _vp_data_prediction(u, s_mid))
        x_vp = _renoise(x_vp, down, up, s_next, draws[i])
    _assert_close(ours, x_vp)


def test_dpmpp_sde_matches_written_out_two_stage_sde_step() -> None:
    sigmas = S.sigmas_karras(8, 0.03, 14.6).to(torch.float64)
    draws, noise = _shared_noise(14)
    x = _start(sigmas[0]).to(torch.float64)
    ours = K.sample_dpmpp_sde(fake_denoiser, x.clone(), sigmas, noise_sampler=noise)
    x_vp = x * _vp(sigmas[0])[0]
    z = iter(draws)
    for i in range(8):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _vp_data_prediction(x_vp, s)
        if s_next == 0:
            x_vp = x0
            continue
        # stage 1: ancestral first-order step to the log-sigma midpoint
        s_mid = (s * s_next) ** 0.5
        down, up = _ancestral_split(s, s_mid)
        u = _renoise(_dpmpp_1(x_vp, s, down, x0), down, up, s_mid, next(z))
        # stage 2: ancestral first-order step over the whole interval with the midpoint's prediction
        down, up = _ancestral_split(s, s_next)
        x_vp = _renoise(_dpmpp_1(x_vp, s, down, _vp_data_prediction(u, s_mid)), down, up, s_next, next(z))
    _assert_close(ours, x_vp)


# For Gaussian data N(0, v) the exact denoiser is x * v / (v + sigma^2) and the probability-flow ODE
# has the closed-form solution x(s) = x(s0) * sqrt((v + s^2) / (v + s0^2)).
VAR = 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x * VAR / (VAR + s**2)


@pytest.mark.parametrize(
    "sampler,order",
    [
        (K.sample_euler, 1), (K.sample_ddim, 1), (K.sample_heun, 2), (K.sample_dpm_2, 2), (K.sample_lms, 2),
        (K.sample_dpmpp_2m, 2),
        (lambda m, x, s: K.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0), 2),
        (lambda m, x, s: K.sample_euler_ancestral(m, x, s, eta=0.0), 1),
        (lambda m, x, s: K.sample_dpmpp_2m_sde(m, x, s, eta=0.0), 2),
        (lambda m, x, s: K.sample_dpmpp_sde(m, x, s, eta=0.0), 2),
        (lambda m, x, s: K.sample_uni_pc(m, x, s, order=2), 2),
        (lambda m, x, s: K.sample_uni_pc_bh2(m, x, s, order=2), 2),
        # a 1st-order first step (local error h^2) caps the observed global order of 3M at 2
        (lambda m, x, s: K.sample_dpmpp_3m_sde(m, x, s, eta=0.0), 2),
    ],
)
def test_deterministic_samplers_converge_to_exact_ode_solution(sampler: Callable, order: int) -> None:
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    sigma_end = 0.1
    exact = x0 * math.sqrt((VAR + sigma_end**2) / (VAR + 10.0**2))
    errs = []
    for n in (20, 40):
        # ends at sigma_end (not 0) so that no last-step special case hides the order of the method
        sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(sigma_end), n + 1, dtype=torch.float64))
        errs.append((sampler(gaussian_denoiser, x0.clone(), sigmas) - exact).abs().max().item())
    assert errs[1] < 0.05 * exact.abs().max().item()
    # halving the step size shrinks the error by about 2**order
    assert errs[0] / errs[1] > 2**order * 0.7, errs


@pytest.mark.parametrize(
    "sampler",
    [K.sample_euler_ancestral, K.sample_dpm_2_ancestral, K.sample_dpmpp_2s_ancestral, K.sample_dpmpp_2m_sde,
     K.sample_dpmpp_3m_sde, K.sample_ddpm],
)
def test_stochastic_samplers_produce_the_data_distribution(sampler: Callable) -> None:
    # sampling error shrinks with the step count; 80 Karras steps bring every sampler here within ~8%
    sigmas = S.sigmas_karras(80, 0.03, 14.6).to(torch.float64)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 1, 32, 32, generator=g, dtype=torch.float64) * sigmas[0]
    out = sampler(gaussian_denoiser, x0, sigmas, generator=g)
    assert out.var().item() == pytest.approx(VAR, rel=0.1)


def test_callback_sees_every_step_and_noise_sampler_is_used() -> None:
    sigmas = S.sigmas_karras(5, 0.03, 14.6)
    seen: list[int] = []
    x0 = _start(sigmas[0])
    K.sample_euler(fake_denoiser, x0, sigmas, callback=lambda i, x, d: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]
    calls: list[float] = []

    def zero_noise(s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        calls.append(float(s_next))
        return torch.zeros(SHAPE)

    # with zero noise an ancestral step is an Euler step to sigma_down: lcm then reduces to the bare prediction
    out = K.sample_lcm(fake_denoiser, x0.clone(), sigmas, noise_sampler=zero_noise)
    assert len(calls) == 4
    x = x0.clone()
    for i in range(5):
        x = fake_denoiser(x, sigmas[i : i + 1])
    _assert_close(out, x)


def test_every_sampler_has_a_reference_test() -> None:
    # a reference test is a parity test or one named "..._written_out_..."; the samplers it runs are
    # read from its source (body and parametrize decorator), so a new sampler without one fails here
    # (the samplers added from ComfyUI's list have theirs in test_comfyui_samplers)
    by_function = {fn.__name__: name for name, fn in K.SAMPLERS.items()}
    covered: set[str] = set()
    tests = [*vars(sys.modules[__name__]).items(), *vars(importlib.import_module("test_comfyui_samplers")).items()]
    for test_name, test in tests:
        if not (test_name.startswith("test_") and callable(test)):
            continue
        marks = {m.name for m in getattr(test, "pytestmark", [])}
        if "parity" not in marks and "written_out" not in test_name:
            continue
        for fn_name in re.findall(r"\bK\.(sample_\w+)", inspect.getsource(test)):
            covered.add(by_function[fn_name])
    missing = sorted(set(K.SAMPLERS) - covered)
    assert not missing, f"samplers without a parity or written-out formula test: {missing}"
