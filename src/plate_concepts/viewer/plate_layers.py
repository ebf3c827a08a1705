"""Plate -> napari layer data (plain LayerDataTuples; importing this module does not import napari)."""

from __future__ import annotations

from typing import Any

import numpy as np

from plate_concepts.plates.geometry import row_letters, well_name
from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic

# Cell Painting stains -> the colour a biologist expects; others cycle through COLORMAP_CYCLE.
STAIN_COLORMAPS = {
    "dapi": "blue", "hoechst": "blue", "dna": "blue", "nuclei": "blue",
    "gfp": "green", "er": "green", "concanavalin": "green",
    "rfp": "magenta", "mito": "red", "mitotracker": "red",
    "rna": "yellow", "syto": "yellow",
    "agp": "magenta", "phalloidin": "magenta", "actin": "magenta", "wga": "magenta",
    "brightfield": "gray", "bf": "gray",
}
COLORMAP_CYCLE = ["blue", "green", "magenta", "yellow", "red", "cyan", "gray"]


def channel_colormaps(channels: list[str]) -> list[str]:
    """A colormap name per channel, by stain name where it is recognisable."""
    maps = []
    for index, name in enumerate(channels):
        key = name.lower()
        match = next((cmap for stain, cmap in STAIN_COLORMAPS.items() if stain in key), None)
        maps.append(match or COLORMAP_CYCLE[index % len(COLORMAP_CYCLE)])
    return maps


def contrast_limits(plate: Plate, max_fields: int = 8, percentiles: tuple[float, float] = (1.0, 99.8)) -> list[tuple[float, float]]:
    """Per-channel contrast limits from intensity percentiles of a few fields spread over the plate
    (their coarsest stored level, strided to at most ~512 px), so opening stays fast."""
    keys = sorted(plate.images)
    picks = [keys[i] for i in np.linspace(0, len(keys) - 1, min(max_fields, len(keys))).astype(int)]
    samples = []
    for key in picks:
        image = plate.images[key][-1]
        stride = max(1, max(image.shape[1:]) // 512)
        samples.append(np.asarray(image[:, ::stride, ::stride]).reshape(image.shape[0], -1))
    pixels = np.concatenate(samples, axis=1).astype(np.float64)
    low, high = np.percentile(pixels, percentiles, axis=1)
    return [(float(lo), float(hi if hi > lo else lo + 1)) for lo, hi in zip(low, high)]


def plate_layer_data(plate: Plate, mosaic: PlateMosaic | None = None) -> list[tuple[Any, dict, str]]:
    """One multiscale image layer per channel (additive) and a well-grid shapes layer."""
    mosaic = mosaic or PlateMosaic(plate)
    limits = contrast_limits(plate)
    layers: list[tuple[Any, dict, str]] = []
    for index, (channel, cmap) in enumerate(zip(plate.channels, channel_colormaps(plate.channels))):
        layers.append((
            [level[index] for level in mosaic.levels],
            {
                "name": f"{plate.name} {channel}",
                "multiscale": True,
                "colormap": cmap,
                "blending": "additive",
                "contrast_limits": limits[index],
                "metadata": {"plate_concepts": {"role": "plate-channel", "channel": channel, "mosaic": mosaic}},
            },
            "image",
        ))
    layers.append(well_grid_layer_data(plate, mosaic))
    layers.append(plate_header_layer_data(plate, mosaic))
    return layers


def well_grid_layer_data(plate: Plate, mosaic: PlateMosaic) -> tuple[Any, dict, str]:
    """A rectangle and name for every well of the plate format (wells without images dimmed),
    with the plate-map columns as features (napari shows them for the well under the cursor)."""
    present = set(plate.wells)
    boxes, rows, edges = [], [], []
    for well in plate.plate_format.wells():  # type: ignore[union-attr]
        y0, x0, y1, x1 = mosaic.well_box(well)
        y1, x1 = y1 - mosaic.well_gap, x1 - mosaic.well_gap
        boxes.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float))
        meta = {k: str(v) for k, v in plate.well_metadata(well).items()}
        rows.append({"well": well, "imaged": well in present, **meta})
        edges.append([1.0, 1.0, 1.0, 0.9] if well in present else [0.45, 0.45, 0.45, 0.6])
    columns = list(dict.fromkeys(k for row in rows for k in row))
    features = {c: [row.get(c, "") for row in rows] for c in columns}
    return (
        boxes,
        {
            "name": f"{plate.name} wells",
            "shape_type": "rectangle",
            "edge_color": np.array(edges),
            "face_color": "transparent",
            "edge_width": max(1.0, mosaic.well_gap / 6),
            "features": features,
            "metadata": {"plate_concepts": {"role": "well-grid", "mosaic": mosaic}},
        },
        "shapes",
    )


def plate_header_layer_data(plate: Plate, mosaic: PlateMosaic) -> tuple[Any, dict, str]:
    """Row letters down the left and column numbers along the top, as on a real plate."""
    fmt = plate.plate_format
    positions, names = [], []
    for row in range(fmt.n_rows):  # type: ignore[union-attr]
        y0, _, y1, _ = mosaic.well_box(well_name(row, 0))
        positions.append([(y0 + y1 - mosaic.well_gap) / 2, -mosaic.well_shape[1] * 0.25])
        names.append(row_letters(row))
    for col in range(fmt.n_columns):  # type: ignore[union-attr]
        _, x0, _, x1 = mosaic.well_box(well_name(0, col))
        positions.append([-mosaic.well_shape[0] * 0.25, (x0 + x1 - mosaic.well_gap) / 2])
        names.append(str(col + 1))
    return (
        np.array(positions, dtype=float),
        {
            "name": f"{plate.name} rows and columns",
            "size": 1,
            "face_color": "transparent",
            "border_color": "transparent",
            "features": {"name": names},
            "text": {"string": "{name}", "size": 11, "color": "lightgray", "anchor": "center"},
            "metadata": {"plate_concepts": {"role": "plate-header"}},
        },
        "points",
    )
