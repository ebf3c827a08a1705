"""The plates an embedding store was made from: their recorded sources, opened as the reader
opens them (for thumbnails in reports and the viewer, and ``plate-concepts info``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates import detect_plate_format, discover_platemap, open_plate
from plate_concepts.plates.model import Plate


def store_plate_sources(store: EmbeddingStore) -> dict[str, dict[str, Any]]:
    """Plate name -> its provenance record (``source``, ``channels``...) in the store."""
    plates = store.provenance.get("plates", {})
    return {str(name): dict(record) for name, record in plates.items() if isinstance(record, dict)}


def resolve_source(source: str, store_path: Path) -> Path | None:
    """A recorded plate source as an existing path (absolute, or relative to the working folder
    or to the store's folder), else None."""
    if not source:
        return None
    candidate = Path(source).expanduser()
    for path in (candidate, store_path.parent / candidate):
        if path.exists():
            return path
    return None


def open_source_plate(path: str | Path, channel_names: list[str] | None = None) -> Plate:
    """Open a plate as the reader does: a TIFF folder also joins the plate map lying next to it
    (:func:`discover_platemap`) when that map fits its wells."""
    plate = open_plate(path, channel_names=channel_names)
    if detect_plate_format(path) == "tiff-folder" and plate.platemap is None:
        attach_discovered_platemap(plate, Path(path))
    return plate


def attach_discovered_platemap(plate: Plate, folder: Path) -> Path | None:
    """Join the plate map found next to ``folder``; returns its path, None when none fits."""
    from plate_concepts.plates.platemap import attach_platemap

    found = discover_platemap(folder)
    if found is None:
        return None
    try:
        with warnings.catch_warnings():  # wells missing from the map are expected in exports
            warnings.simplefilter("ignore", UserWarning)
            attach_platemap(plate, found)
    except (ValueError, OSError) as err:
        warnings.warn(
            f"plate map {found} not joined to {plate.name!r}: {err}", UserWarning, stacklevel=2
        )
        return None
    return found


def open_store_plate(store: EmbeddingStore) -> Plate | None:
    """The first plate of the store whose recorded source opens (with the recorded channel
    names when they fit), or None when none does."""
    for name, record in store_plate_sources(store).items():
        path = resolve_source(str(record.get("source", "")), store.path)
        if path is None:
            continue
        for channels in (record.get("channels"), None):
            try:
                plate = open_source_plate(path, channel_names=channels)
            except (ValueError, OSError, KeyError):
                continue
            if plate.name == name:
                return plate
    return None


def open_plate_named(store: EmbeddingStore, name: str) -> Plate | None:
    """The plate ``name`` of the store, opened from its recorded source, or None when the
    source is not found or opens as another plate."""
    record = store_plate_sources(store).get(str(name))
    path = None if record is None else resolve_source(str(record.get("source", "")), store.path)
    if path is None:
        return None
    for channels in (record.get("channels"), None):  # type: ignore[union-attr]
        try:
            plate = open_source_plate(path, channel_names=channels)
        except (ValueError, OSError, KeyError):
            continue
        if plate.name == str(name):
            return plate
    return None
