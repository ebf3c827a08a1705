"""The Features panel's layers in the viewer: a feature view's layer data turned into napari
layers, updated in place (keeping the user's colormap, opacity and visibility), kept above the
plate's layers (and the Plate panel's well fields), renamed when a feature is named, removed
with the dictionary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer

from plate_concepts.viewer._feature_layers import (
    FEATURE_ROLES,
    METADATA_KEY,
    ROLE_CELLS,
    ROLE_HEATMAP,
    ROLE_MAP,
    layer_name,
)

if TYPE_CHECKING:
    import napari

    from plate_concepts.viewer.state import PlateConceptsState

LAYER_CLASSES = {"image": Image, "labels": Labels}
WELL_FIELD_ROLE = "well-field"  # the Plate panel's full-resolution layers of one well


def role_of(layer: Any) -> str | None:
    return layer.metadata.get(METADATA_KEY, {}).get("role")


class FeatureLayers:
    """The feature layers (heatmap, activation map, objects) of one viewer."""

    def __init__(self, viewer: napari.viewer.Viewer, state: PlateConceptsState) -> None:
        self.viewer = viewer
        self.state = state
        self._objects_of: Any = None  # the explorer whose objects the objects layer shows

    def layers(self) -> list[Any]:
        return [layer for layer in self.viewer.layers if role_of(layer) in FEATURE_ROLES]

    def remove(self, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Remove the feature layers whose role is not in ``keep``."""
        for layer in [layer for layer in self.layers() if role_of(layer) not in keep]:
            self.viewer.layers.remove(layer)

    def rename(self, feature: int) -> None:
        """Give ``feature``'s layers the name the notes give it now."""
        for layer in self.layers():
            info = layer.metadata[METADATA_KEY]
            if info.get("feature") == feature and info.get("what"):
                layer.name = layer_name(feature, info["what"], self.state.notes.name(feature) if self.state.notes else "")

    def raise_above_plate(self) -> None:
        """Keep the heatmap above the plate's channels, grid and labels (also those of a plate
        shown after it), and the activation map and objects above those and the Plate panel's
        full-resolution well fields."""
        from plate_concepts.viewer._plate_views import PLATE_ROLES

        mosaic_roles = set(PLATE_ROLES) - {WELL_FIELD_ROLE}
        for role, below in (
            (ROLE_HEATMAP, mosaic_roles),
            (ROLE_MAP, {*PLATE_ROLES, ROLE_HEATMAP}),
            (ROLE_CELLS, {*PLATE_ROLES, ROLE_HEATMAP, ROLE_MAP}),
        ):
            roles = [role_of(layer) for layer in self.viewer.layers]
            under = [i for i, other in enumerate(roles) if other in below]
            if role in roles and under and roles.index(role) < max(under):
                # napari's move(src, dest) puts the layer before ``dest``: just above the top one
                self.viewer.layers.move(roles.index(role), max(under) + 1)

    def upsert(self, data: Any, kwargs: dict[str, Any], layer_type: str) -> tuple[Any, bool]:
        """Update the layer of the same role in place (keeping the user's colormap, opacity and
        visibility), or add it; returns (the layer, whether it is new)."""
        role = kwargs["metadata"][METADATA_KEY]["role"]
        layer = next(
            (lay for lay in self.layers() if role_of(lay) == role and isinstance(lay, LAYER_CLASSES[layer_type])),
            None,
        )
        data = np.asarray(data)
        if layer is None:
            # The layer owns a copy: its array is overwritten in place by the next feature,
            # and ``data`` may be held by the explorer's caches.
            layer = self.viewer.add_layer(Layer.create(data.copy(), kwargs, layer_type))
            if layer_type == "labels":
                self._objects_of = self.state.explorer
                layer.editable = False  # a result: no paint brush (and pan/zoom mode)
            else:
                layer.colorbar.visible = True
            return layer, True
        previous = layer.metadata.get(METADATA_KEY, {})
        layer.metadata = kwargs["metadata"]
        layer.name = kwargs["name"]
        # Every setter below redraws the layer, and a new array also re-lays out the viewer's
        # dims: an array of the same shape is copied into the layer's own, the scale and
        # translate are set only when the well changed, and the layer is redrawn once.
        same_shape = (
            isinstance(layer.data, np.ndarray)
            and layer.data.flags.writeable
            and layer.data.shape == data.shape
            and layer.data.dtype == data.dtype
        )
        # The objects of the same fields (of the same explorer's plate) are the same image:
        # only their colours change.
        same_objects = (
            layer_type == "labels"
            and self._objects_of is self.state.explorer
            and all(
                previous.get(key) == kwargs["metadata"][METADATA_KEY].get(key)
                for key in ("plate", "well", "fields", "label_name")
            )
        )
        if layer_type == "labels":
            self._objects_of = self.state.explorer
        if same_shape and not same_objects:
            np.copyto(layer.data, data)
        if not np.allclose(layer.scale[-2:], kwargs["scale"]):
            layer.scale = kwargs["scale"]
        if not np.allclose(layer.translate[-2:], kwargs["translate"]):
            layer.translate = kwargs["translate"]
        if layer_type == "labels":
            layer.features = kwargs["features"]
            if not same_shape:
                layer.data = data.copy()
                layer.editable = False  # napari makes a labels layer editable with new data
            layer.colormap = kwargs["colormap"]  # redraws the labels
            return layer, False
        low, high = kwargs["contrast_limits"]
        layer.contrast_limits_range = (low, high)
        layer.contrast_limits = (low, high)
        if same_shape:
            layer.refresh()
        else:
            layer.data = data.copy()
        return layer, False

    def channel_display(self) -> tuple[list[tuple[float, float]] | None, list[tuple[float, ...]] | None]:
        """Contrast limits and colours of the plate's channel layers (hidden channels black),
        so crop thumbnails look like the plate."""
        plate = self.state.plate
        if plate is None:
            return None, None
        layers = {}
        for layer in self.viewer.layers:
            info = layer.metadata.get(METADATA_KEY, {})
            if info.get("role") == "plate-channel" and info.get("mosaic") is self.state.mosaic:
                layers[info.get("channel")] = layer
        limits, colors = [], []
        for channel in plate.channels:
            layer = layers.get(channel)
            if layer is None:
                limits.append((0.0, float(np.iinfo(plate.dtype).max) if plate.dtype.kind in "ui" else 1.0))
                colors.append((1.0, 1.0, 1.0))
                continue
            limits.append(tuple(float(v) for v in layer.contrast_limits))
            top = layer.colormap.map(np.array([1.0]))[0][:3]
            colors.append(tuple(float(v) for v in top) if layer.visible else (0.0, 0.0, 0.0))
        return limits, colors
