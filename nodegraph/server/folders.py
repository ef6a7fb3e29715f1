"""The folders the server reads and writes files in, with the path checks that keep requests inside them."""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_UPLOAD_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; larger headers are refused before decoding

MAX_NAME_LENGTH = 120
"""Longest stored file name: well under every file system's limit (255 bytes), with room for `_12`."""
MAX_PATH_LENGTH = 1024
"""Longest relative path a download may name."""

_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


class PathRefused(ValueError):
    """A requested path would leave its folder (`..`, an absolute path, a symlink out, a hidden file)."""


class NotAFile(FileNotFoundError):
    """No regular file at a requested path inside a folder."""


class UploadRefused(ValueError):
    """An uploaded file is not an image we accept; the message says what was expected."""


@dataclass(frozen=True)
class ServedFolder:
    """One folder whose files the API may read (and, for inputs, write)."""

    name: str
    root: Path

    def resolve(self, relative: str) -> Path:
        """The file `relative` names inside the folder; raises PathRefused or NotAFile.

        Only plain relative paths are accepted: no `..` or `.` parts, no absolute or drive paths,
        no backslashes, no hidden names; and after following symlinks the file must still lie
        inside the folder under a name that is not hidden either, so a link cannot be used to
        read other files, nor hidden ones beside it.
        """
        if not relative or "\\" in relative or "\x00" in relative or ":" in relative:
            raise PathRefused(f"{self.name}: path {relative[:200]!r} is not a plain relative path")
        if len(relative) > MAX_PATH_LENGTH:
            raise PathRefused(f"{self.name}: path is {len(relative)} characters; at most {MAX_PATH_LENGTH} are served")
        parts = relative.split("/")
        if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            raise PathRefused(f"{self.name}: path {relative!r} leaves the folder or names a hidden file")
        root = self.root.resolve()
        try:
            target = root.joinpath(*parts).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise NotAFile(f"{self.name}: no file {relative!r}") from None
        except (OSError, RuntimeError) as error:  # a name too long for the file system, a symlink loop
            raise NotAFile(f"{self.name}: no file {relative!r} ({error.__class__.__name__})") from None
        if not _inside_and_visible(target, root):
            raise PathRefused(f"{self.name}: path {relative!r} points outside the folder or at a hidden file")
        if not target.is_file():
            raise NotAFile(f"{self.name}: {relative!r} is not a file")
        return target

    def relative(self, path: str | Path) -> str | None:
        """`path` relative to this folder in POSIX form, or None if it lies elsewhere."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None

    def list(self, suffixes: frozenset[str] | None = None) -> list[dict[str, object]]:
        """Every non-hidden file (with one of `suffixes`, if given), newest first: the files
        `resolve` serves, so a symlink to a place outside the folder or to a hidden file is not listed."""
        root = self.root.resolve()
        if not root.is_dir():
            return []
        found = []
        # os.walk does not follow symlinked folders: a link to a folder elsewhere is not walked into.
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            for name in names:
                path = Path(folder, name)
                relative = path.relative_to(root)
                if name.startswith("."):
                    continue
                if suffixes is not None and path.suffix.lower() not in suffixes:
                    continue
                try:
                    target = path.resolve(strict=True)
                    if not (_inside_and_visible(target, root) and target.is_file()):
                        continue
                    stat = target.stat()
                except (OSError, RuntimeError):  # a broken link, a loop, a file removed meanwhile
                    continue
                found.append({"name": relative.as_posix(), "size": stat.st_size, "modified": stat.st_mtime})
        found.sort(key=lambda item: (-float(item["modified"]), str(item["name"])))
        return found


def _inside_and_visible(target: Path, root: Path) -> bool:
    """Whether a resolved path lies inside the resolved `root` with no hidden part below it."""
    return target.is_relative_to(root) and not any(part.startswith(".") for part in target.relative_to(root).parts)


def safe_file_name(name: str, default_stem: str = "upload") -> str:
    """A file name made of letters, digits, `.`, `_` and `-` only, from a client-supplied name,
    at most MAX_NAME_LENGTH characters (the suffix kept when it is short)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    cleaned = _UNSAFE_NAME_CHARACTERS.sub("_", base).lstrip("._-")
    if len(cleaned) > MAX_NAME_LENGTH:
        stem, dot, suffix = cleaned.rpartition(".")
        suffix = f".{suffix}" if dot and stem and len(suffix) <= 10 else ""
        cleaned = cleaned[:MAX_NAME_LENGTH - len(suffix)] + suffix
    return cleaned or default_stem


def check_image(data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS) -> tuple[str, int, int]:
    """The format, width and height of an uploaded image; raises UploadRefused.

    The size in the header is checked before any pixel is decoded (decompression bombs), then
    the whole image is decoded once so a truncated or corrupt file is refused now, not in a run.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise UploadRefused(f"image format {image.format} is not accepted; "
                                        f"expected one of {', '.join(IMAGE_FORMATS)}")
                width, height = image.size
                if width * height > max_pixels:
                    raise UploadRefused(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
                image.load()
                return image.format, width, height
    except UploadRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UploadRefused(f"image refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # what pillow raises for unreadable data
        raise UploadRefused(f"not a readable image ({error}); expected one of {', '.join(IMAGE_FORMATS)}") from None


def store_upload(folder: ServedFolder, name: str, data: bytes, image_format: str) -> str:
    """Save an uploaded image under a safe, unused name (the same bytes reuse their file); returns the name."""
    stem = Path(safe_file_name(name)).stem or "upload"
    suffix = IMAGE_FORMATS[image_format]
    root = folder.root
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".upload.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        number = 0
        while True:
            candidate = root / (f"{stem}{suffix}" if number == 0 else f"{stem}_{number}{suffix}")
            try:
                os.link(tmp, candidate)  # never replaces a file another upload wrote
                return candidate.name
            except FileExistsError:
                if candidate.is_file() and candidate.read_bytes() == data:
                    return candidate.name
                number += 1
    finally:
        Path(tmp).unlink(missing_ok=True)
