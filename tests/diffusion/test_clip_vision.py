"""CLIP vision tower against transformers' CLIPVisionModelWithProjection (random weights everywhere, both
activations, HF and OpenCLIP layouts), its config from shapes, and the image preprocessing of
ComfyUI's CLIPVisionEncode."""

from __future__ import annotations

import pytest
import torch

from nodegraph_diffusion.vision import clip_vision as cv

from _random_weights import randomize_

transformers = pytest.importorskip("transformers")


def hf_tower(activation: str, seed: int = 0):
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=28, patch_size=7, projection_dim=32,
                                           hidden_act=activation)
    return randomize_(transformers.CLIPVisionModelWithProjection(config), seed)


OURS = {"quick_gelu": cv.CLIPVisionConfig(image_size=28, patch_size=7, width=64, layers=3, heads=4,
                                          intermediate_size=96, activation="quick_gelu", projection_dim=32)}
OURS["gelu"] = cv.CLIPVisionConfig(**{**OURS["quick_gelu"].__dict__, "activation": "gelu"})


def openclip_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF vision keys written back in OpenCLIP's `visual.` layout (fused q/k/v, proj as x @ P)."""
    top = {"vision_model.embeddings.class_embedding": "class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "positional_embedding",
           "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
           "vision_model.post_layernorm.weight": "ln_post.weight",
           "vision_model.post_layernorm.bias": "ln_post.bias"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {name: hf[key] for key, name in top.items()}
    out["proj"] = hf["visual_projection.weight"].t().contiguous()
    layers = {key.split(".")[3] for key in hf if key.startswith("vision_model.encoder.layers.")}
    for i in range(len(layers)):
        p = f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for ours, theirs in block.items():
                out[f"transformer.resblocks.{i}.{theirs}.{kind}"] = hf[f"{p}{ours}.{kind}"]
    return out


@pytest.mark.parity
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("layout", ["hf", "openclip"])
def test_tower_matches_transformers(activation: str, layout: str) -> None:
    reference = hf_tower(activation)
    state = reference.state_dict()
    model = cv.load_clip_vision(state if layout == "hf" else openclip_layout(state), config=OURS[activation])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(pixels)
        theirs = reference(pixel_values=pixels, output_hidden_states=True)
    assert theirs.image_embeds.abs().mean() > 0.1
    assert torch.allclose(ours.image_embeds, theirs.image_embeds, atol=1e-5)
    assert torch.allclose(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-5)
    assert torch.allclose(ours.penultimate_hidden_states, theirs.hidden_states[-2], atol=1e-5)
    assert not torch.allclose(ours.penultimate_hidden_states, ours.last_hidden_state, atol=1e-2)


def test_config_from_shapes() -> None:
    state = cv.clip_vision_state_dict(openclip_layout(hf_tower("gelu").state_dict()))
    shapes = {k: v.shape for k, v in state.items()}
    assert cv.clip_vision_config_from_shapes(shapes, heads=4, activation="gelu") == OURS["gelu"]
    # Without them: the released towers' 16 heads, width / 64 otherwise; quick_gelu only at ViT-L's width.
    assert cv.clip_vision_config_from_shapes(shapes).heads == 1
    for width, heads, activation in ((1024, 16, "quick_gelu"), (1280, 16, "gelu"), (1664, 16, "gelu")):
        real = {**shapes, "vision_model.embeddings.patch_embedding.weight": (width, 3, 14, 14),
                "vision_model.embeddings.position_embedding.weight": (257, width)}
        config = cv.clip_vision_config_from_shapes(real)
        assert (config.heads, config.activation, config.image_size, config.patch_size) == (heads, activation, 224, 14)
    with pytest.raises(cv.CLIPVisionLoadError, match="square grid"):
        cv.clip_vision_config_from_shapes({**shapes, "vision_model.embeddings.position_embedding.weight": (18, 64)})


def test_layout_and_shape_errors_are_named() -> None:
    state = openclip_layout(hf_tower("gelu").state_dict())
    with pytest.raises(cv.CLIPVisionLoadError, match="'visual_extra' has no HF equivalent"):
        cv.clip_vision_state_dict({**state, "visual_extra": torch.zeros(1)})
    with pytest.raises(cv.CLIPVisionLoadError, match="missing"):
        cv.load_clip_vision({k: v for k, v in hf_tower("gelu").state_dict().items() if "post_layernorm" not in k},
                            config=OURS["gelu"])
    model = cv.load_clip_vision(hf_tower("gelu").state_dict(), config=OURS["gelu"])
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)"):
        model(torch.zeros(1, 3, 32, 32))


# --- preprocessing ---------------------------------------------------------------------------

def test_preprocess_normalises_8_bit_levels_of_an_image_of_the_right_size() -> None:
    image = torch.rand(2, 224, 224, 4, generator=torch.Generator().manual_seed(0))  # alpha dropped
    x = cv.clip_preprocess(image)
    mean, std = torch.tensor(cv.CLIP_IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(cv.CLIP_IMAGE_STD).view(1, 3, 1, 1)
    expected = ((image[..., :3] * 255).round() / 255).movedim(-1, 1)
    assert torch.allclose(x * std + mean, expected, atol=1e-6)


def test_preprocess_crops_the_centre_or_squashes() -> None:
    # A wide image: left and right thirds black, the centre square white. Cropped, the short side
    # becomes 224 and only the white centre is left; squashed, the black parts stay.
    image = torch.zeros(1, 60, 180, 3)
    image[:, :, 60:120] = 1.0
    white = (1.0 - torch.tensor(cv.CLIP_IMAGE_MEAN)) / torch.tensor(cv.CLIP_IMAGE_STD)
    cropped = cv.clip_preprocess(image)
    assert cropped.shape == (1, 3, 224, 224)
    assert torch.allclose(cropped[0, :, :, 10:-10], white.view(3, 1, 1).expand(3, 224, 204), atol=1e-6)
    squashed = cv.clip_preprocess(image, crop=False)
    assert squashed.shape == (1, 3, 224, 224) and float(squashed[0, 0, 100, 5]) < 0 < float(squashed[0, 0, 100, 112])


@pytest.mark.parity
def test_preprocess_is_close_to_transformers_clip_image_processor() -> None:
    """transformers resizes with PIL's bicubic filter, ComfyUI (and we) with torch's antialiased
    bicubic: the same pipeline, so the inputs differ only by the resampling kernels."""
    processor = transformers.CLIPImageProcessor()
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 18, generator=g), size=(300, 450), mode="bilinear")
    image = image.movedim(1, -1)
    ours = cv.clip_preprocess(image)
    theirs = processor(images=(image[0].numpy() * 255).round().astype("uint8"), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert float((ours - theirs).abs().mean()) < 0.02
