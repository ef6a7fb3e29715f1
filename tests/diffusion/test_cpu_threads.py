"""The CPU thread policy (weights/devices): threads from the work size and the cores free, the
NODEGRAPH_THREADS override, what counts as busy, and the sampler, VAE and text encoder running
under it in a real graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.weights import devices
from nodegraph_diffusion.weights.devices import (THREADS_ENV, WORK_PER_THREAD, CpuLoad, DeviceError, cpu_threads,
                                                 network_work, threads_for_work)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)


@pytest.fixture
def torch_threads():
    """Room for the policy to choose (two threads configured); the count is put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_work_gets_one_thread_however_many_cores_are_free() -> None:
    idle = CpuLoad(usable=16, busy_elsewhere=0.0)
    assert threads_for_work(WORK_PER_THREAD * 0.99, idle) == 1
    assert threads_for_work(WORK_PER_THREAD * 2.5, idle) == 2
    assert threads_for_work(WORK_PER_THREAD * 1000, idle) == 16


def test_busy_cores_are_not_counted_as_free() -> None:
    big = WORK_PER_THREAD * 1000
    assert threads_for_work(big, CpuLoad(usable=2, busy_elsewhere=1.0)) == 1  # one competing job on two cores
    assert threads_for_work(big, CpuLoad(usable=2, busy_elsewhere=5.0)) == 1
    assert threads_for_work(big, CpuLoad(usable=8, busy_elsewhere=2.6)) == 5
    assert threads_for_work(big, CpuLoad(usable=8, busy_elsewhere=2.8)) == 5
    assert threads_for_work(big, CpuLoad(usable=2, busy_elsewhere=0.25)) == 2  # an editor now and then
    assert threads_for_work(big, CpuLoad(usable=2, busy_elsewhere=0.5)) == 1  # half a core taken: not free


def test_network_work_is_parameters_times_positions() -> None:
    layer = torch.nn.Conv2d(4, 8, 3)  # 8*4*9 + 8 parameters
    assert network_work(layer, 2 * 16 * 16) == (8 * 4 * 9 + 8) * 512


@pytest.mark.parametrize(("text", "expected"), [("3", 3), ("auto", None), ("", None), (" 1 ", 1)])
def test_override_from_the_environment(monkeypatch: pytest.MonkeyPatch, text: str, expected: int | None) -> None:
    monkeypatch.setenv(THREADS_ENV, text)
    assert devices.requested_threads() == expected


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5"])
def test_bad_override_names_the_variable(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(THREADS_ENV, text)
    with pytest.raises(DeviceError, match=f"NODEGRAPH_THREADS is {text!r}"):
        devices.requested_threads()


def test_cpu_threads_sets_the_count_for_the_block_and_restores_it(torch_threads) -> None:
    loaded = lambda: CpuLoad(usable=2, busy_elsewhere=3.0)  # noqa: E731
    with cpu_threads(torch.device("cpu"), WORK_PER_THREAD * 1000, probe=loaded) as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    idle = lambda: CpuLoad(usable=2, busy_elsewhere=0.0)  # noqa: E731
    with cpu_threads(torch.device("cpu"), WORK_PER_THREAD * 1000, probe=idle) as count:
        assert count == 2 and torch.get_num_threads() == 2


def test_override_wins_over_the_policy_and_other_devices_are_left_alone(torch_threads, monkeypatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    idle = lambda: CpuLoad(usable=2, busy_elsewhere=0.0)  # noqa: E731
    with cpu_threads(torch.device("cpu"), 1.0, probe=idle) as count:
        assert count == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == 2

    def never(): raise AssertionError("a GPU run does not probe the CPU")  # noqa: E704
    monkeypatch.delenv(THREADS_ENV)
    with cpu_threads(torch.device("cuda", 0), WORK_PER_THREAD * 1000, probe=never) as count:
        assert count == 2 and torch.get_num_threads() == 2


def _fake_proc(root: Path, runnable: int, own_states: str, cgroup: str = "0::/\n") -> None:
    (root / "self" / "task").mkdir(parents=True)
    (root / "loadavg").write_text(f"3.10 2.00 1.50 {runnable}/400 12345\n")
    for tid, state in enumerate(own_states, start=100):
        (root / "self" / "task" / str(tid)).mkdir()
        (root / "self" / "task" / str(tid) / "stat").write_text(f"{tid} (python (x) y) {state} 1 2 3\n")
    (root / "self" / "cgroup").write_text(cgroup)


def test_probe_counts_other_processes_runnable_threads_not_its_own(tmp_path, monkeypatch, torch_threads) -> None:
    _fake_proc(tmp_path / "proc", runnable=5, own_states="RRS")  # 5 runnable, 2 of them ours
    monkeypatch.setattr(devices, "PROC", str(tmp_path / "proc"))
    monkeypatch.setattr(devices, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
    load = devices.probe_cpu_load(looks=2, interval=0.0)
    assert load == CpuLoad(usable=2, busy_elsewhere=3.0)
    assert load.free == 1


def test_probe_scales_a_hosts_count_to_this_process_share_and_honours_quota(tmp_path, monkeypatch) -> None:
    _fake_proc(tmp_path / "proc", runnable=33, own_states="R", cgroup="0::/jobs/a\n")
    (tmp_path / "cgroup" / "jobs" / "a").mkdir(parents=True)
    (tmp_path / "cgroup" / "jobs" / "a" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs
    monkeypatch.setattr(devices, "PROC", str(tmp_path / "proc"))
    monkeypatch.setattr(devices, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        load = devices.probe_cpu_load(looks=1, interval=0.0)
    finally:
        torch.set_num_threads(before)
    # 8 CPUs in the mask, a quota of 2.5 -> 3 usable; 32 others on a 64-CPU host -> 1.5 on our 3.
    assert load == CpuLoad(usable=3, busy_elsewhere=1.5)


def test_probe_never_exceeds_the_configured_thread_count(monkeypatch) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # an application (or OMP_NUM_THREADS) asked for one
    try:
        assert devices.probe_cpu_load(looks=1).usable == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="needs /proc")
def test_probe_sees_a_competing_cpu_bound_process(torch_threads) -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True)\nwhile True: pass"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout is not None and spinner.stdout.readline() == "up\n"  # it is running now
        busy = [devices.probe_cpu_load(looks=3).busy_elsewhere for _ in range(3)]
    finally:
        spinner.kill()
        spinner.wait()
    # A process that never sleeps is runnable at every look (the others on a shared machine come and go).
    assert max(busy) >= 1.0


def test_sampler_vae_and_text_encoder_run_under_the_policy(torch_threads, monkeypatch) -> None:
    """The embedded model's txt2img graph (2 steps): with the machine reported busy every network
    call runs on one thread; with NODEGRAPH_THREADS=2 on two; afterwards the count is put back."""
    monkeypatch.setenv("NODEGRAPH_MODELS", str(REPO / "models"))
    registry, problems = build_registry([])
    assert not problems
    document = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    document["nodes"]["sampler"]["inputs"]["steps"] = 2
    executor = Executor(registry, device="cpu", output_dir=tempfile.mkdtemp())
    loaded = executor.run(document, outputs=["checkpoint"]).results["checkpoint"].outputs
    seen: list[tuple[str, int]] = []
    for name, module in (("unet", loaded.model.network), ("vae", loaded.vae.vae.decoder),
                         ("clip", next(iter(loaded.clip.encoders.values())))):
        module.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, torch.get_num_threads())))

    monkeypatch.setattr(devices, "probe_cpu_load", lambda: CpuLoad(usable=2, busy_elsewhere=4.0))
    assert executor.run(document).status == "succeeded"
    assert {name for name, _ in seen} == {"unet", "vae", "clip"}
    assert sorted(set(seen)) == [("clip", 1), ("unet", 1), ("vae", 1)]
    assert torch.get_num_threads() == 2

    seen.clear()
    monkeypatch.setenv(THREADS_ENV, "2")
    torch.set_num_threads(1)
    document["nodes"]["sampler"]["inputs"]["seed"] = 2
    document["nodes"]["prompt"]["inputs"]["text"] = "a blue square on a red background"
    assert executor.run(document).status == "succeeded"
    assert {name for name, _ in seen} == {"unet", "vae", "clip"}
    assert {threads for _, threads in seen} == {2}
    assert torch.get_num_threads() == 1
