"""Putting a plate into a napari viewer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer.plate_layers import plate_layer_data
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari


def show_plate(viewer: napari.Viewer, plate: Plate) -> PlateMosaic:
    """Add a plate's channel layers and well grid, and show the plate-map labels of the well
    under the cursor in the status bar and a text overlay."""
    from napari.layers import Layer

    mosaic = PlateMosaic(plate)
    for data, kwargs, layer_type in plate_layer_data(plate, mosaic):
        viewer.add_layer(Layer.create(data, kwargs, layer_type))

    def describe_well(_viewer: napari.Viewer, event: object) -> None:
        y, x = viewer.cursor.position[-2:]
        well = mosaic.well_at(y, x)
        if well is None:
            viewer.text_overlay.text = ""
            return
        labels = ", ".join(f"{k}: {v}" for k, v in plate.well_metadata(well).items())
        hit = mosaic.locate(y, x)
        where = f"{well} field {hit.field + 1}" if hit else well
        viewer.text_overlay.text = f"{where}  {labels}".strip()
        viewer.status = viewer.text_overlay.text

    viewer.mouse_move_callbacks.append(describe_well)
    viewer.text_overlay.visible = True
    viewer.text_overlay.color = "white"
    viewer.text_overlay.font_size = 12
    viewer.layers.selection.active = viewer.layers[-len(plate.channels) - 2]
    viewer.reset_view()
    get_state(viewer).set_plate(plate, mosaic)
    return mosaic
