"""Measure the shipped tiny-shapes models with the pixel detector; prints JSON.

``python -m training.evaluate [base|controlnet|lora|mmdit|all] [--quick] [--device auto|cpu|cuda]``
generates every image by running the ready workflows (workflows/txt2img.json, controlnet.json,
lora.json; txt2img_mmdit.json for ``mmdit``) through the engine, as ``nodegraph run`` would, at
their default settings; only the prompt, the seed and the control image are set per image:

- base: shape-colour / background-colour / shape accuracy on the held-out combinations;
- mmdit: the same accuracies for the SD3-layout MMDiT through txt2img_mmdit.json;
- controlnet: mean IoU between the control silhouette and the generated shape's (hole-filled)
  mask, with prompts naming a held-out colour pair and a random shape (often not the silhouette's);
- lora: mean filled fraction of the shape's box with the "outlined" LoRA at strength 1 versus the
  base model on the same prompts and seeds, and whether strength 0 reproduces the base exactly.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import detector, shapes
from .workflow_runs import WorkflowRunner

EVAL_SEEDS = (0, 1, 2)
MMDIT_WORKFLOW = "txt2img_mmdit"
QUICK_COMBOS = 6


def generate(runner: WorkflowRunner, workflow: str, prompt: str, seed: int, **extra: dict[str, Any]) -> np.ndarray:
    """One image from a ready workflow with its prompt and seed set (and ``extra`` node overrides)."""
    return runner.image(workflow, {"prompt": {"text": prompt}, "sampler": {"seed": seed}, **extra})


def evaluate_base(runner: WorkflowRunner, combos: Sequence[shapes.Combo] | None = None,
                  seeds: Sequence[int] = EVAL_SEEDS, workflow: str = "txt2img") -> dict[str, float]:
    """Accuracies on ``combos`` (default: the held-out ones), one image per (combo, seed), plain captions,
    from a text-to-image ``workflow`` (txt2img, or txt2img_mmdit for the MMDiT)."""
    combos = shapes.held_out_combos() if combos is None else list(combos)
    pairs = [(combo, seed) for combo in combos for seed in seeds]
    found = [detector.detect(generate(runner, workflow, shapes.caption_for(c), s)) for c, s in pairs]
    n = len(pairs)
    return {
        "images": n,
        "shape_colour_accuracy": sum(d.colour == c.colour for d, (c, _) in zip(found, pairs)) / n,
        "background_accuracy": sum(d.background == c.background for d, (c, _) in zip(found, pairs)) / n,
        "shape_accuracy": sum(d.shape == c.shape for d, (c, _) in zip(found, pairs)) / n,
        "all_three_accuracy": sum((d.colour, d.shape, d.background) == (c.colour, c.shape, c.background)
                                  for d, (c, _) in zip(found, pairs)) / n,
    }


def controlnet_cases(count: int, seed: int = 7) -> tuple[list[str], np.ndarray]:
    """(prompts, silhouettes (N, 64, 64) in [0, 1]) for the ControlNet check: random shapes at random
    places; each prompt names a held-out colour pair and a random shape, independent of the silhouette's."""
    rng = np.random.default_rng(seed)
    held = shapes.held_out_combos()
    samples = [shapes.random_sample(rng, shapes.all_combos(), position_probability=0.0) for _ in range(count)]
    prompts = []
    for _ in samples:
        combo = held[int(rng.integers(len(held)))]
        prompts.append(f"a {combo.colour} {shapes.SHAPES[int(rng.integers(3))]} on a {combo.background} background")
    return prompts, np.stack([shapes.silhouette(s) for s in samples])


def evaluate_controlnet(runner: WorkflowRunner, count: int = 48) -> dict[str, float]:
    prompts, silhouettes = controlnet_cases(count)
    ious = []
    for i, (prompt, silhouette) in enumerate(zip(prompts, silhouettes)):
        hint = np.repeat(np.rint(silhouette * 255).astype(np.uint8)[..., None], 3, axis=-1)
        name = runner.add_input(f"silhouette-{i}.png", hint)
        image = generate(runner, "controlnet", prompt, i, control_image={"image": name})
        ious.append(detector.mask_iou(detector.fill_holes(detector.detect(image).mask), silhouette > 0.5))
    return {"images": count, "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious))}


def evaluate_lora(runner: WorkflowRunner, combos: Sequence[shapes.Combo] | None = None,
                  seeds: Sequence[int] = (0, 1)) -> dict[str, float]:
    combos = shapes.held_out_combos() if combos is None else list(combos)
    pairs = [(combo, seed) for combo in combos for seed in seeds]
    prompts = [shapes.caption_for(c, outlined=True) for c, _ in pairs]
    base = [generate(runner, "txt2img", p, s) for p, (_, s) in zip(prompts, pairs)]
    styled = [detector.detect(generate(runner, "lora", p, s)) for p, (_, s) in zip(prompts, pairs)]
    off = {"lora": {"strength_model": 0.0, "strength_clip": 0.0}}
    zero = [generate(runner, "lora", p, s, **off) for p, (_, s) in list(zip(prompts, pairs))[:4]]
    return {
        "images": len(pairs),
        "base_filled_fraction": float(np.mean([detector.detect(img).filled_fraction for img in base])),
        "lora_filled_fraction": float(np.mean([d.filled_fraction for d in styled])),
        "lora_colour_accuracy": sum(d.colour == c.colour for d, (c, _) in zip(styled, pairs)) / len(pairs),
        "strength_0_identical_to_base": all(np.array_equal(a, b) for a, b in zip(zero, base)),
    }


def settings(runner: WorkflowRunner, workflow: str = "txt2img") -> dict[str, Any]:
    """A text-to-image workflow's sampling settings the figures were made with (and its shift, if it sets one)."""
    nodes = runner.document(workflow)["nodes"]
    inputs = nodes["sampler"]["inputs"]
    found = {key: inputs[key] for key in ("sampler_name", "scheduler", "steps", "cfg")}
    found.update({"shift": node["inputs"]["shift"] for node in nodes.values() if node["type"] == "ModelSamplingSD3"})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["base", "controlnet", "lora", "mmdit", "all"])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COMBOS} held-out combinations, one seed")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    combos = shapes.held_out_combos()[:QUICK_COMBOS] if args.quick else None
    seeds = (0,) if args.quick else EVAL_SEEDS
    with WorkflowRunner(args.device) as runner:
        report: dict[str, object] = {"workflow_settings": settings(runner),
                                     "held_out_combinations": len(shapes.held_out_combos())}
        if args.what in ("base", "all"):
            report["base_held_out"] = evaluate_base(runner, combos, seeds)
        if args.what in ("controlnet", "all"):
            report["controlnet"] = evaluate_controlnet(runner, 8 if args.quick else 48)
        if args.what in ("lora", "all"):
            report["lora"] = evaluate_lora(runner, combos, seeds if args.quick else seeds[:2])
        if args.what in ("mmdit", "all"):
            report["mmdit_workflow_settings"] = settings(runner, MMDIT_WORKFLOW)
            report["mmdit_held_out"] = evaluate_base(runner, combos, seeds, MMDIT_WORKFLOW)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
