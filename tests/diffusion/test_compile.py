"""The --compile option (weights/devices.compiled, NODEGRAPH_COMPILE): a network is compiled once per
loaded model and mode and reused by later runs; the compiled network computes what the eager one
does, with inductor on this CPU, and a sampling graph runs through it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.weights import devices
from nodegraph_diffusion.weights.devices import COMPILE_ENV, DeviceError, compile_mode, compiled

REPO = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    """Conv, GroupNorm, SiLU and attention through SDPA: the kinds of kernels a U-Net compiles to."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3, padding=1)
        self.norm = nn.GroupNorm(8, 32)
        self.qkv = nn.Linear(32, 96)
        self.config = "kept"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        b, c, height, width = h.shape
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return h + attended.transpose(1, 2).reshape(b, c, height, width)


@pytest.mark.parametrize(("text", "mode"), [("", None), ("0", None), ("1", "default"), ("on", "default"),
                                            ("reduce-overhead", "reduce-overhead"), ("Max-Autotune", "max-autotune")])
def test_compile_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch, text: str, mode: str | None) -> None:
    monkeypatch.setenv(COMPILE_ENV, text)
    assert compile_mode() == mode


def test_unknown_compile_mode_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_ENV, "fastest")
    with pytest.raises(DeviceError, match="NODEGRAPH_COMPILE is 'fastest'"):
        compile_mode()
    with pytest.raises(DeviceError, match="unknown compile mode 'fastest'"):
        compiled(Block(), "fastest")


def test_compiled_once_per_network_and_mode_and_kept_out_of_the_weights() -> None:
    block = Block()
    keys = set(block.state_dict())
    first = compiled(block)
    assert compiled(block) is first
    assert compiled(block, "max-autotune-no-cudagraphs") is not first
    assert compiled(Block()) is not first  # another loaded model, its own compiled code
    assert set(block.state_dict()) == keys
    assert first.config == "kept"  # attribute reads reach the network (the guider reads .config)


@pytest.mark.slow
def test_inductor_on_this_cpu_computes_what_eager_does() -> None:
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        eager = block(x)
        try:
            fast = compiled(block)(x)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # no working C++ toolchain here
            pytest.skip(f"inductor cannot compile on this machine: {str(error).splitlines()[0]}")
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            block.conv.weight.mul_(2.0)  # weights changed in place (a LoRA patch): the compiled code sees them
        torch.testing.assert_close(compiled(block)(x), block(x), rtol=1e-4, atol=1e-5)


def test_sampling_graph_runs_the_compiled_network_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """NODEGRAPH_COMPILE=1 through the embedded model's txt2img graph: the U-Net is compiled on the
    first run and the same compiled module serves the next run (another seed); the images equal the
    eager run's. Dynamo traces with its eager backend here, so the test does not wait for inductor
    (which the test above covers)."""
    made: list[nn.Module] = []
    real_compile = torch.compile

    def compile_traced(module: nn.Module, mode: str | None = None) -> nn.Module:
        made.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(devices.torch, "compile", compile_traced)
    monkeypatch.setenv("NODEGRAPH_MODELS", str(REPO / "models"))
    registry, problems = build_registry([])
    assert not problems
    document = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    document["nodes"]["sampler"]["inputs"]["steps"] = 3

    monkeypatch.setenv(COMPILE_ENV, "1")
    executor = Executor(registry, device="cpu", output_dir=tempfile.mkdtemp())
    for seed in (2, 3):
        document["nodes"]["sampler"]["inputs"]["seed"] = seed
        result = executor.run(document, outputs=["decode"])
        assert result.executed[-2:] == ["sampler", "decode"]
    network = result.results["checkpoint"].outputs.model.network
    assert made == [network]  # compiled once, for the U-Net, reused by the second run

    monkeypatch.delenv(COMPILE_ENV)
    eager = Executor(registry, device="cpu", output_dir=tempfile.mkdtemp()).run(document, outputs=["decode"])
    assert made == [network]
    # Traced and eager runs may round differently (1.2e-5 seen): 1e-4 is 0.03/255.
    torch.testing.assert_close(result.results["decode"].outputs.image, eager.results["decode"].outputs.image,
                               rtol=0, atol=1e-4)
