"""Plates: geometry, readers (OME-Zarr HCS, TIFF export folders, LoadData CSVs), plate maps, mosaic."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from plate_concepts.plates.geometry import PlateFormat, canonical_well, parse_well, well_name
from plate_concepts.plates.model import Plate

__all__ = [
    "Plate",
    "PlateFormat",
    "canonical_well",
    "detect_plate_format",
    "discover_platemap",
    "open_plate",
    "parse_well",
    "well_name",
]

PLATEMAP_SUFFIXES = (".csv", ".tsv", ".parquet")
"""File types :func:`discover_platemap` looks for (after a ``platemap`` name prefix)."""


def detect_plate_format(path: str | PathLike) -> str:
    """'ome-zarr', 'loaddata' or 'tiff-folder', by looking at the path (no pixels read)."""
    from plate_concepts.plates.loaddata import is_loaddata_csv
    from plate_concepts.plates.omezarr import is_ome_zarr_plate

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_ome_zarr_plate(path):
        return "ome-zarr"
    if path.is_file() and is_loaddata_csv(path):
        return "loaddata"
    if path.is_dir():
        return "tiff-folder"
    raise ValueError(
        f"{path} is not a readable plate: expected an OME-Zarr HCS plate, a CellProfiler LoadData "
        "CSV (FileName_<channel>/PathName_<channel> columns) or a folder of TIFF exports"
    )


def open_plate(
    path: str | PathLike,
    platemap: str | PathLike | None = None,
    pattern: str | None = None,
    channel_names: list[str] | None = None,
) -> Plate:
    """Open any supported plate lazily, optionally joining a plate map (CSV/parquet) on its wells.

    ``pattern`` (a preset name or a regex with named groups) applies to TIFF folders only.
    """
    from plate_concepts.plates.loaddata import read_loaddata_csv
    from plate_concepts.plates.omezarr import read_ome_zarr_plate
    from plate_concepts.plates.platemap import attach_platemap
    from plate_concepts.plates.tiff_folder import read_tiff_folder

    kind = detect_plate_format(path)
    if kind == "ome-zarr":
        plate = read_ome_zarr_plate(path)
        if channel_names is not None:
            if len(channel_names) != len(plate.channels):
                raise ValueError(
                    f"{len(channel_names)} channel names given for {path}, which has "
                    f"{len(plate.channels)} channels: {plate.channels}"
                )
            plate.channels = list(channel_names)
    elif kind == "loaddata":
        plate = read_loaddata_csv(path, channel_names=channel_names)
    else:
        plate = read_tiff_folder(path, pattern=pattern, channel_names=channel_names)
    if platemap is not None:
        plate = attach_platemap(plate, platemap)
    return plate


def discover_platemap(path: str | PathLike) -> Path | None:
    """The plate map lying next to a plate: a ``platemap*.csv|tsv|parquet`` file (any case)
    in the plate's folder, else in its parent folder; None when there is none.

    ``path`` is a plate folder (TIFF exports) or a plate file/zarr, whose own folder is then
    searched first. Several candidates in one folder are ambiguous: the answer is then None
    (the user names the map instead), so a wrong map is never joined silently.
    """
    path = Path(path)
    folder = path if path.is_dir() and path.suffix.lower() != ".zarr" else path.parent
    for place in (folder, folder.parent):
        if not place.is_dir():
            continue
        candidates = sorted(
            p
            for p in place.iterdir()
            if p.is_file()
            and p.name.lower().startswith("platemap")
            and p.suffix.lower() in PLATEMAP_SUFFIXES
        )
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            return None
    return None
