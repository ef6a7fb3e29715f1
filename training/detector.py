"""A deterministic pixel-based detector for the shapes dataset: what a generated image shows.

From a (64, 64, 3) RGB image it reads the background colour (median of the border), the shape's
region (pixels far from the background colour, largest connected region), the shape colour
(median of the region's interior), the shape's mask (the region's pixels nearer the shape colour
than the background colour), the shape class (the ideal circle/square/triangle template in the mask's
box that overlaps the hole-filled mask best) and the filled fraction of the shape's box (about
0.79 for a filled circle, far lower for an outline). No learned parts: it scores the models.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .shapes import PALETTE, SHAPES, shape_coverage

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)
# A pixel belongs to the shape when it is farther from the background colour than half the
# closest distance between two palette colours: anti-aliased edges split down the middle.
_MIN_PALETTE_DISTANCE = min(
    float(np.linalg.norm(a - b)) for i, a in enumerate(_PALETTE_RGB) for b in _PALETTE_RGB[i + 1:]
)
MASK_THRESHOLD = 0.5 * _MIN_PALETTE_DISTANCE


@dataclass(frozen=True)
class Detection:
    """What the detector saw. ``shape``/``colour`` are None when no shape region was found.

    mask: (64, 64) bool, the shape's pixels (not hole-filled); filled_fraction: mask pixels over
    the area of the box around the hole-filled mask.
    """

    background: str
    colour: str | None
    shape: str | None
    mask: np.ndarray
    filled_fraction: float


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour name nearest to one RGB triple (0..255)."""
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    return _PALETTE_NAMES[int(np.argmin(distances))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a bool mask (ties: the first found in raster order)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        size = 0
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every pixel not connected to the image border through non-mask pixels."""
    outside = np.zeros_like(mask)
    free = ~mask
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    return inner


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def classify_shape(filled: np.ndarray) -> str:
    """The shape whose ideal template, fitted to the filled mask's box, overlaps it most."""
    ys, xs = np.nonzero(filled)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    scores = []
    for shape in SHAPES:
        # Templates are drawn in a square box; stretch-free fitting keeps a circle a circle.
        template = _template(shape, box, filled.shape)
        scores.append(mask_iou(filled, template))
    return SHAPES[int(np.argmax(scores))]


def _template(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    # The renderer draws in a square box; a non-square box gets the square around its centre
    # scaled by each axis separately, which the coverage function handles by rendering each axis.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side_x, side_y = x1 - x0, y1 - y0
    side = max(side_x, side_y)
    square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    coverage = shape_coverage(shape, square, outlined=False) > 0.5
    if side_x == side_y:
        return coverage
    # Squash the square template onto the real box by resampling rows/columns.
    out = np.zeros(size, dtype=bool)
    ys = np.arange(int(y0), int(y1))
    xs = np.arange(int(x0), int(x1))
    src_y = np.clip(np.rint(cy + (ys + 0.5 - cy) * side / side_y - 0.5).astype(int), 0, size[0] - 1)
    src_x = np.clip(np.rint(cx + (xs + 0.5 - cx) * side / side_x - 0.5).astype(int), 0, size[1] - 1)
    out[np.ix_(ys, xs)] = coverage[np.ix_(src_y, src_x)]
    return out


def detect(image: np.ndarray) -> Detection:
    """image: (64, 64, 3) uint8 RGB (or float 0..255) -> :class:`Detection`."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"detect expects an (H, W, 3) RGB image, got shape {pixels.shape}")
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    far = np.linalg.norm(pixels - background_rgb, axis=2) > MASK_THRESHOLD
    mask = _largest_component(far)
    if not mask.any():
        return Detection(background, None, None, mask, 0.0)
    inner = _erode(mask)
    core = pixels[inner] if inner.any() else pixels[mask]
    shape_rgb = np.median(core, axis=0)
    colour = nearest_colour(shape_rgb)
    # Split anti-aliased edges halfway between the two measured colours, so the mask is the
    # shape's 50% coverage contour whatever the colour pair.
    nearer_shape = np.linalg.norm(pixels - shape_rgb, axis=2) < np.linalg.norm(pixels - background_rgb, axis=2)
    mask = _largest_component(nearer_shape & fill_holes(mask))
    filled = fill_holes(mask)
    ys, xs = np.nonzero(filled)
    box_area = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return Detection(background, colour, classify_shape(filled), mask, float(mask.sum() / box_area))
