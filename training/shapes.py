"""The procedural captioned dataset of the demo model: one shape on a plain background, 64x64 RGB.

Vocabulary (fixed by issue 5): three shapes, eight colours used for the shape and the background
(never the same colour twice in one image). Captions follow one grammar:

    "a {colour} {shape} on a {colour} background"                 (the main, plain form)
    "a {colour} {shape} on a {colour} background, {position}"     (position in left/right/top/bottom/center)
    "a {colour} {shape} on a {colour} background[, {position}], outlined"   (the LoRA style; trigger word last)

Everything is a pure function of a seed: the same seed renders the same images and captions.
A seeded 20% of the (shape colour, shape, background colour) combinations is held out of training
(:func:`held_out_combos`); every colour, shape and every pair of them still appears in training.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Far apart in RGB so a pixel detector separates them even through a blurry decoder.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (135, 45, 175),
    "orange": (245, 140, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
TRIGGER_WORD = "outlined"

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 5
# Shape box side in pixels; small enough that a positioned shape stays clear of the centre line.
MIN_SIZE, MAX_SIZE = 18, 40
OUTLINE_WIDTH = 3.5
# Supersampling factor of the renderer: anti-aliased edges like a photographed shape would have.
SUPERSAMPLE = 4
POSITION_WORD_PROBABILITY = 0.3


@dataclass(frozen=True)
class Combo:
    """One (shape colour, shape, background colour) combination."""

    colour: str
    shape: str
    background: str


@dataclass(frozen=True)
class Sample:
    """The parameters of one rendered image; ``box`` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    combo: Combo
    box: tuple[float, float, float, float]
    position: str | None
    outlined: bool = False

    @property
    def caption(self) -> str:
        return caption_for(self.combo, self.position, self.outlined)


def all_combos() -> list[Combo]:
    """The 168 valid combinations (shape colour != background colour), in a fixed order."""
    return [
        Combo(colour, shape, background)
        for colour, shape, background in itertools.product(COLOURS, SHAPES, COLOURS)
        if colour != background
    ]


def caption_for(combo: Combo, position: str | None = None, outlined: bool = False) -> str:
    """The caption of a combination in the dataset's grammar (see the module docstring)."""
    caption = f"a {combo.colour} {combo.shape} on a {combo.background} background"
    if position is not None:
        caption = f"{caption}, {position}"
    # The trigger word goes last: CLIP's attention is causal, so every token before it encodes
    # exactly as in a plain caption, and the LoRA only has to add the style.
    return f"{caption}, {TRIGGER_WORD}" if outlined else caption


def _covers_all_pairs(train: list[Combo]) -> bool:
    pairs = [set(), set(), set()]
    for c in train:
        pairs[0].add((c.colour, c.shape))
        pairs[1].add((c.colour, c.background))
        pairs[2].add((c.shape, c.background))
    want = [
        {(a, s) for a in COLOURS for s in SHAPES},
        {(a, b) for a in COLOURS for b in COLOURS if a != b},
        {(s, b) for s in SHAPES for b in COLOURS},
    ]
    return pairs == want


def held_out_combos(seed: int = SPLIT_SEED, fraction: float = HELD_OUT_FRACTION) -> list[Combo]:
    """A seeded ``fraction`` of :func:`all_combos` kept out of training, in :func:`all_combos` order.

    Chosen greedily in a seeded random order, skipping any combo whose removal would leave some
    (colour, shape), (colour, background) or (shape, background) pair without a training example:
    the model must then compose pairs it has seen into triples it has not.
    """
    combos = all_combos()
    target = int(np.ceil(fraction * len(combos)))
    order = np.random.default_rng(seed).permutation(len(combos))
    held: set[int] = set()
    for index in order:
        if len(held) == target:
            break
        candidate = held | {int(index)}
        if _covers_all_pairs([c for i, c in enumerate(combos) if i not in candidate]):
            held = candidate
    if len(held) != target:
        raise RuntimeError(f"could only hold out {len(held)} of {target} combos with every pair kept in training")
    return [c for i, c in enumerate(combos) if i in held]


def train_combos(seed: int = SPLIT_SEED) -> list[Combo]:
    """:func:`all_combos` minus :func:`held_out_combos`."""
    held = set(held_out_combos(seed))
    return [c for c in all_combos() if c not in held]


def _position_centre(position: str | None, size: float, rng: np.random.Generator) -> tuple[float, float]:
    """Centre (x, y) of a shape box of side ``size`` for a position word (None: anywhere)."""
    lo, hi = size / 2 + 1, IMAGE_SIZE - size / 2 - 1
    mid = IMAGE_SIZE / 2
    # "left" means the whole box lies mostly left of centre, with the other axis near the middle.
    side_lo, side_hi = lo, max(lo, mid - size / 4)
    far_lo, far_hi = min(hi, mid + size / 4), hi
    near_lo, near_hi = mid - 6, mid + 6
    if position is None:
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    if position == "center":
        return float(rng.uniform(mid - 3, mid + 3)), float(rng.uniform(mid - 3, mid + 3))
    across = float(rng.uniform(near_lo, near_hi))
    if position == "left":
        return float(rng.uniform(side_lo, side_hi)), across
    if position == "right":
        return float(rng.uniform(far_lo, far_hi)), across
    if position == "top":
        return across, float(rng.uniform(side_lo, side_hi))
    if position == "bottom":
        return across, float(rng.uniform(far_lo, far_hi))
    raise ValueError(f"unknown position word {position!r}; expected one of {POSITIONS}")


def random_sample(
    rng: np.random.Generator,
    combos: list[Combo],
    *,
    outlined: bool = False,
    position_probability: float = POSITION_WORD_PROBABILITY,
) -> Sample:
    """Draw one sample's parameters: a combo from ``combos``, a size, a position (word or none)."""
    combo = combos[int(rng.integers(len(combos)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))] if rng.random() < position_probability else None
    # Positioned shapes must fit beside the centre line, so they are capped smaller.
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE if position in (None, "center") else 30))
    cx, cy = _position_centre(position, size, rng)
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    return Sample(combo, box, position, outlined)


def shape_coverage(shape: str, box: tuple[float, float, float, float], outlined: bool) -> np.ndarray:
    """Fraction of each pixel inside the shape, (64, 64) float32, by supersampling."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    # Signed distance-like "depth inside the shape" in pixels: > 0 inside; outlines keep 0 < depth < width.
    if shape == "circle":
        depth = half - np.hypot(x - cx, y - cy)
    elif shape == "square":
        depth = half - np.maximum(np.abs(x - cx), np.abs(y - cy))
    elif shape == "triangle":
        # Upright isosceles triangle filling the box: apex at top centre, base along the bottom.
        side = y1 - y0
        bottom = y1 - y
        # Perpendicular distance to each slanted side (cross product with the side's direction).
        side_length = np.hypot(side, half)
        left_side = (side * (x - x0) - half * bottom) / side_length
        right_side = (side * (x1 - x) - half * bottom) / side_length
        depth = np.minimum(bottom, np.minimum(left_side, right_side))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    inside = depth > 0
    if outlined:
        inside &= depth < OUTLINE_WIDTH
    return inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def render(sample: Sample) -> np.ndarray:
    """The image of a sample: (64, 64, 3) uint8 RGB."""
    coverage = shape_coverage(sample.combo.shape, sample.box, sample.outlined)[..., None]
    fg = np.array(PALETTE[sample.combo.colour], dtype=np.float32)
    bg = np.array(PALETTE[sample.combo.background], dtype=np.float32)
    return np.rint(coverage * fg + (1 - coverage) * bg).astype(np.uint8)


def silhouette(sample: Sample) -> np.ndarray:
    """The ControlNet control image of a sample: the filled shape white on black, (64, 64) float32 in [0, 1]."""
    return shape_coverage(sample.combo.shape, sample.box, outlined=False)


@dataclass
class RenderedSet:
    """A pre-rendered dataset held in memory.

    images: (N, 64, 64, 3) uint8; silhouettes: (N, 64, 64) float32 in [0, 1]; captions: N strings.
    """

    samples: list[Sample]
    images: np.ndarray
    silhouettes: np.ndarray

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]


def render_dataset(
    count: int,
    seed: int,
    combos: list[Combo] | None = None,
    *,
    outlined: bool = False,
    position_probability: float = POSITION_WORD_PROBABILITY,
    with_silhouettes: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RenderedSet:
    """Render ``count`` samples of ``combos`` (default: the training combos) from ``seed``.

    With ``cache_dir`` the pixels are stored there once (an .npz named by the arguments) and read
    back on later calls; the samples themselves are always redrawn from the seed (cheap).
    """
    rng = np.random.default_rng(seed)
    combos = train_combos() if combos is None else combos
    samples = [
        random_sample(rng, combos, outlined=outlined, position_probability=position_probability)
        for _ in range(count)
    ]
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(repr((count, seed, combos, outlined, position_probability, with_silhouettes,
                                 PALETTE, OUTLINE_WIDTH, SUPERSAMPLE)).encode()).hexdigest()[:16]
        cache_path = Path(cache_dir) / f"shapes-{count}-{seed}-{key}.npz"
        if cache_path.exists():
            with np.load(cache_path) as cached:
                return RenderedSet(samples, cached["images"], cached["silhouettes"])
    images = np.stack([render(s) for s in samples]) if samples else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    sil = (
        np.stack([silhouette(s) for s in samples])
        if with_silhouettes and samples
        else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    )
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_path, images=images, silhouettes=sil)
    return RenderedSet(samples, images, sil)
