"""Node pack discovery: Python entry points (group `nodegraph.nodes`) and pack directories.

A pack is a module (or package) with `NODES`, a list of Node classes, and optionally `TYPES`,
a list of SocketType objects it introduces, and `IMPORTERS`, converters of other tools' workflow
formats (see nodegraph.importers). Built-in packs load the same way as third-party ones.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable

from .registry import DuplicateNodeType, NodeRegistry

ENTRY_POINT_GROUP = "nodegraph.nodes"
DEFAULT_NODES_DIR = Path("custom_nodes")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackProblem:
    """A pack that was skipped, and why."""

    pack: str
    source: str
    error: str

    def __str__(self) -> str:
        return f"node pack {self.pack!r} ({self.source}) was not loaded: {self.error}"


class PackError(Exception):
    """A pack module does not follow the pack contract."""


def _register_module(registry: NodeRegistry, pack: str, module: ModuleType) -> None:
    nodes = getattr(module, "NODES", None)
    if nodes is None:
        raise PackError("the module defines no NODES list")
    registry.add_pack(pack, nodes, getattr(module, "TYPES", ()), getattr(module, "IMPORTERS", ()))


def _import_directory_pack(path: Path) -> ModuleType:
    """Import a pack from `dir/__init__.py` or a single `.py` file, under a unique module name."""
    is_package = path.is_dir()
    init = path / "__init__.py" if is_package else path
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"nodegraph_packs.{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, init, submodule_search_locations=[str(path)] if is_package else None
    )
    if spec is None or spec.loader is None:
        raise PackError(f"cannot import {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _directory_packs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    packs = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if (entry.is_dir() and (entry / "__init__.py").is_file()) or entry.suffix == ".py":
            packs.append(entry)
    return packs


def _describe(error: BaseException) -> str:
    if isinstance(error, (PackError, DuplicateNodeType)):
        return str(error)
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
    return f"{type(error).__name__}: {error}{where}"


def load_packs(
    registry: NodeRegistry,
    nodes_dirs: Iterable[Path] = (DEFAULT_NODES_DIR,),
    entry_points: bool = True,
) -> list[PackProblem]:
    """Load every pack found; a pack that fails is reported and skipped, the others load."""
    problems: list[PackProblem] = []
    if entry_points:
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            source = f"entry point {entry_point.value}"
            try:
                loaded = entry_point.load()
                if not isinstance(loaded, ModuleType):
                    raise PackError(f"entry point must name a module, got {type(loaded).__name__}")
                _register_module(registry, entry_point.name, loaded)
            except Exception as error:  # a broken pack must not stop the others
                problems.append(PackProblem(entry_point.name, source, _describe(error)))
    for directory in nodes_dirs:
        for path in _directory_packs(Path(directory)):
            try:
                _register_module(registry, path.stem, _import_directory_pack(path))
            except Exception as error:  # a broken pack must not stop the others
                problems.append(PackProblem(path.stem, str(path), _describe(error)))
    for problem in problems:
        log.warning("%s", problem)
    return problems


def build_registry(nodes_dirs: Iterable[Path] = (DEFAULT_NODES_DIR,), entry_points: bool = True
                   ) -> tuple[NodeRegistry, list[PackProblem]]:
    """A registry with every discoverable pack loaded, and the packs that failed."""
    registry = NodeRegistry()
    return registry, load_packs(registry, nodes_dirs, entry_points)
