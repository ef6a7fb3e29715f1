"""Shared pieces of the server tests: an app on the counting test pack, run helpers, a picture pack."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import counting_pack  # noqa: E402
from counting_pack import doc, link  # noqa: E402
from nodegraph.cache import OutputCache  # noqa: E402
from nodegraph.registry import NodeRegistry  # noqa: E402
from nodegraph.server import create_app  # noqa: E402

PICTURE_PACK_DIR = Path(__file__).resolve().parent / "packs"
SUM = doc(a=("Value", {"value": 2}), b=("Add", {"a": link("a", "value"), "b": 3}),
          out=("Sink", {"value": link("b", "sum")}))

# A two-node picture graph (3 steps with previews, one saved image) from the picture pack.
PICTURE_WORKFLOW = {"version": 1, "nodes": {
    "draw": {"type": "PromptPicture", "inputs": {"prompt": "a blue square", "steps": 3, "width": 64, "height": 48}},
    "save": {"type": "SavePicture", "inputs": {"image": {"from": "draw", "output": "image"}}}}}
__all__ = ["PICTURE_PACK_DIR", "PICTURE_WORKFLOW", "SUM", "counting_pack", "doc", "link", "make_client_factory", "submit",
           "wait_status"]


def counting_registry() -> NodeRegistry:
    counting_pack.RUNS.clear()
    registry = NodeRegistry()
    registry.add_pack("counting", counting_pack.NODES)
    return registry


def make_client_factory(aiohttp_client, registry: NodeRegistry, tmp_path: Path):
    """`await make(db=None, **create_app options)` -> a test client on a fresh app."""
    async def make(db: Path | None = None, **options):
        options.setdefault("inputs_dir", tmp_path / "inputs")
        options.setdefault("workflows_dir", tmp_path / "workflows")
        options.setdefault("editor_dir", tmp_path / "editor")
        app = create_app(registry, db or tmp_path / "runs.sqlite", output_dir=tmp_path / "out", device="cpu",
                         cache=OutputCache(max_bytes=10**8), **options)
        return await aiohttp_client(app)
    return make


async def wait_status(client, run_id: str, statuses: tuple[str, ...], timeout: float = 5.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get(f"/api/runs/{run_id}")
        run = await response.json()
        if run["status"] in statuses:
            return run
        assert asyncio.get_running_loop().time() < deadline, f"run stayed {run['status']}"
        await asyncio.sleep(0.02)


async def submit(client, workflow: dict, **extra) -> str:
    response = await client.post("/api/runs", json={"workflow": workflow, **extra})
    assert response.status == 201, await response.text()
    return (await response.json())["id"]


@pytest.fixture
def registry() -> NodeRegistry:
    return counting_registry()


@pytest.fixture
def make_client(aiohttp_client, registry, tmp_path):
    return make_client_factory(aiohttp_client, registry, tmp_path)
