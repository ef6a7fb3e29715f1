"""Image nodes: load, save (also as animated WebP or PNG), preview, scale, pad for outpainting, find
edges, invert, batch and composite images and masks.

Conventions shared by the pack:
  IMAGE: float32 tensor (B, H, W, 3), values in [0, 1], on the CPU.
  MASK:  float32 tensor (B, H, W), values in [0, 1]; 1 marks the region to repaint.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin
from pydantic import Field

from nodegraph.files import atomic_write, write_numbered
from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import IMAGE, MASK, Choices

from .. import imaging
from . import folders
from .common import InputError, run_device

ResizeMethod = Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]
MaskChannel = Literal["alpha", "red", "green", "blue"]

PREVIEWS_FOLDER = "previews"
MAX_SIDE = 16384


# -- conversions and checks (used by other nodes of the pack too) --

def as_image(value: Any, input_name: str = "image") -> torch.Tensor:
    """`value` checked to be an IMAGE: returns it as float32 (B, H, W, 3) on the CPU."""
    if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[-1] != 3:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(input_name, f"expected an image batch of shape (B, H, W, 3), got {got}")
    return value.detach().to("cpu", torch.float32)


def as_mask(value: Any, input_name: str = "mask") -> torch.Tensor:
    """`value` checked to be a MASK: returns it as float32 (B, H, W) on the CPU ((H, W) gets B = 1)."""
    if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(input_name, f"expected a mask of shape (B, H, W), got {got}")
    mask = value.detach().to("cpu", torch.float32)
    return mask[None] if mask.ndim == 2 else mask


def check_mask_size(mask: torch.Tensor, height: int, width: int, what: str, input_name: str = "mask") -> None:
    """Refuse a mask (B, H, W) whose size is not `width` x `height`, naming the input."""
    if tuple(mask.shape[-2:]) != (height, width):
        raise InputError(input_name, f"mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the {what} is "
                                     f"{width}x{height}; scale one of them to match")


def image_from_pil(picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """An image (1, H, W, 3) and the mask (1, H, W) of its transparent parts (1 - alpha; zeros
    when it has no alpha). EXIF orientation is applied, as viewers do."""
    picture = ImageOps.exif_transpose(picture)
    if picture.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit greyscale: PIL's RGB conversion would clip it, so scale it ourselves.
        grey = np.asarray(picture, dtype=np.float32) / 65535.0
        image = torch.from_numpy(np.clip(grey, 0.0, 1.0))[..., None].expand(-1, -1, 3).contiguous()
        return image[None], torch.zeros(1, *grey.shape)
    has_alpha = "A" in picture.getbands() or (picture.mode == "P" and "transparency" in picture.info)
    rgba = np.asarray(picture.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    image = torch.from_numpy(np.ascontiguousarray(rgba[..., :3]))[None]
    if has_alpha:
        mask = 1.0 - torch.from_numpy(np.ascontiguousarray(rgba[..., 3]))[None]
    else:
        mask = torch.zeros(1, *rgba.shape[:2])
    return image, mask


def pil_from_image(image: torch.Tensor) -> Image.Image:
    """One image (H, W, 3) in [0, 1] as an 8-bit RGB picture (rounded to the nearest level)."""
    levels = (image.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return Image.fromarray(levels.numpy(), mode="RGB")


def open_picture(path: Path, input_name: str) -> Image.Image:
    """Open and fully decode an image file; an unreadable one raises InputError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                # Only the first frame of an animation is used.
                return opened.copy()
    except FileNotFoundError:
        raise InputError(input_name, f"no file {str(path)!r}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # What pillow raises for truncated, corrupt or unsupported files.
        raise InputError(input_name, f"{path.name!r} ({path}) is not a readable image: {error}") from None


def resize(images: torch.Tensor, width: int, height: int, method: ResizeMethod) -> torch.Tensor:
    """Resample images (B, H, W, C) to (B, height, width, C). Downscaling with bilinear or bicubic
    is antialiased; bicubic and lanczos overshoot is clipped to [0, 1]."""
    batch, old_height, old_width, channels = images.shape
    if (old_height, old_width) == (height, width):
        return images
    if method == "lanczos":
        # torch has no lanczos filter; pillow resamples float ("F") planes without quantizing.
        planes = images.permute(0, 3, 1, 2).reshape(-1, old_height, old_width).numpy()
        out = np.stack([np.asarray(Image.fromarray(plane, mode="F").resize((width, height), Image.Resampling.LANCZOS))
                        for plane in planes])
        resized = torch.from_numpy(out).reshape(batch, channels, height, width)
    else:
        planar = images.permute(0, 3, 1, 2)
        if method == "nearest":
            resized = F.interpolate(planar, size=(height, width), mode="nearest-exact")
        elif method == "area":
            resized = F.interpolate(planar, size=(height, width), mode="area")
        else:
            shrinking = height < old_height or width < old_width
            resized = F.interpolate(planar, size=(height, width), mode=method, align_corners=False, antialias=shrinking)
    if method in ("bicubic", "lanczos"):
        resized = resized.clamp(0.0, 1.0)
    return resized.permute(0, 2, 3, 1).contiguous()


def center_crop_to_aspect(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The largest centred part of images (B, H, W, C) with the aspect ratio width:height."""
    old_height, old_width = images.shape[1:3]
    if old_width * height > width * old_height:  # too wide
        keep = max(1, round(old_height * width / height))
        left = (old_width - keep) // 2
        return images[:, :, left:left + keep]
    keep = max(1, round(old_width * height / width))
    top = (old_height - keep) // 2
    return images[:, top:top + keep]


def _png_text(text: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        if value.isascii():
            info.add_text(key, value)
        else:  # tEXt is Latin-1 only; iTXt holds UTF-8 (prompts in any language)
            info.add_itxt(key, value)
    return info


def png_bytes(image: torch.Tensor, text: dict[str, str], compress_level: int) -> bytes:
    """One image (H, W, 3) encoded as PNG with `text` as tEXt/iTXt chunks."""
    buffer = io.BytesIO()
    pil_from_image(image).save(buffer, format="PNG", pnginfo=_png_text(text), compress_level=compress_level)
    return buffer.getvalue()


def frame_milliseconds(fps: float) -> int:
    """How long each frame of an animation at `fps` shows: whole milliseconds, as WebP and APNG
    store it, truncated as ComfyUI's animated saves do (so 6 fps shows each frame 166 ms)."""
    return max(1, int(1000.0 / fps))


def apng_bytes(images: torch.Tensor, text: dict[str, str], fps: float, compress_level: int) -> bytes:
    """images (B, H, W, 3) as an animated PNG looping forever, one frame each (a single image is a
    plain PNG), with `text` as tEXt/iTXt chunks before the frames."""
    frames = [pil_from_image(image) for image in images]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=frame_milliseconds(fps),
                   loop=0, pnginfo=_png_text(text), compress_level=compress_level)
    return buffer.getvalue()


# WebP keeps text in EXIF: each entry is "<key>:<value>" in one of these tags, in this order (Make,
# then ImageDescription), where ComfyUI puts its workflow and readers of its files look for it.
WEBP_TEXT_TAGS = (0x010F, 0x010E)
# WebP's compression effort (0 fastest .. 6 slowest) by the names ComfyUI's SaveAnimatedWEBP uses.
WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}
WebPMethod = Literal["default", "fastest", "slowest"]


def webp_animation_bytes(images: torch.Tensor, text: dict[str, str], fps: float, lossless: bool, quality: int,
                         method: WebPMethod) -> bytes:
    """images (B, H, W, 3) as an animated WebP looping forever, one frame each, with `text` in
    EXIF (WEBP_TEXT_TAGS; values must be ASCII, as EXIF text is)."""
    if len(text) > len(WEBP_TEXT_TAGS):
        raise ValueError(f"WebP holds at most {len(WEBP_TEXT_TAGS)} text entries, got {sorted(text)}")
    frames = [pil_from_image(image) for image in images]
    exif = Image.Exif()
    for tag, (key, value) in zip(WEBP_TEXT_TAGS, text.items()):
        exif[tag] = f"{key}:{value}"
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=frame_milliseconds(fps),
                   loop=0, lossless=lossless, quality=quality, method=WEBP_METHODS[method], exif=exif.tobytes())
    return buffer.getvalue()


def _input_file_fingerprint(name: Any) -> str | None:
    try:
        stat = folders.resolve_input(str(name)).stat()
    except (OSError, folders.ModelFolderError):
        return None  # the run reports the missing file
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _input_picture(name: str) -> Image.Image:
    try:
        path = folders.resolve_input(name)
    except folders.ModelFolderError as error:
        raise InputError("image", str(error)) from None
    return open_picture(path, "image")


InputImageName = Annotated[str, Choices(folders.list_inputs, kind="inputs"),
                           Field(description="An image file in the inputs folder.")]


# -- loading --

class LoadImage(Node):
    """Load an image from the inputs folder, with its transparency as a mask (1 where fully transparent)."""

    category = "image"

    class Inputs(NodeInputs):
        image: InputImageName

    class Outputs(NodeOutputs):
        image: IMAGE.annotation = Field(description="The image, (1, H, W, 3).")
        mask: MASK.annotation = Field(description="1 - alpha; all zeros when the file has no alpha.")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _input_file_fingerprint(literals.get("image"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image, mask = image_from_pil(_input_picture(inputs.image))
        return self.Outputs(image=image, mask=mask)


class LoadMask(Node):
    """Load a mask from one channel of an image in the inputs folder. For `alpha` the mask is
    1 - alpha (transparent = repaint); for a colour channel it is the channel (white = repaint)."""

    category = "image"

    class Inputs(NodeInputs):
        image: InputImageName
        channel: MaskChannel = Field("alpha", description="Which channel becomes the mask.")

    class Outputs(NodeOutputs):
        mask: MASK.annotation = Field(description="The mask, (1, H, W).")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _input_file_fingerprint(literals.get("image"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image, transparent = image_from_pil(_input_picture(inputs.image))
        if inputs.channel == "alpha":
            return self.Outputs(mask=transparent)
        index = ("red", "green", "blue").index(inputs.channel)
        return self.Outputs(mask=image[..., index].contiguous())


# -- saving and previews --

def _file_text(ctx: RunContext, embed_workflow: bool, ascii_only: bool = False, **parameters: Any) -> dict[str, str]:
    """What a saved file carries: the workflow being run (when embedded, so the editor can reopen
    it) and `parameters` (the run id, the node id and the given values); `ascii_only` escapes
    other characters in the workflow's JSON (for formats whose text is ASCII)."""
    text = {}
    if embed_workflow:
        text["workflow"] = json.dumps(ctx.workflow, separators=(",", ":"), ensure_ascii=ascii_only)
    text["parameters"] = json.dumps({"run_id": ctx.run_id, "node_id": ctx.node_id, **parameters})
    return text


class SaveImage(Node):
    """Save images as PNG files in the output folder, numbered so nothing is overwritten. Each file
    carries the workflow (PNG text `workflow`, so the editor can reopen it) and the run id and node
    id (`parameters`)."""

    category = "image"
    output_node = True

    class Inputs(NodeInputs):
        images: IMAGE.annotation = Field(description="Images to save, one file each.")
        filename_prefix: str = Field("nodegraph", min_length=1, max_length=200,
                                     description="File name prefix; may name subfolders (`portraits/face`).")
        embed_workflow: bool = Field(True, description="Store the workflow in the files (turn off to share images "
                                                       "without the prompt and settings).")
        compress_level: int = Field(4, ge=0, le=9, description="PNG compression: 0 fastest, 9 smallest.")

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        images = as_image(inputs.images, "images")
        for index in range(images.shape[0]):
            text = _file_text(ctx, inputs.embed_workflow, batch_index=index)
            data = png_bytes(images[index], text, inputs.compress_level)
            path = write_numbered(ctx.output_dir, inputs.filename_prefix, ".png", data)
            ctx.record_file(path)
        return self.Outputs()


class PreviewImage(Node):
    """Show images without keeping them: written to the output folder's `previews/`, which may be
    cleared at any time. Files are named by their content, so a cached preview still points at the
    right file."""

    category = "image"
    output_node = True

    class Inputs(NodeInputs):
        images: IMAGE.annotation = Field(description="Images to show.")

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        images = as_image(inputs.images, "images")
        for index in range(images.shape[0]):
            data = png_bytes(images[index], {}, compress_level=1)
            path = ctx.output_dir / PREVIEWS_FOLDER / f"{hashlib.sha256(data).hexdigest()[:24]}.png"
            if not path.is_file():
                atomic_write(path, data)
            ctx.record_file(path)
        return self.Outputs()


_FilenamePrefix = Annotated[str, Field(min_length=1, max_length=200,
                                       description="File name prefix; may name subfolders (`portraits/face`).")]
_EmbedWorkflow = Annotated[bool, Field(description="Store the workflow in the file (turn off to share it without "
                                                   "the prompt and settings).")]
_Fps = Annotated[float, Field(ge=0.01, le=1000.0, description="Frames per second; each frame shows 1000 / fps "
                                                              "milliseconds, whole milliseconds.")]


class SaveAnimatedWebP(Node):
    """Save an image batch as one animated WebP in the output folder, one frame per image, looping,
    numbered so nothing is overwritten. The workflow is stored in the file's EXIF (Make tag, as
    `workflow:<JSON>`), the run id and node id as `parameters:<JSON>` (ImageDescription tag)."""

    category = "image"
    output_node = True

    class Inputs(NodeInputs):
        images: IMAGE.annotation = Field(description="The frames, in order.")
        filename_prefix: _FilenamePrefix = "nodegraph"
        fps: _Fps = 6.0
        lossless: bool = Field(True, description="Keep every pixel exactly (larger files).")
        quality: int = Field(80, ge=0, le=100, description="Lossy: picture quality, 100 best. Lossless: how hard "
                                                           "to compress, 100 smallest.")
        method: WebPMethod = Field("default", description="Encoder effort: fastest, default or slowest (smallest).")
        embed_workflow: _EmbedWorkflow = True

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        images = as_image(inputs.images, "images")
        text = _file_text(ctx, inputs.embed_workflow, ascii_only=True, frames=images.shape[0])
        data = webp_animation_bytes(images, text, inputs.fps, inputs.lossless, inputs.quality, inputs.method)
        ctx.record_file(write_numbered(ctx.output_dir, inputs.filename_prefix, ".webp", data))
        return self.Outputs()


class SaveAnimatedPNG(Node):
    """Save an image batch as one animated PNG (APNG) in the output folder, one frame per image,
    looping, numbered so nothing is overwritten. Like SaveImage's files it carries the workflow
    (PNG text `workflow`) and the run id and node id (`parameters`)."""

    category = "image"
    output_node = True

    class Inputs(NodeInputs):
        images: IMAGE.annotation = Field(description="The frames, in order.")
        filename_prefix: _FilenamePrefix = "nodegraph"
        fps: _Fps = 6.0
        compress_level: int = Field(4, ge=0, le=9, description="PNG compression: 0 fastest, 9 smallest.")
        embed_workflow: _EmbedWorkflow = True

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        images = as_image(inputs.images, "images")
        text = _file_text(ctx, inputs.embed_workflow, frames=images.shape[0])
        data = apng_bytes(images, text, inputs.fps, inputs.compress_level)
        ctx.record_file(write_numbered(ctx.output_dir, inputs.filename_prefix, ".png", data))
        return self.Outputs()


# -- geometry --

class ImageScale(Node):
    """Scale images to a width and height, optionally cropping the centre to that aspect first."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to scale.")
        width: int = Field(512, ge=0, le=MAX_SIDE, description="Target width; 0 keeps the aspect ratio from height.")
        height: int = Field(512, ge=0, le=MAX_SIDE, description="Target height; 0 keeps the aspect ratio from width.")
        method: ResizeMethod = Field("bilinear", description="Resampling filter.")
        crop: Literal["disabled", "center"] = Field("disabled", description="Crop the centre to the target aspect "
                                                                            "instead of stretching.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image = as_image(inputs.image)
        old_height, old_width = image.shape[1:3]
        width, height = inputs.width, inputs.height
        if width == 0 and height == 0:
            raise InputError("width", "width and height are both 0; give at least one")
        if width == 0:
            width = max(1, round(old_width * height / old_height))
        if height == 0:
            height = max(1, round(old_height * width / old_width))
        if inputs.crop == "center":
            image = center_crop_to_aspect(image, width, height)
        return self.Outputs(image=resize(image, width, height, inputs.method))


class ImageScaleBy(Node):
    """Scale images by a factor (sizes are rounded to whole pixels)."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to scale.")
        factor: float = Field(2.0, gt=0.0, le=16.0, description="Scale factor; 0.5 halves, 2 doubles.")
        method: ResizeMethod = Field("bilinear", description="Resampling filter.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image = as_image(inputs.image)
        height, width = (max(1, round(side * inputs.factor)) for side in image.shape[1:3])
        if max(width, height) > MAX_SIDE:
            raise InputError("factor", f"{inputs.factor} would make {width}x{height} pixels; at most {MAX_SIDE} a side")
        return self.Outputs(image=resize(image, width, height, inputs.method))


class ImageScaleToTotalPixels(Node):
    """Scale images to about a number of megapixels (of 1024 x 1024 pixels), keeping the aspect
    ratio; each side is rounded to a multiple of `resolution_steps`."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to scale.")
        method: ResizeMethod = Field("nearest", description="Resampling filter.")
        megapixels: float = Field(1.0, ge=0.01, le=16.0, description="Target size in megapixels.")
        resolution_steps: int = Field(1, ge=1, le=256, description="Both sides become multiples of this.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image = as_image(inputs.image)
        height, width = image.shape[1:3]
        new_width, new_height = imaging.size_for_megapixels(width, height, inputs.megapixels, inputs.resolution_steps)
        if max(new_width, new_height) > MAX_SIDE:
            raise InputError("megapixels", f"{inputs.megapixels} megapixels make {width}x{height} pixels "
                                           f"{new_width}x{new_height}; at most {MAX_SIDE} a side")
        return self.Outputs(image=resize(image, new_width, new_height, inputs.method))


class PadForOutpaint(Node):
    """Extend images with grey borders to paint into, and the mask that marks them. Feathering
    fades the mask into the original image near the padded edges so the seam is repainted too."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to extend.")
        left: int = Field(0, ge=0, le=MAX_SIDE, description="Pixels added on the left.")
        top: int = Field(0, ge=0, le=MAX_SIDE, description="Pixels added on top.")
        right: int = Field(0, ge=0, le=MAX_SIDE, description="Pixels added on the right.")
        bottom: int = Field(0, ge=0, le=MAX_SIDE, description="Pixels added at the bottom.")
        feathering: int = Field(40, ge=0, le=MAX_SIDE, description="Width in pixels of the fade inside the "
                                                                   "original image along padded edges.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation = Field(description="The padded images; new pixels are 0.5 grey.")
        mask: MASK.annotation = Field(description="1 on the new borders, fading to 0 inside the original.")

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image = as_image(inputs.image)
        batch, height, width, _ = image.shape
        new_height, new_width = height + inputs.top + inputs.bottom, width + inputs.left + inputs.right
        if max(new_height, new_width) > MAX_SIDE:
            raise InputError("left", f"padding makes {new_width}x{new_height} pixels; at most {MAX_SIDE} a side")
        padded = torch.full((batch, new_height, new_width, 3), 0.5)
        padded[:, inputs.top:inputs.top + height, inputs.left:inputs.left + width] = image
        mask = torch.ones(new_height, new_width)
        mask[inputs.top:inputs.top + height, inputs.left:inputs.left + width] = self._inner_mask(inputs, height, width)
        return self.Outputs(image=padded, mask=mask[None].expand(batch, -1, -1).contiguous())

    @staticmethod
    def _inner_mask(inputs: Inputs, height: int, width: int) -> torch.Tensor:
        """(H, W): (1 - d / feathering)^2 within `feathering` of a padded edge (d = pixels from
        that edge, 0 for the outermost row), else 0."""
        if inputs.feathering == 0:
            return torch.zeros(height, width)
        rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
        distance = torch.full((height, width), math.inf)
        for padded, d in ((inputs.top, rows), (inputs.bottom, height - 1 - rows),
                          (inputs.left, cols), (inputs.right, width - 1 - cols)):
            if padded:
                distance = torch.minimum(distance, d)
        return ((1.0 - distance / inputs.feathering).clamp(min=0.0)) ** 2


# -- edges --

class CannyEdges(Node):
    """Edges found by the Canny detector, white on black (what a canny ControlNet takes). The image
    is turned grey and blurred (5 x 5 Gaussian, sigma 1); the thresholds apply to the Sobel
    gradient's magnitude, as in ComfyUI's Canny: where it exceeds `high_threshold` is an edge, and
    where it exceeds `low_threshold` too, if joined to such an edge."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to find edges in.")
        low_threshold: float = Field(0.4, ge=0.01, le=0.99, description="Weaker edges kept where they join a "
                                                                        "strong one; at most high_threshold.")
        high_threshold: float = Field(0.8, ge=0.01, le=0.99, description="Edges kept wherever they are; lower "
                                                                         "finds more.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation = Field(description="1 on edges, 0 elsewhere, in all three channels.")

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.low_threshold > inputs.high_threshold:
            raise InputError("low_threshold", f"{inputs.low_threshold} is above high_threshold "
                                              f"{inputs.high_threshold}; it must be at most that")
        image = as_image(inputs.image)
        if min(image.shape[1:3]) < 3:
            raise InputError("image", f"{image.shape[2]}x{image.shape[1]} pixels is too small; at least 3x3")
        planar = image.permute(0, 3, 1, 2).to(run_device(ctx))
        edges = imaging.canny(planar, inputs.low_threshold, inputs.high_threshold).edges
        return self.Outputs(image=edges[:, 0, :, :, None].expand(-1, -1, -1, 3).cpu().contiguous())


# -- values --

class InvertImage(Node):
    """Invert colours: 1 - value."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to invert.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(image=1.0 - as_image(inputs.image))


class InvertMask(Node):
    """Swap what a mask marks: 1 - value."""

    category = "image"

    class Inputs(NodeInputs):
        mask: MASK.annotation = Field(description="Mask to invert.")

    class Outputs(NodeOutputs):
        mask: MASK.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(mask=1.0 - as_mask(inputs.mask))


class MaskFromColor(Node):
    """A mask of the pixels of one colour (within a tolerance per channel, in 0-255 levels)."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to pick the colour in.")
        red: int = Field(255, ge=0, le=255, description="Red level of the colour.")
        green: int = Field(255, ge=0, le=255, description="Green level of the colour.")
        blue: int = Field(255, ge=0, le=255, description="Blue level of the colour.")
        tolerance: int = Field(0, ge=0, le=255,
                               description="Largest difference per channel still counted as the colour.")

    class Outputs(NodeOutputs):
        mask: MASK.annotation = Field(description="1 where the pixel has the colour.")

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        levels = (as_image(inputs.image) * 255.0).round()
        colour = torch.tensor([inputs.red, inputs.green, inputs.blue], dtype=torch.float32)
        matches = ((levels - colour).abs() <= inputs.tolerance).all(dim=-1)
        return self.Outputs(mask=matches.float())


class MaskToImage(Node):
    """A mask as a grey image (to preview or save it)."""

    category = "image"

    class Inputs(NodeInputs):
        mask: MASK.annotation = Field(description="Mask to show.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(image=as_mask(inputs.mask)[..., None].expand(-1, -1, -1, 3).contiguous())


class ImageToMask(Node):
    """One colour channel of an image as a mask."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="Images to take the channel from.")
        channel: Literal["red", "green", "blue"] = Field("red", description="Which channel becomes the mask.")

    class Outputs(NodeOutputs):
        mask: MASK.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        index = ("red", "green", "blue").index(inputs.channel)
        return self.Outputs(mask=as_image(inputs.image)[..., index].contiguous())


# -- combining --

class ImageBatch(Node):
    """Join two image batches into one; the second is resized to the first's size if they differ."""

    category = "image"

    class Inputs(NodeInputs):
        image1: IMAGE.annotation = Field(description="First images; their size is the batch's.")
        image2: IMAGE.annotation = Field(description="Images appended after the first.")
        method: ResizeMethod = Field("bilinear", description="Filter used when the second images are resized.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        first, second = as_image(inputs.image1, "image1"), as_image(inputs.image2, "image2")
        second = resize(second, first.shape[2], first.shape[1], inputs.method)
        return self.Outputs(image=torch.cat([first, second]))


class ImageCompositeMasked(Node):
    """Paste `source` onto `destination` with its top-left corner at (x, y); where a mask is given,
    only where it is 1 (blending where it is between). Parts outside the destination are dropped."""

    category = "image"

    class Inputs(NodeInputs):
        destination: IMAGE.annotation = Field(description="Images pasted onto.")
        source: IMAGE.annotation = Field(description="Images pasted; one, or as many as the destination.")
        x: int = Field(0, ge=-MAX_SIDE, le=MAX_SIDE, description="Left edge of the source in the destination.")
        y: int = Field(0, ge=-MAX_SIDE, le=MAX_SIDE, description="Top edge of the source in the destination.")
        mask: MASK.annotation | None = Field(None, description="Where to paste, the size of the source; "
                                                                "all of it if absent.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        destination = as_image(inputs.destination, "destination")
        source = as_image(inputs.source, "source")
        batch, height, width, _ = destination.shape
        if source.shape[0] not in (1, batch):
            raise InputError("source", f"{source.shape[0]} images cannot be pasted onto {batch}; give 1 or {batch}")
        source_height, source_width = source.shape[1:3]
        if inputs.mask is None:
            mask = torch.ones(1, source_height, source_width)
        else:
            mask = as_mask(inputs.mask)
            check_mask_size(mask, source_height, source_width, "source image")
            if mask.shape[0] not in (1, batch):
                raise InputError("mask", f"{mask.shape[0]} masks for {batch} images; give 1 or {batch}")
        top, left = max(inputs.y, 0), max(inputs.x, 0)
        bottom, right = min(inputs.y + source_height, height), min(inputs.x + source_width, width)
        result = destination.clone()
        if bottom > top and right > left:
            rows = slice(top - inputs.y, bottom - inputs.y)
            cols = slice(left - inputs.x, right - inputs.x)
            weight = mask[:, rows, cols, None]
            region = result[:, top:bottom, left:right]
            result[:, top:bottom, left:right] = region * (1.0 - weight) + source[:, rows, cols] * weight
        return self.Outputs(image=result)


NODES: list[type[Node]] = [
    LoadImage, LoadMask, SaveImage, SaveAnimatedWebP, SaveAnimatedPNG, PreviewImage, ImageScale, ImageScaleBy,
    ImageScaleToTotalPixels, PadForOutpaint, CannyEdges, InvertImage, InvertMask, MaskFromColor, MaskToImage,
    ImageToMask, ImageBatch, ImageCompositeMasked,
]
