"""Fixtures for engine tests: a registry holding the counting test pack."""

from __future__ import annotations

import pytest

import counting_pack
from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.registry import NodeRegistry


@pytest.fixture
def registry() -> NodeRegistry:
    registry = NodeRegistry()
    registry.add_pack("counting", counting_pack.NODES)
    return registry


@pytest.fixture
def runs():
    counting_pack.RUNS.clear()
    return counting_pack.RUNS


@pytest.fixture
def executor(registry, tmp_path, runs) -> Executor:
    return Executor(registry, OutputCache(max_bytes=10**9), device="cpu", output_dir=tmp_path / "out")

