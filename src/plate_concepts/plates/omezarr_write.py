"""Writing OME-Zarr high-content-screening (HCS) plates: NGFF 0.4 (zarr v2) and 0.5 (zarr v3).

:func:`write_ome_zarr_plate` writes any :class:`Plate` field by field (image pyramid, omero
channel metadata, label pyramids) into a hidden sibling folder renamed into place at the end; the
plate map goes under the ``plate_concepts`` attribute key (see :mod:`plate_concepts.plates.omezarr`,
which reads it back).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from ome_zarr.format import Format, FormatV04, FormatV05

with warnings.catch_warnings():
    # ome_zarr.writer builds a deprecated Scaler as a default argument at import time.
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import (
        add_metadata,
        write_multiscale,
        write_multiscale_labels,
        write_plate_metadata,
        write_well_metadata,
    )

from plate_concepts._io import atomic_path, replaceable_output
from plate_concepts._progress import ProgressLike, progress_ticker
from plate_concepts.plates.geometry import canonical_well, parse_well, row_letters
from plate_concepts.plates.model import FieldKey, Plate

__all__ = ["NAMESPACE", "write_ome_zarr_plate"]

NAMESPACE = "plate_concepts"
"""Attribute key (outside the OME namespace) that holds this package's extra metadata."""

_SUPPORTED_VERSIONS = ("0.4", "0.5")
_MIN_SIDE_FOR_DOWNSAMPLING = 256
_DEFAULT_COLORS = ["0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF"]
_NAMED_COLORS = {
    "red": "FF0000", "green": "00FF00", "blue": "0000FF", "magenta": "FF00FF", "cyan": "00FFFF",
    "yellow": "FFFF00", "white": "FFFFFF", "gray": "FFFFFF", "grey": "FFFFFF",
}  # fmt: skip


def write_ome_zarr_plate(
    plate: Plate,
    path: str | os.PathLike,
    ngff_version: str = "0.5",
    n_levels: int | None = None,
    chunks: tuple[int, int, int] = (1, 512, 512),
    overwrite: bool = False,
    progress: ProgressLike | None = None,
) -> Path:
    """Write ``plate`` as an OME-Zarr HCS plate, field by field, and return its path.

    Parameters
    ----------
    plate
        The plate; its level-0 images (and label images) are written, lower levels recomputed.
    path
        Destination folder (conventionally ``name.ome.zarr``).
    ngff_version
        ``"0.5"`` (zarr v3) or ``"0.4"`` (zarr v2, the most widely readable).
    n_levels
        Resolution levels per field. Default: halve until the smaller side is below 256 px.
        Images are downsampled by a 2 x 2 mean, label images by taking every second pixel so
        that object ids survive; both drop an odd last row/column, so their levels match.
    chunks
        Zarr chunk shape (channel, y, x) of images, clipped to each level; label images use
        the (y, x) part. One channel per chunk lets a viewer fetch channels independently.
    overwrite
        Replace an existing ``path`` that is an OME-Zarr plate (or an empty folder); otherwise an
        existing path raises FileExistsError. A path that is, holds or lies inside the plate's
        source is never replaced.
    progress
        Called after each field: a tqdm-like object (``update(1)``), ``True`` for a tqdm bar,
        or a callable ``progress(fields_done, fields_total)``.

    The plate is built in a hidden sibling folder and renamed onto ``path`` only when complete,
    so an error or interruption leaves neither a partial plate nor the temporary folder.
    """
    if ngff_version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"ngff_version must be one of {_SUPPORTED_VERSIONS}, got {ngff_version!r}")
    fmt = FormatV04() if ngff_version == "0.4" else FormatV05()
    # Checked before any work: only an OME-Zarr plate is replaced, never the plate's own source.
    sources = [plate.source] if plate.source and "://" not in plate.source else []
    destination = replaceable_output(path, "ome-zarr-plate", overwrite=overwrite, sources=sources)
    n_levels = _check_n_levels(n_levels, plate.image_shape, destination)
    if len(chunks) != 3 or min(chunks) < 1:
        raise ValueError(f"chunks must be three positive sizes (channel, y, x), got {chunks}")
    colors = _omero_colors(plate)
    platemap = _platemap_rows(plate)
    assert plate.plate_format is not None  # Plate.__post_init__ always sets it
    row_names = [row_letters(r) for r in range(plate.plate_format.n_rows)]
    column_names = [str(c + 1) for c in range(plate.plate_format.n_columns)]
    well_paths = {well: _well_path(well) for well in plate.wells}
    with (
        progress_ticker(progress, len(plate.images), "writing OME-Zarr plate", "field") as tick,
        atomic_path(destination, overwrite, "ome-zarr-plate", sources) as tmp,
    ):
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=fmt.zarr_format)
        write_plate_metadata(
            root,
            rows=row_names,
            columns=column_names,
            wells=[well_paths[w] for w in plate.wells],
            fmt=fmt,
            field_count=max(plate.fields_per_well.values()),
            name=plate.name,
        )
        if platemap is not None:
            root.attrs[NAMESPACE] = {"platemap": platemap["plate"]}
        done = 0
        for well in plate.wells:
            well_group = root.require_group(well_paths[well])
            fields = plate.fields(well)
            write_well_metadata(well_group, [{"path": str(f)} for f in fields], fmt=fmt)
            if platemap is not None and well in platemap["wells"]:
                well_group.attrs[NAMESPACE] = {"platemap": platemap["wells"][well]}
            for field_index in fields:
                field_group = well_group.require_group(str(field_index))
                _write_field(field_group, plate, (well, field_index), fmt, n_levels, chunks, colors)
                done += 1
                tick(done)
    return destination


def _well_path(well: str) -> str:
    """'B07' -> 'B/7': row letters and unpadded column number, the usual HCS group names."""
    row, column = parse_well(well)
    return f"{row_letters(row)}/{column + 1}"


def _write_field(
    group: zarr.Group,
    plate: Plate,
    key: FieldKey,
    fmt: Format,
    n_levels: int,
    chunks: tuple[int, int, int],
    colors: list[str],
) -> None:
    """One field: its image pyramid, omero channel metadata and its label pyramids."""
    well, field_index = key
    image = plate.image(well, field_index)
    with warnings.catch_warnings():
        # Explicit per-level transforms are deprecated in ome-zarr-py in favour of a base scale
        # from which it derives inexact ones (see _level_transforms); keep the exact ones.
        warnings.filterwarnings("ignore", ".*coordinate_transformations", DeprecationWarning)
        _write_pyramids(group, plate, key, image, fmt, n_levels, chunks)
    # omero after the pixels: its display window comes from the written lowest level (cheap).
    lowest = group[f"s{n_levels - 1}"][...]
    add_metadata(group, {"omero": _omero(plate.channels, colors, lowest)}, fmt=fmt)
    if "labels" in group and fmt.version != "0.4":
        # ome-zarr-py leaves out the version that NGFF 0.5 requires on the labels group.
        add_metadata(group["labels"], {"version": fmt.version}, fmt=fmt)


def _write_pyramids(
    group: zarr.Group,
    plate: Plate,
    key: FieldKey,
    image: da.Array,
    fmt: Format,
    n_levels: int,
    chunks: tuple[int, int, int],
) -> None:
    well, field_index = key
    write_multiscale(
        _image_pyramid(image, n_levels),
        group,
        fmt=fmt,
        axes=_axes("cyx", plate.pixel_size_um),
        storage_options=_level_chunks(chunks, image.shape, n_levels),
        name=f"{well} field {field_index}",
        coordinate_transformations=_level_transforms(3, n_levels, plate.pixel_size_um),
    )
    for name, levels in sorted(plate.labels.get(key, {}).items()):
        label = _check_label(levels[0], name, image.shape[1:], well, field_index)
        write_multiscale_labels(
            _label_pyramid(label, n_levels),
            group,
            name=name,
            fmt=fmt,
            axes=_axes("yx", plate.pixel_size_um),
            storage_options=_level_chunks(chunks[1:], label.shape, n_levels),
            label_metadata={"source": {"image": "../../"}},
            coordinate_transformations=_level_transforms(2, n_levels, plate.pixel_size_um),
        )


def _check_n_levels(n_levels: int | None, shape: tuple[int, int], destination: Path) -> int:
    smaller = min(shape)
    if n_levels is None:
        n_levels = 1
        while smaller >= _MIN_SIDE_FOR_DOWNSAMPLING:
            smaller //= 2
            n_levels += 1
        return n_levels
    if n_levels < 1 or min(shape) >> (n_levels - 1) < 1:
        raise ValueError(
            f"n_levels={n_levels} for {destination}: fields of {shape[0]} x {shape[1]} px allow "
            f"1 to {int(np.log2(min(shape))) + 1} levels"
        )
    return n_levels


def _level_chunks(
    chunks: Sequence[int], shape: Sequence[int], n_levels: int
) -> list[dict[str, Any]]:
    """Zarr chunks per level, clipped to the level's shape (the last two axes halve per level)."""
    options = []
    for level in range(n_levels):
        level_shape = [*shape[:-2], *(size >> level for size in shape[-2:])]
        options.append(
            {"chunks": tuple(min(c, s) for c, s in zip(chunks, level_shape, strict=True))}
        )
    return options


def _image_pyramid(image: da.Array, n_levels: int) -> list[da.Array]:
    """Full resolution, then 2 x 2 means (rounded back to integer dtypes), all lazy."""
    levels = [image]
    for _ in range(n_levels - 1):
        mean = da.coarsen(np.mean, levels[-1], {1: 2, 2: 2}, trim_excess=True)
        if np.issubdtype(image.dtype, np.integer):
            mean = da.rint(mean)
        levels.append(mean.astype(image.dtype))
    return levels


def _label_pyramid(label: da.Array, n_levels: int) -> list[da.Array]:
    """Full resolution, then every second pixel (no mixing of ids), trimmed like the images."""
    levels = [label]
    for _ in range(n_levels - 1):
        y, x = levels[-1].shape
        levels.append(levels[-1][: y - y % 2 : 2, : x - x % 2 : 2])
    return levels


def _check_label(
    label: da.Array, name: str, shape: tuple[int, ...], well: str, field: int
) -> da.Array:
    if "/" in name or not name.strip():
        raise ValueError(
            f"label image name {name!r} (well {well} field {field}) must be a non-empty name "
            "without '/'"
        )
    if label.shape != tuple(shape):
        raise ValueError(
            f"label image {name!r} of well {well} field {field} is {label.shape}; "
            f"expected (y, x) = {tuple(shape)}"
        )
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"label image {name!r} of well {well} field {field} is {label.dtype}; expected integers"
        )
    return label


def _axes(names: str, pixel_size_um: float | None) -> list[dict[str, str]]:
    """Axis dicts (names as dicts also make ome-zarr-py write zarr v3 ``dimension_names``)."""
    axes = []
    for name in names:
        axis = {"name": name, "type": "channel" if name == "c" else "space"}
        if name != "c" and pixel_size_um is not None:
            axis["unit"] = "micrometer"
        axes.append(axis)
    return axes


def _level_transforms(
    n_axes: int, n_levels: int, pixel_size_um: float | None
) -> list[list[dict[str, Any]]]:
    """Scale and translation of each level: exactly 2**k coarser, shifted to the centre of the
    2**k x 2**k block of full-resolution pixels it summarises (ome-zarr-py would instead derive
    the scale from shape ratios, which is off for odd sizes)."""
    pixel = 1.0 if pixel_size_um is None else float(pixel_size_um)
    transforms = []
    for level in range(n_levels):
        factor = 2.0**level
        leading = [1.0] * (n_axes - 2)
        transforms.append(
            [
                {"type": "scale", "scale": [*leading, pixel * factor, pixel * factor]},
                {
                    "type": "translation",
                    "translation": [0.0] * (n_axes - 2) + [pixel * (factor - 1) / 2] * 2,
                },
            ]
        )
    return transforms


def _omero_colors(plate: Plate) -> list[str]:
    """Six-digit hex colours (omero style, no '#') for every channel."""
    n = len(plate.channels)
    if plate.channel_colors is None:
        return (
            ["FFFFFF"] if n == 1 else [_DEFAULT_COLORS[i % len(_DEFAULT_COLORS)] for i in range(n)]
        )
    if len(plate.channel_colors) != n:
        raise ValueError(
            f"plate {plate.name!r} has {n} channels but {len(plate.channel_colors)} channel colours"
        )
    colors = []
    for channel, color in zip(plate.channels, plate.channel_colors, strict=True):
        text = _NAMED_COLORS.get(str(color).lower(), str(color).lstrip("#").upper())
        if len(text) != 6 or any(ch not in "0123456789ABCDEF" for ch in text):
            raise ValueError(
                f"colour {color!r} of channel {channel!r} is not a hex colour ('#RRGGBB') "
                f"or one of {sorted(_NAMED_COLORS)}"
            )
        colors.append(text)
    return colors


def _omero(channels: list[str], colors: list[str], lowest_level: np.ndarray) -> dict[str, Any]:
    """omero channel metadata; the display window spans each channel's range at the lowest level."""
    if np.issubdtype(lowest_level.dtype, np.integer):
        info = np.iinfo(lowest_level.dtype)
        dtype_min, dtype_max = float(info.min), float(info.max)
    else:
        dtype_min, dtype_max = float(np.nanmin(lowest_level)), float(np.nanmax(lowest_level))
    entries = []
    for index, (name, color) in enumerate(zip(channels, colors, strict=True)):
        plane = lowest_level[index]
        start, end = (
            (float(np.nanmin(plane)), float(np.nanmax(plane)))
            if plane.size
            else (dtype_min, dtype_max)
        )
        window = {
            "min": dtype_min,
            "max": dtype_max,
            "start": start,
            "end": max(end, start + 1e-12),
        }
        entries.append({"label": name, "color": color, "active": True, "window": window})
    return {"channels": entries}


def _platemap_rows(plate: Plate) -> dict[str, Any] | None:
    """JSON-ready plate map: per-well rows; plate-level column list, dtypes and index name."""
    if plate.platemap is None:
        return None
    frame = plate.platemap.copy()
    frame.index = [canonical_well(str(w)) for w in frame.index]
    if frame.index.duplicated().any():
        duplicated = sorted(set(frame.index[frame.index.duplicated()]))
        raise ValueError(
            f"the plate map of {plate.name!r} has more than one row for wells {duplicated}"
        )
    frame.columns = [str(c) for c in frame.columns]
    # pandas' JSON writer turns numpy scalars, NaN/NA (-> null) and timestamps into JSON values.
    rows: dict[str, dict[str, Any]] = json.loads(frame.to_json(orient="index", date_format="iso"))
    imaged = set(plate.wells)
    return {
        "wells": {w: row for w, row in rows.items() if w in imaged},
        "plate": {
            "columns": list(frame.columns),
            "dtypes": {c: str(t) for c, t in frame.dtypes.items()},
            "index_name": plate.platemap.index.name,
            "wells_without_images": {w: row for w, row in rows.items() if w not in imaged},
        },
    }
