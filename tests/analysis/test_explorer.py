"""FeatureExplorer end to end on a tiny store with a planted "drug" direction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from plate_concepts._progress import Cancelled
from plate_concepts.analysis.activations import field_activation_map
from plate_concepts.analysis.explorer import CONTROL_GROUP, FeatureExplorer
from plate_concepts.analysis.lru import LRU as _LRU
from plate_concepts.dictionary import ICFL
from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates.mosaic import PlateMosaic

torch.set_num_threads(1)

DIM, M, FIELD, CROP = 16, 16, 64, 32
WELLS = {
    **{f"A{c:02d}": "DMSO" for c in range(1, 5)},
    **{f"A{c:02d}": "drug" for c in range(5, 9)},
    **{f"B{c:02d}": "inert" for c in range(1, 5)},
}
POSITIONS = [(0, 0), (0, 32), (32, 0), (32, 32)]


def planted_tokens(rng: np.random.Generator, direction: np.ndarray):
    """Two fields per well, 2x2 crops per field, 2x2 patches per crop. Patch tokens are noise;
    in "drug" wells the top-left patch of every crop also carries a strong ``direction``. The
    crop token is the mean of its patch tokens."""
    rows, patches = [], []
    for well, label in WELLS.items():
        for field in range(2):
            for y, x in POSITIONS:
                grid = rng.normal(size=(2, 2, DIM))
                if label == "drug":
                    grid[0, 0] += 40 * direction
                patches.append(grid)
                rows.append(
                    {
                        "plate": "P1",
                        "well": well,
                        "field": field,
                        "crop_y": y,
                        "crop_x": x,
                        "crop_size": CROP,
                        "treatment": label,
                        "is_control": label == "DMSO",
                        "foreground_fraction": rng.random(),
                    }
                )
    patches = np.asarray(patches, dtype=np.float32)
    return patches.mean(axis=(1, 2)), patches, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, plate_of):
    rng = np.random.default_rng(0)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    tokens, patches, obs = planted_tokens(rng, direction)
    path = tmp_path_factory.mktemp("explorer") / "store"
    store = EmbeddingStore.create(path, dim=DIM, patch_grid=(2, 2), chunk_rows=32)
    store.append(tokens, obs, patch_tokens=patches)
    # One feature per token: the drug direction wins a column of its own.
    estimator = ICFL(
        M, n_rounds=1, per_round=1, steps=100, batch_size=32, lr=5e-2, device="cpu", seed=0
    )
    estimator.fit(tokens, is_control=obs["is_control"].to_numpy())

    images, labels = {}, {}
    for well in WELLS:
        for field in range(2):
            images[(well, field)] = rng.integers(0, 1000, size=(2, FIELD, FIELD), dtype=np.uint16)
            cells = np.zeros((FIELD, FIELD), np.int32)
            cells[2:14, 2:14] = 1  # inside the top-left patch of crop (0, 0)
            cells[44:60, 44:60] = 2  # inside the bottom-right patch of crop (32, 32)
            labels[(well, field)] = {"cells": cells}
    plate = plate_of(
        images, labels=labels, name="P1", channels=["dna", "actin"], n_wells=96, chunks=(2, 32, 32)
    )
    explorer = FeatureExplorer(
        EmbeddingStore.open(path), estimator, plate=plate, label_column="treatment"
    )
    seen = []
    explorer.prepare(progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(tokens), len(tokens))
    return explorer, plate, obs


def drug_feature(explorer: FeatureExplorer) -> int:
    table = explorer.feature_table()
    drug = table[table["best_value"] == "drug"]
    return int(drug.sort_values("max_selectivity", ascending=False)["feature"].iloc[0])


def test_feature_table_finds_the_planted_drug_feature(setup):
    explorer, _, _ = setup
    assert explorer.label_columns == ["treatment"]  # index, control flag and measurements left out
    table = explorer.feature_table()
    assert list(table.columns) == [
        "feature",
        "frequency",
        "dead",
        "mean_activation",
        "best_value",
        "max_selectivity",
        "average_selectivity",
    ]
    assert len(table) == M
    feature = drug_feature(explorer)
    row = table.set_index("feature").loc[feature]
    assert row["max_selectivity"] > 0.7 and row["average_selectivity"] > 0.7
    # frequency is exact: the fraction of tokens with a non-zero code
    codes = explorer.plate_codes.dense().numpy()
    np.testing.assert_allclose(table["frequency"], (codes != 0).mean(axis=0))
    assert (table["dead"] == (table["frequency"] == 0)).all()


def test_well_values_and_plate_heatmap(setup):
    explorer, plate, _ = setup
    feature = drug_feature(explorer)
    for kind in ("mean", "fraction"):
        values = explorer.well_values(feature, kind)
        assert list(values.index) == list(WELLS)  # row by row
        drug = [w for w, label in WELLS.items() if label == "drug"]
        others = [w for w, label in WELLS.items() if label != "drug"]
        assert values[drug].min() > values[others].max()
    codes = explorer.plate_codes.dense().numpy()[:, feature]
    wells = explorer.plate_obs["well"].to_numpy()
    np.testing.assert_allclose(
        explorer.well_values(feature, "mean")["A06"], codes[wells == "A06"].mean(), rtol=1e-5
    )

    mosaic = PlateMosaic(plate, min_size=256)
    assert mosaic.n_levels > 1
    heatmap = explorer.plate_heatmap(feature, mosaic, kind="fraction")
    factor = 2 ** (mosaic.n_levels - 1)
    assert heatmap.image.shape == (mosaic.shape[0] // factor, mosaic.shape[1] // factor)
    assert heatmap.scale == (factor, factor) and heatmap.translate == ((factor - 1) / 2,) * 2
    values = explorer.well_values(feature, "fraction")
    for well in [*WELLS, "H12"]:
        y0, x0, y1, x1 = mosaic.well_box(well)
        # the level-0 pixel at a field's centre -> heatmap pixel via napari's scale/translate
        oy, ox = mosaic.field_origin(well, 0)
        iy = round((oy + FIELD / 2 - heatmap.translate[0]) / heatmap.scale[0])
        ix = round((ox + FIELD / 2 - heatmap.translate[1]) / heatmap.scale[1])
        inside = heatmap.image[y0 // factor : y1 // factor, x0 // factor : x1 // factor]
        if well in values.index:
            assert heatmap.image[iy, ix] == pytest.approx(values[well])
            assert np.nanmin(inside) == np.nanmax(inside) == pytest.approx(values[well])
        else:
            assert np.isnan(inside).all()  # a well without tokens stays empty
    # every painted pixel belongs to a well with a value
    assert np.isfinite(heatmap.image).sum() > 0
    with pytest.raises(ValueError, match="kind"):
        explorer.well_values(feature, "median")


def test_top_crops_and_crop_images(setup):
    explorer, plate, obs = setup
    feature = drug_feature(explorer)
    top = explorer.top_crops(feature, n=8)
    assert len(top) == 8
    assert all(WELLS[crop.well] == "drug" for crop in top)
    assert [c.value for c in top] == sorted((c.value for c in top), reverse=True)
    first = top[0]
    assert obs.loc[first.row, "well"] == first.well and obs.loc[first.row, "crop_y"] == first.crop_y
    image = explorer.crop_image(first.row)
    expected = plate.image(first.well, first.field)[
        :, first.crop_y : first.crop_y + CROP, first.crop_x : first.crop_x + CROP
    ].compute()
    assert image.shape == (2, CROP, CROP)
    np.testing.assert_array_equal(image, expected)
    with pytest.raises(IndexError):
        explorer.crop_image(10_000)


def test_field_maps_and_cell_values(setup):
    explorer, _, _ = setup
    feature = drug_feature(explorer)
    for mode in ("cosine", "code"):
        drug_map = explorer.field_map(feature, "A05", 1, mode=mode)
        assert drug_map.shape == (FIELD, FIELD) and drug_map.dtype == np.float32
        assert not np.isnan(drug_map).any()  # the 2x2 crops cover the field
        # the planted direction sits in each crop's top-left patch (pixels 0..16 of the crop)
        top_left = drug_map[0:16, 0:16].mean() + drug_map[32:48, 32:48].mean()
        bottom_right = drug_map[16:32, 16:32].mean() + drug_map[48:64, 48:64].mean()
        assert top_left > bottom_right
    cosine = explorer.field_map(feature, "A05", 1, mode="cosine")
    assert cosine[4, 4] > 0.4 and cosine.max() <= 1.0 + 1e-5
    small = explorer.field_map(feature, "A05", 1, downsample=4)
    assert small.shape == (16, 16)

    cells = explorer.cell_values(feature, "A05", 1, label_name="cells")
    assert list(cells["label"]) == [1, 2] and list(cells["area"]) == [144, 256]
    np.testing.assert_allclose(
        cells["mean_activation"],
        [cosine[2:14, 2:14].mean(), cosine[44:60, 44:60].mean()],
        rtol=1e-5,
    )
    assert cells["mean_activation"][0] > cells["mean_activation"][1]
    with pytest.raises(KeyError, match="nuclei"):
        explorer.cell_values(feature, "A05", 1, label_name="nuclei")
    with pytest.raises(KeyError, match="no crops"):
        explorer.field_map(feature, "C03", 0)


def test_label_value_activation_against_controls(setup):
    explorer, _, obs = setup
    feature = drug_feature(explorer)
    table = explorer.label_value_activation(feature).set_index("value")
    assert list(table.index) == ["DMSO", "drug", "inert", CONTROL_GROUP]
    values = explorer.plate_codes.dense().numpy()[:, feature]
    for label in ("DMSO", "drug", "inert"):
        mine = values[(obs["treatment"] == label).to_numpy()]
        assert table.loc[label, "n_tokens"] == len(mine)
        assert table.loc[label, "mean_activation"] == pytest.approx(mine.mean(), rel=1e-5)
        assert table.loc[label, "fraction_active"] == pytest.approx((mine != 0).mean())
    assert table.loc[CONTROL_GROUP, "group"] == "control"
    assert table.loc[CONTROL_GROUP, "fraction_active"] == table.loc["DMSO", "fraction_active"]
    # The controls are exactly the DMSO tokens.
    assert table["n_control"].to_dict() == {
        "DMSO": table.loc["DMSO", "n_tokens"], "drug": 0, "inert": 0,
        CONTROL_GROUP: table.loc["DMSO", "n_tokens"],
    }  # fmt: skip
    assert table.loc["drug", "fraction_active"] > 0.8


def test_store_without_patch_tokens_fills_crops_with_their_codes(setup, tmp_path):
    explorer, _, obs = setup
    store = EmbeddingStore.create(tmp_path / "flat", dim=DIM)
    store.append(explorer.store.read(), obs)
    flat = FeatureExplorer(store, explorer.estimator).prepare()  # no plate: shape from the crops
    feature = drug_feature(explorer)
    rows = flat.field_rows("A05", 0)
    values = flat.fields.token_values(feature, rows)
    crops = obs.iloc[rows]
    expected = field_activation_map(
        [
            (y, x, s, np.full((1, 1), v))
            for y, x, s, v in zip(crops["crop_y"], crops["crop_x"], crops["crop_size"], values)
        ],
        (FIELD, FIELD),
    )
    np.testing.assert_array_equal(flat.field_map(feature, "A05", 0), expected)
    assert flat.field_map(feature, "A5", 0, mode="code")[0, 0] == values[0]
    with pytest.raises(ValueError, match="plate"):
        flat.crop_image(0)


def test_errors_and_cancel(setup):
    explorer, _, _ = setup
    fresh = FeatureExplorer(explorer.store, explorer.estimator)
    with pytest.raises(RuntimeError, match="prepare"):
        fresh.well_values(0)
    with pytest.raises(Cancelled):
        fresh.prepare(cancel=lambda: True)
    assert not fresh.is_prepared
    with pytest.raises(ValueError, match="label column 'nope'"):
        FeatureExplorer(explorer.store, explorer.estimator, label_column="nope")
    # As a table named it (the Metadata_ prefix, another case): the store's column.
    assert FeatureExplorer(explorer.store, explorer.estimator, label_column="Metadata_TREATMENT").label_column == "treatment"
    with pytest.raises(IndexError, match="out of range"):
        explorer.well_values(M)


def test_lru_keeps_to_its_item_and_memory_budgets():
    cache = _LRU(3, max_bytes=1000)
    for key in "abc":
        cache.put(key, np.zeros(100, np.float32))  # 400 bytes each
    assert "a" not in cache and cache.nbytes == 800  # the least recently used went
    assert cache.get("b", lambda: None) is not None  # b is now the most recent
    cache.put("d", np.zeros(10, np.uint8))
    cache.put("e", np.zeros(10, np.uint8))
    assert "c" not in cache and {"b", "d", "e"} == {k for k in "abcde" if k in cache}
    assert cache.nbytes == 420 and cache.fits(580) and not cache.fits(581)
    cache.put("huge", np.zeros(2000, np.uint8))  # larger than the whole budget: not kept
    assert "huge" not in cache and cache.nbytes == 420
    cache.clear()
    assert cache.nbytes == 0 and "b" not in cache


def _fresh(explorer, plate, **kwargs):
    return FeatureExplorer(
        explorer.store, explorer.estimator, plate=plate, label_column="treatment", **kwargs
    ).prepare()


def test_preload_answers_from_memory_exactly_as_from_disk(setup, monkeypatch):
    explorer, plate, _ = setup
    fresh = _fresh(explorer, plate)
    feature = drug_feature(fresh)
    top = [crop.row for crop in fresh.top_crops(feature, 4, on_plate=True)]
    assert not fresh.in_memory("A05", label_name="cells", crop_rows=top, thumbnail_size=16)
    seen = []
    summary = fresh.preload(
        n_top_crops=4, thumbnail_size=16, progress=lambda done, total: seen.append((done, total))
    )
    n_fields = 2 * len(WELLS)
    assert (summary.fields, summary.fields_with_patches, summary.fields_with_labels) == (
        n_fields,
        n_fields,
        n_fields,
    )
    assert summary.patch_tokens and summary.crops >= 4 and summary.nbytes > 0
    assert seen[-1][0] == seen[-1][1] and "all 24 fields" in summary.describe()
    assert fresh.in_memory("A05", label_name="cells", crop_rows=top, thumbnail_size=16)
    assert fresh.label_image("A05", 1, "cells").dtype == np.uint8  # ids 1 and 2

    def no_disk(*_args, **_kwargs):
        raise AssertionError("read from disk after preload")

    monkeypatch.setattr(fresh.store, "read_patches", no_disk)
    monkeypatch.setattr(plate, "field_labels", no_disk)
    monkeypatch.setattr(plate, "image", no_disk)
    for mode in ("cosine", "code"):
        np.testing.assert_array_equal(
            fresh.field_map(feature, "A05", 1, mode=mode),
            explorer.field_map(feature, "A05", 1, mode=mode),
        )
    monkeypatch.undo()
    pd.testing.assert_frame_equal(
        fresh.cell_values(feature, "A05", 1), explorer.cell_values(feature, "A05", 1)
    )
    for row, pixels in zip(top, fresh.crop_pixels(top, 16), strict=True):
        # 32-px crops at 16 px: pyramid level 1 of the plate, or every 2nd pixel of level 0
        expected = explorer.crop_image(row)
        assert pixels.shape == (2, 16, 16)
        assert np.abs(pixels.astype(float).mean() - expected.astype(float).mean()) < 100


def test_preload_stops_at_its_memory_budget(setup):
    explorer, plate, _ = setup
    whole = _fresh(explorer, plate).preload(n_top_crops=4, thumbnail_size=16)
    # Room for everything but the patch tokens of the last block of fields (8 fields of 1 KiB:
    # 4 crops x 2 x 2 patches x 16 dimensions x 4 bytes).
    budget = whole.nbytes - 4 * 1024
    small = _fresh(explorer, plate, cache_bytes=budget)
    summary = small.preload(n_top_crops=4, thumbnail_size=16)
    assert (summary.fields_with_patches, summary.fields) == (16, 24)
    assert summary.nbytes <= budget and summary.crops == whole.crops
    assert "patch tokens of 16 of 24 fields" in summary.describe()
    assert small.in_memory("A05") and not small.in_memory("B03")  # wells in store order
    feature = drug_feature(small)
    np.testing.assert_array_equal(  # still right: read when asked
        small.field_map(feature, "B03", 1), explorer.field_map(feature, "B03", 1)
    )
    with pytest.raises(Cancelled):
        _fresh(explorer, plate).preload(cancel=lambda: True)


def test_top_crops_on_plate_leaves_other_plates_out(setup, tmp_path):
    explorer, plate, obs = setup
    tokens = explorer.store.read()
    other = obs.assign(plate="P2")
    path = tmp_path / "two-plates"
    store = EmbeddingStore.create(path, dim=DIM, patch_grid=(2, 2), chunk_rows=32)
    patches = explorer.store.read_patches()
    store.append(tokens, obs, patch_tokens=patches)
    store.append(tokens, other, patch_tokens=patches)  # the same crops again, on plate P2
    two = FeatureExplorer(store, explorer.estimator, plate=plate, label_column="treatment")
    two.prepare()
    feature = drug_feature(explorer)
    plate_of = store.obs["plate"]
    assert {plate_of.iat[c.row] for c in two.top_crops(feature, 8)} == {"P1", "P2"}
    on_plate = two.top_crops(feature, 8, on_plate=True)
    assert {plate_of.iat[c.row] for c in on_plate} == {"P1"}
    assert [c.row for c in on_plate] == [c.row for c in explorer.top_crops(feature, 8)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_dictionary_on_the_gpu_browses_as_on_the_cpu(setup, tmp_path):
    explorer, plate, _ = setup
    path = tmp_path / "dictionary.safetensors"
    explorer.estimator.save(path)
    on_gpu = FeatureExplorer(
        explorer.store, ICFL.load(path, device="cuda"), plate=plate, label_column="treatment"
    ).prepare()
    assert on_gpu.estimator.model_.decoder.device.type == "cuda"
    summary = on_gpu.preload(n_top_crops=4, thumbnail_size=16)
    assert summary.fields_with_patches == summary.fields
    # The same codes, up to float rounding in the pursuit: frequencies within a token or two.
    np.testing.assert_allclose(
        on_gpu.feature_table()["frequency"], explorer.feature_table()["frequency"], atol=0.03
    )
    feature = drug_feature(explorer)
    for mode in ("cosine", "code"):
        np.testing.assert_allclose(
            on_gpu.field_map(feature, "A05", 1, mode=mode),
            explorer.field_map(feature, "A05", 1, mode=mode),
            atol=1e-4,
        )
    np.testing.assert_allclose(
        on_gpu.cell_values(feature, "A05", 1)["mean_activation"],
        explorer.cell_values(feature, "A05", 1)["mean_activation"],
        atol=1e-4,
    )
