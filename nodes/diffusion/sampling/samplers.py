"""Diffusion samplers over a denoiser `model(x, sigma) -> denoised` (k-diffusion's formulation).

Every sampler is `sample_<name>(model, x, sigmas, ...) -> x`: x starts as the noisy sample at
sigmas[0] and ends as the sample at sigmas[-1] (normally 0). Stochastic samplers draw noise from a
`noise_sampler(sigma, sigma_next) -> (B, ...)` so that callers (and parity tests) control it.

A noisy sample is x = alpha(sigma) * x0 + sigma * noise, in one of two forms (:class:`NoiseForm`):
VE, alpha = 1 (k-diffusion's variable; SD1/SD2/SDXL models after their input scaling), or FLOW,
alpha = 1 - sigma (rectified flow: SD3, Flux). In both, (x - denoised) / sigma is dx/dsigma of the
probability-flow ODE and a first-order (DDIM) step is the same interpolation between x and the
denoised estimate, so Euler, Heun, DPM-2, LMS and DDIM need nothing form-specific. The others use
the form: the DPM-Solver family steps in the half-log-SNR lambda = log(alpha / sigma) and scales
the data term by alpha of the target; ancestral steps re-noise so that the marginal at sigma_next
is alpha_next * x0 + sigma_next * noise.

SAMPLERS holds ComfyUI's whole KSampler list under its names; how the samplers added from it
treat flow models is said where they start. The CFG++ ones (CFG_PP_SAMPLERS) take a
:data:`GuidedDenoiser`, which also returns the unconditional prediction.
"""

from __future__ import annotations

import functools
import inspect
import math
from enum import Enum
from typing import Callable, Literal, Optional, Protocol

import numpy as np
import torch

__all__ = [
    "Denoiser",
    "StepCallback",
    "NoiseSampler",
    "NoiseForm",
    "gaussian_noise_sampler",
    "to_d",
    "ancestral_step",
    "lms_coefficient",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_lms",
    "sample_dpmpp_2m",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_ddim",
    "sample_ddpm",
    "sample_lcm",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
    "sample_dpmpp_2m_sde_heun",
    "GuidedDenoiser",
    "sample_dpmpp_sde_gpu",
    "sample_dpmpp_2m_sde_gpu",
    "sample_dpmpp_2m_sde_heun_gpu",
    "sample_dpmpp_3m_sde_gpu",
    "sample_euler_cfg_pp",
    "sample_euler_ancestral_cfg_pp",
    "sample_dpmpp_2s_ancestral_cfg_pp",
    "sample_dpmpp_2m_cfg_pp",
    "sample_res_multistep",
    "sample_res_multistep_cfg_pp",
    "sample_res_multistep_ancestral",
    "sample_res_multistep_ancestral_cfg_pp",
    "sample_gradient_estimation",
    "sample_gradient_estimation_cfg_pp",
    "sample_heunpp2",
    "sample_ipndm",
    "ipndm_v_weights",
    "sample_ipndm_v",
    "deis_time",
    "deis_weights",
    "sample_deis",
    "sample_dpm_fast",
    "sample_dpm_adaptive",
    "sample_seeds_2",
    "sample_seeds_3",
    "sample_exp_heun_2_x0",
    "sample_exp_heun_2_x0_sde",
    "sample_er_sde",
    "sa_solver_weights",
    "sample_sa_solver",
    "sample_sa_solver_pece",
    "SA_SOLVER_STOCHASTIC_PERCENTS",
    "SAMPLERS",
    "CFG_PP_SAMPLERS",
]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x: (B, ...) noisy input at noise level sigma: (B,). Returns the denoised estimate (B, ...)."""
        ...


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Where a flow schedule starts at sigma = 1 (pure noise, lambda = -inf), the samplers that step in
# lambda start just below it instead; the sample there differs from pure noise by 1e-4 * x0.
_FLOW_SIGMA_BELOW_ONE = 1.0 - 1e-4


class NoiseForm(str, Enum):
    """How a noisy sample mixes data and noise: x = alpha(sigma) * x0 + sigma * noise."""

    VE = "ve"  # alpha = 1: variance exploding (k-diffusion's variable)
    FLOW = "flow"  # alpha = 1 - sigma: rectified flow, sigma in [0, 1]

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        """The signal scale at sigma (same shape)."""
        return torch.ones_like(sigma) if self is NoiseForm.VE else 1.0 - sigma

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda = log(alpha / sigma), the time variable of the DPM-Solver family (same shape)."""
        if self is NoiseForm.VE:
            return -sigma.log()
        return torch.log1p(-sigma) - sigma.log()

    def sigma_at(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`half_log_snr`."""
        if self is NoiseForm.VE:
            return (-half_log_snr).exp()
        return torch.sigmoid(-half_log_snr)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """alpha * x0 + sigma * noise; x0, noise: (B, ...); sigma: a scalar or (B,)."""
        s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
        s = s.reshape(-1, *([1] * (x0.ndim - 1))) if s.ndim else s
        return self.alpha(s) * x0 + s * noise

    def ancestral(self, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a step sigma -> sigma_next into a deterministic step to sigma_down, then
        x_next = scale * x_down + sigma_up * fresh noise. Returns (sigma_down, sigma_up, scale).

        VE: k-diffusion's split (scale 1, sigma_down^2 + sigma_up^2 = sigma_next^2). FLOW: the
        deterministic step goes to sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        (ComfyUI's rectified-flow ancestral samplers), then scale = alpha_next / alpha_down brings
        the signal back to alpha_next and sigma_up^2 = sigma_next^2 - (scale * sigma_down)^2 tops
        the noise up to sigma_next. eta = 0 is deterministic in both.
        """
        if self is NoiseForm.VE:
            down, up = ancestral_step(sigma, sigma_next, eta)
            return down, up, torch.ones_like(sigma_next)
        # eta > 1 would step below 0; stop at the denoised estimate and re-noise fully (as VE caps sigma_up)
        down = (sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)).clamp(min=0.0)
        scale = (1.0 - sigma_next) / (1.0 - down)
        up = (sigma_next**2 - (scale * down) ** 2).clamp(min=0.0).sqrt()
        return down, up, scale

    def ve_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma / alpha: the noise level of the VE process x / alpha, which has the same half-log-SNR."""
        return sigma if self is NoiseForm.VE else sigma / (1.0 - sigma)

    def from_ve_sigma(self, ve_sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`ve_sigma`."""
        return ve_sigma if self is NoiseForm.VE else ve_sigma / (1.0 + ve_sigma)

    def finite_half_log_snr(self, sigmas: torch.Tensor) -> torch.Tensor:
        """sigmas with a finite lambda everywhere but at a final 0: a flow schedule that starts at
        sigma 1 starts just below it (the sample there is the same noise up to 1e-4 * x0)."""
        if self is NoiseForm.VE or sigmas.numel() < 2 or sigmas[0] < 1.0:
            return sigmas
        sigmas = sigmas.clone()
        sigmas[0] = max(_FLOW_SIGMA_BELOW_ONE, (1.0 + float(sigmas[1])) / 2.0)
        return sigmas


def gaussian_noise_sampler(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoiseSampler:
    """Standard normal noise shaped like x, drawn from `generator` (one draw per call)."""

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    return draw


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - denoised) / sigma (in flow form: the velocity)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a VE step sigma -> sigma_next into a deterministic step to sigma_down plus noise of std sigma_up.

    sigma_down**2 + sigma_up**2 == sigma_next**2; eta=0 is fully deterministic, eta=1 is DDPM-like.
    """
    if eta == 0.0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _batch_sigma(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype) * x.new_ones(x.shape[0])


def _noise_or_default(x: torch.Tensor, noise_sampler: Optional[NoiseSampler], generator: Optional[torch.Generator]) -> NoiseSampler:
    return noise_sampler if noise_sampler is not None else gaussian_noise_sampler(x, generator)


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                 noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (the same in both noise forms). x: (B, ...), sigmas: (n+1,)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """Euler to sigma_down, then fresh noise up to sigma_next (:meth:`NoiseForm.ancestral`).

    x: (B, ...), sigmas: (n+1,)."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up, scale = noise_form.ancestral(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to sigma=0 is Euler. Both forms alike."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, _batch_sigma(x, sigmas[i + 1])))
        x = x + (d + d_next) / 2 * dt
    return x


def _geometric_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.log() * 0.5 + b.log() * 0.5).exp()


def _dpm_2_step(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
                denoised: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver-2 step in sigma: the derivative re-evaluated at the log-midpoint; Euler to sigma_to = 0."""
    d = to_d(x, sigma, denoised)
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = _geometric_mean(sigma, sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, model(x_mid, _batch_sigma(x, sigma_mid)))
    return x + d_mid * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                 noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """DPM-Solver-2 in sigma (Karras et al. 2022); the same in both noise forms."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        x = _dpm_2_step(model, x, sigmas[i], sigmas[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """DPM-Solver-2 to sigma_down, then fresh noise up to sigma_next (:meth:`NoiseForm.ancestral`)."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up, scale = noise_form.ancestral(sigmas[i], sigmas[i + 1], eta)
        x = _dpm_2_step(model, x, sigmas[i], sigma_down, denoised)
        if sigmas[i + 1] > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node sigmas[i-j].

    The nodes are sigmas[i], sigmas[i-1], ..., sigmas[i-order+1]; the basis is a polynomial of degree
    order-1, so Gauss-Legendre quadrature with `order` points integrates it exactly.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]

    def basis(s: np.ndarray) -> np.ndarray:
        out = np.ones_like(s)
        for k in range(order):
            if k != j:
                out = out * (s - nodes[k]) / (nodes[j] - nodes[k])
        return out

    a, b = float(sigmas[i]), float(sigmas[i + 1])
    pts, wts = np.polynomial.legendre.leggauss(max(order, 1))
    s = 0.5 * (b - a) * pts + 0.5 * (a + b)
    return float(0.5 * (b - a) * np.sum(wts * basis(s)))


@torch.no_grad()
def sample_lms(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None, order: int = 4,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """Linear multistep in sigma over the last `order` derivatives (fewer while they accumulate); both forms alike."""
    sig = sigmas.detach().cpu().to(torch.float64).numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, sig, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                    noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): 2nd-order multistep in data prediction; 1st order first and last."""
    sigmas = noise_form.finite_half_log_snr(sigmas)
    old_denoised: Optional[torch.Tensor] = None
    h_last: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = noise_form.half_log_snr(sigmas[i + 1]) - noise_form.half_log_snr(sigmas[i])
        if old_denoised is None or h_last is None:
            denoised_est = denoised
        else:
            r = h_last / h
            denoised_est = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - noise_form.alpha(sigmas[i + 1]) * torch.expm1(-h) * denoised_est
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """DPM-Solver++(2S) single-step with midpoint r=1/2 (in lambda) to sigma_down, then fresh noise to sigma_next."""
    noise = _noise_or_default(x, noise_sampler, generator)
    sigmas = noise_form.finite_half_log_snr(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up, scale = noise_form.ancestral(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = noise_form.half_log_snr(sigmas[i]), noise_form.half_log_snr(sigma_down)
            h = t_next - t
            sigma_mid = noise_form.sigma_at(t + 0.5 * h)
            x_mid = (sigma_mid / sigmas[i]) * x - noise_form.alpha(sigma_mid) * torch.expm1(-0.5 * h) * denoised
            denoised_mid = model(x_mid, _batch_sigma(x, sigma_mid))
            x = (sigma_down / sigmas[i]) * x - noise_form.alpha(sigma_down) * torch.expm1(-h) * denoised_mid
        if sigmas[i + 1] > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def _ancestral_dpmpp_1(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float, noise: torch.Tensor, noise_form: NoiseForm) -> torch.Tensor:
    """An ancestral first-order DPM-Solver++ step from sigma to sigma_to with a given denoised estimate.

    The split into a deterministic part and fresh noise is k-diffusion's, taken on the VE-equivalent
    noise levels exp(-lambda) = sigma / alpha (where both forms are the same process, rescaled).
    """
    lam, lam_to = noise_form.half_log_snr(sigma), noise_form.half_log_snr(sigma_to)
    down, up = ancestral_step((-lam).exp(), (-lam_to).exp(), eta)
    h = -down.log() - lam
    alpha, alpha_to = noise_form.alpha(sigma), noise_form.alpha(sigma_to)
    return (alpha_to / alpha) * (-h).exp() * x - alpha_to * torch.expm1(-h) * denoised + alpha_to * up * noise


@torch.no_grad()
def sample_dpmpp_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """DPM-Solver++ SDE, single-step 2nd order: an ancestral half step (in lambda) to a midpoint, then
    an ancestral full step using the midpoint prediction. Two noise draws per step."""
    noise = _noise_or_default(x, noise_sampler, generator)
    sigmas = noise_form.finite_half_log_snr(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        lam, lam_next = noise_form.half_log_snr(sigma), noise_form.half_log_snr(sigma_next)
        sigma_mid = noise_form.sigma_at(0.5 * (lam + lam_next))
        x_mid = _ancestral_dpmpp_1(x, denoised, sigma, sigma_mid, eta, noise(sigma, sigma_mid), noise_form)
        denoised_mid = model(x_mid, _batch_sigma(x, sigma_mid))
        x = _ancestral_dpmpp_1(x, denoised_mid, sigma, sigma_next, eta, noise(sigma, sigma_next), noise_form)
    return x


def _dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback],
                  eta: float, noise: NoiseSampler, noise_form: NoiseForm, solver_type: Literal["midpoint", "heun"]
                  ) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, data-prediction SDE solver). Its second-order term is the
    midpoint one, 1/2 * (1 - e^-h') * D1, or Heun's, (1 - (1 - e^-h') / h') * D1, with h' = (1 + eta) * h and
    D1 = (denoised - previous denoised) / r the difference scaled to this step (r = h_last / h)."""
    sigmas = noise_form.finite_half_log_snr(sigmas)
    old_denoised: Optional[torch.Tensor] = None
    h_last: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = noise_form.half_log_snr(sigmas[i + 1]) - noise_form.half_log_snr(sigmas[i])
        eta_h = eta * h
        alpha_next = noise_form.alpha(sigmas[i + 1])
        x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x - alpha_next * torch.expm1(-h - eta_h) * denoised
        if old_denoised is not None and h_last is not None:
            d1 = (denoised - old_denoised) / (h_last / h)
            if solver_type == "midpoint":
                x = x - 0.5 * alpha_next * torch.expm1(-h - eta_h) * d1
            else:
                x = x + alpha_next * (torch.expm1(-h - eta_h) / (h + eta_h) + 1) * d1
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (see :func:`_dpmpp_2m_sde`)."""
    noise = _noise_or_default(x, noise_sampler, generator)
    return _dpmpp_2m_sde(model, x, sigmas, callback, eta, noise, noise_form, "midpoint")


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE with Heun's second-order term (see :func:`_dpmpp_2m_sde`; diffusers'
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"))."""
    noise = _noise_or_default(x, noise_sampler, generator)
    return _dpmpp_2m_sde(model, x, sigmas, callback, eta, noise, noise_form, "heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: 3rd-order multistep exponential integrator (eta=0 is the ODE solver 3M)."""
    noise = _noise_or_default(x, noise_sampler, generator)
    sigmas = noise_form.finite_half_log_snr(sigmas)
    denoised_1: Optional[torch.Tensor] = None
    denoised_2: Optional[torch.Tensor] = None
    h_1: Optional[torch.Tensor] = None
    h_2: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = noise_form.half_log_snr(sigmas[i + 1]) - noise_form.half_log_snr(sigmas[i])
        h_eta = h * (eta + 1)
        alpha_next = noise_form.alpha(sigmas[i + 1])
        x = (sigmas[i + 1] / sigmas[i]) * (-eta * h).exp() * x - alpha_next * torch.expm1(-h_eta) * denoised
        # phi_2, phi_3 of the exponential integrator, written so that they stay finite as h -> 0
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if denoised_2 is not None and denoised_1 is not None and h_1 is not None and h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + alpha_next * (phi_2 * d1 - phi_3 * d2)
        elif denoised_1 is not None and h_1 is not None:
            x = x + alpha_next * phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta * h)).sqrt()
        denoised_2, denoised_1 = denoised_1, denoised
        h_2, h_1 = h_1, h
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """Deterministic DDIM (eta=0): keep the predicted noise, re-noise the prediction to sigma_next.

    x_next = alpha_next * denoised + sigma_next * eps with eps = (x - alpha * denoised) / sigma; in
    both forms that is denoised + (sigma_next / sigma) * (x - denoised), the Euler step.
    """
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        x = denoised + (sigmas[i + 1] / sigmas[i]) * (x - denoised)
    return x


@torch.no_grad()
def sample_ddpm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """Ancestral DDPM steps (Ho et al. 2020): sample the posterior q(x_next | x, x0 = denoised).

    With x = a * x0 + s * eps at sigma and the Markov chain x = (a / a_n) * x_n + noise of variance
    s_tn^2 = s^2 - (a / a_n)^2 * s_n^2, the posterior has mean ((a / a_n) s_n^2 x + a_n s_tn^2 x0) / s^2
    and variance s_tn^2 s_n^2 / s^2 (a = alpha, s = sigma; subscript n: at sigma_next).
    """
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        alpha, alpha_next = noise_form.alpha(sigma), noise_form.alpha(sigma_next)
        ratio = alpha / alpha_next
        var_step = sigma**2 - ratio**2 * sigma_next**2
        x = (ratio * sigma_next**2 * x + alpha_next * var_step * denoised) / sigma**2
        if sigma_next > 0:
            x = x + (var_step * sigma_next**2 / sigma**2).sqrt() * noise(sigma, sigma_next)
    return x


@torch.no_grad()
def sample_lcm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """Latent-consistency sampling: jump to the prediction, re-noise it to sigma_next with fresh noise."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = noise_form.noisy(denoised, noise(sigmas[i], sigmas[i + 1]), sigmas[i + 1])
    return x


UniPCVariant = Literal["bh1", "bh2"]


def _unipc_b(h: torch.Tensor, variant: UniPCVariant) -> torch.Tensor:
    """UniPC's B(h) for a step of h in lambda (data prediction): -h (bh1) or expm1(-h) (bh2)."""
    return -h if variant == "bh1" else torch.expm1(-h)


def _unipc_weights(rks: list[torch.Tensor], h: torch.Tensor, order: int, variant: UniPCVariant
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's linear system R w = b for `order` points (b scaled by 1 / B(h) of the variant); returns (R, b)."""
    hh = -h
    b_h = _unipc_b(h, variant)
    r = torch.stack([torch.as_tensor(v, dtype=h.dtype) for v in rks])
    h_phi_k = torch.expm1(hh) / hh - 1
    factorial = 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(rhs)


def _uni_pc(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback], order: int,
            noise_form: NoiseForm, variant: UniPCVariant) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) in data prediction: a multistep predictor plus a corrector that reuses
    each new model evaluation; lower order at the start and the last steps, no corrector after the last."""
    sigmas = noise_form.finite_half_log_snr(sigmas)
    lams = noise_form.half_log_snr(sigmas[:-1].to(torch.float64))
    history: list[torch.Tensor] = []  # denoised at sigmas[0..i]
    x_last: Optional[torch.Tensor] = None
    last_order = 1
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if x_last is not None:
            x = _unipc_update(x_last, history, sigmas, lams, i - 1, last_order, denoised, noise_form, variant)
        history.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        last_order = min(order, i + 1, n - i)
        x_last = x
        x = _unipc_update(x, history, sigmas, lams, i, last_order, None, noise_form, variant)
    return x


@torch.no_grad()
def sample_uni_pc(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None, order: int = 3,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """UniPC with B(h) = h, "bh1" (ComfyUI's `uni_pc`; diffusers' UniPCMultistepScheduler(solver_type="bh1")).

    Order 3, lowered where the history is short or the end is near, as ComfyUI runs it. A schedule
    ending at 0 ends on the last prediction (diffusers' final_sigmas_type "zero"); ComfyUI steps to
    sigma 0.001 instead, which leaves 0.001 of the noise in its result.
    """
    return _uni_pc(model, x, sigmas, callback, order, noise_form, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None, order: int = 3,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """UniPC with B(h) = e^h - 1, "bh2" (ComfyUI's `uni_pc_bh2`; UniPCMultistepScheduler(solver_type="bh2")),
    otherwise as :func:`sample_uni_pc`."""
    return _uni_pc(model, x, sigmas, callback, order, noise_form, "bh2")


def _unipc_update(
    x: torch.Tensor,
    history: list[torch.Tensor],
    sigmas: torch.Tensor,
    lams: torch.Tensor,
    i: int,
    order: int,
    corrector_output: Optional[torch.Tensor],
    noise_form: NoiseForm,
    variant: UniPCVariant,
) -> torch.Tensor:
    """One UniPC predictor (corrector_output None) or corrector step from sigmas[i] to sigmas[i+1]."""
    m0 = history[i]
    h = noise_form.half_log_snr(sigmas[i + 1].to(torch.float64)) - lams[i]
    rks: list[torch.Tensor] = []
    d1s: list[torch.Tensor] = []
    for k in range(1, order):
        rk = (lams[i - k] - lams[i]) / h
        rks.append(rk)
        d1s.append((history[i - k] - m0) / rk.to(x.dtype))
    rks.append(torch.ones((), dtype=torch.float64))
    big_r, b = _unipc_weights(rks, h, order, variant)
    alpha_next = noise_form.alpha(sigmas[i + 1])
    x_t = (sigmas[i + 1] / sigmas[i]) * x - alpha_next * torch.expm1(-h).to(x.dtype) * m0
    b_h = alpha_next * _unipc_b(h, variant).to(x.dtype)
    if corrector_output is None:
        if not d1s:
            return x_t
        rhos = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
        return x_t - b_h * sum(rho.to(x.dtype) * d for rho, d in zip(rhos, d1s))
    rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(big_r, b)
    correction = sum((rho.to(x.dtype) * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_t - b_h * (correction + rhos[-1].to(x.dtype) * (corrector_output - m0))


# ------------------------------------------------------------------------- the rest of ComfyUI's list
#
# Each of these is ComfyUI's sampler of the same name (KSampler.SAMPLERS), written from its formula.
# In flow form they follow one rule. Where ComfyUI's formula is deterministic, uses the guided
# denoised estimate alone and is written in sigma (and -log sigma) only, it integrates the ODE
# dx/dsigma = (x - denoised) / sigma, which both forms share, so it is used as it is. Where it adds
# noise or uses the unconditional prediction, it is the VE formula on the VE process x / alpha with
# sigma / alpha (:func:`_run_in_ve_form`); that is ComfyUI's own flow formula wherever ComfyUI writes
# the sampler with the model's alpha and half-log-SNR (euler_ancestral_cfg_pp, seeds, er_sde,
# sa_solver), and a consistent flow form where ComfyUI applies its VE formula to flow models unchanged
# (res_multistep_ancestral, the other *_cfg_pp).

# A model for the CFG++ samplers (Chung et al. 2024, "CFG++"): x (B, ...), sigma (B,) -> (guided
# denoised, unconditional denoised), each (B, ...). They step to the guided estimate but re-noise
# with the noise the unconditional prediction implies (ComfyUI reads it with a post-CFG hook).
GuidedDenoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _run_in_ve_form(ve_sampler: Callable[..., torch.Tensor], model: Callable[..., object], x: torch.Tensor,
                    sigmas: torch.Tensor, callback: Optional[StepCallback], noise_form: NoiseForm,
                    **options: object) -> torch.Tensor:
    """Run a sampler written for the VE form on a model of any noise form.

    x = alpha * x0 + sigma * noise divided by alpha is x0 + (sigma / alpha) * noise: the VE process
    with the same half-log-SNR and the same denoised estimates. The sampler steps x / alpha along
    sigma / alpha (a flow schedule starting at sigma 1 starts just below it), the model and the
    callback see the model's own x and sigma, and the result is scaled back by alpha at the end.
    """
    if noise_form is NoiseForm.VE:
        return ve_sampler(model, x, sigmas, callback=callback, **options)
    sigmas = noise_form.finite_half_log_snr(sigmas)
    alphas = noise_form.alpha(sigmas).to(x.dtype)

    def ve_model(x_ve: torch.Tensor, ve_sigma: torch.Tensor) -> object:
        sigma = noise_form.from_ve_sigma(ve_sigma)
        return model(x_ve * _per_row(noise_form.alpha(sigma), x_ve), sigma)

    def ve_callback(i: int, x_ve: torch.Tensor, denoised: torch.Tensor) -> None:
        if callback is not None:
            callback(i, x_ve * alphas[i], denoised)

    out = ve_sampler(ve_model, x / alphas[0], noise_form.ve_sigma(sigmas), callback=ve_callback, **options)
    return out * alphas[-1]


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ...) broadcastable against like (B, ...)."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _any_noise_form(ve_sampler: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A sampler written for the VE form, made to take `noise_form` through :func:`_run_in_ve_form`."""

    @functools.wraps(ve_sampler)
    def sampler(model: Callable[..., object], x: torch.Tensor, sigmas: torch.Tensor,
                callback: Optional[StepCallback] = None, *, noise_form: NoiseForm = NoiseForm.VE,
                **options: object) -> torch.Tensor:
        with torch.no_grad():
            return _run_in_ve_form(ve_sampler, model, x, sigmas, callback, noise_form, **options)

    signature = inspect.signature(ve_sampler)
    form = inspect.Parameter("noise_form", inspect.Parameter.KEYWORD_ONLY, default=NoiseForm.VE, annotation=NoiseForm)
    parameters = [*signature.parameters.values(), form]
    sampler.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return sampler


# --- _gpu: ComfyUI's names for the same SDE samplers with their noise drawn on the GPU


@torch.no_grad()
def sample_dpmpp_sde_gpu(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """ComfyUI's `dpmpp_sde_gpu`: :func:`sample_dpmpp_sde` itself.

    ComfyUI's `_gpu` samplers differ from their namesakes only in where their noise is drawn (the
    Brownian tree on the GPU instead of the CPU), which makes ComfyUI's result depend on the GPU.
    Here every sampler's noise is drawn on the CPU from the seed (`run.sample`), so that a seed
    gives the same image on any device; on that noise the two names are the same computation.
    """
    return sample_dpmpp_sde(model, x, sigmas, callback, eta, noise_sampler, generator, noise_form)


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """ComfyUI's `dpmpp_2m_sde_gpu`: :func:`sample_dpmpp_2m_sde` itself; the names differ only in
    where ComfyUI draws the noise, on the GPU instead of the CPU; here it is always drawn on the CPU
    (see :func:`sample_dpmpp_sde_gpu`)."""
    return sample_dpmpp_2m_sde(model, x, sigmas, callback, eta, noise_sampler, generator, noise_form)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """ComfyUI's `dpmpp_2m_sde_heun_gpu`: :func:`sample_dpmpp_2m_sde_heun` itself; the names differ
    only in where ComfyUI draws the noise, on the GPU instead of the CPU; here it is always drawn on the
    CPU (see :func:`sample_dpmpp_sde_gpu`)."""
    return sample_dpmpp_2m_sde_heun(model, x, sigmas, callback, eta, noise_sampler, generator, noise_form)


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """ComfyUI's `dpmpp_3m_sde_gpu`: :func:`sample_dpmpp_3m_sde` itself; the names differ only in
    where ComfyUI draws the noise, on the GPU instead of the CPU; here it is always drawn on the CPU
    (see :func:`sample_dpmpp_sde_gpu`)."""
    return sample_dpmpp_3m_sde(model, x, sigmas, callback, eta, noise_sampler, generator, noise_form)


# --- CFG++: step to the guided estimate, re-noise with the unconditional prediction's noise


def _cfg_pp_euler_steps(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                        callback: Optional[StepCallback], eta: float, noise: Optional[NoiseSampler]) -> torch.Tensor:
    """x_next = D + sigma_down * (x - U) / sigma + sigma_up * z (VE; D guided, U unconditional, the
    ancestral split of sigma -> sigma_next by eta; eta = 0 is CFG++'s DDIM step)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * (x - uncond) / sigma
        if eta > 0 and noise is not None:
            x = x + sigma_up * noise(sigma, sigma_next)
    return x


@_any_noise_form
def sample_euler_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                        callback: Optional[StepCallback] = None) -> torch.Tensor:
    """CFG++ Euler: x_next = D + sigma_next * (x - U) / sigma (VE form; D guided, U unconditional).
    x: (B, ...), sigmas: (n+1,)."""
    return _cfg_pp_euler_steps(model, x, sigmas, callback, 0.0, None)


@_any_noise_form
def sample_euler_ancestral_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                  callback: Optional[StepCallback] = None, eta: float = 1.0,
                                  noise_sampler: Optional[NoiseSampler] = None,
                                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CFG++ Euler ancestral: x_next = D + sigma_down * (x - U) / sigma + sigma_up * z with
    k-diffusion's ancestral split (VE form)."""
    return _cfg_pp_euler_steps(model, x, sigmas, callback, eta, _noise_or_default(x, noise_sampler, generator))


@_any_noise_form
def sample_dpmpp_2s_ancestral_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                     callback: Optional[StepCallback] = None, eta: float = 1.0,
                                     noise_sampler: Optional[NoiseSampler] = None,
                                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CFG++ DPM-Solver++(2S) ancestral (VE form): the 2S step to sigma_down from x + D - U, i.e.

    x_mid = (s_mid / sigma) * (x + D - U) - expm1(-h / 2) * D at s_mid = sqrt(sigma * sigma_down),
    x = (sigma_down / sigma) * (x + D - U_mid) - expm1(-h) * D_mid, h = log(sigma / sigma_down),

    then sigma_up * z. As in ComfyUI the second line takes the unconditional prediction of the
    midpoint evaluation (U_mid) with the first evaluation's D.
    """
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = (sigma / sigma_down).log()
            sigma_mid = _geometric_mean(sigma, sigma_down)
            x_mid = (sigma_mid / sigma) * (x + denoised - uncond) - torch.expm1(-0.5 * h) * denoised
            denoised_mid, uncond_mid = model(x_mid, _batch_sigma(x, sigma_mid))
            x = (sigma_down / sigma) * (x + denoised - uncond_mid) - torch.expm1(-h) * denoised_mid
        if sigma_next > 0:
            x = x + sigma_up * noise(sigma, sigma_next)
    return x


@_any_noise_form
def sample_dpmpp_2m_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           callback: Optional[StepCallback] = None) -> torch.Tensor:
    """CFG++ DPM-Solver++(2M) (VE form): x_next = D + (sigma_next / sigma) * (x - U)
    - expm1(-h) / (2 r) * (D - U_prev), h = log(sigma / sigma_next), r = h_prev / h; the last
    term is left out on the first step and the last lands on D."""
    old_uncond: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = (sigma / sigma_next).log()
            step = denoised + (sigma_next / sigma) * (x - uncond)
            if old_uncond is not None:
                r = (sigmas[i - 1] / sigma).log() / h
                step = step - torch.expm1(-h) / (2 * r) * (denoised - old_uncond)
            x = step
        old_uncond = uncond
    return x


def _res_multistep(model: Callable[..., object], x: torch.Tensor, sigmas: torch.Tensor,
                   callback: Optional[StepCallback], eta: float, noise: Optional[NoiseSampler],
                   cfg_pp: bool) -> torch.Tensor:
    """RES second-order multistep (Zhang et al. 2023, arXiv 2308.02157) in -log sigma, to sigma_down
    of the ancestral split, then sigma_up * z (VE form).

    With h = log(sigma / sigma_down) and c2 = (log sigma_down_prev - log sigma_prev) / h:
    x = e^-h x + h (b1 D + b2 D_prev), b1 = phi1(-h) - phi2(-h) / c2, b2 = phi2(-h) / c2,
    phi1(z) = (e^z - 1) / z, phi2(z) = (phi1(z) - 1) / z. The first step (and one to sigma_down 0) is
    Euler. CFG++ (cfg_pp): x + D - U replaces x, U the D of the sum and U_prev D_prev, and the
    first-order step is D + sigma_down * (x - U) / sigma.
    """
    old_denoised: Optional[torch.Tensor] = None
    old_sigma_down: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = model(x, _batch_sigma(x, sigma))
        denoised, uncond = out if cfg_pp else (out, out)  # type: ignore[misc]
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0 or old_denoised is None or old_sigma_down is None:
            if cfg_pp:
                x = denoised + sigma_down * (x - uncond) / sigma
            else:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = (sigma / sigma_down).log()
            c2 = (old_sigma_down / sigmas[i - 1]).log() / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = (-h).exp() * (x + denoised - uncond) + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigma_next > 0 and sigma_up > 0 and noise is not None:
            x = x + sigma_up * noise(sigma, sigma_next)
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                         callback: Optional[StepCallback] = None, noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """RES second-order multistep, deterministic (see :func:`_res_multistep`); written in sigma alone,
    so the same in both noise forms."""
    return _res_multistep(model, x, sigmas, callback, 0.0, None, cfg_pp=False)


@_any_noise_form
def sample_res_multistep_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                callback: Optional[StepCallback] = None) -> torch.Tensor:
    """CFG++ RES multistep, deterministic (see :func:`_res_multistep`)."""
    return _res_multistep(model, x, sigmas, callback, 0.0, None, cfg_pp=True)


@_any_noise_form
def sample_res_multistep_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                   callback: Optional[StepCallback] = None, eta: float = 1.0,
                                   noise_sampler: Optional[NoiseSampler] = None,
                                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RES multistep to sigma_down, then fresh noise to sigma_next (see :func:`_res_multistep`)."""
    return _res_multistep(model, x, sigmas, callback, eta, _noise_or_default(x, noise_sampler, generator), cfg_pp=False)


@_any_noise_form
def sample_res_multistep_ancestral_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                          callback: Optional[StepCallback] = None, eta: float = 1.0,
                                          noise_sampler: Optional[NoiseSampler] = None,
                                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CFG++ RES multistep ancestral (see :func:`_res_multistep`)."""
    return _res_multistep(model, x, sigmas, callback, eta, _noise_or_default(x, noise_sampler, generator), cfg_pp=True)


def _gradient_estimation(model: Callable[..., object], x: torch.Tensor, sigmas: torch.Tensor,
                         callback: Optional[StepCallback], gamma: float, cfg_pp: bool) -> torch.Tensor:
    """Gradient estimation (Permenter & Yuan 2024): Euler with d = (x - D) / sigma, plus
    (gamma - 1) * (d - d_prev) * (sigma_next - sigma) from the second step on; the last step lands
    on D. CFG++ (cfg_pp, VE form): d = (x - U) / sigma and the Euler part is D + sigma_next * d."""
    old_d: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = model(x, _batch_sigma(x, sigma))
        denoised, uncond = out if cfg_pp else (out, out)  # type: ignore[misc]
        d = to_d(x, sigma, uncond if cfg_pp else denoised)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * (sigma_next - sigma)
            if old_d is not None:
                x = x + (gamma - 1) * (d - old_d) * (sigma_next - sigma)
        old_d = d
    return x


@torch.no_grad()
def sample_gradient_estimation(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                               callback: Optional[StepCallback] = None, gamma: float = 2.0,
                               noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """Gradient-estimation sampler (see :func:`_gradient_estimation`); an ODE solver in sigma, the
    same in both noise forms."""
    return _gradient_estimation(model, x, sigmas, callback, gamma, cfg_pp=False)


@_any_noise_form
def sample_gradient_estimation_cfg_pp(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                      callback: Optional[StepCallback] = None, gamma: float = 2.0) -> torch.Tensor:
    """CFG++ gradient estimation (see :func:`_gradient_estimation`)."""
    return _gradient_estimation(model, x, sigmas, callback, gamma, cfg_pp=True)


# --- multistep and Runge-Kutta-like solvers of the sigma ODE (the same in both noise forms)


@torch.no_grad()
def sample_heunpp2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                   noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """Heun++ (from sd-webui-samplers-scheduler): Euler steps whose derivative is a weighted mean of
    the derivative here and at the next one or two sigmas, reached by Euler steps.

    Two sigmas ahead: weights sigma_next / (3 sigma_0) and sigma_after / (3 sigma_0) on the derivatives
    there, the rest on d; one sigma ahead (the step before the last): sigma_next / (2 sigma_0); the last
    step is Euler. sigma_0 is the schedule's first sigma.
    """
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, _batch_sigma(x, sigma_next)))
        if sigmas[i + 2] == s_end:
            w_2 = sigma_next / (2 * sigmas[0])
            x = x + ((1 - w_2) * d + w_2 * d_2) * dt
            continue
        sigma_after = sigmas[i + 2]
        x_3 = x_2 + d_2 * (sigma_after - sigma_next)
        d_3 = to_d(x_3, sigma_after, model(x_3, _batch_sigma(x, sigma_after)))
        w_2, w_3 = sigma_next / (3 * sigmas[0]), sigma_after / (3 * sigmas[0])
        x = x + ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3) * dt
    return x


# Adams-Bashforth weights of the current and the previous 1-3 derivatives for equal steps.
_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_ipndm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                 max_order: int = 4, noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth in sigma with the fixed (equal-step) weights
    of order min(max_order, step + 1) on d = (x - D) / sigma; the last step to 0 lands on D."""
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        weights = _ADAMS_BASHFORTH[min(max_order, i + 1) - 1]
        if sigma_next == 0:
            x = denoised
        else:
            x = x + (sigma_next - sigma) * sum(w * d_k for w, d_k in zip(weights, [d, *reversed(ds)]))
        ds = (ds + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def ipndm_v_weights(sigmas: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
    """iPNDM-v's weights on d at sigmas[i], i-1, ... (order of them) for the step to sigmas[i+1]
    (Zhou et al. 2024, diff-solvers' variable-step iPNDM, as ComfyUI has it, kept for ComfyUI's images:
    order 2 is the variable-step Adams-Bashforth rule, order 3 is not but reduces to AB3 on equal
    steps, and order 4's weights are neither AB4 on equal steps nor sum to 1 where the step ratios
    change). h0 is this step, h1..h3 the previous ones."""
    h0 = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return [torch.ones_like(h0)]
    h1 = sigmas[i] - sigmas[i - 1]
    c1, c2 = 1 + h0 / (2 * h1), -h0 / (2 * h1)
    if order == 2:
        return [c1, c2]
    h2 = sigmas[i - 1] - sigmas[i - 2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    c1, c2, c3 = c1 + t1, c2 - (1 + h1 / h2) * t1, t1 * h1 / h2
    if order == 3:
        return [c1, c2, c3]
    h3 = sigmas[i - 2] - sigmas[i - 3]
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return [c1 + t2, c2 - (1 + h1 / h2 + ratio) * t2, c3 + (h1 / h2 + ratio * (1 + h2 / h3)) * t2,
            -t2 * ratio * h1 / h2]


@torch.no_grad()
def sample_ipndm_v(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                   max_order: int = 4, noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """iPNDM with variable-step weights (:func:`ipndm_v_weights`) on d = (x - D) / sigma; the last step
    to 0 lands on D."""
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            weights = ipndm_v_weights(sigmas, i, min(max_order, i + 1))
            x = x + (sigma_next - sigma) * sum(w * d_k for w, d_k in zip(weights, [d, *reversed(ds)]))
        ds = (ds + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


# The VP-SDE time t of the "tab" DEIS variant: beta linear in t, fitted so that sigma(1e-3) = 0.002
# and sigma(1) = 80 (EDM's range), with sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1.
_DEIS_T_MIN, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX = 1e-3, 0.002, 80.0


def _deis_vp_coefficients() -> tuple[float, float]:
    """(beta_min, beta_d) of the DEIS time variable."""
    log_min, log_max = math.log1p(_DEIS_SIGMA_MIN**2), math.log1p(_DEIS_SIGMA_MAX**2)
    beta_d = 2 * (log_min / _DEIS_T_MIN - log_max) / (_DEIS_T_MIN - 1)
    return log_max - beta_d / 2, beta_d


def deis_time(sigma: torch.Tensor) -> torch.Tensor:
    """The DEIS time t of sigma (any shape): the inverse of sigma(t) above."""
    beta_min, beta_d = _deis_vp_coefficients()
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def deis_weights(sigmas: torch.Tensor, i: int, order: int, points: int = 24) -> list[float]:
    """DEIS (Zhang & Chen 2023, "tAB"): the step sigmas[i] -> sigmas[i+1] integrates d over sigma with d
    interpolated by a polynomial in the DEIS time t through the last `order` sigmas. Returns the
    weights of d at sigmas[i], i-1, ...: the integrals of their Lagrange basis polynomials in t
    against dsigma, by Gauss-Legendre quadrature in t."""
    sig = sigmas.detach().cpu().to(torch.float64)
    ts = deis_time(sig[[i - k for k in range(order)]])
    t_a, t_b = deis_time(sig[i]), deis_time(sig[i + 1])
    beta_min, beta_d = _deis_vp_coefficients()
    nodes, quad = np.polynomial.legendre.leggauss(points)
    tau = 0.5 * (t_b - t_a) * torch.from_numpy(nodes) + 0.5 * (t_a + t_b)
    # dsigma/dt of sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1
    exponent = beta_d * tau**2 / 2 + beta_min * tau
    dsigma_dt = (beta_d * tau + beta_min) * exponent.exp() / (2 * torch.expm1(exponent).sqrt())
    weights = []
    for j in range(order):
        basis = torch.ones_like(tau)
        for k in range(order):
            if k != j:
                basis = basis * (tau - ts[k]) / (ts[j] - ts[k])
        weights.append(float(0.5 * (t_b - t_a) * (torch.from_numpy(quad) * dsigma_dt * basis).sum()))
    return weights


@torch.no_grad()
def sample_deis(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                max_order: int = 3, noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """DEIS multistep of order min(max_order, step + 1) with :func:`deis_weights` on d = (x - D) / sigma;
    the first step and the last one (to 0) are Euler."""
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        order = 1 if sigma_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x = x + d * (sigma_next - sigma)
        else:
            weights = deis_weights(sigmas, i, order)
            x = x + sum(w * d_k for w, d_k in zip(weights, [d, *reversed(ds)]))
        ds = (ds + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


# --- DPM-Solver (Lu et al. 2022) in noise prediction over t = -log sigma: fixed and adaptive steps


class _DPMSolver:
    """DPM-Solver-1/2/3 steps on eps = (x - D) / sigma in t = -log sigma; counts model calls."""

    def __init__(self, model: Denoiser) -> None:
        self.model = model

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return (-t).exp()

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t)
        return (x - self.model(x, _batch_sigma(x, sigma))) / sigma

    def step_1(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return x - self.sigma(t_next) * torch.expm1(t_next - t) * eps

    def step_2(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps: torch.Tensor,
               eps_1: Optional[torch.Tensor] = None, r1: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x_next, eps at the intermediate point, reusable by a 3rd-order step with the same r1)."""
        h = t_next - t
        if eps_1 is None:
            s1 = t + r1 * h
            eps_1 = self.eps(x - self.sigma(s1) * torch.expm1(r1 * h) * eps, s1)
        x_next = (x - self.sigma(t_next) * torch.expm1(h) * eps
                  - self.sigma(t_next) / (2 * r1) * torch.expm1(h) * (eps_1 - eps))
        return x_next, eps_1

    def step_3(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, eps: torch.Tensor,
               eps_1: Optional[torch.Tensor] = None, r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        if eps_1 is None:
            eps_1 = self.eps(x - self.sigma(s1) * torch.expm1(r1 * h) * eps, s1)
        u2 = (x - self.sigma(s2) * torch.expm1(r2 * h) * eps
              - self.sigma(s2) * (r2 / r1) * (torch.expm1(r2 * h) / (r2 * h) - 1) * (eps_1 - eps))
        eps_2 = self.eps(u2, s2)
        return (x - self.sigma(t_next) * torch.expm1(h) * eps
                - self.sigma(t_next) / r2 * (torch.expm1(h) / h - 1) * (eps_2 - eps))


def _fixed_dpm_solver_orders(evaluations: int) -> list[int]:
    """The orders of DPM-Solver-fast's steps for a budget of model evaluations (3rd order, the rest at the end)."""
    steps = evaluations // 3 + 1
    if evaluations % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [evaluations % 3]


def _last_nonzero_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]


@torch.no_grad()
def sample_dpm_fast(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                    noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """DPM-Solver-fast: as many model evaluations as the schedule has steps, spent on steps of order 3
    (then 2 and 1) uniform in t = -log sigma from sigmas[0] to the last nonzero sigma. Only the ends
    of the schedule count, and the result keeps that last sigma's noise (as in ComfyUI). An ODE
    solver in sigma, the same in both noise forms."""
    if len(sigmas) < 2:
        return x
    solver = _DPMSolver(model)
    orders = _fixed_dpm_solver_orders(len(sigmas) - 1)
    ts = torch.linspace(float(-sigmas[0].log()), float(-_last_nonzero_sigma(sigmas).log()), len(orders) + 1,
                        dtype=sigmas.dtype, device=sigmas.device)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        eps = solver.eps(x, t)
        if callback is not None:
            callback(i, x, x - solver.sigma(t) * eps)
        if order == 1:
            x = solver.step_1(x, t, t_next, eps)
        elif order == 2:
            x = solver.step_2(x, t, t_next, eps)[0]
        else:
            x = solver.step_3(x, t, t_next, eps)
    return x


class _StepSizeController:
    """PID step-size control (here the integral part only, as DPM-Solver-adaptive's defaults have it)."""

    def __init__(self, h: float, order: float, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 accept_safety: float = 0.81) -> None:
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety = accept_safety
        self.inverse_errors: list[float] = []

    def propose(self, error: float) -> bool:
        """Scale h by the controller's factor; True if the step that made `error` is accepted."""
        inverse = 1 / (error + 1e-8)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        factor = math.prod(e**b for e, b in zip(self.inverse_errors, self.b))
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[2], self.inverse_errors[1] = self.inverse_errors[1], self.inverse_errors[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                        callback: Optional[StepCallback] = None, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, noise_form: NoiseForm = NoiseForm.VE
                        ) -> torch.Tensor:
    """DPM-Solver-12/23 with adaptive steps in t = -log sigma from sigmas[0] to the last nonzero sigma
    (only the ends of the schedule count; the result keeps that sigma's noise, as in ComfyUI).

    Each attempt takes an order-(order-1) and an order-`order` step sharing their evaluations; their
    RMS difference relative to atol + rtol * |x| steers the step size. An ODE solver in sigma, the
    same in both noise forms.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive's order must be 2 or 3, got {order}")
    if len(sigmas) < 2:
        return x
    solver = _DPMSolver(model)
    t_end = -_last_nonzero_sigma(sigmas).log()
    s = -sigmas[0].log()
    x_prev = x
    control = _StepSizeController(h_init, order)
    attempt = 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + control.h)
        eps = solver.eps(x, s)
        if callback is not None:
            callback(attempt, x, x - solver.sigma(s) * eps)
        if order == 2:
            x_low = solver.step_1(x, s, t, eps)
            x_high = solver.step_2(x, s, t, eps)[0]
        else:
            x_low, eps_1 = solver.step_2(x, s, t, eps, r1=1 / 3)
            x_high = solver.step_3(x, s, t, eps, eps_1)
        tolerance = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / tolerance) / x.numel() ** 0.5)
        if control.propose(error):
            x_prev, x, s = x_low, x_high, t
        attempt += 1
    return x


# --- exponential integrators in the half-log-SNR with noise (VE form; ComfyUI writes them with the
# model's alpha and lambda, which is what _any_noise_form makes of them)


def _phi_2(z: torch.Tensor) -> torch.Tensor:
    """(e^z - 1 - z) / z, h * phi_2(h) of exponential integrators at z = h."""
    return (torch.expm1(z) - z) / z


@torch.no_grad()
def _seeds_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback], eta: float,
             noise: Optional[NoiseSampler], r: float, solver_type: Literal["phi_1", "phi_2"]) -> torch.Tensor:
    """SEEDS-2 (Gonzalez et al. 2023), VE form: with lambda = -log sigma, h the step, h' = (1 + eta) h,
    an exponential-integrator stage to lambda + r h (noise of sigma_1 * sqrt(1 - e^(-2 r h eta))),
    then the whole step with D and D_1 combined by phi_1 (D + (D_1 - D) / (2 r)) or phi_2
    (b2 = h' phi_2(-h') / r on D_1), and the stage's noise carried on plus fresh noise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = (sigma / sigma_next).log()
        h_eta = h * (eta + 1)
        sigma_1 = sigma * (-r * h).exp()
        x_1 = (sigma_1 / sigma) * (-r * h * eta).exp() * x - torch.expm1(-r * h_eta) * denoised
        stage_noise = None
        if noise is not None and eta > 0:
            stage_noise = (-torch.expm1(-2 * r * h * eta)).sqrt() * noise(sigma, sigma_1)
            x_1 = x_1 + sigma_1 * stage_noise
        denoised_1 = model(x_1, _batch_sigma(x, sigma_1))
        decay = (sigma_next / sigma) * (-h * eta).exp()
        if solver_type == "phi_1":
            x = decay * x - torch.expm1(-h_eta) * torch.lerp(denoised, denoised_1, 1 / (2 * r))
        else:
            b2 = _phi_2(-h_eta) / r
            x = decay * x - ((torch.expm1(-h_eta) - b2) * denoised + b2 * denoised_1)
        if stage_noise is not None and noise is not None:
            carry = (r - 1) * h * eta
            stage_noise = stage_noise * carry.exp() + (-torch.expm1(2 * carry)).sqrt() * noise(sigma_1, sigma_next)
            x = x + sigma_next * stage_noise
    return x


@_any_noise_form
def sample_seeds_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                   eta: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SEEDS-2, stage at r = 1/2, phi_1 combination (see :func:`_seeds_2`)."""
    return _seeds_2(model, x, sigmas, callback, eta, _noise_or_default(x, noise_sampler, generator), 0.5, "phi_1")


@_any_noise_form
def sample_exp_heun_2_x0(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                         callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Exponential Heun in data prediction and half-log-SNR: :func:`_seeds_2` with eta 0, the stage at
    the step's end (r = 1) and the phi_2 combination."""
    return _seeds_2(model, x, sigmas, callback, 0.0, None, 1.0, "phi_2")


@_any_noise_form
def sample_exp_heun_2_x0_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                             callback: Optional[StepCallback] = None, eta: float = 1.0,
                             noise_sampler: Optional[NoiseSampler] = None,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Stochastic exponential Heun: :func:`_seeds_2` with r = 1 and the phi_2 combination."""
    return _seeds_2(model, x, sigmas, callback, eta, _noise_or_default(x, noise_sampler, generator), 1.0, "phi_2")


@_any_noise_form
def sample_seeds_3(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                   eta: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                   generator: Optional[torch.Generator] = None, r_1: float = 1 / 3, r_2: float = 2 / 3) -> torch.Tensor:
    """SEEDS-3 (VE form): stages at lambda + r_1 h and lambda + r_2 h (the second combining D and D_1
    with a = (r_2 / r_1) h' phi_2(-r_2 h') on D_1), the step combining D and D_2 with h' phi_2(-h') / r_2
    on D_2; each stage's noise carries on, decayed, with fresh noise for the rest of the interval."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = (sigma / sigma_next).log()
        h_eta = h * (eta + 1)
        sigma_1, sigma_2 = sigma * (-r_1 * h).exp(), sigma * (-r_2 * h).exp()
        stochastic = eta > 0
        x_1 = (sigma_1 / sigma) * (-r_1 * h * eta).exp() * x - torch.expm1(-r_1 * h_eta) * denoised
        if stochastic:
            stage_noise = (-torch.expm1(-2 * r_1 * h * eta)).sqrt() * noise(sigma, sigma_1)
            x_1 = x_1 + sigma_1 * stage_noise
        denoised_1 = model(x_1, _batch_sigma(x, sigma_1))
        a_1 = (r_2 / r_1) * _phi_2(-r_2 * h_eta)
        x_2 = ((sigma_2 / sigma) * (-r_2 * h * eta).exp() * x
               - ((torch.expm1(-r_2 * h_eta) - a_1) * denoised + a_1 * denoised_1))
        if stochastic:
            carry = (r_1 - r_2) * h * eta
            stage_noise = stage_noise * carry.exp() + (-torch.expm1(2 * carry)).sqrt() * noise(sigma_1, sigma_2)
            x_2 = x_2 + sigma_2 * stage_noise
        denoised_2 = model(x_2, _batch_sigma(x, sigma_2))
        b_2 = _phi_2(-h_eta) / r_2
        x = (sigma_next / sigma) * (-h * eta).exp() * x - ((torch.expm1(-h_eta) - b_2) * denoised + b_2 * denoised_2)
        if stochastic:
            carry = (r_2 - 1) * h * eta
            stage_noise = stage_noise * carry.exp() + (-torch.expm1(2 * carry)).sqrt() * noise(sigma_2, sigma_next)
            x = x + sigma_next * stage_noise
    return x


def _er_sde_noise_scaler(s: torch.Tensor) -> torch.Tensor:
    """ER-SDE's default noise-scale function of the VE sigma: s * (e^(s^0.3) + 10)."""
    return s * ((s**0.3).exp() + 10.0)


# ER-SDE integrates its stage weights with a left Riemann sum of this many points (as ComfyUI does).
_ER_SDE_POINTS = 200


@_any_noise_form
def sample_er_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                  noise_sampler: Optional[NoiseSampler] = None, generator: Optional[torch.Generator] = None,
                  max_stage: int = 3) -> torch.Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023), VE form, with f(s) = :func:`_er_sde_noise_scaler`:

    x = r x + (1 - r) D with r = f(s_next) / f(s); stage 2 adds (ds + f(s_next) * S1) * D' with
    D' = (D - D_prev) / (s - s_prev), stage 3 (ds^2 / 2 + f(s_next) * S2) * D'' with
    D'' = (D' - D'_prev) / ((s - s_prev2) / 2); S1, S2 the integrals over [s_next, s] of 1 / f and
    (u - s) / f (left Riemann sums of 200 points); then noise of std sqrt(s_next^2 - s^2 r^2).
    """
    noise = _noise_or_default(x, noise_sampler, generator)
    grid = torch.arange(_ER_SDE_POINTS, dtype=sigmas.dtype, device=sigmas.device)
    old_denoised: Optional[torch.Tensor] = None
    old_slope: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        stage = min(max_stage, i + 1)
        if sigma_next == 0:
            x = denoised
        else:
            r = _er_sde_noise_scaler(sigma_next) / _er_sde_noise_scaler(sigma)
            x = r * x + (1 - r) * denoised
            if stage >= 2 and old_denoised is not None:
                ds = sigma_next - sigma
                width = -ds / _ER_SDE_POINTS
                points = sigma_next + grid * width
                scaled = _er_sde_noise_scaler(points)
                slope = (denoised - old_denoised) / (sigma - sigmas[i - 1])
                x = x + (ds + (1 / scaled).sum() * width * _er_sde_noise_scaler(sigma_next)) * slope
                if stage >= 3 and old_slope is not None:
                    s_u = ((points - sigma) / scaled).sum() * width
                    curvature = (slope - old_slope) / ((sigma - sigmas[i - 2]) / 2)
                    x = x + (ds**2 / 2 + s_u * _er_sde_noise_scaler(sigma_next)) * curvature
                old_slope = slope
            std = torch.nan_to_num((sigma_next**2 - sigma**2 * r**2).sqrt(), nan=0.0)
            x = x + std * noise(sigma, sigma_next)
        old_denoised = denoised
    return x


def sa_solver_weights(lambdas: torch.Tensor, lambda_from: torch.Tensor, lambda_to: torch.Tensor, tau: float,
                      points: int = 32) -> torch.Tensor:
    """SA-Solver's weights b_j (VE form, alpha = 1) of the data predictions at half-log-SNRs `lambdas`
    (k,) for a step lambda_from -> lambda_to: the integrals of (1 + tau^2) e^(-(1 + tau^2)(lambda_to - l))
    times their Lagrange basis polynomials over [lambda_from, lambda_to], by Gauss-Legendre quadrature.
    Returns (k,) float64."""
    lambdas = lambdas.detach().cpu().to(torch.float64)
    lam_a, lam_b = float(lambda_from), float(lambda_to)
    nodes, quad = np.polynomial.legendre.leggauss(points)
    u = torch.from_numpy(0.5 * (lam_b - lam_a) * nodes + 0.5 * (lam_a + lam_b))
    kernel = (1 + tau**2) * torch.exp(-(1 + tau**2) * (lam_b - u))
    weights = []
    for j in range(lambdas.numel()):
        basis = torch.ones_like(u)
        for k in range(lambdas.numel()):
            if k != j:
                basis = basis * (u - lambdas[k]) / (lambdas[j] - lambdas[k])
        weights.append(0.5 * (lam_b - lam_a) * (torch.from_numpy(quad) * kernel * basis).sum())
    return torch.stack(weights)


def _sa_solver(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback],
               eta: float, noise: NoiseSampler, stochastic_interval: tuple[float, float], predictor_order: int,
               corrector_order: int, pece: bool) -> torch.Tensor:
    """SA-Solver (Xue et al. 2023), VE form: a stochastic Adams predictor over the last data predictions
    in lambda = -log sigma, x_pred = (s_next / s) e^(-tau^2 h) x + sum b_j D_j + s_next sqrt(1 - e^(-2 tau^2 h)) z,
    and a corrector of one order more that redoes the step once the prediction at its end is known
    (PECE: and evaluates the corrected sample again). tau = eta where start >= sigma_next > end of
    stochastic_interval, else 0. Lower orders near the end of a schedule ending at 0."""
    start, end = stochastic_interval
    lambdas = -sigmas.to(torch.float64).log()
    n = len(sigmas) - 1
    to_end = bool(sigmas[-1] == 0)
    x_pred = x
    h = torch.zeros((), dtype=torch.float64)
    tau = 0.0
    step_noise: Optional[torch.Tensor] = None
    history: list[torch.Tensor] = []
    for i in range(n):
        denoised = model(x_pred, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x_pred, denoised)
        history = (history + [denoised])[-max(predictor_order, corrector_order):]
        p_order = min(predictor_order, len(history))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(corrector_order, len(history))
        if to_end:
            p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)
        if c_order == 0:
            x = x_pred
        else:
            b = sa_solver_weights(lambdas[i - c_order + 1: i + 1], lambdas[i - 1], lambdas[i], tau)
            x = (sigmas[i] / sigmas[i - 1]) * math.exp(-(tau**2) * float(h)) * x + _weighted(b, history[-c_order:])
            if step_noise is not None:
                x = x + step_noise
            if pece:
                history[-1] = model(x, _batch_sigma(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x_pred = history[-1]
            continue
        tau = eta if start >= float(sigmas[i + 1]) > end else 0.0
        h = lambdas[i + 1] - lambdas[i]
        b = sa_solver_weights(lambdas[i - p_order + 1: i + 1], lambdas[i], lambdas[i + 1], tau)
        x_pred = (sigmas[i + 1] / sigmas[i]) * math.exp(-(tau**2) * float(h)) * x + _weighted(b, history[-p_order:])
        step_noise = None
        if tau > 0:
            std = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * float(h)))
            step_noise = std * noise(sigmas[i], sigmas[i + 1])
            x_pred = x_pred + step_noise
    return x_pred


def _weighted(weights: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    return sum((w.to(v.dtype) * v for w, v in zip(weights, values)), torch.zeros_like(values[0]))


# The part of sampling (as fractions of the model's schedule, 0 = pure noise) where SA-Solver adds noise.
SA_SOLVER_STOCHASTIC_PERCENTS = (0.2, 0.8)


def _sa_solver_in_form(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback],
                       eta: float, noise_sampler: Optional[NoiseSampler], generator: Optional[torch.Generator],
                       percent_to_sigma: Optional[Callable[[float], float]], noise_form: NoiseForm, pece: bool,
                       predictor_order: int, corrector_order: int) -> torch.Tensor:
    if percent_to_sigma is None:
        raise ValueError("SA-Solver adds noise on a part of the model's schedule: pass percent_to_sigma "
                         "(ModelSampling.percent_to_sigma)")
    bounds = [float(noise_form.ve_sigma(torch.tensor(percent_to_sigma(p), dtype=torch.float64)))
              for p in SA_SOLVER_STOCHASTIC_PERCENTS]
    noise = _noise_or_default(x, noise_sampler, generator)
    return _run_in_ve_form(_sa_solver, model, x, sigmas, callback, noise_form, eta=eta, noise=noise,
                           stochastic_interval=(bounds[0], bounds[1]), predictor_order=predictor_order,
                           corrector_order=corrector_order, pece=pece)


@torch.no_grad()
def sample_sa_solver(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                     eta: float = 1.0, noise_sampler: Optional[NoiseSampler] = None,
                     generator: Optional[torch.Generator] = None,
                     percent_to_sigma: Optional[Callable[[float], float]] = None, predictor_order: int = 3,
                     corrector_order: int = 4, noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """SA-Solver, predictor order 3 and corrector order 4, noise (tau = eta) between 20% and 80% of the
    model's schedule (percent_to_sigma: the model's map from sampling progress to sigma). See :func:`_sa_solver`."""
    return _sa_solver_in_form(model, x, sigmas, callback, eta, noise_sampler, generator, percent_to_sigma,
                              noise_form, False, predictor_order, corrector_order)


@torch.no_grad()
def sample_sa_solver_pece(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                          callback: Optional[StepCallback] = None, eta: float = 1.0,
                          noise_sampler: Optional[NoiseSampler] = None, generator: Optional[torch.Generator] = None,
                          percent_to_sigma: Optional[Callable[[float], float]] = None, predictor_order: int = 3,
                          corrector_order: int = 4, noise_form: NoiseForm = NoiseForm.VE) -> torch.Tensor:
    """SA-Solver in PECE mode: each corrected sample is evaluated again (two model calls a step). See
    :func:`sample_sa_solver`."""
    return _sa_solver_in_form(model, x, sigmas, callback, eta, noise_sampler, generator, percent_to_sigma,
                              noise_form, True, predictor_order, corrector_order)


# ComfyUI's KSampler.SAMPLERS, in its order.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde_gpu,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sample_dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde_gpu,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}

# The samplers that take a GuidedDenoiser (guided and unconditional denoised) instead of a Denoiser.
CFG_PP_SAMPLERS: frozenset[str] = frozenset(name for name in SAMPLERS if name.endswith("_cfg_pp"))
