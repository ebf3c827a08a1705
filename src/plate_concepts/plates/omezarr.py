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

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr
from dask.base import tokenize

from plate_concepts.plates.geometry import PlateFormat, canonical_well, parse_well
from plate_concepts.plates.model import FieldKey, Plate
from plate_concepts.plates.omezarr_write import NAMESPACE, write_ome_zarr_plate

__all__ = [
    "ChunkReport",
    "MissingChunks",
    "is_ome_zarr_plate",
    "looks_like_zarr",
    "missing_image_chunks",
    "read_ome_zarr_plate",
    "write_ome_zarr_plate",
]

_UNIT_TO_MICROMETER = {
    "micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3, "nm": 1e-3,
    "millimeter": 1e3, "mm": 1e3, "angstrom": 1e-4, "centimeter": 1e4, "meter": 1e6,
}  # fmt: skip



# --------------------------------------------------------------------------------------- detect

_METADATA_FILES = ("zarr.json", ".zgroup", ".zattrs", ".zarray")
"""The files that hold a zarr node's metadata (zarr v3; zarr v2)."""


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


def looks_like_zarr(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder with a zarr metadata file (``zarr.json``, ``.zgroup``,
    ``.zattrs``), readable or not: it is meant to be zarr, whatever else it holds."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _METADATA_FILES[:3])


def _broken_metadata(folder: Path) -> str:
    """' (<file> is damaged: ...)' for the first metadata file of a local zarr node that is not
    valid JSON, else ''."""
    for name in _METADATA_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            return f": its metadata file {file} is damaged (not valid JSON: {error})"
        except OSError as error:
            return f": its metadata file {file} cannot be read ({error})"
    return ""


def _child(group: zarr.Group, path: str, where: str, what: str) -> zarr.Group | zarr.Array | None:
    """``group[path]``, None when it does not exist; a node whose metadata cannot be read is a
    ValueError naming the file."""
    try:
        return group.get(path)
    except (ValueError, TypeError, KeyError, OSError) as error:
        folder = _local_folder(group)
        detail = _broken_metadata(folder / path) if folder is not None else ""
        raise ValueError(
            f"{where}: the {what} {path!r} cannot be opened{detail or f' ({error})'}; copy the "
            "plate again from the original"
        ) from error


def _local_folder(node: zarr.Group | zarr.Array) -> Path | None:
    """The folder of a node of a plate on the local disk, None for remote stores."""
    root = getattr(node.store, "root", None)
    return Path(root) / node.path if root is not None else None


# ----------------------------------------------------------------------------------------- read


def read_ome_zarr_plate(path: str | os.PathLike) -> Plate:
    """Open an OME-Zarr HCS plate (NGFF 0.4 or 0.5) as a lazy :class:`Plate`.

    Every field becomes a list of lazy (C, Y, X) dask arrays (all resolution levels); label
    images under each field's ``labels/`` group become (Y, X) levels. Images with t or z axes
    are reduced to t = 0 and the middle z plane. Fields of a well are numbered by their path when
    every path is an integer (``0``, ``1``, ...), otherwise by their order in the well metadata;
    fields of all acquisitions are pooled. A chunk file that cannot be decoded when its pixels
    are read is a ValueError naming the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not an OME-Zarr plate, or its metadata or images are inconsistent
        (the message names the well or field, and a damaged metadata file).
    """
    source = str(path)
    root, plate_meta = _open_plate_group(path)
    reader = "ome-zarr-0.5" if root.metadata.zarr_format == 3 else "ome-zarr-0.4"
    rows, columns = _names(plate_meta.get("rows", [])), _names(plate_meta.get("columns", []))
    images: dict[FieldKey, list[da.Array]] = {}
    labels: dict[FieldKey, dict[str, list[da.Array]]] = {}
    channels: list[str] | None = None
    colors: list[str] | None = None
    pixel_size: float | None = None
    well_rows: dict[str, dict[str, Any]] = {}
    for well, well_group, fields in _iter_fields(root, plate_meta, source):
        for field_index, field_group, where in fields:
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

    return Plate(
        name=str(
            plate_meta.get("name")
            or Path(source.rstrip("/")).name.removesuffix(".zarr").removesuffix(".ome")
        ),
        channels=channels or [],
        images=images,
        reader=reader,
        source=source,
        plate_format=_plate_format(len(rows), len(columns), [w for w, _ in images]),
        labels=labels,
        platemap=_platemap_from_attributes(_attributes(root).get(NAMESPACE, {}), well_rows),
        pixel_size_um=pixel_size,
        channel_colors=colors,
    )


def _open_plate_group(path: str | os.PathLike) -> tuple[zarr.Group, dict[str, Any]]:
    """The root group of a plate and its ``plate`` metadata; clear errors for anything else."""
    source = str(path)
    if "://" not in source and not Path(path).exists():
        raise FileNotFoundError(f"OME-Zarr plate {source} does not exist")
    local = None if "://" in source else Path(path)
    try:
        root = _open_group(path)
    except (ValueError, OSError, TypeError, KeyError) as error:
        detail = _broken_metadata(local) if local is not None else ""
        if detail:
            raise ValueError(
                f"{source} cannot be read as an OME-Zarr plate{detail}; copy the plate again "
                "from the original"
            ) from error
        raise ValueError(
            f"{source} is not an OME-Zarr plate: it is not a readable zarr group ({error})"
        ) from error
    if not isinstance(root, zarr.Group):
        raise ValueError(f"{source} is not an OME-Zarr plate: it is a zarr array, not a group")
    ome = _ome_attributes(root)
    if "plate" not in ome:
        kind = (
            "an OME-Zarr image without plate metadata (open it with napari-ome-zarr)"
            if "multiscales" in ome
            else "a zarr group whose attributes hold no 'plate' (NGFF 0.4) or 'ome.plate' "
            "(NGFF 0.5) metadata"
        )
        raise ValueError(f"{source} is not an OME-Zarr plate: it is {kind}")
    if not isinstance(ome["plate"], dict) or not ome["plate"].get("wells"):
        raise ValueError(f"OME-Zarr plate {source} lists no wells")
    return root, ome["plate"]


def _names(entries: list[Any]) -> list[str]:
    """Row or column names of the plate metadata (dicts with 'name' since NGFF 0.4)."""
    return [str(e["name"]) if isinstance(e, dict) else str(e) for e in entries]


def _iter_fields(root: zarr.Group, plate_meta: dict[str, Any], source: str):
    """For each well of the plate metadata: ``(well, well group, fields)``, where ``fields``
    lists ``(field index, field group, where)``; missing or unreadable groups are errors."""
    rows, columns = _names(plate_meta.get("rows", [])), _names(plate_meta.get("columns", []))
    for well_meta in plate_meta["wells"]:
        well_path = str(well_meta["path"])
        well = _well_name(well_meta, rows, columns, source)
        well_group = _child(root, well_path, f"OME-Zarr plate {source}", f"well {well}")
        if well_group is None:
            raise ValueError(
                f"OME-Zarr plate {source}: well {well} lists path {well_path!r}, "
                "which does not exist"
            )
        field_metas = _ome_attributes(well_group).get("well", {}).get("images", [])
        if not field_metas:
            raise ValueError(
                f"OME-Zarr plate {source}: well {well} ({well_path}) lists no fields (images)"
            )
        field_paths = [str(f["path"]) for f in field_metas]
        numbered_by_path = all(p.isdigit() for p in field_paths) and len(
            set(map(int, field_paths))
        ) == len(field_paths)
        fields = []
        for position, field_path in enumerate(field_paths):
            where = f"OME-Zarr plate {source}, well {well}, field {field_path!r}"
            field_group = _child(well_group, field_path, where, "the field's group")
            if field_group is None:
                raise ValueError(f"{where}: the field's group does not exist")
            fields.append((int(field_path) if numbered_by_path else position, field_group, where))
        yield well, well_group, fields


@dataclass(frozen=True)
class MissingChunks:
    """Chunks of one field's full-resolution image that its plate's store does not hold."""

    well: str
    field: int
    files: list[str]
    """The missing chunk files (paths, or URLs for remote plates)."""


@dataclass(frozen=True)
class ChunkReport:
    """What :func:`missing_image_chunks` found: the chunk count and the fields lacking any."""

    n_chunks: int
    missing: list[MissingChunks]

    @property
    def files(self) -> list[str]:
        return [file for entry in self.missing for file in entry.files]


def missing_image_chunks(path: str | os.PathLike) -> ChunkReport:
    """The level-0 image chunks of every field that the plate's store lacks, without reading
    pixels: only the store's listing.

    By the zarr specification a missing chunk reads as the array's fill value, so a plate with
    missing chunks opens and reads; each is either an image region equal to the fill value that
    the writer skipped, or a file lost in a copy or sync. Label images are not checked: their
    background chunks are routinely left out.
    """
    from zarr.core.sync import sync

    async def listing(array: zarr.Array) -> set[str]:
        prefix = f"{array.path}/" if array.path else ""
        return {key async for key in array.store.list_prefix(prefix)}

    source = str(path)
    root, plate_meta = _open_plate_group(path)
    missing, n_chunks = [], 0
    for well, _, fields in _iter_fields(root, plate_meta, source):
        for field_index, field_group, where in fields:
            array = _level_arrays(field_group, where)[2][0]
            stored = sync(listing(array))
            grid = [range(-(-size // chunk)) for size, chunk in
                    zip(array.shape, _stored_chunk_shape(array), strict=True)]  # fmt: skip
            keys = [array.metadata.encode_chunk_key(c) for c in itertools.product(*grid)]
            n_chunks += len(keys)
            prefix = f"{array.path}/" if array.path else ""
            files = [_chunk_key_path(array, k) for k in keys if prefix + k not in stored]
            if files:
                missing.append(MissingChunks(well, field_index, files))
    return ChunkReport(n_chunks, missing)


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


def _plate_format(n_rows: int, n_columns: int, wells: list[str]) -> PlateFormat | None:
    """The plate's own rows x columns when they are a standard format holding every well; None
    otherwise (the format is then inferred from the wells and the plate map)."""
    stated = PlateFormat(n_rows, n_columns)
    if stated.n_wells > 0 and all(stated.contains(*parse_well(w)) for w in wells):
        try:
            if PlateFormat.from_n_wells(stated.n_wells) == stated:
                return stated
        except ValueError:
            pass
    return None


def _axis_names(multiscale: Mapping[str, Any], ndim: int) -> list[str]:
    axes = multiscale.get("axes")
    if not axes:  # NGFF <= 0.2: always (t, c, z, y, x), trailing dimensions
        return list("tczyx"[-ndim:])
    names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes]
    types = [str(a.get("type", "")) if isinstance(a, dict) else "" for a in axes]
    # A channel axis may carry another name ("ch", "channel"); its type says what it is.
    return ["c" if t == "channel" else n for n, t in zip(names, types, strict=True)]


def _level_arrays(
    group: zarr.Group, where: str
) -> tuple[Mapping[str, Any], list[Mapping[str, Any]], list[zarr.Array]]:
    """The first multiscale of ``group``: its metadata, datasets and zarr arrays (levels)."""
    multiscales = _ome_attributes(group).get("multiscales")
    if not multiscales:
        raise ValueError(f"{where}: no 'multiscales' metadata; expected an OME-Zarr image")
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets", [])
    if not datasets:
        raise ValueError(f"{where}: its multiscales metadata lists no datasets (resolution levels)")
    arrays = []
    for dataset in datasets:
        array_path = str(dataset["path"])
        array = _child(group, array_path, where, "resolution level")
        if array is None:
            raise ValueError(f"{where}: resolution level {array_path!r} does not exist")
        arrays.append(array)
    return multiscale, datasets, arrays


def _read_multiscale(
    group: zarr.Group, where: str
) -> tuple[list[da.Array], list[str], float | None]:
    """Lazy levels, axis names and pixel size (µm) of the first multiscale in ``group``."""
    multiscale, datasets, arrays = _level_arrays(group, where)
    levels = []
    for array in arrays:
        # An explicit name keeps dask from hashing the array to name it.
        name = "ome-zarr-" + tokenize(str(array.store), array.path, array.shape, str(array.dtype))
        levels.append(da.from_array(_NamedChunks(array), chunks=array.chunks, name=name))
    axes = _axis_names(multiscale, levels[0].ndim)
    if len(axes) != levels[0].ndim:
        raise ValueError(
            f"{where}: axes {axes} do not match the array's {levels[0].ndim} dimensions"
        )
    return levels, axes, _pixel_size_um(multiscale, datasets[0], axes)


class _NamedChunks:
    """A zarr array for dask whose read errors name the chunk file that failed (a truncated
    or corrupt chunk otherwise surfaces as a bare decompression error)."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shape, self.dtype, self.ndim, self.chunks = (
            array.shape, array.dtype, array.ndim, array.chunks
        )  # fmt: skip

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            return self.array[index]
        except MemoryError:
            raise
        except Exception as error:  # codecs raise many kinds: name the file whatever it was
            files = _chunk_files(self.array, index)
            shown = files[0] + (f" (and {len(files) - 1} more)" if len(files) > 1 else "")
            raise ValueError(
                f"cannot read the image chunk {shown}: {type(error).__name__}: {error}. The "
                "file is damaged or incomplete; copy the plate again from the original"
            ) from error


def _stored_chunk_shape(array: zarr.Array) -> tuple[int, ...]:
    """The shape of the stored objects (chunks, or shards when sharded)."""
    grid = getattr(array.metadata, "chunk_grid", None)
    return tuple(grid.chunk_shape) if grid is not None else tuple(array.metadata.chunks)


def _chunk_key_path(array: zarr.Array, key: str) -> str:
    folder = _local_folder(array)
    return str(folder / key) if folder is not None else f"{array.store}/{array.path}/{key}"


def _chunk_files(array: zarr.Array, index: Any) -> list[str]:
    """The files of the stored chunks that a tuple of slices (a dask block) touches."""
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (array.ndim - len(index))
    ranges = []
    for size, chunk, item in zip(array.shape, _stored_chunk_shape(array), index, strict=True):
        start, stop, _ = item.indices(size) if isinstance(item, slice) else (item, item + 1, 1)
        ranges.append(range(start // chunk, max(start // chunk + 1, -(-stop // chunk))))
    return [
        _chunk_key_path(array, array.metadata.encode_chunk_key(coords))
        for coords in itertools.product(*ranges)
    ]


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
    labels_group = _child(field_group, "labels", where, "label group")
    if labels_group is None:
        return {}
    result = {}
    for name in _ome_attributes(labels_group).get("labels", []):
        label_where = f"{where}, label image {name!r}"
        label_group = _child(labels_group, str(name), label_where, "label image")
        if label_group is None:
            raise ValueError(f"{label_where}: listed in labels/ but its group does not exist")
        levels, axes, _ = _read_multiscale(label_group, label_where)
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
