"""napari sample data: the demo plate (synthetic Cell Painting with known concepts).

Generated on first use into the demo cache (``$PLATE_CONCEPTS_CACHE`` or the user cache folder,
see :func:`plate_concepts.demo.cached_demo_plate`) and reused afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
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
    """Run :func:`cached_demo_plate` in a thread; meanwhile (sample data is loaded on the main
    thread) keep the Qt event loop turning and a napari progress bar showing fields written."""
    from napari.utils import progress
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    reported: list[tuple[int, int]] = []  # written by the thread, read here: a list is enough
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-plate") as pool:
        job = pool.submit(
            cached_demo_plate,
            **DEMO_OPTIONS,
            progress=lambda done, total: reported.append((done, total)),
        )
        with progress(total=0, desc="Demo plate") as bar:
            while not job.done():
                if reported:
                    done, total = reported[-1]
                    if bar.total != total:
                        bar.total = total
                        bar.set_description("Generating the demo plate (fields)")
                    bar.update(done - bar.n)
                if app is not None:
                    app.processEvents()
                time.sleep(poll_s)
    return job.result()
