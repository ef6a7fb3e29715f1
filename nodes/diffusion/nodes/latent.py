"""Latent nodes: empty latents, resizing, compositing, batches, noise masks, and VAE encode/decode."""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import IMAGE, LATENT, MASK, MODEL, VAE

from ..components import DiffusionModel, Latent, VAEModel
from ..imaging import bislerp
from .common import InputError
from .images import as_mask, check_mask_size

# bislerp: bilinear, with neighbouring latent vectors blended by slerp (imaging.bislerp).
UpscaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
_SIZE = dict(ge=16, le=16384)


def _resize(samples: torch.Tensor, height: int, width: int, method: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width)."""
    if method == "bislerp":
        return bislerp(samples, height, width)
    align = {"bilinear": False, "bicubic": False}.get(method)
    return F.interpolate(samples, size=(height, width), mode=method, align_corners=align)


def _center_crop(samples: torch.Tensor, aspect: float) -> torch.Tensor:
    """Crop (B, C, h, w) around its centre to the aspect ratio width / height."""
    h, w = samples.shape[-2:]
    if w / h > aspect:
        new_w = max(1, round(h * aspect))
        left = (w - new_w) // 2
        return samples[..., left: left + new_w]
    new_h = max(1, round(w / aspect))
    top = (h - new_h) // 2
    return samples[..., top: top + new_h, :]


def _vae(value: object) -> VAEModel:
    if value is None:
        raise InputError("vae", "this checkpoint has no VAE; load one with LoadVAE")
    return value  # type: ignore[return-value]


def _check_multiple(name: str, value: int, factor: int) -> None:
    if value % factor:
        raise InputError(name, f"{value} is not a multiple of the model's downscale factor {factor}")


class EmptyLatent(Node):
    """An all-zero latent batch to start text-to-image from, shaped for the model's latent space."""

    category = "latent"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        width: int = Field(512, **_SIZE, description="Image width in pixels (a multiple of the model's factor).")
        height: int = Field(512, **_SIZE, description="Image height in pixels.")
        batch_size: int = Field(1, ge=1, le=4096)

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    @classmethod
    def estimated_bytes(cls, inputs: Mapping[str, Any]) -> int | None:
        """The latent's float32 bytes: exact once the model (its latent format) is known; before,
        at validation, at least SD's 4 channels per 8 x 8 pixels, which no known format goes below."""
        if not all(isinstance(inputs.get(name), int) for name in ("width", "height", "batch_size")):
            return None  # a size arrives by link: checked when it is known
        fmt = getattr(inputs.get("model"), "latent_format", None)
        values_per_pixel = 4 / 64 if fmt is None else fmt.channels / fmt.downscale_factor**2
        return int(inputs["batch_size"] * inputs["height"] * inputs["width"] * values_per_pixel * 4)

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        fmt = model.latent_format
        _check_multiple("width", inputs.width, fmt.downscale_factor)
        _check_multiple("height", inputs.height, fmt.downscale_factor)
        shape = (inputs.batch_size, fmt.channels, inputs.height // fmt.downscale_factor,
                 inputs.width // fmt.downscale_factor)
        return self.Outputs(latent=Latent(torch.zeros(shape), fmt.downscale_factor))


class LatentUpscale(Node):
    """Resize latents to an image size (for a second, higher-resolution pass)."""

    category = "latent"

    class Inputs(NodeInputs):
        latent: LATENT.annotation
        width: int = Field(1024, **_SIZE)
        height: int = Field(1024, **_SIZE)
        method: UpscaleMethod = "nearest-exact"
        crop: Literal["disabled", "center"] = Field("disabled", description="Crop to the new aspect ratio first.")

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        latent: Latent = inputs.latent
        f = latent.downscale_factor
        _check_multiple("width", inputs.width, f)
        _check_multiple("height", inputs.height, f)
        samples = latent.samples
        if inputs.crop == "center":
            samples = _center_crop(samples, inputs.width / inputs.height)
        return self.Outputs(latent=latent.with_(samples=_resize(samples, inputs.height // f, inputs.width // f,
                                                                inputs.method)))


class LatentUpscaleBy(Node):
    """Resize latents by a factor."""

    category = "latent"

    class Inputs(NodeInputs):
        latent: LATENT.annotation
        scale_by: float = Field(1.5, gt=0.0, le=8.0)
        method: UpscaleMethod = "nearest-exact"

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        latent: Latent = inputs.latent
        h, w = latent.samples.shape[-2:]
        size = (max(1, round(h * inputs.scale_by)), max(1, round(w * inputs.scale_by)))
        return self.Outputs(latent=latent.with_(samples=_resize(latent.samples, *size, inputs.method)))


class LatentComposite(Node):
    """Paste `source` into `destination` at (x, y) pixels, optionally feathering its edges."""

    category = "latent"

    class Inputs(NodeInputs):
        destination: LATENT.annotation
        source: LATENT.annotation
        x: int = Field(0, ge=0, le=16384)
        y: int = Field(0, ge=0, le=16384)
        feather: int = Field(0, ge=0, le=16384, description="Width of the blended edge, in pixels.")

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        dest: Latent = inputs.destination
        src: Latent = inputs.source
        f = dest.downscale_factor
        out = dest.samples.clone()
        top, left = inputs.y // f, inputs.x // f
        if top >= out.shape[-2] or left >= out.shape[-1]:
            raise InputError("x", f"({inputs.x}, {inputs.y}) lies outside the destination "
                                  f"({dest.pixel_size[1]}x{dest.pixel_size[0]} pixels)")
        if src.samples.shape[1] != out.shape[1]:
            raise InputError("source", f"{src.samples.shape[1]} latent channels, destination has {out.shape[1]}")
        h = min(src.samples.shape[-2], out.shape[-2] - top)
        w = min(src.samples.shape[-1], out.shape[-1] - left)
        piece = src.samples[..., :h, :w]
        if piece.shape[0] != out.shape[0]:
            piece = piece[:1].expand(out.shape[0], -1, -1, -1)
        weight = torch.ones((1, 1, h, w))
        feather = inputs.feather // f
        for i in range(feather):
            ramp = (i + 1) / (feather + 1)
            # Edges that touch the destination's border are not feathered: nothing to blend with there.
            if top > 0:
                weight[..., i, :] = torch.minimum(weight[..., i, :], torch.tensor(ramp))
            if top + h < out.shape[-2]:
                weight[..., h - 1 - i, :] = torch.minimum(weight[..., h - 1 - i, :], torch.tensor(ramp))
            if left > 0:
                weight[..., :, i] = torch.minimum(weight[..., :, i], torch.tensor(ramp))
            if left + w < out.shape[-1]:
                weight[..., :, w - 1 - i] = torch.minimum(weight[..., :, w - 1 - i], torch.tensor(ramp))
        region = out[..., top: top + h, left: left + w]
        out[..., top: top + h, left: left + w] = piece * weight + region * (1 - weight)
        return self.Outputs(latent=dest.with_(samples=out))


class LatentFromBatch(Node):
    """Take `length` latents of a batch starting at `batch_index`."""

    category = "latent"

    class Inputs(NodeInputs):
        latent: LATENT.annotation
        batch_index: int = Field(0, ge=0, le=4095)
        length: int = Field(1, ge=1, le=4096)

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        latent: Latent = inputs.latent
        batch = latent.samples.shape[0]
        if inputs.batch_index >= batch:
            raise InputError("batch_index", f"{inputs.batch_index} is past the end of a batch of {batch}")
        end = min(batch, inputs.batch_index + inputs.length)
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] == batch:
            mask = mask[inputs.batch_index: end]
        return self.Outputs(latent=latent.with_(samples=latent.samples[inputs.batch_index: end].clone(),
                                                noise_mask=mask))


class RepeatLatentBatch(Node):
    """Repeat a latent batch `amount` times."""

    category = "latent"

    class Inputs(NodeInputs):
        latent: LATENT.annotation
        amount: int = Field(1, ge=1, le=64)

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        latent: Latent = inputs.latent
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask.repeat(inputs.amount, 1, 1, 1)
        return self.Outputs(latent=latent.with_(samples=latent.samples.repeat(inputs.amount, 1, 1, 1), noise_mask=mask))


class SetLatentNoiseMask(Node):
    """Only the masked part of the latent is resampled; the rest stays as it is (inpainting)."""

    category = "latent"

    class Inputs(NodeInputs):
        latent: LATENT.annotation
        mask: MASK.annotation

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        latent: Latent = inputs.latent
        mask = as_mask(inputs.mask)
        check_mask_size(mask, *latent.pixel_size, "latent's image")
        mask = mask[:, None]
        return self.Outputs(latent=latent.with_(noise_mask=mask))


class VAEDecode(Node):
    """Decode latents to images."""

    category = "latent"

    class Inputs(NodeInputs):
        vae: VAE.annotation
        latent: LATENT.annotation

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        vae = _vae(inputs.vae)
        if inputs.latent.samples.shape[1] != vae.latent_format.channels:
            raise InputError("latent", f"{inputs.latent.samples.shape[1]} latent channels; this VAE decodes "
                                       f"{vae.latent_format.channels}")
        return self.Outputs(image=vae.decode(inputs.latent.samples))


class VAEDecodeTiled(Node):
    """Decode latents to images a tile at a time (large images in little memory)."""

    category = "latent"

    class Inputs(NodeInputs):
        vae: VAE.annotation
        latent: LATENT.annotation
        tile_size: int = Field(512, ge=64, le=4096, multiple_of=32)
        overlap: int = Field(64, ge=0, le=4096, multiple_of=8)

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.overlap >= inputs.tile_size:
            raise InputError("overlap", f"{inputs.overlap} must be smaller than tile_size {inputs.tile_size}")
        return self.Outputs(image=_vae(inputs.vae).decode(inputs.latent.samples, inputs.tile_size, inputs.overlap))


def _encodable(image: torch.Tensor, factor: int, ctx: RunContext) -> torch.Tensor:
    """Crop an image batch (B, H, W, 3) to multiples of the VAE factor, centred."""
    h, w = image.shape[1:3]
    new_h, new_w = h - h % factor, w - w % factor
    if new_h == 0 or new_w == 0:
        raise InputError("image", f"{w}x{h} is smaller than the VAE's factor {factor}")
    if (new_h, new_w) != (h, w):
        ctx.log.info("cropping %dx%d to %dx%d (a multiple of %d) for encoding", w, h, new_w, new_h, factor)
        top, left = (h - new_h) // 2, (w - new_w) // 2
        image = image[:, top: top + new_h, left: left + new_w]
    return image


class VAEEncode(Node):
    """Encode images to latents (img2img). Sizes that are not multiples of the VAE's factor are cropped."""

    category = "latent"

    class Inputs(NodeInputs):
        vae: VAE.annotation
        image: IMAGE.annotation

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        vae = _vae(inputs.vae)
        image = _encodable(inputs.image, vae.downscale_factor, ctx)
        return self.Outputs(latent=Latent(vae.encode(image), vae.downscale_factor))


class VAEEncodeTiled(Node):
    """Encode images to latents a tile at a time."""

    category = "latent"

    class Inputs(NodeInputs):
        vae: VAE.annotation
        image: IMAGE.annotation
        tile_size: int = Field(512, ge=64, le=4096, multiple_of=32)
        overlap: int = Field(64, ge=0, le=4096, multiple_of=8)

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.overlap >= inputs.tile_size:
            raise InputError("overlap", f"{inputs.overlap} must be smaller than tile_size {inputs.tile_size}")
        vae = _vae(inputs.vae)
        image = _encodable(inputs.image, vae.downscale_factor, ctx)
        return self.Outputs(latent=Latent(vae.encode(image, inputs.tile_size, inputs.overlap), vae.downscale_factor))


class VAEEncodeForInpaint(Node):
    """Encode an image for inpainting: the masked area is blanked to grey before encoding and becomes
    the latent's noise mask (grown by `grow_mask_by` pixels so the seam is resampled too)."""

    category = "latent"

    class Inputs(NodeInputs):
        vae: VAE.annotation
        image: IMAGE.annotation
        mask: MASK.annotation
        grow_mask_by: int = Field(6, ge=0, le=64)

    class Outputs(NodeOutputs):
        latent: LATENT.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        vae = _vae(inputs.vae)
        image, mask = inputs.image, as_mask(inputs.mask)
        check_mask_size(mask, image.shape[1], image.shape[2], "image")
        if inputs.grow_mask_by:
            k = 2 * inputs.grow_mask_by + 1
            mask = F.max_pool2d(mask[:, None], kernel_size=k, stride=1, padding=inputs.grow_mask_by)[:, 0]
        image = _encodable(image, vae.downscale_factor, ctx)
        mask = _encodable(mask[..., None], vae.downscale_factor, ctx)[..., 0]
        hard = (mask > 0.5).float()
        blanked = image * (1 - hard[..., None]) + 0.5 * hard[..., None]
        return self.Outputs(latent=Latent(vae.encode(blanked), vae.downscale_factor, noise_mask=hard[:, None]))


NODES = [EmptyLatent, LatentUpscale, LatentUpscaleBy, LatentComposite, LatentFromBatch, RepeatLatentBatch,
         SetLatentNoiseMask, VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeTiled, VAEEncodeForInpaint]
