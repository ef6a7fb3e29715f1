"""Image and latent maths (nodegraph_diffusion.imaging) and the nodes that use it: Canny edges against
kornia's canny (what ComfyUI's Canny node runs), bislerp against its formula written out, sizes by
megapixels, and animated WebP/PNG saves read back with pillow."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nodegraph.cache import OutputCache
from nodegraph.executor import Executor, RunResult
from nodegraph.node import CancelToken, RunContext
from nodegraph.registry import NodeRegistry
from nodegraph_diffusion import imaging
from nodegraph_diffusion.components import Latent
from nodegraph_diffusion.nodes import folders, images, latent
from nodegraph_diffusion.nodes.common import InputError

# --- sizes by megapixels ------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, megapixels, step, expected", [
    # sqrt(2^20 / (512 * 768)) = 1.63299...: 836.09 x 1254.14
    (512, 768, 1.0, 1, (836, 1254)),
    (512, 768, 1.0, 64, (832, 1280)),  # 13.06 and 19.6 steps of 64
    (1024, 1024, 1.0, 1, (1024, 1024)),
    (4000, 3000, 0.25, 8, (592, 440)),  # 0.1478: 591.2 / 8 = 73.9 -> 74; 443.4 / 8 = 55.4 -> 55
    (100, 10, 0.01, 256, (256, 256)),  # fewer pixels than one step: at least one step a side
])
def test_size_for_megapixels(width, height, megapixels, step, expected):
    assert imaging.size_for_megapixels(width, height, megapixels, step) == expected


# --- Canny --------------------------------------------------------------------------------------

def smooth_images(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random (B, C, H, W) in [0, 1] with structure at a few scales, so edges of every strength occur."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, max(2, height // 8), max(2, width // 8), generator=generator)
    fine = torch.rand(batch, channels, height, width, generator=generator)
    blend = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (0.85 * blend + 0.15 * fine).clamp(0, 1)


def shapes(height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W): a disc and a rectangle in different colours, hard edges and exact ties across them."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    image = torch.zeros(3, height, width)
    image[0] = (((rows - height * 0.4) ** 2 + (cols - width * 0.35) ** 2) < (min(height, width) * 0.25) ** 2).float()
    image[2, height // 2:height - 4, width // 2:width - 6] = 0.7
    return image[None]


@pytest.mark.parametrize("low, high", [(0.4, 0.8), (0.15, 0.3), (0.05, 0.9), (0.5, 0.5)])
@pytest.mark.parametrize("images_", [
    smooth_images(2, 3, 48, 64, seed=1), smooth_images(1, 1, 37, 29, seed=2), torch.rand(1, 3, 24, 40),
    shapes(64, 80),
], ids=["smooth-rgb", "smooth-grey-odd", "noise", "shapes"])
def test_canny_matches_kornia(images_, low, high):
    expected_magnitude, expected_edges = kornia.filters.canny(images_, low, high)
    ours = imaging.canny(images_, low, high)
    assert ours.edges.shape == expected_edges.shape == (images_.shape[0], 1, *images_.shape[2:])
    assert torch.equal(ours.edges, expected_edges), int((ours.edges != expected_edges).sum())
    torch.testing.assert_close(ours.magnitude, expected_magnitude, rtol=0, atol=1e-5)
    assert ours.edges.sum() > 0 or high > 0.5  # the cases are not all blank


def test_canny_finds_more_edges_with_lower_thresholds():
    picture = smooth_images(1, 3, 64, 64, seed=3)
    counts = [int(imaging.canny(picture, low, low * 2).edges.sum()) for low in (0.4, 0.2, 0.1, 0.05)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_sobel_is_unnormalised_and_gradient_points_right_and_down():
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    d_dx, d_dy = imaging.sobel((0.25 * cols - 0.5 * rows)[None, None])
    # Interior pixels: (1 + 2 + 1) * 2 * slope; borders repeat, which halves the difference there.
    assert torch.allclose(d_dx[..., 1:-1, 1:-1], torch.tensor(8 * 0.25))
    assert torch.allclose(d_dy[..., 1:-1, 1:-1], torch.tensor(8 * -0.5))
    assert torch.allclose(d_dx[..., 1:-1, 0], torch.tensor(4 * 0.25))


def test_gaussian_kernel_and_reflected_blur():
    kernel = imaging.gaussian_kernel(5, 1.0, torch.float64)
    weights = torch.tensor([math.exp(-(x * x) / 2) for x in (-2, -1, 0, 1, 2)], dtype=torch.float64)
    assert torch.allclose(kernel, weights / weights.sum())
    impulse = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    impulse[..., 0, 3] = 1.0  # on the top border: its reflection (row -1 = row 1) gets no copy of it
    blurred = imaging.gaussian_blur(impulse)
    assert torch.allclose(blurred[0, 0, :3, 3], kernel[2] * kernel[2:])
    assert torch.allclose(blurred.sum(), kernel[2:].sum())  # what spreads outside is not folded back
    impulse = impulse.roll(1, dims=2)  # row 1 also stands at row -1: row 0 gets it from both sides
    assert torch.allclose(imaging.gaussian_blur(impulse)[0, 0, 0, 3], kernel[2] * (kernel[1] + kernel[3]))
    with pytest.raises(ValueError, match="more than 2 pixels"):
        imaging.gaussian_blur(torch.zeros(1, 1, 2, 9))


def test_non_maximum_suppression_keeps_the_left_and_upper_pixel_of_a_tie():
    # float64, where the blurred step's gradients either side of it are exactly equal (in float32
    # rounding can make either one larger).
    step = torch.zeros(1, 1, 9, 10, dtype=torch.float64)
    step[..., :, 5:] = 1.0  # a vertical step: equal gradients in columns 4 and 5
    edges = imaging.canny(step, 0.1, 0.2).edges[0, 0]
    assert torch.equal(edges.nonzero()[:, 1].unique(), torch.tensor([4]))
    assert edges[:, 4].all()
    step = step.transpose(-1, -2).contiguous()  # horizontal step: the upper row of the pair
    edges = imaging.canny(step, 0.1, 0.2).edges[0, 0]
    assert torch.equal(edges.nonzero()[:, 0].unique(), torch.tensor([4]))
    assert torch.equal(edges, kornia.filters.canny(step, 0.1, 0.2)[1][0, 0])


def test_hysteresis_keeps_weak_chains_touching_a_strong_pixel_only():
    weak = torch.zeros(1, 1, 7, 9, dtype=torch.bool)
    strong = torch.zeros_like(weak)
    # A chain going by sides and corners from a strong pixel, and an island of weak pixels.
    for row, col in ((1, 1), (1, 2), (2, 3), (3, 3), (4, 4), (5, 5)):
        weak[0, 0, row, col] = True
    strong[0, 0, 1, 1] = True
    weak[0, 0, 1, 7] = weak[0, 0, 2, 7] = True
    kept = imaging.hysteresis(weak, strong)
    assert kept.sum() == 6 and kept[0, 0, 5, 5] and not kept[0, 0, :, 7].any()


def test_canny_refuses_thresholds_out_of_order():
    with pytest.raises(ValueError, match="0 < low <= high"):
        imaging.canny(torch.rand(1, 3, 8, 8), 0.5, 0.4)


# --- bislerp ------------------------------------------------------------------------------------

def reference_bislerp(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI's bislerp written out pixel by pixel in float64: along the width, then the height,
    each output sample between the two source vectors around its half-pixel-centred position."""

    def taps(old: int, new: int) -> list[tuple[int, int, float]]:
        found = []
        for j in range(new):
            position = min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1)
            before = math.floor(position)
            found.append((before, min(before + 1, old - 1), position - before))
        return found

    def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
        norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        unit_a = a / norm_a if norm_a else np.zeros_like(a)
        unit_b = b / norm_b if norm_b else np.zeros_like(b)
        cosine = float(unit_a @ unit_b)
        if cosine > 1 - 1e-5:
            return a
        if cosine < -1 + 1e-5:
            return (1 - t) * a + t * b
        angle = math.acos(cosine)
        direction = (math.sin((1 - t) * angle) * unit_a + math.sin(t * angle) * unit_b) / math.sin(angle)
        return direction * ((1 - t) * norm_a + t * norm_b)

    x = samples.double().numpy()
    batch, channels, old_height, old_width = x.shape
    across = np.zeros((batch, channels, old_height, width))
    for n in range(batch):
        for row in range(old_height):
            for col, (left, right, t) in enumerate(taps(old_width, width)):
                across[n, :, row, col] = slerp(x[n, :, row, left], x[n, :, row, right], t)
    out = np.zeros((batch, channels, height, width))
    for n in range(batch):
        for col in range(width):
            for row, (top, bottom, t) in enumerate(taps(old_height, height)):
                out[n, :, row, col] = slerp(across[n, :, top, col], across[n, :, bottom, col], t)
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape, size", [
    ((2, 4, 5, 7), (9, 12)),  # upscale by uneven factors
    ((1, 4, 8, 8), (5, 3)),  # downscale
    ((1, 16, 4, 6), (8, 12)),  # 16 channels (SD3/Flux latents), exact 2x
    ((1, 4, 3, 3), (3, 3)),  # same size: every sample on a source pixel
])
def test_bislerp_matches_its_formula_written_out(shape, size):
    samples = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = imaging.bislerp(samples, *size)
    assert ours.shape == (*shape[:2], *size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_bislerp(samples, *size), rtol=1e-5, atol=1e-5)


def test_slerp_turns_the_angle_and_blends_the_length_linearly():
    angle_a, angle_b, length_a, length_b = 0.3, 2.2, 1.5, 4.0
    a = torch.tensor([[length_a * math.cos(angle_a), length_a * math.sin(angle_a)]]).T[None]  # (1, 2, 1)
    b = torch.tensor([[length_b * math.cos(angle_b), length_b * math.sin(angle_b)]]).T[None]
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        result = imaging.slerp(a, b, torch.tensor(t).view(1, 1, 1), dim=1)[0, :, 0].double()
        assert math.isclose(float(result.norm()), (1 - t) * length_a + t * length_b, rel_tol=1e-6)
        assert math.isclose(math.atan2(result[1], result[0]), (1 - t) * angle_a + t * angle_b, abs_tol=1e-6)


def test_slerp_edge_cases_follow_comfyui():
    a = torch.tensor([1.0, 2.0, 2.0]).view(1, 3, 1)
    t = torch.tensor(0.75).view(1, 1, 1)
    # Parallel: the first vector as it is; opposite: the linear blend; a zero vector has no direction.
    assert torch.equal(imaging.slerp(a, 2 * a, t), a)
    assert torch.allclose(imaging.slerp(a, -a, t), 0.25 * a - 0.75 * a)
    assert torch.allclose(imaging.slerp(torch.zeros_like(a), a, t),
                          math.sin(0.75 * math.pi / 2) * (a / 3) * (0.75 * 3))
    assert torch.equal(imaging.slerp(torch.zeros_like(a), torch.zeros_like(a), t), torch.zeros_like(a))


def run_context(tmp_path: Path, **extra: Any) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None, **extra)


@pytest.mark.parametrize("node_class, inputs, size", [
    (latent.LatentUpscale, {"width": 72, "height": 40}, (5, 9)),
    (latent.LatentUpscaleBy, {"scale_by": 1.5}, (6, 9)),
])
def test_latent_upscale_nodes_resample_by_bislerp(tmp_path, node_class, inputs, size):
    samples = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(5))
    node_inputs = node_class.Inputs(latent=Latent(samples, 8), method="bislerp", **inputs)
    out = node_class().run(node_inputs, run_context(tmp_path)).latent.samples
    torch.testing.assert_close(out, imaging.bislerp(samples, *size), rtol=0, atol=0)
    torch.testing.assert_close(out.double(), reference_bislerp(samples, *size), rtol=1e-5, atol=1e-5)


# --- the image nodes, through the executor ------------------------------------------------------

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


def write_png(folder: Path, name: str, pixels: np.ndarray) -> np.ndarray:
    Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(folder / name)
    return pixels


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) levels -> the (1, H, W, 3) IMAGE LoadImage gives."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


def link(node: str, output: str) -> dict[str, str]:
    return {"from": node, "output": output}


def run_ok(executor: Executor, nodes: dict[str, Any], outputs: list[str] | None = None) -> RunResult:
    result = executor.run({"version": 1, "nodes": nodes}, outputs=outputs)
    assert result.status == "succeeded", result.error
    return result


def smooth_levels(height: int, width: int, seed: int) -> np.ndarray:
    return (smooth_images(1, 3, height, width, seed)[0].permute(1, 2, 0).numpy() * 255).round()


def test_canny_node_gives_comfyuis_edge_image(executor, inputs_dir):
    pixels = write_png(inputs_dir, "a.png", smooth_levels(40, 56, seed=7))
    nodes = {"a": {"type": "LoadImage", "inputs": {"image": "a.png"}},
             "c": {"type": "CannyEdges", "inputs": {"image": link("a", "image"), "low_threshold": 0.15,
                                                    "high_threshold": 0.3}}}
    edges = run_ok(executor, nodes, ["c"]).results["c"].outputs.image
    # ComfyUI: kornia's edges of the (B, 3, H, W) image, repeated into the three channels.
    expected = kornia.filters.canny(as_tensor(pixels).movedim(-1, 1), 0.15, 0.3)[1].repeat(1, 3, 1, 1).movedim(1, -1)
    assert edges.shape == (1, 40, 56, 3) and torch.equal(edges, expected) and 0 < edges.mean() < 0.5

    nodes["c"]["inputs"] |= {"low_threshold": 0.5, "high_threshold": 0.3}
    result = executor.run({"version": 1, "nodes": nodes}, outputs=["c"])
    assert result.status == "failed" and "low_threshold" in str(result.error) and "at most" in str(result.error)


def test_image_scale_to_total_pixels_node(executor, inputs_dir):
    pixels = write_png(inputs_dir, "a.png", smooth_levels(30, 50, seed=8))
    nodes = {"a": {"type": "LoadImage", "inputs": {"image": "a.png"}},
             "s": {"type": "ImageScaleToTotalPixels", "inputs": {"image": link("a", "image"), "method": "area",
                                                                 "megapixels": 0.01, "resolution_steps": 8}}}
    scaled = run_ok(executor, nodes, ["s"]).results["s"].outputs.image
    # 0.01 MP = 10485.76 pixels: x 2.6445 -> 79.3 x 132.2, in steps of 8: 80 x 136
    assert scaled.shape == (1, 80, 136, 3)
    assert torch.allclose(scaled, images.resize(as_tensor(pixels), 136, 80, "area"))


def frames_of(path: Path) -> tuple[list[np.ndarray], Image.Image]:
    picture = Image.open(path)
    found = []
    for index in range(getattr(picture, "n_frames", 1)):
        picture.seek(index)
        found.append(np.asarray(picture.convert("RGB")))
    return found, picture


def batch_nodes(inputs_dir: Path, count: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Nodes loading `count` different images and joining them into one batch ("b")."""
    frames = [write_png(inputs_dir, f"{i}.png", smooth_levels(12, 16, seed=20 + i)) for i in range(count)]
    nodes: dict[str, Any] = {f"l{i}": {"type": "LoadImage", "inputs": {"image": f"{i}.png"}} for i in range(count)}
    previous = "l0"
    for i in range(1, count):
        nodes[f"b{i}"] = {"type": "ImageBatch", "inputs": {"image1": link(previous, "image"),
                                                           "image2": link(f"l{i}", "image")}}
        previous = f"b{i}"
    nodes["b"] = nodes.pop(previous)
    return nodes, frames


def test_save_animated_png_holds_every_frame_timing_and_workflow(executor, inputs_dir, tmp_path):
    nodes, frames = batch_nodes(inputs_dir, 3)
    nodes["save"] = {"type": "SaveAnimatedPNG", "inputs": {"images": link("b", "image"), "filename_prefix": "anim/a",
                                                           "fps": 8.0, "compress_level": 9}}
    result = run_ok(executor, nodes)
    [path] = map(Path, result.files)
    assert path.relative_to(tmp_path / "out").as_posix() == "anim/a_00001.png"
    found, picture = frames_of(path)
    assert len(found) == 3 and all(np.array_equal(a, b) for a, b in zip(found, frames))
    assert picture.info["duration"] == 125 and picture.info["loop"] == 0
    assert json.loads(picture.text["workflow"]) == {"version": 1, "nodes": nodes, "ui": {}}
    assert json.loads(picture.text["parameters"]) == {"run_id": result.run_id, "node_id": "save", "frames": 3}
    assert not list(path.parent.glob(".*.tmp"))  # written whole, through a temporary file

    nodes["save"]["inputs"] |= {"fps": 6.0, "compress_level": 0}
    again = Path(run_ok(executor, nodes).files[0])
    assert again.name == "a_00002.png" and again.stat().st_size > path.stat().st_size
    assert frames_of(again)[1].info["duration"] == 166  # 1000 / 6 truncated, as ComfyUI


@pytest.mark.parametrize("lossless", [True, False])
def test_save_animated_webp_frames_quality_and_workflow_in_exif(executor, inputs_dir, lossless):
    nodes, frames = batch_nodes(inputs_dir, 2)
    nodes["save"] = {"type": "SaveAnimatedWebP", "inputs": {"images": link("b", "image"), "fps": 24.0,
                                                            "lossless": lossless, "quality": 90, "method": "slowest"}}
    result = run_ok(executor, nodes)
    [path] = map(Path, result.files)
    assert path.suffix == ".webp" and path.name.startswith("nodegraph_")
    found, picture = frames_of(path)
    assert picture.format == "WEBP" and len(found) == 2
    error = max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(found, frames))
    assert error == 0 if lossless else 0 < error < 64
    assert picture.info["duration"] == 41 and picture.info["loop"] == 0
    exif = picture.getexif()
    key, _, workflow = exif[images.WEBP_TEXT_TAGS[0]].partition(":")
    assert key == "workflow" and json.loads(workflow) == {"version": 1, "nodes": nodes, "ui": {}}
    assert json.loads(exif[images.WEBP_TEXT_TAGS[1]].partition(":")[2])["node_id"] == "save"


def test_save_animated_webp_keeps_any_text_or_leaves_the_workflow_out(executor, inputs_dir):
    nodes, _ = batch_nodes(inputs_dir, 1)
    nodes["save"] = {"type": "SaveAnimatedWebP", "inputs": {"images": link("b", "image")}}
    document = {"version": 1, "nodes": nodes, "ui": {"note": "ein Bild, 一张图片"}}
    result = executor.run(document)
    assert result.status == "succeeded", result.error
    exif = Image.open(result.files[0]).getexif()
    text = exif[images.WEBP_TEXT_TAGS[0]]
    assert text.isascii() and json.loads(text.partition(":")[2]) == document  # EXIF text is ASCII: escaped

    nodes["save"]["inputs"]["embed_workflow"] = False
    exif = Image.open(run_ok(executor, nodes).files[0]).getexif()
    assert exif[images.WEBP_TEXT_TAGS[0]].startswith("parameters:") and images.WEBP_TEXT_TAGS[1] not in exif


def test_frame_milliseconds_truncate_like_comfyui():
    assert [images.frame_milliseconds(fps) for fps in (6.0, 24.0, 16.000000000000004, 1000.0, 0.01)] == \
        [166, 41, 62, 1, 100000]


def test_image_nodes_refuse_what_they_cannot_use(tmp_path):
    ctx = run_context(tmp_path)
    tiny = images.CannyEdges.Inputs(image=torch.zeros(1, 2, 5, 3))
    with pytest.raises(InputError, match="at least 3x3"):
        images.CannyEdges().run(tiny, ctx)
    wide = images.ImageScaleToTotalPixels.Inputs(image=torch.zeros(1, 1, 2000, 3), megapixels=16.0)
    with pytest.raises(InputError, match="at most 16384 a side"):
        images.ImageScaleToTotalPixels().run(wide, ctx)
