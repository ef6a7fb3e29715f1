"""The procedural shapes dataset and the pixel detector that scores the demo models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training import detector, shapes


def test_vocabulary_and_caption_grammar() -> None:
    combos = shapes.all_combos()
    assert len(combos) == 8 * 3 * 7
    assert all(c.colour != c.background for c in combos)
    combo = shapes.Combo("red", "circle", "blue")
    assert shapes.caption_for(combo) == "a red circle on a blue background"
    assert shapes.caption_for(combo, "left") == "a red circle on a blue background, left"
    assert shapes.caption_for(combo, outlined=True) == "a red circle on a blue background, outlined"


def test_rendering_is_deterministic_per_seed() -> None:
    a = shapes.render_dataset(12, seed=3)
    b = shapes.render_dataset(12, seed=3)
    c = shapes.render_dataset(12, seed=4)
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (12, 64, 64, 3) and a.images.dtype == np.uint8


def test_render_cache_returns_the_same_pixels(tmp_path) -> None:
    fresh = shapes.render_dataset(5, seed=9, cache_dir=tmp_path, with_silhouettes=True)
    cached = shapes.render_dataset(5, seed=9, cache_dir=tmp_path, with_silhouettes=True)
    assert len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(fresh.images, cached.images)
    np.testing.assert_array_equal(fresh.silhouettes, cached.silhouettes)


def test_held_out_split_is_seeded_disjoint_and_keeps_every_pair_in_training() -> None:
    held = shapes.held_out_combos()
    train = shapes.train_combos()
    assert held == shapes.held_out_combos()
    assert held != shapes.held_out_combos(seed=shapes.SPLIT_SEED + 1)
    assert not set(held) & set(train)
    assert set(held) | set(train) == set(shapes.all_combos())
    assert len(held) >= 0.2 * len(shapes.all_combos())
    for colour, shape in itertools.product(shapes.COLOURS, shapes.SHAPES):
        assert any(c.colour == colour and c.shape == shape for c in train)
        assert any(c.background == colour and c.shape == shape for c in train)
    for colour, background in itertools.permutations(shapes.COLOURS, 2):
        assert any(c.colour == colour and c.background == background for c in train)


def test_training_data_never_shows_a_held_out_combo() -> None:
    held = set(shapes.held_out_combos())
    data = shapes.render_dataset(300, seed=1)
    assert not {s.combo for s in data.samples} & held


def test_position_words_match_where_the_shape_is() -> None:
    rng = np.random.default_rng(0)
    combos = shapes.all_combos()
    for _ in range(200):
        sample = shapes.random_sample(rng, combos, position_probability=1.0)
        x0, y0, x1, y1 = sample.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        expected = {"left": cx < 32, "right": cx > 32, "top": cy < 32, "bottom": cy > 32,
                    "center": abs(cx - 32) <= 3 and abs(cy - 32) <= 3}
        assert expected[sample.position], sample


@pytest.mark.parametrize("outlined", [False, True])
def test_detector_is_exact_on_rendered_ground_truth(outlined: bool) -> None:
    data = shapes.render_dataset(150, seed=12, combos=shapes.all_combos(), outlined=outlined)
    for sample, image in zip(data.samples, data.images):
        found = detector.detect(image)
        assert (found.colour, found.shape, found.background) == (
            sample.combo.colour, sample.combo.shape, sample.combo.background
        ), sample


def test_filled_fraction_separates_outlines_from_filled_shapes() -> None:
    for shape, filled_expected in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        combo = shapes.Combo("white", shape, "black")
        sample = shapes.Sample(combo, (12.0, 12.0, 48.0, 48.0), None)
        filled = detector.detect(shapes.render(sample)).filled_fraction
        outlined = detector.detect(shapes.render(shapes.Sample(combo, sample.box, None, outlined=True))).filled_fraction
        assert filled == pytest.approx(filled_expected, abs=0.06)
        assert outlined < 0.65 * filled


def test_silhouette_matches_the_detected_mask() -> None:
    data = shapes.render_dataset(40, seed=8, with_silhouettes=True)
    for image, sil in zip(data.images, data.silhouettes):
        mask = detector.detect(image).mask
        # The mask is the 50% coverage contour; pixels exactly half covered may go either way.
        assert not np.any((sil > 0.5) & ~mask)
        assert not np.any(mask & (sil < 0.5))


def test_detector_reports_no_shape_on_a_plain_image() -> None:
    image = np.broadcast_to(np.array(shapes.PALETTE["green"], np.uint8), (64, 64, 3))
    found = detector.detect(image)
    assert found.background == "green" and found.shape is None and found.colour is None


def test_detector_survives_noise_and_blur() -> None:
    rng = np.random.default_rng(1)
    data = shapes.render_dataset(60, seed=21, combos=shapes.all_combos())
    for sample, image in zip(data.samples, data.images):
        blurred = image.astype(np.float32)
        blurred = (blurred + np.roll(blurred, 1, 0) + np.roll(blurred, 1, 1) + np.roll(blurred, (1, 1), (0, 1))) / 4
        noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255)
        found = detector.detect(noisy)
        assert (found.colour, found.shape, found.background) == (
            sample.combo.colour, sample.combo.shape, sample.combo.background
        ), sample
