"""Measure the shipped tiny-shapes models with the pixel detector; prints JSON.

``python -m training.evaluate [base|controlnet|lora|all]`` loads the files under ``models/``
through the product's loaders and samples with :mod:`training.sampling` (Euler, 20 steps, CFG 5):

- base: shape-colour / background-colour / shape accuracy on the held-out combinations;
- controlnet: mean IoU between the control silhouette and the generated shape's (hole-filled)
  mask, with prompts naming a random shape (often not the silhouette's);
- lora: mean filled fraction of the shape's box with the "outlined" LoRA at strength 1 versus the
  base model on the same prompts and seeds, and whether strength 0 reproduces the base exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

import numpy as np
import torch

from nodegraph_diffusion.checkpoint import load_checkpoint, load_controlnet

from . import detector, shapes
from .architecture import CHECKPOINT_PATH, CONTROLNET_PATH, LORA_PATH, PromptEncoder, configure_torch
from .sampling import DEFAULT_CFG, DEFAULT_STEPS, TinyModel, generate

logger = logging.getLogger(__name__)

EVAL_SEEDS = (0, 1, 2)
BATCH = 64


def _batched_generate(model: TinyModel, prompts: Sequence[str], seeds: Sequence[int],
                      hints: torch.Tensor | None = None) -> np.ndarray:
    encoder = PromptEncoder()
    out = []
    for i in range(0, len(prompts), BATCH):
        out.append(generate(model, list(prompts[i:i + BATCH]), list(seeds[i:i + BATCH]),
                            hints=None if hints is None else hints[i:i + BATCH], prompt_encoder=encoder))
    return np.concatenate(out)


def evaluate_base(model: TinyModel, combos: Sequence[shapes.Combo] | None = None,
                  seeds: Sequence[int] = EVAL_SEEDS) -> dict[str, float]:
    """Accuracies on ``combos`` (default: the held-out ones), one image per (combo, seed), plain captions."""
    combos = shapes.held_out_combos() if combos is None else list(combos)
    pairs = [(combo, seed) for combo in combos for seed in seeds]
    images = _batched_generate(model, [shapes.caption_for(c) for c, _ in pairs], [s for _, s in pairs])
    found = [detector.detect(image) for image in images]
    n = len(pairs)
    return {
        "images": n,
        "shape_colour_accuracy": sum(d.colour == c.colour for d, (c, _) in zip(found, pairs)) / n,
        "background_accuracy": sum(d.background == c.background for d, (c, _) in zip(found, pairs)) / n,
        "shape_accuracy": sum(d.shape == c.shape for d, (c, _) in zip(found, pairs)) / n,
        "all_three_accuracy": sum((d.colour, d.shape, d.background) == (c.colour, c.shape, c.background)
                                  for d, (c, _) in zip(found, pairs)) / n,
    }


def controlnet_cases(count: int, seed: int = 7) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """(prompts, hints (N, 3, 64, 64), silhouette masks (N, 64, 64) bool) for the ControlNet check.

    Silhouettes of random shapes at random places; each prompt names a held-out colour pair and a
    random shape, independent of the silhouette's.
    """
    from .train_controlnet import silhouettes_to_hints

    rng = np.random.default_rng(seed)
    held = shapes.held_out_combos()
    samples = [shapes.random_sample(rng, shapes.all_combos(), position_probability=0.0) for _ in range(count)]
    sil = np.stack([shapes.silhouette(s) for s in samples])
    prompts = []
    for _ in samples:
        combo = held[int(rng.integers(len(held)))]
        prompts.append(f"a {combo.colour} {shapes.SHAPES[int(rng.integers(3))]} on a {combo.background} background")
    return prompts, silhouettes_to_hints(sil), sil > 0.5


def evaluate_controlnet(model: TinyModel, count: int = 48) -> dict[str, float]:
    prompts, hints, masks = controlnet_cases(count)
    images = _batched_generate(model, prompts, list(range(count)), hints)
    ious = [detector.mask_iou(detector.fill_holes(detector.detect(img).mask), mask) for img, mask in zip(images, masks)]
    return {"images": count, "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious))}


def evaluate_lora(model: TinyModel, seeds: Sequence[int] = (0, 1)) -> dict[str, float]:
    from .train_lora import generate_with_lora

    combos = shapes.held_out_combos()
    prompts = [shapes.caption_for(c, outlined=True) for c in combos for _ in seeds]
    all_seeds = [s for _ in combos for s in seeds]
    base = np.concatenate([generate(model, prompts[i:i + BATCH], all_seeds[i:i + BATCH])
                           for i in range(0, len(prompts), BATCH)])
    styled = np.concatenate([generate_with_lora(LORA_PATH, model, 1.0, prompts[i:i + BATCH], all_seeds[i:i + BATCH])
                             for i in range(0, len(prompts), BATCH)])
    # Same batch as the comparison: CPU kernels round differently for different batch sizes.
    zero = generate_with_lora(LORA_PATH, model, 0.0, prompts[:8], all_seeds[:8])
    base_same_batch = generate(model, prompts[:8], all_seeds[:8])
    base_fraction = [detector.detect(img).filled_fraction for img in base]
    styled_found = [detector.detect(img) for img in styled]
    return {
        "images": len(prompts),
        "base_filled_fraction": float(np.mean(base_fraction)),
        "lora_filled_fraction": float(np.mean([d.filled_fraction for d in styled_found])),
        "lora_colour_accuracy": sum(d.colour == c.colour for d, c in zip(styled_found, [c for c in combos for _ in seeds])) / len(prompts),
        "strength_0_identical_to_base": bool(np.array_equal(zero, base_same_batch)),
    }


def shipped_model() -> TinyModel:
    loaded = load_checkpoint(CHECKPOINT_PATH, device="cpu", dtype=torch.float32)
    return TinyModel(loaded.unet, loaded.vae, loaded.text_encoders["clip_l"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="?", default="all", choices=["base", "controlnet", "lora", "all"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    configure_torch()
    model = shipped_model()
    report: dict[str, object] = {"sampler": "euler", "scheduler": "normal", "steps": DEFAULT_STEPS, "cfg": DEFAULT_CFG}
    if args.what in ("base", "all"):
        report["base_held_out"] = evaluate_base(model)
    if args.what in ("controlnet", "all"):
        controlnet = load_controlnet(CONTROLNET_PATH, device="cpu", dtype=torch.float32).controlnet
        report["controlnet"] = evaluate_controlnet(TinyModel(model.unet, model.vae, model.text_encoder, controlnet))
    if args.what in ("lora", "all"):
        report["lora"] = evaluate_lora(model)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
