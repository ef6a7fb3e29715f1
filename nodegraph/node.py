"""The node contract: typed inputs and outputs declared once, a `run` method, and a run context."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping

import annotated_types
from pydantic import BaseModel, ConfigDict, TypeAdapter

from .types import Choices, SocketType, choices_of, socket_type_of


class NodeInputs(BaseModel):
    """Base of a node's `Inputs`: one pydantic field per input, with bounds and descriptions."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class NodeOutputs(BaseModel):
    """Base of a node's `Outputs`: one field per named output."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class RunCancelled(Exception):
    """Raised inside a node when the run was cancelled; the executor ends the run."""


class CancelToken:
    """Set from any thread to cancel a run; checked between nodes and at every progress report."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class RunContext:
    """What a running node may use besides its inputs."""

    node_id: str
    device: str
    output_dir: Path
    log: logging.Logger
    cancel_token: CancelToken
    report: Callable[[str, dict[str, Any]], None]
    files: list[str] = field(default_factory=list)
    # What output files embed so a result can be traced and its graph reopened: the run's id and
    # the workflow document being run (upgraded to the current version, `ui` block included).
    # Shared by every node of the run: read it, do not modify it.
    run_id: str = ""
    workflow: dict[str, Any] = field(default_factory=dict)

    def check_cancelled(self) -> None:
        """Raise RunCancelled if the run was cancelled."""
        if self.cancel_token.cancelled:
            raise RunCancelled()

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        """Report step `value` of `total` (and optionally a preview image); checks cancellation."""
        self.report("progress", {"value": value, "max": total})
        if preview is not None:
            self.report("preview", {"image": preview})
        self.check_cancelled()

    def record_file(self, path: str | Path) -> None:
        """Note a file this node wrote; it is reported with the node's result, also when cached."""
        self.files.append(str(path))


CachePolicy = Literal["auto", "never"]


@dataclass(frozen=True)
class InputProblem:
    """What `Node.validate_inputs` finds wrong with a literal input before anything runs (a file
    that holds something the node cannot use, say). `input` None: the node as a whole; `code` is
    reported as the validation issue's code."""

    input: str | None
    message: str
    code: str = "invalid_value"
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputSpec:
    """One declared input, derived from the Inputs field."""

    name: str
    socket_type: SocketType
    required: bool
    default: Any
    description: str
    choices: tuple[Any, ...] | None
    dynamic_choices: Choices | None
    bounds: dict[str, float]
    extra: dict[str, Any]
    validator: TypeAdapter = field(compare=False, repr=False)

    @property
    def link_only(self) -> bool:
        return not self.socket_type.json

    def current_choices(self) -> list[Any] | None:
        if self.dynamic_choices is not None:
            return self.dynamic_choices.values()
        return list(self.choices) if self.choices is not None else None

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": self.socket_type.name,
            "required": self.required,
            "description": self.description,
            "link_only": self.link_only,
        }
        if not self.required and self.default is not None:
            info["default"] = self.default
        info.update(self.bounds)
        choices = self.current_choices()
        if choices is not None:
            info["choices"] = choices
        if self.dynamic_choices is not None and self.dynamic_choices.kind:
            info["choices_kind"] = self.dynamic_choices.kind
        info.update(self.extra)
        return info


@dataclass(frozen=True)
class OutputSpec:
    name: str
    socket_type: SocketType
    description: str

    def to_json(self) -> dict[str, Any]:
        return {"type": self.socket_type.name, "description": self.description}


_BOUND_NAMES = {
    annotated_types.Ge: "ge", annotated_types.Le: "le", annotated_types.Gt: "gt",
    annotated_types.Lt: "lt", annotated_types.MultipleOf: "multiple_of",
}


def _input_spec(name: str, info: Any) -> InputSpec:
    bounds: dict[str, float] = {}
    dynamic = None
    for meta in info.metadata:
        for bound_type, key in _BOUND_NAMES.items():
            if isinstance(meta, bound_type):
                bounds[key] = getattr(meta, key)
        if isinstance(meta, Choices):
            dynamic = meta
    annotation = info.rebuild_annotation()
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return InputSpec(
        name=name,
        socket_type=socket_type_of(annotation),
        required=info.is_required(),
        default=None if info.is_required() else info.get_default(call_default_factory=True),
        description=info.description or "",
        choices=choices_of(annotation),
        dynamic_choices=dynamic,
        bounds=bounds,
        extra=dict(extra),
        validator=TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True)),
    )


def _display_name(class_name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", class_name)


class Node:
    """Base class of every node type.

    Subclasses declare `Inputs(NodeInputs)` and `Outputs(NodeOutputs)`, a `category`, and
    implement `run(inputs, ctx) -> Outputs`. The docstring is the description shown to users.
    Nodes keep no state between runs: the executor caches outputs.
    """

    Inputs: ClassVar[type[NodeInputs]] = NodeInputs
    Outputs: ClassVar[type[NodeOutputs]] = NodeOutputs
    type_name: ClassVar[str]
    display_name: ClassVar[str]
    category: ClassVar[str] = "misc"
    version: ClassVar[int] = 1
    output_node: ClassVar[bool] = False
    cache: ClassVar[CachePolicy] = "auto"
    deprecated: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        if "display_name" not in cls.__dict__:
            cls.display_name = _display_name(cls.__name__)

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        """For nodes that read the outside world: a string that changes when what they read
        changes (a file's size and mtime, say). It sees the node's literal inputs; values that
        arrive by link are covered by their upstream cache keys. None means a pure node."""
        return None

    @classmethod
    def validate_inputs(cls, literals: Mapping[str, Any]) -> list[InputProblem]:
        """For nodes whose literal inputs name something outside the workflow that can be checked
        cheaply (a file's header, not its contents): what the node will not be able to use, found
        at validation instead of at run time. Called only when the node's inputs passed their own
        checks, with its literal values (defaults filled in; linked inputs are absent)."""
        return []

    @classmethod
    def estimated_bytes(cls, inputs: Mapping[str, Any]) -> int | None:
        """For nodes whose memory grows with their inputs (a latent's width x height x batch, say):
        about how many bytes a run will allocate, or None when it cannot tell. Validation calls it
        with the literal inputs only (linked ones are absent, so return None if one you need is
        missing), the executor again with every input before `run`; a node asking for more than
        the device holds is refused then, not left to fail while allocating."""
        return None

    def run(self, inputs: Any, ctx: RunContext) -> NodeOutputs:
        raise NotImplementedError(f"{type(self).__name__}.run")

    @classmethod
    def description(cls) -> str:
        return " ".join((cls.__doc__ or "").split())

    @classmethod
    def specs(cls) -> NodeSpec:
        cached = cls.__dict__.get("_specs")
        if cached is None:
            cached = NodeSpec(cls)
            cls._specs = cached
        return cached


class NodeSpec:
    """The inputs and outputs of a node class, derived once from its declarations."""

    def __init__(self, node_class: type[Node]) -> None:
        self.node_class = node_class
        self.inputs: dict[str, InputSpec] = {
            name: _input_spec(name, info) for name, info in node_class.Inputs.model_fields.items()
        }
        self.outputs: dict[str, OutputSpec] = {
            name: OutputSpec(name, socket_type_of(info.rebuild_annotation()), info.description or "")
            for name, info in node_class.Outputs.model_fields.items()
        }

    @cached_property
    def socket_types(self) -> list[SocketType]:
        return [s.socket_type for s in self.inputs.values()] + [s.socket_type for s in self.outputs.values()]

    def to_json(self) -> dict[str, Any]:
        cls = self.node_class
        return {
            "type": cls.type_name,
            "display_name": cls.display_name,
            "category": cls.category,
            "description": cls.description(),
            "version": cls.version,
            "output_node": cls.output_node,
            "deprecated": cls.deprecated,
            "inputs": {name: spec.to_json() for name, spec in self.inputs.items()},
            "outputs": {name: spec.to_json() for name, spec in self.outputs.items()},
        }

