"""Loader nodes at validation: a model file of an architecture the library cannot build is refused
by name from its safetensors header before anything loads, and a missing model names its kind and
the folders searched (issue 15, better errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _checkpoint_fixtures import sd1_checkpoint, write_safetensors
from nodegraph_diffusion.nodes import comfyui, folders, loading

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph.validation import WorkflowInvalid

API = comfyui.IMPORTERS[0]
AURA = {"double_layers.0.attn.w1q.weight": torch.zeros(8, 8), "final_linear.weight": torch.zeros(4, 8)}


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "models"
    for kind in ("checkpoints", "diffusion_models"):
        (root / kind).mkdir(parents=True)
    write_safetensors(root / "diffusion_models" / "aura_flow_0.3.safetensors", AURA, dtype=None)
    write_safetensors(root / "checkpoints" / "aura_flow_0.3.safetensors",
                      {f"model.diffusion_model.{k}": v for k, v in AURA.items()}, dtype=None)
    write_safetensors(root / "checkpoints" / "tiny-sd1.safetensors", sd1_checkpoint())
    (root / "checkpoints" / "truncated.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    for name in (folders.CONFIG_ENV, folders.INPUTS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(folders.MODELS_ENV, str(root))
    loading._detect_header.cache_clear()
    return root


@pytest.fixture
def executor() -> Executor:
    registry, problems = build_registry()
    assert not problems, problems
    return Executor(registry, device="cpu")


def txt2img(loader: dict) -> dict:
    """A ComfyUI API graph whose model comes from `loader` (node "4")."""
    return {
        "4": loader,
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["10", 1]}},
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0], "seed": 1,
            "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["10", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }


def issues(executor: Executor, graph: dict) -> list:
    with pytest.raises(WorkflowInvalid) as caught:
        executor.compile(API.convert(graph))
    return caught.value.issues


@pytest.mark.parametrize("loader", [
    {"class_type": "UNETLoader", "inputs": {"unet_name": "aura_flow_0.3.safetensors", "weight_dtype": "default"}},
    {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "aura_flow_0.3.safetensors"}},
])
def test_an_unsupported_architecture_is_refused_at_validation_by_name(models, executor, loader, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("validation loaded weights")

    monkeypatch.setattr(loading, "load_checkpoint", no_loading)
    monkeypatch.setattr(loading, "load_transformer", no_loading)
    (issue,) = issues(executor, txt2img(loader))
    assert (issue.code, issue.node_id, issue.input) == ("unsupported_architecture", "4", "name")
    assert issue.details["architecture"] == "AuraFlow"
    assert "aura_flow_0.3.safetensors is a AuraFlow model, an architecture nodegraph cannot run yet" in issue.message


def test_a_supported_checkpoint_validates_and_a_broken_header_is_named(models, executor):
    executor.compile(API.convert(txt2img({"class_type": "CheckpointLoaderSimple",
                                          "inputs": {"ckpt_name": "tiny-sd1.safetensors"}})))
    (issue,) = issues(executor, txt2img({"class_type": "CheckpointLoaderSimple",
                                         "inputs": {"ckpt_name": "truncated.safetensors"}}))
    assert (issue.code, issue.node_id, issue.input) == ("invalid_model_file", "4", "name")
    assert "truncated.safetensors" in issue.message


def test_the_header_is_read_once_per_version_of_the_file(models, executor, monkeypatch):
    reads = []
    detect = loading.detect
    monkeypatch.setattr(loading, "detect", lambda path: reads.append(path) or detect(path))
    graph = txt2img({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "aura_flow_0.3.safetensors"}})
    for _ in range(3):
        issues(executor, graph)
    assert sorted(Path(path).name for path in reads) == ["aura_flow_0.3.safetensors", "tiny-sd1.safetensors"]
    path = models / "checkpoints" / "aura_flow_0.3.safetensors"
    write_safetensors(path, {f"model.diffusion_model.{k}": v for k, v in AURA.items()} | {"extra": torch.zeros(3)},
                      dtype=None)
    issues(executor, graph)
    assert [Path(path).name for path in reads[2:]] == ["aura_flow_0.3.safetensors"]


def test_a_missing_model_names_its_kind_and_the_folders_searched(models, executor):
    (issue,) = issues(executor, txt2img({"class_type": "UNETLoader",
                                         "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}}))
    assert (issue.code, issue.node_id, issue.input) == ("value_not_in_choices", "4", "name")
    assert "no diffusion_models file 'flux1-dev.safetensors'; searched" in issue.message
    assert str((models / "diffusion_models").absolute()) in issue.message
    assert issue.details["value"] == "flux1-dev.safetensors"


def test_a_missing_model_with_no_folder_of_its_kind_says_where_it_looked(models, executor, monkeypatch):
    graph = txt2img({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}})
    graph["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1],
                                                          "lora_name": "style.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    graph["3"]["inputs"]["model"] = ["11", 0]
    (issue,) = issues(executor, graph)
    assert (issue.node_id, issue.input) == ("11", "name")
    assert "no loras file 'style.safetensors': no loras folder exists (looked for" in issue.message
    assert str((models / "loras").absolute()) in issue.message and folders.MODELS_ENV in issue.message


def test_validate_command_refuses_the_unsupported_checkpoint(models, tmp_path, capsys):
    path = tmp_path / "aura.json"
    path.write_text(json.dumps(txt2img({"class_type": "CheckpointLoaderSimple",
                                        "inputs": {"ckpt_name": "aura_flow_0.3.safetensors"}})))
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr().out
    assert "4.name: input 'name': aura_flow_0.3.safetensors is a AuraFlow model" in out
    assert "[unsupported_architecture]" in out
