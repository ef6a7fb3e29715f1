"""Our U-Net against diffusers' UNet2DConditionModel: forward time and peak memory, full-size SD1.5, CPU fp32.

Prints JSON. Both models carry the same random weights (diffusers' moved through our key
mapping), so the run also reports how far apart their outputs are at full size.

Time: one warm-up forward each, then ``--repeats`` forwards alternating between the two models
(so drifting machine load hits both alike), median per model (and the ratio of the fastest runs,
the least disturbed ones on a shared machine), under ``torch.inference_mode``.

Memory: each model runs one forward in a fresh child process. Before it, the child resets the
kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs) and notes its RSS; afterwards it reads
the peak (VmHWM). Peak minus starting RSS is the forward's extra resident memory: activations,
workspaces and allocator slack, everything the process really had to hold, weights excluded.
Linux only.

    python bench/unet.py                      # the real measurement (a few minutes on 2 cores)
    python bench/unet.py --latent 32 --repeats 1   # a quick look
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

import torch
from torch import nn

from nodegraph_diffusion.networks import unet

CONTEXT_TOKENS = 77
# Runwayml/stable-diffusion-v1-5's unet/config.json, as far as it differs from diffusers' defaults.
SD15_DIFFUSERS_CONFIG = {"cross_attention_dim": 768, "sample_size": 64}


def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights of sane scale (activations stay O(1), so no inf/NaN or denormal slow paths)."""
    generator = torch.Generator().manual_seed(seed)
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


def peak_memory(which: str, batch: int, latent: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", which, "--batch", str(batch), "--latent", str(latent)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_peak_memory(args.child, args.batch, args.latent)))
        return

    reference = build_diffusers(0)
    ours = ours_from(reference)
    x, t, context = inputs(args.batch, args.latent)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    runners = {"ours": (run_ours, ours), "diffusers": (run_diffusers, reference)}
    with torch.inference_mode():
        outputs = {name: forward(model, x, t, context) for name, (forward, model) in runners.items()}
        for _ in range(args.repeats):
            for name, (forward, model) in runners.items():
                start = time.perf_counter()
                forward(model, x, t, context)
                times[name].append(time.perf_counter() - start)
    del reference, ours, runners

    median = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "benchmark": "unet_forward_sd15",
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "batch": args.batch,
        "latent": [args.latent, args.latent],
        "context": [CONTEXT_TOKENS, 768],
        "repeats": args.repeats,
        "ours_s": times["ours"],
        "diffusers_s": times["diffusers"],
        "ours_median_s": median["ours"],
        "diffusers_median_s": median["diffusers"],
        "time_ratio_ours_over_diffusers": median["ours"] / median["diffusers"],
        # The fastest run is the one least disturbed by other load on a shared machine.
        "time_ratio_of_fastest_runs": min(times["ours"]) / min(times["diffusers"]),
        "load_average_1min_after": os.getloadavg()[0],
        "max_abs_diff_vs_diffusers": (outputs["ours"] - outputs["diffusers"]).abs().max().item(),
        "output_abs_max": outputs["diffusers"].abs().max().item(),
    }
    if not args.skip_memory:
        memory = {name: peak_memory(name, args.batch, args.latent) for name in ("ours", "diffusers")}
        report["memory_method"] = "fresh child per model; VmHWM after one forward minus VmRSS before (clear_refs=5)"
        report["ours_forward_peak_extra_mib"] = memory["ours"]["forward_peak_extra_mib"]
        report["diffusers_forward_peak_extra_mib"] = memory["diffusers"]["forward_peak_extra_mib"]
        report["memory_ratio_ours_over_diffusers"] = (
            memory["ours"]["forward_peak_extra_mib"] / memory["diffusers"]["forward_peak_extra_mib"]
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
