"""Cheap latent -> RGB previews for progress reports: a per-family linear map, no VAE decode."""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

# Least-squares fits of RGB (in [-1, 1]) on the four latent channels, published with the SD
# latent spaces (one row per latent channel, then a bias per colour).
_SD1_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
_SDXL_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

LATENT_RGB: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "sd1": (_SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sd2": (_SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
}


def latent_to_rgb(latent: Tensor, family: str) -> Tensor:
    """latent: (C, h, w) diffusion latents -> (h, w, 3) approximate RGB in [0, 1]."""
    factors, bias = LATENT_RGB.get(family, LATENT_RGB["sd1"])
    weight = torch.tensor(factors, dtype=torch.float32)
    if latent.shape[0] != weight.shape[0]:
        # Another latent width: show the first three channels as a rough picture.
        rgb = latent[:3].float().permute(1, 2, 0)
    else:
        rgb = torch.einsum("chw,cr->hwr", latent.float().cpu(), weight) + torch.tensor(bias)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def preview_image(latent: Tensor, family: str, max_size: int = 256) -> Image.Image:
    """The first latent of a batch (B, C, h, w) as a small PIL RGB image (upscaled to at most max_size)."""
    rgb = latent_to_rgb(latent[0].detach().cpu(), family)
    image = Image.fromarray((rgb.numpy() * 255.0).round().astype("uint8"), "RGB")
    scale = max(1, min(8, max_size // max(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
