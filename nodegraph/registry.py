"""The node types and socket types one engine knows, and where each came from."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .node import Node
from .types import SocketType, TypeRegistry

if TYPE_CHECKING:
    from .importers import Importer


class DuplicateNodeType(ValueError):
    """A pack defines a node type that another pack already defined."""

    def __init__(self, type_name: str, first_pack: str, second_pack: str) -> None:
        super().__init__(
            f"node type {type_name!r} is defined by both pack {first_pack!r} and pack {second_pack!r}"
        )
        self.type_name = type_name
        self.packs = (first_pack, second_pack)


class NodeRegistry:
    """Node classes by type name, the socket types they use, and the pack each came from."""

    def __init__(self) -> None:
        self.types = TypeRegistry()
        self._nodes: dict[str, type[Node]] = {}
        self._pack_of: dict[str, str] = {}
        self._importers: list[Importer] = []
        # Our node type -> other tools' names for it, from the importers (see nodegraph.importers).
        self._aliases: dict[str, set[str]] = {}
        # Counts the packs added: a plan compiled against an older generation is not reused.
        self.generation = 0

    def add_pack(self, pack: str, nodes: Iterable[type[Node]], socket_types: Iterable[SocketType] = (),
                 importers: Iterable[Importer] = ()) -> None:
        """Add all of a pack's nodes (and importers of foreign workflow formats, see
        nodegraph.importers), or none of them if any name is taken."""
        from .importers import check_importer, importer_aliases  # importers -> validation -> registry

        importers = list(importers)
        importer_names = {importer.name for importer in self._importers}
        aliases: list[dict[str, list[str]]] = []
        for importer in importers:
            try:
                check_importer(importer)
                aliases.append(importer_aliases(importer))
            except TypeError as error:
                raise TypeError(f"pack {pack!r}: {error}") from None
            if importer.name in importer_names:
                raise ValueError(f"pack {pack!r}: an importer named {importer.name!r} is already registered")
            importer_names.add(importer.name)
        nodes = list(nodes)
        seen: dict[str, type[Node]] = {}
        for node_class in nodes:
            if not (isinstance(node_class, type) and issubclass(node_class, Node)):
                raise TypeError(f"pack {pack!r} lists {node_class!r}, which is not a Node subclass")
            name = node_class.type_name
            if name in self._nodes:
                raise DuplicateNodeType(name, self._pack_of[name], pack)
            if name in seen:
                raise DuplicateNodeType(name, pack, pack)
            seen[name] = node_class
        new_types = list(socket_types)
        for node_class in nodes:
            new_types.extend(node_class.specs().socket_types)
        for socket_type in new_types:
            self.types.register(socket_type)
        for name, node_class in seen.items():
            self._nodes[name] = node_class
            self._pack_of[name] = pack
        self._importers.extend(importers)
        for found in aliases:
            for type_name, names in found.items():
                self._aliases.setdefault(type_name, set()).update(names)
        self.generation += 1

    @property
    def importers(self) -> list[Importer]:
        return list(self._importers)

    def import_document(self, document: Any) -> tuple[Any, str | None]:
        """A decoded workflow document in our format: foreign formats a pack can import are
        converted. Returns (document, name of the importer used or None); raises
        WorkflowImportError (a WorkflowInvalid) when a foreign document cannot be converted."""
        from .importers import import_document  # importers -> validation -> registry

        return import_document(self._importers, document)

    def get(self, type_name: str) -> type[Node] | None:
        return self._nodes.get(type_name)

    def pack_of(self, type_name: str) -> str:
        return self._pack_of[type_name]

    def aliases(self, type_name: str) -> list[str]:
        """Other tools' names for a node type (from the importers of every pack), sorted."""
        return sorted(self._aliases.get(type_name, ()), key=str.lower)

    def closest(self, type_name: str, n: int = 3) -> list[str]:
        """Known type names that look like `type_name`, best first."""
        by_lower = {name.lower(): name for name in self._nodes}
        matches = difflib.get_close_matches(type_name.lower(), list(by_lower), n=n, cutoff=0.5)
        return [by_lower[m] for m in matches]

    def __iter__(self) -> Iterator[type[Node]]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def catalogue(self) -> dict[str, Any]:
        """Every node type with its inputs and outputs, the pack it came from and other tools' names for
        it (`aliases`), and every socket type: what UIs draw from."""
        return {
            "nodes": {
                name: {**cls.specs().to_json(), "pack": self._pack_of[name], "aliases": self.aliases(name)}
                for name, cls in sorted(self._nodes.items())
            },
            "types": {
                t.name: {"description": t.description, "color": t.color, "accepts": list(t.accepts)}
                for t in self.types
            },
        }
