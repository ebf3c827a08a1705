"""napari reader contribution: plates, embedding stores, dictionary files and activation passes.

- Plates: OME-Zarr HCS plates, CellProfiler LoadData CSVs and folders of TIFF exports, also a
  plate folder holding them (e.g. ``images/`` and ``masks/`` inside), opened as
  ``plate-concepts view`` opens them: a plate map lying next to the images
  (``platemap*.csv|tsv|parquet``) is joined on the wells, and CellProfiler masks beside them
  become label images.
- Embedding stores (a folder with ``store.json``): the store becomes the viewer's store, and the
  centres of its crops are drawn on its plate (opened from the store's provenance) as points
  coloured by a label; without a readable plate only the store is opened.
- Dictionary files (``.safetensors`` with plate-concepts metadata): the dictionary becomes the
  viewer's dictionary, with the store and plate it was fitted on when they still exist.
- Activation passes (a folder written by ``plate-concepts encode``): its dictionary and store
  are opened and the features are browsed from the pass (``FeatureExplorer.from_pass``: only
  the shown plate's codes are read), on the first plate whose images are found.

:func:`napari_get_reader` returns None for anything else, so napari can try other plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plate_concepts._io import output_kind
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
        if is_activation_pass(target):
            return read_activation_pass
        if target.suffix.lower() == DICTIONARY_SUFFIX:
            return read_dictionary_file if output_kind(target, ["dictionary"]) else None
        kind = detect_plate_format(target)
    except (OSError, ValueError):
        return None
    if kind != "tiff-folder":
        return read_plate  # ours for sure: any error while reading is worth showing
    # Any folder looks like a TIFF folder until its file names are parsed: probe it here.
    try:
        plate = _open_plate_folder(target)
    except (OSError, ValueError, KeyError):
        return None
    return lambda _path: _plate_layers(plate)


def read_plate(path: str | list[str]) -> list[LayerData]:
    """Layer data of a plate source (see :func:`plate_layer_data`)."""
    if isinstance(path, list):
        path = path[0]
    kind = detect_plate_format(path)
    plate = _open_plate_folder(Path(path)) if kind == "tiff-folder" else open_plate(path, platemap="auto")
    return _plate_layers(plate)


def read_embedding_store(path: str | list[str]) -> list[Any]:
    """Open a store, make it the current viewer's store, and draw its crops on its plate.

    The plate already open in the viewer is used when it is one of the store's plates;
    otherwise the first plate whose recorded source opens is added too. When none does, a
    notification says so and only the store is opened.
    """
    from plate_concepts.embeddings.source_plates import open_store_plate, store_plate_sources
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.viewer._embedding_views import crop_points_layer_data

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
    store_path = fitted_store_path(estimator)
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
        state.set_dictionary(estimator, path)
    return layers


def read_activation_pass(path: str | list[str]) -> list[Any]:
    """Open an activation pass: its store (drawn on its plate, as :func:`read_embedding_store`)
    and its dictionary become the viewer's, and the features are browsed from the pass."""
    from plate_concepts.analysis.activation_pass import ActivationPass
    from plate_concepts.dictionary.estimators import ICFL

    if isinstance(path, list):
        path = path[0]
    activation_pass = ActivationPass.open(path)
    spec = activation_pass.spec
    if spec.dictionary is None or not Path(spec.dictionary).is_file():
        raise ValueError(
            f"activation pass {path} was made with dictionary {spec.dictionary}, which is not there"
        )
    if not _is_store(Path(spec.store)):
        raise ValueError(f"activation pass {path} was made on store {spec.store}, which is not there")
    estimator = ICFL.load(spec.dictionary)
    viewer = _current_viewer()
    layers = read_embedding_store(spec.store)  # sets the store before the dictionary
    state = _state(viewer)
    if state is not None:
        state.set_dictionary(estimator, spec.dictionary, activation_pass=activation_pass)
    return layers


def fitted_store_path(estimator: Any) -> Path | None:
    """The store a dictionary was fitted on (its provenance), if recorded."""
    store = (getattr(estimator, "provenance_", None) or {}).get("store")
    if isinstance(store, dict) and store.get("path"):
        return Path(str(store["path"]))
    return None


def is_activation_pass(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``plate-concepts encode``."""
    from plate_concepts.analysis.pass_results import PASS_FILE

    return path.is_dir() and (path / PASS_FILE).is_file()


# ---------------------------------------------------------------------- helpers
def _plate_layers(plate: Plate, mosaic: PlateMosaic | None = None) -> list[LayerData]:
    from plate_concepts.viewer.app import install_plate_interactions

    viewer = _current_viewer()
    if viewer is not None:  # hover labels and well clicks for plates opened with File > Open too
        install_plate_interactions(viewer)
    return plate_layer_data(plate, mosaic or PlateMosaic(plate))


def _open_plate_folder(folder: Path) -> Plate:
    """A folder of TIFF exports, or a plate folder holding one, opened as the CLI opens it
    (its plate map found beside the images)."""
    if not any(p.suffix.lower() in {".tif", ".tiff"} or p.is_dir() for p in folder.iterdir()):
        raise ValueError(f"{folder} holds no TIFF files or folders")
    return open_plate(folder, platemap="auto")


def _is_store(path: Path) -> bool:
    from plate_concepts.embeddings.store import EmbeddingStore

    return path.is_dir() and EmbeddingStore.is_store(path)


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
