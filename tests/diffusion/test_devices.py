"""Device choice, dtype policy and the offloading model manager (CUDA/MPS branches by monkeypatching)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nodegraph_diffusion.weights import devices
from nodegraph_diffusion.weights.devices import DeviceError, ModelManager, OffloadPolicy


@pytest.fixture
def no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Pretend one CUDA device exists; the capability major version is adjustable per test."""
    state = {"major": 8}
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (state["major"], 0))
    return state


def test_auto_is_cpu_without_accelerators(no_accelerators: None) -> None:
    assert devices.pick_device("auto") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict[str, int]) -> None:
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert devices.pick_device("auto") == torch.device("mps")


def test_explicit_unavailable_device_is_an_error(no_accelerators: None) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        devices.pick_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        devices.pick_device("mps")
    with pytest.raises(DeviceError, match="unknown device"):
        devices.pick_device("tpu-ish")


def test_cuda_index_past_device_count(fake_cuda: dict[str, int]) -> None:
    assert devices.pick_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        devices.pick_device("cuda:3")


def test_dtype_policy_cpu_is_fp32() -> None:
    cpu = torch.device("cpu")
    assert {devices.default_dtype(cpu, c) for c in devices.COMPONENTS} == {torch.float32}


def test_dtype_policy_cuda_bf16_when_supported_else_fp16_with_fp32_vae(fake_cuda: dict[str, int]) -> None:
    cuda = torch.device("cuda", 0)
    assert devices.default_dtype(cuda, "unet") == torch.bfloat16
    assert devices.default_dtype(cuda, "vae") == torch.bfloat16
    fake_cuda["major"] = 7
    assert devices.default_dtype(cuda, "unet") == torch.float16
    assert devices.default_dtype(cuda, "text_encoder") == torch.float16
    assert devices.default_dtype(cuda, "vae") == torch.float32
    with pytest.raises(DeviceError, match="does not support bf16"):
        devices.resolve_dtype("bf16", cuda)


def test_dtype_policy_mps() -> None:
    mps = torch.device("mps")
    assert devices.default_dtype(mps, "unet") == torch.float16
    assert devices.default_dtype(mps, "vae") == torch.float32


def test_resolve_dtype_names() -> None:
    cpu = torch.device("cpu")
    assert devices.resolve_dtype("auto", cpu) == torch.float32
    assert devices.resolve_dtype("fp16", cpu) == torch.float16
    assert devices.resolve_dtype("BF16", cpu) == torch.bfloat16
    assert devices.resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype"):
        devices.resolve_dtype("fp8", cpu)
    with pytest.raises(DeviceError, match="not a floating-point precision"):
        devices.resolve_dtype(torch.int8, cpu)


def test_module_bytes_counts_parameters_and_buffers_once() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.add_module("tied", model[0])  # the same Linear twice must count once
    expected = (4 * 3 + 3) * 4 + (3 + 3) * 4 + (3 + 3) * 4 + 8  # linear, bn affine, bn stats, num_batches_tracked
    assert devices.module_bytes(model) == expected
    assert devices.module_bytes(model.half()) == expected - ((4 * 3 + 3) + 3 + 3 + 3 + 3) * 2


class RecordingManager(ModelManager):
    """Moves nothing; records the transfers the policy asked for, so placement logic runs on CPU."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.transfers: list[tuple[int, str]] = []

    def _transfer(self, module: nn.Module, device: torch.device) -> None:
        self.transfers.append((id(module), str(device)))


def _linear(n: int) -> nn.Linear:
    return nn.Linear(n, n, bias=False)  # n*n*4 bytes


def test_after_use_moves_to_device_and_back() -> None:
    gpu = torch.device("cuda", 0)
    manager = RecordingManager(gpu, policy="after_use", free_memory_probe=lambda d: 1 << 40)
    a = manager.add("a", _linear(4))
    with manager.use("a") as model:
        assert model is a
        assert manager.loaded()[0].device == gpu and manager.loaded()[0].in_use
    info = manager.loaded()[0]
    assert (info.name, info.bytes, info.device, info.dtype, info.in_use) == ("a", 64, torch.device("cpu"), torch.float32, False)
    assert manager.transfers == [(id(a), "cuda:0"), (id(a), "cpu")]


def test_never_keeps_models_resident() -> None:
    gpu = torch.device("cuda", 0)
    manager = RecordingManager(gpu, policy=OffloadPolicy.NEVER, free_memory_probe=lambda d: 0)
    a = manager.add("a", _linear(4))
    for _ in range(2):
        with manager.use(a):
            pass
    assert manager.transfers == [(id(a), "cuda:0")]


def test_when_needed_evicts_least_recently_used_idle_model() -> None:
    gpu = torch.device("cuda", 0)
    capacity = 2 * 400 + 100  # room for two 400-byte models (10x10 fp32) and a little
    manager = RecordingManager(gpu, policy="when_needed", reserve_bytes=0)
    manager._free_memory = lambda device: capacity - sum(  # type: ignore[method-assign]
        info.bytes for info in manager.loaded() if info.device == gpu
    )
    a, b, c = (manager.add(n, _linear(10)) for n in "abc")
    with manager.use("a"):
        pass
    with manager.use("b"):
        pass
    with manager.use("a"):  # a is now more recently used than b
        pass
    with manager.use("c"):  # needs room: b (least recent) goes
        placed = {info.name: str(info.device) for info in manager.loaded()}
    assert placed == {"a": "cuda:0", "b": "cpu", "c": "cuda:0"}
    assert manager.transfers == [(id(a), "cuda:0"), (id(b), "cuda:0"), (id(b), "cpu"), (id(c), "cuda:0")]


def test_when_needed_never_evicts_a_model_in_use() -> None:
    gpu = torch.device("cuda", 0)
    manager = RecordingManager(gpu, policy="when_needed", reserve_bytes=0)
    manager._free_memory = lambda device: 0  # type: ignore[method-assign]
    manager.add("a", _linear(10))
    manager.add("b", _linear(10))
    with manager.use("a"):
        with manager.use("b"):
            placed = {info.name: str(info.device) for info in manager.loaded()}
    assert placed == {"a": "cuda:0", "b": "cuda:0"}
    with pytest.raises(KeyError, match="no model named 'zz'"):
        with manager.use("zz"):
            pass


def test_real_transfer_on_cpu_keeps_weights() -> None:
    manager = ModelManager(torch.device("cpu"), policy="after_use")
    model = manager.add("m", _linear(3))
    before = model.weight.detach().clone()
    with manager.use(model) as used:
        out = used(torch.eye(3))
    assert torch.equal(out, before.t())
    assert manager.loaded()[0].device == torch.device("cpu")


def test_runs_under_a_vram_cap_offload_only_what_they_must() -> None:
    """A txt2img run's models (text encoder, U-Net, VAE), used in that order twice, on a device
    whose memory (simulated through the free-memory probe) holds the U-Net and one other model but
    not all three: each is on the device while used, the device never holds more than its cap less
    the reserve, and the least recently used idle model is the one that leaves."""
    gpu = torch.device("cuda", 0)
    sizes = {"text_encoder": 40, "unet": 80, "vae": 30}  # Linear(n, n): n*n*4 bytes
    reserve = 500
    cap = (80 * 80 + 40 * 40) * 4 + reserve + 1000
    manager = RecordingManager(gpu, policy="when_needed", reserve_bytes=reserve)

    def resident() -> int:
        return sum(info.bytes for info in manager.loaded() if info.device == gpu)

    manager._free_memory = lambda device: cap - resident()  # type: ignore[method-assign]
    models = {name: manager.add(name, _linear(n)) for name, n in sizes.items()}
    placements, peak = [], 0
    for _ in range(2):
        for name in ("text_encoder", "unet", "vae"):
            with manager.use(name):
                placed = {info.name for info in manager.loaded() if info.device == gpu}
                assert name in placed
                placements.append(sorted(placed))
                peak = max(peak, resident())
    assert peak <= cap - reserve
    assert placements == [["text_encoder"], ["text_encoder", "unet"], ["unet", "vae"],
                          ["text_encoder", "vae"], ["text_encoder", "unet"], ["unet", "vae"]]
    ids = {id(module): name for name, module in models.items()}
    moved = [(ids[key], device) for key, device in manager.transfers]
    assert moved[:4] == [("text_encoder", "cuda:0"), ("unet", "cuda:0"), ("text_encoder", "cpu"), ("vae", "cuda:0")]


def test_runs_with_room_for_every_model_never_offload() -> None:
    gpu = torch.device("cuda", 0)
    manager = RecordingManager(gpu, policy="when_needed", reserve_bytes=500)
    manager._free_memory = lambda device: 10**6 - sum(  # type: ignore[method-assign]
        info.bytes for info in manager.loaded() if info.device == gpu)
    for name, n in {"text_encoder": 40, "unet": 80, "vae": 30}.items():
        manager.add(name, _linear(n))
    for _ in range(3):
        for name in ("text_encoder", "unet", "vae"):
            with manager.use(name):
                pass
    assert [device for _, device in manager.transfers] == ["cuda:0"] * 3
