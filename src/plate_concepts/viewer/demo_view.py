"""Showing a finished demo run in napari: the plate, its labels, and the Features panel on the
feature that best picks out one planted concept."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer._plate_views import mosaic_label_layer_data
from plate_concepts.viewer.app import show_plate
from plate_concepts.viewer.plate_layers import plate_layer_data
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari

    from plate_concepts.demo_pipeline import DemoRun


def show_demo_run(viewer: napari.Viewer, run: DemoRun, concept: str = "nuclear-enlargement") -> int:
    """Open the run's plate, store, dictionary and explorer in ``viewer``, dock the Features
    panel, and select the best feature for ``concept``. Returns that feature."""
    explorer = run.explorer
    plate = explorer.plate
    mosaic = PlateMosaic(plate)
    layers = plate_layer_data(plate, mosaic)
    n_channels = len(plate.channels)
    show_plate(viewer, plate, mosaic=mosaic,
               layer_data=[*layers[:n_channels], *mosaic_label_layer_data(plate, mosaic), *layers[n_channels:]])
    state = get_state(viewer)
    state.set_store(explorer.store)
    viewer.window.add_plugin_dock_widget("napari-plate-concepts", "Features")
    state.set_dictionary(explorer.estimator)
    state.set_explorer(explorer)
    rows = run.report[run.report["concept"] == concept]
    if rows.empty:
        raise ValueError(f"no planted concept {concept!r}; the report has {list(run.report['concept'])}")
    feature = int(rows["feature"].iloc[0])
    state.select_feature(feature)
    return feature
