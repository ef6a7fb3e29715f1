"""End to end: headless Chromium opens the built editor on a real `nodegraph serve`, loads the
txt2img workflow, changes the prompt, runs it and sees the generated image appear on the page.

Needs the system Chromium (apt `chromium`) and the built editor (`npm run build` in web/). Without
them the test is skipped, unless NODEGRAPH_E2E=required (CI sets it), when it fails instead.
Screenshots go to $NODEGRAPH_ARTIFACTS (default: the test's tmp folder).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from _browser import Browser, find_chromium

ROOT = Path(__file__).resolve().parents[2]
EDITOR_DIR = ROOT / "web" / "dist"
PICTURE_PACKS = ROOT / "tests" / "server" / "packs"
PICTURE_WORKFLOW = Path(__file__).resolve().parent / "picture_txt2img.json"
REQUIRED = os.environ.get("NODEGRAPH_E2E") == "required"

pytestmark = pytest.mark.slow


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if REQUIRED:
            pytest.fail(f"NODEGRAPH_E2E=required but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def server(tmp_path):
    """A real server on loopback with the picture test pack and the txt2img workflow saved."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    shutil.copy(PICTURE_WORKFLOW, workflows / "txt2img.json")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "nodegraph", "serve", "--port", str(port), "--db", str(tmp_path / "runs.sqlite"),
         "--nodes-dir", str(PICTURE_PACKS), "--workflows-dir", str(workflows), "--inputs-dir",
         str(tmp_path / "inputs"), "--output-dir", str(tmp_path / "outputs"), "--editor-dir", str(EDITOR_DIR),
         "--device", "cpu"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # importing every pack (torch) is slow on a busy machine
    while True:
        try:
            _get_json(f"{base}/api/health")
            break
        except OSError:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
    try:
        yield base, tmp_path
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.asyncio
async def test_editor_runs_the_txt2img_workflow(server, tmp_path):
    chromium = find_chromium()
    _need(chromium is not None, "no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    _need((EDITOR_DIR / "index.html").is_file(), "the editor is not built (npm ci && npm run build in web/)")
    base, workdir = server
    artifacts = Path(os.environ.get("NODEGRAPH_ARTIFACTS") or tmp_path / "artifacts")
    prompt = "a yellow star over a green hill"

    async with Browser(chromium, tmp_path / "profile") as page:
        await page.goto(f"{base}/")
        await page.wait_for("document.querySelector('[data-testid=palette-PromptPicture]') !== null",
                            what="the palette built from the catalogue")
        # The palette lists every catalogue type with its description as a tooltip.
        tooltip = await page.evaluate("document.querySelector('[data-testid=palette-PromptPicture]').title")
        assert tooltip.startswith("Draws the prompt")

        # Load the default txt2img workflow from the server's workflows folder.
        await page.wait_for("[...document.querySelectorAll('[data-testid=open-saved] option')]"
                            ".some(o => o.value === 'txt2img.json')", what="the saved workflow list")
        await page.evaluate("(() => { const s = document.querySelector('[data-testid=open-saved]');"
                            " s.value = 'txt2img.json'; s.dispatchEvent(new Event('change', {bubbles: true})); })()")
        await page.wait_for("document.querySelector('[data-testid=input-draw-prompt]') !== null", what="the graph")
        assert await page.evaluate("document.querySelectorAll('.react-flow__edge').length") == 2

        await page.type_into("[data-testid=input-draw-prompt]", prompt)
        assert await page.evaluate("document.querySelector('[data-testid=input-draw-prompt]').value") == prompt
        await page.click("[data-testid=run]")

        # Step previews show on the drawing node while it runs, then the saved image on the save node.
        await page.wait_for("document.querySelector('[data-testid=media-draw][data-kind=preview]') !== null",
                            what="a step preview")
        await page.wait_for("document.querySelector('[data-testid=node-draw][data-status=running]') !== null"
                            " || document.querySelector('[data-testid=node-draw][data-status=executed]') !== null",
                            what="the running node highlighted")
        await page.screenshot(artifacts / "editor-running.png")
        src = await page.wait_for(
            "(() => { const i = document.querySelector('[data-testid=media-save][data-kind=image]');"
            " return i && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null; })()",
            timeout=60, what="the generated image")
        await page.wait_for("document.querySelector('[data-testid^=run-][data-status=succeeded]') !== null",
                            what="the run marked succeeded in the queue panel")
        await page.screenshot(artifacts / "editor.png")

    # The image on the page is the one the run made from the changed prompt.
    with urllib.request.urlopen(f"{base}{src}", timeout=5) as response:
        picture = Image.open(io.BytesIO(response.read()))
    assert picture.size == (256, 192)
    digest = hashlib.sha256(f"7:{prompt}".encode()).digest()
    assert picture.convert("RGB").getpixel((255, 191)) == (digest[0], digest[1], digest[2])
    runs = _get_json(f"{base}/api/runs")["runs"]
    assert [run["status"] for run in runs] == ["succeeded"]
    assert list((workdir / "outputs").glob("txt2img_*.png"))
    assert (artifacts / "editor.png").stat().st_size > 10_000
