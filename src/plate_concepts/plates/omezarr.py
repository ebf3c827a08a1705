"""OME-Zarr high-content-screening (HCS) plates: read and write NGFF 0.4 (zarr v2) and 0.5 (v3).

Layout (https://ngff.openmicroscopy.org/0.5/#hcs-layout)::

    plate.zarr/            plate metadata: rows, columns, wells, field_count, name
      B/7/                 a well: the list of its fields (images)
        0/                 a field: a multiscale (c, y, x) image, omero channel metadata
          s0 s1 ...        resolution levels, full resolution first
          labels/nuclei/   a multiscale (y, x) label image ("image-label" metadata)

Reading never loads pixels: every level is a lazy dask array over the zarr chunks. Images with
more axes than (c, y, x) are reduced on read: the first time point (t = 0) and the middle
z plane (z = size // 2) are selected, and a missing channel axis becomes one channel.

The plate map (``Plate.platemap``, one row per well) is stored by :func:`write_ome_zarr_plate`
outside the OME namespace, under the ``plate_concepts`` attribute: each well group holds its row
(``plate_concepts.platemap``), the plate group the column order, dtypes, index name and the rows
of wells that have no images. Other OME-Zarr tools ignore it; :func:`read_ome_zarr_plate`
restores it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr
from dask.base import tokenize
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

from plate_concepts._io import atomic_path
from plate_concepts._progress import ProgressLike, progress_ticker
from plate_concepts.plates.geometry import PlateFormat, canonical_well, parse_well, row_letters
from plate_concepts.plates.model import FieldKey, Plate

__all__ = ["is_ome_zarr_plate", "read_ome_zarr_plate", "write_ome_zarr_plate"]

NAMESPACE = "plate_concepts"
"""Attribute key (outside the OME namespace) that holds this package's extra metadata."""

_SUPPORTED_VERSIONS = ("0.4", "0.5")
_MIN_SIDE_FOR_DOWNSAMPLING = 256
_DEFAULT_COLORS = ["0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF"]
_NAMED_COLORS = {
    "red": "FF0000", "green": "00FF00", "blue": "0000FF", "magenta": "FF00FF", "cyan": "00FFFF",
    "yellow": "FFFF00", "white": "FFFFFF", "gray": "FFFFFF", "grey": "FFFFFF",
}  # fmt: skip
_UNIT_TO_MICROMETER = {
    "micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3, "nm": 1e-3,
    "millimeter": 1e3, "mm": 1e3, "angstrom": 1e-4, "centimeter": 1e4, "meter": 1e6,
}  # fmt: skip



# --------------------------------------------------------------------------------------- detect


def _open_group(path: str | os.PathLike) -> zarr.Group:
    return zarr.open_group(str(path), mode="r")


def _attributes(group: zarr.Group | zarr.Array) -> dict[str, Any]:
    """All attributes of a group or array as a plain dict."""
    return dict(group.attrs.asdict())


def _ome_attributes(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The OME metadata of a node: under ``ome`` in NGFF >= 0.5, at the top level before."""
    attrs = _attributes(node)
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def is_ome_zarr_plate(path: str | os.PathLike) -> bool:
    """True if ``path`` is a zarr group whose attributes hold OME plate metadata.

    Cheap: reads only the root group's metadata document.
    """
    if "://" not in str(path) and not Path(path).is_dir():
        return False
    try:
        group = _open_group(path)
    except (ValueError, OSError):  # no zarr group here, or unreadable metadata: not a plate
        return False
    return isinstance(group, zarr.Group) and "plate" in _ome_attributes(group)


# ----------------------------------------------------------------------------------------- read


def read_ome_zarr_plate(path: str | os.PathLike) -> Plate:
    """Open an OME-Zarr HCS plate (NGFF 0.4 or 0.5) as a lazy :class:`Plate`.

    Every field becomes a list of lazy (C, Y, X) dask arrays (all resolution levels); label
    images under each field's ``labels/`` group become (Y, X) levels. Images with t or z axes
    are reduced to t = 0 and the middle z plane. Fields of a well are numbered by their path when
    every path is an integer (``0``, ``1``, ...), otherwise by their order in the well metadata;
    fields of all acquisitions are pooled.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not an OME-Zarr plate, or its metadata or images are inconsistent
        (the message names the well or field).
    """
    source = str(path)
    if "://" not in source and not Path(path).exists():
        raise FileNotFoundError(f"OME-Zarr plate {source} does not exist")
    try:
        root = _open_group(path)
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{source} is not an OME-Zarr plate: it is not a zarr group ({error})"
        ) from error
    ome = _ome_attributes(root)
    if "plate" not in ome:
        raise ValueError(
            f"{source} is not an OME-Zarr plate: its zarr attributes hold no 'plate' "
            "(NGFF 0.4) or 'ome.plate' (NGFF 0.5) metadata"
        )
    plate_meta = ome["plate"]
    reader = "ome-zarr-0.5" if root.metadata.zarr_format == 3 else "ome-zarr-0.4"

    rows = [str(r["name"]) if isinstance(r, dict) else str(r) for r in plate_meta.get("rows", [])]
    columns = [
        str(c["name"]) if isinstance(c, dict) else str(c) for c in plate_meta.get("columns", [])
    ]
    wells_meta = plate_meta.get("wells", [])
    if not wells_meta:
        raise ValueError(f"OME-Zarr plate {source} lists no wells")

    images: dict[FieldKey, list[da.Array]] = {}
    labels: dict[FieldKey, dict[str, list[da.Array]]] = {}
    channels: list[str] | None = None
    colors: list[str] | None = None
    pixel_size: float | None = None
    well_rows: dict[str, dict[str, Any]] = {}
    for well_meta in wells_meta:
        well_path = str(well_meta["path"])
        well = _well_name(well_meta, rows, columns, source)
        if well_path not in root:
            raise ValueError(
                f"OME-Zarr plate {source}: well {well} lists path {well_path!r}, "
                "which does not exist"
            )
        well_group = root[well_path]
        field_metas = _ome_attributes(well_group).get("well", {}).get("images", [])
        if not field_metas:
            raise ValueError(
                f"OME-Zarr plate {source}: well {well} ({well_path}) lists no fields (images)"
            )
        field_paths = [str(f["path"]) for f in field_metas]
        numbered_by_path = all(p.isdigit() for p in field_paths) and len(
            set(map(int, field_paths))
        ) == len(field_paths)
        for position, field_path in enumerate(field_paths):
            where = f"OME-Zarr plate {source}, well {well}, field {field_path!r}"
            if field_path not in well_group:
                raise ValueError(f"{where}: the field's group does not exist")
            field_group = well_group[field_path]
            field_index = int(field_path) if numbered_by_path else position
            key = (well, field_index)
            levels, axes, field_pixel_size = _read_multiscale(field_group, where)
            images[key] = [_to_cyx(level, axes, where) for level in levels]
            if channels is None:
                channels, colors = _channel_metadata(field_group, images[key][0].shape[0])
                pixel_size = field_pixel_size
            field_labels = _read_labels(field_group, where)
            if field_labels:
                labels[key] = field_labels
        extra = _attributes(well_group).get(NAMESPACE, {})
        if isinstance(extra, dict) and isinstance(extra.get("platemap"), dict):
            well_rows[well] = extra["platemap"]

    plate_format = _plate_format(len(rows), len(columns), [w for w, _ in images])
    return Plate(
        name=str(
            plate_meta.get("name")
            or Path(source.rstrip("/")).name.removesuffix(".zarr").removesuffix(".ome")
        ),
        channels=channels or [],
        images=images,
        reader=reader,
        source=source,
        plate_format=plate_format,
        labels=labels,
        platemap=_platemap_from_attributes(_attributes(root).get(NAMESPACE, {}), well_rows),
        pixel_size_um=pixel_size,
        channel_colors=colors,
    )


def _well_name(
    well_meta: Mapping[str, Any], rows: list[str], columns: list[str], source: str
) -> str:
    """Canonical well name from rowIndex/columnIndex (NGFF >= 0.4), else from the 'B/7' path."""
    path = str(well_meta["path"])
    try:
        if "rowIndex" in well_meta and "columnIndex" in well_meta:
            return canonical_well(
                rows[int(well_meta["rowIndex"])] + columns[int(well_meta["columnIndex"])]
            )
        row, column = path.strip("/").split("/")
        return canonical_well(row + column)
    except (ValueError, IndexError) as error:
        raise ValueError(
            f"OME-Zarr plate {source}: well {path!r} has no well name of the form row letter(s) + "
            f"column number (e.g. 'B/7'): {error}"
        ) from error


def _plate_format(n_rows: int, n_columns: int, wells: list[str]) -> PlateFormat:
    """The plate's own rows x columns when they are a standard format holding every well."""
    stated = PlateFormat(n_rows, n_columns)
    if stated.n_wells > 0 and all(stated.contains(*parse_well(w)) for w in wells):
        try:
            if PlateFormat.from_n_wells(stated.n_wells) == stated:
                return stated
        except ValueError:
            pass
    return PlateFormat.smallest_containing(wells)


def _axis_names(multiscale: Mapping[str, Any], ndim: int) -> list[str]:
    axes = multiscale.get("axes")
    if not axes:  # NGFF <= 0.2: always (t, c, z, y, x), trailing dimensions
        return list("tczyx"[-ndim:])
    names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes]
    types = [str(a.get("type", "")) if isinstance(a, dict) else "" for a in axes]
    # A channel axis may carry another name ("ch", "channel"); its type says what it is.
    return ["c" if t == "channel" else n for n, t in zip(names, types, strict=True)]


def _read_multiscale(
    group: zarr.Group, where: str
) -> tuple[list[da.Array], list[str], float | None]:
    """Lazy levels, axis names and pixel size (µm) of the first multiscale in ``group``."""
    multiscales = _ome_attributes(group).get("multiscales")
    if not multiscales:
        raise ValueError(f"{where}: no 'multiscales' metadata; expected an OME-Zarr image")
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets", [])
    if not datasets:
        raise ValueError(f"{where}: its multiscales metadata lists no datasets (resolution levels)")
    levels = []
    for dataset in datasets:
        array_path = str(dataset["path"])
        if array_path not in group:
            raise ValueError(f"{where}: resolution level {array_path!r} does not exist")
        array = group[array_path]
        # An explicit name keeps dask from hashing the array to name it.
        name = "ome-zarr-" + tokenize(str(array.store), array.path, array.shape, str(array.dtype))
        levels.append(da.from_zarr(array, name=name))
    axes = _axis_names(multiscale, levels[0].ndim)
    if len(axes) != levels[0].ndim:
        raise ValueError(
            f"{where}: axes {axes} do not match the array's {levels[0].ndim} dimensions"
        )
    return levels, axes, _pixel_size_um(multiscale, datasets[0], axes)


def _pixel_size_um(
    multiscale: Mapping[str, Any], dataset: Mapping[str, Any], axes: list[str]
) -> float | None:
    """x pixel size of the full-resolution level in µm, from its scale transformations.

    A scale of 1 without a unit is the writers' placeholder for "unknown" and gives None.
    """
    if "x" not in axes:
        return None
    x = axes.index("x")
    transforms = [
        *dataset.get("coordinateTransformations", []),
        *multiscale.get("coordinateTransformations", []),
    ]
    scales = [
        t["scale"]
        for t in transforms
        if t.get("type") == "scale" and isinstance(t.get("scale"), list)
    ]
    if not scales:
        return None
    size = float(np.prod([s[x] for s in scales]))
    axis_meta = multiscale.get("axes", [])[x] if multiscale.get("axes") else {}
    unit = axis_meta.get("unit") if isinstance(axis_meta, dict) else None
    if unit is None:
        return None if size == 1.0 else size
    factor = _UNIT_TO_MICROMETER.get(str(unit).lower())
    return None if factor is None else size * factor


def _to_cyx(array: da.Array, axes: list[str], where: str) -> da.Array:
    """(…, c, z, y, x) in any order -> (C, Y, X): t = 0, middle z, a missing c added."""
    if "y" not in axes or "x" not in axes:
        raise ValueError(f"{where}: axes {axes} lack y or x; expected an image with y and x axes")
    index = tuple(
        slice(None) if name in ("c", "y", "x") else (size // 2 if name == "z" else 0)
        for name, size in zip(axes, array.shape, strict=True)
    )
    kept = [name for name in axes if name in ("c", "y", "x")]
    array = array[index]
    if "c" not in kept:
        array, kept = array[None], ["c", *kept]
    return array.transpose([kept.index(name) for name in ("c", "y", "x")])


def _to_yx(array: da.Array, axes: list[str], where: str) -> da.Array:
    """A label image with any extra axes -> (Y, X), taking the first channel."""
    return _to_cyx(array, axes, where)[0]


def _channel_metadata(group: zarr.Group, n_channels: int) -> tuple[list[str], list[str] | None]:
    """Channel names (fallback 'ch0', 'ch1', ...) and '#RRGGBB' colours from omero metadata."""
    omero_channels = _ome_attributes(group).get("omero", {}).get("channels", [])
    names = [f"ch{i}" for i in range(n_channels)]
    colors: list[str] | None = None
    if len(omero_channels) == n_channels:
        labels = [str(c.get("label") or "") for c in omero_channels]
        if all(labels) and len(set(labels)) == n_channels:
            names = labels
        if all(isinstance(c.get("color"), str) and len(c["color"]) == 6 for c in omero_channels):
            colors = ["#" + c["color"].upper() for c in omero_channels]
    return names, colors


def _read_labels(field_group: zarr.Group, where: str) -> dict[str, list[da.Array]]:
    if "labels" not in field_group:
        return {}
    labels_group = field_group["labels"]
    label_names = _ome_attributes(labels_group).get("labels", [])
    result = {}
    for name in label_names:
        label_where = f"{where}, label image {name!r}"
        if name not in labels_group:
            raise ValueError(f"{label_where}: listed in labels/ but its group does not exist")
        levels, axes, _ = _read_multiscale(labels_group[name], label_where)
        result[str(name)] = [_to_yx(level, axes, label_where) for level in levels]
    return result


def _platemap_from_attributes(
    plate_extra: Any, well_rows: dict[str, dict[str, Any]]
) -> pd.DataFrame | None:
    """Rebuild the plate map written by :func:`write_ome_zarr_plate` (None if there is none)."""
    meta = plate_extra.get("platemap") if isinstance(plate_extra, dict) else None
    if not isinstance(meta, dict):
        return None
    rows = {**meta.get("wells_without_images", {}), **well_rows}
    columns = [str(c) for c in meta.get("columns", [])]
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    frame = frame.loc[sorted(frame.index, key=parse_well)]
    for column, dtype in meta.get("dtypes", {}).items():
        if column in frame:
            try:
                frame[column] = frame[column].astype(dtype)
            except (TypeError, ValueError):
                pass  # e.g. an integer column that gained missing values: keep what JSON gave
    frame.index.name = meta.get("index_name")
    return frame


# ---------------------------------------------------------------------------------------- write


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
        Replace an existing ``path``; otherwise an existing path raises FileExistsError.
    progress
        Called after each field: a tqdm-like object (``update(1)``), ``True`` for a tqdm bar,
        or a callable ``progress(fields_done, fields_total)``.

    The plate is built in a hidden sibling folder and renamed onto ``path`` only when complete,
    so an error or interruption leaves neither a partial plate nor the temporary folder.
    """
    if ngff_version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"ngff_version must be one of {_SUPPORTED_VERSIONS}, got {ngff_version!r}")
    fmt = FormatV04() if ngff_version == "0.4" else FormatV05()
    destination = Path(path)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; pass overwrite=True to replace it")
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
        atomic_path(destination, overwrite=overwrite) as tmp,
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
