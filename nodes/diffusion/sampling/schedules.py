"""Noise schedules (sigma sequences) as pure functions over a model's training noise levels.

Two kinds of model carry a table of training noise levels the schedulers read: discrete-time
(DDPM-style) models such as SD1/SD2/SDXL, DiT and PixArt (:class:`DiscreteSchedule`, sigma in the
VE sense) and rectified-flow models such as SD3 and Flux (:class:`FlowSchedule`, sigma in (0, 1] with
x = (1 - sigma) * x0 + sigma * noise). Both expose the same table and sigma <-> timestep maps, so
every scheduler below works on either.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

__all__ = [
    "ScheduleError",
    "NoiseSchedule",
    "DiscreteSchedule",
    "DistilledSchedule",
    "sd_discrete_schedule",
    "ZERO_TERMINAL_ALPHA_CUMPROD",
    "rescale_zero_terminal_snr",
    "zero_terminal_snr",
    "linear_discrete_schedule",
    "cosine_discrete_schedule",
    "FlowSchedule",
    "ContinuousSchedule",
    "flow_time_shift",
    "flux_mu",
    "sigmas_normal",
    "sigmas_karras",
    "sigmas_exponential",
    "sigmas_sgm_uniform",
    "sigmas_simple",
    "sigmas_ddim_uniform",
    "sigmas_beta",
    "sigmas_linear_quadratic",
    "sigmas_kl_optimal",
    "sigmas_sd_turbo",
    "without_penultimate_sigma",
    "beta_ppf",
    "sigmas_for_denoise",
    "split_sigmas",
]


class ScheduleError(ValueError):
    """A schedule was asked for with arguments it cannot honour (e.g. zero steps)."""


class NoiseSchedule(Protocol):
    """What the schedulers read from a model: its training sigmas (increasing) and the maps between
    sigma and the model's timestep (whatever unit the network is trained on)."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    def percent_to_sigma(self, percent: float) -> float: ...


class _SigmaTable:
    """A schedule held as its table of training sigmas, increasing: the table's ends are its
    sigma_min and sigma_max."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


class DiscreteSchedule(_SigmaTable):
    """The training noise levels of a discrete-time (DDPM-style) model and sigma<->timestep maps.

    sigmas: (T,) increasing, sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).
    training: the schedule the model was trained on, when this one is derived from it (rescaled to
    zero terminal SNR, LCM's distilled steps); itself otherwise. Changing how a model is sampled
    starts from it, so that such changes do not pile up.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, training: DiscreteSchedule | None = None) -> None:
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.training: DiscreteSchedule = self if training is None else training

    def with_alphas_cumprod(self, alphas_cumprod: torch.Tensor) -> DiscreteSchedule:
        """The same kind of schedule (same timestep map) over other noise levels, from the same training schedule."""
        return DiscreteSchedule(alphas_cumprod, self.training)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma, interpolating linearly in log-sigma. sigma: any shape."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        # index of the table entry at or below each log-sigma, kept inside [0, T-2] so a neighbour exists
        low = (torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(
            0, self.log_sigmas.numel() - 2
        ).reshape(log_sigma.shape)
        high = low + 1
        lo_v, hi_v = self.log_sigmas[low], self.log_sigmas[high]
        w = ((log_sigma - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        return low.to(torch.float64) + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep t, interpolating linearly in log-sigma. t: any shape."""
        t = torch.as_tensor(t, dtype=torch.float64)
        low = t.floor().long().clamp(0, self.log_sigmas.numel() - 1)
        high = t.ceil().long().clamp(0, self.log_sigmas.numel() - 1)
        w = t - t.floor()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress (0 = start, 1 = end) -> the sigma of that point of the training schedule."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.t_to_sigma(torch.tensor((1.0 - percent) * (self.sigmas.numel() - 1))))


class DistilledSchedule(DiscreteSchedule):
    """The few timesteps a consistency-distilled model (LCM) was trained on, taken from its training
    schedule at an even stride: with T training steps and n kept, timesteps skip-1, 2*skip-1, ..., T-1
    (skip = T // n; 19, 39, ..., 999 for LCM's 50 of 1000). A sigma is given to the network as the
    timestep of the nearest kept one (no interpolation), as LCM was trained; timestep -> sigma
    interpolates between kept ones in log-sigma. ComfyUI's ModelSamplingDiscreteDistilled.

    sigmas: (n,) increasing.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, skip_steps: int, training: DiscreteSchedule) -> None:
        super().__init__(alphas_cumprod, training)
        self.skip_steps = skip_steps

    @classmethod
    def from_training(cls, training: DiscreteSchedule, steps: int = 50) -> DistilledSchedule:
        """Keep `steps` of a training schedule's timesteps (LCM: 50 of SD's 1000)."""
        total = training.alphas_cumprod.numel()
        if not 1 <= steps <= total:
            raise ScheduleError(f"a distilled schedule keeps 1..{total} of its {total} timesteps, got {steps}")
        skip = total // steps
        kept = torch.arange(steps, dtype=torch.long) * skip + (total - 1 - (steps - 1) * skip)
        return cls(training.alphas_cumprod[kept], skip, training.training)

    def with_alphas_cumprod(self, alphas_cumprod: torch.Tensor) -> DistilledSchedule:
        return DistilledSchedule(alphas_cumprod, self.skip_steps, self.training)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of the kept noise level nearest in log-sigma to each sigma. sigma: any shape."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        nearest = (log_sigma.reshape(-1, 1) - self.log_sigmas[None]).abs().argmin(dim=1).reshape(log_sigma.shape)
        return (nearest * self.skip_steps + self.skip_steps - 1).to(torch.float64)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at timestep t: interpolated in log-sigma between the kept timesteps. t: any shape."""
        t = torch.as_tensor(t, dtype=torch.float64)
        index = ((t - (self.skip_steps - 1)) / self.skip_steps).clamp(0, self.log_sigmas.numel() - 1)
        return super().t_to_sigma(index)

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress -> sigma, progress measured on the training schedule's timesteps."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.t_to_sigma(torch.tensor((1.0 - percent) * (self.training.sigmas.numel() - 1))))


# The last cumulative alpha of a schedule rescaled to zero terminal SNR: exactly 0 would make its
# sigma infinite, so (as ComfyUI does) it is this tiny value, sigma ~ 4519.
ZERO_TERMINAL_ALPHA_CUMPROD = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    sqrt(alphas_cumprod) shifted so that the last is 0 and scaled so that the first is unchanged; the
    last is then set to :data:`ZERO_TERMINAL_ALPHA_CUMPROD`. alphas_cumprod: (T,) decreasing -> (T,)."""
    root = alphas_cumprod.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = ZERO_TERMINAL_ALPHA_CUMPROD
    return rescaled


def zero_terminal_snr(schedule: DiscreteSchedule) -> DiscreteSchedule:
    """The schedule rescaled to zero terminal SNR (:func:`rescale_zero_terminal_snr`): pure noise at
    its last timestep, so a model fine-tuned on it (with v prediction) can make very dark or bright
    images. Same kind of schedule, same timesteps."""
    return schedule.with_alphas_cumprod(rescale_zero_terminal_snr(schedule.alphas_cumprod))


def sd_discrete_schedule(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> DiscreteSchedule:
    """The Stable Diffusion 1.x/2.x/XL "scaled_linear" beta schedule (betas linear in sqrt-space)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return DiscreteSchedule(torch.cumprod(1 - betas, dim=0))


def linear_discrete_schedule(
    num_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
) -> DiscreteSchedule:
    """The DDPM/ADM "linear" beta schedule (betas linear from beta_start to beta_end), which DiT and
    PixArt-α/Σ were trained on; LDM code calls it "sqrt_linear". Not SD's scaled-linear."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return DiscreteSchedule(torch.cumprod(1 - betas, dim=0))


def cosine_discrete_schedule(num_timesteps: int = 1000, max_beta: float = 0.999) -> DiscreteSchedule:
    """Nichol & Dhariwal's cosine schedule ("squaredcos_cap_v2"): alpha_bar(t) = cos((t + 0.008) / 1.008 *
    pi / 2)^2 for t in [0, 1], betas 1 - alpha_bar((i+1)/T) / alpha_bar(i/T) capped at max_beta.
    unCLIP models noise their image embeddings on it."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                          for i in range(num_timesteps)], dtype=torch.float64)
    return DiscreteSchedule(torch.cumprod(1 - betas, dim=0))


def flow_time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Rectified-flow timestep shift: sigma = shift * t / (1 + (shift - 1) * t), t in [0, 1], any shape.

    shift > 1 spends more of the schedule at high noise (SD3 trains and samples with 3.0). Flux's
    resolution-dependent shift e^mu / (e^mu + 1/t - 1) is the same curve with shift = e^mu.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


class FlowSchedule(_SigmaTable):
    """The training noise levels of a rectified-flow model (SD3, Flux, AuraFlow).

    sigmas: (T,) = flow_time_shift(i / T, shift) for i = 1..T, increasing to 1. The network's
    timestep is sigma * multiplier (SD3: 1000; Flux takes sigma itself, multiplier 1), and a
    timestep maps back through the shift: t_to_sigma(t) = flow_time_shift(t / multiplier). The two
    maps are not inverses when shift != 1; the "normal" scheduler applies both, which is what
    ComfyUI's ModelSamplingDiscreteFlow/ModelSamplingFlux and diffusers' FlowMatchEulerDiscreteScheduler
    do as well.
    """

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, num_timesteps: int = 1000) -> None:
        if not shift > 0:
            raise ScheduleError(f"a flow schedule needs shift > 0, got {shift}")
        if not multiplier > 0:
            raise ScheduleError(f"a flow schedule needs multiplier > 0, got {multiplier}")
        if num_timesteps < 2:
            raise ScheduleError(f"a flow schedule needs at least 2 timesteps, got {num_timesteps}")
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.sigmas = flow_time_shift(torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps, shift)

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift}, multiplier={self.multiplier}, num_timesteps={self.sigmas.numel()})"

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's timestep at each sigma: sigma * multiplier. sigma: any shape."""
        return torch.as_tensor(sigma, dtype=torch.float64) * self.multiplier

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at timestep t: the shifted t / multiplier. t: any shape."""
        return flow_time_shift(torch.as_tensor(t, dtype=torch.float64) / self.multiplier, self.shift)

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress (0 = start, 1 = end) -> sigma: 1 at the start, the shifted 1 - percent between."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(flow_time_shift(torch.tensor(1.0 - percent), self.shift))


class ContinuousSchedule(_SigmaTable):
    """The noise levels of a model trained on continuous sigmas, EDM style (Karras et al. 2022;
    CosXL, Playground v2.5): the network's timestep is 0.25 * ln(sigma), sigma in [sigma_min,
    sigma_max]. sigmas: (T,) evenly spaced in log-sigma, the table the table-reading schedulers
    (simple, ddim_uniform, beta) pick from (ComfyUI's ModelSamplingContinuousEDM keeps 1,000)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 120.0, num_timesteps: int = 1000) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ScheduleError(f"a continuous schedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if num_timesteps < 2:
            raise ScheduleError(f"a continuous schedule needs at least 2 table entries, got {num_timesteps}")
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps,
                                     dtype=torch.float64).exp()

    def __repr__(self) -> str:
        return f"ContinuousSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, num_timesteps={self.sigmas.numel()})"

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """0.25 * ln(sigma). sigma: any shape."""
        return 0.25 * torch.as_tensor(sigma, dtype=torch.float64).log()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """exp(4 t). t: any shape."""
        return (torch.as_tensor(t, dtype=torch.float64) * 4.0).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress (0 = start, 1 = end) -> sigma, log-linear from sigma_max to sigma_min."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(log_min + (log_max - log_min) * (1.0 - percent))


def flux_mu(width: float, height: float, base_shift: float = 0.5, max_shift: float = 1.15,
            base_tokens: float = 256.0, max_tokens: float = 4096.0) -> float:
    """Flux's resolution-dependent shift exponent for an image of width x height pixels.

    The image has width * height / 256 tokens (8x VAE, 2x2 patches); mu is linear in the token
    count, base_shift at base_tokens and max_shift at max_tokens (and extrapolated beyond). The
    schedule's shift is e^mu.
    """
    tokens = width * height / 256.0
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (tokens - base_tokens)


def _check_steps(n: int) -> None:
    if n < 1:
        raise ScheduleError(f"a schedule needs at least 1 step, got steps={n}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def sigmas_normal(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n sigmas uniform in timestep from sigma_max to sigma_min, then 0. Returns (n+1,)."""
    _check_steps(n)
    t_max = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    t_min = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    return _append_zero(schedule.t_to_sigma(torch.linspace(float(t_max), float(t_min), n, dtype=torch.float64)))


def sigmas_sgm_uniform(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """Like normal, but n+1 points uniform in timestep with the last (sigma_min) dropped. Returns (n+1,)."""
    _check_steps(n)
    t_max = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_max)))
    t_min = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_min)))
    ts = torch.linspace(t_max, t_min, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(schedule.t_to_sigma(ts))


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule: uniform in sigma**(1/rho). Returns (n+1,)."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((inv_max + ramp * (inv_min - inv_max)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log-sigma from sigma_max to sigma_min. Returns (n+1,)."""
    _check_steps(n)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def sigmas_simple(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n training sigmas taken at an even stride from the top of the table. Returns (n+1,)."""
    _check_steps(n)
    stride = schedule.sigmas.numel() / n
    idx = torch.tensor([schedule.sigmas.numel() - 1 - int(i * stride) for i in range(n)])
    return _append_zero(schedule.sigmas[idx])


def sigmas_ddim_uniform(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """DDIM's uniform timesteps t = 1 + k*(T//n), k = n-1..0 (steps_offset 1). Returns (n+1,)."""
    _check_steps(n)
    stride = schedule.sigmas.numel() // n
    if stride < 1:
        raise ScheduleError(f"ddim_uniform supports at most {schedule.sigmas.numel()} steps, got {n}")
    ts = torch.arange(n - 1, -1, -1) * stride + 1
    return _append_zero(schedule.sigmas[ts.clamp(max=schedule.sigmas.numel() - 1)])


def _log_beta_fn(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _incomplete_beta_cf(x: float, a: float, b: float) -> float:
    """Continued fraction of the regularized incomplete beta, evaluated by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b), the CDF of Beta(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta_fn(a, b))
    # the continued fraction converges fast only below the mean; use the symmetry I_x(a,b)=1-I_{1-x}(b,a)
    if x < (a + 1) / (a + b + 2):
        return front * _incomplete_beta_cf(x, a, b) / a
    return 1.0 - front * _incomplete_beta_cf(1 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) (inverse of `beta_cdf`) by bisection to ~1e-12."""
    if not (0.0 <= q <= 1.0):
        raise ScheduleError(f"beta quantile needs 0 <= q <= 1, got {q}")
    if a <= 0 or b <= 0:
        raise ScheduleError(f"beta distribution needs alpha > 0 and beta > 0, got alpha={a}, beta={b}")
    if q in (0.0, 1.0):
        return q
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sigmas_beta(schedule: NoiseSchedule, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(alpha, beta) quantiles 1, 1-1/n, ..., 1/n (rounded), their training sigmas. (n+1,)."""
    _check_steps(n)
    t_last = schedule.sigmas.numel() - 1
    ts = [round(beta_ppf(1.0 - i / n, alpha, beta) * t_last) for i in range(n)]
    return _append_zero(schedule.sigmas[torch.tensor(ts)])


def sigmas_linear_quadratic(n: int, sigma_max: float, threshold_noise: float = 0.025,
                            linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's linear-quadratic schedule as a fraction t of sigma_max, t = 1 - u with u rising from 0:
    linearly to threshold_noise over the first linear_steps (n // 2) steps, then on the quadratic
    through (linear_steps, threshold_noise) with the same slope there that reaches 1 at step n.
    One step is [sigma_max, 0]. Returns (n+1,)."""
    _check_steps(n)
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    k = n // 2 if linear_steps is None else linear_steps
    if not 1 <= k < n:
        raise ScheduleError(f"linear_quadratic needs 1 <= linear_steps < steps, got {k} of {n}")
    quadratic_steps = n - k
    # u(i) = a i^2 + b i + c for i >= k: u(k) = threshold_noise, u'(k) = threshold_noise / k, u(n) = 1
    a = (k - threshold_noise * n) / (k * quadratic_steps**2)
    b = threshold_noise / k - 2 * (k - threshold_noise * n) / quadratic_steps**2
    c = a * k**2
    u = [i * threshold_noise / k for i in range(k)] + [a * i**2 + b * i + c for i in range(k, n)] + [1.0]
    return (1.0 - torch.tensor(u, dtype=torch.float64)).mul(sigma_max).to(torch.float32)


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (Sabour et al. 2024, "Align Your Steps"): uniform in arctan(sigma) from
    sigma_max to sigma_min, then 0. Returns (n+1,)."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return _append_zero((ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan())


def sigmas_sd_turbo(schedule: NoiseSchedule, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """SD-Turbo / SDXL-Turbo's schedule (ComfyUI's SDTurboScheduler): timesteps 999, 899, ..., 99,
    starting 10 - int(10 * denoise) of them in (so denoise 0.5 starts at 499), `steps` of them at
    most; their training sigmas, then 0. Returns (k + 1,), k <= steps (0 when denoise is 0)."""
    if not 1 <= steps <= 10:
        raise ScheduleError(f"the turbo schedule has 1 to 10 steps, got {steps}")
    if not 0.0 <= denoise <= 1.0:
        raise ScheduleError(f"denoise must be in [0, 1], got {denoise}")
    start = 10 - int(10 * denoise)  # int() truncates like ComfyUI's, so 0.7 gives 7 and 0.29 gives 2
    timesteps = torch.arange(999, 0, -100, dtype=torch.float64)[start: start + steps]
    return _append_zero(schedule.t_to_sigma(timesteps).reshape(-1))


def without_penultimate_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    """sigmas: (n+2,) -> (n+1,) without the second-to-last entry (ComfyUI's KSampler does this for
    samplers whose last step would otherwise be a tiny one, see run.KSAMPLER_EXTRA_STEP_SAMPLERS)."""
    if sigmas.numel() < 3:
        raise ScheduleError(f"dropping the second-to-last sigma needs at least 3 sigmas, got {sigmas.numel()}")
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def sigmas_for_denoise(make_sigmas: Callable[[int], torch.Tensor], steps: int, denoise: float) -> torch.Tensor:
    """Schedule for img2img: the last steps+1 sigmas of a round(steps/denoise)-step schedule.

    make_sigmas: n -> (n+1,) sigmas, e.g. `lambda n: sigmas_karras(n, lo, hi)`. Returns (steps+1,);
    denoise 0 gives an empty schedule (nothing to sample).
    """
    if not (0.0 <= denoise <= 1.0):
        raise ScheduleError(f"denoise must be in [0, 1], got {denoise}")
    _check_steps(steps)
    if denoise == 0.0:
        return torch.zeros(0)
    total = max(steps, round(steps / denoise))
    return make_sigmas(total)[-(steps + 1) :]


def split_sigmas(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a schedule at `step`: (sigmas[:step+1], sigmas[step:]); the boundary sigma is in both."""
    if not (0 <= step < sigmas.numel()):
        raise ScheduleError(f"split step must be in [0, {sigmas.numel() - 1}], got {step}")
    return sigmas[: step + 1], sigmas[step:]
