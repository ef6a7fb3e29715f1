"""DiT and PixArt-α/Σ end to end through the executor on tiny random models: a class label through
KSampler and VAEDecode (DiT), a T5 prompt through KSampler (PixArt-Σ as a ComfyUI API graph with
UNETLoader and CLIPLoader type pixart; PixArt-α from a whole file with the learned null caption as the
negative), at a non-square size; and one full DiT sampling run against diffusers' DiTPipeline with its
scheduler set to ours and the same start noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline
from diffusers.pipelines.dit import pipeline_dit

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.nodes import comfyui

from _dit_fixtures import (
    DIT_FILE,
    PIXART_ALPHA_ALL_IN_ONE,
    PIXART_SIGMA_FILE,
    T5_FILE,
    VAE_FILE,
    dit_reference,
    vae_reference,
    write_dit_models,
)

pytestmark = pytest.mark.slow

API = comfyui.IMPORTERS[0]
# A non-square image: 80 rows, 48 columns (latent 10 x 6: 5 x 3 patches).
WIDTH, HEIGHT = 48, 80
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dit_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def executor(models, tmp_path_factory):
    """One executor for the module, so the model files load once (as in a long-running server)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NODEGRAPH_MODELS", str(models))
        registry, problems = build_registry()
        assert not problems, problems
        yield Executor(registry, OutputCache(max_bytes=4 << 30), device="cpu",
                       output_dir=tmp_path_factory.mktemp("out"))


def link(node: str, output: str) -> dict[str, str]:
    return {"from": node, "output": output}


def run(executor: Executor, workflow: dict, *outputs: str):
    result = executor.run(workflow, outputs=list(outputs))
    assert result.status == "succeeded", result.error
    return result


def output(result, node_id: str, name: str):
    return getattr(result.results[node_id].outputs, name)


def check_image(image: torch.Tensor, width: int = WIDTH, height: int = HEIGHT) -> None:
    assert image.shape == (1, height, width, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0.0  # a picture, not a constant


def dit_graph(class_index: int = 207, width: int = WIDTH, height: int = HEIGHT, steps: int = 3,
              scheduler: str = "normal", seed: int = 7) -> dict:
    return {"version": 1, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": DIT_FILE}},
        "label": {"type": "ClassLabel", "inputs": {"model": link("ckpt", "model"), "class_index": class_index}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": link("ckpt", "model"), "width": width,
                                                    "height": height}},
        "sample": {"type": "KSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("label", "conditioning"),
            "negative": link("label", "unconditional"), "latent": link("empty", "latent"), "seed": seed,
            "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": scheduler}},
        "vae": {"type": "LoadVAE", "inputs": {"name": VAE_FILE, "family": "sd1"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("vae", "vae"), "latent": link("sample", "latent")}},
    }}


def test_dit_class_label_through_ksampler_and_vae_decode(executor):
    first = run(executor, dit_graph(), "decode")
    check_image(output(first, "decode", "image"))
    latent = output(first, "sample", "latent").samples
    assert latent.shape == (1, 4, HEIGHT // 8, WIDTH // 8) and torch.isfinite(latent).all()
    assert output(first, "label", "unconditional")[0].class_label == 1000  # the null class

    # Another class changes the image; the model is not loaded again.
    second = run(executor, dit_graph(class_index=3), "decode")
    assert "ckpt" not in second.executed
    assert (output(second, "decode", "image") - output(first, "decode", "image")).abs().max() > 1e-3


def test_dit_class_outside_the_model_and_text_on_dit_are_refused(executor):
    result = executor.run(dit_graph(class_index=1000), outputs=["decode"])
    assert result.status == "failed"
    assert "class_index" in str(result.error) and "0..999" in str(result.error)
    graph = dit_graph()
    graph["nodes"]["t5"] = {"type": "LoadTextEncoder", "inputs": {"name": T5_FILE, "type": "pixart"}}
    graph["nodes"]["text"] = {"type": "TextEncode", "inputs": {"clip": link("t5", "clip"), "text": PROMPT}}
    graph["nodes"]["sample"]["inputs"]["positive"] = link("text", "conditioning")
    result = executor.run(graph, outputs=["decode"])
    assert result.status == "failed" and "class labels, not text" in str(result.error)


def pixart_sigma_api_graph(negative: str = "", seed: int = 5) -> dict:
    """PixArt-Σ as a ComfyUI user builds it: UNETLoader, CLIPLoader (type pixart), CLIPTextEncode for
    both prompts, EmptyLatentImage, KSampler, VAELoader, VAEDecode."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": PIXART_SIGMA_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": T5_FILE, "type": "pixart", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": negative}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": seed,
            "steps": 3, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
    }


def test_pixart_sigma_comfyui_graph_with_a_lone_t5(executor):
    workflow = API.convert(pixart_sigma_api_graph())
    assert workflow["nodes"]["2"]["type"] == "LoadTextEncoder" and workflow["nodes"]["2"]["inputs"]["type"] == "pixart"
    first = run(executor, workflow, "8")
    check_image(output(first, "8", "image"))
    assert output(first, "6", "latent").samples.shape == (1, 4, HEIGHT // 8, WIDTH // 8)
    positive = output(first, "3", "conditioning")[0]
    assert positive.context.shape == (1, 300, 32) and positive.context_mask is not None  # Σ's padding, masked

    second = run(executor, API.convert(pixart_sigma_api_graph(negative="blurry")), "8")
    assert set(second.executed) == {"4", "6", "8"}  # only the negative prompt and what follows
    assert (output(second, "8", "image") - output(first, "8", "image")).abs().max() > 1e-3


def test_a_vae_for_pixart_sigma_takes_sdxls_latent_scaling(executor):
    graph = {"version": 1, "nodes": {
        "sigma": {"type": "LoadVAE", "inputs": {"name": VAE_FILE, "family": "pixart_sigma"}},
        "alpha": {"type": "LoadVAE", "inputs": {"name": VAE_FILE, "family": "pixart_alpha"}},
    }}
    result = run(executor, graph, "sigma", "alpha")
    assert output(result, "sigma", "vae").latent_format.scaling_factor == pytest.approx(0.13025)
    assert output(result, "alpha", "vae").latent_format.scaling_factor == pytest.approx(0.18215)


def test_pixart_alpha_whole_file_with_the_null_caption_as_negative(executor):
    graph = {"version": 1, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "inputs": {"name": PIXART_ALPHA_ALL_IN_ONE}},
        "text": {"type": "TextEncode", "inputs": {"clip": link("ckpt", "clip"), "text": PROMPT}},
        "null": {"type": "UnconditionalConditioning", "inputs": {"model": link("ckpt", "model")}},
        "empty": {"type": "EmptyLatent", "inputs": {"model": link("ckpt", "model"), "width": WIDTH,
                                                    "height": HEIGHT}},
        "sample": {"type": "KSampler", "inputs": {
            "model": link("ckpt", "model"), "positive": link("text", "conditioning"),
            "negative": link("null", "conditioning"), "latent": link("empty", "latent"), "seed": 2, "steps": 3,
            "cfg": 4.5, "sampler_name": "euler_ancestral", "scheduler": "normal"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
    }}
    result = run(executor, graph, "decode")
    check_image(output(result, "decode", "image"))
    assert output(result, "text", "conditioning")[0].context.shape == (1, 120, 32)  # α's token length
    assert output(result, "null", "conditioning")[0].context.shape == (1, 120, 32)
    assert output(result, "ckpt", "vae").latent_format.scaling_factor == pytest.approx(0.18215)


def test_unconditional_conditioning_of_a_model_without_one_is_refused(executor):
    graph = {"version": 1, "nodes": {
        "unet": {"type": "LoadDiffusionModel", "inputs": {"name": PIXART_SIGMA_FILE}},
        "null": {"type": "UnconditionalConditioning", "inputs": {"model": link("unet", "model")}},
        "label": {"type": "ClassLabel", "inputs": {"model": link("unet", "model"), "class_index": 1}},
    }}
    assert run(executor, graph, "null")  # PixArt: its null caption
    result = executor.run(graph, outputs=["label"])
    assert result.status == "failed" and "class-conditional DiT" in str(result.error)


# --------------------------------------------------------------------------- against DiTPipeline

STEPS, CFG, SEED, CLASS = 8, 4.0, 11, 207


@torch.no_grad()
def test_dit_sampling_matches_diffusers_dit_pipeline(executor, monkeypatch):
    """One full class-conditional run, ours (euler on the ddim_uniform schedule) against DiTPipeline with
    DDIM (eta 0, "leading" timesteps with offset 1, final alpha 1): DDIM's deterministic step is exactly
    the Euler step of the same ODE in the VE variables, at the same timesteps 876, 751, ..., 1.

    Start noise: both draw torch.randn from a CPU generator with the same seed. We start txt2img at
    x_T = sigma_T * noise (VE), i.e. sqrt(1 - alpha_bar_T) * noise in DDIM's variables; the pipeline
    takes the unit noise itself as x_T, which is that sample only as alpha_bar_T -> 0 (here
    alpha_bar_876 = 2.6e-4), so its draw is scaled to the same start."""
    ours = output(run(executor, dit_graph(CLASS, 64, 64, steps=STEPS, scheduler="ddim_uniform", seed=SEED),
                      "decode"), "decode", "image")[0].numpy()

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
                              prediction_type="epsilon")
    pipeline = DiTPipeline(transformer=dit_reference(), vae=vae_reference(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == [876, 751, 626, 501, 376, 251, 126, 1]
    start_scale = float((1 - scheduler.alphas_cumprod[scheduler.timesteps[0]]).sqrt())
    unit_noise = pipeline_dit.randn_tensor
    monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda *a, **k: unit_noise(*a, **k) * start_scale)
    theirs = pipeline(class_labels=[CLASS], guidance_scale=CFG, num_inference_steps=STEPS,
                      generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]

    difference = np.abs(ours - theirs) * 255
    assert theirs.std() > 0.05 and ((theirs > 0) & (theirs < 1)).mean() > 0.9  # a picture, hardly clamped
    assert difference.max() <= 3.0 and difference.mean() <= 1.0, (difference.max(), difference.mean())


def test_conditioning_nodes_keep_masks_and_refuse_class_labels_by_name(executor):
    graph = {"version": 1, "nodes": {
        "t5": {"type": "LoadTextEncoder", "inputs": {"name": T5_FILE, "type": "pixart"}},
        "a": {"type": "TextEncode", "inputs": {"clip": link("t5", "clip"), "text": "a red cube"}},
        "b": {"type": "TextEncode", "inputs": {"clip": link("t5", "clip"), "text": "on a table"}},
        "concat": {"type": "ConditioningConcat", "inputs": {"target": link("a", "conditioning"),
                                                            "source": link("b", "conditioning")}},
        "zero": {"type": "ConditioningZeroOut", "inputs": {"conditioning": link("a", "conditioning")}},
    }}
    result = run(executor, graph, "concat", "zero")
    (a,), (b,) = output(result, "a", "conditioning"), output(result, "b", "conditioning")
    (joined,) = output(result, "concat", "conditioning")
    assert joined.context.shape == (1, 600, 32)
    assert torch.equal(joined.context_mask, torch.cat([a.context_mask, b.context_mask], dim=1))
    (zeroed,) = output(result, "zero", "conditioning")
    assert not zeroed.context.any() and torch.equal(zeroed.context_mask, a.context_mask)

    labels = dit_graph()
    labels["nodes"]["zero"] = {"type": "ConditioningZeroOut", "inputs": {"conditioning": link("label", "conditioning")}}
    failed = executor.run(labels, outputs=["zero"])
    assert failed.status == "failed" and "ConditioningZeroOut works on text conditioning" in str(failed.error)
