"""napari reader contribution: plate sources (OME-Zarr HCS plates, TIFF export folders, LoadData CSVs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from plate_concepts.plates import detect_plate_format, open_plate
from plate_concepts.viewer.plate_layers import plate_layer_data


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[tuple[Any, dict, str]]] | None:
    """Return a reader when ``path`` is a plate this plugin can open, else None (napari tries others)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        kind = detect_plate_format(path)
    except (FileNotFoundError, ValueError):
        return None
    if kind == "tiff-folder" and not _has_tiffs(Path(path)):
        return None
    return read_plate


def read_plate(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    if isinstance(path, list):
        path = path[0]
    return plate_layer_data(open_plate(path))


def _has_tiffs(folder: Path) -> bool:
    return any(p.suffix.lower() in {".tif", ".tiff"} for p in folder.iterdir())
