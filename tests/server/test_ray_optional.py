"""Ray is an optional extra: the default backend neither needs nor imports it, and asking for the
Ray backend without it is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

from nodegraph.cli import EXIT_INVALID, main

# Run in a fresh interpreter where `import ray` fails, as when Ray is not installed.
WITHOUT_RAY = "import sys\nsys.modules['ray'] = None\n"

DEFAULT_BACKEND_RUN = WITHOUT_RAY + r"""
import json, threading
from pathlib import Path
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph.server import RunQueue, RunStore

folder = Path(sys.argv[1])
registry, _ = build_registry([])
queue = RunQueue(Executor(registry, device="cpu", output_dir=folder / "outputs"), RunStore(folder / "runs.sqlite"))
ended = threading.Event()
queue.subscribe(lambda event: event.type in ("run_finished", "run_failed") and ended.set())
queue.start()
run_id = queue.submit({"version": 1, "nodes": {
    "n": {"type": "Integer", "inputs": {"value": 20}},
    "text": {"type": "FormatText", "inputs": {"template": "{a}", "a": {"from": "n", "output": "value"}}},
    "save": {"type": "SaveText", "inputs": {"text": {"from": "text", "output": "text"}}}}})
ended.wait(120)
run = queue.get(run_id)
queue.stop()
print(json.dumps({"status": run["status"], "worker": run["worker"], "files": run["files"],
                  "ray_imported": any(name == "ray" or name.startswith("ray.") for name, module in sys.modules.items()
                                      if module is not None)}))
"""


def test_the_default_backend_runs_without_ray(tmp_path):
    done = subprocess.run([sys.executable, "-c", DEFAULT_BACKEND_RUN, str(tmp_path)], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["worker"] == "local" and not result["ray_imported"]
    assert open(result["files"][0]).read() == "20\n"


def test_asking_for_the_ray_backend_without_ray_says_how_to_install_it(tmp_path):
    code = WITHOUT_RAY + "from nodegraph.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", code, "serve", "--backend", "ray", "--db", str(tmp_path / "runs.sqlite"),
                           "--nodes-dir", str(tmp_path / "no-packs")], capture_output=True, text=True)
    assert done.returncode == EXIT_INVALID
    assert "--backend ray needs Ray" in done.stderr and "pip install 'nodegraph[ray]'" in done.stderr


def test_ray_options_need_the_ray_backend(tmp_path, capsys):
    assert main(["serve", "--ray-address", "auto", "--ray-workers-per-node", "2", "--db", str(tmp_path / "runs.sqlite"),
                 "--nodes-dir", str(tmp_path / "no-packs")]) == EXIT_INVALID
    assert "--ray-address, --ray-workers-per-node: only with --backend ray" in capsys.readouterr().err
