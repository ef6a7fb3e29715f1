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
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Optional, Protocol

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
    "SAMPLERS",
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
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022, data-prediction SDE solver)."""
    noise = _noise_or_default(x, noise_sampler, generator)
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
            r = h_last / h
            x = x - 0.5 * alpha_next * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
        old_denoised, h_last = denoised, h
    return x


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


def _unipc_weights(rks: list[torch.Tensor], h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's linear system R w = b (bh2 variant, B(h) = expm1(-h)) for `order` points; returns (R, b)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    r = torch.stack([torch.as_tensor(v, dtype=h.dtype) for v in rks])
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(rhs)


@torch.no_grad()
def sample_uni_pc(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None, order: int = 2,
    noise_form: NoiseForm = NoiseForm.VE,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, bh2: multistep predictor plus a corrector that reuses
    each new model evaluation; lower order at the start and the last steps."""
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
            x = _unipc_update(x_last, history, sigmas, lams, i - 1, last_order, denoised, noise_form)
        history.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        last_order = min(order, i + 1, n - i)
        x_last = x
        x = _unipc_update(x, history, sigmas, lams, i, last_order, None, noise_form)
    return x


def _unipc_update(
    x: torch.Tensor,
    history: list[torch.Tensor],
    sigmas: torch.Tensor,
    lams: torch.Tensor,
    i: int,
    order: int,
    corrector_output: Optional[torch.Tensor],
    noise_form: NoiseForm,
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
    big_r, b = _unipc_weights(rks, h, order)
    alpha_next = noise_form.alpha(sigmas[i + 1])
    b_h = alpha_next * torch.expm1(-h).to(x.dtype)
    x_t = (sigmas[i + 1] / sigmas[i]) * x - b_h * m0
    if corrector_output is None:
        if not d1s:
            return x_t
        rhos = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
        return x_t - b_h * sum(rho.to(x.dtype) * d for rho, d in zip(rhos, d1s))
    rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(big_r, b)
    correction = sum((rho.to(x.dtype) * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_t - b_h * (correction + rhos[-1].to(x.dtype) * (corrector_output - m0))


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "uni_pc": sample_uni_pc,
}
