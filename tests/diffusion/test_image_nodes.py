"""The image nodes run through the real executor: pixel values, sizes, PNG round trips and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor, RunResult
from nodegraph.registry import NodeRegistry
from nodegraph.validation import WorkflowInvalid
from nodegraph_diffusion.nodes import folders, images


@pytest.fixture
def inputs_dir(tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    monkeypatch.delenv(folders.MODELS_ENV, raising=False)
    monkeypatch.delenv(folders.CONFIG_ENV, raising=False)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    monkeypatch.setenv(folders.INPUTS_ENV, str(pictures))
    return pictures


@pytest.fixture
def executor(tmp_path, inputs_dir) -> Executor:
    registry = NodeRegistry()
    registry.add_pack("images-test", images.NODES)
    return Executor(registry, OutputCache(max_bytes=10**8), device="cpu", output_dir=tmp_path / "out")


def write_png(folder: Path, name: str, pixels: np.ndarray, mode: str | None = None) -> Path:
    path = folder / name
    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(path)
    return path


def levels(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def document(nodes: dict[str, Any], ui: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": 1, "nodes": nodes, "ui": ui or {}}


def link(node: str, output: str) -> dict[str, str]:
    return {"from": node, "output": output}


def load(name: str) -> dict[str, Any]:
    return {"type": "LoadImage", "inputs": {"image": name}}


def run_ok(executor: Executor, nodes: dict[str, Any], outputs: list[str] | None = None, **kwargs: Any) -> RunResult:
    result = executor.run(document(nodes, **kwargs), outputs=outputs)
    assert result.status == "succeeded", result.error
    return result


def output(result: RunResult, node: str, name: str) -> torch.Tensor:
    return getattr(result.results[node].outputs, name)


# -- loading --

def test_load_image_gives_pixels_and_the_transparent_part_as_mask(executor, inputs_dir):
    rgba = levels(3, 5, 4)
    rgba[0, 0, 3], rgba[1, 2, 3], rgba[2, 4, 3] = 0, 255, 128
    write_png(inputs_dir, "cut.png", rgba, "RGBA")
    result = run_ok(executor, {"load": load("cut.png")}, outputs=["load"])
    image, mask = output(result, "load", "image"), output(result, "load", "mask")
    assert image.dtype == torch.float32 and image.shape == (1, 3, 5, 3) and mask.shape == (1, 3, 5)
    torch.testing.assert_close(image[0], torch.from_numpy(rgba[..., :3] / 255.0).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(mask[0], torch.from_numpy(1.0 - rgba[..., 3] / 255.0).float(), rtol=0, atol=1e-7)
    assert mask[0, 0, 0] == 1.0 and mask[0, 1, 2] == 0.0


def test_an_image_without_alpha_has_an_all_zero_mask_and_a_palette_transparency_counts(executor, inputs_dir):
    write_png(inputs_dir, "opaque.png", levels(4, 4, 3), "RGB")
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1, 1, 0])
    palette.save(inputs_dir / "palette.png", transparency=1)
    result = run_ok(executor, {"a": load("opaque.png"), "b": load("palette.png")}, outputs=["a", "b"])
    assert torch.equal(output(result, "a", "mask"), torch.zeros(1, 4, 4))
    assert output(result, "b", "mask")[0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert output(result, "b", "image")[0, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_load_image_reruns_only_when_the_file_changes(executor, inputs_dir):
    path = write_png(inputs_dir, "photo.png", levels(2, 2, 3, seed=1), "RGB")
    nodes = {"load": load("photo.png")}
    first = run_ok(executor, nodes, outputs=["load"])
    assert run_ok(executor, nodes, outputs=["load"]).cached == ["load"]
    replacement = levels(3, 3, 3, seed=2)
    write_png(inputs_dir, "photo.png", replacement, "RGB")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = run_ok(executor, nodes, outputs=["load"])
    assert third.executed == ["load"]
    assert output(first, "load", "image").shape == (1, 2, 2, 3)
    torch.testing.assert_close(output(third, "load", "image")[0], torch.from_numpy(replacement / 255.0).float())


@pytest.mark.parametrize("data", [b"this is not an image", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"])
def test_a_corrupt_image_fails_naming_the_node_the_input_and_the_file(executor, inputs_dir, data):
    (inputs_dir / "broken.png").write_bytes(data)
    result = executor.run(document({"photo": load("broken.png")}), outputs=["photo"])
    assert result.status == "failed"
    message = str(result.error)
    assert "'photo'" in message and "LoadImage" in message
    assert "input 'image'" in message and "broken.png" in message and "not a readable image" in message


def test_names_outside_the_inputs_folder_are_refused_before_anything_runs(executor, inputs_dir, tmp_path):
    write_png(tmp_path, "secret.png", levels(2, 2, 3), "RGB")
    with pytest.raises(WorkflowInvalid) as caught:
        executor.run(document({"photo": load("../secret.png")}), outputs=["photo"])
    [issue] = caught.value.issues
    assert (issue.node_id, issue.input) == ("photo", "image")
    with pytest.raises(folders.ModelFolderError, match="refused"):
        folders.resolve_input("../secret.png")


def test_load_mask_takes_one_channel(executor, inputs_dir):
    rgba = levels(2, 3, 4, seed=3)
    write_png(inputs_dir, "m.png", rgba, "RGBA")
    nodes = {"alpha": {"type": "LoadMask", "inputs": {"image": "m.png"}},
             "green": {"type": "LoadMask", "inputs": {"image": "m.png", "channel": "green"}}}
    result = run_ok(executor, nodes, outputs=["alpha", "green"])
    torch.testing.assert_close(output(result, "alpha", "mask")[0], torch.from_numpy(1 - rgba[..., 3] / 255.0).float())
    torch.testing.assert_close(output(result, "green", "mask")[0], torch.from_numpy(rgba[..., 1] / 255.0).float())


# -- saving --

def test_save_image_round_trips_pixels_and_embeds_the_workflow(executor, inputs_dir, tmp_path):
    first, second = levels(4, 6, 3, seed=4), levels(4, 6, 3, seed=5)
    write_png(inputs_dir, "a.png", first, "RGB")
    write_png(inputs_dir, "b.png", second, "RGB")
    nodes = {"a": load("a.png"), "b": load("b.png"),
             "batch": {"type": "ImageBatch", "inputs": {"image1": link("a", "image"), "image2": link("b", "image")}},
             "save": {"type": "SaveImage", "inputs": {"images": link("batch", "image"), "filename_prefix": "run/shot"}}}
    ui = {"nodes": {"save": {"pos": [300, 40]}}, "note": "ein Bild, 一张图片"}
    result = run_ok(executor, nodes, ui=ui)
    paths = [Path(p) for p in result.files]
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == ["run/shot_00001.png", "run/shot_00002.png"]
    for path, expected, index in zip(paths, (first, second), range(2)):
        with Image.open(path) as saved:
            assert saved.mode == "RGB"
            assert np.array_equal(np.asarray(saved), expected)
            assert json.loads(saved.text["workflow"]) == document(nodes, ui=ui)
            assert json.loads(saved.text["parameters"]) == {"run_id": result.run_id, "node_id": "save",
                                                            "batch_index": index}
    again = run_ok(executor, nodes, ui=ui)
    assert again.cached == ["save"] and again.files == result.files


def test_save_image_can_leave_the_workflow_out(executor, inputs_dir):
    write_png(inputs_dir, "a.png", levels(2, 2, 3), "RGB")
    nodes = {"a": load("a.png"),
             "save": {"type": "SaveImage", "inputs": {"images": link("a", "image"), "embed_workflow": False}}}
    [path] = run_ok(executor, nodes).files
    with Image.open(path) as saved:
        assert "workflow" not in saved.text and json.loads(saved.text["parameters"])["node_id"] == "save"


def test_preview_files_live_under_previews_and_are_named_by_content(executor, inputs_dir, tmp_path):
    pixels = levels(3, 3, 3, seed=6)
    write_png(inputs_dir, "a.png", pixels, "RGB")
    nodes = {"a": load("a.png"), "show": {"type": "PreviewImage", "inputs": {"images": link("a", "image")}}}
    [path] = run_ok(executor, nodes).files
    assert Path(path).parent == tmp_path / "out" / images.PREVIEWS_FOLDER
    with Image.open(path) as shown:
        assert np.array_equal(np.asarray(shown), pixels) and "workflow" not in shown.text
    fresh = Executor(executor.registry, OutputCache(), device="cpu", output_dir=tmp_path / "out")
    assert run_ok(fresh, nodes).files == [path]


# -- geometry --

def scale(executor: Executor, name: str, **inputs: Any) -> torch.Tensor:
    nodes = {"a": load(name), "s": {"type": "ImageScale", "inputs": {"image": link("a", "image"), **inputs}}}
    return output(run_ok(executor, nodes, outputs=["s"]), "s", "image")


def test_image_scale_nearest_and_area_give_exact_values(executor, inputs_dir):
    pixels = levels(2, 4, 3, seed=7)
    write_png(inputs_dir, "a.png", pixels, "RGB")
    source = torch.from_numpy(pixels / 255.0).float()
    up = scale(executor, "a.png", width=8, height=4, method="nearest")
    assert torch.equal(up[0], source.repeat_interleave(2, 0).repeat_interleave(2, 1))
    down = scale(executor, "a.png", width=2, height=1, method="area")
    expected = source.reshape(2, 2, 2, 3).mean(dim=(0, 2))  # means of the two 2x2 blocks
    torch.testing.assert_close(down[0], expected[None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos"])
def test_smooth_filters_keep_a_flat_image_flat_and_stay_in_range(executor, inputs_dir, method):
    flat = np.full((6, 10, 3), (200, 30, 90), dtype=np.uint8)
    write_png(inputs_dir, "flat.png", flat, "RGB")
    for width, height in ((5, 3), (17, 9)):
        out = scale(executor, "flat.png", width=width, height=height, method=method)
        assert out.shape == (1, height, width, 3)
        torch.testing.assert_close(out[0], torch.tensor([200, 30, 90]).div(255.0).expand(height, width, 3),
                                   rtol=0, atol=1e-5)
    write_png(inputs_dir, "noise.png", levels(6, 10, 3, seed=8), "RGB")
    noisy = scale(executor, "noise.png", width=23, height=13, method=method)
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0


def test_image_scale_center_crop_and_kept_aspect(executor, inputs_dir):
    pixels = levels(2, 6, 3, seed=9)
    write_png(inputs_dir, "wide.png", pixels, "RGB")
    cropped = scale(executor, "wide.png", width=2, height=2, method="nearest", crop="center")
    assert torch.equal(cropped[0], torch.from_numpy(pixels[:, 2:4] / 255.0).float())
    assert scale(executor, "wide.png", width=0, height=4).shape == (1, 4, 12, 3)
    both_zero = executor.run(document({"a": load("wide.png"), "s": {"type": "ImageScale", "inputs": {
        "image": link("a", "image"), "width": 0, "height": 0}}}), outputs=["s"])
    assert both_zero.status == "failed" and "input 'width'" in str(both_zero.error)


def test_image_scale_by_rounds_sizes(executor, inputs_dir):
    write_png(inputs_dir, "a.png", levels(5, 7, 3), "RGB")
    nodes = {"a": load("a.png"),
             "s": {"type": "ImageScaleBy", "inputs": {"image": link("a", "image"), "factor": 1.5, "method": "bicubic"}}}
    assert output(run_ok(executor, nodes, outputs=["s"]), "s", "image").shape == (1, 8, 10, 3)


def test_pad_for_outpaint_keeps_the_image_and_feathers_the_mask(executor, inputs_dir):
    pixels = levels(4, 4, 3, seed=10)
    write_png(inputs_dir, "a.png", pixels, "RGB")
    nodes = {"a": load("a.png"), "pad": {"type": "PadForOutpaint", "inputs": {
        "image": link("a", "image"), "left": 2, "bottom": 1, "feathering": 2}}}
    result = run_ok(executor, nodes, outputs=["pad"])
    image, mask = output(result, "pad", "image"), output(result, "pad", "mask")
    assert image.shape == (1, 5, 6, 3) and mask.shape == (1, 5, 6)
    assert torch.equal(image[0, :4, 2:], torch.from_numpy(pixels / 255.0).float())
    assert torch.all(image[0, :, :2] == 0.5) and torch.all(image[0, 4] == 0.5)
    assert torch.all(mask[0, :, :2] == 1.0) and torch.all(mask[0, 4] == 1.0)
    # Inside: distance d to the nearest padded edge (left, bottom), value (1 - d/2)^2.
    expected_inside = torch.tensor([[1, 0.25, 0, 0], [1, 0.25, 0, 0], [1, 0.25, 0.25, 0.25], [1, 1, 1, 1]])
    torch.testing.assert_close(mask[0, :4, 2:], expected_inside)


# -- values and combining --

def test_invert_image_and_mask(executor, inputs_dir):
    rgba = levels(2, 2, 4, seed=11)
    write_png(inputs_dir, "a.png", rgba, "RGBA")
    nodes = {"a": load("a.png"),
             "inv": {"type": "InvertImage", "inputs": {"image": link("a", "image")}},
             "minv": {"type": "InvertMask", "inputs": {"mask": link("a", "mask")}}}
    result = run_ok(executor, nodes, outputs=["inv", "minv"])
    torch.testing.assert_close(output(result, "inv", "image")[0], torch.from_numpy(1 - rgba[..., :3] / 255.0).float())
    torch.testing.assert_close(output(result, "minv", "mask")[0], torch.from_numpy(rgba[..., 3] / 255.0).float())


def test_image_batch_resizes_the_second_to_the_first(executor, inputs_dir):
    small = levels(2, 2, 3, seed=12)
    write_png(inputs_dir, "big.png", levels(4, 4, 3), "RGB")
    write_png(inputs_dir, "small.png", small, "RGB")
    nodes = {"big": load("big.png"), "small": load("small.png"),
             "batch": {"type": "ImageBatch", "inputs": {"image1": link("big", "image"),
                                                        "image2": link("small", "image"), "method": "nearest"}}}
    batch = output(run_ok(executor, nodes, outputs=["batch"]), "batch", "image")
    assert batch.shape == (2, 4, 4, 3)
    expected = torch.from_numpy(small / 255.0).float().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(batch[1], expected)


def test_composite_pastes_through_the_mask_and_clips_at_the_edges(executor, inputs_dir):
    write_png(inputs_dir, "black.png", np.zeros((4, 4, 3)), "RGB")
    write_png(inputs_dir, "white.png", np.full((2, 2, 3), 255), "RGB")
    write_png(inputs_dir, "half.png", np.array([[0, 255], [128, 0]]), "L")
    nodes = {"dst": load("black.png"), "src": load("white.png"),
             "m": {"type": "LoadMask", "inputs": {"image": "half.png", "channel": "red"}},
             "comp": {"type": "ImageCompositeMasked", "inputs": {
                 "destination": link("dst", "image"), "source": link("src", "image"), "mask": link("m", "mask"),
                 "x": 3, "y": -1}}}
    image = output(run_ok(executor, nodes, outputs=["comp"]), "comp", "image")[0, ..., 0]
    expected = torch.zeros(4, 4)
    expected[0, 3] = 128 / 255  # source row 1, column 0; the rest of the source lies outside
    torch.testing.assert_close(image, expected)


def test_composite_with_a_mask_of_another_size_names_node_and_input(executor, inputs_dir):
    write_png(inputs_dir, "dst.png", levels(8, 8, 3), "RGB")
    write_png(inputs_dir, "src.png", levels(4, 4, 3), "RGB")
    write_png(inputs_dir, "mask.png", np.full((3, 5), 255), "L")
    nodes = {"dst": load("dst.png"), "src": load("src.png"),
             "m": {"type": "LoadMask", "inputs": {"image": "mask.png", "channel": "red"}},
             "paste": {"type": "ImageCompositeMasked", "inputs": {
                 "destination": link("dst", "image"), "source": link("src", "image"), "mask": link("m", "mask")}}}
    result = executor.run(document(nodes), outputs=["paste"])
    assert result.status == "failed" and result.error.node_id == "paste"
    message = str(result.error)
    assert "input 'mask'" in message and "5x3" in message and "4x4" in message


def test_mask_from_color_and_mask_image_conversions(executor, inputs_dir):
    pixels = np.array([[[255, 0, 0], [250, 4, 0]], [[0, 0, 255], [255, 0, 0]]])
    write_png(inputs_dir, "c.png", pixels, "RGB")
    nodes = {"a": load("c.png"),
             "exact": {"type": "MaskFromColor", "inputs": {"image": link("a", "image"), "green": 0, "blue": 0}},
             "near": {"type": "MaskFromColor", "inputs": {"image": link("a", "image"), "green": 0, "blue": 0,
                                                           "tolerance": 5}},
             "grey": {"type": "MaskToImage", "inputs": {"mask": link("exact", "mask")}},
             "blue": {"type": "ImageToMask", "inputs": {"image": link("a", "image"), "channel": "blue"}}}
    result = run_ok(executor, nodes, outputs=["near", "grey", "blue"])
    assert output(result, "exact", "mask")[0].tolist() == [[1, 0], [0, 1]]
    assert output(result, "near", "mask")[0].tolist() == [[1, 1], [0, 1]]
    assert output(result, "grey", "image")[0, ..., 1].tolist() == [[1, 0], [0, 1]]
    assert output(result, "blue", "mask")[0].tolist() == [[0, 0], [1, 0]]


def test_a_value_that_is_not_an_image_is_refused_by_name():
    with pytest.raises(ValueError, match="input 'image1': expected an image batch of shape \\(B, H, W, 3\\)"):
        images.as_image(torch.zeros(2, 3, 8, 8), "image1")
    with pytest.raises(ValueError, match="input 'mask': expected a mask"):
        images.as_mask(torch.zeros(1, 1, 1, 8, 8))
