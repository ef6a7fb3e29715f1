"""Tests for textual-inversion file loading and lookup by name (nodegraph_diffusion.text.embeddings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nodegraph_diffusion.text.embeddings import (
    EmbeddingFolder,
    EmbeddingFormatError,
    EmbeddingNotFoundError,
    load_embedding,
)


class NotPlainData:
    """Pickling this needs code from this module: torch.load(weights_only=True) must refuse it."""

    def __init__(self) -> None:
        self.vectors = torch.zeros(1, 4)


def test_a1111_safetensors(tmp_path: Path) -> None:
    vectors = torch.randn(4, 768)
    save_file({"emb_params": vectors}, tmp_path / "style.safetensors")
    loaded = load_embedding(tmp_path / "style.safetensors")
    assert torch.equal(loaded, vectors)


def test_a1111_pt(tmp_path: Path) -> None:
    vectors = torch.randn(2, 768, dtype=torch.float16)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vectors)},
            "name": "style",
            "step": 3000,
            "sd_checkpoint": "abc123",
            "sd_checkpoint_name": "v1-5",
        },
        tmp_path / "style.pt",
    )
    loaded = load_embedding(tmp_path / "style.pt")
    assert loaded.dtype == torch.float16 and not loaded.requires_grad
    assert torch.equal(loaded, vectors)


def test_diffusers_learned_embeds(tmp_path: Path) -> None:
    vector = torch.randn(768)
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": vector}, tmp_path / "learned_embeds.safetensors")
    for name in ("learned_embeds.bin", "learned_embeds.safetensors"):
        loaded = load_embedding(tmp_path / name)
        assert loaded.shape == (1, 768) and torch.equal(loaded[0], vector)


def test_sdxl_per_encoder_vectors(tmp_path: Path) -> None:
    clip_l, clip_g = torch.randn(3, 768), torch.randn(3, 1280)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xl.safetensors")
    assert torch.equal(load_embedding(tmp_path / "xl.safetensors", encoder="clip_l"), clip_l)
    assert torch.equal(load_embedding(tmp_path / "xl.safetensors", encoder="clip_g"), clip_g)
    with pytest.raises(EmbeddingFormatError, match=r"xl\.safetensors: holds vectors for clip_l, clip_g; need which"):
        load_embedding(tmp_path / "xl.safetensors")
    save_file({"clip_g": clip_g}, tmp_path / "g_only.safetensors")
    assert torch.equal(load_embedding(tmp_path / "g_only.safetensors"), clip_g)
    with pytest.raises(EmbeddingFormatError, match="holds vectors for clip_g; need vectors for 'clip_l'"):
        load_embedding(tmp_path / "g_only.safetensors", encoder="clip_l")


def test_single_set_ignores_encoder(tmp_path: Path) -> None:
    vectors = torch.randn(2, 768)
    save_file({"emb_params": vectors}, tmp_path / "sd1.safetensors")
    assert torch.equal(load_embedding(tmp_path / "sd1.safetensors", encoder="clip_g"), vectors)


def test_loaded_vectors_own_their_memory(tmp_path: Path) -> None:
    vectors = torch.randn(2, 8)
    save_file({"emb_params": vectors}, tmp_path / "e.safetensors")
    loaded = load_embedding(tmp_path / "e.safetensors")
    loaded += 1  # must not need the file's mapping
    assert torch.allclose(loaded, vectors + 1)
    assert torch.equal(load_embedding(tmp_path / "e.safetensors"), vectors)


def test_unknown_layouts_are_refused(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingFormatError, match=r"two\.safetensors: not a textual-inversion layout.*found a, b"):
        load_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": torch.zeros(2, 3, 4)}, tmp_path / "3d.safetensors")
    with pytest.raises(EmbeddingFormatError, match=r"float \(N, W\) tensor, got torch.float32 \(2, 3, 4\)"):
        load_embedding(tmp_path / "3d.safetensors")
    save_file({"emb_params": torch.zeros(2, 4, dtype=torch.int64)}, tmp_path / "ints.safetensors")
    with pytest.raises(EmbeddingFormatError, match="float"):
        load_embedding(tmp_path / "ints.safetensors")
    (tmp_path / "style.png").write_bytes(b"\x89PNG")
    with pytest.raises(EmbeddingFormatError, match="unknown embedding file type '.png'"):
        load_embedding(tmp_path / "style.png")
    with pytest.raises(EmbeddingFormatError, match="no such file"):
        load_embedding(tmp_path / "absent.pt")


def test_pickles_needing_code_are_refused(tmp_path: Path) -> None:
    torch.save({"string_to_param": {"*": NotPlainData()}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingFormatError, match=r"evil\.pt: refused to unpickle.*Nothing in it was run"):
        load_embedding(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EmbeddingFormatError, match=r"junk\.pt"):
        load_embedding(tmp_path / "junk.pt")


# --------------------------------------------------------------------------- EmbeddingFolder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    save_file({"emb_params": torch.full((2, 8), 1.0)}, tmp_path / "style.safetensors")
    torch.save({"string_to_param": {"*": torch.full((1, 8), 2.0)}}, tmp_path / "style.pt")
    torch.save({"string_to_param": {"*": torch.full((3, 8), 3.0)}}, tmp_path / "Bad-Hands.pt")
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": torch.full((1, 8), 4.0)}, tmp_path / "sub" / "deep.safetensors")
    save_file({"clip_l": torch.full((1, 8), 5.0), "clip_g": torch.full((1, 12), 6.0)}, tmp_path / "xl.safetensors")
    return tmp_path


def test_folder_finds_names(folder: Path) -> None:
    lookup = EmbeddingFolder(folder)
    assert lookup.find("style") == folder / "style.safetensors"  # .safetensors before .pt
    assert lookup.find("style.pt") == folder / "style.pt"
    assert lookup.find("sub/deep") == folder / "sub" / "deep.safetensors"
    assert lookup.find("bad-hands") == folder / "Bad-Hands.pt"  # case differs
    assert torch.equal(lookup("style.pt"), torch.full((1, 8), 2.0))
    assert lookup("bad-hands").shape == (3, 8)


def test_folder_not_found_names_folder_and_tries(folder: Path) -> None:
    lookup = EmbeddingFolder(folder)
    with pytest.raises(EmbeddingNotFoundError) as caught:
        lookup("missing")
    message = str(caught.value)
    assert "'missing'" in message and str(folder) in message
    assert "missing.safetensors, missing.pt, missing.bin" in message
    assert caught.value.name == "missing"
    for outside in ("../style", "/etc/passwd", "sub/../../style"):
        with pytest.raises(EmbeddingNotFoundError, match="relative paths inside the folder"):
            lookup(outside)


def test_folders_are_searched_in_order(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    second = tmp_path_factory.mktemp("more-embeddings")
    save_file({"emb_params": torch.full((1, 8), 8.0)}, second / "only-here.safetensors")
    save_file({"emb_params": torch.full((1, 8), 9.0)}, second / "style.safetensors")
    lookup = EmbeddingFolder([folder, second])
    assert lookup.find("only-here") == second / "only-here.safetensors"
    assert lookup.find("style") == folder / "style.safetensors"  # the first folder holding the name wins
    assert lookup.find("ONLY-HERE") == second / "only-here.safetensors"
    with pytest.raises(EmbeddingNotFoundError) as caught:
        lookup("missing")
    assert f"{folder}, {second}" in str(caught.value)


def test_folder_encoder_and_width(folder: Path) -> None:
    assert torch.equal(EmbeddingFolder(folder, encoder="clip_g", width=12)("xl"), torch.full((1, 12), 6.0))
    assert torch.equal(EmbeddingFolder(folder, encoder="clip_l", width=8)("xl"), torch.full((1, 8), 5.0))
    with pytest.raises(EmbeddingFormatError, match="vectors are 8 wide but the text encoder is 12 wide"):
        EmbeddingFolder(folder, encoder="clip_g", width=12)("style")


def test_folder_reloads_changed_file(folder: Path) -> None:
    lookup = EmbeddingFolder(folder)
    first = lookup("sub/deep")
    assert lookup("sub/deep") is first
    path = folder / "sub" / "deep.safetensors"
    save_file({"emb_params": torch.full((1, 8), 7.0)}, path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert torch.equal(lookup("sub/deep"), torch.full((1, 8), 7.0))
