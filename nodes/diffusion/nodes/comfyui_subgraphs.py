"""ComfyUI's reusable groups of nodes, expanded into plain nodes before a UI-format document is
imported: subgraphs (the current editor's: `definitions.subgraphs`; a node whose type is a
subgraph's id stands for a copy of it, and subgraphs nest) and the legacy group nodes (types
`workflow/<name>` or `workflow><name>`, defined in `extra.groupNodes`).

The result is a UI-format document of plain nodes. An inner node is numbered `<instance id>:<inner
id>`, as ComfyUI numbers it when it runs, so ids are unique and the same on every import; links
through an instance's inputs and outputs are rewired to the nodes on either side; widget values set
on the instance are applied; inner nodes are placed where the instance was, keeping their layout.
A muted or bypassed instance stays one node, which the import then skips or passes through.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# UI node modes: 2 = muted (never runs), 4 = bypassed (inputs passed through to outputs).
MODE_MUTED, MODE_BYPASSED = 2, 4
# UI-only node types: comments and wire routing, which never reach ComfyUI's API format.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
# The pseudo-nodes of a subgraph's inputs and outputs, as its links name them.
INPUT_NODE, OUTPUT_NODE = "-10", "-20"
GROUP_NODE_PREFIXES = ("workflow/", "workflow>")
# Widgets an editor follows with a control_after_generate widget (what to do with a seed after a run).
SEED_WIDGETS = frozenset({"seed", "noise_seed"})

Report = Callable[[str, str, "str | None", "str | None"], None]  # code, message, node id, input name


def node_position(node: dict[str, Any]) -> list[float] | None:
    """A UI node's position as [x, y] (older editors saved {"0": x, "1": y}), None if it has none."""
    pos = node.get("pos")
    if isinstance(pos, dict):
        pos = [pos.get("0"), pos.get("1")]
    if (isinstance(pos, list) and len(pos) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pos)):
        return [float(pos[0]), float(pos[1])]
    return None


def _input_entries(node: dict[str, Any]) -> list[Any]:
    """A UI node's input slots (files from outside may hold anything there)."""
    entries = node.get("inputs")
    return entries if isinstance(entries, list) else []


def input_name(entry: dict[str, Any]) -> str | None:
    """The input a UI node's input slot feeds: a widget turned into an input goes by the widget's name."""
    widget = entry.get("widget")
    name = widget.get("name") if isinstance(widget, dict) and widget.get("name") else entry.get("name")
    return name if isinstance(name, str) or name is None else str(name)


@dataclass(frozen=True)
class _Link:
    origin: str
    origin_slot: Any
    target: str
    target_slot: Any
    type: Any


def _is_key(value: Any) -> bool:
    """Whether a link id or slot can be looked up (files from outside may hold anything there)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def read_link(entry: Any) -> tuple[Any, _Link] | None:
    """(id, link) of a link in either of the UI format's forms: `[id, origin, origin slot, target,
    target slot, type]` or `{"id", "origin_id", "origin_slot", "target_id", "target_slot", "type"}`;
    None when it is neither."""
    if isinstance(entry, list) and len(entry) >= 5:
        link_id, link = entry[0], _Link(str(entry[1]), entry[2], str(entry[3]), entry[4],
                                        entry[5] if len(entry) > 5 else None)
    elif isinstance(entry, dict) and {"id", "origin_id", "origin_slot"} <= set(entry):
        link_id, link = entry["id"], _Link(str(entry["origin_id"]), entry["origin_slot"], str(entry.get("target_id")),
                                           entry.get("target_slot"), entry.get("type"))
    else:
        return None
    valid = _is_key(link_id) and isinstance(link.origin_slot, int) and not isinstance(link.origin_slot, bool)
    return (link_id, link) if valid else None


@dataclass
class _Graph:
    """The nodes (by id, in document order) and links of the document or of one definition."""

    nodes: dict[str, dict[str, Any]]
    links: dict[Any, _Link]


@dataclass
class _Definition:
    """A subgraph or group node: its inner graph, its input slots and which inner link feeds each
    of its output slots."""

    kind: str  # "subgraph" or "group node"
    name: str
    graph: _Graph
    inputs: list[tuple[Any, Any]]  # (name, type) of each input slot
    output_links: dict[int, Any]
    # Group nodes: inner node id -> how many of the instance's widget values are its, in order.
    widget_counts: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"

    def widget_targets(self) -> list[tuple[int, Any]]:
        """(input slot, inner widget name) of the subgraph inputs that feed a widget inside: those
        the editor shows as widgets on the instance, in slot order."""
        found = []
        for slot in range(len(self.inputs)):
            for link in self.graph.links.values():
                if link.origin != INPUT_NODE or link.origin_slot != slot:
                    continue
                entries = _input_entries(self.graph.nodes.get(link.target) or {})
                entry = entries[link.target_slot] if isinstance(link.target_slot, int) and \
                    0 <= link.target_slot < len(entries) else None
                if isinstance(entry, dict) and entry.get("widget"):
                    found.append((slot, input_name(entry)))
                    break
        return found


@dataclass(frozen=True)
class _Source:
    node: str
    slot: Any


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass
class _Instance:
    """One use of a definition: the node standing for it and the graph it sits in."""

    node: dict[str, Any]
    definition: _Definition
    flat_id: str
    path: tuple[str, ...]  # instance ids from the document down to (and with) this one
    parent: _Graph
    parent_instance: _Instance | None
    delta: tuple[float, float]
    widget_values: dict[int, Any] = field(default_factory=dict)  # subgraph input slot -> value
    inner_widgets: dict[str, list[Any]] = field(default_factory=dict)  # group inner node -> values

    def input_link(self, slot: int) -> Any:
        """The link feeding input slot `slot` of the instance, or None."""
        entries = [entry for entry in _input_entries(self.node) if isinstance(entry, dict)]
        if self.definition.kind == "group node":
            # A group node's inputs are its inner nodes' free link inputs, in order.
            entries = [e for e in entries if not e.get("widget")]
            return entries[slot].get("link") if slot < len(entries) else None
        # A subgraph instance names its inputs like the subgraph (saved files may leave some out).
        name, kind = self.definition.inputs[slot]
        match = (next((e for e in entries if e.get("name") == name and e.get("type") == kind), None)
                 or next((e for e in entries if e.get("name") == name), None))
        return match.get("link") if match is not None else None

    def ancestors(self) -> list[_Definition]:
        found, current = [], self
        while current is not None:
            found.append(current.definition)
            current = current.parent_instance
        return found


def _graph(nodes: list[Any], links: list[Any]) -> _Graph | None:
    if not all(isinstance(node, dict) and "id" in node and isinstance(node.get("type"), str) for node in nodes):
        return None
    read = [read_link(entry) for entry in links]
    if any(entry is None for entry in read):
        return None
    return _Graph({str(node["id"]): node for node in nodes}, dict(entry for entry in read if entry is not None))


def _subgraph(raw: dict[str, Any]) -> _Definition | None:
    nodes, links = raw.get("nodes"), raw.get("links", [])
    graph = _graph(nodes, links) if isinstance(nodes, list) and isinstance(links, list) else None
    if graph is None:
        return None
    declared = raw.get("inputs") if isinstance(raw.get("inputs"), list) else []
    inputs = [(entry.get("name"), entry.get("type")) for entry in declared if isinstance(entry, dict)]
    outputs: dict[int, Any] = {}
    for link_id, link in graph.links.items():
        if link.target == OUTPUT_NODE and isinstance(link.target_slot, int):
            outputs.setdefault(link.target_slot, link_id)
    return _Definition("subgraph", str(raw.get("name") or raw.get("id")), graph, inputs, outputs)


def _table(value: Any) -> dict[str, Any]:
    """A JSON object of the file, or an empty one where it holds something else."""
    return value if isinstance(value, dict) else {}


def _group_node(name: str, raw: Any) -> _Definition | None:
    """A legacy group node: inner nodes by position, links `[origin, slot, target, slot, _, type]`
    (origin None: from outside the group). Its inputs are the inner nodes' link inputs fed from
    outside, its outputs their outputs used outside or nowhere inside, both in node order, as the
    editor builds the group node's type (`config` renames and hides them)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("nodes"), list) or not isinstance(raw.get("links", []), list):
        return None
    inner = raw["nodes"]
    if not all(isinstance(node, dict) and isinstance(node.get("type"), str)
               and isinstance(node.get("inputs") or [], list) and isinstance(node.get("outputs") or [], list)
               for node in inner):
        return None
    config = _table(raw.get("config"))
    external = set()
    for entry in raw.get("external") if isinstance(raw.get("external"), list) else []:
        if isinstance(entry, list) and len(entry) >= 2:
            # Editors of one era stored the node itself instead of its index.
            index = entry[0].get("index") if isinstance(entry[0], dict) else entry[0]
            if _is_key(index) and _is_key(entry[1]):
                external.add((index, entry[1]))
    internal = [entry for entry in raw.get("links") or []
                if isinstance(entry, list) and len(entry) >= 4 and entry[0] is not None]
    if not all(isinstance(value, int) for entry in internal for value in entry[:4]):
        return None
    linked_in = {(entry[2], entry[3]) for entry in internal}
    linked_out = {(entry[0], entry[1]) for entry in internal}

    def passes_through(index: int) -> bool:  # a reroute used inside only: no slot of the group
        return inner[index]["type"] == REROUTE and (index, 0) in linked_in and (index, 0) in linked_out \
            and (index, 0) not in external

    nodes = {}
    for index, node in enumerate(inner):
        node = copy.deepcopy(node)
        node["id"] = index
        for entry in node.get("inputs") or []:
            if isinstance(entry, dict):
                entry["link"] = None  # the group's own links say what feeds each input
        nodes[str(index)] = node
    graph = _Graph(nodes, {})
    for number, entry in enumerate(internal):
        graph.links[f"link {number}"] = _Link(str(entry[0]), entry[1], str(entry[2]), entry[3],
                                              entry[5] if len(entry) > 5 else None)

    inputs: list[tuple[Any, Any]] = []
    targets: list[tuple[int, int]] = []
    for index, node in enumerate(inner):
        if node["type"] in NOTE_TYPES or node["type"] == PRIMITIVE or passes_through(index):
            continue
        custom_inputs = _table(_table(config.get(str(index))).get("input"))
        for slot, entry in enumerate(node.get("inputs") or []):
            if not isinstance(entry, dict) or entry.get("widget") or (index, slot) in linked_in:
                continue
            # A reroute's input goes by its type in the config.
            custom = _table(custom_inputs.get(entry.get("name")) if _is_key(entry.get("name")) else None) or (
                _table(next(iter(custom_inputs.values()), None)) if node["type"] == REROUTE else {})
            if custom.get("visible") is False:
                continue
            inputs.append((custom.get("name") or entry.get("name"), entry.get("type")))
            targets.append((index, slot))
    for slot, (index, target_slot) in enumerate(targets):
        graph.links[f"input {slot}"] = _Link(INPUT_NODE, slot, str(index), target_slot, inputs[slot][1])

    outputs: dict[int, Any] = {}
    for index, node in enumerate(inner):
        if node["type"] in NOTE_TYPES or passes_through(index):
            continue
        if node["type"] == PRIMITIVE and (index, 0) not in linked_out:
            continue
        custom_outputs = _table(_table(config.get(str(index))).get("output"))
        for slot, entry in enumerate(node.get("outputs") or []):
            visible = _table(custom_outputs.get(str(slot))).get(
                "visible", (index, slot) not in linked_out or (index, slot) in external)
            if visible:
                number = len(outputs)
                outputs[number] = f"output {number}"
                graph.links[f"output {number}"] = _Link(str(index), slot, OUTPUT_NODE, number,
                                                        entry.get("type") if isinstance(entry, dict) else None)
    for link in graph.links.values():
        if link.target != OUTPUT_NODE:
            entries = nodes[link.target].get("inputs") if link.target in nodes else None
            slot = link.target_slot
            if not (isinstance(entries, list) and isinstance(slot, int) and 0 <= slot < len(entries)
                    and isinstance(entries[slot], dict)):
                return None
    for link_id, link in graph.links.items():
        if link.target != OUTPUT_NODE:
            nodes[link.target]["inputs"][link.target_slot]["link"] = link_id
    counts = [(str(index), len(node["widgets_values"])) for index, node in enumerate(inner)
              if node["type"] not in NOTE_TYPES and node["type"] != REROUTE
              and isinstance(node.get("widgets_values"), list)]
    return _Definition("group node", name, graph, inputs, outputs, counts)


def _definitions(document: dict[str, Any]) -> dict[str, _Definition | None]:
    """Node type -> its definition (None: present but unreadable, reported once per use)."""
    found: dict[str, _Definition | None] = {}
    pending = [document]
    while pending:  # definitions may carry definitions of their own
        holder = pending.pop()
        definitions = holder.get("definitions")
        subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
        for raw in subgraphs if isinstance(subgraphs, list) else []:
            if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"] not in found:
                found[raw["id"]] = _subgraph(raw)
                pending.append(raw)
    extra = document.get("extra")
    groups = extra.get("groupNodes") if isinstance(extra, dict) else None
    for name, raw in (groups.items() if isinstance(groups, dict) else ()):
        definition = _group_node(str(name), raw)
        for prefix in GROUP_NODE_PREFIXES:
            found[f"{prefix}{name}"] = definition
    return found


class _Expander:
    def __init__(self, definitions: dict[str, _Definition | None], report: Report) -> None:
        self.definitions = definitions
        self.report = report
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []
        self.instances: dict[str, _Instance | None] = {}

    def expands(self, node: dict[str, Any]) -> bool:
        return node["type"] in self.definitions and node.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)

    def instance(self, node: dict[str, Any], graph: _Graph, parent: _Instance | None) -> _Instance | None:
        """The instance `node` (of `graph`, inside `parent`) stands for; None if it cannot be
        expanded (reported once)."""
        path = (*(parent.path if parent else ()), str(node["id"]))
        flat_id = ":".join(path)
        if flat_id in self.instances:
            return self.instances[flat_id]
        definition = self.definitions[node["type"]]
        created = None
        if definition is None:
            what = "group node" if node["type"].startswith(GROUP_NODE_PREFIXES) else "subgraph"
            self.report("invalid_subgraph", f"the {what} definition of {node['type']!r} cannot be read "
                                            "(it needs lists of nodes and links)", flat_id, None)
        elif parent is not None and definition in parent.ancestors():
            self.report("invalid_subgraph", f"{definition.describe()} contains itself", flat_id, None)
        else:
            delta = parent.delta if parent else (0.0, 0.0)
            pos = node_position(node)
            corners = [p for p in map(node_position, definition.graph.nodes.values()) if p is not None]
            if pos is not None and corners:
                delta = (pos[0] + delta[0] - min(p[0] for p in corners), pos[1] + delta[1] - min(p[1] for p in corners))
            created = _Instance(node, definition, flat_id, path, graph, parent, delta)
            self._apply_widget_values(created)
            if definition.kind == "group node":
                for entry in _input_entries(node):
                    # Which inner widget such an input feeds is not saved with the group node.
                    if isinstance(entry, dict) and entry.get("widget") and entry.get("link") is not None:
                        self.report("invalid_link", f"{definition.describe()}: a widget turned into an input cannot "
                                                    "be imported; set its value on the node instead",
                                    flat_id, input_name(entry))
        self.instances[flat_id] = created
        return created

    def _apply_widget_values(self, instance: _Instance) -> None:
        values = instance.node.get("widgets_values")
        if not isinstance(values, list) or not values:
            return  # the inner nodes' own values hold
        definition = instance.definition
        if definition.kind == "group node":
            wanted = sum(count for _, count in definition.widget_counts)
            if wanted == len(values):
                start = 0
                for inner_id, count in definition.widget_counts:
                    instance.inner_widgets[inner_id] = values[start:start + count]
                    start += count
                return
            expected = f"its inner nodes have {wanted}"
        else:
            targets = definition.widget_targets()
            slots: list[int | None] = [slot for slot, _ in targets]
            if len(values) > len(slots):
                # Older editors also saved the control_after_generate value after each seed.
                slots = [s for slot, name in targets for s in ((slot, None) if name in SEED_WIDGETS else (slot,))]
            if len(values) == len(slots):
                instance.widget_values = {slot: value for slot, value in zip(slots, values) if slot is not None}
                return
            expected = f"it has {len(targets)} inputs shown as widgets ({', '.join(str(n) for _, n in targets)})"
        self.report("invalid_widgets", f"{definition.describe()}: the node holds {len(values)} widget values, "
                                       f"{expected}: {values!r}", instance.flat_id, None)

    def emit(self, graph: _Graph, parent: _Instance | None) -> None:
        for node in graph.nodes.values():
            if self.expands(node):
                child = self.instance(node, graph, parent)
                if child is not None:
                    self.emit(child.definition.graph, child)
                continue
            self.nodes.append(self.copy(node, graph, parent))

    def copy(self, node: dict[str, Any], graph: _Graph, parent: _Instance | None) -> dict[str, Any]:
        flat = {**node, "inputs": [dict(e) if isinstance(e, dict) else e for e in _input_entries(node)]}
        node_id = str(node["id"])
        if parent is not None:
            flat["id"] = f"{parent.flat_id}:{node_id}"
            if node_id in parent.inner_widgets:
                flat["widgets_values"] = parent.inner_widgets[node_id]
            pos = node_position(node)
            if pos is not None:
                flat["pos"] = [pos[0] + parent.delta[0], pos[1] + parent.delta[1]]
        for slot, entry in enumerate(flat["inputs"]):
            if not isinstance(entry, dict) or entry.get("link") is None:
                continue
            link = graph.links.get(entry["link"]) if _is_key(entry["link"]) else None
            source = self.resolve(graph, parent, entry["link"], str(flat["id"]), input_name(entry))
            entry["link"] = self.connect(source, str(flat["id"]), slot, input_name(entry),
                                         link.type if link is not None else entry.get("type"))
        return flat

    def connect(self, source: _Source | _Literal | None, target: str, slot: int, name: Any, kind: Any) -> int | None:
        """A link of the expanded document to `target`'s input `slot` from `source` (a literal comes
        from a primitive node made for it); its id, or None when nothing feeds the input."""
        if source is None:
            return None
        if isinstance(source, _Literal):
            primitive = f"{target}:{name}:value"
            self.nodes.append({"id": primitive, "type": PRIMITIVE, "mode": 0, "widgets_values": [source.value]})
            source = _Source(primitive, 0)
        link_id = len(self.links) + 1
        self.links.append([link_id, source.node, source.slot, target, slot, kind])
        return link_id

    def resolve(self, graph: _Graph, parent: _Instance | None, link_id: Any, target: str,
                name: Any) -> _Source | _Literal | None:
        """What feeds a link of `graph` (the document's or a definition's, inside `parent`): a node
        of the expanded document, a value set on an instance, or nothing."""
        where = parent.definition.describe() if parent else "file"
        link = graph.links.get(link_id) if _is_key(link_id) else None
        if link is None:
            self.report("invalid_link", f"link {link_id!r} is not in the {where}'s links", target, name)
            return None
        if link.origin == INPUT_NODE:
            if parent is None or not isinstance(link.origin_slot, int) \
                    or not 0 <= link.origin_slot < len(parent.definition.inputs):
                self.report("invalid_link", f"linked to input {link.origin_slot!r} of the {where}, which it does "
                                            "not have", target, name)
                return None
            outer = parent.input_link(link.origin_slot)
            if outer is not None:
                return self.resolve(parent.parent, parent.parent_instance, outer, target, name)
            if link.origin_slot in parent.widget_values:
                return _Literal(parent.widget_values[link.origin_slot])
            return None  # not connected: the inner node's own widget value (if any) holds
        origin = graph.nodes.get(link.origin)
        if origin is None:
            self.report("missing_node", f"linked to node {link.origin}, which is not in the {where}", target, name)
            return None
        if not self.expands(origin):
            return _Source(f"{parent.flat_id}:{link.origin}" if parent else link.origin, link.origin_slot)
        instance = self.instance(origin, graph, parent)
        if instance is None:
            return None
        inner = instance.definition.output_links.get(link.origin_slot)
        if inner is None:
            self.report("invalid_link", f"linked to output {link.origin_slot} of {instance.definition.describe()} "
                                        f"(node {instance.flat_id}), which nothing inside it feeds", target, name)
            return None
        return self.resolve(instance.definition.graph, instance, inner, target, name)


def expand_reusable_nodes(document: dict[str, Any], report: Report) -> dict[str, Any]:
    """The UI-format `document` with its subgraph instances and group nodes expanded into plain
    nodes (see the module's docstring); unchanged when it has neither. What cannot be expanded is
    reported through `report(code, message, node id, input name)`."""
    definitions = _definitions(document)
    if not definitions:
        return document
    root = _graph(document["nodes"], [])
    if root is None:  # a node without a type name: the import names it
        return document
    links = {}
    for entry in document.get("links") or []:
        read = read_link(entry)
        if read is None:
            report("invalid_link", f"cannot read link {entry!r}", None, None)
        else:
            links[read[0]] = read[1]
    root.links = links
    expander = _Expander(definitions, report)
    expander.emit(root, None)
    return {**document, "nodes": expander.nodes, "links": expander.links}
