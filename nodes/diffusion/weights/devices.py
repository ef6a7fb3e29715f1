"""Where models run and in what precision: device choice, dtype policy, CPU thread policy, and a model manager that offloads when memory is short."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Component = Literal["unet", "text_encoder", "vae", "controlnet"]
COMPONENTS: tuple[Component, ...] = ("unet", "text_encoder", "vae", "controlnet")

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class DeviceError(ValueError):
    """A requested device or precision is not available here; the message says what is."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """Resolve a device request: ``"auto"`` is CUDA if present, then MPS, then CPU.

    An explicit ``"cuda"``, ``"cuda:1"`` or ``"mps"`` that is not available raises DeviceError
    rather than silently running somewhere slower.
    """
    if isinstance(preference, torch.device):
        device = preference
    elif preference == "auto":
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(preference)
        except RuntimeError as exc:
            raise DeviceError(f"unknown device {preference!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda":
        if not cuda_available():
            raise DeviceError(f"device {str(device)!r} requested but CUDA is not available (available: {available_devices()})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {str(device)!r} requested but only {count} CUDA device(s) exist")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps" and not mps_available():
        raise DeviceError(f"device 'mps' requested but MPS is not available (available: {available_devices()})")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {str(device)!r} is not supported; expected cpu, cuda or mps")
    return device


def available_devices() -> list[str]:
    """Names of the devices this process can compute on, CPU last."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda_available() else []
    if mps_available():
        found.append("mps")
    return [*found, "cpu"]


def cuda_supports_bf16(device: torch.device) -> bool:
    # bf16 matmuls need compute capability 8.0 (Ampere) or newer.
    return torch.cuda.get_device_capability(device)[0] >= 8


def default_dtype(device: torch.device, component: Component = "unet") -> torch.dtype:
    """The precision a component runs in on `device` when the user does not choose one.

    - CPU: fp32 (half-precision convolutions are slow or unsupported on CPUs).
    - CUDA with bf16 (Ampere and newer): bf16 for everything; its fp32-sized exponent avoids the
      fp16 overflows of the SDXL VAE and of SD2 attention.
    - Older CUDA and MPS: fp16, except the VAE in fp32 because its decoder overflows fp16
      (the SDXL VAE produces NaNs).
    """
    if component not in COMPONENTS:
        raise DeviceError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and cuda_supports_bf16(device):
        return torch.bfloat16
    if device.type in ("cuda", "mps"):
        return torch.float32 if component == "vae" else torch.float16
    raise DeviceError(f"no dtype policy for device {str(device)!r}")


def resolve_dtype(
    request: str | torch.dtype | None, device: torch.device, component: Component = "unet"
) -> torch.dtype:
    """A dtype from a user request (``None``/``"auto"`` -> :func:`default_dtype`, ``"fp16"``, ``torch.bfloat16``, ...).

    bf16 on a CUDA device without bf16 support raises DeviceError.
    """
    if request is None or request == "auto":
        return default_dtype(device, component)
    if isinstance(request, torch.dtype):
        dtype = request
    else:
        try:
            dtype = DTYPE_NAMES[request.lower()]
        except KeyError:
            raise DeviceError(f"unknown dtype {request!r}; expected 'auto' or one of {sorted(DTYPE_NAMES)}") from None
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DeviceError(f"dtype {dtype} is not a floating-point precision models can run in")
    if dtype == torch.bfloat16 and device.type == "cuda" and not cuda_supports_bf16(device):
        raise DeviceError(f"{device} does not support bf16 (needs compute capability 8.0+); use fp16 or fp32")
    return dtype


THREADS_ENV = "NODEGRAPH_THREADS"
"""Environment variable fixing the CPU threads a run computes with: a number, or "auto" (the policy
below). `nodegraph run --threads N` and `nodegraph serve --threads N` set it."""

WORK_PER_THREAD = 4e8
"""Work (parameters x positions, see :func:`network_work`) one more intra-op thread needs per network
call to pay for itself: about 15 ms of single-thread compute on a current x86 core. Below it the
fork/join of every operator costs more than splitting it saves, and on a busy machine a thread that
waits for its core stalls every operator. The tiny-shapes demo model at 64x64 (1.3e9) gets at most
three threads this way, SD1.5 at 512x512 (7e12) all there are."""

COPY_WORK_PER_ELEMENT = 25.0
"""What reading, converting and writing one weight costs in :data:`WORK_PER_THREAD`'s units (a
single thread converts about 1.5e7 elements in the 15 ms that much network work takes): loading
the 27 MB demo model stays on one thread, an SD1.5 checkpoint (1e9 weights) gets every free core."""


@dataclass(frozen=True)
class CpuLoad:
    """How many cores this process may compute on, and how much of them other processes use.

    usable: the most intra-op threads this process should run: the CPUs it may be scheduled on,
    its cgroup's CPU quota and the count torch is configured with (OMP_NUM_THREADS, or what the
    application set), whichever is least. busy_elsewhere: runnable threads of other processes on
    those cores, on average over a few looks.
    """

    usable: int
    busy_elsewhere: float

    @property
    def free(self) -> int:
        """Cores nobody else is computing on (at least 1: this process runs anyway). A core counts
        when it is free three quarters of the time: a thread that loses its core more often stalls
        every operator its team shares."""
        return max(1, min(self.usable, math.floor(self.usable - self.busy_elsewhere + 0.25)))


def network_work(network: nn.Module, positions: int) -> float:
    """A size for one network call: its parameter count times the positions it runs at
    (batch x latent height x width). Proportional to the multiply-adds of a convolutional or
    transformer network at a given depth profile; what :data:`WORK_PER_THREAD` is measured in."""
    return float(sum(p.numel() for p in network.parameters())) * positions


def threads_for_work(work: float, load: CpuLoad) -> int:
    """Intra-op threads for a run of `work` per network call on a CPU loaded as `load`: enough that
    each thread has :data:`WORK_PER_THREAD` to do, no more than the cores that are free."""
    by_work = max(1, int(work // WORK_PER_THREAD))
    return max(1, min(by_work, load.free))


def requested_threads() -> int | None:
    """The thread count fixed by $NODEGRAPH_THREADS, or None when it is unset or "auto"."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text in ("", "auto"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise DeviceError(f"${THREADS_ENV} is {text!r}; expected a number of threads (1 or more) or 'auto'")
    return int(text)


CGROUP_ROOT = "/sys/fs/cgroup"
PROC = "/proc"


def _cgroup_cpu_quota() -> float | None:
    """CPUs this process's cgroup may use per period (v2 cpu.max, v1 cfs quota), or None if unlimited."""
    relative = ""
    try:
        with open(f"{PROC}/self/cgroup") as f:
            for line in f:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" or "cpu" in controllers.split(","):
                    relative = path.lstrip("/")
                    break
    except (OSError, ValueError):
        return None
    # The process's own cgroup, then the root of the namespace (where a container usually sees its own).
    for base in (os.path.join(CGROUP_ROOT, relative), CGROUP_ROOT):
        try:
            with open(os.path.join(base, "cpu.max")) as f:
                quota, period = f.read().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
        for v1 in ("cpu", "cpu,cpuacct"):
            try:
                with open(os.path.join(base, v1, "cpu.cfs_quota_us")) as f:
                    quota_us = int(f.read())
                with open(os.path.join(base, v1, "cpu.cfs_period_us")) as f:
                    period_us = int(f.read())
            except (OSError, ValueError):
                continue
            return None if quota_us <= 0 else quota_us / period_us
    return None


def usable_cpus() -> int:
    """CPUs this process may compute on: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _own_running_threads() -> int:
    """Threads of this process that are running or runnable now (state R in /proc/self/task)."""
    running = 0
    for tid in os.listdir(f"{PROC}/self/task"):
        try:
            with open(f"{PROC}/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        if stat[stat.rindex(")") + 2] == "R":
            running += 1
    return running


_last_own_cpu: tuple[float, float] | None = None  # (monotonic time, process CPU time) at the last probe


def _busy_elsewhere_from_load_average() -> float:
    """Where /proc is missing (macOS): the 1-minute load average less what this process itself
    computed since the last look (that part of the load is ours)."""
    global _last_own_cpu
    now = (time.monotonic(), time.process_time())
    previous, _last_own_cpu = _last_own_cpu, now
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0
    own = 0.0
    if previous is not None and 0 < now[0] - previous[0] < 60:
        own = (now[1] - previous[1]) / (now[0] - previous[0])
    return max(0.0, load - own)


def probe_cpu_load(looks: int = 4, interval: float = 0.001) -> CpuLoad:
    """How busy the CPUs this process may use are right now.

    "Busy" counts threads of other processes that want a core at this moment (/proc/loadavg's
    runnable count less this process's own runnable threads), averaged over `looks` looks
    `interval` seconds apart: a CPU-bound neighbour is seen every time, an editor or a browser
    now and then, in proportion to what it uses. The 1-minute load average would lag a minute
    behind a job that just started and count this process's own last run. Where a container sees
    the whole host's count, it is scaled to the share of the host's CPUs this process may use.
    """
    usable = min(usable_cpus(), max(1, torch.get_num_threads()))
    try:
        total = 0
        for look in range(looks):
            if look:
                time.sleep(interval)
            with open(f"{PROC}/loadavg") as f:
                runnable = int(f.read().split()[3].split("/")[0])
            total += max(0, runnable - _own_running_threads())
        busy = total / looks
        online = os.cpu_count() or usable
        busy *= min(1.0, usable_cpus() / online)
    except OSError:
        busy = _busy_elsewhere_from_load_average()
    return CpuLoad(usable, busy)


PROBE_REUSE_SECONDS = 1.0
"""A probe this recent is reused: the loads, encodes and decode of one run follow each other within
milliseconds, and each look costs a few."""

_recent_probe: tuple[float, Callable[[], CpuLoad], CpuLoad] | None = None


def _recent_cpu_load() -> CpuLoad:
    global _recent_probe
    now, probe = time.monotonic(), probe_cpu_load
    recent = _recent_probe
    if recent is not None and recent[1] is probe and now - recent[0] < PROBE_REUSE_SECONDS:
        return recent[2]
    load = probe()
    _recent_probe = (now, probe, load)
    return load


@contextmanager
def cpu_threads(device: torch.device, work: float, probe: Callable[[], CpuLoad] | None = None) -> Iterator[int]:
    """Run the block with the intra-op thread count for `work` (see :func:`network_work`) on `device`.

    On the CPU: $NODEGRAPH_THREADS when set to a number, else :func:`threads_for_work` on what
    `probe` (default :func:`probe_cpu_load`, reused for :data:`PROBE_REUSE_SECONDS`) finds free now; the previous count is restored afterwards (it is also the ceiling the
    policy chooses under, so an application that set fewer threads keeps them). Other devices:
    nothing changes. Yields the thread count the block runs with. Results can differ in the last
    bits between thread counts (reductions split differently); fix the count for bit-identical runs.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu":
        yield previous
        return
    count = requested_threads()
    if count is None:
        load = (probe or _recent_cpu_load)()
        count = threads_for_work(work, load)
        logger.info("CPU threads: %d (work %.2g per call, %d usable, %.1f busy elsewhere)",
                    count, work, load.usable, load.busy_elsewhere)
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        if count != previous:
            torch.set_num_threads(previous)


COMPILE_ENV = "NODEGRAPH_COMPILE"
"""Environment variable turning on torch.compile for the denoiser: "1" (inductor's default mode),
"reduce-overhead" (CUDA graphs on a GPU), "max-autotune", "max-autotune-no-cudagraphs"; unset, "" or
"0": eager. `nodegraph run --compile [MODE]` and `nodegraph serve --compile [MODE]` set it."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode() -> str | None:
    """The torch.compile mode $NODEGRAPH_COMPILE asks for, or None for eager."""
    text = os.environ.get(COMPILE_ENV, "").strip().lower()
    if text in ("", "0", "off", "no", "false"):
        return None
    if text in ("1", "on", "yes", "true"):
        return "default"
    if text not in COMPILE_MODES:
        raise DeviceError(f"${COMPILE_ENV} is {text!r}; expected 0/1 or one of {', '.join(COMPILE_MODES)}")
    return text


def compiled(network: nn.Module, mode: str = "default") -> nn.Module:
    """`network` compiled with torch.compile (inductor) in `mode`, made once per loaded network and
    mode and kept with it, so every later run of the same model reuses the compiled code (inductor
    compiles again only for new input shapes). The result shares the network's weights, forwards
    attribute reads (`config`) to it, and sees weight patches applied in place (LoRA)."""
    if mode not in COMPILE_MODES:
        raise DeviceError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    # A plain dict attribute, not a submodule: the compiled wrapper stays out of state_dict().
    kept: dict[str, nn.Module] = network.__dict__.setdefault("_compiled_by_mode", {})
    if mode not in kept:
        logger.info("compiling %s with torch.compile (mode %s); the first steps take longer",
                    type(network).__name__, mode)
        kept[mode] = torch.compile(network, mode=None if mode == "default" else mode)
    return kept[mode]


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (for CPU: available system memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        return _available_system_memory()
    raise DeviceError(f"cannot measure free memory on {device}")


def _available_system_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        logger.debug("/proc/meminfo unreadable; falling back to sysconf", exc_info=True)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        key = id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def same_device(a: torch.device | None, b: torch.device | None) -> bool:
    """Device equality where ``cuda`` and ``cuda:0`` (the default index) are the same device."""
    if a is None or b is None:
        return a is b
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def module_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def module_dtype(module: nn.Module) -> torch.dtype | None:
    for tensor in module.parameters():
        return tensor.dtype
    return None


class OffloadPolicy(str, Enum):
    """When a managed model leaves the compute device.

    NEVER: models stay on the compute device once used (fastest; needs memory for all of them).
    AFTER_USE: each model goes back to the offload device when its `use` block ends (least memory).
    WHEN_NEEDED: models stay until another model needs the room; then the least recently used
        ones not in use are moved out first.
    """

    NEVER = "never"
    AFTER_USE = "after_use"
    WHEN_NEEDED = "when_needed"


@dataclass(frozen=True)
class LoadedModelInfo:
    """One managed model as inspected: its name, size, and where and in what precision it is."""

    name: str
    bytes: int
    device: torch.device | None
    dtype: torch.dtype | None
    in_use: bool


class OffloadError(RuntimeError):
    """A model cannot be placed on the compute device even after offloading everything else."""


class ModelManager:
    """Keeps models on the compute device only while needed, per an :class:`OffloadPolicy`.

    >>> manager = ModelManager(pick_device("auto"))
    >>> manager.add("unet", unet)
    >>> with manager.use("unet") as model:
    ...     model(x)

    `reserve_bytes` is left free on the compute device for activations. `free_memory_probe`
    reports free bytes on a device (default :func:`free_memory`).
    """

    def __init__(
        self,
        device: torch.device,
        offload_device: torch.device | str = "cpu",
        policy: OffloadPolicy | str = OffloadPolicy.WHEN_NEEDED,
        reserve_bytes: int = 1 << 30,
        free_memory_probe: Callable[[torch.device], int] = free_memory,
    ) -> None:
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.policy = OffloadPolicy(policy)
        self.reserve_bytes = reserve_bytes
        self._free_memory = free_memory_probe
        self._models: dict[str, nn.Module] = {}
        # Where each model is, as the manager placed it; every move goes through _move.
        self._placement: dict[str, torch.device | None] = {}
        self._last_used: dict[str, float] = {}
        self._in_use: dict[str, int] = {}

    def add(self, name: str, model: nn.Module) -> nn.Module:
        """Register `model` under `name`; it stays where it is until first used."""
        if name in self._models and self._models[name] is not model:
            raise ValueError(f"a different model is already managed under the name {name!r}")
        self._models[name] = model
        self._placement[name] = module_device(model)
        self._last_used.setdefault(name, 0.0)
        self._in_use.setdefault(name, 0)
        return model

    def remove(self, name: str) -> nn.Module:
        """Stop managing `name` (it is not moved); returns the model."""
        if self._in_use.get(name):
            raise OffloadError(f"model {name!r} is in use and cannot be removed")
        self._last_used.pop(name, None)
        self._in_use.pop(name, None)
        self._placement.pop(name, None)
        return self._models.pop(name)

    def _name_of(self, model: nn.Module | str) -> str:
        if isinstance(model, str):
            if model not in self._models:
                raise KeyError(f"no model named {model!r} is managed (managed: {sorted(self._models)})")
            return model
        for name, candidate in self._models.items():
            if candidate is model:
                return name
        raise KeyError("that model is not managed; add() it first")

    @contextmanager
    def use(self, model: nn.Module | str) -> Iterator[nn.Module]:
        """Put the model on the compute device for the block, then apply the offload policy."""
        name = self._name_of(model)
        module = self._models[name]
        self._make_room_for(name)
        self._move(name, self.device)
        self._in_use[name] += 1
        try:
            yield module
        finally:
            self._in_use[name] -= 1
            self._last_used[name] = time.monotonic()
            if self.policy is OffloadPolicy.AFTER_USE and not self._in_use[name]:
                self._move(name, self.offload_device)

    def _on_device(self, name: str) -> bool:
        return same_device(self._placement[name], self.device)

    def _make_room_for(self, name: str) -> None:
        if self.policy is not OffloadPolicy.WHEN_NEEDED or self.device == self.offload_device or self._on_device(name):
            return
        needed = module_bytes(self._models[name]) + self.reserve_bytes
        free = self._free_memory(self.device)
        if free >= needed:
            return
        candidates = sorted(
            (n for n in self._models if n != name and not self._in_use[n] and self._on_device(n)),
            key=lambda n: self._last_used[n],
        )
        for victim in candidates:
            logger.info("offloading %s to %s to make room for %s", victim, self.offload_device, name)
            self._move(victim, self.offload_device)
            free = self._free_memory(self.device)
            if free >= needed:
                return
        logger.warning(
            "%s needs %d bytes on %s but only %d are free after offloading every idle model; trying anyway",
            name, needed, self.device, free,
        )

    def _move(self, name: str, device: torch.device) -> None:
        if not same_device(self._placement[name], device):
            self._transfer(self._models[name], device)
            self._placement[name] = device

    def _transfer(self, module: nn.Module, device: torch.device) -> None:
        """Move the weights; the one place data crosses devices."""
        module.to(device)

    def offload_all(self) -> None:
        """Move every idle model to the offload device."""
        for name in self._models:
            if not self._in_use[name]:
                self._move(name, self.offload_device)

    def loaded(self) -> list[LoadedModelInfo]:
        """What is managed, how big it is, and where and in what precision it is now."""
        return [
            LoadedModelInfo(
                name=name,
                bytes=module_bytes(module),
                device=self._placement[name],
                dtype=module_dtype(module),
                in_use=bool(self._in_use[name]),
            )
            for name, module in self._models.items()
        ]
