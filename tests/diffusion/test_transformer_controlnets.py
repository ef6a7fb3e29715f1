"""SD3/SD3.5 and Flux ControlNets against diffusers' SD3ControlNetModel and FluxControlNetModel, and the
transformers they guide against SD3Transformer2DModel / FluxTransformer2DModel fed the same residuals.

Every parameter (and the stored positional tables) is random. The ControlNets are shallower than
the models they guide (2 blocks for 4 or 5), so the spreading of outputs over the main blocks is
exercised, and Stability's SD3.5 layout and XLabs' layout are built from the diffusers weights by
an independent renaming written here (diffusers' conversion scripts, reversed where needed).
"""

from __future__ import annotations

import pytest
import torch
from _random_weights import randomize_
from nodegraph_diffusion.networks import flux as flux_module
from nodegraph_diffusion.networks import mmdit as mmdit_module
from nodegraph_diffusion.networks.flux_controlnet import (
    FluxControlNet,
    flux_controlnet_config_from_shapes,
    flux_controlnet_keys_from_diffusers,
    flux_controlnet_layout,
)
from nodegraph_diffusion.networks.mmdit_controlnet import (
    CONTROL_TYPE_KEY,
    SD3ControlNet,
    sd3_controlnet_config_from_shapes,
    sd3_controlnet_keys_from_diffusers,
    sd3_controlnet_keys_from_original,
    sd3_controlnet_layout,
)
from nodegraph_diffusion.networks.transformer_control import ControlShapeError
from torch import Tensor

pytestmark = pytest.mark.parity

TOL = 1e-4
BATCH = 2
TOKENS = 7


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --------------------------------------------------------------------------- SD3

SD3_MAIN = mmdit_module.MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=5, hidden_size=128,
                                    num_heads=2, pos_embed_max_size=12, context_dim=48, pooled_dim=32)
SD35_MAIN = mmdit_module.MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=4, hidden_size=128,
                                     num_heads=2, pos_embed_max_size=12, context_dim=48, pooled_dim=32, qk_norm=True,
                                     dual_attention_layers=(0,))


def _random_table(buffer: Tensor, seed: int) -> None:
    buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)))


def sd3_transformer(config: mmdit_module.MMDiTConfig, seed: int):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=2 * config.pos_embed_max_size, patch_size=config.patch_size, in_channels=config.in_channels,
        num_layers=config.depth, attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_dim, out_channels=config.out_channels,
        pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=config.dual_attention_layers,
        qk_norm="rms_norm" if config.qk_norm else None)
    randomize_(model, seed)
    _random_table(model.pos_embed.pos_embed, seed + 1)
    return model


def sd3_joint_controlnet(main: mmdit_module.MMDiTConfig, seed: int, layers: int = 2, qk_norm: bool = False):
    """InstantX's kind: diffusers SD3ControlNetModel with its own patch embedding and text stream."""
    from diffusers import SD3ControlNetModel

    model = SD3ControlNetModel(
        sample_size=2 * main.pos_embed_max_size, patch_size=main.patch_size, in_channels=main.in_channels,
        num_layers=layers, attention_head_dim=main.head_dim, num_attention_heads=main.num_heads,
        joint_attention_dim=main.context_dim, caption_projection_dim=main.hidden_size,
        pooled_projection_dim=main.pooled_dim, out_channels=main.out_channels,
        pos_embed_max_size=main.pos_embed_max_size, qk_norm="rms_norm" if qk_norm else None,
        dual_attention_layers=(0,) if qk_norm else ())
    randomize_(model, seed)
    _random_table(model.pos_embed.pos_embed, seed + 1)
    return model


def sd35_image_controlnet(main: mmdit_module.MMDiTConfig, seed: int, layers: int = 2):
    """Stability's SD3.5-large kind as diffusers' conversion script builds it: no patch embedding or
    text of its own, image-only blocks, the real pooled vector."""
    from diffusers import SD3ControlNetModel

    model = SD3ControlNetModel(
        patch_size=main.patch_size, in_channels=main.in_channels, num_layers=layers,
        attention_head_dim=main.head_dim, num_attention_heads=main.num_heads, joint_attention_dim=None,
        caption_projection_dim=main.hidden_size, pooled_projection_dim=main.pooled_dim, out_channels=main.out_channels,
        pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False)
    return randomize_(model, seed)


def ours_sd3(state: dict[str, Tensor]) -> SD3ControlNet:
    model = SD3ControlNet(sd3_controlnet_config_from_shapes(shapes(state)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def ours_mmdit(reference) -> mmdit_module.MMDiT:
    state = mmdit_module.mmdit_keys_from_diffusers(reference.state_dict())
    model = mmdit_module.MMDiT(mmdit_module.mmdit_config_from_shapes(shapes(state)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def sd3_inputs(main: mmdit_module.MMDiTConfig, height: int, width: int, seed: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(BATCH, 16, height, width, generator=g),
            "hint": torch.randn(BATCH, 16, height, width, generator=g),
            "timesteps": torch.tensor([820.0, 130.5]),
            "context": torch.randn(BATCH, TOKENS, main.context_dim, generator=g),
            "y": torch.randn(BATCH, main.pooled_dim, generator=g)}


def diffusers_sd3_interval_index(block: int, blocks: int, samples: int) -> int:
    """Which ControlNet output SD3Transformer2DModel adds after `block` (its rule, written out)."""
    return int(block / (blocks / samples))


def check_sd3(reference_cn, ours_cn: SD3ControlNet, main: mmdit_module.MMDiTConfig, strength: float,
              zero_pooled: bool, height: int = 8, width: int = 12) -> None:
    reference_main = sd3_transformer(main, seed=21)
    ours_main = ours_mmdit(reference_main)
    if not reference_cn.config.use_pos_embed:
        # What StableDiffusion3ControlNetPipeline does for the SD3.5-large ControlNets.
        reference_cn.pos_embed = reference_cn._get_pos_embed_from_transformer(reference_main)
    inputs = sd3_inputs(main, height, width)
    x, hint, t, context, y = (inputs[k] for k in ("x", "hint", "timesteps", "context", "y"))
    with torch.no_grad():
        expected = reference_cn(hidden_states=x, controlnet_cond=hint, conditioning_scale=strength,
                                encoder_hidden_states=context if reference_cn.context_embedder is not None else None,
                                pooled_projections=torch.zeros_like(y) if zero_pooled else y, timestep=t,
                                return_dict=False)[0]
        control = ours_cn(x, hint, t, context, y, strength, base=ours_main)
        assert len(control.double) == main.depth and control.single == []
        samples = len(expected)
        residual_error = 0.0
        for block, got in enumerate(control.double):
            if block == main.depth - 1:
                assert got is None  # the pre-only last block is left uncontrolled, as diffusers does
                continue
            want = expected[diffusers_sd3_interval_index(block, main.depth, samples)]
            assert want.abs().max() > 0.1
            residual_error = max(residual_error, max_err(got, want))
        assert residual_error <= TOL

        expected_out = reference_main(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,
                                      timestep=t, block_controlnet_hidden_states=expected).sample
        plain = reference_main(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t).sample
        got_out = ours_main(x, t, context, y, control=control)
    print(f"SD3 ControlNet residuals max {residual_error:.2e}, controlled MMDiT max {max_err(got_out, expected_out):.2e}")
    assert max_err(expected_out, plain) > 0.05  # the residuals change the output
    assert max_err(got_out, expected_out) <= TOL


@pytest.mark.parametrize("qk_norm", [False, True], ids=["sd3", "sd35-qk-dual"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_joint_sd3_controlnet_and_controlled_mmdit_match_diffusers(qk_norm: bool, strength: float) -> None:
    reference = sd3_joint_controlnet(SD3_MAIN, seed=5, qk_norm=qk_norm)
    state = sd3_controlnet_keys_from_diffusers(reference.state_dict())
    ours = ours_sd3(state)
    assert ours.config.joint and ours.config.qk_norm == qk_norm
    assert sd3_controlnet_layout(reference.state_dict()) == "diffusers"
    assert sd3_controlnet_layout(state) == "original"
    # InstantX's ControlNets see a zero pooled vector whatever the prompt's (diffusers:
    # force_zeros_for_pooled_projection).
    check_sd3(reference, ours, SD3_MAIN, strength, zero_pooled=True)


def stability_sd35_state(diffusers_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The SD3.5-large ControlNet file as Stability ships it, from diffusers' weights: the reverse of
    diffusers' scripts/convert_sd3_controlnet_to_diffusers.py (q/k/v fused, ff -> mlp, norm1 -> adaLN)."""
    out: dict[str, Tensor] = {}
    blocks = {int(k.split(".")[1]) for k in diffusers_state if k.startswith("transformer_blocks.")}
    for i in blocks:
        d, o = f"transformer_blocks.{i}.", f"transformer_blocks.{i}."
        for param in ("weight", "bias"):
            out[f"{o}attn.qkv.{param}"] = torch.cat([diffusers_state[f"{d}attn.to_{p}.{param}"] for p in "qkv"])
            out[f"{o}attn.proj.{param}"] = diffusers_state[f"{d}attn.to_out.0.{param}"]
            out[f"{o}mlp.fc1.{param}"] = diffusers_state[f"{d}ff.net.0.proj.{param}"]
            out[f"{o}mlp.fc2.{param}"] = diffusers_state[f"{d}ff.net.2.{param}"]
            out[f"{o}adaLN_modulation.1.{param}"] = diffusers_state[f"{d}norm1.linear.{param}"]
    for key, tensor in diffusers_state.items():
        if key.startswith(("controlnet_blocks.", "pos_embed_input.", "time_text_embed.")):
            out[key] = tensor
    out[CONTROL_TYPE_KEY] = torch.tensor(1.0)  # canny
    return out


@pytest.mark.parametrize("source", ["diffusers", "stability"])
def test_sd35_large_controlnet_and_controlled_mmdit_match_diffusers(source: str) -> None:
    reference = sd35_image_controlnet(SD35_MAIN, seed=9)
    diffusers_state = {k: v for k, v in reference.state_dict().items()}
    if source == "diffusers":
        assert sd3_controlnet_layout(diffusers_state) == "diffusers"
        state = sd3_controlnet_keys_from_diffusers(diffusers_state)
    else:
        original = stability_sd35_state(diffusers_state)
        assert sd3_controlnet_layout(original) == "original"
        state = sd3_controlnet_keys_from_original(original)
    ours = ours_sd3(state)
    assert not ours.config.joint and ours.config.depth == 2
    check_sd3(reference, ours, SD35_MAIN, 0.8, zero_pooled=False, height=10, width=6)


def test_sd3_controlnet_refuses_a_model_of_another_width() -> None:
    ours = ours_sd3(sd3_controlnet_keys_from_diffusers(sd3_joint_controlnet(SD3_MAIN, seed=5).state_dict()))
    narrow = mmdit_module.MMDiT(mmdit_module.MMDiTConfig(depth=2, hidden_size=64, num_heads=1, pos_embed_max_size=12,
                                                         context_dim=48, pooled_dim=32))
    inputs = sd3_inputs(SD3_MAIN, 8, 8)
    with pytest.raises(ControlShapeError, match="128 wide"):
        ours(**inputs, base=narrow)


# --------------------------------------------------------------------------- Flux

AXES = (4, 4, 8)


def flux_main_config(guidance: bool = True) -> flux_module.FluxConfig:
    return flux_module.FluxConfig(hidden_size=32, num_heads=2, depth=3, depth_single_blocks=5, context_dim=40,
                                  pooled_dim=24, guidance_embed=guidance, axes_dim=AXES)


def flux_transformer(config: flux_module.FluxConfig, seed: int):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=config.packed_in_channels, num_layers=config.depth,
        num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embed, axes_dims_rope=AXES)
    return randomize_(model, seed, scale=0.3)


def flux_diffusers_controlnet(main: flux_module.FluxConfig, seed: int, *, layers: int = 2, single: int = 2,
                              modes: int | None = None, xlabs: bool = False):
    from diffusers import FluxControlNetModel

    # patch_size only packs the embedded control image of XLabs' kind (2x2, as its diffusers configs say).
    model = FluxControlNetModel(
        patch_size=2 if xlabs else 1, in_channels=main.packed_in_channels, num_layers=layers, num_single_layers=single,
        attention_head_dim=main.head_dim, num_attention_heads=main.num_heads, joint_attention_dim=main.context_dim,
        pooled_projection_dim=main.pooled_dim, guidance_embeds=main.guidance_embed, axes_dims_rope=AXES,
        num_mode=modes, conditioning_embedding_channels=16 if xlabs else None)
    return randomize_(model, seed, scale=0.3)


def ours_flux(reference) -> flux_module.Flux:
    state = flux_module.flux_keys_from_diffusers(reference.state_dict())
    model = flux_module.Flux(flux_module.flux_config_from_shapes(shapes(state), axes_dim=AXES))
    model.load_state_dict(state, strict=True)
    return model.eval()


def ours_flux_controlnet(state: dict[str, Tensor]) -> FluxControlNet:
    model = FluxControlNet(flux_controlnet_config_from_shapes(shapes(state), axes_dim=AXES))
    model.load_state_dict(state, strict=True)
    return model.eval()


def xlabs_state(diffusers_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An XLabs ControlNet file (BFL names, input_hint_block.0..14, pos_embed_input) from diffusers'
    weights of the same network: the trunk through the Flux mapping, the hint convs renumbered."""
    hint_names = {"conv_in": 0, **{f"blocks.{k}": 2 * (k + 1) for k in range(6)}, "conv_out": 14}
    trunk, out = {}, {}
    for key, tensor in diffusers_state.items():
        if key.startswith("input_hint_block."):
            module, param = key[len("input_hint_block."):].rsplit(".", 1)
            out[f"input_hint_block.{hint_names[module]}.{param}"] = tensor
        elif key.startswith("controlnet_x_embedder."):
            out["pos_embed_input." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("controlnet_"):
            out[key] = tensor
        else:
            trunk[key] = tensor
    return flux_module.flux_keys_from_diffusers(trunk) | out


def pack(x: Tensor) -> Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(x, *x.shape)


def flux_reference_call(model, x: Tensor, context: Tensor, y: Tensor, t: Tensor, guidance: Tensor, **extra):
    from diffusers import FluxPipeline

    batch, _, height, width = x.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    return model(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=y, timestep=t,
                 img_ids=img_ids, txt_ids=torch.zeros(context.shape[1], 3), guidance=guidance, return_dict=False,
                 **extra)


def check_flux(reference_cn, ours_cn: FluxControlNet, *, mode: int | None = None, xlabs: bool = False,
               strength: float = 0.7, guidance_embed: bool = True) -> None:
    main = flux_main_config(guidance_embed)
    reference_main = flux_transformer(main, seed=33)
    ours_main = ours_flux(reference_main)
    g = torch.Generator().manual_seed(4)
    height, width = 8, 12
    x = torch.randn(BATCH, 16, height, width, generator=g)
    context = torch.randn(BATCH, TOKENS, main.context_dim, generator=g)
    y = torch.randn(BATCH, main.pooled_dim, generator=g)
    t = torch.tensor([0.9, 0.35])
    guidance = torch.tensor([3.5, 2.0]) if guidance_embed else None
    if xlabs:
        image = torch.rand(BATCH, 3, 8 * height, 8 * width, generator=g)
        hint, reference_hint = image, image * 2 - 1  # the pipeline hands XLabs' embedder [-1, 1]
    else:
        hint = torch.randn(BATCH, 16, height, width, generator=g)
        reference_hint = pack(hint)
    extra = {} if mode is None else {"controlnet_mode": torch.tensor([[mode]] * BATCH)}
    with torch.no_grad():
        double, single = flux_reference_call(reference_cn, x, context, y, t, guidance, controlnet_cond=reference_hint,
                                             conditioning_scale=strength, **extra)
        control = ours_cn(x, hint, t, context, y, strength, base=ours_main, guidance=guidance, mode=mode)
        assert len(control.double) == main.depth and len(control.single) == main.depth_single_blocks
        # FluxTransformer2DModel's rules, written out: ceil-interval, or cyclic for XLabs.
        stride = -(-main.depth // len(double))
        residual_error = 0.0
        for block, got in enumerate(control.double):
            want = double[block % len(double)] if xlabs else double[block // stride]
            assert want.abs().max() > 0.05
            residual_error = max(residual_error, max_err(got, want))
        if single is None:
            assert all(got is None for got in control.single)
        else:
            stride = -(-main.depth_single_blocks // len(single))
            for block, got in enumerate(control.single):
                residual_error = max(residual_error, max_err(got, single[block // stride]))
        assert residual_error <= TOL
        expected = flux_reference_call(reference_main, x, context, y, t, guidance, controlnet_block_samples=double,
                                       controlnet_single_block_samples=single, controlnet_blocks_repeat=xlabs)[0]
        plain = flux_reference_call(reference_main, x, context, y, t, guidance)[0]
        got = pack(ours_main(x, t, context, y, guidance=guidance, control=control))
    print(f"Flux ControlNet residuals max {residual_error:.2e}, controlled Flux max {max_err(got, expected):.2e}")
    assert max_err(expected, plain) > 0.05
    assert max_err(got, expected) <= TOL


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_instantx_flux_controlnet_and_controlled_flux_match_diffusers(guidance_embed: bool) -> None:
    reference = flux_diffusers_controlnet(flux_main_config(guidance_embed), seed=13)
    assert flux_controlnet_layout(reference.state_dict()) == "diffusers"
    state = flux_controlnet_keys_from_diffusers(reference.state_dict())
    assert flux_controlnet_layout(state) == "original"
    ours = ours_flux_controlnet(state)
    assert not ours.config.image_input and ours.config.num_modes == 0
    check_flux(reference, ours, guidance_embed=guidance_embed)


@pytest.mark.parametrize("mode", [0, 2])
def test_union_flux_controlnet_takes_its_control_type_as_diffusers_does(mode: int) -> None:
    reference = flux_diffusers_controlnet(flux_main_config(), seed=17, single=0, modes=3)
    ours = ours_flux_controlnet(flux_controlnet_keys_from_diffusers(reference.state_dict()))
    assert ours.config.num_modes == 3
    check_flux(reference, ours, mode=mode)


def test_xlabs_flux_controlnet_and_controlled_flux_match_diffusers() -> None:
    reference = flux_diffusers_controlnet(flux_main_config(), seed=19, single=0, xlabs=True)
    state = xlabs_state(reference.state_dict())
    assert flux_controlnet_layout(state) == "original"
    ours = ours_flux_controlnet(state)
    assert ours.config.image_input and ours.config.hint_downscale == 8
    check_flux(reference, ours, xlabs=True)
