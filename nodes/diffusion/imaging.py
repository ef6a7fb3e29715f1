"""Image and latent maths the nodes call: Canny edge detection, spherical-bilinear ("bislerp")
resampling of latents, and image sizes chosen by pixel count.

Conventions follow ComfyUI where its workflows depend on them (so an imported workflow gives its
image): Canny is the detector ComfyUI runs through kornia (5x5 Gaussian blur with sigma 1 and
reflected borders, unnormalised Sobel gradients, thresholds on that gradient's magnitude), bislerp
is ComfyUI's latent upscale method of that name, and a megapixel is 1024 * 1024 pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights: what kornia's (and OpenCV's) RGB -> grey conversion uses.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
# Added under the square root of the gradient magnitude (kornia's default); it also sets the
# magnitude of a flat pixel, sqrt(eps), which no kept edge pixel may equal.
GRADIENT_EPS = 1e-6
# Vectors closer than this (in cosine) to parallel or to opposite are blended without slerp.
SLERP_PARALLEL = 1e-5
MEGAPIXEL = 1024 * 1024


# -- sizes --

def size_for_megapixels(width: int, height: int, megapixels: float, step: int = 1) -> tuple[int, int]:
    """The (width, height) with about `megapixels` * 2^20 pixels and the aspect ratio of width x
    height, each side rounded to the nearest multiple of `step` (at least one step)."""
    if width < 1 or height < 1 or megapixels <= 0 or step < 1:
        raise ValueError(f"cannot size {width}x{height} to {megapixels} megapixels in steps of {step}")
    scale = math.sqrt(megapixels * MEGAPIXEL / (width * height))
    return (max(1, round(width * scale / step)) * step, max(1, round(height * scale / step)) * step)


# -- Canny edges --

class CannyResult(NamedTuple):
    """magnitude: (B, 1, H, W) gradient magnitude where a pixel survived non-maximum suppression,
    else 0; edges: (B, 1, H, W) 1.0 on edge pixels, else 0.0."""

    magnitude: torch.Tensor
    edges: torch.Tensor


def grey(images: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) RGB -> (B, 1, H, W) luma; (B, 1, H, W) is returned as it is."""
    if images.shape[1] == 1:
        return images
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got images of shape {tuple(images.shape)}")
    red, green, blue = images.unbind(1)
    return (GREY_WEIGHTS[0] * red + GREY_WEIGHTS[1] * green + GREY_WEIGHTS[2] * blue)[:, None]


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(size,) samples of a Gaussian centred on the middle tap, summing to 1 (size odd)."""
    offsets = torch.arange(size, dtype=dtype) - size // 2
    weights = torch.exp(-offsets**2 / (2.0 * sigma**2))
    return weights / weights.sum()


def gaussian_blur(images: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """images: (B, C, H, W) blurred by a separable size x size Gaussian, borders reflected
    (mirrored without repeating the edge pixel)."""
    channels = images.shape[1]
    kernel = gaussian_kernel(size, sigma, images.dtype).to(images.device)
    radius = size // 2
    if min(images.shape[-2:]) <= radius:
        raise ValueError(f"a {size}x{size} blur reflects {radius} pixels at the borders: images of shape "
                         f"{tuple(images.shape)} need more than {radius} pixels a side")
    rows = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    rows = F.conv2d(rows, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    columns = F.pad(rows, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(columns, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def sobel(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised 3x3 Sobel derivatives of images (B, 1, H, W), borders repeated: (d/dx, d/dy),
    x growing to the right and y downwards, each (B, 1, H, W). A ramp of slope s gives 8 s."""
    d_dx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype,
                        device=images.device)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, d_dx[None, None]), F.conv2d(padded, d_dx.T[None, None])


# Neighbour offsets (dy, dx) along each gradient axis, for directions rounded to 45 degrees with
# angles measured from +x towards +y (down): horizontal, diagonal down-right, vertical, diagonal
# down-left. The opposite neighbour is at (-dy, -dx).
_AXIS_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))


def _shifted(padded: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """From (B, 1, H + 2, W + 2) padded by one pixel: the (B, 1, H, W) values at offset (dy, dx)."""
    height, width = padded.shape[-2] - 2, padded.shape[-1] - 2
    return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def non_maximum_suppression(d_dx: torch.Tensor, d_dy: torch.Tensor, eps: float = GRADIENT_EPS) -> torch.Tensor:
    """The gradient magnitude sqrt(dx^2 + dy^2 + eps) of (B, 1, H, W) derivatives where it is a
    maximum across the edge, else 0: each pixel is compared with its two neighbours along the
    gradient direction rounded to a multiple of 45 degrees. Along a horizontal (vertical) gradient
    a pixel must be greater than its left (upper) neighbour and at least its right (lower) one, so
    of two equal pixels across a step the left (upper) one is kept, as OpenCV and kornia do; along
    a diagonal it must be greater than both. Outside the image the magnitude is that of a flat
    pixel, sqrt(eps), and a pixel no greater than that is never kept."""
    flat = math.sqrt(eps)
    magnitude = torch.sqrt(d_dx * d_dx + d_dy * d_dy + eps)
    padded = F.pad(magnitude, (1, 1, 1, 1), value=flat)
    axis = torch.round(torch.atan2(d_dy, d_dx) * (4 / math.pi)).long() % 4
    keep = magnitude > flat
    for index, (dy, dx) in enumerate(_AXIS_OFFSETS):
        ahead, behind = _shifted(padded, dy, dx), _shifted(padded, -dy, -dx)
        beats_ahead = magnitude >= ahead if index in (0, 2) else magnitude > ahead
        keep &= (axis != index) | (beats_ahead & (magnitude > behind))
    return magnitude * keep


def hysteresis(weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """weak, strong: (B, 1, H, W) booleans (strong implies weak) -> the weak pixels joined to a
    strong one through a chain of weak pixels, each touching the next by side or corner."""
    kept = strong & weak
    candidates = weak.float()
    while True:
        grown = (F.max_pool2d(kept.float(), 3, stride=1, padding=1) * candidates) > 0
        if torch.equal(grown, kept):
            return kept
        kept = grown


def canny(images: torch.Tensor, low_threshold: float, high_threshold: float, blur_size: int = 5,
          blur_sigma: float = 1.0) -> CannyResult:
    """Canny edges of images (B, 3, H, W) (RGB, converted to luma) or (B, 1, H, W): Gaussian blur,
    Sobel gradient, non-maximum suppression, then hysteresis. A pixel is a candidate where the
    suppressed magnitude exceeds `low_threshold` and certain where it exceeds `high_threshold`
    (both strict, in units of the unnormalised Sobel magnitude: a 0-to-1 step reaches about 2.6
    after the blur); candidates joined to a certain pixel are edges too."""
    if not 0 < low_threshold <= high_threshold:
        raise ValueError(f"thresholds must satisfy 0 < low <= high, got low {low_threshold}, high {high_threshold}")
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    work = grey(images if images.is_floating_point() else images.float())
    d_dx, d_dy = sobel(gaussian_blur(work, blur_size, blur_sigma))
    magnitude = non_maximum_suppression(d_dx, d_dy)
    edges = hysteresis(magnitude > low_threshold, magnitude > high_threshold)
    return CannyResult(magnitude, edges.to(magnitude.dtype))


# -- bislerp --

def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Interpolate vectors along `dim` by weight t in [0, 1] (broadcast against a and b, size 1
    along `dim`): the direction moves along the great circle from a's to b's and the length
    linearly from |a| to |b|. As ComfyUI's bislerp does, vectors within SLERP_PARALLEL (in
    cosine) of parallel give a itself, and of opposite the linear blend (1 - t) a + t b; a zero
    vector has no direction and contributes none."""
    norm_a, norm_b = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    unit_a = torch.where(norm_a > 0, a / norm_a.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    unit_b = torch.where(norm_b > 0, b / norm_b.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
    cosine = (unit_a * unit_b).sum(dim=dim, keepdim=True)
    angle = torch.acos(cosine.clamp(-1.0, 1.0))
    sine = torch.sin(angle)
    arc = (torch.sin((1 - t) * angle) * unit_a + torch.sin(t * angle) * unit_b) / sine
    result = arc * ((1 - t) * norm_a + t * norm_b)
    result = torch.where(cosine < SLERP_PARALLEL - 1, (1 - t) * a + t * b, result)
    return torch.where(cosine > 1 - SLERP_PARALLEL, a, result)


def _linear_taps(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where `new` samples fall on an axis of `old` when pixel centres are aligned (half-pixel
    offsets, as bilinear resampling without align_corners places them), clamped to the axis: for
    each sample the source index at or before it, the next one (the last repeats), and the
    weight (new,) of the next one."""
    position = ((torch.arange(new, dtype=torch.float64) + 0.5) * (old / new) - 0.5).clamp(0, old - 1)
    before = position.floor().long()
    after = (before + 1).clamp(max=old - 1)
    return before, after, position - before


def _bislerp_axis(samples: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """samples (B, C, H, W) resampled to `size` along `dim` (2 or 3), slerping over C."""
    before, after, weight = _linear_taps(samples.shape[dim], size)
    device = samples.device
    shape = [1] * samples.ndim
    shape[dim] = size
    return slerp(samples.index_select(dim, before.to(device)), samples.index_select(dim, after.to(device)),
                 weight.to(device, samples.dtype).view(shape), dim=1)


def bislerp(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resample latents samples (B, C, h, w) to (B, C, height, width) as bilinear resampling
    would, but blending each pair of neighbouring latent vectors (over C) by `slerp` rather than
    linearly, so blends keep the vectors' lengths: along the width first, then along the height
    (ComfyUI's "bislerp"). Computed in float32 (float64 stays float64); returned in the input's dtype."""
    if samples.ndim != 4 or height < 1 or width < 1:
        raise ValueError(f"cannot bislerp {tuple(samples.shape)} to {height}x{width}")
    work = samples if samples.dtype == torch.float64 else samples.float()
    work = _bislerp_axis(work, width, dim=3)
    work = _bislerp_axis(work, height, dim=2)
    return work.to(samples.dtype)
