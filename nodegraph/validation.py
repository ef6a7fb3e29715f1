"""Whole-workflow validation: every error at once, each naming its node and input; nothing runs
on an invalid graph. A valid workflow compiles into the graph the executor runs."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import networkx as nx
from pydantic import ValidationError

from .json_values import JsonProblem, JsonRefused, decode_json, json_problems
from .node import InputSpec, Node
from .registry import NodeRegistry
from .workflow import BYPASS, MUTE, NODE_MODES, Link, NodeEntry, UnsupportedVersion, Workflow, as_link, upgrade

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
            if len(loc) == 3 and loc[0] == "nodes" and loc[2] == "mode":
                value = detail.get("input")
                issues.append(ValidationIssue(
                    "invalid_mode", f"node {node_id!r}: 'mode' is {_short_repr(value)}; it must be "
                                    f"{' or '.join(map(repr, NODE_MODES))}, or left out for a node that runs",
                    node_id=node_id, details={"path": path, "field": "mode", "value": value,
                                              "choices": list(NODE_MODES)}))
                continue
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


@dataclass(frozen=True)
class PassThrough:
    """Where a link to a bypassed node's output really comes from.

    `source` is the link to the node that runs and feeds it (None when nothing does); `via` the
    bypassed nodes crossed, nearest first. When nothing feeds it, `unfed` says why as (code,
    message, details) of an issue for the consumer, or is None when the reason is already reported
    on a bypassed node itself (its link to a missing node or output, or its unknown type).
    """

    source: Link | None
    via: tuple[str, ...] = ()
    unfed: tuple[str, str, dict[str, Any]] | None = None


def bypass_feed(entry: NodeEntry, node_class: type[Node], output: str) -> str | None:
    """The input that feeds output `output` of a bypassed node: its first input, in the order the
    node declares them, that has the output's socket type and is linked; None if none is (or the
    node has no such output)."""
    spec = node_class.specs().outputs.get(output)
    if spec is None:
        return None
    wanted = spec.socket_type.name
    return next((name for name, input_spec in node_class.specs().inputs.items()
                 if input_spec.socket_type.name == wanted and as_link(entry.inputs.get(name)) is not None), None)


def pass_through(workflow: Workflow, classes: Mapping[str, type[Node]], link: Link) -> PassThrough:
    """Follow `link` back through bypassed nodes to the output that feeds it.

    A bypassed node hands each of its outputs the value of its first input (in the order the node
    declares them) that has the output's type and is linked; that input's link is followed in turn.
    `classes` maps node ids to their node classes (ids of unknown types are absent). A link whose
    source is not bypassed comes back as it is.
    """
    via: list[str] = []
    while True:
        entry = workflow.nodes.get(link.source)
        if entry is None:
            return PassThrough(None, tuple(via))
        if entry.mode == MUTE and via:
            return PassThrough(None, tuple(via), (
                "muted_source", f"{_passed(via)} is fed by node {link.source!r} ({entry.type}), which is muted",
                {"from": link.source, "muted": link.source, "via": list(via)}))
        if entry.mode != BYPASS:
            return PassThrough(link, tuple(via))
        if link.source in via:
            return PassThrough(None, tuple(via), (
                "cycle", f"bypassed nodes {via[via.index(link.source):]} feed each other in a loop",
                {"nodes": via[via.index(link.source):], "via": list(via)}))
        via.append(link.source)
        node_class = classes.get(link.source)
        output = node_class.specs().outputs.get(link.output) if node_class is not None else None
        if node_class is None or output is None:
            return PassThrough(None, tuple(via))
        feed = bypass_feed(entry, node_class, link.output)
        if feed is None:
            wanted = output.socket_type.name
            return PassThrough(None, tuple(via), (
                "bypass_unfed", f"node {link.source!r} ({entry.type}) is bypassed and has no linked input of type "
                                f"{wanted} to pass to its output {link.output!r}; link one, or stop bypassing it",
                {"from": link.source, "output": link.output, "type": wanted, "via": list(via)}))
        link = as_link(entry.inputs[feed])


def _passed(via: list[str]) -> str:
    return f"bypassed node {via[0]!r}" if len(via) == 1 else f"the chain of bypassed nodes {via}"


def _check_link(workflow: Workflow, classes: Mapping[str, type[Node]], node_id: str,
                spec: InputSpec, link: Link) -> tuple[str | None, ValidationIssue | None]:
    """Check that a link names a node and one of its outputs: (the output's type, None), or (None,
    the issue), or (None, None) when the source's type is unknown (reported on the source)."""
    name = spec.name
    source_entry = workflow.nodes.get(link.source)
    if source_entry is None:
        return None, ValidationIssue("missing_node", f"input {name!r} links to node {link.source!r}, which is not in "
                                                     "the workflow", node_id, name, {"from": link.source})
    source_class = classes.get(link.source)
    if source_class is None:
        return None, None  # already reported as an unknown type
    source_outputs = source_class.specs().outputs
    if link.output not in source_outputs:
        return None, ValidationIssue(
            "missing_output",
            f"input {name!r} links to output {link.output!r} of node {link.source!r} ({source_entry.type}), "
            f"which has outputs {sorted(source_outputs)}",
            node_id, name, {"from": link.source, "output": link.output, "outputs": sorted(source_outputs)})
    return source_outputs[link.output].socket_type.name, None


def _type_issue(registry: NodeRegistry, node_id: str, spec: InputSpec, source: Link, source_type: str,
                via: tuple[str, ...] = ()) -> ValidationIssue | None:
    if registry.types.compatible(source_type, spec.socket_type.name):
        return None
    passed = f" (passed through {_passed(list(via))})" if via else ""
    return ValidationIssue(
        "type_mismatch",
        f"input {spec.name!r} expects {spec.socket_type.name} but {source.source}.{source.output}{passed} is {source_type}",
        node_id, spec.name, {"expected_type": spec.socket_type.name, "got_type": source_type,
                             **({"via": list(via)} if via else {})})


def compile_workflow(
    data: str | bytes | dict[str, Any] | Workflow,
    registry: NodeRegistry,
    outputs: list[str] | None = None,
    source: str = "workflow",
    max_nodes: int = MAX_NODES,
    memory_budget: int | None = None,
) -> CompiledWorkflow:
    """Validate everything, then select the nodes the outputs need and order them.

    `outputs` names the nodes whose results are wanted; by default every output node that runs
    (neither bypassed nor muted). Before the nodes, the document itself: at most `max_nodes`
    nodes, and only standard JSON values (finite numbers, Unicode text, at most 64 levels deep),
    so that whatever is accepted can be hashed, stored and sent back. With a `memory_budget`
    (bytes the device holds), a node whose declared estimate (Node.estimated_bytes) exceeds it is
    refused here, before anything is allocated.

    Bypassed and muted nodes are left out of the plan: a link to a bypassed node's output is
    compiled as a link to what it passes through (see pass_through), so cache keys and the run
    order see through it. Their literal inputs are not checked (they do not run), their links are.
    A node that the outputs need and that is fed by a muted node, or by a bypassed one with
    nothing to pass, is an issue naming that node. Raises WorkflowInvalid listing every issue found.
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
    # Issues that stand only if their node is needed by the outputs: a feed cut by a mute or a bypass.
    unfed: list[ValidationIssue] = []
    compiled: dict[str, CompiledNode] = {}
    graph = nx.DiGraph()

    classes: dict[str, type[Node]] = {}
    for node_id, entry in workflow.nodes.items():
        if entry.runs:
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
        if entry.mode == MUTE:
            continue  # never runs: nothing of it is checked beyond its type
        bypassed = entry.mode == BYPASS
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
                if spec.required and not bypassed:
                    issues.append(ValidationIssue(
                        "missing_input", f"required input {name!r} ({spec.socket_type.name}) is not connected or set",
                        node_id, name, {"expected_type": spec.socket_type.name}))
                else:
                    literals[name] = spec.default
                continue
            value = entry.inputs[name]
            link = as_link(value)
            if link is None:
                if not bypassed:
                    checked, issue = _check_literal(node_id, spec, value)
                    if issue is not None:
                        issues.append(issue)
                    else:
                        literals[name] = checked
                continue
            source_type, issue = _check_link(workflow, classes, node_id, spec, link)
            if issue is not None:
                issues.append(issue)
            if source_type is None:
                continue
            via: tuple[str, ...] = ()
            if not bypassed:  # a bypassed node's own links are followed by its consumers
                if workflow.nodes[link.source].mode == MUTE:
                    unfed.append(ValidationIssue(
                        "muted_source", f"input {name!r} is fed by node {link.source!r} "
                                        f"({workflow.nodes[link.source].type}), which is muted; unmute it or mute "
                                        "this node too", node_id, name, {"from": link.source, "muted": link.source}))
                    continue
                found = pass_through(workflow, classes, link)
                if found.source is None:
                    if found.unfed is not None and found.unfed[0] == "bypass_unfed" and not spec.required:
                        # As ComfyUI drops such a link: the optional input reads as not connected.
                        literals[name] = spec.default
                    elif found.unfed is not None:
                        code, message, details = found.unfed
                        unfed.append(ValidationIssue(code, f"input {name!r}: {message}", node_id, name, details))
                    continue
                via, link = found.via, found.source
                if via:  # what the bypassed nodes pass on; its own problems are reported on them
                    source_type, _ = _check_link(workflow, classes, node_id, spec, link)
                    if source_type is None:
                        continue
                links[name] = link
                graph.add_edge(link.source, node_id)
            issue = _type_issue(registry, node_id, spec, link, source_type, via)
            if issue is not None:
                issues.append(issue)
        if bypassed:
            continue
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
        outputs = [node_id for node_id, cls in classes.items() if cls.output_node and workflow.nodes[node_id].runs]
        if not outputs and not any(i.code == "unknown_node_type" for i in issues):
            idle = [node_id for node_id, cls in classes.items() if cls.output_node]
            issues.append(ValidationIssue(
                "no_output_node", f"every output node is bypassed or muted ({', '.join(idle)}), so nothing would run"
                if idle else "the workflow has no output node (save, preview, ...), so nothing would run",
                details={"idle_outputs": idle} if idle else {}))
    else:
        for node_id in outputs:
            if node_id not in workflow.nodes:
                issues.append(ValidationIssue("unknown_output_node", f"requested output {node_id!r} is not a node of the workflow",
                                              node_id))
            elif not workflow.nodes[node_id].runs:
                mode = workflow.nodes[node_id].mode
                issues.append(ValidationIssue(
                    "output_not_run", f"requested output {node_id!r} is {'bypassed' if mode == BYPASS else 'muted'}, "
                                      "so it does not run", node_id, None, {"mode": mode}))

    needed = {node_id for node_id in outputs if node_id in graph}
    frontier = list(needed)
    while frontier:
        for source in graph.predecessors(frontier.pop()):
            if source not in needed:
                needed.add(source)
                frontier.append(source)
    issues.extend(issue for issue in unfed if issue.node_id in needed)
    if issues:
        raise WorkflowInvalid(issues)

    order = [node_id for node_id in topological if node_id in needed]
    for node_id in order:
        node = compiled[node_id]
        node.literal_json = _literal_json(node.node_class, node.literals)
    outside_classes = {cls for cls in classes.values() if reads_outside(cls)}
    outside = tuple(node for node in compiled.values() if node.node_class in outside_classes)
    return CompiledWorkflow(workflow, {n: compiled[n] for n in order}, list(outputs), order, outside)
