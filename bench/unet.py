"""Our U-Net against diffusers' UNet2DConditionModel: forward time and peak memory, full-size SD1.5, CPU fp32.

Prints JSON. Both models carry the same random weights (diffusers' moved through our key
mapping), so the run also reports how far apart their outputs are at full size.

Time: one warm-up forward each, then ``--repeats`` forwards alternating between the two models
(so drifting machine load hits both alike), under ``torch.inference_mode``. Each forward is timed
by the wall clock and by the process's CPU time; on a shared machine the CPU time leaves out the
time other processes held the core, so its ratio is the steadier one. Reported: the median per
model and the ratio of medians, and the ratio of the fastest runs (the least disturbed ones), with
the load average before and after. ``--threads`` sets torch's intra-op threads (both models run
with the same count). ``--compile`` then does the same with both models through torch.compile
(inductor; ours as ``--compile`` runs it), first calls (compiling) timed apart.

Memory: each model runs one forward in a fresh child process. Before it, the child resets the
kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs) and notes its RSS; afterwards it reads
the peak (VmHWM). Peak minus starting RSS is the forward's extra resident memory: activations,
workspaces and allocator slack, everything the process really had to hold, weights excluded.
Linux only.

    python bench/unet.py --threads 1          # the measurement in the README (minutes on 2 cores)
    python bench/unet.py --latent 32 --repeats 1   # a quick look
    python bench/unet.py --threads 1 --compile --skip-memory   # eager and compiled
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from nodegraph_diffusion.networks import unet

CONTEXT_TOKENS = 77
# Runwayml/stable-diffusion-v1-5's unet/config.json, as far as it differs from diffusers' defaults.
SD15_DIFFUSERS_CONFIG = {"cross_attention_dim": 768, "sample_size": 64}


def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights of sane scale (activations stay O(1), so no inf/NaN in fp16 or denormal slow
    paths), drawn on the device the module's parameters are on."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim > 1:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return module.eval()


def build_diffusers(seed: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
    return fill_random_(model.to_empty(device="cpu"), seed)


def ours_from(reference: nn.Module) -> unet.UNet:
    """Our U-Net sharing the reference's weight storage (no copy)."""
    with torch.device("meta"):
        ours = unet.UNet(unet.SD1_CONFIG)
    ours.load_state_dict(unet.ldm_unet_keys_from_diffusers(reference.state_dict()), strict=True, assign=True)
    return ours.eval()


def build_ours(seed: int) -> unet.UNet:
    with torch.device("meta"):
        ours = unet.UNet(unet.SD1_CONFIG)
    return fill_random_(ours.to_empty(device="cpu"), seed)


def inputs(batch: int, latent: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=generator)
    t = torch.linspace(999, 1, batch)
    context = torch.randn(batch, CONTEXT_TOKENS, 768, generator=generator)
    return x, t, context


def run_diffusers(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return model(x, t, encoder_hidden_states=context).sample


def run_ours(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return model(x, t, context)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def child_peak_memory(which: str, batch: int, latent: int) -> dict:
    """In this (fresh) process: the extra resident memory one forward of ``which`` needs."""
    model = build_ours(1) if which == "ours" else build_diffusers(1)
    forward = run_ours if which == "ours" else run_diffusers
    x, t, context = inputs(batch, latent)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        forward(model, x, t, context)
    peak = _status_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "forward_peak_extra_mib": (peak - before) / 1024}


def peak_memory(which: str, batch: int, latent: int, threads: int | None) -> dict:
    threads_args = ["--threads", str(threads)] if threads else []
    result = subprocess.run(
        [sys.executable, __file__, "--child", which, "--batch", str(batch), "--latent", str(latent), *threads_args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def timing_summary(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict:
    """Per-run times, medians and ours/diffusers ratios (of medians and of the fastest runs) of
    both clocks; ``wall`` and ``cpu`` map "ours" and "diffusers" to their runs' seconds."""
    summary: dict = {}
    for clock, runs in (("wall", wall), ("cpu", cpu)):
        for name in ("ours", "diffusers"):
            summary[f"{name}_{clock}_s"] = runs[name]
            summary[f"{name}_{clock}_median_s"] = statistics.median(runs[name])
        summary[f"{clock}_ratio_of_medians"] = statistics.median(runs["ours"]) / statistics.median(runs["diffusers"])
        # The fastest run is the one least disturbed by other load on a shared machine.
        summary[f"{clock}_ratio_of_fastest"] = min(runs["ours"]) / min(runs["diffusers"])
    return summary


def alternate(
    runners: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, list[float]], dict[str, list[float]]]:
    """One call of each runner, then ``repeats`` rounds alternating them (so drifting machine load
    hits all alike), under ``torch.inference_mode``. Returns each runner's first output, first-call
    wall seconds, and the rounds' wall and CPU seconds."""
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, torch.Tensor] = {}
    first_call: dict[str, float] = {}
    with torch.inference_mode():
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run()
            first_call[name] = time.perf_counter() - start
        for _ in range(repeats):
            for name, run in runners.items():
                start_cpu, start = time.process_time(), time.perf_counter()
                run()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return outputs, first_call, wall, cpu


def cpu_report(benchmark: str) -> dict:
    """The head of a CPU float32 report: what ran, on what, with which torch and thread count."""
    return {"benchmark": benchmark, "device": "cpu", "dtype": "float32", "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also both models through torch.compile (inductor, default mode; minutes to compile)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_peak_memory(args.child, args.batch, args.latent)))
        return

    reference = build_diffusers(0)
    ours = ours_from(reference)
    x, t, context = inputs(args.batch, args.latent)
    load_before = os.getloadavg()[0]
    outputs, _, wall, cpu = alternate(
        {"ours": lambda model=ours: run_ours(model, x, t, context),
         "diffusers": lambda model=reference: run_diffusers(model, x, t, context)},
        args.repeats,
    )
    report = {
        **cpu_report("unet_forward_sd15"),
        "batch": args.batch,
        "latent": [args.latent, args.latent],
        "context": [CONTEXT_TOKENS, 768],
        "repeats": args.repeats,
        **timing_summary(wall, cpu),
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "max_abs_diff_vs_diffusers": (outputs["ours"] - outputs["diffusers"]).abs().max().item(),
        "output_abs_max": outputs["diffusers"].abs().max().item(),
    }
    if args.compile:
        from nodegraph_diffusion.weights.devices import compiled

        # ours as `--compile` runs it (compiled once per loaded network), diffusers' the same way.
        compiled_ours, compiled_reference = compiled(ours), torch.compile(reference)
        runners = {"ours": lambda: run_ours(compiled_ours, x, t, context),
                   "diffusers": lambda: run_diffusers(compiled_reference, x, t, context)}
        compiled_outputs, first_call, compiled_wall, compiled_cpu = alternate(runners, args.repeats)
        report["compiled_first_call_s"] = first_call  # compiling included
        report.update({f"compiled_{key}": value for key, value in timing_summary(compiled_wall, compiled_cpu).items()})
        report["compiled_ours_cpu_over_eager_diffusers_cpu"] = (
            statistics.median(compiled_cpu["ours"]) / statistics.median(cpu["diffusers"])
        )
        report["compiled_max_abs_diff_vs_eager_diffusers"] = (
            (compiled_outputs["ours"] - outputs["diffusers"]).abs().max().item()
        )
        report["load_average_1min_after_compiled"] = os.getloadavg()[0]
    del reference, ours

    if not args.skip_memory:
        memory = {name: peak_memory(name, args.batch, args.latent, args.threads) for name in ("ours", "diffusers")}
        report["memory_method"] = "fresh child per model; VmHWM after one forward minus VmRSS before (clear_refs=5)"
        report["ours_forward_peak_extra_mib"] = memory["ours"]["forward_peak_extra_mib"]
        report["diffusers_forward_peak_extra_mib"] = memory["diffusers"]["forward_peak_extra_mib"]
        report["memory_ratio_ours_over_diffusers"] = (
            memory["ours"]["forward_peak_extra_mib"] / memory["diffusers"]["forward_peak_extra_mib"]
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
