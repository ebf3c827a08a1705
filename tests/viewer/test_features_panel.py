"""The Features panel on a tiny plate shown in napari: the table (sort, search, dead features),
and selecting a feature (click or arrow keys) -> heatmap, activation map and cell layers that
line up with the plate mosaic, crops and bars."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FEATURE_FIELD as FIELD
from qtpy.QtCore import Qt

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def world(feature_world):
    return feature_world


@pytest.fixture
def shown(features_viewer, world):
    """(viewer, state, panel, mosaic, explorer): the world's plate shown, the panel docked."""
    plate, _mosaic, store, explorer = world
    return (*features_viewer(plate, store, explorer), explorer)


def _feature_layers(viewer):
    from plate_concepts.viewer._feature_layers import METADATA_KEY

    return {
        layer.metadata[METADATA_KEY]["role"]: layer
        for layer in viewer.layers
        if layer.metadata.get(METADATA_KEY, {}).get("role", "").startswith("feature-")
    }


def _visible_features(panel):
    return [int(panel.proxy.index(r, 0).data()) for r in range(panel.proxy.rowCount())]


def _column(panel, name):
    return panel.model.shown.index(name)


def test_table_lists_sorts_and_filters_features(shown, qtbot):
    _viewer, _state, panel, _mosaic, explorer = shown
    table = explorer.feature_table("treatment")
    assert panel.label_column.currentText() == "treatment"
    alive = table.loc[~table["dead"], "feature"].tolist()
    assert sorted(_visible_features(panel)) == sorted(alive)  # dead features hidden by default
    panel.hide_dead.setChecked(False)
    assert panel.proxy.rowCount() == explorer.n_features

    panel.table.sortByColumn(
        _column(panel, "frequency"), Qt.SortOrder.AscendingOrder
    )  # = a header click
    shown_freq = [
        panel.proxy.index(r, _column(panel, "frequency")).data(Qt.ItemDataRole.UserRole)
        for r in range(panel.proxy.rowCount())
    ]
    assert shown_freq == sorted(shown_freq)

    # The search finds label values: most selective for, or raised most by (once profiled).
    qtbot.waitUntil(lambda: "top values (z)" in panel.model.shown, timeout=20_000)
    panel.search.setText("dru")
    visible = _visible_features(panel)
    top_values = panel.model.table.set_index("feature")["top values (z)"]
    expected = [
        f for f in table["feature"] if table.loc[f, "best_value"] == "drug" or "drug" in top_values[f]
    ]
    assert sorted(visible) == sorted(expected) and 0 < len(visible) < explorer.n_features
    panel.search.setText(str(expected[0]))  # a feature number
    assert _visible_features(panel) == [expected[0]]
    panel.search.clear()
    assert panel.proxy.rowCount() == explorer.n_features

    panel.label_column.setCurrentText("batch")
    values = {panel.model.table["most selective for"].iat[r] for r in range(len(panel.model.table))}
    assert values <= {"b1", "b2"}


def test_selecting_a_feature_shows_aligned_layers(shown, qtbot):
    viewer, state, panel, mosaic, explorer = shown
    feature = int(panel.proxy.index(0, 0).data())
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.table.setCurrentIndex(panel.proxy.index(0, 0))  # a click on the first row
    assert state.feature == feature
    layers = _feature_layers(viewer)
    assert set(layers) == {"feature-heatmap", "feature-map", "feature-cells"}

    heatmap = layers["feature-heatmap"]
    assert heatmap.name == f"feature {feature}: mean activation per well"
    assert np.allclose(np.asarray(heatmap.data.shape) * heatmap.scale, mosaic.shape)
    assert heatmap.colormap.name == "inferno"
    values = explorer.well_values(feature, "mean")
    for well in ("A01", "B02"):
        oy, ox = mosaic.field_origin(well, 0)
        index = np.round((np.array([oy + 10, ox + 10]) - heatmap.translate) / heatmap.scale).astype(
            int
        )
        assert heatmap.data[tuple(index)] == pytest.approx(values[well])

    well = values.idxmax()
    activation = layers["feature-map"]
    assert activation.name == f"feature {feature}: activation map"
    assert activation.metadata["plate_concepts"]["well"] == well
    factor = activation.scale[0]
    y0, x0, _, _ = mosaic.well_box(well)
    assert np.allclose(activation.translate, (y0 + (factor - 1) / 2, x0 + (factor - 1) / 2))
    oy, ox = mosaic.field_origin(well, 1)
    block = activation.data[int((oy - y0) // factor) :, int((ox - x0) // factor) :][
        : int(FIELD // factor), : int(FIELD // factor)
    ]
    np.testing.assert_allclose(block, explorer.field_map(feature, well, 1, "cosine", int(factor)))

    cells = layers["feature-cells"]
    assert cells.name == f"feature {feature}: cells"
    assert np.allclose(cells.translate, (y0, x0)) and np.allclose(cells.scale, (1, 1))
    field0 = cells.features[cells.features["field"] == 1].sort_values("cell")
    expected = explorer.cell_values(feature, well, 0, "cells")
    np.testing.assert_allclose(field0["mean activation"], expected["mean_activation"])
    brightest = int(field0.loc[field0["mean activation"].idxmax(), "index"])
    # The layer's pixel at a cell is that cell's id, and the colormap paints it.
    ys, _xs = np.nonzero(cells.data == brightest)
    assert len(ys) and cells.colormap.map(np.array([brightest]))[0][3] > 0

    # Results: the objects cannot be painted by accident; every layer shows its value range
    # (napari's colour bar for the images, the panel's scale for the objects).
    assert not cells.editable and cells.mode == "pan_zoom"
    assert heatmap.colorbar.visible and activation.colorbar.visible
    assert tuple(activation.contrast_limits) == pytest.approx(
        (min(0.0, np.nanmin(activation.data)), np.nanmax(activation.data))
    )
    low, high = cells.metadata["plate_concepts"]["limits"]
    assert low <= cells.features["mean activation"].min() and high == pytest.approx(
        cells.features["mean activation"].max()
    )
    assert panel.scales.rows == [
        ("wells: mean activation", *heatmap.contrast_limits),
        ("activation map: cosine", *activation.contrast_limits),
        ("cells: mean activation", low, high),
    ]
    heatmap.contrast_limits = (0.0, 0.5)  # the user's contrast: the scale follows
    assert panel.scales.rows[0] == ("wells: mean activation", 0.0, 0.5)
    assert panel.scales.tooltip_at(1) == "wells: mean activation: 0 to 0.5"

    # DMSO wells are the controls: one bar for them.
    assert panel.bars.labels == ["drug", "DMSO (controls)"]
    visible = [b for b in panel.crop_buttons if not b.isHidden()]
    top = explorer.top_crops(feature, 12)
    assert len(visible) == len(top) and visible[0].text().startswith(
        f"{top[0].well} f{top[0].field + 1}"
    )


def test_arrow_keys_kind_and_well_update_the_same_layers(shown, qtbot):
    viewer, state, panel, mosaic, _explorer = shown
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.table.setCurrentIndex(panel.proxy.index(0, 0))
    before = _feature_layers(viewer)
    second = int(panel.proxy.index(1, 0).data())
    panel.table.setFocus()
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        qtbot.keyClick(panel.table, Qt.Key.Key_Down)
    assert state.feature == second
    after = _feature_layers(viewer)
    assert all(
        after[role] is before[role] for role in before
    )  # updated in place: user settings kept
    assert after["feature-heatmap"].name == f"feature {second}: mean activation per well"

    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.kind.setCurrentText("fraction of active crops")
    heatmap = _feature_layers(viewer)["feature-heatmap"]
    assert heatmap.name == f"feature {second}: fraction of active crops per well"
    assert heatmap.contrast_limits[1] <= 1.0 + 1e-6

    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.well.setCurrentText("A03")
    activation = _feature_layers(viewer)["feature-map"]
    y0, x0, _, _ = mosaic.well_box("A03")
    assert activation.metadata["plate_concepts"]["well"] == "A03"
    assert np.allclose(
        activation.translate,
        (y0 + (activation.scale[0] - 1) / 2, x0 + (activation.scale[1] - 1) / 2),
    )

    panel.go_to_crop(0)
    crop = panel._view.crops[0].crop
    centre = mosaic.to_mosaic(
        crop.well, crop.field, crop.crop_y + crop.crop_size / 2, crop.crop_x + crop.crop_size / 2
    )
    from plate_concepts.viewer.state import viewer_camera

    assert np.allclose(viewer_camera(viewer).center[-2:], centre)
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)


def test_the_plate_panels_well_is_followed(shown, qtbot):
    from plate_concepts.viewer.app import show_well

    viewer, state, panel, _mosaic, _explorer = shown
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(2)
    assert state.well is None and panel.chosen_well() is None  # the feature's top well
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        show_well(viewer, "b1")  # as the Plate panel does
    assert state.well == "B01" and panel.chosen_well() == "B01"
    layers = _feature_layers(viewer)
    assert layers["feature-map"].metadata["plate_concepts"]["well"] == "B01"
    assert set(layers["feature-cells"].features["well"]) == {"B01"}
    names = [layer.name for layer in viewer.layers]
    last_field = max(
        i
        for i, layer in enumerate(viewer.layers)
        if layer.metadata.get("plate_concepts", {}).get("role") == "well-field"
    )
    assert (
        names.index("feature 2: activation map") > last_field
        and names.index("feature 2: cells") > last_field
    )
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)


def test_a_new_dictionary_clears_the_old_features(shown, qtbot):
    viewer, state, panel, _mosaic, explorer = shown
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(0)
    state.set_dictionary(explorer.estimator)  # e.g. a new fit: the explorer is rebuilt
    assert _feature_layers(viewer) == {} and panel.model.rowCount() == 0
    assert all(button.isHidden() for button in panel.crop_buttons)
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        state.set_explorer(explorer)  # ready again: the selected feature comes back
    assert set(_feature_layers(viewer)) == {"feature-heatmap", "feature-map", "feature-cells"}
    assert panel.model.rowCount() == explorer.n_features
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)


def test_feature_layers_render(features_viewer, world, qtbot):
    plate, _mosaic, store, explorer = world
    viewer, _state, panel, _mosaic = features_viewer(plate, store, explorer, show=True)
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(1)
    for layer in viewer.layers:  # the feature layers alone
        layer.visible = (
            layer.metadata.get("plate_concepts", {}).get("role", "").startswith("feature-")
        )
    viewer.reset_view()
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].std() > 5  # coloured wells and cells, not a blank canvas
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)


def test_preloaded_features_are_shown_at_once_and_in_place(features_viewer, world, qtbot):
    """After preload the panel computes a selection on the GUI thread (no worker) and writes
    the new values into the same layers' arrays; without it, a worker does the reading."""
    from plate_concepts.analysis.explorer import FeatureExplorer

    plate, _mosaic, store, world_explorer = world
    explorer = FeatureExplorer(store, world_explorer.estimator, plate=plate).prepare()
    viewer, _state, panel, mosaic = features_viewer(plate, store, explorer)
    panel.well.setCurrentText("A02")
    shown = []
    panel.feature_shown.connect(shown.append)

    panel.select_feature(0)  # nothing in memory yet: a worker reads the fields
    assert panel.is_busy and shown == []
    explorer.preload()  # meanwhile; then a newer request is answered from memory at once
    panel.kind.setCurrentText("fraction of active crops")
    assert shown == [0]
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)
    qtbot.wait(50)
    # The worker's older view (mean activation) came back last and was not shown.
    heatmap = _feature_layers(viewer)["feature-heatmap"]
    assert heatmap.name == "feature 0: fraction of active crops per well" and shown == [0]
    panel.kind.setCurrentText("mean activation")
    layers = _feature_layers(viewer)
    arrays = {role: layer.data for role, layer in layers.items()}
    for feature in (1, 2):
        panel.select_feature(feature)
        assert shown[-1] == feature and not panel.is_busy  # shown before select_feature returned
        after = _feature_layers(viewer)
        assert all(after[role] is layers[role] for role in layers)
        assert all(after[role].data is arrays[role] for role in arrays)  # the same arrays
        activation = after["feature-map"]
        factor = int(activation.scale[0])
        y0, x0, _, _ = mosaic.well_box("A02")
        oy, ox = mosaic.field_origin("A02", 1)
        block = activation.data[(oy - y0) // factor :, (ox - x0) // factor :][
            : FIELD // factor, : FIELD // factor
        ]
        np.testing.assert_allclose(block, explorer.field_map(feature, "A02", 1, "cosine", factor))
        cells = after["feature-cells"]
        field1 = cells.features[cells.features["field"] == 2].sort_values("cell")
        np.testing.assert_allclose(
            field1["mean activation"],
            explorer.cell_values(feature, "A02", 1, "cells")["mean_activation"],
        )
        assert after["feature-heatmap"].data[
            tuple(
                np.round(
                    (np.array([oy, ox]) - after["feature-heatmap"].translate)
                    / after["feature-heatmap"].scale
                ).astype(int)
            )
        ] == pytest.approx(explorer.well_values(feature)["A02"])


def test_a_dictionary_file_opened_alone_is_prepared_for_the_features_panel(
    make_napari_viewer, world, qtbot, tmp_path
):
    """File > Open of a dictionary with no Dictionary panel docked: the Features panel's
    preparer encodes the store and reads ahead, and the features are listed."""
    from plate_concepts.viewer._explorer_jobs import explorer_preparer
    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.features_panel import FeaturesPanel
    from plate_concepts.viewer.state import get_state

    plate, _mosaic, store, explorer = world
    path = tmp_path / "dictionary.safetensors"
    explorer.estimator.save(path)
    viewer = make_napari_viewer()
    show_plate(viewer, plate)
    state = get_state(viewer)
    state.set_store(store)
    panel = FeaturesPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Features")
    assert "No features yet" in panel.status.text() and panel.model.rowCount() == 0
    preparer = explorer_preparer(viewer)
    statuses = []
    preparer.status_changed.connect(statuses.append)
    viewer.open(str(path), plugin="napari-plate-concepts")
    qtbot.waitUntil(lambda: state.explorer is not None and not preparer.is_busy, timeout=30_000)
    assert state.explorer.n_features == explorer.n_features
    assert panel.model.rowCount() == explorer.n_features and "features over" in panel.status.text()
    assert statuses[0] == "Encoding the store with the dictionary…"
    assert "in memory" in statuses[-1]
    assert state.explorer.in_memory("A01", label_name="cells")


def test_the_objects_coloured_can_be_nuclei(shown, qtbot):
    viewer, _state, panel, _mosaic, explorer = shown
    assert [panel.objects.itemText(i) for i in range(panel.objects.count())] == ["cells", "nuclei"]
    assert panel.objects.currentText() == "cells"  # whole cells first
    panel.well.setCurrentText("A02")
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(1)
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.objects.setCurrentText("nuclei")
    layers = _feature_layers(viewer)
    objects = layers["feature-cells"]
    assert objects.name == "feature 1: nuclei"
    assert objects.metadata["plate_concepts"]["label_name"] == "nuclei"
    field1 = objects.features[objects.features["field"] == 1].sort_values("cell")
    expected = explorer.cell_values(1, "A02", 0, "nuclei")
    np.testing.assert_allclose(field1["mean activation"], expected["mean_activation"])
    assert (field1["area (px)"].to_numpy() < explorer.cell_values(1, "A02", 0)["area"]).all()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)


def test_a_new_plate_with_the_same_layout_redraws_its_objects(features_viewer, world, qtbot):
    """Same wells, fields and label name, another plate: the objects layer shows the new
    plate's objects, not the old ones recoloured."""
    import dask.array as da

    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.plates.model import Plate

    plate, _mosaic, store, explorer = world
    viewer, state, panel, _mosaic = features_viewer(plate, store, explorer)
    panel.well.setCurrentText("A02")
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(1)
    before = _feature_layers(viewer)["feature-cells"].data.copy()
    moved = Plate(
        name=plate.name,
        channels=plate.channels,
        images=plate.images,
        labels={
            key: {"cells": [da.from_array(np.roll(np.asarray(named["cells"][0]), 7, axis=1))]}
            for key, named in plate.labels.items()
        },
        reader="test",
        platemap=plate.platemap,
    )
    other = FeatureExplorer(store, explorer.estimator, plate=moved).prepare()
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        state.set_explorer(other)
    from plate_concepts.viewer._feature_layers import cells_layer_data, resolve_selection

    assert panel.well.currentText() == "A02"  # the user's choice outlives the explorer
    after = _feature_layers(viewer)["feature-cells"].data
    expected, _, _ = cells_layer_data(other, state.mosaic, resolve_selection(other, 1, well="A02"))
    np.testing.assert_array_equal(after, expected)
    assert (after > 0).sum() == (before > 0).sum() and not np.array_equal(after > 0, before > 0)
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=20_000)


def test_cut_short_text_shows_in_full_as_a_tooltip(shown, qtbot):
    from plate_concepts.viewer._table_tooltips import elided_text

    _viewer, _state, panel, _mosaic, _explorer = shown
    panel.label_column.setCurrentText("well")  # any obs column: its values name wells
    column = panel.model.shown.index("most selective for")
    row = next(r for r in range(panel.proxy.rowCount()) if panel.proxy.index(r, column).data())
    index = panel.proxy.index(row, column)
    header = panel.table.horizontalHeader()
    header.resizeSection(column, 200)
    assert elided_text(panel.table, index) is None  # it fits
    header.resizeSection(column, 12)
    assert elided_text(panel.table, index) == index.data()
    assert elided_text(panel.table, panel.proxy.index(row, 0)) is None  # numbers fit

    # The bar chart's labels are cut short too: each bar's tooltip has its label and value.
    panel.bars.set_data(
        "t", ["a very long label value indeed", "controls"], [0.5, 0.25], [False, True]
    )
    row_height = panel.bars.fontMetrics().height() + 3
    assert panel.bars.tooltip_at(row_height + 2 + row_height / 2) == (
        "a very long label value indeed: 0.5"
    )
    assert panel.bars.tooltip_at(row_height + 2 + 1.5 * row_height) == "controls: 0.25"
    assert panel.bars.tooltip_at(1) is None
