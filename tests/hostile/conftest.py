"""Fixtures of the hostile-input suite: the server test pack and app, and a live server on a thread."""

from __future__ import annotations

import pytest

from hostile_fixtures import LiveServer, fuzz_registry  # first: it puts the server and engine test helpers on the path
from _server_fixtures import counting_registry, make_client_factory
from nodegraph.cache import OutputCache
from nodegraph.server import create_app


@pytest.fixture
def registry():
    return counting_registry()


@pytest.fixture
def make_client(aiohttp_client, registry, tmp_path):
    return make_client_factory(aiohttp_client, registry, tmp_path)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    app = create_app(fuzz_registry(), folder / "runs.sqlite", output_dir=folder / "out", device="cpu",
                     cache=OutputCache(max_bytes=10**8), inputs_dir=folder / "inputs",
                     workflows_dir=folder / "workflows", editor_dir=folder / "editor")
    server = LiveServer(app)
    yield server
    server.stop()
