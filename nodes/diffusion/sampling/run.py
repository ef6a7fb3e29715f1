"""Running a sampler: start noise, img2img and masks, stochastic noise, progress callbacks."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from .model_sampling import apply_noise_mask, latent_from_noisy, masked_denoiser
from .samplers import CFG_PP_SAMPLERS, SAMPLERS, Denoiser, GuidedDenoiser, NoiseForm
from .schedules import ScheduleError

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
# Sampler parameters that the run sets from the model, never from a user's options.
_RUN_PARAMETERS = frozenset({"callback", "noise_sampler", "generator", "noise_form", "percent_to_sigma"})
# ComfyUI's KSampler computes one step more for these samplers and drops the second-to-last sigma
# (so that they do not end on a tiny step); its BasicScheduler node does not.
KSAMPLER_EXTRA_STEP_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

# (step index, number of steps, current x (B, C, h, w), denoised estimate (B, C, h, w))
ProgressCallback = Callable[[int, int, Tensor, Tensor], None]
# (sigma (B,), the noise mask (B, 1, h, w)) -> the mask that step uses (DifferentialDiffusion)
StepMask = Callable[[Tensor, Tensor], Tensor]


class SamplingError(ValueError):
    """A sampling request that cannot run (unknown sampler, mismatched shapes)."""


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler by name with its options (eta, s_noise, order... as the sampler function takes them)."""

    name: str
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise SamplingError(f"unknown sampler {self.name!r}; known: {', '.join(SAMPLER_NAMES)}")
        accepted = set(inspect.signature(SAMPLERS[self.name]).parameters) - _RUN_PARAMETERS
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise SamplingError(f"sampler {self.name!r} takes no option(s) {unknown}")

    @classmethod
    def with_supported(cls, name: str, **options: float) -> SamplerChoice:
        """A choice keeping only the options the sampler takes (eta means nothing to euler, say)."""
        if name not in SAMPLERS:
            raise SamplingError(f"unknown sampler {name!r}; known: {', '.join(SAMPLER_NAMES)}")
        accepted = set(inspect.signature(SAMPLERS[name]).parameters) - _RUN_PARAMETERS
        return cls(name, {key: value for key, value in options.items() if key in accepted})

    @property
    def stochastic(self) -> bool:
        return "noise_sampler" in inspect.signature(SAMPLERS[self.name]).parameters

    @property
    def uses_uncond(self) -> bool:
        """Whether the sampler re-noises with the unconditional prediction (CFG++), so that it needs a
        guider with a negative conditioning."""
        return self.name in CFG_PP_SAMPLERS


class UncondDenoiser(Protocol):
    """A denoiser that can also return its unconditional prediction (the CFG guider)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]: ...


def resize_mask(mask: Tensor, batch: int, height: int, width: int) -> Tensor:
    """mask: (B or 1, 1, H, W) or (B, H, W) -> (batch, 1, height, width), bilinear, values in [0, 1]."""
    if mask.ndim == 3:
        mask = mask[:, None]
    mask = torch.nn.functional.interpolate(mask.float(), size=(height, width), mode="bilinear", align_corners=False)
    if mask.shape[0] != batch:
        if batch % mask.shape[0]:
            raise SamplingError(f"mask batch {mask.shape[0]} does not divide the latent batch {batch}")
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
    return mask.clamp(0.0, 1.0)


def differential_mask(mask: Tensor, sigma: Tensor, sigmas: Tensor, timestep: Callable[[Tensor], Tensor],
                      sigma_min: float, strength: float = 1.0) -> Tensor:
    """Differential diffusion's mask for the step at `sigma` (ComfyUI's DifferentialDiffusion): a
    cell is repainted from the step at which sampling has gone as far, in the model's timesteps, as
    its mask value asks. With t(s) the model's timestep of s, t_from = t(sigmas[0]) and t_to =
    t(max(sigmas[-1], sigma_min)): threshold = (t(sigma) - t_to) / (t_from - t_to), binary =
    (mask >= threshold); strength < 1 blends: strength * binary + (1 - strength) * mask.
    mask: (B, 1, h, w) in [0, 1]; sigma: (B,) or a scalar; sigmas: the run's schedule."""
    sigma_to = torch.clamp(sigmas[-1], min=sigma_min)
    ends = timestep(torch.stack([sigmas[0], sigma_to]).reshape(2).float())
    now = timestep(torch.as_tensor(sigma).reshape(-1)[:1].float())
    span = float(ends[0] - ends[1])
    threshold = float(now[0] - ends[1]) / span if span else 0.0  # a one-level schedule repaints all
    binary = (mask >= threshold).to(mask.dtype)
    return strength * binary + (1.0 - strength) * mask if strength < 1.0 else binary


class _StepMasks:
    """The noise mask of each model call (the same one unless a StepMask changes it per sigma), and
    the last one used, which the finished sample is composited with."""

    def __init__(self, mask: Tensor, step_mask: StepMask | None) -> None:
        self.mask, self.step_mask, self.last = mask, step_mask, mask

    def at(self, sigma: Tensor) -> Tensor:
        self.last = self.mask if self.step_mask is None else self.step_mask(sigma, self.mask)
        return self.last

    def denoiser(self, model: Denoiser, latent: Tensor, noise: Tensor, noise_form: NoiseForm) -> Denoiser:
        """`model` with the unmasked part kept (masked_denoiser) under each call's mask."""
        if self.step_mask is None:
            return masked_denoiser(model, latent, noise, self.mask, noise_form)

        def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
            return masked_denoiser(model, latent, noise, self.at(sigma), noise_form)(x, sigma)

        return wrapped


def _cpu_noise_sampler(x: Tensor, generator: torch.Generator) -> Callable[[Tensor, Tensor], Tensor]:
    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    return draw


def sample(
    denoiser: Denoiser | UncondDenoiser,
    sampler: SamplerChoice,
    sigmas: Tensor,
    latent: Tensor,
    noise: Tensor,
    *,
    noise_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
    noise_form: NoiseForm = NoiseForm.VE,
    percent_to_sigma: Callable[[float], float] | None = None,
    step_mask: StepMask | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Sample from `latent` (zeros for text-to-image) along `sigmas`.

    latent, noise: (B, C, h, w) on any device; the start is the latent noised to sigmas[0] in the
    model's noise form (`ModelSampling.noise_form`): latent + sigmas[0] * noise (VE), or
    (1 - sigmas[0]) * latent + sigmas[0] * noise (FLOW); img2img starts at the sigma that its
    denoise strength implies. sigma_max: the model's largest sigma (`ModelSampling.sigma_max`);
    when given, a VE start at or above it (a full denoise; within a relative 1e-5) is latent +
    sqrt(1 + sigmas[0]^2) * noise, as ComfyUI starts one (and diffusers' init_noise_sigma with
    'leading' spacing); a FLOW start is unchanged. A schedule that ends above 0 returns the sample
    in the form the next run starts from (`ModelSampling.latent_from_noisy`), so a split schedule
    continues exactly. noise_mask: (B, 1, h, w) with 1 = repaint; outside it the result equals `latent`. generator:
    CPU generator for stochastic samplers' per-step noise. CFG++ samplers (`sampler.uses_uncond`)
    take the unconditional prediction from `denoiser.denoise_with_uncond`. percent_to_sigma: the
    model's map from sampling progress to sigma (`ModelSampling.percent_to_sigma`), for samplers
    that act on a part of the model's schedule (SA-Solver's noise). step_mask: the noise mask each
    model call uses, from its sigma (:func:`differential_mask`); the result is composited with the
    last one. Returns (B, C, h, w) float32 on the CPU.
    """
    if latent.shape != noise.shape:
        raise SamplingError(f"noise shape {tuple(noise.shape)} does not match the latent {tuple(latent.shape)}")
    if sigmas.ndim != 1:
        raise SamplingError(f"sigmas must be a 1-D schedule, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() < 2:
        return latent.float().cpu()
    if torch.any(sigmas[:-1] < sigmas[1:]):
        raise ScheduleError("sigmas must not increase")
    device = torch.device(device)
    latent = latent.to(device, torch.float32)
    noise = noise.to(device, torch.float32)
    sigmas = sigmas.to(device, torch.float32)
    accepted = inspect.signature(SAMPLERS[sampler.name]).parameters
    if "percent_to_sigma" in accepted and percent_to_sigma is None:
        raise SamplingError(f"sampler {sampler.name!r} needs the model's schedule (percent_to_sigma)")
    masks = None if noise_mask is None else _StepMasks(noise_mask.to(device, torch.float32), step_mask)
    model = _uncond_model(denoiser, sampler, latent, noise, masks, noise_form) if sampler.uses_uncond else (
        denoiser if masks is None else masks.denoiser(denoiser, latent, noise, noise_form))
    x = _start(noise_form, latent, noise, float(sigmas[0]), sigma_max)
    steps = sigmas.numel() - 1

    def on_step(i: int, x_i: Tensor, denoised: Tensor) -> None:
        if callback is not None:
            callback(i, steps, x_i, denoised)

    kwargs: dict[str, object] = dict(sampler.options, noise_form=noise_form)
    if "percent_to_sigma" in accepted:
        kwargs["percent_to_sigma"] = percent_to_sigma
    if sampler.stochastic:
        kwargs["noise_sampler"] = _cpu_noise_sampler(x, generator or torch.Generator("cpu").manual_seed(0))
    result = SAMPLERS[sampler.name](model, x, sigmas, callback=on_step, **kwargs)
    if sigmas[-1] > 0:
        result = latent_from_noisy(noise_form, result, sigmas[-1])
    if masks is not None:
        result = apply_noise_mask(result, latent, masks.last)
    return result.float().cpu()


def _start(noise_form: NoiseForm, latent: Tensor, noise: Tensor, sigma: float, sigma_max: float | None) -> Tensor:
    """The first sample (see :func:`sample`); latent, noise: (B, C, h, w)."""
    full = sigma_max is not None and (math.isclose(sigma, sigma_max, rel_tol=1e-5) or sigma > sigma_max)
    if noise_form is NoiseForm.VE and full:
        # A start at the top of the schedule: unit-variance data plus noise of that level, as ComfyUI's
        # full denoise (its max_denoise tolerance) begins.
        return latent + math.sqrt(1.0 + sigma * sigma) * noise
    return noise_form.noisy(latent, noise, sigma)


def _uncond_model(denoiser: Denoiser | UncondDenoiser, sampler: SamplerChoice, latent: Tensor, noise: Tensor,
                  masks: _StepMasks | None, noise_form: NoiseForm) -> GuidedDenoiser:
    """The guided and the unconditional prediction for a CFG++ sampler, both masked like the guided one."""
    both = getattr(denoiser, "denoise_with_uncond", None)
    if both is None:
        raise SamplingError(f"sampler {sampler.name!r} re-noises with the unconditional prediction: it needs a "
                            "guider with a negative conditioning (CFGGuider)")
    if masks is None:
        return both
    uncond: dict[str, Tensor] = {}

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        out, uncond["last"] = both(x, sigma)
        return out

    masked = masks.denoiser(guided, latent, noise, noise_form)

    def pair(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        out = masked(x, sigma)
        return out, apply_noise_mask(uncond["last"], latent, masks.last)

    return pair
