"""The executor: runs a validated workflow demand-first, reusing cached outputs across runs."""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from . import events as ev
from .cache import CacheEntry, OutputCache
from .events import Event, EventSink
from .node import CancelToken, Node, NodeInputs, NodeOutputs, RunCancelled, RunContext
from .registry import NodeRegistry
from .device_memory import device_memory_bytes
from .validation import MAX_NODES, CompiledWorkflow, compile_workflow, memory_refusal
from .workflow import Workflow

log = logging.getLogger(__name__)


class NodeFailure(Exception):
    """A node raised while running; names the node, its type and the original exception."""

    def __init__(self, node_id: str, node_type: str, error: BaseException, traceback_text: str) -> None:
        super().__init__(f"node {node_id!r} ({node_type}) failed: {type(error).__name__}: {error}")
        self.node_id = node_id
        self.node_type = node_type
        self.error = error
        self.traceback = traceback_text

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "node_type": self.node_type, "exception": type(self.error).__name__,
                "message": str(self.error), "traceback": self.traceback}


class NodeInputError(ValueError):
    """A value that arrived by link does not satisfy the input's declaration."""


class NodeMemoryError(MemoryError):
    """A node's inputs ask for more memory than the device holds; refused before it ran."""


@dataclass
class NodeResult:
    node_id: str
    status: Literal["executed", "cached"]
    outputs: NodeOutputs
    files: tuple[str, ...]
    seconds: float


@dataclass
class RunResult:
    run_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    outputs: list[str]
    results: dict[str, NodeResult] = field(default_factory=dict)
    error: NodeFailure | None = None
    seconds: float = 0.0

    @property
    def executed(self) -> list[str]:
        return [n for n, r in self.results.items() if r.status == "executed"]

    @property
    def cached(self) -> list[str]:
        return [n for n, r in self.results.items() if r.status == "cached"]

    @property
    def files(self) -> list[str]:
        return [f for node_id in self.outputs if node_id in self.results for f in self.results[node_id].files]


def _overrides_fingerprint(node_class: type[Node]) -> bool:
    return node_class.fingerprint.__func__ is not Node.fingerprint.__func__


_UNSET: Any = object()


class Executor:
    """Runs workflows with one registry and one cross-run cache. One run at a time.

    `memory_budget` is the bytes the device holds, which nodes' memory estimates are checked
    against (by default the device's total memory; None checks nothing); `max_nodes` the largest
    workflow accepted.
    """

    def __init__(self, registry: NodeRegistry, cache: OutputCache | None = None, device: str = "auto",
                 output_dir: Path | str = Path("outputs"), memory_budget: int | None = _UNSET,
                 max_nodes: int = MAX_NODES) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()
        self.device = device
        self.output_dir = Path(output_dir)
        self._memory_budget = memory_budget
        self.max_nodes = max_nodes

    @property
    def memory_budget(self) -> int | None:
        if self._memory_budget is _UNSET:  # asked once, when first needed: packs may import torch first
            self._memory_budget = device_memory_bytes(self.device)
        return self._memory_budget

    def compile(self, workflow: str | bytes | dict[str, Any] | Workflow, outputs: list[str] | None = None) -> CompiledWorkflow:
        return compile_workflow(workflow, self.registry, outputs, max_nodes=self.max_nodes,
                                memory_budget=self.memory_budget)

    def cache_keys(self, plan: CompiledWorkflow, run_id: str) -> dict[str, str]:
        """Content keys: hash of node type, version, literal inputs, fingerprint and upstream keys."""
        keys: dict[str, str] = {}
        output_dir = str(self.output_dir.resolve())
        for node_id in plan.order:
            node = plan.nodes[node_id]
            cls = node.node_class
            # Fields are joined with control characters, which canonical JSON escapes.
            parts = [cls.type_name, str(cls.version), node.literal_json]
            parts.extend(f"{name}\x1e{keys[link.source]}\x1e{link.output}" for name, link in sorted(node.links.items()))
            if cls.cache == "never":
                parts.append(f"never\x1e{run_id}")
            if _overrides_fingerprint(cls):
                parts.append(f"fingerprint\x1e{cls.fingerprint(node.literals)}")
            if cls.output_node:
                parts.append(f"output_dir\x1e{output_dir}")
            keys[node_id] = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
        return keys

    def run(
        self,
        workflow: str | bytes | dict[str, Any] | Workflow | CompiledWorkflow,
        outputs: list[str] | None = None,
        on_event: EventSink | None = None,
        cancel: CancelToken | None = None,
        run_id: str | None = None,
    ) -> RunResult:
        """Run a workflow (validating it first unless already compiled).

        Raises WorkflowInvalid before anything runs; node failures and cancellation are
        reported in the result and the events, not raised.
        """
        plan = workflow if isinstance(workflow, CompiledWorkflow) else self.compile(workflow, outputs)
        run_id = run_id or uuid.uuid4().hex
        cancel = cancel or CancelToken()
        emit = on_event or (lambda event: None)
        started = time.perf_counter()
        result = RunResult(run_id, "succeeded", plan.outputs)

        keys = self.cache_keys(plan, run_id)
        hits: dict[str, CacheEntry] = {}
        needed = set(plan.outputs)
        for node_id in reversed(plan.order):
            if node_id not in needed:
                continue
            entry = self.cache.get(keys[node_id])
            if entry is not None:
                hits[node_id] = entry
            else:
                needed.update(link.source for link in plan.nodes[node_id].links.values())

        emit(Event(ev.RUN_STARTED, run_id, data={"nodes": [n for n in plan.order if n in needed],
                                                 "outputs": plan.outputs}))
        values: dict[str, NodeOutputs] = {}
        document = plan.workflow.to_json()
        try:
            for node_id in plan.order:
                if node_id not in needed:
                    continue
                if cancel.cancelled:
                    raise RunCancelled()
                entry = hits.get(node_id)
                if entry is not None:
                    values[node_id] = entry.outputs
                    result.results[node_id] = NodeResult(node_id, "cached", entry.outputs, entry.files, 0.0)
                    emit(Event(ev.NODE_CACHED, run_id, node_id, {"files": list(entry.files)}))
                    continue
                node_result = self._run_node(plan, node_id, keys[node_id], values, emit, cancel, run_id, document)
                values[node_id] = node_result.outputs
                result.results[node_id] = node_result
        except RunCancelled:
            result.status = "cancelled"
            result.seconds = time.perf_counter() - started
            emit(Event(ev.RUN_CANCELLED, run_id, data={"seconds": result.seconds}))
            return result
        except NodeFailure as failure:
            result.status = "failed"
            result.error = failure
            result.seconds = time.perf_counter() - started
            emit(Event(ev.NODE_FAILED, run_id, failure.node_id, failure.to_json()))
            emit(Event(ev.RUN_FAILED, run_id, failure.node_id, {"error": failure.to_json(), "seconds": result.seconds}))
            return result
        result.seconds = time.perf_counter() - started
        emit(Event(ev.RUN_FINISHED, run_id, data={"seconds": result.seconds, "files": result.files,
                                                  "executed": len(result.executed), "cached": len(result.cached)}))
        return result

    def _check_memory(self, cls: type[Node], inputs: NodeInputs) -> None:
        """Validation saw only literal inputs; with the linked ones known, check the estimate again."""
        budget = self.memory_budget
        if budget is None:
            return
        estimate = cls.estimated_bytes({name: getattr(inputs, name) for name in type(inputs).model_fields})
        if estimate is not None and estimate > budget:
            raise NodeMemoryError(memory_refusal(cls, estimate, budget))

    def _run_node(self, plan: CompiledWorkflow, node_id: str, key: str, values: dict[str, NodeOutputs],
                  emit: EventSink, cancel: CancelToken, run_id: str, document: dict[str, Any]) -> NodeResult:
        node = plan.nodes[node_id]
        cls = node.node_class
        emit(Event(ev.NODE_STARTED, run_id, node_id, {"node_type": cls.type_name}))
        started = time.perf_counter()

        def report(kind: str, data: dict[str, Any]) -> None:
            emit(Event(ev.NODE_PROGRESS if kind == "progress" else ev.NODE_PREVIEW, run_id, node_id, data))

        ctx = RunContext(node_id, self.device, self.output_dir, logging.getLogger(f"nodegraph.node.{cls.type_name}"),
                         cancel, report, run_id=run_id, workflow=document)
        try:
            raw = dict(node.literals)
            for name, link in node.links.items():
                raw[name] = getattr(values[link.source], link.output)
            try:
                inputs = cls.Inputs.model_validate(raw)
            except ValidationError as error:
                detail = error.errors(include_url=False)[0]
                name = ".".join(str(p) for p in detail["loc"])
                raise NodeInputError(f"input {name!r}: {detail['msg']}") from None
            self._check_memory(cls, inputs)
            outputs = cls().run(inputs, ctx)
            if not isinstance(outputs, cls.Outputs):
                raise TypeError(f"run() returned {type(outputs).__name__}, expected {cls.__name__}.Outputs")
        except RunCancelled:
            raise
        except Exception as error:  # any node error fails the run, with the node named
            raise NodeFailure(node_id, cls.type_name, error, traceback.format_exc()) from error
        seconds = time.perf_counter() - started
        files = tuple(ctx.files)
        self.cache.put(key, CacheEntry.of(outputs, files))
        emit(Event(ev.NODE_FINISHED, run_id, node_id, {"seconds": seconds, "files": list(files)}))
        return NodeResult(node_id, "executed", outputs, files, seconds)
