"""Fixtures of the editor's end-to-end tests."""

from __future__ import annotations

import shutil

import pytest
from _browser import find_chromium
from _editor import (
    EDITOR_DIR,
    PICTURE_PACKS,
    PICTURE_WORKFLOW,
    need,
    start_server,
    stop,
)


@pytest.fixture(scope="session")
def picture_server(tmp_path_factory):
    """A server with the picture pack and the picture txt2img workflow, shared by the tests of this folder."""
    chromium = find_chromium()
    need(chromium is not None, "no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    need((EDITOR_DIR / "index.html").is_file(), "the editor is not built (npm ci && npm run build in web/)")
    folder = tmp_path_factory.mktemp("picture_server")
    workflows = folder / "workflows"
    workflows.mkdir()
    shutil.copy(PICTURE_WORKFLOW, workflows / "txt2img.json")
    base, process = start_server(folder, workflows, PICTURE_PACKS)
    yield chromium, base
    stop(process)
