"""Diffusion samplers over a denoiser `model(x, sigma) -> denoised` (k-diffusion's VE formulation).

Every sampler is `sample_<name>(model, x, sigmas, ...) -> x`: x starts at noise * sigmas[0] and
ends as the sample at sigmas[-1] (normally 0). Stochastic samplers draw noise from a
`noise_sampler(sigma, sigma_next) -> (B, ...)` so that callers (and parity tests) control it.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np
import torch

__all__ = [
    "Denoiser",
    "StepCallback",
    "NoiseSampler",
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


def gaussian_noise_sampler(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoiseSampler:
    """Standard normal noise shaped like x, drawn from `generator` (one draw per call)."""

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    return draw


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - denoised) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step sigma -> sigma_next into a deterministic step to sigma_down plus noise of std sigma_up.

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


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR t = -log(sigma), the time variable of the DPM-Solver family."""
    return -sigma.log()


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE. x: (B, ...), sigmas: (n+1,)."""
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
) -> torch.Tensor:
    """Euler to sigma_down, then fresh noise up to sigma_next. x: (B, ...), sigmas: (n+1,)."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to sigma=0 is Euler."""
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


@torch.no_grad()
def sample_dpm_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """DPM-Solver-2 in sigma: the derivative is re-evaluated at the log-midpoint sigma (Karras et al. 2022)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_mid = _geometric_mean(sigmas[i], sigmas[i + 1])
        x_mid = x + d * (sigma_mid - sigmas[i])
        d_mid = to_d(x_mid, sigma_mid, model(x_mid, _batch_sigma(x, sigma_mid)))
        x = x + d_mid * (sigmas[i + 1] - sigmas[i])
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
) -> torch.Tensor:
    """DPM-Solver-2 to sigma_down, then fresh noise up to sigma_next."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _geometric_mean(sigmas[i], sigma_down)
            x_mid = x + d * (sigma_mid - sigmas[i])
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, _batch_sigma(x, sigma_mid)))
            x = x + d_mid * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
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
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None, order: int = 4
) -> torch.Tensor:
    """Linear multistep in sigma over the last `order` derivatives (fewer while they accumulate)."""
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
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): 2nd-order multistep in data prediction; 1st order first and last."""
    old_denoised: Optional[torch.Tensor] = None
    h_last: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        if old_denoised is None or h_last is None:
            denoised_est = denoised
        else:
            r = h_last / h
            denoised_est = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_est
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
) -> torch.Tensor:
    """DPM-Solver++(2S) single-step with midpoint r=1/2 to sigma_down, then fresh noise to sigma_next."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _lambda(sigmas[i]), _lambda(sigma_down)
            h = t_next - t
            sigma_mid = (-(t + 0.5 * h)).exp()
            x_mid = (sigma_mid / sigmas[i]) * x - torch.expm1(-0.5 * h) * denoised
            denoised_mid = model(x_mid, _batch_sigma(x, sigma_mid))
            x = (sigma_down / sigmas[i]) * x - torch.expm1(-h) * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    eta: float = 1.0,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DPM-Solver++ SDE, single-step 2nd order: an ancestral half step (in log-sigma) to a midpoint, then
    an ancestral full step using the midpoint prediction. Two noise draws per step."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        sigma_mid = _geometric_mean(sigma, sigma_next)
        down, up = ancestral_step(sigma, sigma_mid, eta)
        x_mid = (down / sigma) * x - torch.expm1(_lambda(sigma) - _lambda(down)) * denoised
        x_mid = x_mid + noise(sigma, sigma_mid) * up
        denoised_mid = model(x_mid, _batch_sigma(x, sigma_mid))
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = (down / sigma) * x - torch.expm1(_lambda(sigma) - _lambda(down)) * denoised_mid
        x = x + noise(sigma, sigma_next) * up
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
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022, data-prediction SDE solver)."""
    noise = _noise_or_default(x, noise_sampler, generator)
    old_denoised: Optional[torch.Tensor] = None
    h_last: Optional[torch.Tensor] = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        eta_h = eta * h
        x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
        if old_denoised is not None and h_last is not None:
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
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
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: 3rd-order multistep exponential integrator (eta=0 is the ODE solver 3M)."""
    noise = _noise_or_default(x, noise_sampler, generator)
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
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        h_eta = h * (eta + 1)
        # sigma_next/sigma * exp(-eta*h) == exp(-h_eta)
        x = (-h_eta).exp() * x - torch.expm1(-h_eta) * denoised
        # phi_2, phi_3 of the exponential integrator, written so that they stay finite as h -> 0
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if denoised_2 is not None and denoised_1 is not None and h_1 is not None and h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif denoised_1 is not None and h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta * h)).sqrt()
        denoised_2, denoised_1 = denoised_1, denoised
        h_2, h_1 = h_1, h
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Deterministic DDIM (eta=0): keep the predicted noise, re-noise the prediction to sigma_next.

    In the VE variable x = x0 + sigma * eps this is x_next = denoised + sigma_next * eps.
    """
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        eps = (x - denoised) / sigmas[i]
        x = denoised + sigmas[i + 1] * eps
    return x


@torch.no_grad()
def sample_ddpm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Ancestral DDPM steps (Ho et al. 2020): sample the posterior q(x_prev | x_t, x0=denoised).

    Works in the variance-preserving variable x_vp = x / sqrt(1 + sigma**2), alphas_cumprod = 1/(1+sigma**2).
    """
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch_sigma(x, sigma))
        if callback is not None:
            callback(i, x, denoised)
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        alpha = a_t / a_prev
        beta = 1 - alpha
        x_vp = x * a_t.sqrt()
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * denoised + (alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * x_vp
        if sigma_next > 0:
            var = (1 - a_prev) / (1 - a_t) * beta
            mean = mean + var.sqrt() * noise(sigma, sigma_next)
        x = mean / a_prev.sqrt()
    return x


@torch.no_grad()
def sample_lcm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Latent-consistency sampling: jump to the prediction, re-noise it to sigma_next with fresh noise."""
    noise = _noise_or_default(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
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
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None, order: int = 2
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, bh2: multistep predictor plus a corrector that reuses
    each new model evaluation; lower order at the start and the last steps."""
    lams = _lambda(sigmas[:-1].to(torch.float64))
    history: list[torch.Tensor] = []  # denoised at sigmas[0..i]
    x_last: Optional[torch.Tensor] = None
    last_order = 1
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, _batch_sigma(x, sigmas[i]))
        if callback is not None:
            callback(i, x, denoised)
        if x_last is not None:
            x = _unipc_update(x_last, history, sigmas, lams, i - 1, last_order, corrector_output=denoised)
        history.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        last_order = min(order, i + 1, n - i)
        x_last = x
        x = _unipc_update(x, history, sigmas, lams, i, last_order, corrector_output=None)
    return x


def _unipc_update(
    x: torch.Tensor,
    history: list[torch.Tensor],
    sigmas: torch.Tensor,
    lams: torch.Tensor,
    i: int,
    order: int,
    corrector_output: Optional[torch.Tensor],
) -> torch.Tensor:
    """One UniPC predictor (corrector_output None) or corrector step from sigmas[i] to sigmas[i+1]."""
    m0 = history[i]
    h = _lambda(sigmas[i + 1].to(torch.float64)) - lams[i]
    rks: list[torch.Tensor] = []
    d1s: list[torch.Tensor] = []
    for k in range(1, order):
        rk = (lams[i - k] - lams[i]) / h
        rks.append(rk)
        d1s.append((history[i - k] - m0) / rk.to(x.dtype))
    rks.append(torch.ones((), dtype=torch.float64))
    big_r, b = _unipc_weights(rks, h, order)
    b_h = torch.expm1(-h).to(x.dtype)
    x_t = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h).to(x.dtype) * m0
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
