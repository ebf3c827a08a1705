"""Activation maps and aggregates: known answers against dense or hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize

from plate_concepts.analysis.activations import (
    cell_activations,
    crop_feature_values,
    field_activation_map,
    layer_transform,
    patch_feature_map,
    top_tokens,
    well_aggregates,
)
from plate_concepts.dictionary import ICFL, SparseCodes

torch.set_num_threads(1)
DIM, M = 12, 16


def random_codes(n: int, k: int, m: int, seed: int = 0) -> SparseCodes:
    """Codes with inactive (zero) slots and repeated indices, as ICFL produces."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, m, size=(n, k))
    values = rng.normal(size=(n, k)) * (rng.random((n, k)) < 0.6)
    return SparseCodes(torch.from_numpy(indices), torch.from_numpy(values.astype(np.float32)), m)


@pytest.fixture(scope="module")
def estimator() -> ICFL:
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(200, DIM)).astype(np.float32) + 0.5
    is_control = np.arange(200) < 80
    return ICFL(M, n_rounds=2, per_round=2, steps=10, batch_size=50, lr=1e-2, device="cpu").fit(
        tokens, is_control=is_control
    )


def test_well_aggregates_equal_a_dense_reference():
    codes = random_codes(300, 6, 20)
    rng = np.random.default_rng(2)
    names = np.array(["B10", "B02", "C01", "A12"])
    wells = names[rng.integers(0, 4, size=300)]
    result = well_aggregates(codes, wells)
    assert result.wells == ["A12", "B02", "B10", "C01"]  # row by row, not alphabetical
    dense = codes.dense().numpy().astype(np.float64)
    for i, well in enumerate(result.wells):
        mine = dense[wells == well]
        assert result.n_tokens[i] == len(mine)
        np.testing.assert_allclose(
            result.mean_activation[i], mine.mean(axis=0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(result.fraction_active[i], (mine != 0).mean(axis=0), rtol=1e-6)
    assert result.mean_activation.dtype == np.float32 and result.mean_activation.shape == (4, 20)
    with pytest.raises(ValueError, match="one well name per token"):
        well_aggregates(codes, wells[:10])


def test_crop_values_and_top_tokens_match_dense_codes():
    codes = random_codes(100, 5, 8, seed=3)
    dense = codes.dense().numpy()
    for feature in range(8):
        np.testing.assert_allclose(
            crop_feature_values(codes, feature), dense[:, feature], atol=1e-6
        )
    top = top_tokens(codes, 3, n=5)
    column = dense[:, 3]
    assert list(column[top]) == sorted(column[column != 0], reverse=True)[:5]
    assert len(top_tokens(codes, 3, n=1000)) == int((column != 0).sum())  # only active tokens
    with pytest.raises(IndexError, match="out of range"):
        crop_feature_values(codes, 8)


def test_patch_feature_map_cosine_and_code_equal_hand_computations(estimator):
    rng = np.random.default_rng(4)
    patches = rng.normal(size=(3, 2, 4, DIM)).astype(np.float32)
    flat = patches.reshape(-1, DIM)
    feature = 5
    pre = estimator.preprocess(flat).astype(np.float64)
    pre /= np.linalg.norm(pre, axis=1, keepdims=True)
    direction = estimator.components_[feature].astype(np.float64)
    direction /= np.linalg.norm(direction)
    cosine = patch_feature_map(estimator, patches, feature, "cosine")
    assert cosine.shape == (3, 2, 4) and cosine.dtype == np.float32
    np.testing.assert_allclose(cosine, (pre @ direction).reshape(3, 2, 4), atol=1e-5)

    code = patch_feature_map(estimator, patches, feature, "code")
    expected = estimator.encode(estimator.preprocess(flat)).dense().numpy()[:, feature]
    np.testing.assert_allclose(code, expected.reshape(3, 2, 4), atol=1e-6)
    assert (code != 0).any() or (expected == 0).all()
    with pytest.raises(ValueError, match="mode"):
        patch_feature_map(estimator, patches, feature, "dot")


def test_constant_crop_map_lands_exactly_on_its_pixels():
    out = field_activation_map([(8, 4, 16, np.full((2, 2), 3.0))], (40, 50))
    assert out.shape == (40, 50) and out.dtype == np.float32
    covered = np.zeros((40, 50), bool)
    covered[8:24, 4:20] = True
    assert np.all(out[covered] == 3.0)
    assert np.isnan(out[~covered]).all()


def test_bilinear_upsampling_matches_skimage_resize():
    grid = np.arange(12, dtype=np.float64).reshape(3, 4) ** 1.5
    out = field_activation_map([(5, 7, 24, grid)], (40, 40))
    expected = resize(grid, (24, 24), order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(out[5:29, 7:31], expected, atol=1e-5)
    nearest = field_activation_map([(0, 0, 24, grid)], (24, 24), order=0)
    np.testing.assert_array_equal(nearest, np.kron(grid, np.ones((8, 6))).astype(np.float32))


def test_overlapping_crops_reduce_by_max_or_mean():
    crops = [(0, 0, 10, np.full((1, 1), 1.0)), (5, 5, 10, np.full((1, 1), 4.0))]
    high = field_activation_map(crops, (20, 20), reduce="max")
    mean = field_activation_map(crops, (20, 20), reduce="mean")
    assert high[7, 7] == 4.0 and mean[7, 7] == 2.5  # both crops
    assert high[2, 2] == mean[2, 2] == 1.0 and high[12, 12] == mean[12, 12] == 4.0  # one crop
    assert np.isnan(high[17, 2]) and np.isnan(mean[2, 17])  # none
    with pytest.raises(ValueError, match="reduce"):
        field_activation_map(crops, (20, 20), reduce="sum")  # max, mean or central


def test_downsampled_map_lines_up_with_full_resolution():
    # A linear token grid: bilinear interpolation reproduces it exactly between token centres,
    # so a block's mean at full resolution equals the downsampled pixel (sampled at its centre).
    grid = np.add.outer(np.arange(8.0), 2 * np.arange(8.0))
    crops = [(8, 4, 32, grid)]
    full = field_activation_map(crops, (48, 48))
    small = field_activation_map(crops, (48, 48), out_shape=(12, 12))
    assert small.shape == (12, 12)
    blocks = full.reshape(12, 4, 12, 4).mean(axis=(1, 3))
    # crop rows 8..40 -> output rows 2..9, columns 4..36 -> 1..8; interior blocks avoid the flat edge
    np.testing.assert_allclose(small[3:9, 2:8], blocks[3:9, 2:8], atol=1e-4)
    assert (
        np.isnan(small[:2]).all()
        and np.isnan(small[10:]).all()
        and not np.isnan(small[2:10, 1:9]).any()
    )
    scale, translate = layer_transform((48, 48), (12, 12), origin=(100, 200))
    assert scale == (4.0, 4.0) and translate == (101.5, 201.5)


def test_cell_activations_give_exact_means():
    values = np.arange(36, dtype=np.float32).reshape(6, 6)
    values[0, 0] = np.nan
    labels = np.zeros((6, 6), np.uint16)
    labels[0:2, 0:2] = 1  # pixels 0 (NaN), 1, 6, 7
    labels[3:6, 4] = 5  # pixels 22, 28, 34
    table = cell_activations(values, labels)
    assert list(table["label"]) == [1, 5] and list(table["area"]) == [4, 3]
    np.testing.assert_allclose(table["mean_activation"], [(1 + 6 + 7) / 3, (22 + 28 + 34) / 3])
    # Large, sparse label ids take the other path with the same answer.
    big = labels.astype(np.int64) * 10**9
    np.testing.assert_allclose(
        cell_activations(values, big)["mean_activation"], table["mean_activation"]
    )
    all_nan = cell_activations(np.full((6, 6), np.nan), labels)
    assert all_nan["mean_activation"].isna().all()
    with pytest.raises(ValueError, match="same"):
        cell_activations(values, labels[:5])


@pytest.mark.parametrize(
    ("size", "crop", "grid"),
    [(64, 32, 2), (96, 32, 4), (100, 32, 3), (80, 80, 1)],  # 100: the last 4 px are not covered
)
def test_cell_operator_gives_the_means_of_the_full_map(size, crop, grid):
    from plate_concepts.analysis.activations import cell_operator

    rng = np.random.default_rng(size)
    labels = rng.integers(0, 7, (size // 4 + 1, size // 4 + 1)).repeat(4, 0).repeat(4, 1)
    labels = labels[:size, :size].astype(np.uint16)
    labels[:, -2:] = 9  # an object in the uncovered strip when size = 100
    crops = [
        (y, x, crop)
        for y in range(0, size - crop + 1, crop)
        for x in range(0, size - crop + 1, crop)
    ]
    grids = rng.normal(size=(len(crops), grid, grid))
    operator = cell_operator(crops, (grid, grid), labels)
    expected = cell_activations(
        field_activation_map([(*c, g) for c, g in zip(crops, grids, strict=True)], (size, size)),
        labels,
    )
    table = operator.table(grids)
    np.testing.assert_array_equal(table["label"], expected["label"])
    np.testing.assert_array_equal(table["area"], expected["area"])
    np.testing.assert_allclose(table["mean_activation"], expected["mean_activation"], atol=1e-6)
    assert np.isnan(table.set_index("label").loc[9, "mean_activation"]) == (size == 100)
    with pytest.raises(ValueError, match="token values"):
        operator.means(grids[:-1])


def test_overlapping_crops_give_each_pixel_to_the_most_central_crop():
    from plate_concepts.analysis.activations import cell_operator

    crops = [(0, 0, 10, np.full((1, 1), 1.0)), (5, 5, 10, np.full((1, 1), 4.0))]
    central = field_activation_map(crops, (20, 20), reduce="central")
    assert central[6, 6] == 1.0 and central[8, 8] == 4.0  # nearer the first, the second centre
    assert central[2, 2] == 1.0 and central[12, 12] == 4.0 and np.isnan(central[17, 2])
    # The tiling's border crop overlaps its neighbour; per-object means stay exact.
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 9, (13, 13)).repeat(8, 0).repeat(8, 1)[:100, :100].astype(np.int32)
    starts = [0, 32, 64, 68]  # 68: flush with the far border, overlapping the crop at 64
    boxes = [(y, x, 32) for y in starts for x in starts]
    grids = rng.normal(size=(len(boxes), 4, 4))
    expected = cell_activations(
        field_activation_map(
            [(*b, g) for b, g in zip(boxes, grids, strict=True)], (100, 100), reduce="central"
        ),
        labels,
    )
    table = cell_operator(boxes, (4, 4), labels).table(grids)
    np.testing.assert_array_equal(table["label"], expected["label"])
    np.testing.assert_allclose(table["mean_activation"], expected["mean_activation"], atol=1e-6)
    with pytest.raises(ValueError, match="integer"):
        cell_operator(boxes, (4, 4), labels.astype(float))


def test_cell_operator_and_cell_activations_take_any_label_ids():
    from plate_concepts.analysis.activations import cell_operator

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (64, 64)).astype(np.uint32)
    labels = np.where(labels > 0, labels + 4_000_000_000, 0).astype(np.uint32)  # sparse, huge
    crops = [(y, x, 32) for y in (0, 32) for x in (0, 32)]
    grids = rng.normal(size=(4, 2, 2))
    expected = cell_activations(
        field_activation_map([(*c, g) for c, g in zip(crops, grids, strict=True)], (64, 64)), labels
    )
    assert list(expected["label"]) == [4_000_000_001, 4_000_000_002, 4_000_000_003]
    table = cell_operator(crops, (2, 2), labels).table(grids)
    np.testing.assert_array_equal(table["label"], expected["label"])
    np.testing.assert_allclose(table["mean_activation"], expected["mean_activation"], atol=1e-6)
    with pytest.raises(ValueError, match="negative label -5"):
        cell_operator(crops, (2, 2), np.full((64, 64), -5))
