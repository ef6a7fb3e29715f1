"""From a network's raw output to the samplers' denoiser: prediction types, input scaling, timesteps,
noise mixing, inpainting masks.

Discrete-time models (SD1/SD2/SDXL) were trained on the variance-preserving form; the samplers
see them in the variance-exploding form x = x0 + sigma * noise, so their input is scaled by
c_in = 1 / sqrt(sigma^2 + 1), the noise level is given as the (fractional) training timestep of
sigma, and their output is an epsilon (noise) or a v prediction, the denoised image itself (x0),
or an epsilon under LCM's consistency boundary condition. Rectified-flow models (SD3,
Flux) see x = (1 - sigma) * x0 + sigma * noise unscaled, get timestep sigma * multiplier and
predict the velocity v = noise - x0, so the denoised estimate is x - sigma * v. Both are one
:class:`ModelSampling`; what differs lives in its schedule and its prediction type, and nothing
downstream asks which it is. DiT and PixArt are discrete-time eps models on the linear beta schedule
whose output also carries a learned variance (:func:`learned_sigma_prediction` takes the eps part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from torch import Tensor

from .samplers import Denoiser, NoiseForm
from .schedules import (ContinuousSchedule, DiscreteSchedule, DistilledSchedule, FlowSchedule, sd_discrete_schedule,
                        zero_terminal_snr)

# ComfyUI's ModelSamplingFlux keeps a 10,000-entry table (ModelSamplingDiscreteFlow: 1,000); the
# "simple", "ddim_uniform" and "beta" schedulers pick from it, so its length is part of their result.
FLUX_TIMESTEPS = 10000


class ModelSamplingError(ValueError):
    """A model sampling that cannot exist (a flow prediction on a discrete schedule, a bad shift)."""


# LCM's consistency boundary condition (Luo et al. 2023; diffusers' LCMScheduler): the denoised
# estimate is c_skip(t) * x + c_out(t) * x0 with t the timestep times this scaling and sigma_data 0.5,
# so that it is x itself at t = 0.
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0
# LCM models were distilled on this many of the 1,000 training timesteps (LCM's skipping-step schedule).
LCM_ORIGINAL_STEPS = 50


class Prediction(str, Enum):
    """What the network outputs: the noise (eps), v = alpha * noise - sigma * x0, the flow velocity
    noise - x0, the denoised image itself (x0), the noise of a latent-consistency model (lcm: eps
    under LCM's boundary condition, on its distilled timesteps), or EDM's F (edm: the denoised image
    is c_skip * x + c_out * F, Karras et al. 2022, the sign opposite to v's)."""

    EPS = "eps"
    V = "v"
    FLOW = "flow"
    X0 = "x0"
    LCM = "lcm"
    EDM = "edm"


# (x_in: (B, C, H, W), t: (B,)) -> raw model output (B, C, H, W); everything but the scaling.
RawModel = Callable[[Tensor, Tensor], Tensor]


def _per_sample(sigma: Tensor | float, like: Tensor) -> Tensor:
    """sigma as a scalar or (B,) -> broadcastable against like (B, ...)."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s


@dataclass(frozen=True)
class ModelSampling:
    """How a model is driven at a noise level sigma: its training schedule and its prediction type.

    schedule: a :class:`DiscreteSchedule` with an EPS or V prediction, a :class:`FlowSchedule`
    with the FLOW prediction, or a :class:`ContinuousSchedule` (EDM-style, :meth:`continuous`).
    Build them with :meth:`for_prediction`, :meth:`flow`, :meth:`flux` or :meth:`continuous`.
    sigma_data: the data's standard deviation in the EDM scalings (c_in = 1 / sqrt(sigma^2 +
    sigma_data^2), and those of v and edm); 1 for every model but EDM-trained ones (0.5).
    """

    schedule: DiscreteSchedule | FlowSchedule | ContinuousSchedule
    prediction: Prediction = Prediction.EPS
    sigma_data: float = 1.0

    def __post_init__(self) -> None:
        flow_schedule = isinstance(self.schedule, FlowSchedule)
        if flow_schedule != (self.prediction is Prediction.FLOW):
            raise ModelSamplingError(
                f"prediction {self.prediction.value!r} does not fit a {type(self.schedule).__name__}: "
                "a flow prediction needs a FlowSchedule, and the others a DiscreteSchedule or ContinuousSchedule"
            )

    @classmethod
    def for_prediction(cls, prediction: Prediction | str) -> ModelSampling:
        """The SD1/SD2/SDXL training schedule with the given prediction type (eps or v)."""
        prediction = Prediction(prediction)
        if prediction is Prediction.FLOW:
            raise ModelSamplingError("a flow model has no SD training schedule: use ModelSampling.flow() or .flux()")
        return cls(sd_discrete_schedule(), prediction)

    @classmethod
    def discrete(cls, schedule: DiscreteSchedule, prediction: Prediction | str,
                 zero_terminal: bool = False) -> ModelSampling:
        """A discrete-time model sampled as `prediction` (ComfyUI's ModelSamplingDiscrete): on the
        training schedule `schedule` came from (so repeated changes do not pile up); LCM on its 50
        distilled timesteps (:class:`.schedules.DistilledSchedule`); zero_terminal: rescaled to zero
        terminal SNR (:func:`.schedules.zero_terminal_snr`), after the distillation."""
        prediction = Prediction(prediction)
        if prediction is Prediction.FLOW:
            raise ModelSamplingError("a flow prediction has no discrete schedule: use ModelSampling.flow() or .flux()")
        base: DiscreteSchedule = schedule.training
        if prediction is Prediction.LCM:
            base = DistilledSchedule.from_training(base, LCM_ORIGINAL_STEPS)
        if zero_terminal:
            base = zero_terminal_snr(base)
        return cls(base, prediction)

    @classmethod
    def flow(cls, shift: float = 1.0, multiplier: float = 1000.0, num_timesteps: int = 1000) -> ModelSampling:
        """A rectified-flow model with a constant shift (ComfyUI's ModelSamplingDiscreteFlow / ModelSamplingSD3).

        SD3/SD3.5: shift 3.0, multiplier 1000 (the MMDiT takes sigma * 1000); Flux-schnell: shift 1.0,
        multiplier 1 (the Flux network takes sigma itself); AuraFlow: shift 1.73, multiplier 1.
        """
        return cls(_flow_schedule(shift, multiplier, num_timesteps), Prediction.FLOW)

    @classmethod
    def flux(cls, mu: float = 1.15, multiplier: float = 1.0) -> ModelSampling:
        """Flux's resolution-dependent shift (ComfyUI's ModelSamplingFlux): shift e^mu on a 10,000-entry table.

        mu: see :func:`.schedules.flux_mu` (1.15 at 1024x1024, Flux-dev's default). multiplier 1:
        the Flux network takes sigma itself and scales it by 1000 inside.
        """
        return cls(_flow_schedule(math.exp(mu), multiplier, FLUX_TIMESTEPS), Prediction.FLOW)

    @classmethod
    def continuous(cls, prediction: Prediction | str, sigma_min: float = 0.002, sigma_max: float = 120.0,
                   sigma_data: float = 1.0) -> ModelSampling:
        """A model trained on continuous noise levels in [sigma_min, sigma_max] (ComfyUI's
        ModelSamplingContinuousEDM): CosXL is v with sigma_data 1 on 0.002..120; EDM-trained models
        predict edm with sigma_data 0.5."""
        prediction = Prediction(prediction)
        if prediction not in (Prediction.EPS, Prediction.V, Prediction.EDM):
            raise ModelSamplingError(f"a continuous-time model predicts eps, v or edm, not {prediction.value!r}")
        if not sigma_data > 0:
            raise ModelSamplingError(f"sigma_data must be > 0, got {sigma_data}")
        try:
            schedule = ContinuousSchedule(sigma_min, sigma_max)
        except ValueError as error:
            raise ModelSamplingError(str(error)) from None
        return cls(schedule, prediction, sigma_data)

    @property
    def noise_form(self) -> NoiseForm:
        """How the samplers see this model's noisy samples (VE, or FLOW for a flow prediction)."""
        return NoiseForm.FLOW if self.prediction is Prediction.FLOW else NoiseForm.VE

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def timestep(self, sigma: Tensor) -> Tensor:
        """sigma: (B,) -> the network's timesteps (B,) in float32."""
        return self.schedule.sigma_to_t(sigma.detach().cpu()).to(torch.float32)

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress (0 = start, 1 = end) -> the sigma of that point of the training schedule."""
        return self.schedule.percent_to_sigma(percent)

    def input_scale(self, sigma: Tensor) -> Tensor:
        """c_in, the factor on x before the network: (B,) -> (B,). Flow models take x unscaled."""
        if self.prediction is Prediction.FLOW:
            return torch.ones_like(sigma)
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def denoised(self, x: Tensor, sigma: Tensor, output: Tensor) -> Tensor:
        """x, output: (B, C, H, W); sigma: (B,) -> the denoised estimate (B, C, H, W)."""
        s = _per_sample(sigma, x)
        if self.prediction in (Prediction.V, Prediction.EDM):
            # c_skip = sd^2 / (sigma^2 + sd^2), c_out = -+ sigma * sd / sqrt(sigma^2 + sd^2) (sd = sigma_data).
            data = self.sigma_data**2
            sign = -1.0 if self.prediction is Prediction.V else 1.0
            return x * data / (s**2 + data) + sign * output * s * self.sigma_data / (s**2 + data).sqrt()
        if self.prediction is Prediction.X0:
            return output
        # eps: x = x0 + s * eps; flow: x = (1 - s) * x0 + s * noise with v = noise - x0. Both: x0 = x - s * output.
        x0 = x - s * output
        if self.prediction is Prediction.LCM:
            c_skip, c_out = lcm_boundary_scalings(self.timestep(torch.as_tensor(sigma).reshape(-1)))
            # x here is the VE-form sample, as ComfyUI applies the condition (diffusers: the VP-form one).
            return _per_sample(c_out, x) * x0 + _per_sample(c_skip, x) * x
        return x0

    def noise_latent(self, latent: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
        """The noisy sample at sigma for a latent (same shape): latent + sigma * noise, or for a flow
        model (1 - sigma) * latent + sigma * noise. sigma: a scalar or (B,)."""
        return self.noise_form.noisy(latent, noise, sigma)

    def latent_from_noisy(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The inverse scaling of :meth:`noise_latent` for a sample that keeps its noise (same shape):
        x itself, or for a flow model x / (1 - sigma), so that noise_latent(result, 0, sigma) == x.
        A sampling run that stops at sigma > 0 hands its result on in this form."""
        return latent_from_noisy(self.noise_form, x, sigma)

    def denoiser(self, raw: RawModel) -> Denoiser:
        """Wrap a raw model (scaled input, timesteps) into `model(x, sigma) -> denoised`."""

        def model(x: Tensor, sigma: Tensor) -> Tensor:
            c_in = self.input_scale(sigma).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            output = raw(x * c_in, self.timestep(sigma).to(x.device))
            return self.denoised(x, sigma, output.to(x.dtype))

        return model


def lcm_boundary_scalings(timestep: Tensor) -> tuple[Tensor, Tensor]:
    """LCM's (c_skip, c_out) at timesteps t (any shape): with u = t * LCM_TIMESTEP_SCALING and
    sigma_data = LCM_SIGMA_DATA, c_skip = sigma_data^2 / (u^2 + sigma_data^2) and
    c_out = u / sqrt(u^2 + sigma_data^2), so c_skip(0) = 1 and c_out(0) = 0."""
    u = timestep * LCM_TIMESTEP_SCALING
    denominator = u**2 + LCM_SIGMA_DATA**2
    return LCM_SIGMA_DATA**2 / denominator, u / denominator.sqrt()


def learned_sigma_prediction(output: Tensor, channels: int) -> Tensor:
    """The prediction of a learned-sigma network (DiT, PixArt-α/Σ): output (B, 2 * channels, H, W),
    the eps first, then the interpolation between improved DDPM's posterior-variance bounds, which
    only an ancestral sampler with learned variances reads -> (B, channels, H, W)."""
    if output.ndim != 4 or output.shape[1] != 2 * channels:
        raise ModelSamplingError(
            f"a learned-sigma output has 2 x {channels} channels (eps, then the variance), got {tuple(output.shape)}"
        )
    return output[:, :channels]


def _flow_schedule(shift: float, multiplier: float, num_timesteps: int) -> FlowSchedule:
    try:
        return FlowSchedule(shift, multiplier, num_timesteps)
    except ValueError as error:
        raise ModelSamplingError(str(error)) from None


def latent_from_noisy(noise_form: NoiseForm, x: Tensor, sigma: float | Tensor) -> Tensor:
    """x / alpha(sigma): a noisy sample in the form latents are handed on in (see ModelSampling.latent_from_noisy)."""
    s = _per_sample(sigma, x)
    return x / noise_form.alpha(s)


def masked_denoiser(model: Denoiser, latent: Tensor, noise: Tensor, mask: Tensor,
                    noise_form: NoiseForm = NoiseForm.VE) -> Denoiser:
    """Keep the unmasked part of `latent` fixed while sampling (inpainting with a noise mask).

    latent, noise: (B, C, H, W); mask: (B, 1, H, W) in [0, 1], 1 = repaint. Before each model call
    the unmasked region of x is replaced by the original latent noised to the current sigma (in the
    model's noise form), and the denoised estimate there is the original latent itself, so every
    step's estimate (and the final sample, see :func:`apply_noise_mask`) equals the input outside
    the mask.
    """

    def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
        x = x * mask + noise_form.noisy(latent, noise, sigma) * (1.0 - mask)
        return model(x, sigma) * mask + latent * (1.0 - mask)

    return wrapped


def apply_noise_mask(sample: Tensor, latent: Tensor, mask: Tensor) -> Tensor:
    """sample, latent: (B, C, H, W); mask (B, 1, H, W) -> sample inside the mask, latent outside."""
    return sample * mask + latent * (1.0 - mask)
