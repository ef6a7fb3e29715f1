"""Run the ready workflows (workflows/*.json) through the engine exactly as `nodegraph run` does, and
hand back the decoded images — so the evaluation measures the product, not a separate loop."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.plugins import build_registry
from nodegraph_diffusion.nodes.folders import INPUTS_ENV

from .architecture import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / "workflows"
# The node whose output is the decoded image in every ready workflow.
DECODE_NODE = "decode"


class WorkflowRunError(RuntimeError):
    """A workflow run that did not succeed (names the workflow and the failing node)."""


class WorkflowRunner:
    """One engine (registry, executor, cross-run cache) for many runs of the ready workflows.

    Models load once and stay cached across runs, as in a long-running server. Control images are
    written to a private inputs folder that LoadImage reads (``NODEGRAPH_INPUTS``, set while the
    runner is open and restored by :meth:`close`).
    """

    def __init__(self, device: str = "auto") -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="nodegraph-eval-")
        self.inputs = Path(self._scratch.name) / "inputs"
        self.inputs.mkdir()
        self._previous_inputs = os.environ.get(INPUTS_ENV)
        os.environ[INPUTS_ENV] = str(self.inputs)
        registry, problems = build_registry()
        if problems:
            raise WorkflowRunError("; ".join(str(p) for p in problems))
        self.executor = Executor(registry, OutputCache(), device=device, output_dir=Path(self._scratch.name) / "out")
        self._documents: dict[str, dict[str, Any]] = {}

    def document(self, name: str) -> dict[str, Any]:
        if name not in self._documents:
            self._documents[name] = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
        return copy.deepcopy(self._documents[name])

    def add_input(self, name: str, image: np.ndarray) -> str:
        """Write an (H, W) or (H, W, 3) uint8 image where LoadImage finds it; returns its name."""
        Image.fromarray(image).save(self.inputs / name)
        return name

    def image(self, workflow: str, overrides: dict[str, dict[str, Any]]) -> np.ndarray:
        """Run `workflow` with `{node: {input: value}}` overrides -> the decoded image (H, W, 3) uint8."""
        document = self.document(workflow)
        for node, values in overrides.items():
            document["nodes"][node]["inputs"].update(values)
        result = self.executor.run(document, outputs=[DECODE_NODE])
        if result.status != "succeeded":
            raise WorkflowRunError(f"{workflow}: {result.error or result.status}")
        image = result.results[DECODE_NODE].outputs.image[0]
        return (image.numpy() * 255.0).round().astype(np.uint8)

    def close(self) -> None:
        if self._previous_inputs is None:
            os.environ.pop(INPUTS_ENV, None)
        else:
            os.environ[INPUTS_ENV] = self._previous_inputs
        self._scratch.cleanup()

    def __enter__(self) -> WorkflowRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
