"""The cross-run output cache: content-addressed, least-recently-used, bounded in bytes."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

from pydantic import BaseModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 1024**3


def memory_parts(value: Any) -> dict[Hashable, int]:
    """The memory a value holds, as {identity of a buffer: bytes}.

    Tensors count by storage, so views and weights shared between models count once;
    modules by their parameters and buffers; arrays, images and byte strings by size. Small
    Python objects count under one ("misc", id) entry. Types the walk does not know can report
    their own size through `__sizeof__`.
    """
    parts: dict[Hashable, int] = {}
    misc = 0
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        # Plain values and node outputs first: most values are, and the probes below are slow on them.
        if isinstance(obj, (str, int, float, bool)):
            misc += sys.getsizeof(obj)
        elif isinstance(obj, BaseModel):
            stack.extend((getattr(obj, name), depth + 1) for name in type(obj).model_fields)
        elif hasattr(obj, "untyped_storage") and hasattr(obj, "element_size"):  # a torch tensor
            storage = obj.untyped_storage()
            if obj.device.type != "meta":
                parts[("storage", obj.device.type, storage.data_ptr())] = storage.nbytes()
        elif callable(getattr(obj, "parameters", None)) and callable(getattr(obj, "buffers", None)):  # nn.Module
            stack.extend((t, depth + 1) for t in obj.parameters())
            stack.extend((t, depth + 1) for t in obj.buffers())
        elif isinstance(getattr(obj, "nbytes", None), int):  # numpy array
            parts[("object", id(obj))] = obj.nbytes
        elif callable(getattr(obj, "getbands", None)) and hasattr(obj, "size"):  # PIL image
            width, height = obj.size
            parts[("object", id(obj))] = width * height * len(obj.getbands())
        elif isinstance(obj, (bytes, bytearray)) and len(obj) > 4096:
            parts[("object", id(obj))] = sys.getsizeof(obj)
        elif isinstance(obj, (str, bytes, bytearray, int, float, bool)) or depth > 6:
            misc += sys.getsizeof(obj)
        elif isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in obj)
        elif dataclasses.is_dataclass(obj):
            stack.extend((getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__") and type(obj).__sizeof__ is object.__sizeof__:
            stack.extend((v, depth + 1) for v in vars(obj).values())
        else:
            misc += sys.getsizeof(obj)
    parts[("misc", id(value))] = misc
    return parts


def estimate_nbytes(value: Any) -> int:
    """Total bytes of `memory_parts(value)`."""
    return sum(memory_parts(value).values())


@dataclass(frozen=True)
class CacheEntry:
    """A node's outputs, the files it reported, and the memory they hold (see memory_parts)."""

    outputs: Any
    files: tuple[str, ...]
    parts: dict[Hashable, int]

    @classmethod
    def of(cls, outputs: Any, files: tuple[str, ...] = ()) -> CacheEntry:
        return cls(outputs, files, memory_parts(outputs))


class OutputCache:
    """Node outputs by cache key, evicting the least recently used beyond `max_bytes`.

    A buffer shared by several entries (one model's weights in a loader's and a patcher's
    outputs, say) counts once. The newest entry is always kept, even when it alone exceeds the
    bound, so that a model larger than the bound still serves the run that loaded it.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._buffers: dict[Hashable, list[int]] = {}  # identity -> [entries holding it, bytes]
        self.total_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._release(old)
            self._entries[key] = entry
            for identity, nbytes in entry.parts.items():
                held = self._buffers.setdefault(identity, [0, nbytes])
                if held[0] == 0:
                    self.total_bytes += nbytes
                held[0] += 1
            while self.total_bytes > self.max_bytes and len(self._entries) > 1:
                evicted_key, evicted = self._entries.popitem(last=False)
                self._release(evicted)
                self.evictions += 1
                log.debug("evicted %s", evicted_key[:12])

    def _release(self, entry: CacheEntry) -> None:
        for identity in entry.parts:
            held = self._buffers[identity]
            held[0] -= 1
            if held[0] == 0:
                self.total_bytes -= held[1]
                del self._buffers[identity]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._buffers.clear()
            self.total_bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.total_bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
