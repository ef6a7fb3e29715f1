"""Read `.safetensors` files: parse and validate the header alone, then map tensors from the file without copying."""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import reprlib
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The format's own cap: a larger header is a sign of a corrupt length field, not a real file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file; offsets are relative to the start of the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a safetensors file: tensor layout and free-form string metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate only the header of `path`; no tensor data is touched.

    Raises CheckpointError naming the file for: a file too short for the length prefix, a header
    length past the end of the file, a header that is not a JSON object, an unknown dtype, a shape
    that does not match its byte range, and data offsets past the end of the file or overlapping.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"not a safetensors file: {file_size} bytes is too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise CheckpointError(
                    path,
                    f"truncated or not a safetensors file: header length {header_len} runs past the end of the file "
                    f"({file_size} bytes)",
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file: {exc.strerror or exc}") from exc

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an integer too long to convert
        raise CheckpointError(path, f"header is not valid UTF-8 JSON: {exc}") from exc
    except RecursionError:
        raise CheckpointError(path, "header is not a safetensors header: JSON nested too deeply to read") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"header is a JSON {type(header).__name__}, expected an object")

    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise CheckpointError(path, "header __metadata__ is not an object of strings")
    metadata = {str(k): str(v) for k, v in metadata_raw.items()}

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_size)
    _check_no_overlap(path, tensors)
    return SafetensorsHeader(path, tensors, metadata, data_start, file_size)


def _parse_entry(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(
            path, f"tensor {name!r}: header entry needs dtype, shape and data_offsets, got {reprlib.repr(entry)}")
    dtype_name = entry["dtype"]
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            path, f"tensor {name!r}: unknown dtype {dtype_name!r} (known: {', '.join(SAFETENSORS_DTYPES)})"
        )
    dtype = SAFETENSORS_DTYPES[dtype_name]
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(path, f"tensor {name!r}: shape {reprlib.repr(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise CheckpointError(
            path, f"tensor {name!r}: data_offsets {reprlib.repr(offsets)} is not a pair of non-negative integers")
    begin, end = offsets
    expected_bytes = math.prod(shape) * dtype.itemsize
    if end - begin != expected_bytes:
        raise CheckpointError(
            path,
            f"tensor {name!r}: shape {shape} of {dtype_name} needs {expected_bytes} bytes, data_offsets {offsets} give {end - begin}",
        )
    if end > data_size:
        raise CheckpointError(
            path,
            f"truncated file: tensor {name!r} data_offsets {offsets} run past the end of the data section "
            f"({data_size} bytes)",
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    previous: TensorInfo | None = None
    for info in sorted((t for t in tensors.values() if t.end > t.begin), key=lambda t: t.begin):
        if previous is not None and info.begin < previous.end:
            raise CheckpointError(path, f"tensors {previous.name!r} and {info.name!r} overlap in the data section")
        previous = info


class SafetensorsFile:
    """A safetensors file opened for reading: `shapes()` from the header, `tensor(name)` from a private mmap.

    Tensors share memory with the mapping (copy-on-write: writing to one never changes the file), so
    reading a tensor costs no copy and pages are only brought in when the data is used.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.header = read_safetensors_header(path)
        self.path = self.header.path
        self._mmap: mmap.mmap | None = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.header.tensors.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: info.dtype for name, info in self.header.tensors.items()}

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, a view into the mapped file."""
        info = self.header.tensors.get(name)
        if info is None:
            raise CheckpointError(self.path, f"no tensor named {name!r}")
        numel = math.prod(info.shape)
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(
            self._mapping(), dtype=info.dtype, count=numel, offset=self.header.data_start + info.begin
        )
        return flat.view(info.shape)

    def _mapping(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY gives writable, private pages: torch wants a writable buffer, and the file stays untouched.
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if len(mapping) != self.header.file_size:
                raise CheckpointError(
                    self.path, f"file changed size while open ({self.header.file_size} -> {len(mapping)} bytes)"
                )
            self._mmap = mapping
        return self._mmap

    def release(self, name: str) -> None:
        """Drop the mapped pages that lie wholly inside tensor `name` from memory.

        For callers that copied the tensor elsewhere (another dtype or device): the pages were
        never written, so a later read of them simply faults them in from the file again.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.header.tensors[name]
        page = mmap.PAGESIZE
        start = -(-(self.header.data_start + info.begin) // page) * page
        stop = (self.header.data_start + info.end) // page * page
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in the file, each a view into the mapping."""
        return {name: self.tensor(name) for name in self.header.tensors}
