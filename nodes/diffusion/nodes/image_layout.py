"""Image nodes for edit models: scale an image to a size Flux.1 Kontext was trained on, stitch two
images side by side (several references in one image)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import IMAGE

from .images import as_image, center_crop_to_aspect, resize

# The (width, height) pairs of about a megapixel that Flux.1 Kontext was trained on (BFL's list).
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The Kontext resolution (width, height) whose aspect ratio is nearest to width / height (the
    first of a tie)."""
    aspect = width / height
    return min(KONTEXT_RESOLUTIONS, key=lambda size: abs(aspect - size[0] / size[1]))


class KontextImageScale(Node):
    """Scale an image to the Flux.1 Kontext resolution of the nearest aspect ratio (about a megapixel),
    cropping the centre to that ratio first and resampling with Lanczos (ComfyUI's FluxKontextImageScale)."""

    category = "image"

    class Inputs(NodeInputs):
        image: IMAGE.annotation

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        image = as_image(inputs.image)
        width, height = kontext_size(image.shape[2], image.shape[1])
        return self.Outputs(image=resize(center_crop_to_aspect(image, width, height), width, height, "lanczos"))


Direction = Literal["right", "down", "left", "up"]
SPACING_COLOURS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                   "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def stitch(first: torch.Tensor, second: torch.Tensor, direction: Direction, match_size: bool, spacing: int,
           colour: tuple[float, float, float]) -> torch.Tensor:
    """Place `second` (B2, H2, W2, 3) right of, below, left of or above `first` (B1, H1, W1, 3) ->
    (B, H, W, 3) with B the larger batch (the shorter repeats its last image).

    match_size: scale `second` (Lanczos) to `first`'s height (left/right) or width (up/down), keeping
    its aspect ratio (the new side rounded down); else the smaller is padded, white when `colour` is
    white and black otherwise, split evenly with the extra row or column after. spacing: a band of
    `colour` between them, rounded up to an even width (ComfyUI's ImageStitch)."""
    batch = max(first.shape[0], second.shape[0])
    first, second = (torch.cat([t, t[-1:].expand(batch - t.shape[0], -1, -1, -1)]) for t in (first, second))
    sideways = direction in ("left", "right")
    if match_size:
        h1, w1 = first.shape[1:3]
        h2, w2 = second.shape[1:3]
        aspect = w2 / h2
        size = (int(h1 * aspect), h1) if sideways else (w1, int(w1 / aspect))
        second = resize(second, size[0], size[1], "lanczos")
    else:
        axis = 1 if sideways else 2  # pad heights for a row, widths for a column
        target = max(first.shape[axis], second.shape[axis])
        fill = 1.0 if colour == SPACING_COLOURS["white"] else 0.0
        first, second = (_pad_to(t, axis, target, fill) for t in (first, second))
    parts = [second, first] if direction in ("left", "up") else [first, second]
    if spacing > 0:
        spacing += spacing % 2
        shape = (batch, max(first.shape[1], second.shape[1]), spacing, 3) if sideways else \
            (batch, spacing, max(first.shape[2], second.shape[2]), 3)
        parts.insert(1, torch.tensor(colour).expand(shape))
    return torch.cat(parts, dim=2 if sideways else 1)


def _pad_to(images: torch.Tensor, axis: int, size: int, value: float) -> torch.Tensor:
    """images (B, H, W, 3) padded along axis 1 (rows) or 2 (columns) to `size`, evenly, with `value`."""
    missing = size - images.shape[axis]
    if missing <= 0:
        return images
    before = missing // 2
    pad = (0, 0, 0, 0, before, missing - before) if axis == 1 else (0, 0, before, missing - before)
    return F.pad(images, pad, value=value)


class ImageStitch(Node):
    """Put a second image next to the first (right, down, left or up), for example two reference
    images for Flux.1 Kontext in one. match_image_size scales the second to the first's height (or
    width); otherwise the smaller is padded with the spacing colour. Without a second image the
    first passes unchanged."""

    category = "image"

    class Inputs(NodeInputs):
        image1: IMAGE.annotation
        direction: Direction = "right"
        match_image_size: bool = True
        spacing_width: int = Field(0, ge=0, le=1024, description="A band between the images (odd widths + 1).")
        spacing_color: Literal[tuple(SPACING_COLOURS)] = "white"  # type: ignore[valid-type]
        image2: IMAGE.annotation | None = None

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        first = as_image(inputs.image1, "image1")
        if inputs.image2 is None:
            return self.Outputs(image=first)
        second = as_image(inputs.image2, "image2")
        return self.Outputs(image=stitch(first, second, inputs.direction, inputs.match_image_size,
                                         inputs.spacing_width, SPACING_COLOURS[inputs.spacing_color]))


NODES = [KontextImageScale, ImageStitch]
