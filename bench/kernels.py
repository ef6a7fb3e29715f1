"""The CPU fast paths of networks/kernels against the torch expressions they stand in for, at the
shapes of the embedded demo model (64x64 images, 8x8 latent) and of full-size SD1.5 (512x512, 64x64
latent). Prints JSON.

Each case times the fast path and the plain torch expression alternately (`--repeats` rounds, each
path called until ~20 ms have passed, per-call medians), and says which of the two the kernels
function takes at that shape now: its size thresholds (LINEAR_MIN_ROWS and _MACS, POINTWISE_MIN_MACS,
ATTENTION_MIN_WORK, UPSAMPLE_PHASES_MIN_PIXELS) should pick the faster one, so `chosen_to_torch`
is at most about 1 everywhere. Then the default job's sampler (workflows/txt2img.json on the
embedded model, 20 steps, new seed each run so nothing comes from the cache) with the fast paths
on and off (`kernels.ONEDNN_ENABLED`; the upsampling's phase form is not a oneDNN path and stays).

    python bench/kernels.py                # one thread, as the thresholds were measured
    python bench/kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nodegraph_diffusion.networks import kernels

ROOT = Path(__file__).resolve().parents[1]


def linear_case(rows: int, fan_in: int, fan_out: int):
    x, layer = torch.randn(rows, fan_in), nn.Linear(fan_in, fan_out)
    fast = lambda: kernels.linear(x, layer)  # noqa: E731
    plain = lambda: layer(x)  # noqa: E731
    return fast, plain, lambda: kernels._linear_pays(x, layer.weight) and kernels.onednn_usable(x, layer.weight)


def pointwise_case(batch: int, channels: int, out: int, side: int):
    x, conv = torch.randn(batch, channels, side, side), nn.Conv2d(channels, out, 1)
    return (lambda: kernels.pointwise_conv(x, conv), lambda: conv(x),
            lambda: x.numel() * out >= kernels.POINTWISE_MIN_MACS and kernels.onednn_usable(x, conv.weight))


def attention_case(batch: int, tokens: int, keys: int, heads: int, head_dim: int):
    q = torch.randn(batch, tokens, heads, head_dim)
    k, v = torch.randn(batch, keys, heads, head_dim), torch.randn(batch, keys, heads, head_dim)

    def plain() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def blocks() -> bool:
        return (tokens * keys * head_dim >= kernels.ATTENTION_MIN_WORK and kernels.onednn_usable(q, k, v)
                and torch.get_num_threads() <= kernels.ATTENTION_MAX_THREADS)

    def fast() -> torch.Tensor:  # the block path whatever the thresholds say
        saved = kernels.ATTENTION_MIN_WORK, kernels.ATTENTION_MAX_THREADS
        kernels.ATTENTION_MIN_WORK, kernels.ATTENTION_MAX_THREADS = 0, torch.get_num_threads()
        try:
            return kernels.attention(q, k, v)
        finally:
            kernels.ATTENTION_MIN_WORK, kernels.ATTENTION_MAX_THREADS = saved

    return fast, plain, blocks


def upsample_case(batch: int, channels: int, side: int):
    x, conv = torch.randn(batch, channels, side, side), nn.Conv2d(channels, channels, 3, padding=1)

    def fast() -> torch.Tensor:  # the phase form whatever the threshold says
        saved, kernels.UPSAMPLE_PHASES_MIN_PIXELS = kernels.UPSAMPLE_PHASES_MIN_PIXELS, 0
        try:
            return kernels.upsample_conv(x, conv)
        finally:
            kernels.UPSAMPLE_PHASES_MIN_PIXELS = saved

    return (fast, lambda: conv(F.interpolate(x, scale_factor=2.0, mode="nearest")),
            lambda: batch * side * side >= kernels.UPSAMPLE_PHASES_MIN_PIXELS)


def gelu_linear_case(rows: int, fan_in: int, fan_out: int):
    x, layer = torch.randn(rows, fan_in), nn.Linear(fan_in, fan_out)
    return (lambda: kernels.linear_gelu_tanh(x, layer), lambda: F.gelu(layer(x), approximate="tanh"),
            lambda: kernels._gelu_linear_pays(x, layer.weight) and kernels.onednn_usable(x, layer.weight))


def split_gelu_case(rows: int, fan_in: int, plain: int, activated: int):
    x, layer = torch.randn(rows, fan_in), nn.Linear(fan_in, plain + activated)

    def plain_form() -> tuple[torch.Tensor, torch.Tensor]:
        head, tail = layer(x).split([plain, activated], dim=-1)
        return head, F.gelu(tail, approximate="tanh")

    def takes_fast() -> bool:
        return (kernels._linear_pays(x, layer.weight[:plain]) and kernels._gelu_linear_pays(x, layer.weight[plain:])
                and kernels.onednn_usable(x, layer.weight))

    return lambda: kernels.linear_and_gelu_tanh(x, layer, plain), plain_form, takes_fast


# (model, what, builder, arguments): the demo U-Net (64 and 128 channels at 8x8, 4x4 and 2x2
# latent pixels, attention at 4x4 and 2x2 in 8 heads of 16, CLIP width 256 at 77 tokens) and
# SD1.5's (320-1280 channels, 8 heads of 40-160, 768 at 77 tokens); batch 2 as a guidance step.
CASES = [
    ("demo", "time embedding", linear_case, (2, 64, 256)),
    ("demo", "attention projections, 4x4 latent", linear_case, (32, 128, 128)),
    ("demo", "feed-forward, 4x4 latent", linear_case, (32, 128, 1024)),
    ("demo", "shortcut 1x1 conv, 8x8", pointwise_case, (2, 192, 64, 8)),
    ("demo", "shortcut 1x1 conv, 4x4", pointwise_case, (2, 256, 128, 4)),
    ("demo", "self-attention, 4x4 latent", attention_case, (2, 16, 16, 8, 16)),
    ("demo", "cross-attention, 4x4 latent", attention_case, (2, 16, 77, 8, 16)),
    ("demo", "upsample + conv, 4x4 -> 8x8", upsample_case, (2, 128, 4)),
    ("sd15", "time embedding", linear_case, (2, 320, 1280)),
    ("sd15", "attention projections, 64x64 latent", linear_case, (8192, 320, 320)),
    ("sd15", "cross-attention keys", linear_case, (154, 768, 1280)),
    ("sd15", "shortcut 1x1 conv, 32x32", pointwise_case, (2, 960, 640, 32)),
    ("sd15", "shortcut 1x1 conv, 16x16", pointwise_case, (2, 1920, 1280, 16)),
    ("sd15", "self-attention, 64x64 latent", attention_case, (2, 4096, 4096, 8, 40)),
    ("sd15", "self-attention, 32x32 latent", attention_case, (2, 1024, 1024, 8, 80)),
    ("sd15", "self-attention, 16x16 latent", attention_case, (2, 256, 256, 8, 160)),
    ("sd15", "cross-attention, 64x64 latent", attention_case, (2, 4096, 77, 8, 40)),
    ("sd15", "cross-attention, 32x32 latent", attention_case, (2, 1024, 77, 8, 80)),
    ("sd15", "upsample + conv, 32x32 -> 64x64", upsample_case, (2, 640, 32)),
    ("sd15", "upsample + conv, 8x8 -> 16x16", upsample_case, (2, 1280, 8)),
    # Transformers' MLPs (fc1 then GELU's tanh form) and Flux's single-block input layer: the demo
    # MMDiT (192 wide, 16 image and 154 text tokens, batch 2), SD3-medium and Flux.1 at 512x512.
    ("sd3-demo", "MLP fc1 + tanh GELU, image tokens", gelu_linear_case, (32, 192, 768)),
    ("sd3-demo", "MLP fc1 + tanh GELU, text tokens", gelu_linear_case, (308, 192, 768)),
    ("sd3", "MLP fc1 + tanh GELU, image tokens", gelu_linear_case, (1024, 1536, 6144)),
    ("flux", "MLP fc1 + tanh GELU, text tokens", gelu_linear_case, (256, 3072, 12288)),
    ("flux", "single block: q, k, v + tanh GELU of the MLP input", split_gelu_case, (1280, 3072, 9216, 12288)),
    ("sd3", "joint attention, 154 text + 1024 image tokens", attention_case, (1, 1178, 1178, 24, 64)),
    ("flux", "joint attention, 256 text + 1024 image tokens", attention_case, (1, 1280, 1280, 24, 128)),
]


def per_call(function: Callable[[], torch.Tensor], budget: float = 0.02) -> float:
    """Seconds per call: calls repeated until `budget` seconds have passed (at least one)."""
    calls, start = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return elapsed / calls


def measure_case(builder, arguments: tuple, repeats: int) -> dict:
    fast, plain, takes_fast = builder(*arguments)
    fast(), plain()  # warm-up: first-call allocations, oneDNN primitive creation
    times: dict[str, list[float]] = {"fast": [], "torch": []}
    for _ in range(repeats):
        times["fast"].append(per_call(fast))
        times["torch"].append(per_call(plain))
    fast_s, torch_s = statistics.median(times["fast"]), statistics.median(times["torch"])
    chosen = "fast" if takes_fast() else "torch"
    return {"shape": list(arguments), "torch_us": round(torch_s * 1e6, 1), "fast_us": round(fast_s * 1e6, 1),
            "fast_to_torch": round(fast_s / torch_s, 3), "takes": chosen,
            "chosen_to_torch": round((fast_s if chosen == "fast" else torch_s) / torch_s, 3)}


def default_job_sampler(rounds: int) -> dict:
    """The default job's sampler seconds with the oneDNN paths on and off, alternating, one executor
    (the checkpoint loads once; the sampler runs each time with a new seed)."""
    from nodegraph.executor import Executor
    from nodegraph.plugins import build_registry

    os.environ.setdefault("NODEGRAPH_MODELS", str(ROOT / "models"))
    registry, problems = build_registry([])
    assert not problems, problems
    document = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    executor = Executor(registry, device="cpu", output_dir=tempfile.mkdtemp(prefix="bench-kernels-"))
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    seed = 1000
    for round_ in range(rounds + 1):  # round 0 warms up (loads the checkpoint, first-use kernels)
        for state in (("on", "off") if round_ % 2 == 0 else ("off", "on")):
            kernels.ONEDNN_ENABLED = state == "on"
            seed += 1
            document["nodes"]["sampler"]["inputs"]["seed"] = seed
            result = executor.run(document)
            assert result.status == "succeeded", result.error
            if round_:
                seconds[state].append(result.results["sampler"].seconds)
    kernels.ONEDNN_ENABLED = True
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    return {"steps": document["nodes"]["sampler"]["inputs"]["steps"], "rounds": rounds,
            "sampler_seconds_fast_paths_on": round(on, 3), "sampler_seconds_fast_paths_off": round(off, 3),
            "on_to_off": round(on / off, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--job-rounds", type=int, default=8, help="default-job sampler runs per state (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["NODEGRAPH_THREADS"] = str(args.threads)
    load_before = os.getloadavg()[0]
    report: dict = {"threads": args.threads, "repeats": args.repeats, "onednn_available": kernels._ONEDNN_AVAILABLE,
                    "cases": []}
    with torch.inference_mode():
        for model, what, builder, arguments in CASES:
            report["cases"].append({"model": model, "what": what, "path": builder.__name__.removesuffix("_case"),
                                    **measure_case(builder, arguments, args.repeats)})
    report["worst_chosen_to_torch"] = max(case["chosen_to_torch"] for case in report["cases"])
    if args.job_rounds:
        report["default_job"] = default_job_sampler(args.job_rounds)
    report["load_average_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
