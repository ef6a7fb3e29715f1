"""Extra input channels of image-conditioned denoisers, concatenated to the noisy latent before each call.

Three kinds, told from the network's input and output channels (:func:`image_input`):

- plain models: input channels = output channels, nothing is added;
- image edit/structure models, input = 2 x output: an image's latent beside the noisy one.
  InstructPix2Pix (SD1.5) and diffusers-style SDXL edit U-Nets take the VAE's latent unscaled (the
  encoder's mean, as their training pipelines did); CosXL edit (a continuous-time SDXL) and Flux.1
  Canny/Depth take it in the model's (scaled and shifted) latent space. With no image, an all-zero
  VAE latent in that space is used.
- inpainting models: the mask and the masked image's latent. SD inpainting U-Nets (input =
  2 x output + 1) take [mask (1 channel, rounded to 0/1), image latent]; Flux.1 Fill (input =
  2 x output + f^2 for a VAE of downscale factor f, 16 + 16 + 64 channels) takes [image latent,
  the pixel-resolution mask folded into f x f channels per latent cell] (channel dy * f + dx holds
  pixel (f * row + dy, f * col + dx)), unrounded. Without a mask the whole image is repainted.

The mask and image come from the conditioning (InpaintModelConditioning, InstructPixToPixConditioning:
:attr:`.guidance.CondEntry.concat_latent` / ``concat_mask``); where it has none, from the latent being
sampled (its noise mask, and for an SD inpainting U-Net its samples), as ComfyUI does.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from ..networks.flux import FluxConfig
from ..networks.unet import UNetConfig


class ConcatError(ValueError):
    """An image input that does not fit the model or the latent (names what was expected)."""


class ImageInput(str, Enum):
    """What a denoiser takes beside the noisy latent."""

    NONE = "none"
    IMAGE = "image"  # an image's latent: InstructPix2Pix, SDXL edit, Flux.1 Canny/Depth
    INPAINT = "inpaint"  # a mask and the masked image's latent: SD inpainting, Flux.1 Fill


def classify_image_input(in_channels: int, out_channels: int, mask_channels: int) -> ImageInput:
    """The kind of a denoiser with these (unpacked) input and output channels; `mask_channels`: how
    many channels the family's inpainting variant gives its mask (SD U-Nets 1, Flux f x f = 64).
    Raises ConcatError for a channel count no known variant has."""
    extra = in_channels - out_channels
    if extra == 0:
        return ImageInput.NONE
    if extra == out_channels:
        return ImageInput.IMAGE
    if extra == out_channels + mask_channels:
        return ImageInput.INPAINT
    raise ConcatError(f"a denoiser taking {in_channels} input channels for {out_channels} output channels is no "
                      f"known variant (plain: {out_channels}, image-conditioned: {2 * out_channels}, inpainting: "
                      f"{2 * out_channels + mask_channels})")


# Flux.1 Fill folds the 8 x 8 pixels of each latent cell of its f8 VAE into channels.
FLUX_FILL_MASK_CHANNELS = 64


def image_input(config: object) -> ImageInput:
    """The kind of image input of a network with this config (U-Net or Flux; other families take none)."""
    if isinstance(config, UNetConfig):
        return classify_image_input(config.in_channels, config.out_channels, 1)
    if isinstance(config, FluxConfig):
        return classify_image_input(config.in_channels, config.out_channels, FLUX_FILL_MASK_CHANNELS)
    return ImageInput.NONE


def fit_center(t: Tensor, height: int, width: int) -> Tensor:
    """t: (B, C, h, w) cropped around its centre to the aspect ratio width / height, then resized
    bilinearly to (B, C, height, width) (ComfyUI's common_upscale with crop "center")."""
    old_h, old_w = t.shape[-2:]
    if (old_h, old_w) == (height, width):
        return t
    old_aspect, new_aspect = old_w / old_h, width / height
    top = left = 0
    if old_aspect > new_aspect:
        left = round((old_w - old_w * new_aspect / old_aspect) / 2)
    elif old_aspect < new_aspect:
        top = round((old_h - old_h * old_aspect / new_aspect) / 2)
    t = t[..., top: old_h - top, left: old_w - left]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)


def to_batch(t: Tensor, batch: int, what: str) -> Tensor:
    """t: (b, ...) repeated to (batch, ...); b must divide batch."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ConcatError(f"{what} batch {t.shape[0]} does not divide the latent batch {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


def _mask_planes(mask: Tensor) -> Tensor:
    """A mask (B, H, W), (B, 1, H, W) or (B, C, H, W) -> (B, 1, H, W), channels averaged."""
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4:
        raise ConcatError(f"a mask is (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    return mask.float().mean(dim=1, keepdim=True)


def fold_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask (B, 1, f*h, f*w) -> (B, f*f, h, w): channel dy * f + dx of cell (row, col) holds
    pixel (f * row + dy, f * col + dx) (Flux.1 Fill's mask input)."""
    batch, _, height, width = mask.shape
    h, w = height // factor, width // factor
    cells = mask.reshape(batch, h, factor, w, factor).permute(0, 2, 4, 1, 3)
    return cells.reshape(batch, factor * factor, h, w)


def concat_channels(
    config: object,
    latent: Tensor,
    *,
    image_latent: Tensor | None,
    mask: Tensor | None,
    noise_mask: Tensor | None = None,
    scaling: tuple[float, float],
    downscale: int,
    scaled_image: bool = False,
) -> Tensor | None:
    """The extra input channels (B, K, h, w) of a network for one conditioning entry, or None for a
    plain network.

    latent: (B, C, h, w) the latent being sampled (diffusion space); image_latent: (b, C, h', w')
    the conditioning image's latent in diffusion space, or None; mask: (b, 1, H, W) / (b, H, W) in
    [0, 1] at any resolution (1 = repaint), or None; both from the conditioning entry. noise_mask:
    the sampled latent's noise mask (same forms), the mask where the entry has none; scaling: the
    model's latent (scaling_factor, shift_factor), diffusion = (vae - shift) * scaling; downscale:
    image pixels per latent cell;
    scaled_image: a U-Net edit model takes the image latent scaled (CosXL edit), not unscaled.
    Image latents and masks of another size are centre-cropped and resized to the latent's.
    """
    kind = image_input(config)
    if kind is ImageInput.NONE:
        if image_latent is not None or mask is not None:
            raise ConcatError("this model takes no image beside the latent (its input has as many channels as its "
                              "output); image and mask inputs are for InstructPix2Pix/edit, Flux Canny/Depth and "
                              "inpainting models (Flux Depth/Canny LoRAs that widen the input are not supported)")
        return None
    if mask is None:
        mask = noise_mask
    batch, channels, height, width = latent.shape
    scale, shift = scaling
    flux = isinstance(config, FluxConfig)
    if image_latent is not None and image_latent.shape[1] != channels:
        raise ConcatError(f"the image latent has {image_latent.shape[1]} channels; this model's latents have {channels}"
                          " (encode the image with the model's VAE)")
    if image_latent is not None:
        image = to_batch(fit_center(image_latent.float(), height, width), batch, "image")
    elif kind is ImageInput.IMAGE or flux:
        # No image: an all-zero VAE latent, in the space the model takes it in.
        image = torch.full_like(latent, -shift * scale)
    else:
        image = None
    if kind is ImageInput.IMAGE:
        assert image is not None
        # InstructPix2Pix-style U-Nets were trained on the VAE's unscaled latent; Flux on its model-space one.
        return image if flux or scaled_image else image / scale + shift
    if flux:
        assert image is not None
        if downscale * downscale != FLUX_FILL_MASK_CHANNELS:
            raise ConcatError(f"Flux Fill folds 8 x 8 pixels per latent cell; this VAE's factor is {downscale}")
        pixels = torch.ones(batch, 1, height * downscale, width * downscale) if mask is None else \
            fit_center(_mask_planes(mask), height * downscale, width * downscale)
        return torch.cat([image, to_batch(fold_mask(pixels, downscale), batch, "mask")], dim=1)
    # SD inpainting U-Net: the mask at latent resolution, rounded, then the (masked) image's latent.
    if mask is None:
        return torch.cat([torch.ones(batch, 1, height, width), torch.zeros_like(latent)], dim=1)
    cells = to_batch(fit_center(_mask_planes(mask), height, width).round(), batch, "mask")
    return torch.cat([cells, latent.float() if image is None else image], dim=1)
