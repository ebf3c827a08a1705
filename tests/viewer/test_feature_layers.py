"""Feature explorer results -> layer data (Qt-free): alignment with the plate mosaic, per-cell
values and colours, thumbnails and bars, on a tiny plate whose structure is planted."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FEATURE_CROP as CROP
from conftest import FEATURE_FIELD as FIELD
from conftest import direction, quarter_cells

from plate_concepts.plates.mosaic import PlateMosaic


@pytest.fixture(scope="module")
def world(feature_world):
    return feature_world


def _selection(explorer, feature, well=None, **options):
    from plate_concepts.viewer._feature_layers import resolve_selection

    return resolve_selection(explorer, feature, well=well, **options)


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
    """The crop thumbnails' colours (the core's composite, which the viewer and reports share)."""
    from plate_concepts.plates.display import composite_rgb

    image = np.zeros((2, 8, 8), dtype=np.uint16)
    image[0, :4] = 1000  # channel 0 bright on top
    image[1, :, :4] = 500  # channel 1 half-bright on the left
    rgb = composite_rgb(image, [(0, 1000), (0, 1000)], [(0, 0, 1), (0, 1, 0)])
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 127, 255)  # blue + half green
    assert tuple(rgb[7, 7]) == (0, 0, 0)
    assert tuple(rgb[0, 7]) == (0, 0, 255)
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
        explorer, mosaic, _selection(explorer, 5, "A02", mode="cosine"), downsample=2
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
    data, _kwargs, _ = activation_map_layer_data(
        explorer, mosaic, _selection(explorer, feature, "B02"), downsample=1
    )
    cells = quarter_cells(0)
    sign = np.sign(float(feature_direction(explorer.estimator, feature) @ planted))
    field0 = sign * data[:FIELD, :FIELD]
    assert np.nanmean(field0[cells == 1]) > np.nanmean(field0[(cells > 1)]) + 0.3


def test_cells_layer_values_ids_and_alignment(world):
    from plate_concepts.viewer._feature_layers import ROLE_CELLS, cells_layer_data

    plate, mosaic, _store, explorer = world
    data, kwargs, kind = cells_layer_data(explorer, mosaic, _selection(explorer, 2, "B02"))
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
        cells = quarter_cells(field)
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
        activation_map_layer_data(_explorer, odd, _selection(_explorer, 0, "A01"), downsample=2)


def test_bars_thumbnails_and_table(world):
    from plate_concepts.viewer._feature_layers import (
        feature_table,
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

    feature = int(table.sort_values("frequency").iloc[-1]["feature"])
    top = explorer.top_crops(feature, 5, on_plate=True)
    crops = top_crop_thumbnails(explorer, top, [(0, 1000), (0, 300)], [(0, 0, 1), (0, 1, 0)], 16)
    assert [c.crop for c in crops] == top
    assert all(c.rgb.shape == (CROP, CROP, 3) for c in crops)
    assert crops[0].caption.startswith(f"{top[0].well} f{top[0].field + 1}")


def test_bars_show_the_controls_once(world):
    """DMSO wells are the controls: their bar is the controls' bar. Controls spread over the
    batches: each batch, then the controls. Control wells: each in grey, then all controls."""
    from plate_concepts.viewer._feature_layers import label_value_bars

    explorer = world[3]
    reference = explorer.label_value_activation(4, "treatment").set_index("value")
    bars = label_value_bars(explorer, 4, "treatment")
    assert bars.labels == ["drug", "DMSO (controls)"] and bars.is_control == [False, True]
    assert bars.values == pytest.approx(
        [reference.loc["drug", "mean_activation"], reference.loc["controls", "mean_activation"]]
    )
    assert reference.loc["DMSO", "mean_activation"] == pytest.approx(
        reference.loc["controls", "mean_activation"]
    )  # the same tokens

    bars = label_value_bars(explorer, 4, "batch")
    assert sorted(bars.labels[:2]) == ["b1", "b2"] and bars.labels[2:] == ["controls"]
    assert bars.is_control == [False, False, True] and bars.values[0] >= bars.values[1]

    bars = label_value_bars(explorer, 4, "well", kind="fraction")
    assert sorted(bars.labels[:2]) == ["A02", "B02"]  # the treated wells
    assert bars.labels[2:] == ["A01", "A03", "B01", "B03", "controls"]
    assert bars.is_control == [False, False, True, True, True, True, True]
    fractions = explorer.label_value_activation(4, "well").set_index("value")["fraction_active"]
    assert bars.values == pytest.approx([fractions[label] for label in bars.labels])


def test_a_selection_is_resolved_once_and_drawn_as_resolved(world):
    from dataclasses import replace

    from plate_concepts.viewer._feature_layers import (
        activation_map_layer_data,
        cells_layer_data,
        top_well,
    )

    _plate, mosaic, _store, explorer = world
    selection = _selection(explorer, 1, n_crops=4)
    assert selection.well == top_well(explorer, 1, "mean") and selection.fields == (0, 1)
    assert selection.label_name == "cells" and selection.label_fields == (0, 1)
    assert list(selection.top_crops) == explorer.top_crops(1, 4, on_plate=True)
    assert selection.label_column == explorer.label_column == "treatment"
    nuclei = _selection(explorer, 1, "b3", label_name="nuclei", n_crops=0)
    assert nuclei.well == "B03" and nuclei.label_name == "nuclei" and nuclei.top_crops == ()

    # The layers draw the fields the selection names, and nothing else.
    only_second = replace(selection, fields=(1,), label_fields=(1,))
    data, kwargs, _ = activation_map_layer_data(explorer, mosaic, only_second, downsample=1)
    y0, x0, _, _ = mosaic.field_grid_box(selection.well)
    first = [mosaic.field_origin(selection.well, f) for f in (0, 1)]
    assert np.isnan(data[first[0][0] - y0, first[0][1] - x0 : first[0][1] - x0 + FIELD]).all()
    assert np.isfinite(data[first[1][0] - y0, first[1][1] - x0 : first[1][1] - x0 + FIELD]).all()
    assert kwargs["metadata"]["plate_concepts"]["fields"] == [1]
    _, kwargs, _ = cells_layer_data(explorer, mosaic, only_second)
    assert set(kwargs["features"]["field"]) == {2}  # 1-based
    assert cells_layer_data(explorer, mosaic, replace(selection, label_fields=())) is None


def test_feature_view_gathers_all_layers(world):
    from plate_concepts.viewer._feature_layers import feature_view

    _plate, mosaic, _store, explorer = world
    selection = _selection(explorer, 1, kind="mean", label_column="treatment", n_crops=4)
    view = feature_view(
        explorer,
        mosaic,
        selection,
        channel_limits=[(0, 1000), (0, 300)],
        channel_colors=[(0, 0, 1), (0, 1, 0)],
    )
    assert view.well == selection.well
    names = [kwargs["name"] for _, kwargs, _ in view.layers]
    assert names == [
        "feature 1: mean activation per well",
        "feature 1: activation map",
        "feature 1: cells",
    ]
    assert view.bars is not None and [c.crop for c in view.crops] == list(selection.top_crops)
    chosen = feature_view(explorer, mosaic, _selection(explorer, 1, "A01", n_crops=0))
    assert chosen.well == "A01" and chosen.crops == []
    assert chosen.layers[1][1]["metadata"]["plate_concepts"]["well"] == "A01"
    assert feature_view(explorer, None, selection).layers == []  # no plate shown: no layers
