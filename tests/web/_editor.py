"""Shared by the editor's end-to-end tests: a real `nodegraph serve` on loopback, and the editor opened
in headless Chromium on it (see _browser.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _browser import Page

ROOT = Path(__file__).resolve().parents[2]
EDITOR_DIR = ROOT / "web" / "dist"
PICTURE_PACKS = ROOT / "tests" / "server" / "packs"
PICTURE_WORKFLOW = Path(__file__).resolve().parent / "picture_txt2img.json"
REQUIRED = os.environ.get("NODEGRAPH_E2E") == "required"


def need(condition: bool, reason: str) -> None:
    if not condition:
        if REQUIRED:
            pytest.fail(f"NODEGRAPH_E2E=required but {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def http_status(url: str, method: str = "GET") -> int:
    """The status of a request with no body (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def unavailable_choices(workflow: dict, catalogue: dict) -> list[str]:
    """Literal inputs whose value is not among the server's current choices (a model not installed)."""
    missing = []
    for node_id, node in workflow["nodes"].items():
        spec = catalogue["nodes"].get(node["type"])
        if spec is None:
            missing.append(f"{node_id}: node type {node['type']}")
            continue
        for name, value in node["inputs"].items():
            choices = spec["inputs"].get(name, {}).get("choices")
            if choices is not None and not isinstance(value, dict) and value not in choices:
                missing.append(f"{node_id}.{name} = {value!r}")
    return missing


def start_server(folder: Path, workflows: Path, nodes_dir: Path | None) -> tuple[str, subprocess.Popen]:
    """A real server on loopback with its files under `folder`; returns its base address and process."""
    port = free_port()
    command = [sys.executable, "-m", "nodegraph", "serve", "--port", str(port),
               "--db", str(folder / "runs.sqlite"), "--workflows-dir", str(workflows),
               "--inputs-dir", str(folder / "inputs"), "--output-dir", str(folder / "outputs"),
               "--editor-dir", str(EDITOR_DIR), "--device", "cpu"]
    if nodes_dir is not None:
        command += ["--nodes-dir", str(nodes_dir)]
    # The server runs in a scratch folder; the repository's models (the demo model) are its models root.
    env = {**os.environ, "NODEGRAPH_MODELS": str(ROOT / "models")}
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # importing every pack (torch) is slow on a busy machine
    while True:
        try:
            get_json(f"{base}/api/health")
            return base, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                raise AssertionError(f"server did not start: {process.communicate()[1]}")
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


async def open_saved(page: Page, name: str) -> None:
    """Open a workflow from the server's folder, and wait until the editor has loaded it."""
    await page.wait_for(f"[...document.querySelectorAll('[data-testid=open-saved] option')]"
                        f".some(o => o.value === {json.dumps(name)})", what="the saved workflow list")
    loads = int(await page.evaluate("document.querySelector('.editor').dataset.loads"))
    await page.evaluate("(() => { const s = document.querySelector('[data-testid=open-saved]');"
                        f" s.value = {json.dumps(name)}; s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()")
    await page.wait_for(f"Number(document.querySelector('.editor').dataset.loads) > {loads}", what=f"{name} loaded")


def text_of(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)})?.value"


async def open_editor(page: Page, base: str, workflow: str | None = "txt2img.json") -> None:
    """Load the editor, and open a saved workflow once its links are drawn."""
    await page.goto(f"{base}/")
    await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to start")
    if workflow is not None:
        await open_saved(page, workflow)
        await page.wait_for("document.querySelectorAll('.react-flow__edge').length === 2", what="the links drawn")


def stored_input(node: str, name: str) -> str:
    """An expression for an input's value in the graph the editor keeps (local storage)."""
    return (f"JSON.parse(localStorage.getItem('nodegraph.graph')).workflow.nodes[{json.dumps(node)}]"
            f".inputs[{json.dumps(name)}]")
