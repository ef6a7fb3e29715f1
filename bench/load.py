"""Peak memory of loading weight files, relative to the file size (prints JSON).

    .venv/bin/python bench/load.py [--scenario sd15|flux-fp8|all] [--keep DIR]

Each scenario writes a safetensors file with random weights to a temporary folder, then loads
it in fresh child processes and reports each child's peak resident set size (ru_maxrss) over its
baseline after imports.

``sd15``: a ~2 GB SD1.5-layout fp16 file (names and shapes from tests/diffusion/manifests/sd15.json.gz)
through load_checkpoint:

- ``cpu_fp16``: the file's own dtype; tensors stay views of the mapped file (the target:
  peak <= 1.3x the file size, also after every weight has been read once, which maps all pages).
- ``cpu_fp32``: the CPU default policy, converting to fp32 (the model itself is then 2x the file).

``flux-fp8``: a ~290 MB Flux-layout file (width 1024, 4 double + 8 single blocks, every tensor in
float8_e4m3fn as flux1-dev-fp8 files hold them), loaded as a loader does (Materializer ->
split_weight_scales -> instantiate -> compute_in) and run once (fp32 compute, 256 image + 64 text
tokens):

- ``fp8_kept``: ``keep_dtypes=FLOAT8_DTYPES``, compute_in upcasts one layer at a time (the target:
  the model holds 1.0x the file size; the forward adds a fixed overhead, activations plus the
  largest layer's fp32 copy, that a full-size model makes negligible next to its file).
- ``fp32_upcast``: the file converted to fp32 at load (the model is 4x the file).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent.parent / "tests" / "diffusion" / "manifests" / "sd15.json.gz"


def stream_safetensors(path: Path, specs: dict[str, tuple[str, list[int]]], fill) -> int:
    """Write a safetensors file tensor by tensor (never holding the whole model in memory).

    specs: name -> (safetensors dtype name, shape); fill(name, torch dtype, shape) makes each tensor.
    """
    import torch
    from nodegraph_diffusion.weights.safetensors_io import SAFETENSORS_DTYPES

    entries, offset = {}, 0
    for name, (dtype_name, shape) in specs.items():
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype_name].itemsize
        entries[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, entry in entries.items():
            tensor = fill(name, SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"])
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


def random_fill(seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)

    def fill(name: str, dtype, shape: list[int]):
        if dtype.is_floating_point:
            return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(dtype)
        return torch.arange(math.prod(shape), dtype=dtype).reshape(shape)

    return fill


def write_random_checkpoint(path: Path) -> int:
    manifest = json.loads(gzip.decompress(MANIFEST.read_bytes()))
    exceptions = manifest["dtype_exceptions"]
    specs = {name: (exceptions.get(name, manifest["dtype"]), shape) for name, shape in manifest["shapes"].items()}
    return stream_safetensors(path, specs, random_fill(0))


def flux_bench_config():
    from nodegraph_diffusion.networks.flux import FluxConfig

    return FluxConfig(hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8)


def write_flux_fp8(path: Path) -> int:
    import torch
    from nodegraph_diffusion.networks.flux import Flux

    with torch.device("meta"):
        shapes = {name: list(t.shape) for name, t in Flux(flux_bench_config()).state_dict().items()}
    return stream_safetensors(path, {name: ("F8_E4M3", shape) for name, shape in shapes.items()}, random_fill(0))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(path: str, dtype: str) -> None:
    import torch
    from nodegraph_diffusion.architectures.stable_diffusion import load_checkpoint

    torch.set_num_threads(2)
    baseline = current_rss_bytes()
    start = time.perf_counter()
    loaded = load_checkpoint(path, device="cpu", dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    after_load_peak = peak_rss_bytes()
    modules = [loaded.unet, loaded.vae, *loaded.text_encoders.values()]
    model_bytes = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    # Read every weight once, as a first forward pass would: mapped pages become resident.
    checksum = sum(float(t.float().sum()) for m in modules for t in m.state_dict().values())
    print(json.dumps({
        "baseline_rss_bytes": baseline,
        "load_seconds": round(seconds, 2),
        "peak_rss_after_load_bytes": after_load_peak,
        "peak_rss_after_reading_all_weights_bytes": peak_rss_bytes(),
        "model_bytes": model_bytes,
        "family": loaded.family.value,
        "checksum_finite": math.isfinite(checksum),
    }))


def flux_child(path: str, mode: str) -> None:
    import torch
    from nodegraph_diffusion.networks.flux import Flux, flux_config_from_shapes
    from nodegraph_diffusion.weights.loading import Materializer, instantiate
    from nodegraph_diffusion.weights.safetensors_io import SafetensorsFile
    from nodegraph_diffusion.weights.storage import (
        FLOAT8_DTYPES,
        compute_in,
        split_weight_scales,
        storage_bytes,
    )

    torch.set_num_threads(1)
    baseline = current_rss_bytes()
    start = time.perf_counter()
    keep = FLOAT8_DTYPES if mode == "fp8_kept" else ()
    materializer = Materializer(SafetensorsFile(path), torch.device("cpu"), torch.float32, keep_dtypes=keep)
    weights, scales = split_weight_scales(materializer.state_dict("", lambda key: False), path)
    config = flux_config_from_shapes({k: v.shape for k, v in weights.items()})
    model, _ = instantiate(lambda: Flux(config), weights, "Flux", path, strict=True)
    del weights
    compute_in(model, torch.float32, scales)
    load_seconds = time.perf_counter() - start
    after_load_peak = peak_rss_bytes()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, config.in_channels, 32, 32, generator=generator)  # 16x16 = 256 image tokens
    context = torch.randn(1, 64, config.context_dim, generator=generator)
    y = torch.randn(1, config.pooled_dim, generator=generator)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(x, torch.tensor([0.7]), context, y, torch.tensor([3.5]))
    forward_seconds = time.perf_counter() - start
    print(json.dumps({
        "baseline_rss_bytes": baseline,
        "load_seconds": round(load_seconds, 2),
        "forward_seconds": round(forward_seconds, 2),
        "peak_rss_after_load_bytes": after_load_peak,
        "peak_rss_after_forward_bytes": peak_rss_bytes(),
        "model_bytes": storage_bytes(model),
        "parameter_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "output_finite": bool(torch.isfinite(out).all()),
    }))


def child_result(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_child(path: Path, dtype: str, file_size: int) -> dict:
    result = child_result(["--child", str(path), dtype])
    base = result["baseline_rss_bytes"]
    result["load_peak_over_file"] = round((result["peak_rss_after_load_bytes"] - base) / file_size, 3)
    result["read_all_peak_over_file"] = round((result["peak_rss_after_reading_all_weights_bytes"] - base) / file_size, 3)
    result["read_all_peak_over_model"] = round(
        (result["peak_rss_after_reading_all_weights_bytes"] - base) / result["model_bytes"], 3
    )
    return result


def run_flux_child(path: Path, mode: str, file_size: int) -> dict:
    result = child_result(["--flux-child", str(path), mode])
    base = result["baseline_rss_bytes"]
    result["load_peak_over_file"] = round((result["peak_rss_after_load_bytes"] - base) / file_size, 3)
    result["forward_peak_over_file"] = round((result["peak_rss_after_forward_bytes"] - base) / file_size, 3)
    result["model_over_file"] = round(result["model_bytes"] / file_size, 3)
    # What the forward adds on top of the weights (activations, per-layer upcast copies, allocator
    # caches): a fixed amount for a given input, so its share falls as the model grows.
    result["forward_overhead_bytes"] = result["peak_rss_after_forward_bytes"] - base - result["model_bytes"]
    return result


def sd15_report(folder: Path, keep: bool) -> dict:
    path = folder / "sd15-random-fp16.safetensors"
    start = time.perf_counter()
    file_size = write_random_checkpoint(path)
    write_seconds = time.perf_counter() - start
    try:
        return {
            "file": "SD1.5 layout, fp16, random weights",
            "file_bytes": file_size,
            "write_seconds": round(write_seconds, 1),
            "target_load_peak_over_file": 1.3,
            "cpu_fp16": run_child(path, "float16", file_size),
            "cpu_fp32": run_child(path, "float32", file_size),
        }
    finally:
        if not keep:
            path.unlink()  # before the next scenario writes its file


def flux_fp8_report(folder: Path, keep: bool) -> dict:
    path = folder / "flux-random-fp8.safetensors"
    start = time.perf_counter()
    file_size = write_flux_fp8(path)
    write_seconds = time.perf_counter() - start
    try:
        return {
            "file": "Flux layout (width 1024, 4 double + 8 single blocks), every tensor float8_e4m3fn, random weights",
            "file_bytes": file_size,
            "write_seconds": round(write_seconds, 1),
            "target_model_over_file": 1.0,
            "fp8_kept": run_flux_child(path, "fp8_kept", file_size),
            "fp32_upcast": run_flux_child(path, "fp32_upcast", file_size),
        }
    finally:
        if not keep:
            path.unlink()  # before the next scenario writes its file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--flux-child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=("sd15", "flux-fp8", "all"), default="all")
    parser.add_argument("--keep", type=Path, help="write the files here and keep them")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.flux_child:
        flux_child(*args.flux_child)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="nodegraph-bench-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report = {}
        if args.scenario in ("sd15", "all"):
            report["sd15"] = sd15_report(folder, keep=args.keep is not None)
        if args.scenario in ("flux-fp8", "all"):
            report["flux_fp8"] = flux_fp8_report(folder, keep=args.keep is not None)
        print(json.dumps(report, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
