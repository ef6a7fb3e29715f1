"""Hypernetworks (A1111 / ComfyUI format) and difference ControlNets on tiny random models: the hypernetwork's
MLPs act on every attention layer's key and value inputs of their width as k + s * mlp(k) (checked
against the attention written out), only while the model runs; a difference ControlNet becomes the
file's differences plus the model's weights (with its LoRA)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nodegraph.node import CancelToken, RunContext
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.stable_diffusion import LatentFormat
from nodegraph_diffusion.components import DiffusionModel
from nodegraph_diffusion.networks import controlnet
from nodegraph_diffusion.networks.attention import CrossAttention
from nodegraph_diffusion.networks.hypernetwork import Hypernetwork, HypernetworkError, HypernetworkHook
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.diff_controlnet import LoadDiffControlNet
from nodegraph_diffusion.nodes.hypernetwork import LoadHypernetwork
from nodegraph_diffusion.sampling.model_sampling import ModelSampling

import _checkpoint_fixtures as fx
from _random_weights import randomize_
from _unet_fixtures import CONTEXT_DIM, TINY_SD1, unet_inputs


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None)


def model(seed: int = 0) -> DiffusionModel:
    return DiffusionModel(randomize_(UNet(TINY_SD1), seed=seed), ModelFamily.SD1, ModelSampling.for_prediction("eps"),
                          LatentFormat(4, 0.18215, 0.0, 8))


def mlp_state(width: int, hidden: int, seed: int, layer_norm: bool = False) -> dict[str, Tensor]:
    """An MLP width -> hidden -> width in the format's keys (Linear, [LayerNorm], Linear, [LayerNorm])."""
    g = torch.Generator().manual_seed(seed)
    state = {"linear.0.weight": torch.randn(hidden, width, generator=g) * 0.3,
             "linear.0.bias": torch.randn(hidden, generator=g) * 0.1}
    if layer_norm:
        state |= {"linear.2.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
                  "linear.2.bias": 0.1 * torch.randn(hidden, generator=g)}
    state |= {"linear.3.weight": torch.randn(width, hidden, generator=g) * 0.3,
              "linear.3.bias": torch.randn(width, generator=g) * 0.1}
    if layer_norm:
        state |= {"linear.4.weight": 1 + 0.1 * torch.randn(width, generator=g),
                  "linear.4.bias": 0.1 * torch.randn(width, generator=g)}
    return state


def hypernetwork_file(path: Path, widths: tuple[int, ...], **options) -> Path:
    norm = options.get("is_layer_norm", False)
    state: dict = {width: [mlp_state(width, 2 * width, 2 * i, norm), mlp_state(width, 2 * width, 2 * i + 1, norm)]
                   for i, width in enumerate(widths)}
    state |= {"activation_func": "relu", "is_layer_norm": False, "use_dropout": True, "activate_output": False,
              "last_layer_dropout": False, "name": "tiny", "step": 100} | options
    torch.save(state, path)
    return path


def mlp_written_out(state: dict[str, Tensor], x: Tensor) -> Tensor:
    hidden = torch.relu(x @ state["linear.0.weight"].T + state["linear.0.bias"])
    return hidden @ state["linear.3.weight"].T + state["linear.3.bias"]


def test_hypernetwork_changes_keys_and_values_of_its_width_as_written_out(tmp_path):
    width, context_width = 32, CONTEXT_DIM
    path = hypernetwork_file(tmp_path / "h.pt", (width,))
    hypernetwork = Hypernetwork.load(path)
    state = torch.load(path, weights_only=True)
    attn = randomize_(CrossAttention(width, heads=2, head_dim=8), seed=1)
    cross = randomize_(CrossAttention(width, heads=2, head_dim=8, context_dim=context_width + 1), seed=2)
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(3))
    context = torch.randn(2, 4, context_width + 1, generator=torch.Generator().manual_seed(4))
    strength = 0.7
    with torch.no_grad():
        plain_cross = cross(x, context)
        attn.kv_hooks.append(hypernetwork.key_value_hook(strength, torch.device("cpu"), torch.float32))
        cross.kv_hooks.append(attn.kv_hooks[0])
        got, got_cross = attn(x), cross(x, context)
        k_in = x + strength * mlp_written_out(state[width][0], x)
        v_in = x + strength * mlp_written_out(state[width][1], x)
        q = attn.to_q(x).view(2, 5, 2, 8).transpose(1, 2)
        k = attn.to_k(k_in).view(2, 5, 2, 8).transpose(1, 2)
        v = attn.to_v(v_in).view(2, 5, 2, 8).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        expected = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(got_cross, plain_cross)  # no MLP for the width of this context


@pytest.mark.parametrize("layer_norm", [False, True])
def test_hypernetwork_node_acts_only_while_the_model_runs(tmp_path, monkeypatch, layer_norm):
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    # Widths of the tiny U-Net's self-attention (32, 64) and of its text (CONTEXT_DIM).
    hypernetwork_file(folder / "h.pt", (32, 64, CONTEXT_DIM), is_layer_norm=layer_norm)
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path))
    base = model(seed=1)
    inputs = unet_inputs(TINY_SD1, batch=1, height=8, width=8)
    with torch.no_grad():
        plain = base.network(inputs["x"], inputs["timesteps"], inputs["context"])
        outs = {}
        for strength in (0.0, 1.0, -0.5):
            hyper = LoadHypernetwork().run(LoadHypernetwork.Inputs(model=base, name="h.pt", strength=strength),
                                           ctx(tmp_path)).model
            assert hyper.network is base.network
            with hyper.patched_network() as network:
                layers = [m for m in network.modules() if isinstance(m, CrossAttention)]
                assert all(len(layer.kv_hooks) == 1 for layer in layers) and len(layers) == 22
                outs[strength] = network(inputs["x"], inputs["timesteps"], inputs["context"])
            assert all(not layer.kv_hooks for layer in layers)
    assert torch.allclose(outs[0.0], plain, atol=1e-6)
    assert (outs[1.0] - plain).abs().max() > 1e-3 and (outs[-0.5] - outs[1.0]).abs().max() > 1e-3
    # Without gradients, like `plain` (CPU inference takes other kernels than autograd does).
    with torch.no_grad():
        assert torch.equal(base.network(inputs["x"], inputs["timesteps"], inputs["context"]), plain)


def test_unreadable_or_foreign_hypernetwork_files_are_named(tmp_path, monkeypatch):
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    hypernetwork_file(folder / "odd.pt", (32,), activation_func="gelu_new")
    torch.save({"weights": torch.zeros(2)}, folder / "empty.pt")
    (folder / "text.pt").write_text("not a pickle")
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path))
    for name, message in (("odd.pt", "activation 'gelu_new' is not one of"), ("empty.pt", "not a hypernetwork"),
                          ("text.pt", "cannot be read as a hypernetwork file")):
        with pytest.raises(InputError, match=message):
            LoadHypernetwork().run(LoadHypernetwork.Inputs(model=model(), name=name), ctx(tmp_path))
    with pytest.raises(HypernetworkError):
        Hypernetwork.from_state({32: [mlp_state(32, 8, 0)]})


def test_difference_controlnet_is_the_files_differences_plus_the_models_weights(tmp_path, monkeypatch):
    folder = tmp_path / "controlnet"
    folder.mkdir()
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path))
    trained = fx.controlnet_weights(TINY_SD1, seed=4)  # the ControlNet as trained from some base
    base = model(seed=1)
    lora_name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    lora = torch.randn(base.network.get_parameter(lora_name).shape, generator=torch.Generator().manual_seed(9))

    class Delta:
        source = "lora"

        def tensor(self, shape, dtype, device):
            return lora.to(device, dtype)

    tuned = base.with_patch({lora_name: Delta()}, 0.5)
    unet = dict(base.network.named_parameters())
    shared = [name for name in trained if name in unet]
    assert len(shared) > 50 and any(name.startswith("zero_convs") for name in trained if name not in unet)
    diffs = {name: value - unet[name].detach() if name in unet else value for name, value in trained.items()}
    fx.write_safetensors(folder / "diff.safetensors", {**fx.prefixed("control_model.", diffs),
                                                      "difference": torch.tensor([])}, dtype=torch.float32)
    fx.write_safetensors(folder / "plain.safetensors", fx.prefixed("control_model.", trained), dtype=torch.float32)

    loaded = LoadDiffControlNet().run(LoadDiffControlNet.Inputs(model=tuned, name="diff.safetensors"),
                                      ctx(tmp_path)).control_net
    got = dict(loaded.controlnet.named_parameters())
    for name, value in trained.items():
        expected = value + (0.5 * lora if name == lora_name else 0)
        assert torch.allclose(got[name], expected, atol=1e-6), name
    # Without the marker it is an ordinary ControlNet: loaded as it is.
    plain = LoadDiffControlNet().run(LoadDiffControlNet.Inputs(model=tuned, name="plain.safetensors"),
                                     ctx(tmp_path)).control_net
    assert all(torch.equal(p, trained[name]) for name, p in plain.controlnet.named_parameters())
    assert isinstance(loaded.controlnet, controlnet.ControlNet)
