"""The output cache: byte accounting that counts shared buffers once, LRU eviction."""

from __future__ import annotations

import torch

from nodegraph.cache import CacheEntry, OutputCache, estimate_nbytes


def test_tensor_views_and_shared_weights_count_once():
    weight = torch.zeros(1000, dtype=torch.float32)
    module = torch.nn.Linear(10, 10)
    value = {"a": weight, "view": weight[:10], "module": module, "again": module}
    expected = 4000 + module.weight.untyped_storage().nbytes() + module.bias.untyped_storage().nbytes()
    assert expected <= estimate_nbytes(value) < expected + 2000


def test_buffer_held_by_two_entries_counts_once_until_both_are_gone():
    cache = OutputCache(max_bytes=10**9)
    data = bytearray(100_000)
    cache.put("loader", CacheEntry.of({"model": data}))
    alone = cache.total_bytes
    cache.put("patched", CacheEntry.of({"model": data, "extra": 1}))
    assert cache.total_bytes < alone + 1000
    cache.max_bytes = 50_000
    cache.put("small", CacheEntry.of(1))
    assert "loader" not in cache and "patched" not in cache
    assert cache.total_bytes < 1000


def test_newest_entry_is_kept_even_when_larger_than_the_bound():
    cache = OutputCache(max_bytes=10_000)
    cache.put("big", CacheEntry.of(bytearray(50_000)))
    assert "big" in cache
    cache.put("other", CacheEntry.of(bytearray(50_000)))
    assert "big" not in cache and "other" in cache
    assert cache.stats()["evictions"] == 1


def test_get_refreshes_recency():
    cache = OutputCache(max_bytes=25_000)
    cache.put("a", CacheEntry.of(bytearray(10_000)))
    cache.put("b", CacheEntry.of(bytearray(10_000)))
    assert cache.get("a") is not None
    cache.put("c", CacheEntry.of(bytearray(10_000)))
    assert "a" in cache and "b" not in cache and "c" in cache
