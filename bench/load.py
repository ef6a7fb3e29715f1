"""Peak memory of load_checkpoint on a full-size SD1.5-layout fp16 file, relative to the file size (prints JSON).

    /work/venv/bin/python bench/load.py [--keep DIR]

Writes a ~2 GB safetensors file with random fp16 weights in the SD1.5 layout (names and shapes
from tests/diffusion/manifests/sd15.json.gz) to a temporary folder, then loads it in fresh child
processes and reports each child's peak resident set size (ru_maxrss) over its baseline after
imports. Scenarios:

- ``cpu_fp16``: the file's own dtype; tensors stay views of the mapped file (the target:
  peak <= 1.3x the file size, also after every weight has been read once, which maps all pages).
- ``cpu_fp32``: the CPU default policy, converting to fp32 (the model itself is then 2x the file).
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
DTYPE_NAMES = {"F16": "float16", "I64": "int64", "F32": "float32"}


def write_random_checkpoint(path: Path) -> int:
    """Stream a safetensors file tensor by tensor (never holding the whole model in memory)."""
    import torch

    manifest = json.loads(gzip.decompress(MANIFEST.read_bytes()))
    exceptions = manifest["dtype_exceptions"]
    entries, offset = {}, 0
    for name, shape in manifest["shapes"].items():
        dtype = exceptions.get(name, manifest["dtype"])
        nbytes = math.prod(shape) * getattr(torch, DTYPE_NAMES[dtype]).itemsize
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, entry in entries.items():
            dtype = getattr(torch, DTYPE_NAMES[entry["dtype"]])
            if dtype.is_floating_point:
                tensor = torch.randn(entry["shape"], generator=generator, dtype=torch.float32).mul_(0.02).to(dtype)
            else:
                tensor = torch.arange(math.prod(entry["shape"]), dtype=dtype).reshape(entry["shape"])
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


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


def run_child(path: Path, dtype: str, file_size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), dtype], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    base = result["baseline_rss_bytes"]
    result["load_peak_over_file"] = round((result["peak_rss_after_load_bytes"] - base) / file_size, 3)
    result["read_all_peak_over_file"] = round((result["peak_rss_after_reading_all_weights_bytes"] - base) / file_size, 3)
    result["read_all_peak_over_model"] = round(
        (result["peak_rss_after_reading_all_weights_bytes"] - base) / result["model_bytes"], 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="write the file here and keep it")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="nodegraph-bench-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sd15-random-fp16.safetensors"
    try:
        start = time.perf_counter()
        file_size = write_random_checkpoint(path)
        write_seconds = time.perf_counter() - start
        report = {
            "file": "SD1.5 layout, fp16, random weights",
            "file_bytes": file_size,
            "write_seconds": round(write_seconds, 1),
            "target_load_peak_over_file": 1.3,
            "cpu_fp16": run_child(path, "float16", file_size),
            "cpu_fp32": run_child(path, "float32", file_size),
        }
        print(json.dumps(report, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
