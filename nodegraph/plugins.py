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
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from .registry import DuplicateNodeType, NodeRegistry

ENTRY_POINT_GROUP = "nodegraph.nodes"
DEFAULT_NODES_DIR = Path("custom_nodes")
IMPORT_TIMEOUT_ENV = "NODEGRAPH_PACK_IMPORT_TIMEOUT"
DEFAULT_IMPORT_TIMEOUT = 300.0
"""Seconds a pack may take to import (the diffusion pack imports torch: tens of seconds on a busy
machine) before it is reported as hanging and start-up goes on without it."""

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


class PackImportTimeout(PackError):
    """A pack did not finish importing within the time limit."""


def import_timeout() -> float:
    """The time limit on importing one pack: $NODEGRAPH_PACK_IMPORT_TIMEOUT seconds, else the default."""
    text = os.environ.get(IMPORT_TIMEOUT_ENV)
    if not text:
        return DEFAULT_IMPORT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also NaN
        log.warning("$%s must be a number of seconds above 0, got %r; using %g s", IMPORT_TIMEOUT_ENV, text,
                    DEFAULT_IMPORT_TIMEOUT)
        return DEFAULT_IMPORT_TIMEOUT
    return seconds


def _import_within(load: Callable[[], object], what: str, timeout: float) -> object:
    """`load()` on a thread of its own, waited for at most `timeout` seconds.

    A pack's top-level code runs here: whatever it raises, SystemExit and KeyboardInterrupt
    included, is raised as an ordinary exception for its pack alone; one that never returns is
    left behind on its (daemon) thread, and the others load.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = load()
        except BaseException as error:  # noqa: B036 - a pack's sys.exit() must not end the server
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"nodegraph-import-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise PackImportTimeout(f"importing did not finish within {timeout:g} s (it may wait for input or loop "
                                f"forever); the pack was skipped. Set ${IMPORT_TIMEOUT_ENV} to allow longer")
    error = outcome.get("error")
    if isinstance(error, (SystemExit, KeyboardInterrupt, GeneratorExit)):
        raise PackError(f"the pack raised {type(error).__name__}({error}) while importing") from error
    if error is not None:
        raise error
    return outcome["value"]


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
    timeout: float | None = None,
) -> list[PackProblem]:
    """Load every pack found; a pack that fails is reported and skipped, the others load.

    Each pack imports on a thread of its own within `timeout` seconds (default: import_timeout()),
    so neither a pack that calls sys.exit() nor one that hangs while importing stops start-up.
    """
    problems: list[PackProblem] = []
    limit = import_timeout() if timeout is None else timeout
    if entry_points:
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            source = f"entry point {entry_point.value}"
            try:
                loaded = _import_within(entry_point.load, entry_point.name, limit)
                if not isinstance(loaded, ModuleType):
                    raise PackError(f"entry point must name a module, got {type(loaded).__name__}")
                _register_module(registry, entry_point.name, loaded)
            except Exception as error:  # a broken pack must not stop the others
                problems.append(PackProblem(entry_point.name, source, _describe(error)))
    for directory in nodes_dirs:
        for path in _directory_packs(Path(directory)):
            try:
                module = _import_within(lambda path=path: _import_directory_pack(path), path.stem, limit)
                _register_module(registry, path.stem, module)  # type: ignore[arg-type]
            except Exception as error:  # a broken pack must not stop the others
                problems.append(PackProblem(path.stem, str(path), _describe(error)))
    for problem in problems:
        log.warning("%s", problem)
    return problems


def build_registry(nodes_dirs: Iterable[Path] = (DEFAULT_NODES_DIR,), entry_points: bool = True,
                   timeout: float | None = None) -> tuple[NodeRegistry, list[PackProblem]]:
    """A registry with every discoverable pack loaded, and the packs that failed."""
    registry = NodeRegistry()
    return registry, load_packs(registry, nodes_dirs, entry_points, timeout)
