"""Weight files as detection and loading see them: safetensors, pickled torch files read safely, diffusers folders.

- ``.safetensors``: header parsed first (detection needs no tensor data), tensors mapped from the
  file (:mod:`.safetensors_io`).
- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: only through ``torch.load(weights_only=True, mmap=True)``;
  a pickle that would run code is refused (:class:`UnsafeCheckpointError`) and nothing in it runs.
- diffusers folders (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, optionally
  ``scheduler/``, each with ``config.json`` and weights) appear as one file with keys ``<subfolder>/<key>``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from .safetensors_io import CheckpointError, SafetensorsFile


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call code to load; refused, nothing in it was run."""



PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFile(Protocol):
    """What detection and loading need from a weight file."""

    path: Path

    @property
    def metadata(self) -> dict[str, str]: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dtypes(self) -> dict[str, torch.dtype]: ...

    def tensor(self, name: str) -> Tensor: ...


class TorchPickleFile:
    """A torch.save file read with ``weights_only=True`` and ``mmap=True``: tensors and plain data only.

    Lightning-style ``{"state_dict": {...}, "global_step": N, ...}`` files are unwrapped; plain
    scalars beside the state dict are kept in :attr:`extras`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(
                self.path,
                "not a zip-format torch file (legacy pre-1.6 torch.save format, or not a torch file at all); "
                "only zip-format files can be memory-mapped and checked for code. Convert it to .safetensors.",
            )
        try:
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                self.path,
                "refused to unpickle: the file needs code beyond tensors and plain data to load "
                f"(torch.load weights_only said: {_first_line(exc)}). Nothing in it was run. If you trust "
                "its source, convert it to .safetensors in an isolated environment.",
            ) from None
        except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(self.path, f"cannot read as a torch file (truncated or corrupt?): {_first_line(exc)}") from exc
        state_dict = loaded
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            state_dict = loaded["state_dict"]
        if not isinstance(state_dict, dict):
            raise CheckpointError(self.path, f"holds a {type(state_dict).__name__}, expected a dict of tensors")
        self._tensors: dict[str, Tensor] = {}
        self.extras: dict[str, object] = {}
        for key, value in state_dict.items():
            if isinstance(value, Tensor):
                self._tensors[str(key)] = value
            else:
                self.extras[str(key)] = value
        if loaded is not state_dict and isinstance(loaded, dict):
            self.extras.update({k: v for k, v in loaded.items() if k != "state_dict" and isinstance(v, (int, float, str))})
        if not self._tensors:
            raise CheckpointError(self.path, "holds no tensors")

    @property
    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.extras.items() if isinstance(v, (int, float, str))}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self._tensors.items()}

    def tensor(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {name!r}") from None


class ShapeOnlyWeights:
    """Names, shapes and dtypes without data: detect and build models on the meta device from a
    header or a manifest (to check a layout, or to see what a load would allocate)."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        dtypes: Mapping[str, torch.dtype] | None = None,
        path: str | os.PathLike[str] = "<shapes>",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._dtypes = {k: (dtypes or {}).get(k, torch.float32) for k in self._shapes}
        self._metadata = dict(metadata or {})

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, torch.dtype]:
        return dict(self._dtypes)

    def tensor(self, name: str) -> Tensor:
        if name not in self._shapes:
            raise CheckpointError(self.path, f"no tensor named {name!r}")
        return torch.empty(self._shapes[name], dtype=self._dtypes[name], device="meta")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_weights(path: str | os.PathLike[str]) -> WeightFile:
    """Open one weight file by its suffix (not a folder: see :func:`detect` / :func:`load_checkpoint`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a folder; expected a single weight file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchPickleFile(path)
    raise CheckpointError(
        path, f"unknown weight file type {suffix!r}; expected {SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}"
    )


DIFFUSERS_SUBFOLDERS = (
    "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "controlnet",
)
_DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


class DiffusersFolder:
    """A diffusers-format folder seen as one weight file with keys ``<subfolder>/<key>``.

    Each subfolder's weights are one file or a sharded set (``*.safetensors.index.json``).
    A folder that is itself one model (``config.json`` + weights, e.g. a VAE or ControlNet
    folder) appears under the subfolder name ``.``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.configs: dict[str, dict] = {}
        self._files: dict[str, list[WeightFile]] = {}
        self._owner: dict[str, WeightFile] = {}
        subfolders = [s for s in DIFFUSERS_SUBFOLDERS if (self.path / s).is_dir()]
        if not subfolders and (self.path / "config.json").is_file():
            subfolders = ["."]
        if not subfolders:
            raise CheckpointError(
                self.path, f"is a folder but not in diffusers format (no {', '.join(DIFFUSERS_SUBFOLDERS)} subfolder or config.json)"
            )
        for sub in subfolders:
            folder = self.path / sub
            self.configs[sub] = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
            files = [open_weights(p) for p in _diffusers_weight_files(folder)]
            self._files[sub] = files
            for f in files:
                for key in f.shapes():
                    self._owner[f"{sub}/{key}"] = f
        scheduler = self.path / "scheduler" / "scheduler_config.json"
        self.scheduler_config: dict = _read_json(scheduler) if scheduler.is_file() else {}

    @property
    def subfolders(self) -> list[str]:
        return list(self._files)

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{sub}/{key}": shape for sub, files in self._files.items() for f in files for key, shape in f.shapes().items()
        }

    def dtypes(self) -> dict[str, torch.dtype]:
        return {f"{sub}/{key}": dt for sub, files in self._files.items() for f in files for key, dt in f.dtypes().items()}

    def tensor(self, name: str) -> Tensor:
        owner = self._owner.get(name)
        if owner is None:
            raise CheckpointError(self.path, f"no tensor named {name!r}")
        return owner.tensor(name.split("/", 1)[1])

    def release(self, name: str) -> None:
        owner = self._owner.get(name)
        if isinstance(owner, SafetensorsFile):
            owner.release(name.split("/", 1)[1])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON, or an integer too long to convert
        raise CheckpointError(path, f"unreadable JSON: {exc}") from exc
    except RecursionError:
        raise CheckpointError(path, "unreadable JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def _diffusers_weight_files(folder: Path) -> list[Path]:
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(index, "has no weight_map object")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(index, f"names shard files that do not exist: {missing}")
            return [folder / s for s in shards]
    for name in _DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(folder, f"has no weight file (looked for {', '.join(_DIFFUSERS_WEIGHT_NAMES)})")
