"""Qt-free helpers of the plate panel, reader and sample: plate summaries, wells by label, and the
layer data of one well's fields and of a plate's label images (plain LayerDataTuples)."""

from __future__ import annotations

from typing import Any

from plate_concepts.plates.geometry import canonical_well, parse_well
from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.plates.platemap import (
    ROW_COLUMN_PAIRS,
    WELL_COLUMN_NAMES,
    as_text,
    label_columns,
)
from plate_concepts.viewer.plate_layers import channel_colormaps

LayerData = tuple[Any, dict, str]

ALL_VALUES = "(all wells)"
"""The value choice of the well filter that keeps every well."""

PLATE_ROLES = ("plate-channel", "well-grid", "plate-header", "plate-labels", "well-field")
"""``metadata['plate_concepts']['role']`` of the layers that belong to an open plate."""


def plate_summary(plate: Plate) -> str:
    """A few lines a biologist reads at a glance: wells, fields, channels, image size."""
    fields = sorted(set(plate.fields_per_well.values()))
    fields_text = str(fields[0]) if len(fields) == 1 else f"{fields[0]}-{fields[-1]}"
    fmt = plate.plate_format
    height, width = plate.image_shape
    pixel = f", {plate.pixel_size_um:g} µm/px" if plate.pixel_size_um else ""
    lines = [
        f"{plate.name}",
        f"{len(plate.wells)} wells imaged of a {fmt.n_wells}-well plate",  # type: ignore[union-attr]
        f"{fields_text} field(s) per well, {len(plate.images)} fields in all",
        f"{len(plate.channels)} channels: {', '.join(plate.channels)}",
        f"fields of {width} x {height} px{pixel}, {plate.dtype}",
    ]
    if plate.label_names:
        lines.append(f"segmentation: {', '.join(plate.label_names)}")
    if plate.platemap is not None:
        labels = label_columns(plate.platemap)
        lines.append(f"plate map labels: {', '.join(labels) if labels else '(none)'}")
    else:
        lines.append("no plate map")
    return "\n".join(lines)


_POSITION_COLUMNS = {n.lower() for n in WELL_COLUMN_NAMES} | {
    n.lower() for pair in ROW_COLUMN_PAIRS for n in pair
}


def well_labels_text(plate: Plate, well: str) -> str:
    """``"gene_name: NF1, genotype: WT"``: a well's plate-map row without its position columns."""
    return ", ".join(
        f"{name}: {as_text(value)}"
        for name, value in plate.well_metadata(well).items()
        if str(name).lower() not in _POSITION_COLUMNS
    )


def plate_label_columns(plate: Plate) -> list[str]:
    """Plate-map columns that group wells (see :func:`label_columns`); empty without a map."""
    return [] if plate.platemap is None else label_columns(plate.platemap)


def label_values(plate: Plate, column: str) -> list[str]:
    """Distinct values (as text) of a plate-map column over the plate's wells, sorted."""
    if plate.platemap is None or column not in plate.platemap.columns:
        raise ValueError(f"plate {plate.name!r} has no plate-map column {column!r}")
    return sorted({as_text(v) for v in plate.platemap[column]} - {""})


def wells_with_label(plate: Plate, column: str | None, value: str | None) -> list[str]:
    """The plate's imaged wells whose plate-map ``column`` reads ``value`` (compared as text);
    every imaged well when ``column`` or ``value`` is None or :data:`ALL_VALUES`."""
    if column is None or value is None or value == ALL_VALUES:
        return list(plate.wells)
    label_values(plate, column)  # checks the column
    table = plate.platemap
    assert table is not None
    return [w for w in plate.wells if w in table.index and as_text(table.at[w, column]) == value]


def channel_styles(plate: Plate) -> list[dict[str, Any]]:
    """Default colormap per channel (by stain name), for field layers drawn without a mosaic."""
    return [{"colormap": cmap} for cmap in channel_colormaps(plate.channels)]


def well_field_layer_data(
    plate: Plate, mosaic: PlateMosaic, well: str, styles: list[dict[str, Any]] | None = None
) -> list[LayerData]:
    """Full-resolution layers of every field of ``well``, placed where the mosaic shows it.

    One image layer per (field, channel), named ``"B07 field 1 DNA"`` (fields counted from 1),
    translated to the field's mosaic origin so it overlays the mosaic exactly; then the field's
    label images (``"B07 field 1 nuclei"``). ``styles`` gives each channel's colormap and
    contrast limits (by default the stain colours). The first channel of a field is drawn
    opaque over the mosaic and the others add to it, so the field shows as one composite.
    """
    well = canonical_well(well)
    if well not in plate.wells:
        raise ValueError(
            f"plate {plate.name!r} has no images in well {well}; its wells are {plate.wells}"
        )
    styles = styles or channel_styles(plate)
    if len(styles) != len(plate.channels):
        raise ValueError(f"{len(styles)} channel styles given for {len(plate.channels)} channels")
    layers: list[LayerData] = []
    for field in plate.fields(well):
        origin = tuple(float(v) for v in mosaic.field_origin(well, field))
        image = plate.image(well, field, 0)
        prefix = f"{well} field {field + 1}"
        meta = {"role": "well-field", "well": well, "field": field}
        for index, channel in enumerate(plate.channels):
            layers.append(
                (
                    image[index],
                    {
                        "name": f"{prefix} {channel}",
                        "translate": origin,
                        "blending": "translucent_no_depth" if index == 0 else "additive",
                        **styles[index],
                        "metadata": {"plate_concepts": {**meta, "channel": channel}},
                    },
                    "image",
                )
            )
        for name, labels in plate.field_labels(well, field).items():
            layers.append(
                (
                    labels,
                    {
                        "name": f"{prefix} {name}",
                        "translate": origin,
                        "opacity": 0.5,
                        "metadata": {"plate_concepts": {**meta, "labels": name}},
                    },
                    "labels",
                )
            )
    return layers


def mosaic_label_layer_data(plate: Plate, mosaic: PlateMosaic) -> list[LayerData]:
    """One multiscale labels layer per label image of the plate (``"<plate> nuclei"``), on the
    mosaic's grid (level 0 = mosaic pixels). Nuclei are shown faint; other label images
    (cells cover the whole field) start hidden so that the stains stay visible."""
    layers: list[LayerData] = []
    for name in plate.label_names:
        nuclear = name.lower() in {"nuclei", "nucleus"}
        levels = mosaic.label_levels(name)
        multiscale = len(levels) > 1  # napari 0.9 fails on one-level multiscale labels
        layers.append(
            (
                levels if multiscale else levels[0],
                {
                    "name": f"{plate.name} {name}",
                    "multiscale": multiscale,
                    "opacity": 0.35 if nuclear else 0.5,
                    "visible": nuclear,
                    "metadata": {
                        "plate_concepts": {"role": "plate-labels", "labels": name, "mosaic": mosaic}
                    },
                },
                "labels",
            )
        )
    return layers


def sorted_wells(wells: list[str]) -> list[str]:
    """Wells in plate order (row by row)."""
    return sorted(wells, key=parse_well)
