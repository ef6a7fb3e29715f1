"""Workflow documents of other tools: the importer contract a pack implements to convert them into
ours, and the error an import that cannot be done raises.

A pack lists its importers in `IMPORTERS`. An importer has a `name` (shown to users, e.g.
"ComfyUI API format"), `detect(document) -> bool` (is this decoded JSON document in my format?)
and `convert(document) -> dict` (a version-1 workflow document). `convert` raises
WorkflowImportError with every reason the document cannot be converted at once.

An importer may also have `aliases() -> {our node type: [names]}`: the names its format gives the
node types it converts into ours. The catalogue lists them as each node's `aliases`, so that a user
of that tool finds our node by the name they know.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from .validation import ValidationIssue, WorkflowInvalid

UNSUPPORTED_NODE_TYPES = "unsupported_node_types"


@runtime_checkable
class Importer(Protocol):
    """Converts documents of one foreign format into workflow documents."""

    name: str

    def detect(self, document: Any) -> bool: ...

    def convert(self, document: Any) -> dict[str, Any]: ...


class WorkflowImportError(WorkflowInvalid):
    """A foreign document that cannot be converted. `unsupported_types` maps each node type with no
    counterpart here to the ids of the nodes that use it; `issues` also name each node and input
    that cannot be mapped. Being a WorkflowInvalid, it is reported like any invalid workflow."""

    def __init__(self, importer: str, unsupported_types: dict[str, list[str]] | None = None,
                 issues: Iterable[ValidationIssue] = ()) -> None:
        self.importer = importer
        self.unsupported_types = dict(sorted((unsupported_types or {}).items()))
        all_issues = list(issues)
        if self.unsupported_types:
            listed = ", ".join(f"{name} ({'node' if len(ids) == 1 else 'nodes'} {', '.join(ids)})"
                               for name, ids in self.unsupported_types.items())
            # Every node is named in the details, so a client can mark each; a single one is the issue's node.
            node_ids = [node_id for ids in self.unsupported_types.values() for node_id in ids]
            all_issues.insert(0, ValidationIssue(
                UNSUPPORTED_NODE_TYPES, f"{importer}: node types with no counterpart here: {listed}",
                node_ids[0] if len(node_ids) == 1 else None,
                details={"importer": importer, "types": self.unsupported_types, "node_ids": node_ids}))
        if not all_issues:
            raise ValueError("WorkflowImportError needs at least one unsupported type or issue")
        super().__init__(all_issues)


def is_native(document: Any) -> bool:
    """Whether a decoded document is (an old or current version of) our own format."""
    return isinstance(document, dict) and isinstance(document.get("nodes"), dict)


def check_importer(importer: Any) -> None:
    """Raise TypeError naming what is missing if `importer` does not follow the importer contract."""
    name = getattr(importer, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"importer {importer!r} has no `name` string")
    for method in ("detect", "convert"):
        if not callable(getattr(importer, method, None)):
            raise TypeError(f"importer {name!r} has no `{method}(document)` method")
    if hasattr(importer, "aliases") and not callable(importer.aliases):
        raise TypeError(f"importer {name!r} has an `aliases` that is not a method")


def importer_aliases(importer: Importer) -> dict[str, list[str]]:
    """Our node type -> the names the importer's format gives it (empty for an importer without
    `aliases`). Raises TypeError naming the importer if `aliases()` returns anything but a mapping
    of type names to lists of names."""
    method = getattr(importer, "aliases", None)
    if method is None:
        return {}
    found = method()
    expected = "a mapping of node type names to lists of names"
    if not isinstance(found, Mapping):
        raise TypeError(f"importer {importer.name!r}: aliases() returned {type(found).__name__}, expected {expected}")
    aliases: dict[str, list[str]] = {}
    for node_type, names in found.items():
        if not isinstance(node_type, str) or isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"importer {importer.name!r}: aliases() gave {node_type!r}: {names!r}, expected {expected}")
        names = list(names)
        if not all(isinstance(alias, str) and alias for alias in names):
            raise TypeError(f"importer {importer.name!r}: aliases() of {node_type!r} are {names!r}, "
                            "expected non-empty strings")
        aliases[node_type] = names
    return aliases


def import_document(importers: Iterable[Importer], document: Any) -> tuple[Any, str | None]:
    """Convert a decoded document with the first importer that recognises it.

    Returns (document, importer name); a document in our own format, or one no importer
    recognises, comes back unchanged with None (validation then says what is wrong with it).
    """
    if is_native(document):
        return document, None
    for importer in importers:
        if importer.detect(document):
            return importer.convert(document), importer.name
    return document, None
