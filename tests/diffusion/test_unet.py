"""Tests for nodegraph_diffusion.networks.unet: parity with diffusers UNet2DConditionModel, key mapping, config from shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _unet_fixtures import (
    POOLED_DIM,
    TINY_INPAINT,
    TINY_SD1,
    TINY_SD2,
    TINY_SDXL,
    TINY_SDXL_REFINER,
    TINY_SDXL_UNEVEN,
    TOL,
    diffusers_unet,
    max_err,
    unet_inputs,
)

from nodegraph_diffusion.networks import unet
from nodegraph_diffusion.networks.unet import (
    SD1_CONFIG,
    SD2_CONFIG,
    SDXL_CONFIG,
    SDXL_REFINER_CONFIG,
    ControlResiduals,
    UNet,
    UNetConfig,
    UNetConfigError,
    UNetInputError,
)

ORIGINAL_SIZE = (1024, 768)
CROP_TOP_LEFT = (16, 48)
TARGET_SIZE = (896, 1152)
AESTHETIC_SCORE = 6.0

TINY_CASES = {
    "sd1": TINY_SD1,
    "sd2": TINY_SD2,
    "sdxl": TINY_SDXL,
    "sdxl_refiner": TINY_SDXL_REFINER,
    "sdxl_uneven_decoder": TINY_SDXL_UNEVEN,
    "inpaint": TINY_INPAINT,
}
FULL_SIZE = {"sd1": SD1_CONFIG, "sd2": SD2_CONFIG, "sdxl": SDXL_CONFIG, "sdxl_refiner": SDXL_REFINER_CONFIG}


def our_unet_from(reference, config: UNetConfig) -> UNet:
    """Our U-Net carrying the reference's weights, moved through the key mapping (strict)."""
    ours = UNet(config).eval()
    ours.load_state_dict(unet.ldm_unet_keys_from_diffusers(reference.state_dict()), strict=True)
    return ours


def conditioning(config: UNetConfig, inputs: dict) -> tuple[torch.Tensor | None, dict | None]:
    """Our ``y`` and diffusers' ``added_cond_kwargs`` for the same SDXL size conditioning."""
    if config.adm_in_channels is None:
        return None, None
    pooled = inputs["pooled"]
    refiner = config.adm_in_channels == unet.sdxl_vector_conditioning(
        pooled[:1], ORIGINAL_SIZE, CROP_TOP_LEFT, aesthetic_score=AESTHETIC_SCORE
    ).shape[1]
    if refiner:
        y = unet.sdxl_vector_conditioning(pooled, ORIGINAL_SIZE, CROP_TOP_LEFT, aesthetic_score=AESTHETIC_SCORE)
        time_ids = [*ORIGINAL_SIZE, *CROP_TOP_LEFT, AESTHETIC_SCORE]
    else:
        y = unet.sdxl_vector_conditioning(pooled, ORIGINAL_SIZE, CROP_TOP_LEFT, target_size=TARGET_SIZE)
        time_ids = [*ORIGINAL_SIZE, *CROP_TOP_LEFT, *TARGET_SIZE]
    batch = pooled.shape[0]
    added = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids] * batch, dtype=torch.float32)}
    return y, added


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_matches_diffusers(name: str) -> None:
    config = TINY_CASES[name]
    reference = diffusers_unet(config)
    ours = our_unet_from(reference, config)
    inputs = unet_inputs(config)
    y, added = conditioning(config, inputs)
    with torch.inference_mode():
        expected = reference(
            inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"], added_cond_kwargs=added
        ).sample
        got = ours(inputs["x"], inputs["timesteps"], inputs["context"], y=y)
    assert got.shape == (2, config.out_channels, 16, 16)
    assert expected.abs().max() > 0.1  # a wiring mistake cannot hide behind a zero output
    assert max_err(got, expected) <= TOL


@pytest.mark.parity
def test_matches_diffusers_on_latents_not_divisible_by_the_downsampling() -> None:
    # 9x11 latents go 9x11 -> 5x6 -> 3x3 and back: the upsamplers must hit the skip sizes exactly.
    reference = diffusers_unet(TINY_SD1)
    ours = our_unet_from(reference, TINY_SD1)
    inputs = unet_inputs(TINY_SD1, height=9, width=11)
    with torch.inference_mode():
        expected = reference(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"]).sample
        got = ours(inputs["x"], inputs["timesteps"], inputs["context"])
    assert got.shape == (2, 4, 9, 11)
    assert max_err(got, expected) <= TOL


@pytest.mark.parity
def test_scalar_timestep_is_broadcast_like_diffusers() -> None:
    reference = diffusers_unet(TINY_SD2)
    ours = our_unet_from(reference, TINY_SD2)
    inputs = unet_inputs(TINY_SD2)
    t = torch.tensor(421)
    with torch.inference_mode():
        expected = reference(inputs["x"], t, encoder_hidden_states=inputs["context"]).sample
        got = ours(inputs["x"], t, inputs["context"])
        got_from_float = ours(inputs["x"], 421.0, inputs["context"])
    assert max_err(got, expected) <= TOL
    assert torch.equal(got_from_float, got)


@pytest.mark.parity
def test_gradients_match_diffusers() -> None:
    # The forward works in place on fresh activations; autograd must still see the right graph.
    reference = diffusers_unet(TINY_SDXL)
    ours = our_unet_from(reference, TINY_SDXL)
    inputs = unet_inputs(TINY_SDXL, height=8, width=8)
    y, added = conditioning(TINY_SDXL, inputs)
    x_ref = inputs["x"].clone().requires_grad_(True)
    x_ours = inputs["x"].clone().requires_grad_(True)
    t, context = inputs["timesteps"], inputs["context"]
    reference(x_ref, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.square().sum().backward()
    ours(x_ours, t, context, y=y).square().sum().backward()
    assert x_ref.grad is not None and x_ours.grad is not None
    scale = x_ref.grad.abs().max().item()
    assert scale > 0
    assert max_err(x_ours.grad, x_ref.grad) <= TOL * max(1.0, scale)
    weight = "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"
    ours_grad = dict(ours.named_parameters())[weight].grad
    ref_grad = reference.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[0].proj.weight.grad
    assert ours_grad is not None and max_err(ours_grad, ref_grad) <= TOL * max(1.0, ref_grad.abs().max().item())


@pytest.mark.parity
def test_timestep_embedding_matches_diffusers() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (320, 256, 7):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert max_err(unet.timestep_embedding(t, dim), expected) <= 1e-6


def test_sdxl_vector_conditioning_layout() -> None:
    pooled = torch.randn(3, POOLED_DIM)
    y = unet.sdxl_vector_conditioning(pooled, (1024, 1024), (0, 0), target_size=(1024, 1024))
    assert y.shape == (3, POOLED_DIM + 6 * 256)
    assert torch.equal(y[:, :POOLED_DIM], pooled)
    size_embedding = unet.timestep_embedding(torch.tensor([1024.0]), 256)[0]
    assert torch.equal(y[1, POOLED_DIM : POOLED_DIM + 256], size_embedding)
    crop_embedding = unet.timestep_embedding(torch.tensor([0.0]), 256)[0]
    assert torch.equal(y[0, POOLED_DIM + 2 * 256 : POOLED_DIM + 3 * 256], crop_embedding)
    refiner = unet.sdxl_vector_conditioning(pooled, (1024, 1024), aesthetic_score=2.5)
    assert refiner.shape == (3, POOLED_DIM + 5 * 256)
    with pytest.raises(UNetInputError):
        unet.sdxl_vector_conditioning(pooled, (1024, 1024), target_size=(1024, 1024), aesthetic_score=6.0)


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_config_from_shapes_round_trip(name: str) -> None:
    config = TINY_CASES[name]
    with torch.device("meta"):
        model = UNet(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert unet.unet_config_from_shapes(shapes) == config


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_config_from_shapes_round_trip(name: str) -> None:
    config = FULL_SIZE[name]
    with torch.device("meta"):
        model = UNet(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert unet.unet_config_from_shapes(shapes) == config


@pytest.mark.parity
@pytest.mark.parametrize(
    ("name", "diffusers_kwargs", "parameters"),
    [
        ("sd1", {"cross_attention_dim": 768}, 859_520_964),
        (
            "sd2",
            {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
            865_910_724,
        ),
        (
            "sdxl",
            {
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "block_out_channels": (320, 640, 1280),
                "cross_attention_dim": 2048,
                "attention_head_dim": [5, 10, 20],
                "use_linear_projection": True,
                "transformer_layers_per_block": [1, 2, 10],
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
            },
            2_567_463_684,
        ),
    ],
)
def test_full_size_layouts_map_key_for_key(name: str, diffusers_kwargs: dict, parameters: int) -> None:
    # The real SD1.5 / SD2.1 / SDXL configs, built without memory: every diffusers tensor lands on
    # one of ours with the same shape, and nothing of ours is left over.
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_kwargs)
        ours = UNet(FULL_SIZE[name])
    mapped = unet.ldm_unet_keys_from_diffusers(reference.state_dict())
    own = ours.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[key].shape == own[key].shape for key in own)
    assert sum(t.numel() for t in own.values()) == parameters


def test_config_from_shapes_head_conventions_and_hints() -> None:
    with torch.device("meta"):
        conv_model = UNet(TINY_SD1)
        linear_model = UNet(TINY_SD2)
    conv_shapes = {k: tuple(v.shape) for k, v in conv_model.state_dict().items()}
    linear_shapes = {k: tuple(v.shape) for k, v in linear_model.state_dict().items()}
    assert unet.unet_config_from_shapes(conv_shapes).num_heads == 8
    assert unet.unet_config_from_shapes(linear_shapes).head_dim == 64
    hinted = unet.unet_config_from_shapes(linear_shapes, head_dim=32)
    assert (hinted.num_heads, hinted.head_dim) == (None, 32)
    assert unet.unet_config_from_shapes(conv_shapes, num_heads=4).num_heads == 4
    encoder = unet.unet_config_from_shapes(
        {k: v for k, v in conv_shapes.items() if not k.startswith(("output_blocks.", "out."))}, encoder_only=True
    )
    assert encoder == replace(TINY_SD1, out_channels=TINY_SD1.in_channels)


def test_config_from_shapes_rejects_other_layouts() -> None:
    with torch.device("meta"):
        model = UNet(TINY_SD1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(UNetConfigError, match="input_blocks.0.0.weight"):
        unet.unet_config_from_shapes({k: v for k, v in shapes.items() if k != "input_blocks.0.0.weight"})
    with pytest.raises(UNetConfigError, match="output blocks"):
        unet.unet_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("output_blocks.8.")})
    with pytest.raises(UNetConfigError, match="middle_block"):
        unet.unet_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("middle_block.1.")})


def test_diffusers_mapping_names_unknown_keys() -> None:
    reference = diffusers_unet(TINY_SD1).state_dict()
    reference["class_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(UNetConfigError, match="class_embedding.linear_1.weight"):
        unet.ldm_unet_keys_from_diffusers(reference)


def test_config_validation() -> None:
    with pytest.raises(UNetConfigError, match="transformer_depth"):
        UNetConfig(channel_mult=(1, 2), transformer_depth=(1, 1, 1))
    with pytest.raises(UNetConfigError, match="exactly one"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(UNetConfigError, match="cannot be split"):
        replace(TINY_SD2, head_dim=48)


def test_forward_rejects_mismatched_inputs() -> None:
    model = UNet(TINY_SDXL).eval()
    inputs = unet_inputs(TINY_SDXL, height=8, width=8)
    y = unet.sdxl_vector_conditioning(inputs["pooled"], (64, 64), target_size=(64, 64))
    with torch.inference_mode():
        with pytest.raises(UNetInputError, match="y of shape"):
            model(inputs["x"], inputs["timesteps"], inputs["context"])
        with pytest.raises(UNetInputError, match="context"):
            model(inputs["x"], inputs["timesteps"], inputs["context"][..., :16], y=y)
        with pytest.raises(UNetInputError, match="x must have shape"):
            model(inputs["x"][:, :3], inputs["timesteps"], inputs["context"], y=y)
        with pytest.raises(UNetInputError, match="control"):
            model(inputs["x"], inputs["timesteps"], inputs["context"], y=y, control=ControlResiduals([], inputs["x"]))


@pytest.mark.parity
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_norm_epsilons_match_diffusers(name: str) -> None:
    # Epsilons barely move outputs on random activations, so they are compared directly: every
    # GroupNorm/LayerNorm of ours against the diffusers module its weight came from.
    config = TINY_CASES[name]
    reference = diffusers_unet(config)
    own_modules = dict(UNet(config).named_modules())
    layout = unet.DiffusersUNetLayout.of(reference.state_dict())
    compared = 0
    for diffusers_name, module in reference.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            our_name = unet.ldm_key_from_diffusers(f"{diffusers_name}.weight", layout).removesuffix(".weight")
            counterpart = own_modules[our_name]
            assert type(counterpart) is type(module) and counterpart.eps == module.eps, diffusers_name
            compared += 1
    assert compared > 20
