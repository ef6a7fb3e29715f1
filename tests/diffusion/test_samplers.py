"""Samplers against diffusers' schedulers (same sigmas, same noise) and against their published formulas."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import pytest
import torch

from nodegraph_diffusion import samplers as K
from nodegraph_diffusion import schedules as S

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
    sigmas = S.sigmas_karras(8, S.sd_discrete_schedule().sigma_min, S.sd_discrete_schedule().sigma_max) if kw else None
    # Heun/KDPM2 keep interleaved copies of each sigma; the distinct schedule is the first of each pair
    ours_sigmas = torch.unique_consecutive(sched.sigmas) if sigmas is None else sigmas
    assert ours_sigmas.numel() == 9
    x0 = _start(ours_sigmas[0])
    ours = sampler(fake_denoiser, x0.clone(), ours_sigmas)
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
