"""ComfyUI core nodes added for issue 15, end to end on the small random SD1 and SDXL checkpoints:
ModelSamplingDiscrete (eps, v_prediction, x0, lcm; zsnr) read back through the U-Net, SamplerCustom
against the one-node sampler, SDTurboScheduler, ControlNetApply (its ControlNet guides the negative
side too), CLIPVisionLoader/CLIPVisionEncode/unCLIPConditioning as SDXL image prompts, with the
corpus files they unblock imported and run at a reduced size."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.cli import read_workflow
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry

from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.sampling import ModelSamplingDiscrete
from nodegraph_diffusion.sampling import schedules as S
from nodegraph_diffusion.sampling.model_sampling import ModelSampling

from nodegraph_diffusion.vision.clip_vision import CLIPVisionConfig, CLIPVisionEncoderModel, clip_preprocess

from _checkpoint_fixtures import write_safetensors
from _random_weights import randomize_
from _pipeline_fixtures import SD1_UNET, _vae_weights, write_models
from test_pipeline_graphs import write_lora

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
SD = S.sd_discrete_schedule()


def link(node: str, output: str) -> dict:
    return {"from": node, "output": output}


# A CLIP vision tower whose embeddings are as wide as the tiny SDXL checkpoint's pooled text vector (one
# head: the loader reads width / 64 heads from a tower of unknown size).
TINY_VISION = CLIPVisionConfig(image_size=28, patch_size=7, width=64, layers=2, heads=1, intermediate_size=96,
                               activation="gelu", projection_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_models(tmp_path_factory.mktemp("models"))
    write_safetensors(root / "vae" / "tiny-vae.safetensors", _vae_weights(1), dtype=None)
    (root / "clip_vision").mkdir()
    vision = randomize_(CLIPVisionEncoderModel(TINY_VISION), 30).state_dict()
    write_safetensors(root / "clip_vision" / "tiny-clip-vision.safetensors", vision, dtype=None)
    return root


@pytest.fixture(scope="module")
def env(models, tmp_path_factory):
    """One executor for the module, so the checkpoint loads once."""
    inputs = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(inputs / "in.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(models))
        patch.setenv("NODEGRAPH_INPUTS", str(inputs))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=4 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("out"))


def txt2img(sampler: str = "euler", scheduler: str = "karras", steps: int = 3) -> dict:
    return {"version": 1, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": "tiny-sd1.safetensors"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": "blurry"}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": link("ckpt", "model"), "width": 32, "height": 32}},
        "sample": {"type": "KSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("pos", "conditioning"),
            "negative": link("neg", "conditioning"), "latent": link("empty", "latent"),
            "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": sampler, "scheduler": scheduler}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
        "save": {"type": "SaveImage", "inputs": {"images": link("decode", "image"), "filename_prefix": "t"}},
    }}


def pixels(result) -> np.ndarray:
    assert result.status == "succeeded", result.error
    pngs = [f for f in result.files if f.endswith(".png")]
    return np.asarray(Image.open(pngs[-1]).convert("RGB"), dtype=np.int16)


def output(result, node: str, name: str):
    assert result.status == "succeeded", result.error
    return getattr(result.results[node].outputs, name)


def with_model_sampling(graph: dict, sampling: str, zsnr: bool = False) -> dict:
    graph["nodes"]["msd"] = {"type": "ModelSamplingDiscrete", "inputs": {
        "model": link("ckpt", "model"), "sampling": sampling, "zsnr": zsnr}}
    graph["nodes"]["sample"]["inputs"]["model"] = link("msd", "model")
    return graph


# --- ModelSamplingDiscrete ---------------------------------------------------------------------

def test_each_prediction_reads_the_same_unet_output_its_own_way(env):
    """One guided evaluation at sigma = the training sigma of timestep 499 (LCM keeps it too, so the
    U-Net sees the same timestep): x0 gives the raw U-Net output, and eps, v and lcm are their
    formulas of that same output."""
    sigma = float(SD.sigmas[499])
    graph = {"version": 1, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": "tiny-sd1.safetensors"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": "a red circle"}},
        "load": {"type": "LoadImage", "inputs": {"image": "in.png"}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": link("ckpt", "vae"), "image": link("load", "image")}},
    }}
    for name in ("file", "eps", "v_prediction", "x0", "lcm"):
        model = link("ckpt", "model")
        if name != "file":
            graph["nodes"][f"msd_{name}"] = {"type": "ModelSamplingDiscrete", "inputs": {"model": model,
                                                                                         "sampling": name}}
            model = link(f"msd_{name}", "model")
        graph["nodes"][f"guide_{name}"] = {"type": "Guider", "inputs": {
            "model": model, "positive": link("pos", "conditioning"), "negative": link("pos", "conditioning"),
            "cfg": 1.0}}
        graph["nodes"][f"step_{name}"] = {"type": "DenoiseStep", "inputs": {
            "guider": link(f"guide_{name}", "guider"), "latent": link("encode", "latent"), "sigma": sigma}}
    result = env.run(graph, outputs=["encode"] + [node for node in graph["nodes"] if node.startswith("step_")])
    x = output(result, "encode", "latent").samples.double()
    d = {name: output(result, f"step_{name}", "denoised").samples.double()
         for name in ("file", "eps", "v_prediction", "x0", "lcm")}
    raw, s = d["x0"], torch.tensor(sigma, dtype=torch.float32).double()
    assert raw.abs().mean() > 0.1 and x.abs().mean() > 0.1
    tol = 1e-4 * float(x.abs().max() + s * raw.abs().max())
    assert torch.equal(d["file"], d["eps"])  # the tiny checkpoint is an eps model
    assert (d["eps"] - (x - s * raw)).abs().max() < tol
    assert (d["v_prediction"] - (x / (s**2 + 1) - raw * s / (s**2 + 1).sqrt())).abs().max() < tol
    u = 499.0 * 10.0
    c_skip, c_out = 0.25 / (u**2 + 0.25), u / math.sqrt(u**2 + 0.25)
    assert (d["lcm"] - (c_out * (x - s * raw) + c_skip * x)).abs().max() < tol


def test_model_sampling_discrete_images(env):
    plain = pixels(env.run(txt2img()))
    assert np.array_equal(pixels(env.run(with_model_sampling(txt2img(), "eps"))), plain)
    assert not np.array_equal(pixels(env.run(with_model_sampling(txt2img(), "v_prediction"))), plain)
    # LCM sampled as ComfyUI's example does: its 50 distilled timesteps, the lcm sampler, sgm_uniform.
    lcm_graph = with_model_sampling(txt2img("lcm", "sgm_uniform", 4), "lcm")
    lcm_graph["nodes"]["sigmas"] = {"type": "Scheduler", "inputs": {"model": link("msd", "model"),
                                                                   "scheduler": "sgm_uniform", "steps": 4}}
    result = env.run(lcm_graph, outputs=["save", "sigmas"])
    # sgm_uniform: timesteps 999 .. 19 in 4 (754, 509, 264 fall between kept ones: interpolated).
    lcm_sigmas = S.DistilledSchedule.from_training(SD).t_to_sigma(torch.tensor([999.0, 754.0, 509.0, 264.0]))
    assert torch.allclose(output(result, "sigmas", "sigmas"), torch.cat([lcm_sigmas, torch.zeros(1)]).float())
    assert not np.array_equal(pixels(result), pixels(env.run(txt2img("lcm", "sgm_uniform", 4))))
    # zsnr: the schedule starts at the rescaled sigma_max (~4519); v_prediction samples through it.
    zsnr = with_model_sampling(txt2img("euler", "normal"), "v_prediction", zsnr=True)
    zsnr["nodes"]["sigmas"] = {"type": "Scheduler", "inputs": {"model": link("msd", "model"), "scheduler": "normal",
                                                              "steps": 3}}
    result = env.run(zsnr, outputs=["save", "sigmas"])
    assert float(output(result, "sigmas", "sigmas")[0]) == pytest.approx(
        math.sqrt((1 - S.ZERO_TERMINAL_ALPHA_CUMPROD) / S.ZERO_TERMINAL_ALPHA_CUMPROD), rel=1e-5)
    assert pixels(result).std() > 0


def test_model_sampling_discrete_refuses_a_flow_model():
    model = SimpleNamespace(sampling=ModelSampling.flow(shift=3.0), family=ModelFamily.SD3)
    inputs = ModelSamplingDiscrete.Inputs.model_construct(model=model, sampling="eps", zsnr=False)
    with pytest.raises(InputError, match="rectified-flow") as caught:
        ModelSamplingDiscrete().run(inputs, None)  # type: ignore[arg-type]
    assert caught.value.input_name == "model"


# --- SamplerCustom, SDTurboScheduler ------------------------------------------------------------

def sampler_custom(graph: dict, add_noise: bool = True, sampler: str = "euler", sigmas: dict | None = None) -> dict:
    nodes = graph["nodes"]
    nodes["select"] = {"type": "SelectSampler", "inputs": {"sampler_name": sampler}}
    nodes["sigmas"] = sigmas or {"type": "Scheduler", "inputs": {"model": link("ckpt", "model"),
                                                                 "scheduler": "karras", "steps": 3}}
    nodes["sample"] = {"type": "SamplerCustom", "inputs": {
        "model": link("ckpt", "model"), "add_noise": add_noise, "noise_seed": 1, "cfg": 5.0,
        "positive": link("pos", "conditioning"), "negative": link("neg", "conditioning"),
        "sampler": link("select", "sampler"), "sigmas": link("sigmas", "sigmas"), "latent": link("empty", "latent")}}
    return graph


def test_sampler_custom_is_the_one_node_sampler_and_returns_the_last_estimate(env):
    result = env.run(sampler_custom(txt2img()))
    assert np.array_equal(pixels(result), pixels(env.run(txt2img())))
    # With euler the last step lands on its own estimate: the denoised output is the result.
    assert torch.allclose(output(result, "sample", "denoised").samples, output(result, "sample", "latent").samples)

    graph = sampler_custom(txt2img(), add_noise=False, sampler="euler_ancestral")
    graph["nodes"]["load"] = {"type": "LoadImage", "inputs": {"image": "in.png"}}
    graph["nodes"]["empty"] = {"type": "VAEEncode", "inputs": {"vae": link("ckpt", "vae"), "image": link("load", "image")}}
    graph["nodes"]["sample"]["inputs"]["noise_seed"] = 0
    staged = {**graph, "nodes": {**graph["nodes"],
              "noise": {"type": "DisableNoise", "inputs": {}},
              "guider": {"type": "Guider", "inputs": {"model": link("ckpt", "model"), "cfg": 5.0,
                                                      "positive": link("pos", "conditioning"),
                                                      "negative": link("neg", "conditioning")}},
              "sample": {"type": "Sample", "inputs": {"noise": link("noise", "noise"), "guider": link("guider", "guider"),
                                                      "sampler": link("select", "sampler"),
                                                      "sigmas": link("sigmas", "sigmas"),
                                                      "latent": link("empty", "latent")}}}}
    assert np.array_equal(pixels(env.run(graph)), pixels(env.run(staged)))


def test_sd_turbo_scheduler_node(env):
    graph = sampler_custom(txt2img(), sampler="euler_ancestral", sigmas={
        "type": "SDTurboScheduler", "inputs": {"model": link("ckpt", "model"), "steps": 2, "denoise": 0.5}})
    result = env.run(graph, outputs=["save", "sigmas"])
    assert torch.allclose(output(result, "sigmas", "sigmas"),
                          torch.tensor([float(SD.sigmas[499]), float(SD.sigmas[399]), 0.0]))
    assert pixels(result).std() > 0


# --- ControlNetApply ---------------------------------------------------------------------------

def controlled(simple: dict[str, float] | None = None, advanced: float | None = None) -> dict:
    """txt2img with ApplyControlNetSimple on the named sides at their strengths, or ApplyControlNet
    (both sides, all of sampling) at `advanced`."""
    graph = txt2img()
    nodes = graph["nodes"]
    nodes["cn"] = {"type": "LoadControlNet", "inputs": {"name": "tiny-sd1-control.safetensors"}}
    nodes["hint"] = {"type": "LoadImage", "inputs": {"image": "in.png"}}
    for side, strength in (simple or {}).items():
        nodes[f"apply_{side}"] = {"type": "ApplyControlNetSimple", "inputs": {
            "conditioning": link(side, "conditioning"), "control_net": link("cn", "control_net"),
            "image": link("hint", "image"), "strength": strength}}
        nodes["sample"]["inputs"]["positive" if side == "pos" else "negative"] = link(f"apply_{side}", "conditioning")
    if advanced is not None:
        nodes["apply"] = {"type": "ApplyControlNet", "inputs": {
            "positive": link("pos", "conditioning"), "negative": link("neg", "conditioning"),
            "control_net": link("cn", "control_net"), "image": link("hint", "image"), "strength": advanced,
            "start": 0.0, "end": 1.0}}
        nodes["sample"]["inputs"] |= {"positive": link("apply", "positive"), "negative": link("apply", "negative")}
    return graph


def test_controlnet_apply_guides_the_negative_side_too(env):
    plain = pixels(env.run(txt2img()))
    simple = pixels(env.run(controlled({"pos": 0.8})))
    assert not np.array_equal(simple, plain)
    # As in ComfyUI: the same as the ControlNet on both sides (ControlNetApplyAdvanced, 0..1).
    assert np.array_equal(simple, pixels(env.run(controlled(advanced=0.8))))
    # A negative with its own ControlNet keeps it; strength 0 changes nothing.
    own = pixels(env.run(controlled({"pos": 0.8, "neg": 0.3})))
    assert not np.array_equal(own, simple)
    assert np.array_equal(pixels(env.run(controlled({"pos": 0.0}))), plain)


# --- CLIP vision and image prompts (SDXL revision) ----------------------------------------------

def revision(strength: float = 0.75, augmentation: float = 0.0, zero_text: bool = False) -> dict:
    """txt2img on the tiny SDXL checkpoint with an image prompt on the positive side."""
    graph = txt2img()
    nodes = graph["nodes"]
    nodes["ckpt"]["inputs"]["name"] = "tiny-sdxl.safetensors"
    nodes["vision"] = {"type": "LoadCLIPVision", "inputs": {"name": "tiny-clip-vision.safetensors"}}
    nodes["load"] = {"type": "LoadImage", "inputs": {"image": "in.png"}}
    nodes["encode_image"] = {"type": "CLIPVisionEncode", "inputs": {
        "clip_vision": link("vision", "clip_vision"), "image": link("load", "image"), "crop": "center"}}
    source = "pos"
    if zero_text:
        nodes["zero"] = {"type": "ConditioningZeroOut", "inputs": {"conditioning": link("pos", "conditioning")}}
        source = "zero"
    nodes["prompt"] = {"type": "UnclipConditioning", "inputs": {
        "conditioning": link(source, "conditioning"), "clip_vision_output": link("encode_image", "clip_vision_output"),
        "strength": strength, "noise_augmentation": augmentation}}
    nodes["sample"]["inputs"]["positive"] = link("prompt", "conditioning")
    return graph


def test_clip_vision_encode_is_the_tower_on_the_preprocessed_image(env, models):
    result = env.run(revision(), outputs=["encode_image", "load"])
    encoded = output(result, "encode_image", "clip_vision_output")
    tower = CLIPVisionEncoderModel(TINY_VISION)
    tower.load_state_dict(randomize_(CLIPVisionEncoderModel(TINY_VISION), 30).state_dict())
    with torch.no_grad():
        expected = tower(clip_preprocess(output(result, "load", "image"), 28))
    assert encoded.image_embeds.shape == (1, 64)
    assert torch.allclose(encoded.image_embeds, expected.image_embeds, atol=1e-5)
    assert torch.allclose(encoded.penultimate_hidden_states, expected.penultimate_hidden_states, atol=1e-5)


def test_sdxl_image_prompt_replaces_the_pooled_text_vector(env):
    plain = txt2img()
    plain["nodes"]["ckpt"]["inputs"]["name"] = "tiny-sdxl.safetensors"
    without = pixels(env.run(plain))
    prompted = pixels(env.run(revision()))
    assert not np.array_equal(prompted, without)
    assert np.array_equal(pixels(env.run(revision(strength=0.0))), without)  # strength 0: unchanged, as ComfyUI
    # The pooled vector is the image's, whatever the text's was: zeroing the text's pooled vector
    # (ConditioningZeroOut also zeroes the states) changes the image only through the states.
    assert not np.array_equal(pixels(env.run(revision(zero_text=True))), prompted)
    assert not np.array_equal(pixels(env.run(revision(augmentation=0.5))), prompted)


def test_image_prompts_on_a_model_that_takes_none_are_refused_by_input(env):
    graph = revision()
    graph["nodes"]["ckpt"]["inputs"]["name"] = "tiny-sd1.safetensors"
    result = env.run(graph)
    assert result.status == "failed" and "image prompts" in str(result.error) and "positive" in str(result.error)


def test_unclip_checkpoint_loader_refuses_a_checkpoint_without_an_image_encoder(env):
    graph = {"version": 1, "nodes": {"ckpt": {"type": "LoadUnclipCheckpoint", "inputs": {"name": "tiny-sd1.safetensors"}}}}
    result = env.run(graph, outputs=["ckpt"])
    assert result.status == "failed" and "holds no CLIP image encoder" in str(result.error)


# --- corpus files these nodes unblock, run small -------------------------------------------------

@pytest.mark.parametrize("name, sets", [
    ("cog__examples__api_workflows__controlnet_scribble.json",
     ['14.name="tiny-sd1.safetensors"', '12.name="tiny-sd1-control.safetensors"', '13.name="tiny-vae.safetensors"',
      '11.image="in.png"', "5.width=32", "5.height=32", "3.steps=2"]),
    ("examples__controlnet__mixing_controlnets.png__png-api.json",
     ['31.name="tiny-sd1.safetensors"', '26.name="tiny-sd1-control.safetensors"',
      '27.name="tiny-sd1-control.safetensors"', '15.name="tiny-vae.safetensors"', '20.image="in.png"',
      '21.image="in.png"', "5.width=32", "5.height=32", "3.steps=2"]),
    ("templates__templates__sdxlturbo_example.json",
     ['20.name="tiny-sd1.safetensors"', "5.width=32", "5.height=32"]),
    ("examples__lcm__lcm_basic_example.png__png-api.json",
     ['4.name="tiny-sd1.safetensors"', "5.width=32", "5.height=32", "3.steps=2"]),
    ("cog__examples__api_workflows__sdxl_revision_text_prompts.json",
     ['40.name="tiny-sdxl.safetensors"', '39.name="tiny-clip-vision.safetensors"', '34.image="in.png"',
      '38.image="in.png"', "5.width=32", "5.height=32", "3.steps=2"]),
    ("examples__sdxl__sdxl_revision_zero_positive.png__png-api.json",
     ['40.name="tiny-sdxl.safetensors"', '39.name="tiny-clip-vision.safetensors"', '34.image="in.png"',
      '38.image="in.png"', "5.width=32", "5.height=32", "3.steps=2"]),
])
def test_unblocked_corpus_files_run_small(env, models, name, sets):
    if "lcm" in name:  # its LCM LoRA: a tiny one for the tiny U-Net
        sets = [*sets, f'10.name="{write_lora(models, "tiny-lcm-lora.safetensors", "sd1", SD1_UNET)}"']
    workflow = read_workflow(str(CORPUS / name), sets, env.registry)
    result = env.run(workflow)
    assert result.status == "succeeded", result.error
    images = [output(result, node_id, "image") for node_id, node in workflow.nodes.items() if node.type == "VAEDecode"]
    assert images and all(image.shape[1:3] == (32, 32) and float(image.std()) > 0 for image in images)
