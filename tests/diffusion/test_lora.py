"""Tests for nodegraph_diffusion.architectures.lora: kohya and diffusers/PEFT files give the same deltas, LoCon math, mismatched architectures, bad files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from nodegraph_diffusion.weights import patching
from nodegraph_diffusion.architectures.lora import LoraDelta, LoraFile, LoraFormatError, LoraShapeError, kohya_state_dict, load_lora
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.networks.unet import UNet

from _random_weights import randomize_
from _unet_fixtures import TINY_SD1, TINY_SDXL

TOL = 1e-6
CLIP_L = TextEncoderConfig(vocab_size=64, width=32, layers=2, heads=2, intermediate_size=48, eos_token_id=63)
CLIP_G = TextEncoderConfig(vocab_size=64, width=32, layers=2, heads=2, intermediate_size=64, activation="gelu",
                           projection_dim=24, eos_token_id=63)

# Our (LDM) parameter -> the diffusers module that holds it, in TINY_SD1 (three levels, attention on
# the first two): written from diffusers' UNet2DConditionModel layout, independent of lora.py.
SD1_DIFFUSERS_MODULES = {
    "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight": "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.4.0.in_layers.2.weight": "down_blocks.1.resnets.0.conv1",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv",
    "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in",
    "middle_block.2.emb_layers.1.weight": "mid_block.resnets.1.time_emb_proj",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight": "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.0.proj",
    "output_blocks.8.0.out_layers.3.weight": "up_blocks.2.resnets.2.conv2",
    "input_blocks.0.0.weight": "conv_in",
    "time_embed.0.weight": "time_embedding.linear_1",
    "out.2.weight": "conv_out",
}
# TINY_SDXL: no attention on level 0, so the first transformer sits in input_blocks.4.
SDXL_DIFFUSERS_MODULES = {
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight": "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
    "middle_block.1.transformer_blocks.1.ff.net.2.weight": "mid_block.attentions.0.transformer_blocks.1.ff.net.2",
    "output_blocks.1.1.proj_out.weight": "up_blocks.0.attentions.1.proj_out",
    "output_blocks.7.0.in_layers.2.weight": "up_blocks.2.resnets.1.conv1",
    "label_emb.0.0.weight": "add_embedding.linear_1",
}
TEXT_PARAMS = (
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.encoder.layers.1.self_attn.out_proj.weight",
    "text_model.encoder.layers.1.mlp.fc1.weight",
)


def lora_factors(shapes: dict[str, tuple[int, ...]], params, rank: int = 3, seed: int = 0) -> dict:
    """Random (down, up, alpha) for each parameter; conv weights get LoCon factors (k x k down, 1x1 up)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for i, name in enumerate(params):
        shape = shapes[name]
        down = torch.randn((rank, *shape[1:]), generator=generator)
        up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=generator)
        # Some modules without alpha: scale 1.
        factors[name] = (down, up, None if i % 3 == 2 else float(i + 1))
    return factors


def without_alpha(factors: dict) -> dict:
    return {name: (down, up, None) for name, (down, up, _) in factors.items()}


def zero_factors(shape: tuple[int, ...]) -> tuple[Tensor, Tensor, None]:
    """Rank-1 factors of the right layout for a weight of ``shape`` (for tests about names only)."""
    return torch.zeros(1, *shape[1:]), torch.zeros(shape[0], 1, *[1] * (len(shape) - 2)), None


def expected_delta(shape: tuple[int, ...], down: Tensor, up: Tensor, alpha: float | None) -> Tensor:
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return (up.flatten(1) @ down.flatten(1) * scale).reshape(shape)


def peft_state_dict(prefix: str, modules: dict[str, str], factors: dict, style: str = "peft") -> dict[str, Tensor]:
    """The diffusers/PEFT file for the same factors: ``<prefix><diffusers module>.lora_A/lora_B`` (or the
    older ``lora.down``/``lora.up`` names), linear factors flattened to 2-D where the kohya file has 1x1 convs."""
    down_key, up_key = {"peft": ("lora_A.weight", "lora_B.weight"), "lora": ("lora.down.weight", "lora.up.weight"),
                        "linear_layer": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")}[style]
    result = {}
    for param, (down, up, alpha) in factors.items():
        module = prefix + modules[param]
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)
        result[f"{module}.{down_key}"] = down.clone()
        result[f"{module}.{up_key}"] = up.clone()
        if alpha is not None:
            result[f"{module}.alpha"] = torch.tensor(alpha)
    return result


def saved(tmp_path, name: str, state_dict: dict[str, Tensor]) -> LoraFile:
    path = tmp_path / name
    save_file(state_dict, str(path))
    return load_lora(path)


@pytest.fixture(scope="module")
def sd1_unet() -> UNet:
    return randomize_(UNet(TINY_SD1), seed=1)


@pytest.fixture(scope="module")
def sdxl_unet() -> UNet:
    return randomize_(UNet(TINY_SDXL), seed=2)


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.state_dict().items()}


def assert_same_deltas(a: dict[str, LoraDelta], b: dict[str, LoraDelta], shapes, factors) -> None:
    assert set(a) == set(b) == set(factors)
    for name, (down, up, alpha) in factors.items():
        want = expected_delta(shapes[name], down, up, alpha)
        got_a = a[name].tensor(shapes[name], torch.float32, "cpu")
        got_b = b[name].tensor(shapes[name], torch.float32, "cpu")
        assert (got_a - want).abs().max() <= TOL * max(1.0, want.abs().max().item()), name
        assert (got_a - got_b).abs().max() <= TOL, name


# --------------------------------------------------------------------------- the two formats agree


def test_sd1_unet_kohya_and_peft_files_patch_the_same_layers_by_the_same_amount(tmp_path, sd1_unet):
    shapes = shapes_of(sd1_unet)
    factors = lora_factors(shapes, SD1_DIFFUSERS_MODULES)
    kohya = saved(tmp_path, "kohya.safetensors", kohya_state_dict(factors, {}, "sd1", unet_config=TINY_SD1))
    # kohya's SD1 naming is the diffusers module path with underscores.
    assert "lora_unet_down_blocks_1_resnets_0_conv1" in kohya.module_names
    assert "lora_unet_time_embedding_linear_1" in kohya.module_names
    peft = saved(tmp_path, "peft.safetensors", peft_state_dict("unet.", SD1_DIFFUSERS_MODULES, factors))

    kohya_deltas, kohya_unmatched = kohya.deltas("unet", sd1_unet.state_dict())
    peft_deltas, peft_unmatched = peft.deltas("unet", sd1_unet.state_dict())
    assert kohya_unmatched == [] and peft_unmatched == []
    assert_same_deltas(kohya_deltas, peft_deltas, shapes, factors)

    base = {k: v.clone() for k, v in sd1_unet.state_dict().items()}
    strength = 0.7
    with patching.patched(sd1_unet, [(kohya_deltas, strength)]):
        from_kohya = {k: v.clone() for k, v in sd1_unet.state_dict().items()}
    with patching.patched(sd1_unet, [(peft_deltas, strength)]):
        from_peft = {k: v.clone() for k, v in sd1_unet.state_dict().items()}
    for name in base:
        if name in factors:
            want = base[name] + strength * expected_delta(shapes[name], *factors[name])
            assert (from_kohya[name] - want).abs().max() <= 1e-5, name
            assert (from_kohya[name] - from_peft[name]).abs().max() <= TOL, name
        else:
            assert torch.equal(from_kohya[name], base[name]) and torch.equal(from_peft[name], base[name]), name


def test_sd1_kohya_names_in_ldm_form_are_read_too(sd1_unet):
    """Some tools write SD1 files with LDM module names (underscored, or dotted under ``diffusion_model.``)."""
    shapes = shapes_of(sd1_unet)
    param = "input_blocks.4.0.in_layers.2.weight"
    factors = lora_factors(shapes, [param])
    written = kohya_state_dict(factors, {}, "sd1", unet_config=TINY_SD1)
    ldm_named = {k.replace("lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_input_blocks_4_0_in_layers_2"): v
                 for k, v in written.items()}
    dotted = {k.replace("lora_unet_down_blocks_1_resnets_0_conv1", "diffusion_model.input_blocks.4.0.in_layers.2"): v
              for k, v in written.items()}
    assert set(ldm_named) != set(written) and set(dotted) != set(written)
    want = expected_delta(shapes[param], *factors[param])
    for state_dict in (ldm_named, dotted):
        deltas, unmatched = LoraFile.from_state_dict(state_dict).deltas("unet", sd1_unet.state_dict())
        assert unmatched == [] and set(deltas) == {param}
        assert (deltas[param].tensor(shapes[param], torch.float32, "cpu") - want).abs().max() <= TOL


def test_diffusers_attention_processor_names_are_read(sd1_unet):
    shapes = shapes_of(sd1_unet)
    params = ["input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
              "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.weight"]
    factors = lora_factors(shapes, params)
    processor_names = {}
    for param, (down, up, _) in factors.items():
        owner, layer = SD1_DIFFUSERS_MODULES[param].rsplit(".attn", 1)[0], SD1_DIFFUSERS_MODULES[param].split(".attn")[1]
        attn, proj = layer.split(".", 1)
        proj = proj.replace("to_out.0", "to_out")
        processor_names[f"{owner}.attn{attn}.processor.{proj}_lora.down.weight"] = down
        processor_names[f"{owner}.attn{attn}.processor.{proj}_lora.up.weight"] = up
    deltas, unmatched = LoraFile.from_state_dict(processor_names).deltas("unet", sd1_unet.state_dict())
    assert unmatched == [] and set(deltas) == set(params)
    for param, (down, up, _) in factors.items():
        want = expected_delta(shapes[param], down, up, None)
        assert (deltas[param].tensor(shapes[param], torch.float32, "cpu") - want).abs().max() <= TOL


@pytest.mark.parametrize("style", ["peft", "linear_layer"])
def test_sd1_text_encoder_kohya_and_diffusers_files_agree(tmp_path, style):
    encoder = randomize_(CLIPTextEncoder(CLIP_L), seed=3)
    shapes = shapes_of(encoder)
    factors = lora_factors(shapes, TEXT_PARAMS, seed=4)
    kohya = saved(tmp_path, "kohya.safetensors", kohya_state_dict({}, {"clip_l": factors}, "sd1"))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in kohya.module_names
    diffusers = LoraFile.from_state_dict(
        peft_state_dict("text_encoder.", {p: p[: -len(".weight")] for p in TEXT_PARAMS}, factors, style)
    )
    kohya_deltas, kohya_unmatched = kohya.deltas("clip_l", encoder.state_dict())
    diffusers_deltas, diffusers_unmatched = diffusers.deltas("clip_l", encoder.state_dict())
    assert kohya_unmatched == diffusers_unmatched == []
    assert_same_deltas(kohya_deltas, diffusers_deltas, shapes, factors)

    ids = torch.tensor([[62, 5, 9, 63, 0, 0]])
    base = encoder(ids).last_hidden_state
    with patching.patched(encoder, [(kohya_deltas, 1.0)]):
        out_kohya = encoder(ids).last_hidden_state
    with patching.patched(encoder, [(diffusers_deltas, 1.0)]):
        out_diffusers = encoder(ids).last_hidden_state
    assert (out_kohya - base).abs().max() > 1e-3
    assert (out_kohya - out_diffusers).abs().max() <= 1e-5


def test_sdxl_unet_and_both_text_encoders_kohya_and_diffusers_agree(tmp_path, sdxl_unet):
    clip_l = randomize_(CLIPTextEncoder(CLIP_L), seed=5)
    clip_g = randomize_(CLIPTextEncoder(CLIP_G), seed=6)
    unet_shapes, l_shapes, g_shapes = shapes_of(sdxl_unet), shapes_of(clip_l), shapes_of(clip_g)
    unet_factors = lora_factors(unet_shapes, SDXL_DIFFUSERS_MODULES, seed=7)
    l_factors = lora_factors(l_shapes, TEXT_PARAMS[:2], seed=8)
    g_factors = lora_factors(g_shapes, TEXT_PARAMS[1:], seed=9)
    kohya = saved(tmp_path, "sdxl_kohya.safetensors",
                  kohya_state_dict(unet_factors, {"clip_l": l_factors, "clip_g": g_factors}, "sdxl"))
    # kohya's SDXL naming is the LDM module path with underscores.
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in kohya.module_names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in kohya.module_names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in kohya.module_names
    text_modules = {p: p[: -len(".weight")] for p in TEXT_PARAMS}
    diffusers = saved(tmp_path, "sdxl_peft.safetensors", {
        **peft_state_dict("unet.", SDXL_DIFFUSERS_MODULES, unet_factors),
        **peft_state_dict("text_encoder.", text_modules, l_factors),
        **peft_state_dict("text_encoder_2.", text_modules, g_factors),
    })
    for target, module, shapes, factors in (("unet", sdxl_unet, unet_shapes, unet_factors),
                                            ("clip_l", clip_l, l_shapes, l_factors),
                                            ("clip_g", clip_g, g_shapes, g_factors)):
        kohya_deltas, kohya_unmatched = kohya.deltas(target, module.state_dict())
        diffusers_deltas, diffusers_unmatched = diffusers.deltas(target, module.state_dict())
        assert kohya_unmatched == diffusers_unmatched == [], target
        assert_same_deltas(kohya_deltas, diffusers_deltas, shapes, factors)


def test_pt_file_reads_like_safetensors(tmp_path, sd1_unet):
    shapes = shapes_of(sd1_unet)
    factors = lora_factors(shapes, list(SD1_DIFFUSERS_MODULES)[:4])
    state_dict = kohya_state_dict(factors, {}, "sd1", unet_config=TINY_SD1)
    torch.save(state_dict, tmp_path / "lora.pt")
    from_pt, _ = load_lora(tmp_path / "lora.pt").deltas("unet", sd1_unet.state_dict())
    from_st, _ = saved(tmp_path, "lora.safetensors", state_dict).deltas("unet", sd1_unet.state_dict())
    assert_same_deltas(from_pt, from_st, shapes, factors)


@pytest.mark.parity
def test_probed_diffusers_names_are_diffusers_module_names():
    """Every weight of a real diffusers UNet2DConditionModel is named back exactly from our LDM name."""
    from _unet_fixtures import diffusers_unet

    from nodegraph_diffusion.networks.unet import ldm_unet_keys_from_diffusers

    for config in (TINY_SD1, TINY_SDXL):
        state_dict = diffusers_unet(config).state_dict()
        diffusers_name = {id(tensor): key for key, tensor in state_dict.items()}
        ldm = ldm_unet_keys_from_diffusers(state_dict)
        factors = {key: zero_factors(tuple(t.shape)) for key, t in ldm.items()
                   if key.endswith(".weight") and t.ndim in (2, 4)}
        written = kohya_state_dict(factors, {}, "sd1", unet_config=config)
        want = {"lora_unet_" + diffusers_name[id(ldm[key])][: -len(".weight")].replace(".", "_") + ".lora_down.weight"
                for key in factors}
        assert {k for k in written if k.endswith(".lora_down.weight")} == want


@pytest.mark.parity
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_converter_reads_our_kohya_files_as_the_same_layers(family, sd1_unet, sdxl_unet):
    """diffusers' own kohya importer renames what we write to real diffusers modules, and reading its
    output gives the deltas reading our file gives."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from _unet_fixtures import diffusers_unet

    config, unet = (TINY_SD1, sd1_unet) if family == "sd1" else (TINY_SDXL, sdxl_unet)
    # diffusers maps kohya's SDXL (LDM) names for attention layers only: that is what its importer supports.
    params = SD1_DIFFUSERS_MODULES if family == "sd1" else [p for p in SDXL_DIFFUSERS_MODULES if ".1." in p]
    shapes = shapes_of(unet)
    # No alphas: this test is about names (diffusers keys its converted alphas for its own loader).
    factors = without_alpha(lora_factors(shapes, params, seed=13))
    text_slot = "clip_l"
    text = without_alpha(lora_factors(shapes_of(CLIPTextEncoder(CLIP_L)), TEXT_PARAMS, seed=14))
    written = kohya_state_dict(factors, {text_slot: text}, family, unet_config=config)
    ours = LoraFile.from_state_dict(written)

    reference_unet = diffusers_unet(config)
    converted = dict(written)
    if family == "sdxl":
        converted = _maybe_map_sgm_blocks_to_diffusers(converted, reference_unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(converted)
    assert alphas == {}
    theirs = LoraFile.from_state_dict(converted)

    diffusers_modules = {name for name, _ in reference_unet.named_modules()}
    for name in theirs.module_names:
        if name.startswith("unet."):
            assert name[len("unet."):] in diffusers_modules, name
    ours_deltas, ours_unmatched = ours.deltas("unet", unet.state_dict())
    theirs_deltas, theirs_unmatched = theirs.deltas("unet", unet.state_dict())
    assert ours_unmatched == theirs_unmatched == []
    assert_same_deltas(ours_deltas, theirs_deltas, shapes, factors)
    text_shapes = shapes_of(CLIPTextEncoder(CLIP_L))
    ours_text, _ = ours.deltas(text_slot, text_shapes)
    theirs_text, theirs_text_unmatched = theirs.deltas(text_slot, text_shapes)
    assert theirs_text_unmatched == []
    assert_same_deltas(ours_text, theirs_text, text_shapes, text)


# --------------------------------------------------------------------------- LoCon and the delta math


def test_locon_conv_delta_is_the_two_convolutions_composed():
    generator = torch.Generator().manual_seed(10)
    down = torch.randn(4, 6, 3, 3, generator=generator)
    up = torch.randn(5, 4, 1, 1, generator=generator)
    delta = LoraDelta("conv", down, up, alpha=2.0)
    weight = delta.tensor((5, 6, 3, 3), torch.float32, "cpu")
    assert weight.shape == (5, 6, 3, 3)
    x = torch.randn(2, 6, 9, 9, generator=generator)
    composed = F.conv2d(F.conv2d(x, down, padding=1), up) * (2.0 / 4)
    assert (F.conv2d(x, weight, padding=1) - composed).abs().max() <= 1e-5


def test_locon_tucker_mid_delta_is_the_three_convolutions_composed():
    generator = torch.Generator().manual_seed(11)
    down = torch.randn(4, 6, 1, 1, generator=generator)
    mid = torch.randn(4, 4, 3, 3, generator=generator)
    up = torch.randn(5, 4, 1, 1, generator=generator)
    lora_file = LoraFile.from_state_dict({
        "lora_unet_conv.lora_down.weight": down, "lora_unet_conv.lora_mid.weight": mid,
        "lora_unet_conv.lora_up.weight": up, "lora_unet_conv.alpha": torch.tensor(8.0),
    })
    deltas, _ = lora_file.deltas("unet", {"conv.weight": (5, 6, 3, 3)})
    weight = deltas["conv.weight"].tensor((5, 6, 3, 3), torch.float32, "cpu")
    x = torch.randn(2, 6, 9, 9, generator=generator)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (8.0 / 4)
    assert (F.conv2d(x, weight, padding=1) - composed).abs().max() <= 1e-4


def test_linear_delta_is_the_two_projections_composed_in_the_requested_dtype():
    generator = torch.Generator().manual_seed(12)
    down, up = torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)
    delta = LoraDelta("linear", down.half(), up.half())
    x = torch.randn(4, 7, generator=generator)
    weight = delta.tensor((5, 7), torch.float16, "cpu")
    assert weight.dtype == torch.float16
    composed = F.linear(F.linear(x, down.half().float()), up.half().float())
    assert (F.linear(x, delta.tensor((5, 7), torch.float32, "cpu")) - composed).abs().max() <= 1e-5


def test_delta_that_does_not_fit_the_weight_raises_naming_the_module():
    delta = LoraDelta("lora_unet_x", torch.zeros(2, 7), torch.zeros(5, 2))
    with pytest.raises(LoraShapeError, match="lora_unet_x"):
        delta.tensor((5, 8), torch.float32, "cpu")


# --------------------------------------------------------------------------- other architectures


def test_sdxl_lora_on_sd1_model_reports_every_unet_module_unmatched(sdxl_unet, sd1_unet):
    sdxl_shapes = shapes_of(sdxl_unet)
    attention = [k for k in sdxl_shapes if ".transformer_blocks." in k and k.endswith(("to_q.weight", "to_k.weight"))]
    text = lora_factors(shapes_of(CLIPTextEncoder(CLIP_L)), TEXT_PARAMS)
    sdxl_lora = LoraFile.from_state_dict(
        kohya_state_dict(lora_factors(sdxl_shapes, attention), {"clip_l": text, "clip_g": text}, "sdxl")
    )
    unet_modules = [name for name in sdxl_lora.module_names if name.startswith("lora_unet_")]
    assert len(unet_modules) == len(attention) > 0

    deltas, unmatched = sdxl_lora.deltas("unet", sd1_unet.state_dict())
    assert deltas == {}
    assert sorted(unmatched) == sorted(unet_modules)
    # Given only names, the modules whose LDM names exist in SD1 match; their shapes then refuse.
    by_name, _ = sdxl_lora.deltas("unet", list(sd1_unet.state_dict()))
    assert by_name
    shapes = shapes_of(sd1_unet)
    with pytest.raises(LoraShapeError):
        for param, delta in by_name.items():
            delta.tensor(shapes[param], torch.float32, "cpu")


def test_family_from_metadata_or_from_the_two_text_encoders(tmp_path):
    text = lora_factors(shapes_of(CLIPTextEncoder(CLIP_L)), TEXT_PARAMS[:1])
    sd1_dict = kohya_state_dict({}, {"clip_l": text}, "sd1")
    assert LoraFile.from_state_dict(sd1_dict).family is None
    assert LoraFile.from_state_dict(kohya_state_dict({}, {"clip_g": text}, "sdxl")).family == "sdxl"
    for metadata, family in (({"ss_base_model_version": "sd_v1"}, "sd1"),
                             ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
                             ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
                             ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl")):
        path = tmp_path / "with_metadata.safetensors"
        save_file(sd1_dict, str(path), metadata=metadata)
        assert load_lora(path).family == family, metadata


def test_text_encoder_slots_take_their_own_sections():
    text = lora_factors(shapes_of(CLIPTextEncoder(CLIP_L)), TEXT_PARAMS)
    names = list(shapes_of(CLIPTextEncoder(CLIP_L)))
    sd1_lora = LoraFile.from_state_dict(kohya_state_dict({}, {"clip_l": text}, "sd1"))
    sdxl_lora = LoraFile.from_state_dict(kohya_state_dict({}, {"clip_g": text}, "sdxl"))
    assert len(sd1_lora.deltas("clip_l", names)[0]) == len(TEXT_PARAMS)
    assert len(sd1_lora.deltas("clip_h", names)[0]) == len(TEXT_PARAMS)  # SD2's one encoder is lora_te_ too
    assert sd1_lora.deltas("clip_g", names) == ({}, [])
    assert sdxl_lora.deltas("clip_l", names) == ({}, [])
    assert len(sdxl_lora.deltas("clip_g", names)[0]) == len(TEXT_PARAMS)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        sd1_lora.deltas("vae", names)


# --------------------------------------------------------------------------- bad files


def test_corrupt_file_raises_lora_format_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraFormatError, match="broken.safetensors"):
        load_lora(path)
    truncated = tmp_path / "truncated.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)},
              str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(LoraFormatError, match="truncated.safetensors"):
        load_lora(truncated)
    pickle = tmp_path / "garbage.pt"
    pickle.write_bytes(b"not a zip file")
    with pytest.raises(LoraFormatError, match="garbage.pt"):
        load_lora(pickle)


def test_file_without_lora_modules_raises_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(LoraFormatError, match=r"checkpoint\.safetensors: no LoRA modules"):
        load_lora(path)


@pytest.mark.parametrize(
    ("state_dict", "message"),
    [
        ({"lora_unet_a.lora_down.weight": torch.zeros(4, 8)}, "lacks its up factor"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 3)},
         "rank 4, up has rank 3"),
        ({"lora_unet_a.hada_w1_a": torch.zeros(4, 8)}, "not supported"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4),
          "lora_unet_a.dora_scale": torch.zeros(8, 1)}, "not supported"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(4, 8, dtype=torch.int8),
          "lora_unet_a.lora_up.weight": torch.zeros(8, 4)}, "expected a float type"),
    ],
)
def test_malformed_modules_raise_naming_file_and_module(state_dict, message):
    with pytest.raises(LoraFormatError, match=message) as info:
        LoraFile.from_state_dict(state_dict, "my_lora.safetensors")
    assert "my_lora.safetensors" in str(info.value)


def test_extra_keys_are_ignored_and_listed():
    lora_file = LoraFile.from_state_dict({
        "lora_unet_a.lora_down.weight": torch.zeros(2, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 2),
        "emb_params": torch.zeros(1, 8),
    })
    assert lora_file.module_names == ["lora_unet_a"]
    assert lora_file.ignored_keys == ("emb_params",)


def test_writer_refuses_what_kohya_cannot_name():
    factors = (torch.zeros(2, 8), torch.zeros(8, 2), 1.0)
    with pytest.raises(ValueError, match="no text encoder 'clip_g'"):
        kohya_state_dict({}, {"clip_g": {"text_model.encoder.layers.0.mlp.fc1.weight": factors}}, "sd1")
    with pytest.raises(ValueError, match="not a '.weight' parameter"):
        kohya_state_dict({"input_blocks.1.1.proj_in.bias": factors}, {}, "sdxl")
