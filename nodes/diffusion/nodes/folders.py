"""Where model files and input images live: the model folders by kind, their configuration, safe name lookup.

Search order for model files (first match wins, lists are the union):
  1. roots in ``NODEGRAPH_MODELS`` (``os.pathsep``-separated),
  2. ``[models] roots`` and ``[models.folders]`` of the config file,
  3. ``./models``.
A root is a models directory laid out like ours, ComfyUI's or A1111's; see docs/models.md.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MODELS_ENV = "NODEGRAPH_MODELS"
INPUTS_ENV = "NODEGRAPH_INPUTS"
CONFIG_ENV = "NODEGRAPH_CONFIG"
LOCAL_CONFIG = "nodegraph.toml"

MODEL_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Subfolder names each kind goes by inside a models root: ours/ComfyUI's first, then A1111's.
# A1111 keeps embeddings beside `models/`, hence the `../embeddings`.
# Diffusion models without VAE or text encoders (SD3/Flux transformers, U-Nets) and text encoders
# on their own go where ComfyUI keeps them, under its current names first and its older ones
# (`unet`, `clip`) after; Forge's `text_encoder` too.
KIND_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints", "Stable-diffusion"),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip", "text_encoder"),
    "vae": ("vae", "VAE"),
    "loras": ("loras", "Lora", "LyCORIS"),
    "controlnet": ("controlnet", "ControlNet"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings", "../embeddings"),
    "hypernetworks": ("hypernetworks",),
    "gligen": ("gligen",),
    "photomaker": ("photomaker",),
}
MODEL_KINDS = tuple(KIND_SUBFOLDERS)
# ComfyUI's older kind names, accepted in the config file's [models.folders] table.
KIND_ALIASES = {"unet": "diffusion_models", "clip": "text_encoders"}

# A diffusers pipeline folder is one checkpoint, listed by its folder name.
_DIFFUSERS_MARKER = "model_index.json"


class ModelFolderError(ValueError):
    """A model or input file cannot be found or named: the message lists the folders searched."""


class FolderConfigError(ValueError):
    """The folder configuration (file or environment) is malformed; the message names where."""


@dataclass(frozen=True)
class FolderConfig:
    """The configured model roots, extra per-kind folders and the inputs folder."""

    roots: tuple[Path, ...] = ()
    extra: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    inputs: Path | None = None
    source: Path | None = None


def config_path() -> Path | None:
    """The config file in effect: ``$NODEGRAPH_CONFIG``, else ``./nodegraph.toml``, else
    ``$XDG_CONFIG_HOME/nodegraph/config.toml`` (``~/.config`` by default); None when none exists."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FolderConfigError(f"{CONFIG_ENV}={explicit!r} names no file")
        return path
    local = Path(LOCAL_CONFIG)
    if local.is_file():
        return local
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    user = config_home / "nodegraph" / "config.toml"
    return user if user.is_file() else None


def _paths(value: Any, where: str, base: Path) -> tuple[Path, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise FolderConfigError(f"{where}: expected a path or a list of paths, got {value!r}")
    # Relative paths in a config file are relative to the file, so it works from any directory.
    return tuple(base / Path(item).expanduser() for item in value)


def read_config(path: Path) -> FolderConfig:
    """Parse a config file (see docs/models.md); raises FolderConfigError naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise FolderConfigError(f"{path}: cannot read the folder configuration: {error}") from None
    base = path.parent
    unknown = set(data) - {"models", "inputs"}
    if unknown:
        raise FolderConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected [models] and [inputs]")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise FolderConfigError(f"{path}: 'models' must be a table")
    unknown = set(models) - {"roots", "folders"}
    if unknown:
        raise FolderConfigError(f"{path}: unknown key(s) {sorted(unknown)} in [models]; expected roots, folders")
    roots = _paths(models.get("roots", []), f"{path}: models.roots", base)
    folders = models.get("folders", {})
    if not isinstance(folders, dict):
        raise FolderConfigError(f"{path}: 'models.folders' must be a table of kind = path(s)")
    extra: dict[str, tuple[Path, ...]] = {}
    for name, value in folders.items():
        kind = KIND_ALIASES.get(name, name)
        if kind not in KIND_SUBFOLDERS:
            raise FolderConfigError(f"{path}: models.folders.{name}: unknown kind; "
                                    f"expected one of {', '.join(MODEL_KINDS)}")
        extra[kind] = extra.get(kind, ()) + _paths(value, f"{path}: models.folders.{name}", base)
    inputs_table = data.get("inputs", {})
    if not isinstance(inputs_table, dict) or set(inputs_table) - {"dir"}:
        raise FolderConfigError(f"{path}: [inputs] takes one key, dir")
    inputs = None
    if "dir" in inputs_table:
        (inputs,) = _paths(inputs_table["dir"], f"{path}: inputs.dir", base)
    return FolderConfig(roots, extra, inputs, path)


def current_config() -> FolderConfig:
    """The configuration in effect now (the file is re-read on every call, so edits apply at once)."""
    path = config_path()
    return read_config(path) if path is not None else FolderConfig()


def _environment_roots() -> list[Path]:
    return [Path(item).expanduser() for item in os.environ.get(MODELS_ENV, "").split(os.pathsep) if item]


def candidate_folders(kind: str) -> list[Path]:
    """Every folder that may hold files of `kind`, in search order, whether or not it exists."""
    if kind not in KIND_SUBFOLDERS:
        raise ModelFolderError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    config = current_config()
    folders = [root / sub for root in _environment_roots() for sub in KIND_SUBFOLDERS[kind]]
    folders.extend(root / sub for root in config.roots for sub in KIND_SUBFOLDERS[kind])
    folders.extend(config.extra.get(kind, ()))
    folders.extend(Path("models") / sub for sub in KIND_SUBFOLDERS[kind])
    return folders


def search_folders(kind: str) -> list[Path]:
    """The existing folders for `kind`, in search order, each once (case-insensitive file systems
    make `vae` and `VAE` one folder)."""
    found: list[Path] = []
    seen: set[Path] = set()
    for folder in candidate_folders(kind):
        if not folder.is_dir():
            continue
        real = folder.resolve()
        if real not in seen:
            seen.add(real)
            found.append(folder)
    return found


def _walk(folder: Path, suffixes: frozenset[str], diffusers_folders: bool) -> list[str]:
    names: list[str] = []
    visited: set[Path] = set()
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        here = Path(directory)
        real = here.resolve()
        if real in visited:  # a symlink loop
            subdirs.clear()
            continue
        visited.add(real)
        relative = here.relative_to(folder)
        if diffusers_folders and here != folder and (here / _DIFFUSERS_MARKER).is_file():
            names.append(relative.as_posix())
            subdirs.clear()
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                names.append((relative / name).as_posix())
    return names


def list_files(kind: str) -> list[str]:
    """Names (relative to their folder, `/`-separated, sorted) of the model files of `kind` in
    every folder; a name found in two folders is listed once (the first folder's file is used).
    Checkpoints also list diffusers pipeline folders (those holding model_index.json)."""
    names: set[str] = set()
    for folder in search_folders(kind):
        names.update(_walk(folder, MODEL_SUFFIXES, diffusers_folders=kind == "checkpoints"))
    return sorted(names)


def _relative_parts(name: str, what: str) -> tuple[str, ...]:
    """The parts of a relative name; refuses absolute paths and `..`, which would leave the folder."""
    if not name or "\x00" in name:
        raise ModelFolderError(f"{what}: empty or invalid name {name!r}")
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    if path.is_absolute() or (len(normalized) > 1 and normalized[1] == ":") or ".." in path.parts:
        raise ModelFolderError(f"{what}: {name!r} is not a name inside the folder "
                               "(absolute paths and '..' are refused)")
    return tuple(part for part in path.parts if part != ".")


def resolve(kind: str, name: str) -> Path:
    """The file (or diffusers folder, for checkpoints) called `name` in the first folder of `kind`
    that has it; raises ModelFolderError naming the kind and every folder searched.

    Only the name is checked for escapes: symlinks placed inside a model folder by its owner are
    followed, as model collections often link to other disks.
    """
    parts = _relative_parts(name, f"{kind} file")
    for folder in search_folders(kind):
        path = folder.joinpath(*parts)
        if path.is_file() or (kind == "checkpoints" and (path / _DIFFUSERS_MARKER).is_file()):
            return path
    raise ModelFolderError(missing_file_message(kind, name))


def missing_file_message(kind: str, name: str) -> str:
    """Why there is no `kind` file called `name`: the kind and every folder searched, or, when none
    of its folders exists, where they were looked for and how to point at a collection."""
    folders = search_folders(kind)
    if folders:
        return f"no {kind} file {name!r}; searched {', '.join(str(f.absolute()) for f in folders)}"
    candidates = ", ".join(str(f.absolute()) for f in candidate_folders(kind))
    return (f"no {kind} file {name!r}: no {kind} folder exists (looked for {candidates}); "
            f"set {MODELS_ENV} or a config file, see docs/models.md")


def inputs_dir() -> Path:
    """The folder input images are read from: ``$NODEGRAPH_INPUTS``, else ``[inputs] dir`` of the
    config file, else ``./inputs``. It need not exist."""
    explicit = os.environ.get(INPUTS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    configured = current_config().inputs
    return configured if configured is not None else Path("inputs")


def list_inputs() -> list[str]:
    """Names (relative, `/`-separated, sorted) of the image files in the inputs folder."""
    folder = inputs_dir()
    return sorted(_walk(folder, IMAGE_SUFFIXES, diffusers_folders=False)) if folder.is_dir() else []


def resolve_input(name: str) -> Path:
    """The input file called `name`; raises ModelFolderError naming the inputs folder."""
    parts = _relative_parts(name, "input file")
    folder = inputs_dir()
    path = folder.joinpath(*parts)
    if not path.is_file():
        raise ModelFolderError(f"no input file {name!r} in {folder.absolute()}")
    return path
