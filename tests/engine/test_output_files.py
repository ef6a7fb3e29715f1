"""Writing output files: numbered names that never overwrite, and never a write outside the output folder."""

from __future__ import annotations

import pytest

from nodegraph.files import OutputPathRefused, write_numbered


def test_numbered_names_in_subfolders(tmp_path):
    first = write_numbered(tmp_path, "portraits/face", ".txt", b"1")
    second = write_numbered(tmp_path, "portraits/face", ".txt", b"2")
    assert [first.relative_to(tmp_path).as_posix(), second.relative_to(tmp_path).as_posix()] == [
        "portraits/face_00001.txt", "portraits/face_00002.txt"]
    assert write_numbered(tmp_path, "../../escape", ".txt", b"3") == tmp_path / "escape_00001.txt"


def test_no_output_is_written_through_a_symlinked_subfolder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    for prefix in ("link/face", "link/new/deeper/face"):
        with pytest.raises(OutputPathRefused, match="outside the output folder"):
            write_numbered(out, prefix, ".txt", b"x")
    assert list(elsewhere.iterdir()) == []  # not even a folder was made there
    # A link to a folder inside the output folder is fine.
    (out / "inner").mkdir()
    (out / "alias").symlink_to(out / "inner", target_is_directory=True)
    assert write_numbered(out, "alias/face", ".txt", b"x") == out / "alias" / "face_00001.txt"
    assert (out / "inner" / "face_00001.txt").read_bytes() == b"x"
