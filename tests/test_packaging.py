"""The wheel: it carries every package of the project (pyproject lists packages explicitly, their
folders mapped, so a new subpackage must be added there) and the built editor, which it serves
once installed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in parts:
                found.add(".".join((package, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


EDITOR_BUILD = ROOT / "web" / "dist"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, deadline: float, server: subprocess.Popen) -> tuple[bytes, str]:
    """The body and content type at `url`, waiting (until `deadline`) for the server to listen."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read(), response.headers.get_content_type()
        except urllib.error.URLError as error:
            if isinstance(error, urllib.error.HTTPError):
                raise
            assert server.poll() is None, f"nodegraph serve exited: {server.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "nodegraph serve did not start"
            time.sleep(0.1)


@pytest.mark.slow
def test_wheel_serves_the_editor_without_npm_or_the_checkout(tmp_path: Path) -> None:
    """`python -m build` (source distribution, then the wheel from it) carries the built editor; the
    wheel installed into a fresh venv serves it from the installed package."""
    if not (EDITOR_BUILD / "index.html").is_file():
        pytest.skip("web/dist is not built (make editor), and the wheel must carry it")
    import build  # noqa: F401  (the test extra; the error names it if it is missing)

    dist = tmp_path / "dist"
    # No isolation: the build requirements (setuptools) are those of this environment, nothing is downloaded.
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [wheel] = dist.glob("nodegraph-*.whl")
    expected = {f"nodegraph/server/editor/{path.relative_to(EDITOR_BUILD).as_posix()}"
                for path in EDITOR_BUILD.rglob("*") if path.is_file()}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert expected <= names and "nodegraph/server/editor/index.html" in expected

    # A venv of its own, without this checkout: the wheel installed without its dependencies, which
    # come from this environment's site-packages (no torch download), added after the venv's own.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = site_packages / "nodegraph" / "server" / "editor" / "index.html"
    assert installed.read_bytes() == (EDITOR_BUILD / "index.html").read_bytes()

    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    workdir = tmp_path / "elsewhere"  # not the checkout: nothing there to serve by accident
    workdir.mkdir()
    server = subprocess.Popen([str(venv / "bin" / "nodegraph"), "serve", "--port", str(port), "--device", "cpu",
                               "--db", str(workdir / "runs.sqlite")], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # the packs import torch on a busy machine
        page, kind = _get(f"http://127.0.0.1:{port}/", deadline, server)
        assert kind == "text/html" and page == (EDITOR_BUILD / "index.html").read_bytes()
        script = re.search(rb'<script[^>]+src="(/assets/[^"]+\.js)"', page)
        assert script is not None, page[:500]
        code, kind = _get(f"http://127.0.0.1:{port}{script.group(1).decode()}", deadline, server)
        assert kind in ("application/javascript", "text/javascript")
        assert code == (EDITOR_BUILD / script.group(1).decode().lstrip("/")).read_bytes()
        # The running server is the installed one.
        where = subprocess.run([str(python), "-c", "import nodegraph.server.app as app; print(app.EDITOR_DIR)"],
                               capture_output=True, text=True, env=env, cwd=workdir, check=True).stdout.strip()
        assert Path(where) == installed.parent
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
