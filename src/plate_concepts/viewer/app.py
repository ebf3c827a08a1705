"""Putting a plate into a napari viewer: its layers, the well under the cursor, a well's fields."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plate_concepts.plates.geometry import canonical_well
from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer._plate_views import (
    PLATE_ROLES,
    channel_styles,
    well_field_layer_data,
    well_labels_text,
)
from plate_concepts.viewer.plate_layers import plate_layer_data
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

_INTERACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def show_plate(
    viewer: napari.Viewer,
    plate: Plate,
    colors: Sequence[str] | None = None,
    mosaic: PlateMosaic | None = None,
    layer_data: list[tuple[Any, dict, str]] | None = None,
) -> PlateMosaic:
    """Add a plate's channel layers, well grid and row/column headers, make it the viewer's
    plate, and show the plate-map labels of the well under the cursor in the status bar and a
    text overlay; double-clicking a well shows its fields (:func:`show_well`).

    ``colors`` (one colour name or hex code per channel) replace the stain colormaps;
    ``mosaic`` and ``layer_data`` (from :func:`plate_layer_data`, e.g. prepared in a worker
    thread since it reads pixels for the contrast limits) skip recomputing them.
    """
    from napari.layers import Layer

    if colors is not None and len(colors) != len(plate.channels):
        raise ValueError(
            f"{len(colors)} colours given for the {len(plate.channels)} channels {plate.channels}"
        )
    mosaic = mosaic or PlateMosaic(plate)
    layer_data = layer_data if layer_data is not None else plate_layer_data(plate, mosaic)
    state = get_state(viewer)  # before adding layers, so it adopts this plate only once
    added = [
        viewer.add_layer(Layer.create(data, kwargs, layer_type))
        for data, kwargs, layer_type in layer_data
    ]
    channel_layers = [layer for layer in added if _role(layer) == "plate-channel"]
    for layer, color in zip(channel_layers, colors or [], strict=False):
        layer.colormap = color
    install_plate_interactions(viewer)
    if channel_layers:
        viewer.layers.selection.active = channel_layers[0]
    viewer.reset_view()
    if state.mosaic is not mosaic:
        state.set_plate(plate, mosaic)
    return mosaic


PLUGIN = "napari-plate-concepts"


def show_results(
    viewer: napari.Viewer,
    plate: Plate,
    store: Any = None,
    explorer: Any = None,
    feature: int | None = None,
    dictionary_path: str | Path | None = None,
) -> int | None:
    """Open a plate in ``viewer`` with its label images, and with them an embedding store
    (its crops drawn on the plate) or a prepared :class:`FeatureExplorer` (a dictionary on a
    store, ``dictionary_path`` its file: default the one its activation pass records); dock the
    plugin's panels that go with them (Plate; Embeddings; Dictionary, Features and
    Perturbations, tabbed) and select ``feature`` (default: the most selective live one).
    Returns the selected feature, None without an explorer."""
    from napari.layers import Layer

    from plate_concepts.viewer._plate_views import mosaic_label_layer_data

    mosaic = PlateMosaic(plate)
    layers = plate_layer_data(plate, mosaic)
    n_channels = len(plate.channels)
    labels = mosaic_label_layer_data(plate, mosaic)
    show_plate(viewer, plate, mosaic=mosaic,
               layer_data=[*layers[:n_channels], *labels, *layers[n_channels:]])  # fmt: skip
    state = get_state(viewer)
    panels = ["Plate"]
    if explorer is not None:
        store = explorer.store
        panels += ["Dictionary", "Features", "Perturbations"]
    if store is not None:
        panels.insert(1, "Embeddings")
        state.set_store(store)
        if explorer is None:
            from plate_concepts.viewer._embedding_views import crop_points_layer_data

            viewer.add_layer(Layer.create(*crop_points_layer_data(store, mosaic)))
    docks = {panel: viewer.window.add_plugin_dock_widget(PLUGIN, panel, tabify=index > 0)[0]
             for index, panel in enumerate(panels)}  # fmt: skip
    if explorer is None:
        return None
    docks["Features"].raise_()  # the tab that shows the selected feature, not the last docked
    activation_pass = explorer.activation_pass
    path = dictionary_path or activation_pass.spec.dictionary
    state.set_dictionary(explorer.estimator, path, activation_pass if activation_pass.folder else None)
    state.set_explorer(explorer)
    if feature is None:
        table = explorer.feature_table()
        live = table[~table["dead"]] if (~table["dead"]).any() else table
        feature = int(live.sort_values(["max_selectivity", "frequency"], ascending=False,
                                       na_position="last")["feature"].iloc[0])  # fmt: skip
    state.select_feature(feature)
    return feature


def remove_plate_layers(viewer: napari.Viewer) -> None:
    """Remove the layers of the open plate (channels, grid, headers, labels, well fields) and
    the crops drawn on it."""
    roles = {*PLATE_ROLES, "crop-points"}
    for layer in [layer for layer in viewer.layers if _role(layer) in roles]:
        viewer.layers.remove(layer)


def show_well(viewer: napari.Viewer, well: str) -> list[Layer]:
    """Show one well of the viewer's plate at full resolution: a layer per field and channel
    (``"B07 field 1 DNA"``) and its label images, each translated to the field's place in the
    mosaic so they overlay it exactly; they replace the previous well's layers, keep the
    mosaic channels' colormaps and contrast limits, and the camera zooms to the well. The
    well becomes the viewer's selected well (``state.well``)."""
    from napari.layers import Layer

    state = get_state(viewer)
    if state.plate is None or state.mosaic is None:
        raise ValueError(
            "no plate is open in this viewer: open one first (Plate panel or File > Open)"
        )
    plate, mosaic, well = state.plate, state.mosaic, canonical_well(well)
    layer_data = well_field_layer_data(plate, mosaic, well, _mosaic_channel_styles(viewer, mosaic))
    active = viewer.layers.selection.active
    for layer in [layer for layer in viewer.layers if _role(layer) == "well-field"]:
        viewer.layers.remove(layer)
    added = [
        viewer.add_layer(Layer.create(data, kwargs, layer_type))
        for data, kwargs, layer_type in layer_data
    ]
    # Keep the layer the user had selected (a new labels layer would arm its paint brush).
    viewer.layers.selection.active = active if active in viewer.layers else added[0]
    viewer.fit_to_view(layers=added, margin=0.08)
    n_fields = len(plate.fields(well))
    viewer.status = f"{well}: {n_fields} field(s)  {well_labels_text(plate, well)}".strip()
    state.select_well(well)
    return added


def install_plate_interactions(viewer: napari.Viewer) -> None:
    """Once per viewer: the well under the cursor and its plate-map labels in the status bar
    (with a plate layer active) and a text overlay; double-clicking a well (or clicking it with
    the well-grid layer active) shows its fields."""
    if viewer in _INTERACTIVE:
        return
    _INTERACTIVE.add(viewer)
    viewer.mouse_move_callbacks.append(_describe_well)
    viewer.mouse_double_click_callbacks.append(_show_clicked_well)
    overlay = text_overlay(viewer)
    overlay.visible = True
    overlay.color = "white"
    overlay.font_size = 12
    for layer in viewer.layers:
        _watch_layer(viewer, layer)
    viewer_ref = weakref.ref(viewer)  # the layer list must not keep its viewer alive
    viewer.layers.events.inserted.connect(lambda event: _watch_layer(viewer_ref(), event.value))


def _watch_layer(viewer: napari.Viewer | None, layer: Any) -> None:
    if viewer is not None:
        _watch_well_grid(layer)
        _add_well_to_status(viewer, layer)


def well_at_position(viewer: napari.Viewer, position: Sequence[float] | None = None) -> str | None:
    """The well of the viewer's plate at a world position (default: the cursor), or None."""
    mosaic = get_state(viewer).mosaic
    if mosaic is None:
        return None
    y, x = (viewer.cursor.position if position is None else position)[-2:]
    return mosaic.well_at(y, x)


def describe_position(viewer: napari.Viewer, position: Sequence[float]) -> str:
    """``"D06 field 1  genotype: WT, ..."``: the well (and field) of the viewer's plate at a world
    position with its plate-map labels; empty off the plate's wells."""
    state = get_state(viewer)
    plate, mosaic = state.plate, state.mosaic
    if plate is None or mosaic is None or position is None or len(position) < 2:
        return ""
    y, x = position[-2:]
    well = mosaic.well_at(y, x)
    if well is None:
        return ""
    hit = mosaic.locate(y, x)
    where = f"{well} field {hit.field + 1}" if hit else well
    return f"{where}  {well_labels_text(plate, well)}".strip()


def _describe_well(viewer: napari.Viewer, event: object = None) -> None:
    text_overlay(viewer).text = describe_position(viewer, viewer.cursor.position)


def text_overlay(viewer: napari.Viewer) -> Any:
    """The canvas text overlay (``viewer.canvas.overlays['text']`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and "text" in getattr(canvas, "overlays", {}):
        return canvas.overlays["text"]
    return viewer.text_overlay


def _add_well_to_status(viewer: napari.Viewer, layer: Any) -> None:
    """Make a plate layer's status (napari computes it in a thread after each mouse move, from
    the active layer) end with the well under the cursor and its plate-map labels."""
    if _role(layer) not in PLATE_ROLES or getattr(layer, "_plate_concepts_status", False):
        return
    viewer_ref = weakref.ref(viewer)
    original = layer.get_status

    def get_status(position: Any = None, *args: Any, **kwargs: Any) -> Any:
        status = original(position, *args, **kwargs)
        current = viewer_ref()
        world = kwargs.get("world", False)
        if current is None or position is None:
            return status
        text = describe_position(current, position if world else layer.data_to_world(position))
        if not text:
            return status
        if isinstance(status, dict):
            status = {**status, "coordinates": f"{status.get('coordinates', '')}    {text}"}
            return status
        return f"{status}    {text}"

    layer.get_status = get_status
    layer._plate_concepts_status = True


def _show_clicked_well(viewer: napari.Viewer, event: Any) -> None:
    well = well_at_position(viewer, getattr(event, "position", None))
    if well is not None:
        show_well(viewer, well)


def _watch_well_grid(layer: Any) -> None:
    """A click (press and release without dragging) on a well-grid layer shows that well."""
    if _role(layer) != "well-grid" or _on_grid_click in layer.mouse_drag_callbacks:
        return
    layer.mouse_drag_callbacks.append(_on_grid_click)


def _on_grid_click(layer: Any, event: Any):
    mosaic = layer.metadata["plate_concepts"]["mosaic"]
    start = tuple(event.position[-2:])
    yield
    while event.type == "mouse_move":
        yield
    end = tuple(event.position[-2:])
    tolerance = 0.05 * min(mosaic.well_shape)
    if max(abs(a - b) for a, b in zip(start, end, strict=True)) > tolerance:
        return  # a drag (pan), not a click
    well = mosaic.well_at(*start)
    viewer = _viewer_of(layer)
    if well is not None and viewer is not None and get_state(viewer).mosaic is mosaic:
        show_well(viewer, well)


def _viewer_of(layer: Any) -> napari.Viewer | None:
    import napari

    for viewer in list(_INTERACTIVE):
        if layer in viewer.layers:
            return viewer
    return napari.current_viewer()


def _mosaic_channel_styles(viewer: napari.Viewer, mosaic: PlateMosaic) -> list[dict[str, Any]]:
    """Colormap and contrast limits of the mosaic's channel layers (as the user set them)."""
    by_channel = {
        layer.metadata["plate_concepts"]["channel"]: layer
        for layer in viewer.layers
        if _role(layer) == "plate-channel"
        and layer.metadata["plate_concepts"].get("mosaic") is mosaic
    }
    styles = channel_styles(mosaic.plate)
    for style, channel in zip(styles, mosaic.plate.channels, strict=True):
        layer = by_channel.get(channel)
        if layer is not None:
            style.update(colormap=layer.colormap, contrast_limits=tuple(layer.contrast_limits))
    return styles


def _role(layer: Any) -> str | None:
    return layer.metadata.get("plate_concepts", {}).get("role")
