"""napari sample data: the demo plate (synthetic Cell Painting with known concepts).

Generated on first use into the demo cache (``$PLATE_CONCEPTS_CACHE`` or the user cache folder,
see :func:`plate_concepts.demo.cached_demo_plate`) and reused afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from plate_concepts.demo import ZARR_NAME, cached_demo_plate
from plate_concepts.plates import open_plate
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer._plate_views import mosaic_label_layer_data
from plate_concepts.viewer.plate_layers import plate_layer_data

DEMO_OPTIONS: dict[str, Any] = {"n_wells": 96, "fields_per_well": 2, "field_size": 512, "seed": 0}
"""Arguments of :func:`cached_demo_plate` for the sample (the documented default demo plate)."""


def demo_plate() -> list[tuple[Any, dict, str]]:
    """The demo plate's layers: one multiscale layer per channel on the plate mosaic, its
    ``nuclei`` and ``cells`` label images aligned on the mosaic, the well grid and headers.

    The first call generates and caches the plate (a few minutes for the default 96 wells on
    a laptop; a napari progress bar counts the fields); later calls open the cached copy.
    """
    folder = _generate_with_progress()
    plate = open_plate(folder / ZARR_NAME)
    mosaic = PlateMosaic(plate)
    layers = plate_layer_data(plate, mosaic)
    n_channels = len(plate.channels)
    # Labels right above the channel images, under the well grid and headers.
    return [*layers[:n_channels], *mosaic_label_layer_data(plate, mosaic), *layers[n_channels:]]


def _generate_with_progress(poll_s: float = 0.05) -> Path:
    """Run :func:`cached_demo_plate` as a background job; meanwhile (sample data is loaded on
    the main thread) keep the Qt event loop turning and a napari progress bar counting the
    fields written."""
    from napari.utils import progress
    from qtpy.QtWidgets import QApplication

    from plate_concepts.viewer._jobs import Progress, start_job

    outcome: dict[str, Any] = {}
    with progress(total=0, desc="Demo plate") as bar:

        def show(update: Progress) -> None:
            if bar.total != update.total:
                bar.total = update.total
                bar.set_description("Generating the demo plate (fields)")
            bar.update(update.done - bar.n)

        job = start_job(
            lambda job: cached_demo_plate(**DEMO_OPTIONS, progress=job.progress("fields")),
            progress=show,
            returned=lambda folder: outcome.update(folder=folder),
            errored=lambda error: outcome.update(error=error),
        )
        while job.running:
            QApplication.processEvents()
            time.sleep(poll_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["folder"]
