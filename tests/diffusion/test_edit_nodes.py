"""The nodes of image-conditioned and edit models as ComfyUI declares them, and graphs that use them
on tiny random models: Flux.1 Canny/Depth with InstructPixToPixConditioning, Flux.1 Fill with
InpaintModelConditioning and DifferentialDiffusion, Flux.1 Kontext's reference latents; the image
nodes of edit workflows (FluxKontextImageScale, ImageStitch) against ComfyUI's formulas; Flux.1
Redux style models (StyleModelLoader, StyleModelApply), SetFirstSigma and TorchCompileModel."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.importers import WorkflowImportError
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.nodes import comfyui

from _checkpoint_fixtures import write_safetensors
from _transformer_fixtures import FLUX_DEV, flux_weights, write_transformer_models
from test_comfyui import LINK, check_comfyui_inputs

pytestmark = pytest.mark.slow

API = comfyui.IMPORTERS[0]
SIZE = 32  # pixels: a 4 x 4 latent, 2 x 2 Flux tokens
PROMPT = "a red circle on a blue background"
CANNY_MODEL = "flux1-canny-dev.safetensors"
FILL_MODEL = "flux1-fill-dev.safetensors"

# ComfyUI's declarations (comfy_extras/nodes_ip2p.py, nodes_custom_sampler.py).
EDIT_NODE_INPUTS: dict[str, dict[str, dict]] = {
    "InstructPixToPixConditioning": {"positive": LINK, "negative": LINK, "vae": LINK, "pixels": LINK},
    "DualCFGGuider": {"model": LINK, "cond1": LINK, "cond2": LINK, "negative": LINK,
                      "cfg_conds": {"default": 8.0, "min": 0.0, "max": 100.0},
                      "cfg_cond2_negative": {"default": 8.0, "min": 0.0, "max": 100.0},
                      "style": {"choices": ["regular", "nested"]}},
    "InpaintModelConditioning": {"positive": LINK, "negative": LINK, "vae": LINK, "pixels": LINK, "mask": LINK,
                                 "noise_mask": {"boolean": True}},
    "DifferentialDiffusion": {"model": LINK, "strength": {"default": 1.0, "min": 0.0, "max": 1.0}},
    "ReferenceLatent": {"conditioning": LINK, "latent": LINK},
    "FluxKontextImageScale": {"image": LINK},
    "ImageStitch": {"image1": LINK, "direction": {"choices": ["right", "down", "left", "up"]},
                    "match_image_size": {"boolean": True},
                    "spacing_width": {"default": 0, "min": 0, "max": 1024},
                    "spacing_color": {"choices": ["white", "black", "red", "green", "blue"]}, "image2": LINK},
    "SetFirstSigma": {"sigmas": LINK, "sigma": {"default": 136.0, "min": 0.0, "max": 20000.0}},
    "StyleModelLoader": {"style_model_name": {"files": "style_models"}},
    "StyleModelApply": {"conditioning": LINK, "style_model": LINK, "clip_vision_output": LINK,
                        "strength": {"default": 1.0, "min": 0.0, "max": 10.0},
                        "strength_type": {"choices": ["multiply", "attn_bias"]}},
}


def test_edit_nodes_take_comfyuis_inputs_names_defaults_and_choices() -> None:
    check_comfyui_inputs(EDIT_NODE_INPUTS, set(), {})


def test_dual_cfg_guider_maps_from_files_with_and_without_its_style_widget() -> None:
    node = {"id": 7, "type": "DualCFGGuider", "mode": 0, "widgets_values": [5, 1.5],
            "inputs": [{"name": name, "type": "X", "link": None} for name in ("model", "cond1", "cond2", "negative")]}
    document = {"nodes": [node], "links": [], "version": 0.4}
    converted = comfyui.read_ui_nodes(document, comfyui._Problems(comfyui.UI_FORMAT))
    assert converted[0].inputs == {"cfg_conds": 5, "cfg_cond2_negative": 1.5}
    node["widgets_values"] = [3, 1.5, "nested"]
    converted = comfyui.read_ui_nodes(document, comfyui._Problems(comfyui.UI_FORMAT))
    assert converted[0].inputs["style"] == "nested"


def _write_image(path: Path, seed: int, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """A random RGBA image, transparent (LoadImage's mask 1) in rows and columns 8-23; returns its RGB."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[8:24, 8:24, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)
    return torch.from_numpy(pixels[..., :3].copy()).float()[None] / 255


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_transformer_models(tmp_path_factory.mktemp("models"))
    write_safetensors(root / "diffusion_models" / CANNY_MODEL, flux_weights(replace(FLUX_DEV, in_channels=32), 43),
                      dtype=None)
    write_safetensors(root / "diffusion_models" / FILL_MODEL, flux_weights(replace(FLUX_DEV, in_channels=96), 44),
                      dtype=None)
    inputs = tmp_path_factory.mktemp("inputs")
    images = {name: _write_image(inputs / name, seed) for seed, name in enumerate(("edges.png", "other.png"))}
    images["odd.png"] = _write_image(inputs / "odd.png", 2, height=36, width=43)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(root))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=1 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("out")), images


def flux_canny_graph(image: str) -> dict:
    """ComfyUI's Flux Canny example (examples/flux), its Canny node left out and small."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["31", 0], "positive": ["35", 0], "negative": ["35", 1], "latent_image": ["35", 2]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["34", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["32", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "canny", "images": ["8", 0]}},
        "17": {"class_type": "LoadImage", "inputs": {"image": image, "upload": "image"}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["34", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 30.0, "conditioning": ["23", 0]}},
        "31": {"class_type": "UNETLoader", "inputs": {"unet_name": CANNY_MODEL, "weight_dtype": "default"}},
        "32": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "34": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "35": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["26", 0], "negative": ["7", 0], "vae": ["32", 0], "pixels": ["17", 0]}},
    }


def test_flux_canny_graph_conditions_every_step_on_the_control_image(world) -> None:
    executor, images = world
    outputs = ["9", "8", "35", "32"]
    first = executor.run(API.convert(flux_canny_graph("edges.png")), outputs=outputs)
    assert first.status == "succeeded", first.error
    node = first.results["35"].outputs
    encoded = first.results["32"].outputs.vae.encode(images["edges.png"])
    for side in (node.positive, node.negative):
        torch.testing.assert_close(side[0].concat_latent, encoded)  # the control image's latent, on both sides
    assert node.positive[0].guidance == 30.0
    assert torch.all(node.latent.samples == 0) and node.latent.samples.shape == (1, 16, SIZE // 8, SIZE // 8)
    image = first.results["8"].outputs.image
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()

    second = executor.run(API.convert(flux_canny_graph("other.png")), outputs=outputs)
    assert second.status == "succeeded", second.error
    assert (second.results["8"].outputs.image - image).abs().max() > 1e-3  # the control image steers the result


def test_image_conditioning_on_a_plain_model_is_refused_by_name(world) -> None:
    executor, _ = world
    graph = flux_canny_graph("edges.png")
    graph["31"]["inputs"]["unet_name"] = "flux1-dev.safetensors"
    result = executor.run(API.convert(graph), outputs=["9"])
    assert result.status == "failed"
    assert "takes no image beside the latent" in str(result.error)


def flux_fill_graph(noise_mask: bool, strength: float | None) -> dict:
    """ComfyUI's Flux Fill example (examples/flux), small; DifferentialDiffusion when strength is given."""
    graph = flux_canny_graph("edges.png")
    graph["31"]["inputs"]["unet_name"] = FILL_MODEL
    graph["35"] = {"class_type": "InpaintModelConditioning", "inputs": {
        "noise_mask": noise_mask, "positive": ["26", 0], "negative": ["7", 0], "vae": ["32", 0],
        "pixels": ["17", 0], "mask": ["17", 1]}}
    if strength is not None:
        graph["39"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["31", 0], "strength": strength}}
        graph["3"]["inputs"]["model"] = ["39", 0]
    return graph


def test_inpaint_model_conditioning_greys_the_masked_part_and_crops_to_the_vae_factor(world) -> None:
    executor, images = world
    graph = flux_fill_graph(noise_mask=True, strength=None)
    graph["17"]["inputs"]["image"] = "odd.png"  # 43 x 36: cropped to 40 x 32, centred
    result = executor.run(API.convert(graph), outputs=["35", "32", "17"])
    assert result.status == "succeeded", result.error
    node, vae = result.results["35"].outputs, result.results["32"].outputs.vae
    image = images["odd.png"][:, 2:34, 1:41]
    mask = result.results["17"].outputs.mask[:, 2:34, 1:41]
    assert mask.shape == (1, 32, 40) and mask[0, 6:22, 7:23].min() == 1 and mask.sum() == 16 * 16
    grey = image * (1 - mask[..., None]) + 0.5 * mask[..., None]
    for side in (node.positive, node.negative):
        torch.testing.assert_close(side[0].concat_latent, vae.encode(grey))
        torch.testing.assert_close(side[0].concat_mask, mask[:, None])
    torch.testing.assert_close(node.latent.samples, vae.encode(image))
    torch.testing.assert_close(node.latent.noise_mask, mask[:, None])


@pytest.mark.parametrize("strength", [None, 1.0, 0.5], ids=["plain", "differential", "differential-half"])
def test_flux_fill_graph_repaints_the_masked_part_only(world, strength: float | None) -> None:
    executor, _ = world
    graph = flux_fill_graph(noise_mask=True, strength=strength)
    graph["3"]["inputs"]["steps"] = 3
    result = executor.run(API.convert(graph), outputs=["9", "3", "35"])
    assert result.status == "succeeded", result.error
    start = result.results["35"].outputs.latent.samples
    sampled = result.results["3"].outputs.latent.samples
    inside = torch.zeros(SIZE // 8, SIZE // 8, dtype=torch.bool)
    inside[1:3, 1:3] = True  # the transparent pixels 8-23: latent cells 1-2
    torch.testing.assert_close(sampled[..., ~inside], start[..., ~inside])
    assert (sampled[..., inside] - start[..., inside]).abs().min() > 0


# --------------------------------------------------------------------------- Kontext and image layout


def test_kontext_scale_picks_the_nearest_trained_aspect_then_crops_the_centre() -> None:
    from nodegraph_diffusion.nodes.image_layout import KONTEXT_RESOLUTIONS, KontextImageScale, kontext_size

    assert kontext_size(1000, 1000) == (1024, 1024)
    assert kontext_size(1920, 1080) == (1392, 752)  # 1.78 against 1.85 and 1.66
    assert kontext_size(100, 1000) == (672, 1568)  # beyond the list: its last tall entry
    for width, height in KONTEXT_RESOLUTIONS:
        assert kontext_size(width, height) == (width, height)
    image = torch.rand(1, 90, 300, 3)  # 3.33: the widest, 1568 x 672 (2.33), from the centre 210 x 90
    out = KontextImageScale().run(KontextImageScale.Inputs(image=image), None).image
    assert out.shape == (1, 672, 1568, 3)


def test_image_stitch_follows_comfyuis_layout() -> None:
    from nodegraph_diffusion.nodes.image_layout import ImageStitch

    def stitch(first, second, **options):
        inputs = ImageStitch.Inputs(image1=first, image2=second, **options)
        return ImageStitch().run(inputs, None).image

    a, b = torch.rand(1, 8, 6, 3), torch.rand(2, 4, 10, 3)
    right = stitch(a, b, match_image_size=False)
    assert right.shape == (2, 8, 16, 3)  # a's batch of 1 repeats its last image
    torch.testing.assert_close(right[:, :, :6], a.expand(2, -1, -1, -1))
    torch.testing.assert_close(right[:, 2:6, 6:], b)  # b centred in height
    assert torch.all(right[:, :2, 6:] == 1) and torch.all(right[:, 6:, 6:] == 1)  # padded white
    up = stitch(a, b, direction="up", match_image_size=False, spacing_width=3, spacing_color="red")
    assert up.shape == (2, 4 + 4 + 8, 10, 3)  # b, a band of 4 (3 made even), a padded to width 10
    torch.testing.assert_close(up[:, :4], b)
    torch.testing.assert_close(up[:, 4:8], torch.tensor([1.0, 0.0, 0.0]).expand(2, 4, 10, 3))
    assert torch.all(up[:, 8:, :2] == 0)  # red spacing: the padding is black
    matched = stitch(a, b, direction="left")
    assert matched.shape == (2, 8, 20 + 6, 3)  # b scaled to a's height 8: width int(8 * 2.5)
    assert torch.equal(stitch(a, None), a)


def test_reference_latents_chain_in_order(world) -> None:
    from nodegraph_diffusion.nodes.edit_conditioning import ReferenceLatent
    from nodegraph_diffusion.components import Latent
    from nodegraph_diffusion.sampling.guidance import CondEntry

    first, second = Latent(torch.zeros(1, 16, 4, 4)), Latent(torch.ones(1, 16, 2, 6))
    conditioning = (CondEntry(context=torch.zeros(1, 4, 8)), CondEntry(context=torch.ones(1, 4, 8)))
    once = ReferenceLatent().run(ReferenceLatent.Inputs(conditioning=conditioning, latent=first), None).conditioning
    twice = ReferenceLatent().run(ReferenceLatent.Inputs(conditioning=once, latent=second), None).conditioning
    for entry in twice:
        assert [ref is latent.samples for ref, latent in zip(entry.reference_latents, (first, second))] == [True] * 2
    unchanged = ReferenceLatent().run(ReferenceLatent.Inputs(conditioning=conditioning), None).conditioning
    assert unchanged is conditioning


def test_reference_latents_reach_a_flux_model_through_ksampler(world) -> None:
    executor, _ = world
    graph = flux_canny_graph("edges.png")
    graph["31"]["inputs"]["unet_name"] = "flux1-dev.safetensors"
    graph["40"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["17", 0], "vae": ["32", 0]}}
    graph["41"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["26", 0], "latent": ["40", 0]}}
    graph["42"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    graph["3"]["inputs"].update(positive=["41", 0], negative=["7", 0], latent_image=["42", 0])
    result = executor.run(API.convert(graph), outputs=["9"])
    assert result.status == "succeeded", result.error  # Flux.1-dev's layout is Kontext's
    without = copy.deepcopy(graph)
    without["3"]["inputs"]["positive"] = ["26", 0]
    plain = executor.run(API.convert(without), outputs=["9", "8"])
    referenced = executor.run(API.convert(graph), outputs=["8"])
    assert (plain.results["8"].outputs.image - referenced.results["8"].outputs.image).abs().max() > 1e-3


# --------------------------------------------------------------------------- SetFirstSigma, TorchCompileModel


def test_set_first_sigma_replaces_only_the_first_level() -> None:
    from nodegraph_diffusion.nodes.sampling import SetFirstSigma

    sigmas = torch.tensor([14.6, 3.0, 0.0])
    out = SetFirstSigma().run(SetFirstSigma.Inputs(sigmas=sigmas, sigma=10000.0), None).sigmas
    assert out.tolist() == [10000.0, 3.0, 0.0] and sigmas[0] == 14.6


def test_torch_compile_model_maps_its_mode_and_refuses_other_backends() -> None:
    graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors",
                                                          "weight_dtype": "default"}},
             "2": {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}}
    assert API.convert(graph)["nodes"]["2"] == {"type": "CompileModel", "inputs": {"model": {"from": "1",
                                                                                             "output": "model"}}}
    graph["2"]["inputs"].update(mode="reduce-overhead", fullgraph=False, dynamic=False, object_patch="diffusion_model",
                                torch_tensorrt_optimization_level=3)  # a fork's options (hstests' workflow)
    assert API.convert(graph)["nodes"]["2"]["inputs"]["mode"] == "reduce-overhead"
    graph["2"]["inputs"]["backend"] = "cudagraphs"
    with pytest.raises(WorkflowImportError, match="only 'inductor' is supported"):
        API.convert(graph)


def test_compile_model_runs_the_denoiser_compiled_in_its_mode(world, monkeypatch) -> None:
    from nodegraph_diffusion.nodes import sampling

    executor, _ = world
    compiled: list[str] = []

    def fake_compiled(network, mode):  # torch.compile itself is test_compile's; here: which network, which mode
        compiled.append(mode)
        return network

    monkeypatch.setattr(sampling, "compiled", fake_compiled)
    graph = flux_canny_graph("edges.png")
    graph["50"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["31", 0], "backend": "inductor",
                                                                 "mode": "max-autotune"}}
    graph["3"]["inputs"]["model"] = ["50", 0]
    result = executor.run(API.convert(graph), outputs=["9", "50"])
    assert result.status == "succeeded", result.error
    assert compiled == ["max-autotune"] and result.results["50"].outputs.model.compile_mode == "max-autotune"


# --------------------------------------------------------------------------- Flux.1 Redux


def redux_weights(image_dim: int = 24, text_dim: int = 192, seed: int = 3) -> dict[str, torch.Tensor]:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder as DiffusersRedux

    from _random_weights import randomize_

    return {k: v.detach().clone() for k, v in
            randomize_(DiffusersRedux(redux_dim=image_dim, txt_in_features=text_dim), seed).state_dict().items()}


def test_redux_encoder_matches_diffusers(tmp_path) -> None:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder as DiffusersRedux

    from nodegraph_diffusion.architectures.style_models import load_style_model

    weights = redux_weights()
    write_safetensors(tmp_path / "flux1-redux-dev.safetensors", weights, dtype=None)
    model = load_style_model(tmp_path / "flux1-redux-dev.safetensors", device="cpu")
    reference = DiffusersRedux(redux_dim=24, txt_in_features=192)
    reference.load_state_dict(weights)
    tokens = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(tokens).image_embeds
        got = model(tokens)
    assert (model.config.image_dim, model.config.hidden_dim, model.config.text_dim) == (24, 576, 192)
    assert expected.abs().max() > 0.1 and (got - expected).abs().max() <= 1e-6


def test_t2i_adapter_style_models_are_refused_by_name(tmp_path) -> None:
    from nodegraph_diffusion.architectures.style_models import StyleModelError, load_style_model

    write_safetensors(tmp_path / "t2iadapter_style.safetensors", {"style_embedding": torch.zeros(1, 8, 16)},
                      dtype=None)
    with pytest.raises(StyleModelError, match="t2iadapter_style.safetensors: a T2I-Adapter style model"):
        load_style_model(tmp_path / "t2iadapter_style.safetensors", device="cpu")


def test_apply_style_model_appends_the_scaled_image_tokens_to_every_entry(tmp_path) -> None:
    from nodegraph_diffusion.architectures.style_models import load_style_model
    from nodegraph_diffusion.nodes.common import InputError
    from nodegraph_diffusion.nodes.edit_conditioning import ApplyStyleModel
    from nodegraph_diffusion.sampling.guidance import CondEntry
    from nodegraph_diffusion.vision.clip_vision import CLIPVisionOutput

    write_safetensors(tmp_path / "redux.safetensors", redux_weights(), dtype=None)
    model = load_style_model(tmp_path / "redux.safetensors", device="cpu")
    hidden = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(5))  # two images, five tokens each
    vision = CLIPVisionOutput(last_hidden_state=hidden, penultimate_hidden_states=hidden,
                              image_embeds=torch.zeros(2, 8))
    entries = (CondEntry(context=torch.randn(1, 7, 192), pooled=torch.ones(1, 64)),
               CondEntry(context=torch.zeros(1, 3, 192)))

    def apply(**options):
        inputs = ApplyStyleModel.Inputs(conditioning=entries, style_model=model, clip_vision_output=vision, **options)
        return ApplyStyleModel().run(inputs, None).conditioning

    with torch.no_grad():
        tokens = model(hidden).reshape(1, 10, 192)
    for strength in (1.0, 0.3):
        out = apply(strength=strength)
        for before, after in zip(entries, out):
            torch.testing.assert_close(after.context, torch.cat([before.context, strength * tokens], dim=1))
            assert after.pooled is before.pooled
    torch.testing.assert_close(apply(strength=1.0, strength_type="attn_bias")[0].context, apply()[0].context)
    with pytest.raises(InputError, match="attn_bias at a strength other than 1"):
        apply(strength=0.5, strength_type="attn_bias")
    narrow = CLIPVisionOutput(hidden[..., :16], hidden[..., :16], torch.zeros(2, 8))
    with pytest.raises(InputError, match="image tokens 16 wide; this style model takes 24"):
        ApplyStyleModel().run(ApplyStyleModel.Inputs(conditioning=entries, style_model=model,
                                                     clip_vision_output=narrow), None)
