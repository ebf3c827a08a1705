"""Plates: geometry, readers (OME-Zarr HCS, TIFF export folders, LoadData CSVs), plate maps, mosaic."""

from __future__ import annotations

import warnings
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
    "locate_plate",
    "open_plate",
    "parse_well",
    "well_name",
]

PLATEMAP_SUFFIXES = (".csv", ".tsv", ".parquet")
"""File types :func:`discover_platemap` looks for (after a ``platemap`` name prefix)."""


def detect_plate_format(path: str | PathLike) -> str:
    """'ome-zarr', 'loaddata' or 'tiff-folder', by looking at the path (no pixels read).

    A folder with zarr metadata is 'ome-zarr' even when that metadata is damaged, so that
    reading it says what is wrong instead of looking for TIFF files in it.
    """
    from plate_concepts._io import output_kind
    from plate_concepts.plates.loaddata import is_loaddata_csv
    from plate_concepts.plates.omezarr import is_ome_zarr_plate, looks_like_zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_ome_zarr_plate(path):
        return "ome-zarr"
    if path.is_file() and is_loaddata_csv(path):
        return "loaddata"
    suffix = path.suffix.lower()
    kind = output_kind(path, ["embedding-store"] + (["dictionary"] if suffix == ".safetensors" else []))
    if kind is not None:
        what = "an embedding store" if kind == "embedding-store" else "a dictionary file"
        raise ValueError(
            f"{path} is {what}, not a plate: give the plate (an OME-Zarr plate, a folder of TIFF "
            "exports or a LoadData CSV), or open it with plate-concepts view"
        )
    if looks_like_zarr(path):
        return "ome-zarr"
    if path.is_dir():
        return "tiff-folder"
    raise ValueError(
        f"{path} is not a readable plate: expected an OME-Zarr HCS plate, a CellProfiler LoadData "
        "CSV (FileName_<channel>/PathName_<channel> columns) or a folder of TIFF exports"
    )


def locate_plate(path: str | PathLike, pattern: str | None = None) -> Path:
    """The plate source a path names: the path itself when it is one, else the only plate
    source inside a plate folder that holds no images itself (``images/``, Harmony's
    ``Images/`` beside ``Index.idx.xml``, an OME-Zarr plate, a LoadData CSV; mask folders
    ignored). Several candidates: one named ``images`` is taken, otherwise a ValueError lists
    them. A ``pattern`` with ``/`` matches files in subfolders: the path is then taken as is.
    """
    from plate_concepts.plates.omezarr import looks_like_zarr
    from plate_concepts.plates.tiff_folder import holds_tiff_files

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (
        not path.is_dir()
        or looks_like_zarr(path)
        or holds_tiff_files(path)
        or (pattern is not None and "/" in pattern)
    ):
        return path
    candidates = _plate_sources_in(path)
    named_images = [c for c in candidates if c.is_dir() and c.name.lower() == "images"]
    if len(candidates) == 1 or len(named_images) == 1:
        return (named_images or candidates)[0]
    if candidates:
        raise ValueError(
            f"{path} holds no images itself but several plate sources: "
            f"{', '.join(c.name for c in candidates)}; pass the one to open, e.g. {candidates[0]}"
        )
    plate_folders = [
        sub for sub in _subfolders(path) if _plate_sources_in(sub) or holds_tiff_files(sub)
    ]
    if plate_folders:
        raise ValueError(
            f"{path} holds no plate itself; its folders {', '.join(f.name for f in plate_folders)} "
            f"do: pass one of them, e.g. {plate_folders[0]}"
        )
    raise ValueError(
        f"{path} holds no plate: no TIFF images, OME-Zarr plate or LoadData CSV, in it or in its "
        f"subfolders; pass the folder that holds the plate's image files{_other_outputs_in(path)}"
    )


def _other_outputs_in(folder: Path) -> str:
    """What to do with the stores and dictionaries a folder holds instead (a demo-run's work
    folder): '' when none."""
    from plate_concepts._io import output_kind

    stores = [f for f in _subfolders(folder) if output_kind(f, ["embedding-store"])]
    dictionaries = [f for f in sorted(folder.glob("*.safetensors")) if output_kind(f, ["dictionary"])]
    said = [f"'plate-concepts info {stores[0]}' describes the embedding store"] if stores else []
    said += [f"'plate-concepts view {dictionaries[0]}' opens the dictionary"] if dictionaries else []
    return f" (it holds plate-concepts outputs: {'; '.join(said)})" if said else ""


def _subfolders(folder: Path) -> list[Path]:
    from plate_concepts.plates.tiff_folder import MASK_FOLDERS

    return [
        entry
        for entry in sorted(folder.iterdir())
        if entry.is_dir() and not entry.name.startswith(".")
        and entry.name.lower() not in MASK_FOLDERS
    ]


def _plate_sources_in(folder: Path) -> list[Path]:
    """Plate sources directly inside a folder: image folders, OME-Zarr plates, LoadData CSVs."""
    from plate_concepts.plates.loaddata import is_loaddata_csv
    from plate_concepts.plates.omezarr import is_ome_zarr_plate, looks_like_zarr
    from plate_concepts.plates.tiff_folder import holds_tiff_files

    folders = [
        f
        for f in _subfolders(folder)
        if holds_tiff_files(f)
        or is_ome_zarr_plate(f)
        or (f.suffix.lower() == ".zarr" and looks_like_zarr(f))  # a damaged plate: say so
    ]
    tables = [
        f for f in sorted(folder.glob("*.csv")) if not f.name.startswith(".") and is_loaddata_csv(f)
    ]
    return folders + tables


def open_plate(
    path: str | PathLike,
    platemap: str | PathLike | None = None,
    pattern: str | None = None,
    channel_names: list[str] | None = None,
) -> Plate:
    """Open any supported plate lazily, optionally joining a plate map (CSV/parquet) on its wells.

    ``path`` may also be a plate folder whose images sit in a subfolder (see
    :func:`locate_plate`). ``platemap="auto"`` joins the plate map lying next to the plate
    (:func:`discover_platemap`) when the plate carries none itself; one that does not fit its
    wells is then left out with a warning. ``plate.platemap_source`` records the file joined.
    ``pattern`` (a preset name or a regex with named groups) applies to TIFF folders only.
    """
    from plate_concepts.plates.loaddata import read_loaddata_csv
    from plate_concepts.plates.omezarr import read_ome_zarr_plate
    from plate_concepts.plates.platemap import attach_platemap
    from plate_concepts.plates.tiff_folder import read_tiff_folder

    path = locate_plate(path, pattern)
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
    if isinstance(platemap, str) and platemap == "auto":
        found = discover_platemap(path) if plate.platemap is None else None
        if found is not None:
            try:
                with warnings.catch_warnings():  # exports often image wells the map leaves out
                    warnings.simplefilter("ignore", UserWarning)
                    attach_platemap(plate, found)
                plate.platemap_source = str(found)
            except (ValueError, OSError) as error:
                warnings.warn(
                    f"plate map {found} not joined to plate {plate.name!r}: {error}",
                    UserWarning,
                    stacklevel=2,
                )
    elif platemap is not None:
        plate = attach_platemap(plate, platemap)
        plate.platemap_source = str(platemap)
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
