"""Hypothesis strategies for hostile input: JSON values with everything JSON cannot hold (NaN,
lone surrogates, huge numbers, deep nesting), workflow documents that are nearly right, and raw
bodies, names and query strings for the server's routes."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from nodegraph.registry import NodeRegistry

# Text that includes control characters and lone surrogates (plain st.text() leaves surrogates out).
characters = st.characters() | st.characters(codec=None, categories=["Cs"]) | st.sampled_from("\x00{}[]\"\\/.:%")
texts = st.text(characters, max_size=24)
names = st.sampled_from(["a", "b", "c", "out", "value", "x", "nodes", "version", "ui", "type", "inputs", "from",
                         "output"]) | texts

numbers = (st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.integers(1, 6000).map(lambda digits: int("9" * min(digits, 4000))))


def nested(depth: int, inner: object = 0) -> object:
    value = inner
    for _ in range(depth):
        value = [value]
    return value


scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(names, children, max_size=4), max_leaves=16)
deep_values = st.integers(50, 1100).map(nested)
any_values = json_values | deep_values


def link_values(node_ids: list[str]) -> st.SearchStrategy:
    return st.fixed_dictionaries({"from": st.sampled_from(node_ids) | texts if node_ids else texts,
                                  "output": st.sampled_from(["value", "sum", "text", "result", "model", "data"]) | texts})


def _plausible(spec) -> st.SearchStrategy:
    """A value of roughly the input's kind, so that many documents get past validation."""
    kind = spec.socket_type.name
    if spec.choices is not None:
        return st.sampled_from(list(spec.choices))
    return {"INT": st.integers(-1000, 1000), "FLOAT": st.floats(-1000, 1000), "BOOLEAN": st.booleans(),
            "STRING": st.text(max_size=20) | st.sampled_from(["{a}", "{a} {b}", "{a!r:>8}", "{a.__class__}"])
            }.get(kind, json_values)


@st.composite
def plausible_documents(draw: st.DrawFn, registry: NodeRegistry) -> dict:
    """A workflow of real node types and inputs, links to real outputs of earlier nodes, and one
    output node: most of these are valid, and the rest are wrong in one realistic way."""
    classes = sorted(registry, key=lambda cls: cls.type_name)
    outputs = [cls for cls in classes if cls.output_node]
    nodes: dict = {}
    for index in range(draw(st.integers(0, 5))):
        node_class = draw(st.sampled_from(classes))
        inputs = {}
        for name, spec in node_class.specs().inputs.items():
            sources = [(node_id, output) for node_id, entry in nodes.items()
                       for output in registry.get(entry["type"]).specs().outputs]
            if sources and (spec.link_only or draw(st.booleans())):
                node_id, output = draw(st.sampled_from(sources))
                inputs[name] = {"from": node_id, "output": output}
            elif not spec.link_only and draw(st.booleans()):
                inputs[name] = draw(_plausible(spec))
        nodes[f"n{index}"] = {"type": node_class.type_name, "inputs": inputs}
    sink = draw(st.sampled_from(outputs))
    last = list(nodes)[-1] if nodes else None
    sink_inputs = {}
    for name, spec in sink.specs().inputs.items():
        if last is not None and draw(st.booleans()):
            output = draw(st.sampled_from(sorted(registry.get(nodes[last]["type"]).specs().outputs)))
            sink_inputs[name] = {"from": last, "output": output}
        elif not spec.link_only:
            sink_inputs[name] = draw(_plausible(spec))
    nodes["out"] = {"type": sink.type_name, "inputs": sink_inputs}
    document = {"version": 1, "nodes": nodes, "ui": {"nodes": {node_id: {"pos": [10, 20]} for node_id in nodes}}}
    mutation = draw(st.sampled_from(["none", "none", "value", "ui", "link", "type"]))
    if mutation == "value":
        entry = nodes[draw(st.sampled_from(sorted(nodes)))]
        entry["inputs"][draw(names)] = draw(any_values)
    elif mutation == "ui":
        document["ui"][draw(names)] = draw(any_values)
    elif mutation == "link":
        nodes["out"]["inputs"][draw(names)] = draw(link_values(list(nodes)))
    elif mutation == "type":
        nodes[draw(st.sampled_from(sorted(nodes)))]["type"] = draw(texts)
    return document


@st.composite
def hostile_documents(draw: st.DrawFn, registry: NodeRegistry) -> dict:
    """Anything shaped a little like a workflow: node types and input names mostly real, values anything."""
    type_names = sorted(cls.type_name for cls in registry)
    node_ids = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "out"]) | texts, max_size=6, unique=True))
    nodes: dict = {}
    for node_id in node_ids:
        type_name = draw(st.sampled_from(type_names) | texts)
        node_class = registry.get(type_name)
        specs = node_class.specs().inputs if node_class is not None else {}
        inputs = {}
        for name in draw(st.lists(st.sampled_from(sorted(specs)) | texts if specs else texts, max_size=4, unique=True)):
            plausible = _plausible(specs[name]) if name in specs else json_values
            inputs[name] = draw(plausible | link_values(node_ids) | any_values)
        entry = draw(st.sampled_from(["full", "no inputs", "junk"]))
        nodes[node_id] = ({"type": type_name, "inputs": inputs} if entry == "full" else {"type": type_name}
                          if entry == "no inputs" else draw(any_values))
    document = {"version": draw(st.sampled_from([1, 1, 1, 0]) | json_values), "nodes": nodes}
    if draw(st.booleans()):
        document["ui"] = draw(st.dictionaries(names, any_values, max_size=3) | any_values)
    return document


def documents(registry: NodeRegistry) -> st.SearchStrategy:
    """Workflow documents from nearly right to not a document at all."""
    shells = st.fixed_dictionaries({"nodes": any_values}, optional={"version": json_values, "ui": any_values})
    return (plausible_documents(registry) | plausible_documents(registry) | hostile_documents(registry)
            | shells | any_values)


def as_json_text(value: object) -> str:
    """JSON text as a careless client writes it: NaN as NaN, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True)


raw_bodies = (st.binary(max_size=200) | texts.map(lambda text: text.encode("utf-8", "surrogatepass"))
              | st.integers(1, 120_000).map(lambda depth: b"[" * depth + b"]" * depth)
              | st.sampled_from([b"", b"{", b"NaN", b"\xff\xfe", b'{"workflow": Infinity}', b"1e400",
                                 b'"\\ud800"', b"9" * 5000]))
