"""The shipped tiny-shapes files load through the product's generic loaders and do what their cards say.

The sampling checks are a reduced version of ``python -m training.evaluate``: a few prompts, the
same detector, the issue's thresholds.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from nodegraph_diffusion import checkpoint as checkpoint_module
from nodegraph_diffusion.checkpoint import (
    FileKind,
    ModelFamily,
    Prediction,
    detect,
    load_checkpoint,
    load_controlnet,
)
from nodegraph_diffusion.lora import load_lora

from training import detector, shapes
from training.architecture import (
    CHECKPOINT_PATH,
    CONTROLNET_PATH,
    LORA_PATH,
    TEXT_ENCODER_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
)
from training.export import MAX_CHECKPOINT_BYTES
from training.sampling import TinyModel, generate

pytestmark = pytest.mark.skipif(not CHECKPOINT_PATH.exists(), reason="tiny-shapes checkpoint not built yet")


@pytest.fixture(scope="module")
def model() -> TinyModel:
    loaded = load_checkpoint(CHECKPOINT_PATH, device="cpu", dtype=torch.float32)
    return TinyModel(loaded.unet, loaded.vae, loaded.text_encoders["clip_l"])


def test_checkpoint_is_a_small_fp16_sd1_file() -> None:
    assert CHECKPOINT_PATH.stat().st_size <= MAX_CHECKPOINT_BYTES
    detection = detect(CHECKPOINT_PATH)
    assert detection.kind is FileKind.CHECKPOINT
    assert detection.family is ModelFamily.SD1
    assert set(detection.components) == {"unet", "vae", "clip_l"}
    assert not detection.unclaimed_keys
    header = checkpoint_module.open_weights(CHECKPOINT_PATH)
    assert set(header.dtypes().values()) == {torch.float16}


def test_checkpoint_loads_through_the_generic_loader_as_sd1_eps() -> None:
    loaded = load_checkpoint(CHECKPOINT_PATH, device="cpu", dtype=torch.float32)
    assert loaded.family is ModelFamily.SD1
    assert loaded.prediction is Prediction.EPS
    assert loaded.unet_config == UNET_CONFIG
    assert loaded.vae_config is not None and loaded.vae_config.block_channels == VAE_CONFIG.block_channels
    assert loaded.latent_format.scaling_factor == pytest.approx(0.18215)
    assert loaded.text_encoder_configs["clip_l"] == TEXT_ENCODER_CONFIG
    assert not loaded.unexpected_keys


def test_loader_has_no_special_case_for_the_demo_model() -> None:
    from nodegraph_diffusion import text_encoder, unet, vae

    for module in (checkpoint_module, unet, vae, text_encoder):
        source = inspect.getsource(module).lower()
        assert "tiny" not in source and "demo" not in source, module.__name__


def test_controlnet_loads_as_an_sd1_controlnet() -> None:
    assert detect(CONTROLNET_PATH).kind is FileKind.CONTROLNET
    loaded = load_controlnet(CONTROLNET_PATH, device="cpu", dtype=torch.float32)
    assert loaded.family is ModelFamily.SD1
    assert loaded.config.unet.model_channels == UNET_CONFIG.model_channels
    assert CONTROLNET_PATH.stat().st_size <= 20 * 1024 * 1024


def test_lora_is_a_kohya_file_that_matches_every_weight(model: TinyModel) -> None:
    assert detect(LORA_PATH).kind is FileKind.LORA
    lora = load_lora(LORA_PATH)
    assert all(name.startswith(("lora_unet_", "lora_te_")) for name in lora.module_names)
    unet_deltas, unet_unmatched = lora.deltas("unet", model.unet.state_dict())
    text_deltas, text_unmatched = lora.deltas("clip_l", model.text_encoder.state_dict())
    assert unet_deltas and text_deltas and not unet_unmatched and not text_unmatched
    assert LORA_PATH.stat().st_size <= 5 * 1024 * 1024


def _held_out_detections(model: TinyModel) -> tuple[list[shapes.Combo], list[detector.Detection]]:
    held = shapes.held_out_combos()[::3]
    images = generate(model, [shapes.caption_for(c) for c in held], list(range(len(held))))
    return held, [detector.detect(image) for image in images]


def test_held_out_prompts_give_the_named_colours(model: TinyModel) -> None:
    # What the shipped model reaches (model card: 76% / 97% over 102 images), as a regression floor.
    held, found = _held_out_detections(model)
    n = len(held)
    assert sum(d.colour == c.colour for d, c in zip(found, held)) / n >= 0.6
    assert sum(d.background == c.background for d, c in zip(found, held)) / n >= 0.9


@pytest.mark.xfail(strict=True, reason="issue 5 targets not reached yet: the shipped model draws blobs, "
                   "shape accuracy is at chance (see models/checkpoints/tiny-shapes.md)")
def test_held_out_prompts_reach_the_issue_targets(model: TinyModel) -> None:
    held, found = _held_out_detections(model)
    n = len(held)
    assert sum(d.colour == c.colour for d, c in zip(found, held)) / n >= 0.9
    assert sum(d.background == c.background for d, c in zip(found, held)) / n >= 0.9
    assert sum(d.shape == c.shape for d, c in zip(found, held)) / n >= 0.8


def test_controlnet_follows_the_silhouette(model: TinyModel) -> None:
    # Model card: mean IoU 0.68 over 48 images (target 0.7); here a floor on a few of them.
    from training.evaluate import controlnet_cases

    prompts, hints, masks = controlnet_cases(8)
    controlnet = load_controlnet(CONTROLNET_PATH, device="cpu", dtype=torch.float32).controlnet
    controlled = TinyModel(model.unet, model.vae, model.text_encoder, controlnet)
    images = generate(controlled, prompts, list(range(8)), hints=hints)
    ious = [detector.mask_iou(detector.fill_holes(detector.detect(i).mask), m) for i, m in zip(images, masks)]
    without = generate(model, prompts, list(range(8)))
    ious_without = [detector.mask_iou(detector.fill_holes(detector.detect(i).mask), m) for i, m in zip(without, masks)]
    assert float(np.mean(ious)) >= 0.4
    assert float(np.mean(ious)) > float(np.mean(ious_without)) + 0.2


def _outlined_prompts() -> tuple[list[str], list[int]]:
    combos = shapes.held_out_combos()[::6]
    return [shapes.caption_for(c, outlined=True) for c in combos], list(range(len(combos)))


def test_lora_at_strength_zero_is_the_base_and_at_one_changes_the_image(model: TinyModel) -> None:
    from training.train_lora import generate_with_lora

    prompts, seeds = _outlined_prompts()
    base = generate(model, prompts, seeds)
    np.testing.assert_array_equal(generate_with_lora(LORA_PATH, model, 0.0, prompts, seeds), base)
    styled = generate_with_lora(LORA_PATH, model, 1.0, prompts, seeds)
    assert np.abs(styled.astype(np.float32) - base.astype(np.float32)).mean() > 5.0


@pytest.mark.xfail(strict=True, reason="issue 5 target not reached yet: the shipped LoRA does not make "
                   "outlines (filled fraction unchanged, see models/checkpoints/tiny-shapes.md)")
def test_lora_draws_outlines(model: TinyModel) -> None:
    from training.train_lora import generate_with_lora

    prompts, seeds = _outlined_prompts()
    base = generate(model, prompts, seeds)
    styled = generate_with_lora(LORA_PATH, model, 1.0, prompts, seeds)
    base_fill = np.mean([detector.detect(i).filled_fraction for i in base])
    styled_fill = np.mean([detector.detect(i).filled_fraction for i in styled])
    assert styled_fill < 0.75 * base_fill
