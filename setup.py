"""Build hook: a wheel carries the built browser editor (web/dist) as package data of nodegraph.server
(nodegraph/server/editor), so that `pip install` serves the editor with no npm on the user's machine.
Everything else about the package is in pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

EDITOR_BUILD = Path(__file__).resolve().parent / "web" / "dist"
PACKAGED_EDITOR = ("nodegraph", "server", "editor")  # nodegraph.server.app.PACKAGED_EDITOR_DIR


class BuildPyWithEditor(build_py):
    """build_py, then the built editor copied in. An editable install serves web/dist where it is."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        if not (EDITOR_BUILD / "index.html").is_file():
            raise SetupError(f"{EDITOR_BUILD} is not built, and a wheel must carry the editor: run `make editor` "
                             "(npm ci && npm run build in web/) first")
        target = Path(self.build_lib, *PACKAGED_EDITOR)
        shutil.rmtree(target, ignore_errors=True)  # no stale assets from an earlier build
        shutil.copytree(EDITOR_BUILD, target)


setup(cmdclass={"build_py": BuildPyWithEditor})
