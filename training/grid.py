"""The README's example grid: images the shipped model makes through the txt2img workflow.

``python -m training.grid [OUTPUT]`` (default ``docs/tiny-shapes-grid.png``) runs
workflows/txt2img.json at its default settings once per (prompt, seed) and tiles the images, one
row per prompt with the prompt written beside it. Rows marked "held out" use colour/shape/background
combinations the model never saw in training.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import shapes
from .architecture import REPO_ROOT
from .evaluate import generate
from .workflow_runs import WorkflowRunner

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "tiny-shapes-grid.png"
SEEDS = (0, 1, 2, 3, 4)
SCALE = 2
LABEL_WIDTH = 330
PAD = 4


def grid_prompts() -> list[tuple[str, bool]]:
    """(prompt, held out?): the README's quick-start prompt, two more, then three held-out combinations, one per shape."""
    held = shapes.held_out_combos()
    chosen = [shapes.Combo("red", "circle", "blue"), shapes.Combo("yellow", "square", "purple"),
              shapes.Combo("white", "triangle", "green")]
    others = [combo for combo in held if combo not in chosen]
    chosen += [next(combo for combo in others if combo.shape == shape) for shape in shapes.SHAPES]
    return [(shapes.caption_for(combo), combo in held) for combo in chosen]


def render_grid(runner: WorkflowRunner, rows: Sequence[tuple[str, bool]], seeds: Sequence[int]) -> Image.Image:
    """One row per prompt, one column per seed; each image upscaled ``SCALE`` times (nearest)."""
    cell = 64 * SCALE
    sheet = Image.new("RGB", (LABEL_WIDTH + len(seeds) * (cell + PAD), len(rows) * (cell + PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, held_out) in enumerate(rows):
        top = r * (cell + PAD)
        draw.text((6, top + cell // 2 - 12), prompt, fill="black")
        draw.text((6, top + cell // 2 + 2), "(held out)" if held_out else "(seen in training)", fill="gray")
        for c, seed in enumerate(seeds):
            image = Image.fromarray(np.ascontiguousarray(generate(runner, "txt2img", prompt, seed)))
            sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (LABEL_WIDTH + c * (cell + PAD), top))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    with WorkflowRunner() as runner:
        sheet = render_grid(runner, grid_prompts(), SEEDS)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
