"""GPU U-Net speed: SD1.5 at 512x512 and SDXL at 1024x1024, our U-Net against diffusers'
UNet2DConditionModel on the same random full-size weights, eager and compiled, in one process.
Prints JSON (one object; without CUDA one line saying so, exit status 0).

An "iteration" is what a sampler step costs with classifier-free guidance: one U-Net call on a
batch of 2 (positive and negative prompt), 77 context tokens. Both models hold the same weights
(diffusers' moved through our key mapping, storage shared), in fp16 by default (the published
diffusers figures are fp16; `--dtype bf16` for our CUDA default policy on Ampere and newer).
Attention goes through torch's scaled_dot_product_attention in both (flash / memory-efficient
kernels on CUDA).

Time: warm-up calls, then `--repeats` rounds alternating the two models, each round `--iters`
calls between CUDA synchronisations; it/s from the median round. Compiled: torch.compile of each
model in `--compile-mode` (default "default"; "reduce-overhead" adds CUDA graphs), the compile
time reported apart. Memory: peak allocated during the timed calls of each model, less what was
allocated before them (weights), and the absolute peak.

    python bench/gpu.py                                  # everything (about 5-8 minutes on an H100)
    python bench/gpu.py --models sd15 --modes eager      # a quick look
    python bench/gpu.py --smoke                          # the code path on CPU with tiny models (no figures)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

from unet import fill_random_  # bench/unet.py: random weights of sane scale

from nodegraph_diffusion.networks import unet

TOKENS = 77
BATCH = 2  # positive and negative prompt in one call, as the guider batches them
DEVICE = "cuda"  # --smoke: "cpu"
COMPILE_BACKEND = "inductor"  # --smoke: "eager" (dynamo's tracing without code generation)
MODELS = {
    "sd15": {"config": unet.SD1_CONFIG, "size": 512,
             "diffusers": {"cross_attention_dim": 768, "sample_size": 64}},
    "sdxl": {"config": unet.SDXL_CONFIG, "size": 1024,
             "diffusers": {"sample_size": 128, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D",
                                                                    "CrossAttnDownBlock2D"),
                           "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
                           "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
                           "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
                           "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}},
}
# Published diffusers figures for SD1.5 512x512 on an H100 (it/s): the goal is >= 1.0x eager, and
# compiled >= 1.2x diffusers eager.
REFERENCE_H100_SD15 = {"diffusers_eager_fp16": 54.5, "diffusers_compiled_fp16": 66.0}


def build_pair(name: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(ours, diffusers') with the same random weights on the GPU, storage shared."""
    from diffusers import UNet2DConditionModel

    spec = MODELS[name]
    with torch.device("meta"):
        reference = UNet2DConditionModel(**spec["diffusers"])
    reference = fill_random_(reference.to_empty(device=DEVICE), seed=0).to(dtype)
    with torch.device("meta"):
        ours = unet.UNet(spec["config"])
    ours.load_state_dict(unet.ldm_unet_keys_from_diffusers(reference.state_dict()), strict=True, assign=True)
    return ours.eval(), reference


def make_inputs(name: str, dtype: torch.dtype) -> dict:
    spec = MODELS[name]
    config: unet.UNetConfig = spec["config"]
    latent = spec["size"] // 8
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(BATCH, 4, latent, latent, generator=generator, device=DEVICE, dtype=dtype)
    t = torch.tensor([999.0, 999.0], device=DEVICE)
    context = torch.randn(BATCH, TOKENS, config.context_dim, generator=generator, device=DEVICE, dtype=dtype)
    inputs = {"x": x, "t": t, "context": context, "y": None, "added": None}
    if config.adm_in_channels is not None:
        # y: the pooled text embedding, then 256 dims for each of the six size values.
        pooled_dim = config.adm_in_channels - 6 * unet.SDXL_VECTOR_EMBED_DIM
        pooled = torch.randn(BATCH, pooled_dim, generator=generator, device=DEVICE, dtype=dtype)
        size = (spec["size"], spec["size"])
        inputs["y"] = unet.sdxl_vector_conditioning(pooled, size, (0, 0), target_size=size).to(dtype)
        time_ids = torch.tensor([[*size, 0, 0, *size]] * BATCH, device=DEVICE, dtype=dtype)
        inputs["added"] = {"text_embeds": pooled, "time_ids": time_ids}
    return inputs


def callers(ours: nn.Module, reference: nn.Module, inputs: dict) -> dict[str, Callable[[], torch.Tensor]]:
    x, t, context = inputs["x"], inputs["t"], inputs["context"]
    return {
        "nodegraph": lambda: ours(x, t, context, y=inputs["y"]),
        "diffusers": lambda: reference(x, t, encoder_hidden_states=context,
                                       added_cond_kwargs=inputs["added"]).sample,
    }


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(calls: dict[str, Callable[[], torch.Tensor]], iters: int, repeats: int, warmup: int) -> dict:
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, call in calls.items():
            for _ in range(warmup):
                call()
        synchronize()
        for name, call in calls.items():  # memory: one model at a time
            if DEVICE != "cuda":
                peaks[name] = {}
                continue
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            peaks[name] = {"peak_allocated_gib": round(peak / 2**30, 3),
                           "activations_peak_gib": round((peak - before) / 2**30, 3)}
        for _ in range(repeats):
            for name, call in calls.items():
                synchronize()
                start = time.perf_counter()
                for _ in range(iters):
                    call()
                synchronize()
                rounds[name].append((time.perf_counter() - start) / iters)
    return {name: {"it_per_s": round(1.0 / statistics.median(values), 2),
                   "best_it_per_s": round(1.0 / min(values), 2), **peaks[name]}
            for name, values in rounds.items()}


def run_model(name: str, modes: list[str], dtype: torch.dtype, args: argparse.Namespace) -> dict:
    ours, reference = build_pair(name, dtype)
    inputs = make_inputs(name, dtype)
    result: dict = {"size": MODELS[name]["size"], "batch": BATCH, "weights_gib": round(
        sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**30, 3)}
    with torch.inference_mode():
        eager = callers(ours, reference, inputs)
        outputs = {k: call().float() for k, call in eager.items()}
    result["max_abs_diff_vs_diffusers"] = (outputs["nodegraph"] - outputs["diffusers"]).abs().max().item()
    result["output_abs_max"] = outputs["diffusers"].abs().max().item()
    del outputs
    if "eager" in modes:
        result["eager"] = measure(eager, args.iters, args.repeats, args.warmup)
    if "compiled" in modes:
        options = {"backend": COMPILE_BACKEND}
        if COMPILE_BACKEND == "inductor" and args.compile_mode != "default":
            options["mode"] = args.compile_mode
        compiled_ours, compiled_reference = torch.compile(ours, **options), torch.compile(reference, **options)
        calls = callers(compiled_ours, compiled_reference, inputs)
        compile_seconds = {}
        with torch.inference_mode():
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                call()  # reduce-overhead records its CUDA graph on a later call
                synchronize()
                compile_seconds[key] = round(time.perf_counter() - start, 1)
        result["compiled"] = measure(calls, args.iters, args.repeats, args.warmup)
        result["compiled"]["compile_mode"] = args.compile_mode
        result["compiled"]["compile_seconds"] = compile_seconds
    for mode in ("eager", "compiled"):
        if mode in result:
            result[f"{mode}_ratio_nodegraph_over_diffusers_it_s"] = round(
                result[mode]["nodegraph"]["it_per_s"] / result[mode]["diffusers"]["it_per_s"], 3)
    if "eager" in result and "compiled" in result:
        result["compiled_nodegraph_over_eager_diffusers_it_s"] = round(
            result["compiled"]["nodegraph"]["it_per_s"] / result["eager"]["diffusers"]["it_per_s"], 3)
    del ours, reference
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def use_smoke_models() -> None:
    """Tiny SD1- and SDXL-layout models on the CPU (the test suite's configs): the code path, not a measurement."""
    global DEVICE, COMPILE_BACKEND
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "diffusion"))
    from _unet_fixtures import TINY_SD1, TINY_SDXL, _diffusers_common_kwargs

    DEVICE, COMPILE_BACKEND = "cpu", "eager"
    for name, config in (("sd15", TINY_SD1), ("sdxl", TINY_SDXL)):
        kwargs = _diffusers_common_kwargs(config)
        kwargs["up_block_types"] = tuple("CrossAttnUpBlock2D" if depth else "UpBlock2D"
                                         for depth in reversed(config.transformer_depth))
        MODELS[name] = {"config": config, "size": 64, "diffusers": kwargs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the code path only")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_models()
        args.iters, args.repeats, args.warmup = 1, 1, 1
    elif not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_unet", "skipped": True,
                          "reason": f"no CUDA device (torch {torch.__version__}, built for CUDA "
                                    f"{torch.version.cuda or 'none'})"}))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(modes) - {"eager", "compiled"})
    if unknown:
        parser.error(f"unknown models or modes: {', '.join(unknown)}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype] if DEVICE == "cuda" else torch.float32
    report: dict = {"benchmark": "gpu_unet", "smoke": args.smoke, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."), "iters": args.iters, "repeats": args.repeats,
                    "reference_h100_sd15_it_s": REFERENCE_H100_SD15, "models": {}}
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        properties = torch.cuda.get_device_properties(0)
        report.update(device=properties.name, device_memory_gib=round(properties.total_memory / 2**30, 1),
                      capability=list(torch.cuda.get_device_capability(0)))
    for name in models:
        report["models"][name] = run_model(name, modes, dtype, args)
        print(json.dumps({"progress": name, **report["models"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
