"""Feature explorer results -> layer data (Qt-free): alignment with the plate mosaic, per-cell
values and colours, thumbnails and bars, on a tiny plate whose structure is planted."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic

FIELD = 64  # px per side of a field
CROP = 16  # px per crop: 4 x 4 crops per field
GRID = 4  # patch tokens per crop side: 4 px per patch
DIM = 16
WELLS = ["A01", "A02", "A03", "B01", "B02", "B03"]
TREATED = {"A02", "B02"}  # drug wells: cell 1 (top-left quarter) lights up along DIRECTION


def _cells(field: int) -> np.ndarray:
    """Four square cells, one per quarter of the field (ids 1..4; field 1 numbers them from 5)."""
    labels = np.zeros((FIELD, FIELD), dtype=np.uint16)
    half = FIELD // 2
    for index, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        labels[y + 4 : y + half - 4, x + 4 : x + half - 4] = index + 1 + 4 * field
    return labels


def make_plate(wells: list[str] = WELLS, n_fields: int = 2, seed: int = 0) -> Plate:
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for well in wells:
        for field in range(n_fields):
            image = rng.integers(100, 200, size=(2, FIELD, FIELD)).astype(np.uint16)
            cells = _cells(field)
            image[0][cells > 0] += 800  # a bright cell body in channel 0
            images[(well, field)] = [da.from_array(image, chunks=(1, FIELD, FIELD))]
            # Nuclei: the same ids, each cell shrunk by 2 px.
            nuclei = np.where(ndimage.binary_erosion(cells > 0, iterations=2), cells, 0)
            labels[(well, field)] = {
                "cells": [da.from_array(cells, chunks=(FIELD, FIELD))],
                "nuclei": [da.from_array(nuclei, chunks=(FIELD, FIELD))],
            }
    platemap = pd.DataFrame(
        {
            "treatment": ["drug" if w in TREATED else "DMSO" for w in wells],
            "batch": ["b1" if w.startswith("A") else "b2" for w in wells],
        },
        index=pd.Index(wells, name="well"),
    )
    return Plate(
        name="tiny",
        channels=["DNA", "Mito"],
        images=images,
        labels=labels,
        reader="test",
        platemap=platemap,
    )


def direction() -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[3] = 1.0
    return v


def make_store(path, plate: Plate, seed: int = 0):
    """Crop tokens = mean of their patch tokens; treated wells' patches inside cell 1 get +4 v."""
    from plate_concepts.embeddings.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    rows, patches = [], []
    for well in plate.wells:
        for field in plate.fields(well):
            cells = _cells(field)
            for cy in range(0, FIELD, CROP):
                for cx in range(0, FIELD, CROP):
                    grid = rng.normal(size=(GRID, GRID, DIM)).astype(np.float32)
                    if well in TREATED:
                        step = CROP // GRID
                        centres = cells[
                            cy + step // 2 : cy + CROP : step, cx + step // 2 : cx + CROP : step
                        ]
                        grid[centres == 1 + 4 * field] += 4 * direction()
                    patches.append(grid)
                    rows.append(
                        {
                            "plate": plate.name,
                            "well": well,
                            "field": field,
                            "crop_y": cy,
                            "crop_x": cx,
                            "crop_size": CROP,
                            "is_control": well not in TREATED,
                            "treatment": "drug" if well in TREATED else "DMSO",
                            "batch": "b1" if well.startswith("A") else "b2",
                        }
                    )
    patches = np.stack(patches)
    store = EmbeddingStore.create(path, dim=DIM, patch_grid=(GRID, GRID))
    store.append(patches.mean(axis=(1, 2)), pd.DataFrame(rows), patch_tokens=patches)
    return store


def make_dictionary(store, n_features: int = 16, steps: int = 20):
    from plate_concepts.dictionary.estimators import ICFL

    torch.manual_seed(0)
    return ICFL(
        n_features=n_features,
        n_rounds=2,
        per_round=2,
        steps=steps,
        batch_size=64,
        device="cpu",
        log_every=5,
    ).fit(store)


def make_world(tmp_path):
    """(plate, mosaic, store, prepared explorer) of the tiny plate."""
    from plate_concepts.analysis.explorer import FeatureExplorer

    plate = make_plate()
    store = make_store(tmp_path / "tiny.store", plate)
    explorer = FeatureExplorer(store, make_dictionary(store), plate=plate).prepare()
    # Gaps that keep tiles divisible by 4, so maps can be 2x or 4x coarser and still line up.
    return plate, PlateMosaic(plate, well_gap=8, field_gap=4), store, explorer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return make_world(tmp_path_factory.mktemp("world"))


def _world_position(kwargs: dict, index: tuple[float, float]) -> np.ndarray:
    """World (mosaic level-0) coordinate of a data pixel centre, as napari computes it."""
    return np.asarray(kwargs["translate"]) + np.asarray(index) * np.asarray(kwargs["scale"])


# ---------------------------------------------------------------------- tests
def test_value_limits_and_label_colours():
    from plate_concepts.viewer._feature_layers import COLORMAP, label_colors, value_limits

    assert value_limits([0.2, 0.8, np.nan]) == (0.0, 0.8)
    assert value_limits([-0.5, 0.25]) == (-0.5, 0.25)
    assert value_limits([np.nan]) == (0.0, 1.0)
    assert value_limits([0.0, 0.0]) == (0.0, 1.0)
    colors = label_colors([3, 7, 9], [0.0, 1.0, np.nan], (0.0, 1.0))
    assert np.all(colors[0] == 0) and np.all(colors[None] == 0)  # background, unlisted: transparent
    from napari.utils.colormaps import ensure_colormap

    inferno = ensure_colormap(COLORMAP)
    assert np.allclose(colors[3], inferno.map(np.array([0.0]))[0], atol=1e-6)
    assert np.allclose(colors[7], inferno.map(np.array([1.0]))[0], atol=1e-6)
    assert np.allclose(colors[9], (0.5, 0.5, 0.5, 0.6))  # no value: grey


def test_composite_rgb_tints_and_adds_channels():
    from plate_concepts.viewer._feature_layers import composite_rgb

    image = np.zeros((2, 8, 8), dtype=np.uint16)
    image[0, :4] = 1000  # channel 0 bright on top
    image[1, :, :4] = 500  # channel 1 half-bright on the left
    rgb = composite_rgb(image, [(0, 1000), (0, 1000)], [(0, 0, 1), (0, 1, 0)])
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 127, 255)  # blue + half green
    assert tuple(rgb[7, 7]) == (0, 0, 0)
    assert tuple(rgb[0, 7]) == (0, 0, 255)
    assert composite_rgb(np.zeros((2, 64, 64)), [(0, 1)] * 2, [(1, 1, 1)] * 2, size=16).shape == (
        16,
        16,
        3,
    )
    with pytest.raises(ValueError, match="one contrast limit and colour per channel"):
        composite_rgb(image, [(0, 1)], [(1, 1, 1)])


def test_heatmap_lines_up_with_each_well(world):
    from plate_concepts.viewer._feature_layers import ROLE_HEATMAP, heatmap_layer_data

    plate, mosaic, _store, explorer = world
    data, kwargs, kind = heatmap_layer_data(explorer, mosaic, 3, "fraction")
    assert kind == "image" and kwargs["name"] == "feature 3: fraction of active crops per well"
    assert kwargs["metadata"]["plate_concepts"]["role"] == ROLE_HEATMAP
    values = explorer.well_values(3, "fraction")
    scale = np.asarray(kwargs["scale"])
    for well in plate.wells:
        # The data pixel under the centre of each well's first field holds that well's value.
        oy, ox = mosaic.field_origin(well, 0)
        centre = np.array([oy + FIELD / 2, ox + FIELD / 2])
        index = np.round((centre - np.asarray(kwargs["translate"])) / scale).astype(int)
        assert data[tuple(index)] == pytest.approx(values[well])
    assert (
        data.shape[0] * scale[0] == mosaic.shape[0] and data.shape[1] * scale[1] == mosaic.shape[1]
    )
    low, high = kwargs["contrast_limits"]
    assert low <= values.min() and high >= values.max() and kwargs["colormap"] == "inferno"


def test_activation_map_spans_the_wells_fields_exactly(world):
    from plate_concepts.viewer._feature_layers import activation_map_layer_data

    plate, mosaic, _store, explorer = world
    data, kwargs, kind = activation_map_layer_data(
        explorer, mosaic, 5, "A02", mode="cosine", downsample=2
    )
    assert kind == "image" and kwargs["name"] == "feature 5: activation map"
    assert kwargs["scale"] == (2.0, 2.0)
    y0, x0, _, _ = mosaic.well_box("A02")
    # Data pixel (0, 0) covers mosaic pixels y0..y0+1: its centre is y0 + 0.5.
    assert np.allclose(_world_position(kwargs, (0, 0)), (y0 + 0.5, x0 + 0.5))
    for field in plate.fields("A02"):
        expected = explorer.field_map(5, "A02", field, mode="cosine", downsample=2)
        oy, ox = mosaic.field_origin("A02", field)
        top, left = (oy - y0) // 2, (ox - x0) // 2
        np.testing.assert_array_equal(
            data[top : top + FIELD // 2, left : left + FIELD // 2], expected
        )
        # Field pixel (10, 20) lies in data pixel (5, 10) of that field's block, at its place in the mosaic.
        assert np.allclose(_world_position(kwargs, (top + 5, left + 10)), (oy + 10.5, ox + 20.5))
    # Between the fields (the field gap) there is no value.
    gap_column = (mosaic.field_origin("A02", 0)[1] - x0 + FIELD) // 2
    assert np.isnan(data[:, gap_column]).all()


def test_activation_map_finds_the_planted_cell(world):
    """In a treated well the planted direction's cosine is highest over cell 1."""
    from plate_concepts.analysis.activations import feature_direction
    from plate_concepts.viewer._feature_layers import activation_map_layer_data

    _plate, mosaic, _store, explorer = world
    planted = explorer.estimator.preprocess((4 * direction())[None])[0]
    scores = [
        abs(float(feature_direction(explorer.estimator, f) @ planted))
        for f in range(explorer.n_features)
    ]
    feature = int(np.argmax(scores))
    data, _kwargs, _ = activation_map_layer_data(explorer, mosaic, feature, "B02", downsample=1)
    cells = _cells(0)
    sign = np.sign(float(feature_direction(explorer.estimator, feature) @ planted))
    field0 = sign * data[:FIELD, :FIELD]
    assert np.nanmean(field0[cells == 1]) > np.nanmean(field0[(cells > 1)]) + 0.3


def test_cells_layer_values_ids_and_alignment(world):
    from plate_concepts.viewer._feature_layers import ROLE_CELLS, cells_layer_data

    plate, mosaic, _store, explorer = world
    data, kwargs, kind = cells_layer_data(explorer, mosaic, 2, "B02")
    assert kind == "labels" and kwargs["name"] == "feature 2: cells"
    assert kwargs["metadata"]["plate_concepts"]["role"] == ROLE_CELLS
    features = kwargs["features"]
    assert len(features) == 8  # 4 cells in each of 2 fields
    assert features["index"].is_unique and features["index"].min() > 0
    y0, x0, _, _ = mosaic.well_box("B02")
    assert kwargs["translate"] == (y0, x0) and kwargs["scale"] == (1.0, 1.0)
    for field in plate.fields("B02"):
        expected = explorer.cell_values(2, "B02", field, "cells")
        rows = features[features["field"] == field + 1].sort_values("cell")
        np.testing.assert_array_equal(rows["cell"], expected["label"])
        np.testing.assert_allclose(rows["mean activation"], expected["mean_activation"])
        # Each cell's pixels in the layer carry its renumbered id.
        oy, ox = mosaic.field_origin("B02", field)
        block = data[oy - y0 : oy - y0 + FIELD, ox - x0 : ox - x0 + FIELD]
        cells = _cells(field)
        for _, row in rows.iterrows():
            assert set(np.unique(block[cells == row["cell"]])) == {row["index"]}
        assert (block[cells == 0] == 0).all()
    colormap = kwargs["colormap"]
    brightest = features.loc[features["mean activation"].idxmax(), "index"]
    darkest = features.loc[features["mean activation"].idxmin(), "index"]
    assert (
        colormap.map(np.array([brightest]))[0][:3].sum()
        > colormap.map(np.array([darkest]))[0][:3].sum()
    )


def test_map_downsample_keeps_map_pixels_on_the_mosaic_grid(world):
    from plate_concepts.viewer._feature_layers import activation_map_layer_data, map_downsample

    plate, mosaic, _store, _explorer = world
    assert map_downsample(mosaic) == 1  # a small well needs no downsampling
    assert map_downsample(mosaic, max_side=70) == 2
    assert map_downsample(mosaic, max_side=10) == 4  # not 8 or more: 68-px tiles
    odd = PlateMosaic(plate, well_gap=8, field_gap=1)  # 65-px tiles: only full resolution lines up
    assert map_downsample(odd, max_side=10) == 1
    with pytest.raises(ValueError, match="does not divide"):
        activation_map_layer_data(_explorer, odd, 0, "A01", downsample=2)


def test_bars_thumbnails_and_table(world):
    from plate_concepts.viewer._feature_layers import (
        feature_table,
        label_value_bars,
        top_crop_thumbnails,
    )

    _plate, _mosaic, _store, explorer = world
    table = feature_table(explorer, "treatment")
    assert list(table.columns) == [
        "feature",
        "frequency",
        "most selective for",
        "max selectivity",
        "avg selectivity",
        "dead",
    ]
    assert len(table) == explorer.n_features and set(table["most selective for"]) <= {
        "DMSO",
        "drug",
    }

    bars = label_value_bars(explorer, 4, "treatment")
    reference = explorer.label_value_activation(4, "treatment").set_index("value")
    assert bars.labels[-1] == "controls" and bars.is_control == [False, False, True]
    assert sorted(bars.labels[:2]) == ["DMSO", "drug"]
    for label, value in zip(bars.labels, bars.values):
        assert value == pytest.approx(reference.loc[label, "mean_activation"])
    assert bars.values[0] >= bars.values[1]  # highest first

    feature = int(table.sort_values("frequency").iloc[-1]["feature"])
    crops = top_crop_thumbnails(
        explorer, feature, 5, [(0, 1000), (0, 300)], [(0, 0, 1), (0, 1, 0)], size=16
    )
    top = explorer.top_crops(feature, 5)
    assert [(c.crop.well, c.crop.field, c.crop.crop_y, c.crop.crop_x) for c in crops] == [
        (t.well, t.field, t.crop_y, t.crop_x) for t in top
    ]
    assert all(c.rgb.shape == (CROP, CROP, 3) for c in crops)
    assert crops[0].caption.startswith(f"{top[0].well} f{top[0].field + 1}")


def test_feature_view_gathers_all_layers(world):
    from plate_concepts.viewer._feature_layers import feature_view, top_well

    _plate, mosaic, _store, explorer = world
    view = feature_view(
        explorer,
        mosaic,
        1,
        kind="mean",
        label_column="treatment",
        channel_limits=[(0, 1000), (0, 300)],
        channel_colors=[(0, 0, 1), (0, 1, 0)],
        n_crops=4,
    )
    assert view.well == top_well(explorer, 1, "mean")
    names = [kwargs["name"] for _, kwargs, _ in view.layers]
    assert names == [
        "feature 1: mean activation per well",
        "feature 1: activation map",
        "feature 1: cells",
    ]
    assert view.bars is not None and len(view.crops) <= 4
    chosen = feature_view(explorer, mosaic, 1, well="A01", n_crops=0)
    assert chosen.well == "A01" and chosen.crops == []
    assert chosen.layers[1][1]["metadata"]["plate_concepts"]["well"] == "A01"
