"""The cross-run output cache: content-addressed, least-recently-used, bounded in bytes."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 1024**3


def estimate_nbytes(value: Any) -> int:
    """Estimate the memory held by a value: tensors, modules, arrays, images, containers.

    Objects referenced more than once are counted once. Types the estimate does not know can
    report their own size through `__sizeof__`.
    """
    seen: set[int] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if hasattr(obj, "element_size") and hasattr(obj, "numel"):  # a torch tensor
            total += obj.numel() * obj.element_size()
        elif callable(getattr(obj, "parameters", None)) and callable(getattr(obj, "buffers", None)):  # nn.Module
            stack.extend((t, depth + 1) for t in obj.parameters())
            stack.extend((t, depth + 1) for t in obj.buffers())
        elif isinstance(getattr(obj, "nbytes", None), int):  # numpy array
            total += obj.nbytes
        elif callable(getattr(obj, "getbands", None)) and hasattr(obj, "size"):  # PIL image
            width, height = obj.size
            total += width * height * len(obj.getbands())
        elif isinstance(obj, (str, bytes, bytearray, int, float, bool)):
            total += sys.getsizeof(obj)
        elif depth > 6:
            total += sys.getsizeof(obj)
        elif isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in obj)
        elif isinstance(obj, BaseModel):
            stack.extend((getattr(obj, name), depth + 1) for name in type(obj).model_fields)
        elif dataclasses.is_dataclass(obj):
            stack.extend((getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__") and type(obj).__sizeof__ is object.__sizeof__:
            stack.extend((v, depth + 1) for v in vars(obj).values())
        else:
            total += sys.getsizeof(obj)
    return total


@dataclass(frozen=True)
class CacheEntry:
    """A node's outputs, the files it reported, and their estimated size."""

    outputs: Any
    files: tuple[str, ...]
    nbytes: int


class OutputCache:
    """Node outputs by cache key, evicting the least recently used beyond `max_bytes`.

    The newest entry is always kept, even when it alone exceeds the bound, so that a model
    larger than the bound still serves the run that loaded it.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
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
                self.total_bytes -= old.nbytes
            self._entries[key] = entry
            self.total_bytes += entry.nbytes
            while self.total_bytes > self.max_bytes and len(self._entries) > 1:
                evicted_key, evicted = self._entries.popitem(last=False)
                self.total_bytes -= evicted.nbytes
                self.evictions += 1
                log.debug("evicted %s (%d bytes)", evicted_key[:12], evicted.nbytes)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total_bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.total_bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
