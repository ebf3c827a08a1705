"""The plate in napari: reader, layers and a rendered screenshot (needs a display: Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REAL_DATA as REAL

NF1 = REAL / "nf1_plate2"


def test_manifest_validates_and_is_installed():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-plate-concepts")
    manifest.validate_imports()
    assert manifest.name == "napari-plate-concepts"
    assert manifest.contributions.readers


def test_reader_declines_what_is_not_a_plate(tmp_path):
    from plate_concepts.viewer.reader import napari_get_reader

    (tmp_path / "notes.txt").write_text("hello")
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader(str(tmp_path / "missing.zarr")) is None
    assert napari_get_reader(str(NF1 / "images")) is not None


def test_plate_layers_line_up_with_the_mosaic():
    from plate_concepts.plates import open_plate
    from plate_concepts.plates.mosaic import PlateMosaic
    from plate_concepts.viewer.plate_layers import channel_colormaps, plate_layer_data

    plate = open_plate(NF1 / "images", platemap=NF1 / "platemap_NF1_plate2.csv")
    mosaic = PlateMosaic(plate)
    layers = plate_layer_data(plate, mosaic)
    images = [layer for layer in layers if layer[2] == "image"]
    assert [kw["name"].split()[-1] for _, kw, _ in images] == ["DAPI", "GFP", "RFP"]
    assert channel_colormaps(["DAPI", "GFP", "RFP"]) == ["blue", "green", "magenta"]
    for data, kwargs, _ in images:
        assert kwargs["blending"] == "additive" and kwargs["multiscale"]
        assert data[0].shape == mosaic.shape
        low, high = kwargs["contrast_limits"]
        assert 0 <= low < high <= 65535
    boxes, grid_kwargs, _ = next(layer for layer in layers if layer[2] == "shapes")
    assert len(boxes) == 96
    index = grid_kwargs["features"]["well"].index("D06")
    assert grid_kwargs["features"]["genotype"][index] == "WT"
    oy, ox = mosaic.field_origin("D06", 0)
    (y0, x0), (y1, x1) = boxes[index].min(axis=0), boxes[index].max(axis=0)
    assert y0 <= oy and x0 <= ox and oy + 904 <= y1 and ox + 1224 <= x1


@pytest.mark.gui
def test_plate_opens_in_napari_and_renders(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(NF1 / "images"), plugin="napari-plate-concepts")
    assert [layer.name for layer in layers][:3] == ["nf1_plate2 DAPI", "nf1_plate2 GFP", "nf1_plate2 RFP"]
    assert layers[0].multiscale
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 5  # the plate is drawn, not a blank canvas


@pytest.mark.gui
def test_hovering_a_well_shows_its_plate_map_labels(make_napari_viewer):
    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.app import show_plate

    viewer = make_napari_viewer()
    plate = open_plate(NF1 / "images", platemap=NF1 / "platemap_NF1_plate2.csv")
    mosaic = show_plate(viewer, plate)
    oy, ox = mosaic.field_origin("D06", 0)
    viewer.cursor.position = (oy + 100, ox + 100)
    for callback in viewer.mouse_move_callbacks:
        callback(viewer, None)
    from plate_concepts.viewer.app import text_overlay
    from plate_concepts.viewer.state import viewer_camera

    assert "D06" in text_overlay(viewer).text and "genotype: WT" in text_overlay(viewer).text
    assert np.isfinite(viewer_camera(viewer).zoom)
