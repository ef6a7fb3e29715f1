"""The executor: runs a validated workflow demand-first, reusing cached outputs across runs."""

from __future__ import annotations

import hashlib
import logging
import marshal
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import ValidationError

from . import events as ev
from .cache import CacheEntry, OutputCache
from .events import Event, EventSink
from .node import CancelToken, Node, NodeInputs, NodeOutputs, RunCancelled, RunContext
from .registry import NodeRegistry
from .device_memory import device_memory_bytes
from .validation import (MAX_NODES, CompiledNode, CompiledWorkflow, compile_workflow, memory_refusal, outside_issues,
                         overrides_hook)
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


@dataclass(slots=True)
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


PLAN_CACHE_SIZE = 16
"""Compiled plans an executor keeps, so that running an identical document again skips validation."""


def _document_identity(workflow: str | bytes | dict[str, Any] | Workflow) -> tuple[bytes, Callable[[], Any]] | None:
    """(digest of the document's exact content, a maker of a private copy of it to compile), or
    None when the document has no cheap exact form (a dict holding values of other types): then it
    is compiled every time. The copy keeps a kept plan safe from later changes to the caller's objects."""
    if isinstance(workflow, str):
        content = b"s" + workflow.encode("utf-8", "surrogatepass")
        return hashlib.sha256(content).digest(), lambda: workflow
    if isinstance(workflow, (bytes, bytearray)):
        content = b"b" + bytes(workflow)
        return hashlib.sha256(content).digest(), lambda: content[1:]
    data = workflow.model_dump() if isinstance(workflow, Workflow) else workflow
    try:
        # marshal writes exact built-in types (a tuple is not a list, 1 is neither 1.0 nor True)
        # and refuses any other; version 2 has no back-references, so equal values give equal bytes.
        content = b"d" + marshal.dumps(data, 2)
    except ValueError:
        return None
    return hashlib.sha256(content).digest(), lambda: marshal.loads(content[1:])


@dataclass
class _CachedPlan:
    plan: CompiledWorkflow
    registry: NodeRegistry
    generation: int
    fingerprints: dict[str, str | None]


def _fingerprints(nodes: tuple[CompiledNode, ...]) -> dict[str, str | None]:
    return {node.id: node.node_class.fingerprint(node.literals) for node in nodes
            if overrides_hook(node.node_class, "fingerprint")}


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
        self._plans: OrderedDict[tuple[Any, ...], _CachedPlan] = OrderedDict()
        self._plans_lock = threading.Lock()  # the server compiles submissions while a run executes

    @property
    def memory_budget(self) -> int | None:
        if self._memory_budget is _UNSET:  # asked once, when first needed: packs may import torch first
            self._memory_budget = device_memory_bytes(self.device)
        return self._memory_budget

    def compile(self, workflow: str | bytes | dict[str, Any] | Workflow, outputs: list[str] | None = None) -> CompiledWorkflow:
        """Validate a document into a plan (raises WorkflowInvalid).

        The plan of an identical document (same content, outputs, node packs and memory budget)
        is reused while what its validation read outside the document still holds: the same
        fingerprints, files still among their choices, nodes' own input checks still passing.
        """
        identity = _document_identity(workflow)
        outputs_key = None
        if identity is not None and outputs is not None:
            try:
                outputs_key = marshal.dumps(outputs, 2)
            except ValueError:
                identity = None
        if identity is None:
            return compile_workflow(workflow, self.registry, outputs, max_nodes=self.max_nodes,
                                    memory_budget=self.memory_budget)
        digest, private_copy = identity
        key = (digest, outputs_key, self.max_nodes, self.memory_budget)
        with self._plans_lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
        if cached is not None and self._still_valid(cached):
            return cached.plan
        generation = self.registry.generation
        plan = compile_workflow(private_copy(), self.registry, None if outputs is None else list(outputs),
                                max_nodes=self.max_nodes, memory_budget=self.memory_budget)
        try:
            fingerprints = _fingerprints(plan.outside)
        except Exception as error:  # reported when the run computes cache keys; here it only rules out reuse
            log.debug("plan not kept: a fingerprint failed (%s: %s)", type(error).__name__, error)
            return plan
        with self._plans_lock:
            self._plans[key] = _CachedPlan(plan, self.registry, generation, fingerprints)
            self._plans.move_to_end(key)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def _still_valid(self, cached: _CachedPlan) -> bool:
        """Whether a cached plan may be reused: the same node packs, and nothing it read outside the
        document has changed."""
        if cached.registry is not self.registry or cached.generation != self.registry.generation:
            return False
        try:
            if _fingerprints(cached.plan.outside) != cached.fingerprints:
                return False
        except Exception as error:  # compiling afresh, then running, reports it
            log.debug("plan not reused: a fingerprint failed (%s: %s)", type(error).__name__, error)
            return False
        return not outside_issues(cached.plan)

    def cache_keys(self, plan: CompiledWorkflow, run_id: str) -> dict[str, str]:
        """Content keys: hash of node type, version, literal inputs, fingerprint and upstream keys.

        A plan without never-cached nodes has the same keys for the same output folder and
        fingerprints, so they are kept with the plan and computed again only when those change.
        """
        output_dir = str(self.output_dir.resolve())
        shape = plan.memo.get("key_shape")
        if shape is None:
            shape = (tuple(n for n in plan.order if overrides_hook(plan.nodes[n].node_class, "fingerprint")),
                     any(plan.nodes[n].node_class.cache == "never" for n in plan.order))
            plan.memo["key_shape"] = shape
        fingerprinted, has_never = shape
        fingerprints = {n: plan.nodes[n].node_class.fingerprint(plan.nodes[n].literals) for n in fingerprinted}
        memo_key = (output_dir, tuple(fingerprints.values()))
        if not has_never:
            memo = plan.memo.get("keys")
            if memo is not None and memo[0] == memo_key:
                return dict(memo[1])
        keys = self._compute_keys(plan, run_id, output_dir, fingerprints)
        if not has_never:
            plan.memo["keys"] = (memo_key, keys)
            return dict(keys)
        return keys

    def _compute_keys(self, plan: CompiledWorkflow, run_id: str, output_dir: str,
                      fingerprints: dict[str, str | None]) -> dict[str, str]:
        keys: dict[str, str] = {}
        for node_id in plan.order:
            node = plan.nodes[node_id]
            cls = node.node_class
            # Fields are joined with control characters, which canonical JSON escapes.
            parts = [cls.type_name, str(cls.version), node.literal_json]
            parts.extend(f"{name}\x1e{keys[link.source]}\x1e{link.output}" for name, link in sorted(node.links.items()))
            if cls.cache == "never":
                parts.append(f"never\x1e{run_id}")
            if node_id in fingerprints:
                parts.append(f"fingerprint\x1e{fingerprints[node_id]}")
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
        result = RunResult(run_id, "succeeded", list(plan.outputs))

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

        to_run = [n for n in plan.order if n in needed]
        emit(Event(ev.RUN_STARTED, run_id, data={"nodes": to_run, "outputs": plan.outputs}))
        values: dict[str, NodeOutputs] = {}
        document = plan.memo.get("document")
        if document is None:  # the same for every run of the plan; nodes only read it
            document = plan.memo["document"] = plan.workflow.to_json()
        try:
            for node_id in to_run:
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
        if budget is None or not overrides_hook(cls, "estimated_bytes"):
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
