"""napari reader contribution: plates, embedding stores and dictionary files.

- Plates: OME-Zarr HCS plates, CellProfiler LoadData CSVs and folders of TIFF exports (a plate
  map lying next to a TIFF folder, ``platemap*.csv|tsv|parquet``, is joined on the wells).
  Segmentation comes from the plate itself (OME-Zarr labels); mask folders such as NF1's
  ``masks/`` (binary CellProfiler masks, not object labels) are not read.
- Embedding stores (a folder with ``store.json``): the store becomes the viewer's store, and the
  centres of its crops are drawn on its plate (opened from the store's provenance) as points
  coloured by a label; without a readable plate only the store is opened.
- Dictionary files (``.safetensors`` with plate-concepts metadata): the dictionary becomes the
  viewer's dictionary, with the store and plate it was fitted on when they still exist.

:func:`napari_get_reader` returns None for anything else, so napari can try other plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plate_concepts.plates import detect_plate_format, open_plate
from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer.plate_layers import plate_layer_data

if TYPE_CHECKING:
    import napari

LayerData = tuple[Any, dict, str]
NOTHING_TO_ADD: list[tuple[None]] = [(None,)]
"""napari's sentinel for 'read, but no layers'."""

DICTIONARY_SUFFIX = ".safetensors"


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[Any]] | None:
    """A reader for ``path`` when it is a plate, an embedding store or a dictionary file this
    plugin can open, else None. Never raises on foreign paths."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        target = Path(path)
        if _is_store(target):
            return read_embedding_store
        if target.suffix.lower() == DICTIONARY_SUFFIX:
            return read_dictionary_file if _is_dictionary(target) else None
        kind = detect_plate_format(target)
    except (OSError, ValueError):
        return None
    if kind != "tiff-folder":
        return read_plate  # ours for sure: any error while reading is worth showing
    # Any folder looks like a TIFF folder until its file names are parsed: probe it here.
    try:
        plate = _open_tiff_folder(target)
    except (OSError, ValueError, KeyError):
        return None
    return lambda _path: _plate_layers(plate)


def read_plate(path: str | list[str]) -> list[LayerData]:
    """Layer data of a plate source (see :func:`plate_layer_data`)."""
    if isinstance(path, list):
        path = path[0]
    kind = detect_plate_format(path)
    plate = _open_tiff_folder(Path(path)) if kind == "tiff-folder" else open_plate(path)
    return _plate_layers(plate)


def read_embedding_store(path: str | list[str]) -> list[Any]:
    """Open a store, make it the current viewer's store, and draw its crops on its plate.

    The plate already open in the viewer is used when it is one of the store's plates;
    otherwise the first plate whose recorded source opens is added too. When none does, a
    notification says so and only the store is opened.
    """
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.viewer._embedding_views import (
        crop_points_layer_data,
        open_store_plate,
        store_plate_sources,
    )

    if isinstance(path, list):
        path = path[0]
    store = EmbeddingStore.open(path)
    viewer = _current_viewer()
    state = _state(viewer)
    if state is not None:
        state.set_store(store)
    sources = store_plate_sources(store)
    if (
        state is not None
        and state.mosaic is not None
        and state.plate is not None
        and state.plate.name in sources
    ):
        return [crop_points_layer_data(store, state.mosaic)]
    plate = open_store_plate(store)
    if plate is None:
        where = {
            name: record.get("source", "") for name, record in sources.items()
        } or "none recorded"
        _notify(
            f"Embedding store {store.path.name} opened ({len(store)} tokens), but the plate it was "
            f"made from cannot be opened (sources: {where}), so its crops are not drawn. Open that "
            "plate, then open the store again."
        )
        return NOTHING_TO_ADD
    mosaic = PlateMosaic(plate)
    return [*_plate_layers(plate, mosaic), crop_points_layer_data(store, mosaic)]


def read_dictionary_file(path: str | list[str]) -> list[Any]:
    """Load a dictionary, make it the current viewer's dictionary, and open the store (and its
    plate) it was fitted on when that store still exists."""
    from plate_concepts.dictionary.estimators import ICFL

    if isinstance(path, list):
        path = path[0]
    estimator = ICFL.load(path)  # an ICFL or a TopKSAE, as the file says
    viewer = _current_viewer()
    store_path = fitted_store_path(getattr(estimator, "metadata_", {}))
    layers: list[Any] = NOTHING_TO_ADD
    if store_path is not None and _is_store(store_path):
        layers = read_embedding_store(str(store_path))  # sets the store before the dictionary
    elif store_path is not None:
        _notify(
            f"Dictionary {Path(path).name} opened; the store it was fitted on, {store_path}, "
            "is not there."
        )
    state = _state(viewer)
    if state is not None:
        state.set_dictionary(estimator)
    return layers


def fitted_store_path(metadata: dict[str, Any]) -> Path | None:
    """The store a dictionary was fitted on, from its file metadata, if recorded."""
    for record in (metadata.get("store"), metadata.get("training", {}).get("data")):
        if isinstance(record, dict) and record.get("path"):
            return Path(str(record["path"]))
    return None


# ---------------------------------------------------------------------- helpers
def _plate_layers(plate: Plate, mosaic: PlateMosaic | None = None) -> list[LayerData]:
    from plate_concepts.viewer.app import install_plate_interactions

    viewer = _current_viewer()
    if viewer is not None:  # hover labels and well clicks for plates opened with File > Open too
        install_plate_interactions(viewer)
    return plate_layer_data(plate, mosaic or PlateMosaic(plate))


def _open_tiff_folder(folder: Path) -> Plate:
    from plate_concepts.viewer._embedding_views import open_source_plate

    if not any(p.suffix.lower() in {".tif", ".tiff"} for p in folder.iterdir()):
        raise ValueError(f"{folder} holds no TIFF files")
    return open_source_plate(folder)


def _is_store(path: Path) -> bool:
    from plate_concepts.embeddings.store import EmbeddingStore

    return path.is_dir() and EmbeddingStore.is_store(path)


def _is_dictionary(path: Path) -> bool:
    from plate_concepts.dictionary.io import read_dictionary_metadata

    try:
        read_dictionary_metadata(path)
    except (OSError, ValueError):
        return False
    return True


def _current_viewer() -> napari.Viewer | None:
    try:
        import napari
    except ImportError:
        return None
    return napari.current_viewer()


def _state(viewer: napari.Viewer | None) -> Any:
    if viewer is None:
        return None
    from plate_concepts.viewer.state import get_state

    return get_state(viewer)


def _notify(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)
