"""Cheap latent -> RGB previews for progress reports: a linear map fitted to a VAE once, no decode per preview.

A VAE's latent channels mix colour linearly enough that a least-squares fit of decoded colour on
the latent channels (plus a bias) previews any latent width in its true colours. The fit runs
once per VAE, on latents of a few synthetic images (flat colour blocks and smooth colour fields)
encoded by that VAE, against what its decoder makes of them, and is cached for the VAE object.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .autoencoder import AutoencoderKL, LatentScaling

logger = logging.getLogger(__name__)

# The fit: this many synthetic images of this many latent cells a side (3 x 12 x 12 = 432 cells for
# 5 or 17 unknowns per colour); three 96x96 images through a full-size SD VAE, a few seconds on a CPU.
FIT_IMAGES = 3
FIT_CELLS = 12


@dataclass(frozen=True)
class LatentColours:
    """A linear map from latents to RGB in [-1, 1]: rgb = sum_c latent[c] * weight[c] + bias.

    weight: (C, 3); bias: (3,).
    """

    weight: Tensor
    bias: Tensor

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def for_scaling(self, scaling: LatentScaling) -> LatentColours:
        """The map for diffusion latents d = (z - shift) * scale, from this map on raw VAE latents z."""
        # z = d / scale + shift, so rgb = d . (W / scale) + (b + shift * sum_c W[c])
        return LatentColours(self.weight / scaling.scaling_factor,
                             self.bias + scaling.shift_factor * self.weight.sum(dim=0))

    def to_rgb(self, latent: Tensor) -> Tensor:
        """latent: (C, h, w) -> (h, w, 3) RGB in [0, 1]."""
        if latent.shape[0] != self.channels:
            raise ValueError(f"a preview map for {self.channels} latent channels cannot show a "
                             f"{latent.shape[0]}-channel latent")
        rgb = torch.einsum("chw,cr->hwr", latent.float().cpu(), self.weight.float()) + self.bias.float()
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def _fitting_images(count: int, size: int, generator: torch.Generator, blocks: int = 3) -> Tensor:
    """(count, 3, size, size) in [-1, 1], in turn: a blocks x blocks grid of flat colours, the same
    with saturated colours (corners of the RGB cube), and a smooth colour field. Blocks several
    latent cells wide keep most cells inside one colour, away from the decoder's blur at edges."""
    images = []
    for i in range(count):
        if i % 3 < 2:
            grid = torch.rand(1, 3, blocks, blocks, generator=generator)
            grid = grid * 2 - 1 if i % 3 == 0 else (grid > 0.5).float() * 2 - 1
            images.append(F.interpolate(grid, size=(size, size), mode="nearest")[0])
        else:
            corners = torch.rand(1, 3, 3, 3, generator=generator) * 2 - 1
            images.append(F.interpolate(corners, size=(size, size), mode="bilinear", align_corners=True)[0])
    return torch.stack(images)


@torch.no_grad()
def fit_latent_colours(vae: AutoencoderKL, images: int = FIT_IMAGES, cells: int = FIT_CELLS,
                       seed: int = 0) -> LatentColours:
    """Least-squares map from this VAE's raw latents to the colour its decoder produces.

    Synthetic images are encoded (posterior mean) and decoded again; each latent cell's channels are
    regressed on the mean colour of the decoded pixels it covers. Returns the map on raw VAE
    latents; :meth:`LatentColours.for_scaling` turns it into one on diffusion latents.
    """
    f = vae.config.downscale_factor
    parameter = next(vae.parameters())
    generator = torch.Generator().manual_seed(seed)
    pixels = _fitting_images(images, cells * f, generator).to(parameter.device, parameter.dtype)
    latents = vae.encode(pixels).mean
    decoded = vae.decode(latents).float().clamp(-1.0, 1.0)
    targets = F.avg_pool2d(decoded, f).permute(0, 2, 3, 1).reshape(-1, 3).cpu().double()
    inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu().double()
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution
    residual = (design @ solution - targets).abs().mean().item()
    logger.debug("latent preview fit: %d channels, mean abs colour error %.4f", inputs.shape[1], residual)
    return LatentColours(solution[:-1].float(), solution[-1].float())


_FITS: weakref.WeakKeyDictionary[AutoencoderKL, LatentColours] = weakref.WeakKeyDictionary()
_FITS_LOCK = threading.Lock()


def latent_colours(vae: AutoencoderKL, scaling: LatentScaling | None = None) -> LatentColours:
    """The preview map of a VAE for diffusion latents of the given scaling (default: the VAE config's).

    Fitted on first use and kept for as long as the VAE object lives; a VAE whose weights change in
    place afterwards keeps the old map.
    """
    with _FITS_LOCK:
        raw = _FITS.get(vae)
        if raw is None:
            raw = fit_latent_colours(vae)
            _FITS[vae] = raw
    return raw.for_scaling(scaling if scaling is not None else vae.config.latent_scaling)


def neutral_rgb(latent: Tensor) -> Tensor:
    """latent: (C, h, w) -> (h, w, 3) in [0, 1] without colour knowledge: the first three channels
    (fewer repeated), each standardised over the image. Shows structure, not true colours."""
    channels = latent.float().cpu()[:3]
    channels = channels[torch.arange(3) % channels.shape[0]]
    mean = channels.mean(dim=(1, 2), keepdim=True)
    std = channels.std(dim=(1, 2), keepdim=True).clamp_min(1e-6) if channels[0].numel() > 1 else 1.0
    return ((channels - mean) / (4.0 * std) + 0.5).clamp(0.0, 1.0).permute(1, 2, 0)


def preview_image(latent: Tensor, colours: LatentColours | None = None, max_size: int = 256) -> Image.Image:
    """The first latent of a batch (B, C, h, w) as a small PIL RGB image (upscaled to at most max_size).

    colours: the map of the VAE that will decode these latents (:func:`latent_colours`); None (no
    VAE at hand) gives :func:`neutral_rgb`.
    """
    first = latent[0].detach().cpu()
    rgb = neutral_rgb(first) if colours is None else colours.to_rgb(first)
    image = Image.fromarray((rgb.numpy() * 255.0).round().astype("uint8"), "RGB")
    scale = max(1, min(8, max_size // max(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
