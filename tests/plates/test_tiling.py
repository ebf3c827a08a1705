from __future__ import annotations

import numpy as np
import pytest
from conftest import REAL_DATA

from plate_concepts.embeddings.tiling import (
    IntensityNormalizer,
    foreground_fraction,
    foreground_mask,
    nuclear_channel,
    tile_field,
)

NF1_IMAGES = REAL_DATA / "nf1_plate2" / "images"


# ---------------------------------------------------------------------- crop positions
def test_adjacent_crops_cover_a_divisible_field_exactly_once():
    grid = tile_field((512, 768), crop_size=256)
    assert len(grid) == 6
    assert (grid.coverage() == 1).all()
    assert sorted(grid) == [(y, x) for y in (0, 256) for x in (0, 256, 512)]


def test_last_crop_is_shifted_inwards_so_every_pixel_is_covered():
    grid = tile_field((3, 904, 1224), crop_size=256)  # a (C, Y, X) shape works too
    assert grid.shape == (904, 1224)
    ys = sorted({y for y, _ in grid})
    xs = sorted({x for _, x in grid})
    assert ys == [0, 256, 512, 904 - 256]
    assert xs == [0, 256, 512, 768, 1224 - 256]
    assert len(grid) == 4 * 5
    coverage = grid.coverage()
    assert coverage.min() == 1  # union of the crops = every pixel
    # The overlap is exactly the shifted crops' overlap with their neighbours.
    assert (coverage[:648, :968] == 1).all() and (coverage[650, :] >= 2).all()
    assert all(y + 256 <= 904 and x + 256 <= 1224 for y, x in grid)


def test_overlapping_stride():
    grid = tile_field((300, 300), crop_size=100, stride=50)
    assert sorted({y for y, _ in grid}) == [0, 50, 100, 150, 200]
    assert len(grid) == 25
    assert grid.coverage().min() == 1


def test_drop_edge_keeps_only_interior_crops_like_the_publication():
    grid = tile_field((2048, 2048), crop_size=256, drop_edge=True)
    assert len(grid) == 36  # the 36 non-edge crops of a 2048-px image
    for y, x in grid:
        assert 0 < y and y + 256 < 2048 and 0 < x and x + 256 < 2048
    nf1 = tile_field((904, 1224), crop_size=256, drop_edge=True)
    assert sorted(nf1) == [(y, x) for y in (256, 512) for x in (256, 512, 768)]


def test_cut_returns_the_crop_pixels():
    image = np.arange(2 * 64 * 96).reshape(2, 64, 96)
    grid = tile_field(image.shape, crop_size=32)
    crops = grid.cut(image)
    assert crops.shape == (6, 2, 32, 32)
    for crop, (y, x) in zip(crops, grid, strict=True):
        np.testing.assert_array_equal(crop, image[:, y : y + 32, x : x + 32])
    np.testing.assert_array_equal(grid.cut(image, [4])[0], image[:, 32:64, 32:64])


def test_tiling_errors():
    with pytest.raises(ValueError, match=r"crop size 300 is larger than the field \(904 x 256 px\)"):
        tile_field((904, 256), crop_size=300)
    with pytest.raises(ValueError, match="drop_edge=True leaves no crop"):
        tile_field((512, 512), crop_size=256, drop_edge=True)
    with pytest.raises(ValueError, match="crop_size must be a positive integer"):
        tile_field((512, 512), crop_size=0)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        tile_field((512, 512), crop_size=64, stride=-1)


# ---------------------------------------------------------------------- foreground
def test_nuclear_channel_by_name_or_index():
    assert nuclear_channel(["OrigER", "OrigDNA", "OrigMito"]) == 1
    assert nuclear_channel(["DAPI", "GFP", "RFP"]) == 0
    assert nuclear_channel(["Brightfield", "Hoechst 33342"]) == 1
    assert nuclear_channel(["DAPI", "GFP"], "gfp") == 1
    assert nuclear_channel(["DAPI", "GFP"], 1) == 1
    with pytest.raises(ValueError, match=r"no nuclear channel among \['GFP', 'RFP'\]"):
        nuclear_channel(["GFP", "RFP"])
    with pytest.raises(ValueError, match="no channel named 'CY5'"):
        nuclear_channel(["GFP", "RFP"], "CY5")
    with pytest.raises(ValueError, match="out of range"):
        nuclear_channel(["GFP", "RFP"], 2)


def test_foreground_fraction_of_planted_nuclei():
    plane = np.random.default_rng(0).uniform(0, 10, size=(128, 192)).astype(np.float32)
    plane[0:64, 0:64] = 1000  # crop (0, 0) is all nucleus
    plane[64:96, 128:192] = 1000  # crop (64, 128): its top half
    grid = tile_field(plane.shape, crop_size=64)
    fractions = dict(zip(grid, foreground_fraction(plane, grid), strict=True))
    assert fractions[(0, 0)] == 1.0
    assert fractions[(64, 128)] == 0.5
    assert all(fractions[key] == 0.0 for key in fractions if key not in {(0, 0), (64, 128)})
    # A constant plane has no foreground, and a fixed threshold overrides Otsu.
    assert foreground_fraction(np.full_like(plane, 7), grid).max() == 0
    assert foreground_fraction(plane, grid, threshold=-1).min() == 1


def test_foreground_fraction_of_a_real_nuclear_channel():
    import tifffile

    dapi = tifffile.imread(next(NF1_IMAGES.glob("B7_*DAPI*.tif")))
    grid = tile_field(dapi.shape, crop_size=256)
    fractions = foreground_fraction(dapi, grid)
    mask = foreground_mask(dapi)  # Otsu at 1/4 resolution
    assert 0.02 < mask.mean() < 0.6  # some nuclei, mostly background
    for fraction, (y, x) in zip(fractions, grid, strict=True):
        assert fraction == pytest.approx(mask[y // 4 : (y + 256) // 4, x // 4 : (x + 256) // 4].mean())
    assert fractions.max() > 2 * fractions.min()  # crops do differ in how many cells they hold


# ---------------------------------------------------------------------- intensities
def test_field_scope_maps_percentiles_to_0_and_1():
    image = np.stack([np.arange(10_000).reshape(100, 100), np.full((100, 100), 5)]).astype(np.uint16)
    out = IntensityNormalizer(low=1, high=99, scope="field")(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    low, high = np.percentile(image[0], [1, 99])
    np.testing.assert_allclose(out[0], np.clip((image[0] - low) / (high - low), 0, 1), atol=1e-6)
    assert out[0].min() == 0 and out[0].max() == 1
    assert (out[1] == 0).all()  # a constant channel maps to 0, not NaN


def test_plate_scope_keeps_brightness_differences_that_field_scope_removes(plate_of):
    rng = np.random.default_rng(1)
    dim = rng.integers(0, 1000, size=(2, 50, 60)).astype(np.uint16)
    bright = (dim * 3).astype(np.uint16)
    plate = plate_of({("B02", 0): dim, ("B03", 0): bright})
    unfitted = IntensityNormalizer(low=0, high=100)
    with pytest.raises(RuntimeError, match="not fitted"):
        unfitted(dim)
    normalizer = IntensityNormalizer(low=0, high=100, sample_fields=5).fit(plate)
    both = np.concatenate([dim, bright], axis=1).reshape(2, -1)
    np.testing.assert_array_equal(normalizer.levels, np.stack([both.min(1), both.max(1)], axis=1))
    assert normalizer(bright).mean() > 2.5 * normalizer(dim).mean()
    per_field = IntensityNormalizer(low=0, high=100, scope="field")
    np.testing.assert_allclose(per_field(bright), per_field(dim), atol=2e-3)

    again = IntensityNormalizer.from_record(normalizer.describe())
    np.testing.assert_array_equal(again(dim), normalizer(dim))
    assert again.same_settings(IntensityNormalizer(low=0, high=100, sample_fields=5))
    assert not again.same_settings(IntensityNormalizer(low=1, high=100, sample_fields=5))


def test_normalizer_checks_its_settings():
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        IntensityNormalizer(low=99, high=1)
    with pytest.raises(ValueError, match="scope must be 'plate' or 'field'"):
        IntensityNormalizer(scope="well")  # type: ignore[arg-type]
    fitted = IntensityNormalizer(levels=[[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="levels for 2 channels, the image has 3"):
        fitted(np.zeros((3, 4, 4)))
