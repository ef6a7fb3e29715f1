"""A small library-level txt2img loop for measuring the trained models as the product would run them.

Euler on the "normal" SD schedule with classifier-free guidance, driven through the diffusion
pack's own denoiser wrapper (:class:`~nodegraph_diffusion.sampling.model_sampling.ModelSampling`: c_in scaling,
sigma -> fractional timestep), then the VAE decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nodegraph_diffusion.sampling.model_sampling import Prediction
from nodegraph_diffusion.networks.controlnet import ControlNet
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.sampling.samplers import sample_euler
from nodegraph_diffusion.sampling.schedules import sigmas_normal
from nodegraph_diffusion.text.clip import CLIPTextEncoder
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.vae.autoencoder import AutoencoderKL

from .architecture import PromptEncoder

DEFAULT_STEPS = 20
DEFAULT_CFG = 5.0


@dataclass
class TinyModel:
    """The three parts of a text-to-image model, plus an optional ControlNet and its hint strength."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    controlnet: ControlNet | None = None
    control_strength: float = 1.0


def generate(
    model: TinyModel,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    negative: str = "",
    hints: Tensor | None = None,
    prompt_encoder: PromptEncoder | None = None,
) -> np.ndarray:
    """Sample one image per (prompt, seed): (B, 64, 64, 3) uint8.

    The initial noise of each row is drawn from its own seed (CPU generator), as a node would.
    hints: (B, 3, 64, 64) ControlNet control images in [0, 1], used when ``model.controlnet`` is set.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    encoder = prompt_encoder or PromptEncoder()
    sampling = ModelSampling.for_prediction(Prediction.EPS)
    dtype = next(model.unet.parameters()).dtype
    with torch.no_grad():
        cond = encoder.encode(model.text_encoder, encoder.ids(prompts)).to(dtype)
        uncond = encoder.encode(model.text_encoder, encoder.ids([negative] * len(prompts))).to(dtype)
        context = torch.cat([cond, uncond])
        hint = None if hints is None else torch.cat([hints, hints]).to(dtype)

        def raw(x_in: Tensor, t: Tensor) -> Tensor:
            control = None
            if model.controlnet is not None:
                if hint is None:
                    raise ValueError("a ControlNet model needs hints")
                control = model.controlnet(x_in, hint, t, context)
                if model.control_strength != 1.0:
                    control = type(control)([d * model.control_strength for d in control.down],
                                            control.middle * model.control_strength)
            return model.unet(x_in, t, context, control=control)

        denoise_both = sampling.denoiser(raw)

        def guided(x: Tensor, sigma: Tensor) -> Tensor:
            both = denoise_both(torch.cat([x, x]), torch.cat([sigma, sigma]))
            positive, negative_out = both.chunk(2)
            return negative_out + cfg * (positive - negative_out)

        size = 64 // model.vae.config.downscale_factor
        noise = torch.cat([
            torch.randn((1, model.vae.config.latent_channels, size, size),
                        generator=torch.Generator().manual_seed(seed))
            for seed in seeds
        ]).to(dtype)
        sigmas = sigmas_normal(sampling.schedule, steps)
        latents = sample_euler(guided, noise * sigmas[0], sigmas)
        images = model.vae.decode(model.vae.latents_from_diffusion(latents.to(dtype)))
    return images_to_uint8(images)


def images_to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
