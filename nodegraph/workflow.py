"""The workflow document: one versioned JSON format for the CLI, the API and the editor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .registry import NodeRegistry

WORKFLOW_VERSION = 1


@dataclass(frozen=True)
class Link:
    """An input fed by another node's named output: `{"from": "node_id", "output": "latent"}`."""

    source: str
    output: str

    def to_json(self) -> dict[str, str]:
        return {"from": self.source, "output": self.output}


LINK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Link",
    "description": "An input fed by another node's named output.",
    "properties": {
        "from": {"type": "string", "description": "Id of the node whose output feeds this input."},
        "output": {"type": "string", "description": "Name of that node's output."},
    },
    "required": ["from", "output"],
    "additionalProperties": False,
}


BYPASS, MUTE = "bypass", "mute"
NODE_MODES = (BYPASS, MUTE)
"""A node's `mode`, when it does not run as usual. Bypassed: it does not run, and each of its outputs
is fed by its first linked input of the same type (in the order the node declares its inputs), as
if the node were not there. Muted: it never runs, and whatever needs its outputs is an error.
Absent: the node runs."""

MODE_SCHEMA: dict[str, Any] = {
    "enum": [*NODE_MODES, None],
    "description": "Left out (or null) for a node that runs. bypass: it does not run and each output is fed by "
                   "its first linked input of the same type; mute: it never runs (nothing needed may consume it).",
}


def _mode_schema(schema: dict[str, Any]) -> None:
    """`mode` in the JSON Schema (a saved document leaves it out for a node that runs; null, what
    a model dump holds, is accepted as the same)."""
    schema.clear()
    schema.update(MODE_SCHEMA)


class NodeEntry(BaseModel):
    """One node of a workflow: its type, its inputs (literal JSON values or links) and its mode."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="Node type name, e.g. LoadCheckpoint.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input name -> literal value or link.")
    mode: Literal["bypass", "mute"] | None = Field(None, json_schema_extra=_mode_schema)

    @property
    def runs(self) -> bool:
        """Whether the node runs as usual (neither bypassed nor muted)."""
        return self.mode is None


class Workflow(BaseModel):
    """A workflow document. The `ui` block belongs to the editor and never changes what runs."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(WORKFLOW_VERSION, description="Document format version.")
    nodes: dict[str, NodeEntry] = Field(description="Node id -> node.")
    ui: dict[str, Any] = Field(default_factory=dict, description="Editor state (positions, groups); ignored by the executor.")

    def to_json(self) -> dict[str, Any]:
        document = self.model_dump(by_alias=True, mode="json")
        for node in document["nodes"].values():
            if node["mode"] is None:  # a node that runs is saved without a mode
                del node["mode"]
        return document


def as_link(value: Any) -> Link | None:
    """The link an input value stands for, or None for a literal."""
    if isinstance(value, Link):
        return value
    if isinstance(value, dict) and set(value) == {"from", "output"}:
        if isinstance(value["from"], str) and isinstance(value["output"], str):
            return Link(value["from"], value["output"])
    return None


def _upgrade_from_0(document: dict[str, Any]) -> dict[str, Any]:
    """Version 0, the pre-release draft: no version key, links as `[node_id, output]` pairs."""
    if not isinstance(document.get("nodes"), dict):
        return {**document, "version": 1}  # nothing to upgrade; validation says what `nodes` should be
    nodes = {}
    for node_id, node in document["nodes"].items():
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            inputs = {
                name: {"from": value[0], "output": value[1]}
                if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
                else value
                for name, value in node["inputs"].items()
            }
            node = {**node, "inputs": inputs}
        nodes[node_id] = node
    return {**document, "nodes": nodes, "version": 1}


# MIGRATIONS[n] turns a version-n document into a version-(n+1) one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _upgrade_from_0}


class UnsupportedVersion(ValueError):
    pass


def upgrade(document: dict[str, Any]) -> dict[str, Any]:
    """Bring an older document up to WORKFLOW_VERSION; the input is not modified (migrations
    build new containers for what they change)."""
    version = document.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UnsupportedVersion(f"'version' must be an integer, got {version!r}")
    if version > WORKFLOW_VERSION:
        raise UnsupportedVersion(
            f"document version {version} is newer than this nodegraph understands ({WORKFLOW_VERSION}); upgrade nodegraph"
        )
    while version < WORKFLOW_VERSION:
        if version not in MIGRATIONS:
            raise UnsupportedVersion(f"no upgrade from document version {version}")
        document = MIGRATIONS[version](document)
        version = document["version"]
    return document


def document_schema(registry: NodeRegistry | None = None) -> dict[str, Any]:
    """The JSON Schema of the document format; with a registry, each node type's inputs too."""
    schema = Workflow.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nodegraph workflow"
    if registry is None:
        return schema
    defs = schema.setdefault("$defs", {})
    defs["Link"] = LINK_SCHEMA
    link = {"$ref": "#/$defs/Link"}
    variants = []
    for node_class in registry:
        inputs: dict[str, Any] = {}
        for name, spec in node_class.specs().inputs.items():
            if spec.link_only:
                inputs[name] = link
            else:
                literal = spec.validator.json_schema()
                literal.pop("$defs", None)
                inputs[name] = {"anyOf": [literal, link], "description": spec.description}
        required = [name for name, spec in node_class.specs().inputs.items() if spec.required]
        defs[f"node_{node_class.type_name}"] = {
            "type": "object",
            "description": node_class.description(),
            "properties": {
                "type": {"const": node_class.type_name},
                "inputs": {"type": "object", "properties": inputs, "required": required,
                           "additionalProperties": False},
                "mode": MODE_SCHEMA,
            },
            "required": ["type"] + (["inputs"] if required else []),
            "additionalProperties": False,
        }
        variants.append({"$ref": f"#/$defs/node_{node_class.type_name}"})
    schema["properties"]["nodes"]["additionalProperties"] = {"oneOf": variants}
    return schema

