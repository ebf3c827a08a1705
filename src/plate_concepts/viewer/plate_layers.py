"""Plate -> napari layer data (plain LayerDataTuples; importing this module does not import napari)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Channel colours and contrast limits live in the core (reports use them too).
from plate_concepts.plates.display import (  # noqa: F401
    COLORMAP_CYCLE,
    STAIN_COLORMAPS,
    channel_colormaps,
    contrast_limits,
)
from plate_concepts.plates.geometry import row_letters, well_name
from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic


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
