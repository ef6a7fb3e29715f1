"""Textual-inversion embeddings: read their vectors from A1111, diffusers and SDXL files, and find them by name in a folder.

File layouts read (``.safetensors`` through :class:`safetensors_io.SafetensorsFile`; ``.pt`` /
``.bin`` through ``torch.load(weights_only=True)``, which refuses pickles that need code):

- A1111 safetensors: ``emb_params`` (N, W).
- A1111 ``.pt``: ``{"string_to_param": {"*": (N, W)}, "string_to_token": ..., "name": ..., ...}``.
- SDXL: ``clip_l`` (N, 768) and ``clip_g`` (N, 1280), one set of vectors per text encoder.
- diffusers ``learned_embeds.(bin|safetensors)``: one tensor named after its placeholder token,
  (W,) or (N, W).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from ..weights.safetensors_io import CheckpointError, SafetensorsFile

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_ENCODER_KEYS = ("clip_l", "clip_g")

# name -> (N, W) vectors: a plain mapping, or a callable such as EmbeddingFolder.
EmbeddingLookup = Callable[[str], Tensor] | Mapping[str, Tensor]


class EmbeddingNotFoundError(LookupError):
    """A prompt names an embedding that the lookup does not have; says where it looked."""

    def __init__(self, name: str, searched: str) -> None:
        self.name = name
        self.searched = searched
        super().__init__(f"embedding {name!r} not found in {searched}")


class EmbeddingFormatError(CheckpointError):
    """A file that does not hold textual-inversion vectors in a layout we know (names the file and keys)."""


def load_embedding(path: str | os.PathLike[str], encoder: str | None = None) -> Tensor:
    """Read the vectors of one textual-inversion file -> (N, W), in the file's dtype, on the CPU.

    encoder: which vectors to take from a file holding one set per text encoder (SDXL:
    ``"clip_l"`` or ``"clip_g"``); ignored for files with a single set.
    """
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFormatError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        weights = SafetensorsFile(path)
        tensors = {name: weights.tensor(name) for name in weights.keys()}
    elif suffix in (".pt", ".bin"):
        tensors = _torch_file_tensors(path)
    else:
        expected = ", ".join(EMBEDDING_SUFFIXES)
        raise EmbeddingFormatError(path, f"unknown embedding file type {suffix!r}; expected one of {expected}")
    vectors = _pick_vectors(tensors, encoder, path)
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise EmbeddingFormatError(
            path, f"embedding vectors must be a float (N, W) tensor, got {vectors.dtype} {tuple(vectors.shape)}"
        )
    return vectors.detach().clone()  # own the memory: the file's mapping may go away


def _torch_file_tensors(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EmbeddingFormatError(
            path,
            f"refused to unpickle: the file needs code beyond tensors and plain data to load ({reason}). "
            "Nothing in it was run; convert it to .safetensors if you trust its source.",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise EmbeddingFormatError(path, f"cannot read as a torch file (truncated or corrupt?): {exc}") from exc
    if isinstance(loaded, Tensor):
        return {"<tensor>": loaded}
    if not isinstance(loaded, dict):
        raise EmbeddingFormatError(path, f"holds a {type(loaded).__name__}, expected a dict of tensors")
    string_to_param = loaded.get("string_to_param")
    if isinstance(string_to_param, dict):
        return {f"string_to_param.{k}": v for k, v in string_to_param.items() if isinstance(v, Tensor)}
    return {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)}


def _pick_vectors(tensors: Mapping[str, Tensor], encoder: str | None, path: Path) -> Tensor:
    keys = sorted(tensors)
    if "emb_params" in tensors:
        return tensors["emb_params"]
    per_encoder = [k for k in SDXL_ENCODER_KEYS if k in tensors]
    if per_encoder:
        if encoder in per_encoder:
            return tensors[encoder]
        if encoder is None and len(per_encoder) == 1:
            return tensors[per_encoder[0]]
        if encoder is None:
            wanted = "which text encoder's vectors to use (encoder='clip_l' or 'clip_g')"
        else:
            wanted = f"vectors for {encoder!r}"
        raise EmbeddingFormatError(path, f"holds vectors for {', '.join(per_encoder)}; need {wanted}")
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "") if keys else "no tensors"
    raise EmbeddingFormatError(
        path,
        f"not a textual-inversion layout: expected 'emb_params', 'string_to_param', 'clip_l'/'clip_g' "
        f"or a single tensor, found {shown}",
    )


class EmbeddingFolder:
    """Finds embeddings by name in one or more folders and loads them (cached until the file changes).

    A name is a file name relative to a folder, with or without its suffix (``name``,
    ``name.pt``, ``sub/name``); without one, ``.safetensors``, ``.pt`` and ``.bin`` are tried in
    that order, then the same ignoring case. Folders are searched in the order given, each
    completely before the next. width: the text encoder's width; vectors of another width (an
    embedding made for another model) are an error.
    """

    def __init__(self, folders: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], encoder: str | None = None,
                 width: int | None = None) -> None:
        self.folders = ([Path(folders)] if isinstance(folders, (str, os.PathLike))
                        else [Path(folder) for folder in folders])
        self.encoder = encoder
        self.width = width
        self._cache: dict[Path, tuple[int, Tensor]] = {}

    def _where(self) -> str:
        return ", ".join(str(folder) for folder in self.folders)

    def find(self, name: str) -> Path:
        """The file `name` refers to; raises EmbeddingNotFoundError naming the folders and the names tried."""
        relative = PurePosixPath(name.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise EmbeddingNotFoundError(name, f"{self._where()} (names must be relative paths inside the folder)")
        has_suffix = relative.suffix.lower() in EMBEDDING_SUFFIXES
        candidates = [relative] if has_suffix else [relative.with_name(relative.name + s) for s in EMBEDDING_SUFFIXES]
        for folder in self.folders:
            for candidate in candidates:
                path = folder.joinpath(*candidate.parts)
                if path.is_file():
                    return path
            for candidate in candidates:
                path = self._find_ignoring_case(folder, candidate)
                if path is not None:
                    return path
        tried = ", ".join(str(c) for c in candidates)
        raise EmbeddingNotFoundError(name, f"{self._where()} (tried {tried})")

    @staticmethod
    def _find_ignoring_case(folder: Path, candidate: PurePosixPath) -> Path | None:
        directory = folder.joinpath(*candidate.parts[:-1])
        if not directory.is_dir():
            return None
        matches = sorted(p for p in directory.iterdir() if p.name.lower() == candidate.name.lower() and p.is_file())
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise EmbeddingNotFoundError(str(candidate), f"{directory}: ambiguous, several files differ only in case: {names}")
        return matches[0] if matches else None

    def __call__(self, name: str) -> Tensor:
        """name -> vectors (N, W)."""
        path = self.find(name)
        stamp = path.stat().st_mtime_ns
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        vectors = load_embedding(path, self.encoder)
        if self.width is not None and vectors.shape[1] != self.width:
            raise EmbeddingFormatError(
                path,
                f"vectors are {vectors.shape[1]} wide but the text encoder is {self.width} wide "
                "(an embedding trained for another model family?)",
            )
        logger.debug("loaded embedding %s: %d vector(s) of width %d", path, vectors.shape[0], vectors.shape[1])
        self._cache[path] = (stamp, vectors)
        return vectors
