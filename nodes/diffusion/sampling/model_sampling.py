"""From a noise-predicting U-Net to the samplers' denoiser: scaling, prediction types, inpainting masks.

The samplers work in the variance-exploding form x = x0 + sigma * noise. An SD U-Net was trained
on the variance-preserving form, so its input is scaled by c_in = 1 / sqrt(sigma^2 + 1) and the
noise level is given as the (fractional) training timestep of sigma. Its output is an epsilon
(noise) or a v prediction, turned into the denoised estimate here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from torch import Tensor

from .schedules import DiscreteSchedule, sd_discrete_schedule
from .samplers import Denoiser


class Prediction(str, Enum):
    """What the network outputs: the noise (eps) or the velocity v = alpha * noise - sigma * x0."""

    EPS = "eps"
    V = "v"


# (x_in: (B, C, H, W), t: (B,)) -> raw model output (B, C, H, W); everything but the scaling.
RawModel = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ModelSampling:
    """How a discrete-time model is driven at a noise level sigma."""

    schedule: DiscreteSchedule
    prediction: Prediction = Prediction.EPS

    @classmethod
    def for_prediction(cls, prediction: Prediction | str) -> ModelSampling:
        """The SD1/SD2/SDXL training schedule with the given prediction type."""
        return cls(sd_discrete_schedule(), Prediction(prediction))

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def timestep(self, sigma: Tensor) -> Tensor:
        """sigma: (B,) -> fractional training timesteps (B,) in float32."""
        return self.schedule.sigma_to_t(sigma.detach().cpu()).to(torch.float32)

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress (0 = start, 1 = end) -> the sigma of that point of the training schedule."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        return float(self.schedule.t_to_sigma(torch.tensor((1.0 - percent) * (self.schedule.sigmas.numel() - 1))))

    @staticmethod
    def input_scale(sigma: Tensor) -> Tensor:
        """c_in: (B,) -> (B,)."""
        return 1.0 / (sigma**2 + 1.0).sqrt()

    def denoised(self, x: Tensor, sigma: Tensor, output: Tensor) -> Tensor:
        """x, output: (B, C, H, W); sigma: (B,) -> the denoised estimate (B, C, H, W)."""
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        if self.prediction is Prediction.EPS:
            return x - s * output
        # v prediction: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1) (sigma_data = 1).
        return x / (s**2 + 1.0) - output * s / (s**2 + 1.0).sqrt()

    def noise_latent(self, latent: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
        """The noisy input at sigma for a clean latent: latent + noise * sigma (same shape)."""
        return latent + noise * sigma

    def denoiser(self, raw: RawModel) -> Denoiser:
        """Wrap a raw model (scaled input, timesteps) into `model(x, sigma) -> denoised`."""

        def model(x: Tensor, sigma: Tensor) -> Tensor:
            c_in = self.input_scale(sigma).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            output = raw(x * c_in, self.timestep(sigma).to(x.device))
            return self.denoised(x, sigma, output.to(x.dtype))

        return model


def masked_denoiser(model: Denoiser, latent: Tensor, noise: Tensor, mask: Tensor) -> Denoiser:
    """Keep the unmasked part of `latent` fixed while sampling (inpainting with a noise mask).

    latent, noise: (B, C, H, W); mask: (B, 1, H, W) in [0, 1], 1 = repaint. Before each model call
    the unmasked region of x is replaced by the original latent noised to the current sigma, and
    the denoised estimate there is the original latent itself, so every step's estimate (and the
    final sample, see :func:`apply_noise_mask`) equals the input outside the mask.
    """

    def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x = x * mask + (latent + noise * s) * (1.0 - mask)
        return model(x, sigma) * mask + latent * (1.0 - mask)

    return wrapped


def apply_noise_mask(sample: Tensor, latent: Tensor, mask: Tensor) -> Tensor:
    """sample, latent: (B, C, H, W); mask (B, 1, H, W) -> sample inside the mask, latent outside."""
    return sample * mask + latent * (1.0 - mask)
