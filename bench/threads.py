"""CPU thread policy: the default job (workflows/txt2img.json on the embedded model, what `make run`
does) at 1, 2 and auto threads, on the machine as it is ("idle": nothing added) and beside a
competing CPU-bound process, side by side in one process. Prints JSON.

Every job runs from a fresh executor (the checkpoint loads, both prompts encode, 20 steps sample,
the VAE decodes, the PNG is written); configurations alternate in rotating order within each
repeat, so slow drifts in the machine's load fall on all of them. Each figure carries the 1-minute
load average and the runnable count seen when it was taken: on a shared machine "idle" is not idle.
For "1" and "2" torch runs with that many threads throughout (NODEGRAPH_THREADS pins the pack's
networks too); "auto" starts from torch's default count and lets the policy choose.

    python bench/threads.py [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.weights.devices import THREADS_ENV

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("1", "2", "auto")


class ChosenThreads(logging.Handler):
    """Collects the thread counts the policy logs ("CPU threads: N (...)")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.choices: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("CPU threads:"):
            count, work, usable, busy = record.args  # type: ignore[misc]
            self.choices.append({"threads": count, "work": work, "busy_elsewhere": round(busy, 2)})


def machine_state() -> dict:
    with open("/proc/loadavg") as f:
        fields = f.read().split()
    return {"load_1m": float(fields[0]), "runnable": int(fields[3].split("/")[0])}


def run_job(registry, document: dict, config: str, default_threads: int, chosen: ChosenThreads) -> dict:
    if config == "auto":
        os.environ.pop(THREADS_ENV, None)
        torch.set_num_threads(default_threads)
    else:
        os.environ[THREADS_ENV] = config
        torch.set_num_threads(int(config))
    chosen.choices.clear()
    before = machine_state()
    executor = Executor(registry, device="cpu", output_dir=tempfile.mkdtemp(prefix="bench-threads-"))
    started = time.perf_counter()
    result = executor.run(document)
    seconds = time.perf_counter() - started
    assert result.status == "succeeded", result.error
    figure = {"config": config, "seconds": round(seconds, 3),
              "sampler_seconds": round(result.results["sampler"].seconds, 3),
              "nodes": {node: round(r.seconds, 3) for node, r in result.results.items()},
              "load_1m": before["load_1m"], "runnable_at_start": before["runnable"]}
    if config == "auto":
        figure["chosen"] = sorted({c["threads"] for c in chosen.choices})
        figure["busy_elsewhere_seen"] = [c["busy_elsewhere"] for c in chosen.choices]
    return figure


def start_competitor() -> subprocess.Popen:
    """One CPU-bound process that never sleeps; returns once it runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "print('up', flush=True)\nwhile True: pass"],
                               stdout=subprocess.PIPE, text=True)
    assert spinner.stdout is not None and spinner.stdout.readline() == "up\n"
    return spinner


def summarise(figures: list[dict]) -> dict:
    by_config = {}
    for config in CONFIGS:
        mine = [f for f in figures if f["config"] == config]
        by_config[config] = {"median_seconds": round(statistics.median(f["seconds"] for f in mine), 3),
                             "min_seconds": round(min(f["seconds"] for f in mine), 3),
                             "median_sampler_seconds": round(statistics.median(f["sampler_seconds"] for f in mine), 3)}
    best = min(CONFIGS, key=lambda c: by_config[c]["median_seconds"])
    best_sampler = min(CONFIGS, key=lambda c: by_config[c]["median_sampler_seconds"])
    auto = by_config["auto"]
    return {
        "by_config": by_config,
        "best": best,
        "auto_to_best": round(auto["median_seconds"] / by_config[best]["median_seconds"], 3),
        "auto_within_10_percent": auto["median_seconds"] <= 1.1 * by_config[best]["median_seconds"],
        "auto_sampler_to_best_sampler": round(
            auto["median_sampler_seconds"] / by_config[best_sampler]["median_sampler_seconds"], 3),
        "load_1m_range": [min(f["load_1m"] for f in figures), max(f["load_1m"] for f in figures)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the workflow's 20)")
    args = parser.parse_args()

    os.environ.setdefault("NODEGRAPH_MODELS", str(ROOT / "models"))
    default_threads = torch.get_num_threads()
    chosen = ChosenThreads()
    policy_log = logging.getLogger("nodegraph_diffusion.weights.devices")
    policy_log.setLevel(logging.INFO)
    policy_log.addHandler(chosen)
    registry, problems = build_registry([])
    assert not problems, problems
    document = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    if args.steps:
        document["nodes"]["sampler"]["inputs"]["steps"] = args.steps
    run_job(registry, document, "1", default_threads, chosen)  # warm-up: imports, first-use kernels, file cache

    report: dict = {"cpus": os.cpu_count(), "torch_default_threads": default_threads,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats,
                    "steps": document["nodes"]["sampler"]["inputs"]["steps"], "conditions": {}}
    for condition in ("idle", "competing"):
        spinner = start_competitor() if condition == "competing" else None
        figures = []
        try:
            for repeat in range(args.repeats):
                order = CONFIGS[repeat % 3:] + CONFIGS[:repeat % 3]
                for config in order:
                    figures.append(run_job(registry, document, config, default_threads, chosen))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        report["conditions"][condition] = {"summary": summarise(figures), "figures": figures}
    torch.set_num_threads(default_threads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
