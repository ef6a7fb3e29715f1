"""Bad model files name themselves, however they are bad (a header nested past Python's recursion
limit included); a latent too large for the device is refused at validation, before allocating."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from counting_pack import doc, link
from nodegraph.registry import NodeRegistry
from nodegraph.validation import WorkflowInvalid, compile_workflow
from nodegraph_diffusion.weights.files import DiffusersFolder, open_weights
from nodegraph_diffusion.weights.safetensors_io import CheckpointError


def safetensors_with_header(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, problem", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', "not valid UTF-8 JSON"),
    (b'{"w": ' + b"[" * 900 + b"]" * 900 + b"}", "header entry needs dtype, shape and data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": ' + b"[" * 900 + b"]" * 900 + b', "data_offsets": [0, 4]}}',
     "is not a list of non-negative integers"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
])
def test_bad_safetensors_headers_name_the_file(tmp_path, header, problem):
    path = safetensors_with_header(tmp_path / "bad.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError) as caught:
        open_weights(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert len(message) < 600  # a nested entry is abbreviated, not printed whole


@pytest.mark.parametrize("config", [b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff"])
def test_bad_diffusers_config_names_the_file(tmp_path, config):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_bytes(config)
    with pytest.raises(CheckpointError) as caught:
        DiffusersFolder(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'vae' / 'config.json'}: unreadable JSON")


@pytest.fixture
def diffusion_registry() -> NodeRegistry:
    import counting_pack
    import nodegraph_diffusion.nodes as diffusion

    registry = NodeRegistry()
    registry.add_pack("diffusion", diffusion.NODES, getattr(diffusion, "TYPES", ()))
    registry.add_pack("counting", [counting_pack.Sink])
    return registry


def latent_workflow(width: int, height: int, batch: int) -> dict:
    return doc(m=("EmptyLatent", {"width": width, "height": height, "batch_size": batch,
                                  "model": link("ckpt", "model")}),
               ckpt=("LoadCheckpoint", {"name": "none.safetensors"}), out=("Sink", {"value": link("m", "latent")}))


def test_a_terabyte_latent_is_refused_at_validation(diffusion_registry):
    with pytest.raises(WorkflowInvalid) as caught:
        compile_workflow(latent_workflow(16384, 16384, 4096), diffusion_registry, memory_budget=64 * 1024**3)
    [issue] = [issue for issue in caught.value.issues if issue.code == "exceeds_memory"]
    assert issue.node_id == "m" and issue.details["estimated_bytes"] == 16384 * 16384 * 4096 // 4
    assert "EmptyLatent would need about 256.0 GiB, more than the 64.0 GiB this device holds" in issue.message
    # An ordinary size raises no such issue (the checkpoint name still is one).
    with pytest.raises(WorkflowInvalid) as caught:
        compile_workflow(latent_workflow(512, 512, 1), diffusion_registry, memory_budget=64 * 1024**3)
    assert "exceeds_memory" not in {issue.code for issue in caught.value.issues}


def test_the_estimate_is_exact_once_the_model_is_known():
    from nodegraph_diffusion.nodes.latent import EmptyLatent

    sizes = {"width": 1024, "height": 1024, "batch_size": 2}
    assert EmptyLatent.estimated_bytes(sizes) == 2 * 4 * 128 * 128 * 4  # at least SD's 4 channels at f8
    flux = SimpleNamespace(latent_format=SimpleNamespace(channels=16, downscale_factor=8))
    assert EmptyLatent.estimated_bytes({**sizes, "model": flux}) == 2 * 16 * 128 * 128 * 4
    assert EmptyLatent.estimated_bytes({"height": 1024, "batch_size": 2}) is None  # width arrives by link
