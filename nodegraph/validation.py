"""Whole-workflow validation: every error at once, each naming its node and input; nothing runs
on an invalid graph. A valid workflow compiles into the graph the executor runs."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
from pydantic import ValidationError

from .json_values import JsonProblem, JsonRefused, decode_json, json_problems
from .node import InputSpec, Node
from .registry import NodeRegistry
from .workflow import Link, UnsupportedVersion, Workflow, as_link, upgrade

MAX_NODES = 10_000
"""A workflow with more nodes is refused before its nodes are checked one by one (the editor's
largest graphs have hundreds; the engine's own benchmarks run thousands)."""

_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}
_CHOICE_ERRORS = {"literal_error", "enum"}


@dataclass(frozen=True)
class ValidationIssue:
    """One thing wrong with a workflow. `code` is stable and machine-readable."""

    code: str
    message: str
    node_id: str | None = None
    input: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "node_id": self.node_id,
                "input": self.input, "details": self.details}

    def __str__(self) -> str:
        where = ".".join(part for part in (self.node_id, self.input) if part)
        return f"{where + ': ' if where else ''}{self.message} [{self.code}]"


class WorkflowInvalid(Exception):
    """The workflow has one or more validation issues; nothing was run."""

    def __init__(self, issues: list[ValidationIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


@dataclass
class CompiledNode:
    """A validated node: its class, literal inputs (defaults filled in) and links."""

    id: str
    node_class: type[Node]
    literals: dict[str, Any]
    links: dict[str, Link]
    literal_json: str


@dataclass
class CompiledWorkflow:
    """A validated workflow, restricted to what the requested outputs need, in run order.

    `outside` holds the nodes of the whole document (needed or not) whose validity depended on
    more than the document: dynamic choices (the files in a folder), the node's own input checks,
    a fingerprint of what it reads. A plan is reused only while `outside_issues` finds nothing.
    `memo` is for what the executor derives once per plan (cache keys, the document as JSON).
    """

    workflow: Workflow
    nodes: dict[str, CompiledNode]
    outputs: list[str]
    order: list[str]
    outside: tuple[CompiledNode, ...] = ()
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def parse_document(data: str | bytes | dict[str, Any], source: str = "workflow") -> Workflow:
    """Parse JSON text (or an already-decoded dict), upgrade old versions, check the structure."""
    if isinstance(data, (str, bytes)):
        try:
            data = decode_json(data, source)
        except JsonRefused as error:
            raise WorkflowInvalid([ValidationIssue("invalid_json", str(error),
                                                   details={**error.details, "problem": error.code, "source": source})]) from None
    if not isinstance(data, dict):
        raise WorkflowInvalid([ValidationIssue("invalid_document", f"{source}: a workflow must be a JSON object")])
    try:
        data = upgrade(data)
    except UnsupportedVersion as error:
        raise WorkflowInvalid([ValidationIssue("unsupported_version", f"{source}: {error}")]) from None
    try:
        return Workflow.model_validate(data)
    except ValidationError as error:
        issues = []
        for detail in error.errors(include_url=False):
            loc = detail["loc"]
            node_id = str(loc[1]) if len(loc) > 1 and loc[0] == "nodes" else None
            path = "/".join(str(part) for part in loc)
            issues.append(ValidationIssue("invalid_document", f"{path}: {detail['msg']}", node_id=node_id,
                                          details={"path": path}))
        raise WorkflowInvalid(issues) from None


def _json_issue(problem: JsonProblem) -> ValidationIssue:
    """A value of the document that is not standard JSON, placed at its node and input when it has them."""
    path = problem.path
    node_id = str(path[1]) if len(path) > 1 and path[0] == "nodes" else None
    input_name = str(path[3]) if node_id is not None and len(path) > 3 and path[2] == "inputs" else None
    return ValidationIssue(problem.code, f"{problem.where}: {problem.message}", node_id, input_name,
                           {**problem.details, "path": problem.where})


def _raw_document(workflow: Workflow) -> dict[str, Any]:
    """The parts of a parsed workflow that hold arbitrary JSON values, as they are (no serialization,
    which a too-deep value would break)."""
    return {"nodes": {node_id: {"type": entry.type, "inputs": entry.inputs} for node_id, entry in workflow.nodes.items()},
            "ui": workflow.ui}


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _closest(name: str, candidates: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)


def _suggest(options: list[str]) -> str:
    return f"; did you mean {' or '.join(repr(o) for o in options)}?" if options else ""


def _check_literal(node_id: str, spec: InputSpec, value: Any) -> tuple[Any, ValidationIssue | None]:
    if spec.link_only:
        return None, ValidationIssue(
            "link_required", f"input {spec.name!r} takes a {spec.socket_type.name} link, not a literal value",
            node_id, spec.name, {"expected_type": spec.socket_type.name})
    try:
        checked = spec.validator.validate_python(value, strict=True)
    except ValidationError as error:
        detail = error.errors(include_url=False)[0]
        kind = detail["type"]
        if kind in _BOUND_ERRORS:
            code = "value_out_of_bounds"
        elif kind in _CHOICE_ERRORS:
            code = "value_not_in_choices"
        elif kind == "value_error":  # a validator of the input's own said no (a FormatText template, say)
            code = "invalid_value"
        else:
            code = "wrong_value_type"
        shown = _short_repr(value)
        # The value is echoed only when short: a client sending megabytes need not get them back.
        details: dict[str, Any] = {} if shown.endswith(" characters)") else {"value": value}
        details.update(spec.bounds)
        if spec.choices is not None:
            details["choices"] = list(spec.choices)
        return None, ValidationIssue(code, f"input {spec.name!r}: {detail['msg']} (got {shown})",
                                     node_id, spec.name, details)
    if spec.dynamic_choices is not None:
        choices = spec.dynamic_choices.values()
        if checked not in choices:
            hint = _suggest(_closest(str(checked), choices))
            explain = spec.dynamic_choices.explain_missing
            why = (explain(checked) if explain is not None
                   else f"{_short_repr(checked)} is not one of the {len(choices)} available choices")
            return None, ValidationIssue("value_not_in_choices", f"input {spec.name!r}: {why}{hint}",
                                         node_id, spec.name, {"value": value, "choices": choices[:50]})
    return checked, None


_JSON_SCALARS = (str, int, float, bool, type(None))
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _literal_json(node_class: type[Node], literals: dict[str, Any]) -> str:
    """Canonical JSON of a node's literal inputs: the part of its cache key users set."""
    specs = node_class.specs().inputs
    canonical = {name: value if isinstance(value, _JSON_SCALARS) else specs[name].validator.dump_python(value, mode="json")
                 for name, value in literals.items()}
    return _CANONICAL_JSON.encode(canonical)


def format_bytes(count: float) -> str:
    """A byte count for people: `1.5 GiB`."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def memory_refusal(node_class: type[Node], estimate: int, budget: int) -> str:
    """Why a node's estimated memory is refused; one wording for validation and the executor."""
    return (f"{node_class.type_name} would need about {format_bytes(estimate)}, more than the "
            f"{format_bytes(budget)} this device holds; make the inputs that size it smaller")


def _memory_issue(node_id: str, node_class: type[Node], literals: dict[str, Any], budget: int) -> ValidationIssue | None:
    estimate = node_class.estimated_bytes(literals)
    if estimate is None or estimate <= budget:
        return None
    return ValidationIssue("exceeds_memory", memory_refusal(node_class, estimate, budget), node_id, None,
                           {"estimated_bytes": estimate, "device_bytes": budget})


def _input_check_issues(node_id: str, node_class: type[Node], literals: dict[str, Any]) -> list[ValidationIssue]:
    """The node's own checks of its literal inputs (Node.validate_inputs) as validation issues."""
    try:
        problems = node_class.validate_inputs(literals)
    except Exception as error:  # a pack's check that breaks must not take validation down with it
        return [ValidationIssue("input_check_failed", f"{node_class.type_name} could not check its inputs: "
                                                      f"{type(error).__name__}: {error}", node_id)]
    return [ValidationIssue(problem.code, f"input {problem.input!r}: {problem.message}" if problem.input
                            else problem.message, node_id, problem.input, dict(problem.details))
            for problem in problems]


def overrides_hook(node_class: type[Node], name: str) -> bool:
    """Whether a node type overrides one of Node's class-method hooks (fingerprint, validate_inputs)."""
    return getattr(node_class, name).__func__ is not getattr(Node, name).__func__


def reads_outside(node_class: type[Node]) -> bool:
    """Whether a node type's validity or cache key depends on more than the document: it lists
    dynamic choices, checks its inputs itself (Node.validate_inputs) or fingerprints what it reads."""
    return (overrides_hook(node_class, "fingerprint") or overrides_hook(node_class, "validate_inputs")
            or any(spec.dynamic_choices is not None for spec in node_class.specs().inputs.values()))


def outside_issues(plan: CompiledWorkflow) -> list[ValidationIssue]:
    """The checks of a compiled plan that read outside the document, made again: dynamic choices
    (a file still in its folder) and nodes' own input checks. Empty while the plan still holds;
    any issue means the document must be validated again as a whole."""
    issues: list[ValidationIssue] = []
    for node in plan.outside:
        specs = node.node_class.specs().inputs
        before = len(issues)
        for name in plan.workflow.nodes[node.id].inputs:  # as compiling did: given values, not defaults
            choices = specs[name].dynamic_choices
            if choices is not None and name in node.literals and node.literals[name] not in choices.values():
                issues.append(ValidationIssue("value_not_in_choices", f"input {name!r}: "
                                              f"{_short_repr(node.literals[name])} is no longer among the choices",
                                              node.id, name))
        if len(issues) == before:
            issues.extend(_input_check_issues(node.id, node.node_class, node.literals))
    return issues


def compile_workflow(
    data: str | bytes | dict[str, Any] | Workflow,
    registry: NodeRegistry,
    outputs: list[str] | None = None,
    source: str = "workflow",
    max_nodes: int = MAX_NODES,
    memory_budget: int | None = None,
) -> CompiledWorkflow:
    """Validate everything, then select the nodes the outputs need and order them.

    `outputs` names the nodes whose results are wanted; by default every output node. Before
    the nodes, the document itself: at most `max_nodes` nodes, and only standard JSON values
    (finite numbers, Unicode text, at most 64 levels deep), so that whatever is accepted can be
    hashed, stored and sent back. With a `memory_budget` (bytes the device holds), a node whose
    declared estimate (Node.estimated_bytes) exceeds it is refused here, before anything is allocated.
    Raises WorkflowInvalid listing every issue found.
    """
    workflow = data if isinstance(data, Workflow) else parse_document(data, source)
    if len(workflow.nodes) > max_nodes:
        raise WorkflowInvalid([ValidationIssue(
            "too_many_nodes", f"the workflow has {len(workflow.nodes)} nodes; at most {max_nodes} are accepted",
            details={"nodes": len(workflow.nodes), "max_nodes": max_nodes})])
    problems = json_problems(_raw_document(workflow))
    if problems:  # checked before anything else reads the values: hashing or storing them would fail
        raise WorkflowInvalid([_json_issue(problem) for problem in problems])
    if outputs is not None:
        problems = json_problems(outputs)
        if problems:
            raise WorkflowInvalid([ValidationIssue(p.code, f"outputs/{p.where}: {p.message}") for p in problems])
    issues: list[ValidationIssue] = []
    compiled: dict[str, CompiledNode] = {}
    graph = nx.DiGraph()

    classes: dict[str, type[Node]] = {}
    for node_id, entry in workflow.nodes.items():
        graph.add_node(node_id)
        node_class = registry.get(entry.type)
        if node_class is None:
            options = registry.closest(entry.type)
            issues.append(ValidationIssue("unknown_node_type", f"unknown node type {entry.type!r}{_suggest(options)}",
                                          node_id, None, {"type": entry.type, "suggestions": options}))
        else:
            classes[node_id] = node_class

    for node_id, node_class in classes.items():
        entry = workflow.nodes[node_id]
        specs = node_class.specs().inputs
        issues_before = len(issues)
        for name in entry.inputs:
            if name not in specs:
                options = _closest(name, specs)
                issues.append(ValidationIssue("unknown_input", f"{entry.type} has no input {name!r}{_suggest(options)}",
                                              node_id, name, {"inputs": list(specs)}))
        literals: dict[str, Any] = {}
        links: dict[str, Link] = {}
        for name, spec in specs.items():
            if name not in entry.inputs:
                if spec.required:
                    issues.append(ValidationIssue(
                        "missing_input", f"required input {name!r} ({spec.socket_type.name}) is not connected or set",
                        node_id, name, {"expected_type": spec.socket_type.name}))
                else:
                    literals[name] = spec.default
                continue
            value = entry.inputs[name]
            link = as_link(value)
            if link is None:
                checked, issue = _check_literal(node_id, spec, value)
                if issue is not None:
                    issues.append(issue)
                else:
                    literals[name] = checked
                continue
            links[name] = link
            graph.add_edge(link.source, node_id)
            source_entry = workflow.nodes.get(link.source)
            if source_entry is None:
                issues.append(ValidationIssue(
                    "missing_node", f"input {name!r} links to node {link.source!r}, which is not in the workflow",
                    node_id, name, {"from": link.source}))
                continue
            source_class = classes.get(link.source)
            if source_class is None:
                continue  # already reported as an unknown type
            source_outputs = source_class.specs().outputs
            if link.output not in source_outputs:
                issues.append(ValidationIssue(
                    "missing_output",
                    f"input {name!r} links to output {link.output!r} of node {link.source!r} ({source_entry.type}), "
                    f"which has outputs {sorted(source_outputs)}",
                    node_id, name, {"from": link.source, "output": link.output, "outputs": sorted(source_outputs)}))
                continue
            source_type = source_outputs[link.output].socket_type.name
            if not registry.types.compatible(source_type, spec.socket_type.name):
                issues.append(ValidationIssue(
                    "type_mismatch",
                    f"input {name!r} expects {spec.socket_type.name} but {link.source}.{link.output} is {source_type}",
                    node_id, name, {"expected_type": spec.socket_type.name, "got_type": source_type}))
        if len(issues) == issues_before:
            issues.extend(_input_check_issues(node_id, node_class, literals))
        compiled[node_id] = CompiledNode(node_id, node_class, literals, links, "")
        if memory_budget is not None:
            issue = _memory_issue(node_id, node_class, literals, memory_budget)
            if issue is not None:
                issues.append(issue)

    try:
        topological = list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        topological = []
        for component in nx.strongly_connected_components(graph):
            if len(component) > 1 or graph.has_edge(next(iter(component)), next(iter(component))):
                members = sorted(component)
                issues.append(ValidationIssue("cycle", f"nodes {members} form a cycle", members[0], None,
                                              {"nodes": members}))

    if outputs is None:
        outputs = [node_id for node_id, cls in classes.items() if cls.output_node]
        if not outputs and not any(i.code == "unknown_node_type" for i in issues):
            issues.append(ValidationIssue("no_output_node", "the workflow has no output node (save, preview, ...), so nothing would run"))
    else:
        for node_id in outputs:
            if node_id not in workflow.nodes:
                issues.append(ValidationIssue("unknown_output_node", f"requested output {node_id!r} is not a node of the workflow",
                                              node_id))
    if issues:
        raise WorkflowInvalid(issues)

    needed = set(outputs)
    frontier = list(outputs)
    while frontier:
        for source in graph.predecessors(frontier.pop()):
            if source not in needed:
                needed.add(source)
                frontier.append(source)
    order = [node_id for node_id in topological if node_id in needed]
    for node_id in order:
        node = compiled[node_id]
        node.literal_json = _literal_json(node.node_class, node.literals)
    outside_classes = {cls for cls in classes.values() if reads_outside(cls)}
    outside = tuple(node for node in compiled.values() if node.node_class in outside_classes)
    return CompiledWorkflow(workflow, {n: compiled[n] for n in order}, list(outputs), order, outside)
