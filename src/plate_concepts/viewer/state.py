"""What the plugin's panels share in one viewer: the open plate, its selected well, the store,
the dictionary, the explorer and the selected feature.

Each panel reads and sets these through :func:`get_state` and listens to the signals, so panels
stay independent (open a dictionary in one, browse it in another) and hold no algorithm.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from plate_concepts.plates.geometry import canonical_well

if TYPE_CHECKING:
    import napari

    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates.model import Plate
    from plate_concepts.plates.mosaic import PlateMosaic


class PlateConceptsState:
    """Shared objects of one viewer; a signal fires whenever one of them is replaced."""

    plate_changed = Signal(object)
    #: The selected well (None: none), e.g. the well whose fields the Plate panel shows.
    well_selected = Signal(object)
    store_changed = Signal(object)
    dictionary_changed = Signal(object)
    explorer_changed = Signal(object)
    feature_selected = Signal(int)

    def __init__(self) -> None:
        self.plate: Plate | None = None
        self.mosaic: PlateMosaic | None = None
        self.well: str | None = None
        self.store: EmbeddingStore | None = None
        self.dictionary: Any = None  # an ICFL or TopKSAE estimator
        self.explorer: FeatureExplorer | None = None
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

    def set_dictionary(self, dictionary: Any) -> None:
        self.dictionary = dictionary
        self.explorer = None
        self.dictionary_changed.emit(dictionary)

    def set_explorer(self, explorer: FeatureExplorer) -> None:
        self.explorer = explorer
        self.explorer_changed.emit(explorer)

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


def _adopt_plate(state: PlateConceptsState, layer: Any) -> None:
    info = layer.metadata.get("plate_concepts", {})
    mosaic = info.get("mosaic")
    if info.get("role") == "plate-channel" and mosaic is not None and mosaic is not state.mosaic:
        state.set_plate(mosaic.plate, mosaic)
