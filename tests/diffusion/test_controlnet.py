"""Tests for nodegraph_diffusion.networks.controlnet: diffusers parity, residuals applied to the U-Net, config from shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _unet_fixtures import (
    TINY_SD1,
    TINY_SDXL,
    TOL,
    diffusers_controlnet,
    diffusers_unet,
    max_err,
    unet_inputs,
)

from nodegraph_diffusion.networks import controlnet
from nodegraph_diffusion.networks import unet
from nodegraph_diffusion.networks.controlnet import ControlNet, ControlNetConfig
from nodegraph_diffusion.networks.unet import ControlResiduals, UNet, UNetConfigError, UNetInputError

# Smaller than the real (16, 32, 96, 256) but with the same four stages (hint = 8x the latents).
HINT_CHANNELS = (8, 16, 24, 32)
ORIGINAL_SIZE, CROP, TARGET = (512, 512), (0, 32), (768, 512)

CASES = {
    "sd1": ControlNetConfig(
        unet=replace(TINY_SD1, out_channels=TINY_SD1.in_channels), hint_block_channels=HINT_CHANNELS
    ),
    "sdxl": ControlNetConfig(unet=TINY_SDXL, hint_block_channels=HINT_CHANNELS),
}


def sdxl_conditioning(inputs: dict) -> tuple[torch.Tensor, dict]:
    pooled = inputs["pooled"]
    y = unet.sdxl_vector_conditioning(pooled, ORIGINAL_SIZE, CROP, target_size=TARGET)
    time_ids = torch.tensor([[*ORIGINAL_SIZE, *CROP, *TARGET]] * pooled.shape[0], dtype=torch.float32)
    return y, {"text_embeds": pooled, "time_ids": time_ids}


def models(name: str):
    """(diffusers ControlNetModel, ours with its weights, diffusers UNet, ours with its weights)."""
    config = CASES[name]
    reference_cn = diffusers_controlnet(config.unet, config.hint_block_channels)
    ours_cn = ControlNet(config).eval()
    ours_cn.load_state_dict(controlnet.ldm_controlnet_keys_from_diffusers(reference_cn.state_dict()), strict=True)
    unet_config = TINY_SD1 if name == "sd1" else TINY_SDXL
    reference_unet = diffusers_unet(unet_config)
    ours_unet = UNet(unet_config).eval()
    ours_unet.load_state_dict(unet.ldm_unet_keys_from_diffusers(reference_unet.state_dict()), strict=True)
    return reference_cn, ours_cn, reference_unet, ours_unet


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_residuals_and_controlled_unet_match_diffusers(name: str, strength: float) -> None:
    reference_cn, ours_cn, reference_unet, ours_unet = models(name)
    config = CASES[name]
    inputs = unet_inputs(config.unet, height=8, width=8)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    y, added = sdxl_conditioning(inputs) if name == "sdxl" else (None, None)
    x, t, context = inputs["x"], inputs["timesteps"], inputs["context"]
    with torch.inference_mode():
        expected_down, expected_mid = reference_cn(
            x, t, context, hint, conditioning_scale=strength, added_cond_kwargs=added, return_dict=False
        )
        residuals = ours_cn(x, hint, t, context, y=y, strength=strength)
        assert len(residuals.down) == len(expected_down) == len(ours_unet.input_blocks)
        for got, expected in zip(residuals.down, expected_down):
            assert got.shape == expected.shape
            assert expected.abs().max() > 0.1
            assert max_err(got, expected) <= TOL
        assert max_err(residuals.middle, expected_mid) <= TOL

        expected_out = reference_unet(
            x,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs=added,
            down_block_additional_residuals=expected_down,
            mid_block_additional_residual=expected_mid,
        ).sample
        got_out = ours_unet(x, t, context, y=y, control=residuals)
        uncontrolled = ours_unet(x, t, context, y=y)
    assert max_err(got_out, expected_out) <= TOL
    assert max_err(got_out, uncontrolled) > 100 * TOL  # the residuals really were applied


@pytest.mark.parity
def test_residuals_of_two_controlnets_add_up() -> None:
    _, ours_cn, _, ours_unet = models("sd1")
    inputs = unet_inputs(TINY_SD1, height=8, width=8)
    x, t, context = inputs["x"], inputs["timesteps"], inputs["context"]
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        a = ours_cn(x, hint, t, context, strength=0.25)
        b = ours_cn(x, hint, t, context, strength=0.75)
        whole = ours_cn(x, hint, t, context)
        total = a + b
        assert all(max_err(s, w) <= TOL for s, w in zip(total.down, whole.down))
        assert max_err(ours_unet(x, t, context, control=total), ours_unet(x, t, context, control=whole)) <= TOL
    with pytest.raises(UNetInputError):
        _ = a + ControlResiduals(a.down[:-1], a.middle)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_from_shapes_round_trip(name: str) -> None:
    config = CASES[name]
    with torch.device("meta"):
        model = ControlNet(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert controlnet.controlnet_config_from_shapes(shapes) == config


@pytest.mark.parity
def test_full_size_sd15_layout_maps_key_for_key() -> None:
    # The real SD1.5 ControlNet built without memory: every diffusers tensor lands on one of ours
    # with the same shape, the hint convs sit at 0, 2, ..., 14, and the config reads back.
    from diffusers import ControlNetModel

    config = ControlNetConfig(unet=unet.SD1_CONFIG)
    with torch.device("meta"):
        reference = ControlNetModel(cross_attention_dim=768)
        model = ControlNet(config)
    own = model.state_dict()
    mapped = controlnet.ldm_controlnet_keys_from_diffusers(reference.state_dict())
    assert set(mapped) == set(own)
    assert all(mapped[key].shape == own[key].shape for key in own)
    assert {k for k in own if k.startswith("input_hint_block.") and k.endswith(".weight")} == {
        f"input_hint_block.{i}.weight" for i in range(0, 15, 2)
    }
    assert len(model.zero_convs) == 12
    assert controlnet.controlnet_config_from_shapes({k: tuple(v.shape) for k, v in own.items()}) == config


def test_hint_of_the_wrong_size_is_rejected() -> None:
    model = ControlNet(CASES["sd1"]).eval()
    inputs = unet_inputs(TINY_SD1, height=8, width=8)
    with torch.inference_mode(), pytest.raises(UNetInputError, match="hint"):
        model(inputs["x"], torch.rand(2, 3, 32, 32), inputs["timesteps"], inputs["context"])


def test_diffusers_mapping_names_unknown_keys() -> None:
    config = CASES["sd1"]
    state = diffusers_controlnet(config.unet, config.hint_block_channels).state_dict()
    state["controlnet_cond_embedding.extra.weight"] = torch.zeros(1)
    with pytest.raises(UNetConfigError, match="controlnet_cond_embedding.extra.weight"):
        controlnet.ldm_controlnet_keys_from_diffusers(state)
