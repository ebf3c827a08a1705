"""The Plate panel: opening plates, the summary, wells by label, one well's fields on the mosaic."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REAL_DATA, TINY_FIELD

from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer._plate_views import (
    ALL_VALUES,
    mosaic_label_layer_data,
    plate_summary,
    well_field_layer_data,
    well_labels_text,
    wells_with_label,
)
from plate_concepts.viewer.state import viewer_camera

NF1 = REAL_DATA / "nf1_plate2"
FIELD = TINY_FIELD  # channels, y, x


# ---------------------------------------------------------------------- without a viewer
def test_wells_by_label_and_summary(tiny_plate):
    plate = tiny_plate
    assert wells_with_label(plate, "treatment", "DMSO") == ["B02", "C02"]
    assert wells_with_label(plate, "dose", "1.5") == ["B03"]
    assert wells_with_label(plate, "treatment", ALL_VALUES) == ["B02", "B03", "C02"]
    with pytest.raises(ValueError, match="no plate-map column 'genotype'"):
        wells_with_label(plate, "genotype", "WT")
    summary = plate_summary(plate)
    assert "3 wells imaged of a 12-well plate" in summary and "2 channels: DNA, Mito" in summary
    assert "fields of 96 x 64 px" in summary
    assert "plate map labels: treatment, dose, batch" in summary
    assert well_labels_text(plate, "B03") == "treatment: drug, dose: 1.5, batch: b1"


def test_field_layers_are_placed_on_their_mosaic_tiles(tiny_plate):
    plate = tiny_plate
    mosaic = PlateMosaic(plate)
    layers = well_field_layer_data(plate, mosaic, "c2")
    assert [kw["name"] for _, kw, _ in layers] == [
        "C02 field 1 DNA", "C02 field 1 Mito", "C02 field 1 nuclei",
        "C02 field 2 DNA", "C02 field 2 Mito", "C02 field 2 nuclei",
    ]  # fmt: skip
    mosaic_pixels = np.asarray(mosaic.levels[0])
    for data, kwargs, kind in layers:
        oy, ox = (int(v) for v in kwargs["translate"])
        assert data.shape == FIELD[1:]
        if kind == "image":
            channel = plate.channels.index(kwargs["name"].split()[-1])
            # The layer's pixels are exactly the mosaic's pixels under it.
            np.testing.assert_array_equal(
                mosaic_pixels[channel, oy : oy + 64, ox : ox + 96], np.asarray(data)
            )
    assert [kw["blending"] for _, kw, k in layers if k == "image"][:2] == [
        "translucent_no_depth",
        "additive",
    ]
    with pytest.raises(ValueError, match="no images in well D01"):
        well_field_layer_data(plate, mosaic, "D01")


def test_mosaic_label_layers_follow_the_mosaic_levels(tiny_plate):
    plate = tiny_plate
    mosaic = PlateMosaic(plate, min_size=100)  # several levels
    ((data, kwargs, kind),) = mosaic_label_layer_data(plate, mosaic)
    assert kind == "labels" and kwargs["name"] == "tiny nuclei" and kwargs["multiscale"]
    assert mosaic.n_levels > 1 and [d.shape for d in data] == [lv.shape[1:] for lv in mosaic.levels]
    oy, ox = mosaic.field_origin("B03", 1)
    assert int(data[0][oy + 15, ox + 35]) == 7 and int(data[0][oy + 5, ox + 5]) == 0
    assert int(data[1][(oy + 15) // 2, (ox + 35) // 2]) == 7
    ((single, kwargs, _),) = mosaic_label_layer_data(plate, PlateMosaic(plate))
    assert (
        not kwargs["multiscale"] and single.ndim == 2
    )  # napari rejects one-level multiscale labels


# ---------------------------------------------------------------------- in napari
class EventProxy:
    """Reads its attributes from ``__wrapped__``, which napari replaces with each new event of
    a press-move-release sequence (as its own read-only event wrapper)."""

    def __init__(self, event: object) -> None:
        self.__wrapped__ = event

    def __getattr__(self, name: str) -> object:
        return getattr(self.__wrapped__, name)


def open_in_panel(panel, qtbot, **kwargs):
    from plate_concepts.viewer.state import get_state

    worker = panel.open_plate(**kwargs)
    assert worker is not None, panel.message.value
    # The button comes back when the worker has finished (a signal could fire before we wait).
    qtbot.waitUntil(lambda: panel.open_button.enabled, timeout=30_000)
    state = get_state(panel.viewer)
    assert state.plate is not None, panel.message.value
    return state


@pytest.mark.gui
def test_panel_opens_filters_and_shows_a_well(make_napari_viewer, qtbot, tiny_zarr, tiny_plate):
    from plate_concepts.viewer.plate_panel import NO_FILTER, PlatePanel

    viewer = make_napari_viewer()
    panel = PlatePanel(viewer)
    viewer.window.add_dock_widget(panel)  # napari then resets the panel's choices on layer changes
    panel.path.value = tiny_zarr
    assert panel.format_label.value == "OME-Zarr HCS plate"
    state = open_in_panel(panel, qtbot, colors="cyan,#ff8000")
    assert [layer.name for layer in viewer.layers] == [
        "tiny DNA",
        "tiny Mito",
        "tiny wells",
        "tiny rows and columns",
    ]
    assert viewer.layers["tiny DNA"].colormap.name == "cyan"
    np.testing.assert_allclose(
        viewer.layers["tiny Mito"].colormap.colors[-1], [1, 128 / 255, 0, 1], atol=0.01
    )
    assert "3 wells imaged" in panel.summary.value and "segmentation: nuclei" in panel.summary.value

    assert panel.filter_column.choices == (NO_FILTER, "treatment", "dose", "batch")
    panel.filter_column.value = "treatment"
    assert panel.filter_value.choices == (ALL_VALUES, "DMSO", "drug")
    panel.filter_value.value = "DMSO"
    assert panel.well_list.choices == ("B02", "C02")

    panel.well_list.value = "C02"
    fields = [layer for layer in viewer.layers if layer.name.startswith("C02 ")]
    assert [layer.name for layer in fields] == [
        "C02 field 1 DNA", "C02 field 1 Mito", "C02 field 1 nuclei",
        "C02 field 2 DNA", "C02 field 2 Mito", "C02 field 2 nuclei",
    ]  # fmt: skip
    for layer in fields:
        field = int(layer.name.split()[2]) - 1
        np.testing.assert_allclose(layer.translate, state.mosaic.field_origin("C02", field))
        assert layer.data.shape == FIELD[1:]
    assert fields[0].colormap.name == "cyan"  # the mosaic's look is kept
    np.testing.assert_array_equal(fields[0].data, tiny_plate.image("C02", 0)[0])  # its pixels
    y0, x0, y1, x1 = state.mosaic.well_box("C02")
    cy, cx = viewer_camera(viewer).center[-2:]
    assert y0 <= cy <= y1 and x0 <= cx <= x1  # zoomed onto the well
    assert panel.well_list.choices == ("B02", "C02")  # napari's choice reset kept the list

    # Double-clicking another well replaces the field layers with that well's.
    from plate_concepts.viewer.app import _show_clicked_well

    assert _show_clicked_well in viewer.mouse_double_click_callbacks
    oy, ox = state.mosaic.field_origin("B03", 1)
    assert state.well == "C02"  # the viewer's selected well
    _show_clicked_well(viewer, SimpleNamespace(position=(oy + 5, ox + 5)))
    names = [layer.name for layer in viewer.layers]
    assert "B03 field 2 DNA" in names and not any(name.startswith("C02") for name in names)
    assert len(names) == 4 + 6 and state.well == "B03" and panel.shown_well() == "B03"


@pytest.mark.gui
def test_clicking_the_well_grid_shows_the_well(make_napari_viewer, qtbot, tiny_zarr):
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    from plate_concepts.viewer.plate_panel import PlatePanel

    viewer = make_napari_viewer()
    panel = PlatePanel(viewer)
    state = open_in_panel(panel, qtbot, path=tiny_zarr)
    grid = viewer.layers["tiny wells"]
    oy, ox = state.mosaic.field_origin("B02", 0)

    def event(kind, position):  # napari's canvas hands layers a proxy it re-points at each event
        fields = SimpleNamespace(type=kind, position=position, view_direction=None, dims_displayed=[0, 1],
                                 modifiers=[], button=1, is_dragging=False, handled=False)  # fmt: skip
        return EventProxy(fields)

    # A drag across wells pans: nothing is shown.
    mouse_press_callbacks(grid, event("mouse_press", (oy, ox)))
    mouse_release_callbacks(grid, event("mouse_release", (oy + 200, ox + 300)))
    assert not any(layer.name.startswith("B02 field") for layer in viewer.layers)
    mouse_press_callbacks(grid, event("mouse_press", (oy + 3, ox + 3)))
    mouse_release_callbacks(grid, event("mouse_release", (oy + 4, ox + 3)))
    assert "B02 field 1 nuclei" in [layer.name for layer in viewer.layers]


@pytest.mark.gui
def test_panel_opens_the_nf1_folder_with_its_platemap(make_napari_viewer, qtbot):
    from plate_concepts.viewer.plate_panel import PlatePanel

    viewer = make_napari_viewer()
    panel = PlatePanel(viewer)
    panel.path.value = NF1 / "images"
    assert panel.format_label.value.startswith("folder of TIFF exports")
    assert Path(panel.platemap_path.value) == NF1 / "platemap_NF1_plate2.csv"  # found next to it
    state = open_in_panel(panel, qtbot)
    assert state.plate.channels == ["DAPI", "GFP", "RFP"]
    panel.filter_column.value = "genotype"
    panel.filter_value.value = "WT"
    assert panel.well_list.choices == ("D06",)
    layers = panel.choose_well("D06")
    assert [layer.name for layer in layers] == [
        "D06 field 1 DAPI",
        "D06 field 1 GFP",
        "D06 field 1 RFP",
        "D06 field 1 cells",  # the CellProfiler masks beside the images, numbered
        "D06 field 1 cytoplasm",
        "D06 field 1 nuclei",
    ]
    assert int(layers[-1].data.max()) == 27  # nuclei of D06
    for layer in layers:
        assert layer.data.shape == (904, 1224)
        np.testing.assert_allclose(layer.translate, state.mosaic.field_origin("D06", 0))

    # A wrong channel count is reported, and the open plate stays.
    assert panel.open_plate(channel_names="DNA,ER") is not None
    qtbot.waitUntil(lambda: panel.open_button.enabled, timeout=30_000)
    assert "2 channel names ['DNA', 'ER'] given for 3 channels" in panel.message.value
    assert state.plate.name == "nf1_plate2" and "nf1_plate2 DAPI" in [
        layer.name for layer in viewer.layers
    ]
