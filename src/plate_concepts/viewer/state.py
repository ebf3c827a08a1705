"""What the plugin's panels share in one viewer: the open plate, its selected well, the store,
the dictionary (and its file, its feature names), the activation pass to browse it from, the
explorer, the perturbation profiles and the selected feature.

Each panel reads and sets these through :func:`get_state` and listens to the signals, so panels
stay independent (open a dictionary in one, browse it in another) and hold no algorithm.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from plate_concepts.plates.geometry import canonical_well

if TYPE_CHECKING:
    import napari

    from plate_concepts.analysis.activation_pass import ActivationPass
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.analysis.feature_notes import FeatureNotes
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates.model import Plate
    from plate_concepts.plates.mosaic import PlateMosaic
    from plate_concepts.viewer._screen_profiles import ScreenProfiles


class PlateConceptsState:
    """Shared objects of one viewer; a signal fires whenever one of them is replaced."""

    plate_changed = Signal(object)
    #: The selected well (None: none), e.g. the well whose fields the Plate panel shows.
    well_selected = Signal(object)
    store_changed = Signal(object)
    dictionary_changed = Signal(object)
    explorer_changed = Signal(object)
    #: The explorer shows another plate of its store (its name); the viewer shows its images
    #: when they were found.
    explorer_plate_changed = Signal(str)
    #: Perturbation profiles and confound flags of the explorer's pass (None: none yet).
    profiles_changed = Signal(object)
    #: A feature's name, tags or note changed (its number; -1: the notes were replaced).
    notes_changed = Signal(int)
    feature_selected = Signal(int)

    def __init__(self) -> None:
        self.plate: Plate | None = None
        self.mosaic: PlateMosaic | None = None
        self.well: str | None = None
        self.store: EmbeddingStore | None = None
        self.dictionary: Any = None  # an ICFL or TopKSAE estimator
        #: The dictionary's file (None: fitted here and not saved yet).
        self.dictionary_path: Path | None = None
        #: Names, tags and notes of its features, kept beside that file (None without one).
        self.notes: FeatureNotes | None = None
        #: Why ``notes`` is None although there is a file (e.g. a names file that cannot be read).
        self.notes_problem: str = ""
        #: A written pass of the dictionary over the store to browse from (else one is computed).
        self.activation_pass: ActivationPass | None = None
        self.explorer: FeatureExplorer | None = None
        self.profiles: ScreenProfiles | None = None
        self.feature: int | None = None

    def set_plate(self, plate: Plate, mosaic: PlateMosaic) -> None:
        """A new plate; its wells are not the old plate's, so no well is selected."""
        self.plate, self.mosaic = plate, mosaic
        self.select_well(None)
        self.plate_changed.emit(plate)

    def select_well(self, well: str | None) -> None:
        """Select a well of the plate (any spelling; kept canonical), or none. Emits each time,
        also for the same well shown again."""
        self.well = None if well is None else canonical_well(well)
        self.well_selected.emit(self.well)

    def set_store(self, store: EmbeddingStore) -> None:
        self.store = store
        self.store_changed.emit(store)

    def set_dictionary(
        self,
        dictionary: Any,
        path: str | Path | None = None,
        activation_pass: ActivationPass | None = None,
    ) -> None:
        """A new dictionary, with its file (for its feature names) and a written activation
        pass of it over the store, when there are."""
        self.dictionary = dictionary
        self.activation_pass = activation_pass
        self.explorer = None
        self.profiles = None
        self._load_notes(path)
        self.dictionary_changed.emit(dictionary)

    def dictionary_saved(self, path: str | Path) -> None:
        """The dictionary was written to ``path``: its feature names are kept beside it now."""
        self._load_notes(path)
        self.notes_changed.emit(-1)

    def _load_notes(self, path: str | Path | None) -> None:
        from plate_concepts.analysis.feature_notes import FeatureNotes

        self.dictionary_path = None if path is None else Path(path)
        self.notes, self.notes_problem = None, ""
        if self.dictionary_path is None:
            return
        n_features = getattr(getattr(self.dictionary, "model_", None), "n_features", None)
        try:
            self.notes = FeatureNotes.load(self.dictionary_path, n_features)
        except (OSError, ValueError) as err:
            self.notes_problem = str(err)

    def feature_label(self, feature: int) -> str:
        """'feature 12' or 'feature 12: enlarged nuclei', as the notes name it."""
        return self.notes.label(feature) if self.notes is not None else f"feature {feature}"

    def set_explorer(self, explorer: FeatureExplorer) -> None:
        if explorer is not self.explorer:
            self.profiles = None
        self.explorer = explorer
        self.explorer_changed.emit(explorer)

    def set_profiles(self, profiles: ScreenProfiles | None) -> None:
        self.profiles = profiles
        self.profiles_changed.emit(profiles)

    def select_feature(self, feature: int) -> None:
        self.feature = int(feature)
        self.feature_selected.emit(self.feature)


_STATES: weakref.WeakKeyDictionary[Any, PlateConceptsState] = weakref.WeakKeyDictionary()


def get_state(viewer: napari.Viewer) -> PlateConceptsState:
    """The plugin state of a viewer, created on first use. A plate opened through the reader
    (File > Open, drag and drop) becomes the state's plate when its first layer arrives."""
    if viewer not in _STATES:
        state = _STATES[viewer] = PlateConceptsState()
        for layer in viewer.layers:
            _adopt_plate(state, layer)
        viewer.layers.events.inserted.connect(lambda event: _adopt_plate(state, event.value))
    return _STATES[viewer]


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def connect_while_alive(
    widget: Any,
    connections: Sequence[tuple[Any, Callable[..., Any]]],
    *,
    on_destroyed: Callable[[], Any] | None = None,
) -> None:
    """Connect each (state signal, slot) pair until the Qt ``widget`` is destroyed, then
    disconnect them (and call ``on_destroyed``): the state outlives the panels that follow it."""
    for signal, slot in connections:
        signal.connect(slot)

    def disconnect(*_: Any) -> None:
        if on_destroyed is not None:
            on_destroyed()
        for signal, slot in connections:
            signal.disconnect(slot)

    widget.destroyed.connect(disconnect)


def _adopt_plate(state: PlateConceptsState, layer: Any) -> None:
    info = layer.metadata.get("plate_concepts", {})
    mosaic = info.get("mosaic")
    if info.get("role") == "plate-channel" and mosaic is not None and mosaic is not state.mosaic:
        state.set_plate(mosaic.plate, mosaic)
