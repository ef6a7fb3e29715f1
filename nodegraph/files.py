"""Writing output files safely: atomic replace, and numbered names that never overwrite."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_SAFE_PREFIX = re.compile(r"[^A-Za-z0-9._-]+")
_NUMBERED = re.compile(r"(?P<prefix>.+)_\d{5,}(?P<suffix>\.[^./]+)")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputPathRefused(ValueError):
    """An output would be written outside its output folder (through a symlinked subfolder)."""


def _check_inside(folder: Path, directory: Path, prefix: str) -> None:
    resolved = folder.resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise OutputPathRefused(f"output prefix {prefix!r}: {folder} leads through a symlink to {resolved}, outside "
                                f"the output folder {directory}; outputs are written inside it only")


def write_numbered(directory: Path, prefix: str, suffix: str, data: bytes) -> Path:
    """Write to `directory/prefix_00001suffix`, taking the first free number; never overwrites.

    `prefix` may name subfolders (`portraits/face`); it cannot leave `directory`, neither by its
    name nor through a subfolder that is a symlink to elsewhere (OutputPathRefused).
    """
    parts = [_SAFE_PREFIX.sub("_", part) for part in Path(prefix).parts if part not in ("", ".", "..", "/")]
    parts = [part for part in parts if part.strip("._")] or ["output"]
    folder = directory.joinpath(*parts[:-1])
    _check_inside(folder, directory, prefix)  # before creating folders through a link, and after
    folder.mkdir(parents=True, exist_ok=True)
    _check_inside(folder, directory, prefix)
    stem = parts[-1]
    number = 1 + max((int(m.group(1)) for p in folder.glob(f"{stem}_*{suffix}")
                      if (m := re.fullmatch(re.escape(stem) + r"_(\d+)" + re.escape(suffix), p.name))), default=0)
    while True:
        path = folder / f"{stem}_{number:05d}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails if the name was taken meanwhile: no overwrite, ever
            return path
        except FileExistsError:
            number += 1
        finally:
            Path(tmp).unlink(missing_ok=True)


def numbered_parts(relative: str) -> tuple[str, str] | None:
    """The prefix and suffix `write_numbered` made a relative path from (`sub/face_00003.png` ->
    `("sub/face", ".png")`), so the file can be numbered again in another folder; None for other names."""
    match = _NUMBERED.fullmatch(relative)
    return (match["prefix"], match["suffix"]) if match else None
