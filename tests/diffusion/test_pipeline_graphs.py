"""End-to-end graphs of the diffusion pack on small random SD1- and SDXL-layout checkpoints:
txt2img, img2img, inpainting, ControlNet and LoRA run from workflow JSON through the executor."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.node import CancelToken
from nodegraph.plugins import build_registry
from nodegraph.validation import WorkflowInvalid

from nodegraph_diffusion.architectures import lora
from safetensors.torch import save_file

from _pipeline_fixtures import SD1_UNET, SDXL_UNET, write_models

pytestmark = pytest.mark.slow


def link(node: str, output: str) -> dict:
    return {"from": node, "output": output}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def env(models, tmp_path_factory):
    """One executor for the module, so the checkpoints load once (as in a long-running server)."""
    inputs = tmp_path_factory.mktemp("inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(models))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        out = tmp_path_factory.mktemp("out")
        yield Executor(registry, OutputCache(max_bytes=4 << 30), device="cpu", output_dir=out), inputs


def txt2img(checkpoint="tiny-sd1.safetensors", size=32, seed=1, steps=3, sampler="euler") -> dict:
    return {"version": 1, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": checkpoint}},
        "pos": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": ""}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": link("ckpt", "model"), "width": size, "height": size}},
        "sample": {"type": "KSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("pos", "conditioning"),
            "negative": link("neg", "conditioning"), "latent": link("empty", "latent"),
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": sampler, "scheduler": "karras"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
        "save": {"type": "SaveImage", "inputs": {"images": link("decode", "image"), "filename_prefix": "t"}},
    }}


def saved_image(result) -> Image.Image:
    assert result.status == "succeeded", result.error
    pngs = [f for f in result.files if f.endswith(".png")]
    assert pngs, result.files
    return Image.open(pngs[-1])


def pixels(result) -> np.ndarray:
    return np.asarray(saved_image(result).convert("RGB"), dtype=np.int16)


def test_sd1_txt2img_and_seed_change_reruns_only_downstream_nodes(env):
    executor, _ = env
    events = []
    first = executor.run(txt2img(seed=11), on_event=events.append)
    assert saved_image(first).size == (32, 32)
    progress = [e for e in events if e.type == "node_progress" and e.node_id == "sample"]
    previews = [e for e in events if e.type == "node_preview" and e.node_id == "sample"]
    assert [e.data["value"] for e in progress] == [1, 2, 3]
    assert len(previews) == 3 and isinstance(previews[0].data["image"], Image.Image)

    again = executor.run(txt2img(seed=12))
    assert sorted(again.executed) == ["decode", "sample", "save"]
    assert sorted(again.cached) == ["ckpt", "empty", "neg", "pos"]
    assert not np.array_equal(pixels(first), pixels(again))


def test_composable_sampling_stages_match_the_one_node_sampler(env):
    executor, _ = env
    graph = txt2img()
    nodes = graph["nodes"]
    del nodes["sample"]
    nodes |= {
        "noise": {"type": "RandomNoise", "inputs": {"seed": 1}},
        "sigmas": {"type": "Scheduler", "inputs": {"model": link("ckpt", "model"), "scheduler": "karras", "steps": 3}},
        "sampler": {"type": "SelectSampler", "inputs": {"sampler_name": "euler"}},
        "guider": {"type": "Guider", "inputs": {"model": link("ckpt", "model"), "positive": link("pos", "conditioning"),
                                                 "negative": link("neg", "conditioning"), "cfg": 5.0}},
        "sample": {"type": "Sample", "inputs": {"noise": link("noise", "noise"), "guider": link("guider", "guider"),
                                                 "sampler": link("sampler", "sampler"), "sigmas": link("sigmas", "sigmas"),
                                                 "latent": link("empty", "latent")}},
    }
    staged = executor.run(graph)
    bundled = executor.run(txt2img())
    assert np.array_equal(pixels(staged), pixels(bundled))
    nodes["noise"]["inputs"]["seed"] = 7
    reseeded = executor.run(graph)
    assert sorted(reseeded.executed) == ["decode", "noise", "sample", "save"]


def test_sdxl_txt2img_with_size_conditioning(env):
    executor, _ = env
    graph = txt2img("tiny-sdxl.safetensors", size=48)
    graph["nodes"]["pos"] = {"type": "TextEncodeSDXL", "inputs": {
        "clip": link("ckpt", "clip"), "text_g": "a red circle", "text_l": "red", "width": 48, "height": 48,
        "target_width": 48, "target_height": 48}}
    result = executor.run(graph)
    assert saved_image(result).size == (48, 48)


def write_input(inputs, name="in.png", size=(32, 32), alpha=False) -> str:
    rng = np.random.default_rng(0)
    mode = "RGBA" if alpha else "RGB"
    data = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    if alpha:
        data[..., 3] = 255
        data[8:24, 8:24, 3] = 0  # transparent square = the region to repaint
    Image.fromarray(data, mode).save(inputs / name)
    return name


def img2img(name: str, denoise: float = 0.5) -> dict:
    graph = txt2img()
    graph["nodes"] |= {
        "load": {"type": "LoadImage", "inputs": {"image": name}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": link("ckpt", "vae"), "image": link("load", "image")}},
    }
    graph["nodes"]["sample"]["inputs"] |= {"latent": link("encode", "latent"), "denoise": denoise}
    del graph["nodes"]["empty"]
    return graph


def test_img2img(env):
    executor, inputs = env
    result = executor.run(img2img(write_input(inputs, size=(40, 24))))
    assert saved_image(result).size == (40, 24)


def test_inpaint_keeps_the_unmasked_latent(env):
    executor, inputs = env
    name = write_input(inputs, "rgba.png", alpha=True)
    graph = img2img(name, denoise=1.0)
    graph["nodes"]["masked"] = {"type": "SetLatentNoiseMask", "inputs": {"latent": link("encode", "latent"),
                                                                         "mask": link("load", "mask")}}
    graph["nodes"]["sample"]["inputs"]["latent"] = link("masked", "latent")
    graph["nodes"]["decode_in"] = {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"),
                                                                   "latent": link("encode", "latent")}}
    result = executor.run(graph, outputs=None)
    assert saved_image(result).size == (32, 32)
    sampled = result.results["sample"].outputs.latent.samples
    original = result.results["encode"].outputs.latent.samples
    outside = torch.ones_like(original, dtype=torch.bool)
    outside[..., 4:12, 4:12] = False  # the 16 px transparent square at factor 2
    assert torch.equal(sampled[outside], original[outside])
    assert not torch.equal(sampled[~outside], original[~outside])

    graph["nodes"]["encode"] = {"type": "VAEEncodeForInpaint", "inputs": {
        "vae": link("ckpt", "vae"), "image": link("load", "image"), "mask": link("load", "mask"), "grow_mask_by": 2}}
    graph["nodes"]["sample"]["inputs"]["latent"] = link("encode", "latent")
    assert saved_image(executor.run(graph)).size == (32, 32)


@pytest.mark.parametrize("checkpoint, control", [("tiny-sd1.safetensors", "tiny-sd1-control.safetensors"),
                                                 ("tiny-sdxl.safetensors", "tiny-sdxl-control.safetensors")])
def test_controlnet_changes_the_image_and_strength_zero_does_not(env, checkpoint, control):
    executor, inputs = env
    name = write_input(inputs, "hint.png")

    def graph(strength: float | None) -> dict:
        g = txt2img(checkpoint)
        if strength is None:
            return g
        g["nodes"] |= {
            "cn": {"type": "LoadControlNet", "inputs": {"name": control}},
            "hint": {"type": "LoadImage", "inputs": {"image": name}},
            "apply": {"type": "ApplyControlNet", "inputs": {
                "positive": link("pos", "conditioning"), "negative": link("neg", "conditioning"),
                "control_net": link("cn", "control_net"), "image": link("hint", "image"), "strength": strength,
                "start": 0.0, "end": 1.0}},
        }
        g["nodes"]["sample"]["inputs"] |= {"positive": link("apply", "positive"), "negative": link("apply", "negative")}
        return g

    plain = pixels(executor.run(graph(None)))
    assert not np.array_equal(pixels(executor.run(graph(1.0))), plain)
    assert np.array_equal(pixels(executor.run(graph(0.0))), plain)


def test_hires_fix_two_passes(env):
    executor, _ = env
    graph = txt2img()
    graph["nodes"] |= {
        "up": {"type": "LatentUpscale", "inputs": {"latent": link("sample", "latent"), "width": 64, "height": 64}},
        "second": {"type": "KSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("pos", "conditioning"),
            "negative": link("neg", "conditioning"), "latent": link("up", "latent"),
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "dpmpp_2m", "scheduler": "normal", "denoise": 0.5}},
    }
    graph["nodes"]["decode"]["inputs"]["latent"] = link("second", "latent")
    assert saved_image(executor.run(graph)).size == (64, 64)


def test_cancellation_stops_sampling_within_one_step(env):
    executor, _ = env
    token = CancelToken()
    seen = []

    def on_event(event):
        if event.type == "node_progress" and event.node_id == "sample":
            seen.append(event.data["value"])
            token.cancel()

    result = executor.run(txt2img(steps=50), on_event=on_event, cancel=token)
    assert result.status == "cancelled"
    assert seen == [1]


def write_lora(models, name: str, family: str, config, seed: int = 5,
               layers: tuple[str, ...] = ("attn1.to_q.weight", "attn2.to_v.weight"), text: bool = True) -> str:
    """A rank-2 kohya LoRA on some attention projections of a tiny U-Net (and the CLIP-L q projection)."""
    from nodegraph_diffusion.networks.unet import UNet

    g = torch.Generator().manual_seed(seed)
    unet = {}
    for key, value in UNet(config).state_dict().items():
        if key.endswith(layers):
            out_features, in_features = value.shape
            unet[key] = (torch.randn(2, in_features, generator=g), torch.randn(out_features, 2, generator=g), 2.0)
    text = {"clip_l": {"text_model.encoder.layers.0.self_attn.q_proj.weight":
                       (torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 2.0)}} if text else {}
    save_file(lora.kohya_state_dict(unet, text, family, config), str(models / "loras" / name))
    return name


def with_lora(name: str, strength: float) -> dict:
    graph = txt2img()
    graph["nodes"]["lora"] = {"type": "LoadLora", "inputs": {
        "model": link("ckpt", "model"), "clip": link("ckpt", "clip"), "name": name,
        "strength_model": strength, "strength_clip": strength}}
    for node in ("pos", "neg"):
        graph["nodes"][node]["inputs"]["clip"] = link("lora", "clip")
    graph["nodes"]["sample"]["inputs"]["model"] = link("lora", "model")
    return graph


def test_lora_changes_the_image_shares_the_checkpoint_and_leaves_it_untouched(env, models):
    executor, _ = env
    name = write_lora(models, "tiny-sd1-lora.safetensors", "sd1", SD1_UNET)
    plain = executor.run(txt2img())
    base = executor.run(txt2img(), outputs=["ckpt"]).results["ckpt"].outputs.model.network
    before = {k: v.clone() for k, v in base.state_dict().items()}
    patched = executor.run(with_lora(name, 1.0))
    assert "ckpt" in patched.cached  # one loaded checkpoint serves both graphs
    assert not np.array_equal(pixels(patched), pixels(plain))
    zero = executor.run(with_lora(name, 0.0))
    assert np.array_equal(pixels(zero), pixels(plain))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert np.array_equal(pixels(executor.run(txt2img())), pixels(plain))


def test_lora_for_another_architecture_is_refused(env, models):
    executor, _ = env
    # Cross-attention projections read SDXL's 128-wide text states: no SD1 layer has their shape.
    name = write_lora(models, "tiny-sdxl-lora.safetensors", "sdxl", SDXL_UNET, layers=("attn2.to_k.weight",), text=False)
    graph = with_lora(name, 1.0)
    graph["nodes"]["lora"]["inputs"]["model"] = link("ckpt", "model")
    error = failure(executor.run(graph))
    assert error.node_id == "lora" and "'name'" in str(error) and "another architecture" in str(error)


# ------------------------------------------------------------------------------- bad input


def issues_of(executor, graph) -> list[tuple[str, str | None, str | None]]:
    with pytest.raises(WorkflowInvalid) as caught:
        executor.run(graph)
    return [(i.code, i.node_id, i.input) for i in caught.value.issues]


def test_unknown_sampler_and_zero_steps_are_validation_errors(env):
    executor, _ = env
    graph = txt2img(sampler="euler_magic")
    graph["nodes"]["sample"]["inputs"]["steps"] = 0
    found = issues_of(executor, graph)
    assert ("value_not_in_choices", "sample", "sampler_name") in found
    assert ("value_out_of_bounds", "sample", "steps") in found


def failure(result):
    assert result.status == "failed"
    return result.error


def test_width_not_a_multiple_of_the_model_factor(env):
    executor, _ = env
    error = failure(executor.run(txt2img(size=33)))
    assert error.node_id == "empty" and "'width'" in str(error) and "factor 2" in str(error)


def test_mask_of_another_size(env):
    executor, inputs = env
    name = write_input(inputs, "small.png", size=(16, 16), alpha=True)
    graph = txt2img()
    graph["nodes"] |= {
        "load": {"type": "LoadImage", "inputs": {"image": name}},
        "masked": {"type": "SetLatentNoiseMask", "inputs": {"latent": link("empty", "latent"),
                                                            "mask": link("load", "mask")}},
    }
    graph["nodes"]["sample"]["inputs"]["latent"] = link("masked", "latent")
    error = failure(executor.run(graph))
    assert error.node_id == "masked" and "'mask'" in str(error) and "16x16" in str(error)


def test_corrupt_image_file(env):
    executor, inputs = env
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    graph = img2img("broken.png")
    error = failure(executor.run(graph))
    assert error.node_id == "load" and "broken.png" in str(error)


def test_workflow_json_round_trip_through_the_png(env):
    executor, _ = env
    graph = txt2img()
    image = saved_image(executor.run(graph))
    embedded = json.loads(image.text["workflow"])
    assert embedded["nodes"] == graph["nodes"]


def test_textual_inversion_embedding_from_the_embeddings_folder(env, models):
    executor, _ = env
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(3))},
              str(models / "embeddings" / "shiny.safetensors"))

    def encode(text: str) -> torch.Tensor:
        graph = {"version": 1, "nodes": {
            "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": "tiny-sd1.safetensors"}},
            "pos": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": text}}}}
        result = executor.run(graph, outputs=["pos"])
        assert result.status == "succeeded", result.error
        return result.results["pos"].outputs.conditioning[0].context

    with_embedding, plain = encode("a embedding:shiny circle"), encode("a circle")
    assert with_embedding.shape == plain.shape == (1, 77, 64)
    assert not torch.allclose(with_embedding, plain)
    error = failure(executor.run({"version": 1, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": "tiny-sd1.safetensors"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": "embedding:missing"}}}},
        outputs=["pos"]))
    assert error.node_id == "pos" and "'text'" in str(error) and "missing" in str(error)


def test_step_previews_use_the_checkpoints_vae_colours(env) -> None:
    """The sampler's previews map latents to colour with the map fitted on the checkpoint's own VAE
    (so no model previews in another model's colours); a model file without a VAE has none."""
    from nodegraph_diffusion.vae.previews import latent_colours

    executor, _ = env
    outputs = executor.run(txt2img(), outputs=["ckpt"]).results["ckpt"].outputs
    colours = outputs.model.preview_colours()
    expected = latent_colours(outputs.vae.vae, outputs.vae.scaling)
    assert outputs.model.preview_vae is outputs.vae
    assert torch.equal(colours.weight, expected.weight) and torch.equal(colours.bias, expected.bias)
    assert dataclasses.replace(outputs.model, preview_vae=None).preview_colours() is None
