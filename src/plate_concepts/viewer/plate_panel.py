"""The Plate panel: open a plate, see what it holds, find wells by label and look at one well."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, Select

from plate_concepts.plates import detect_plate_format, discover_platemap, open_plate
from plate_concepts.plates.model import Plate
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.viewer._jobs import Job, start_job
from plate_concepts.viewer._plate_views import (
    ALL_VALUES,
    label_values,
    plate_label_columns,
    plate_summary,
    wells_with_label,
)
from plate_concepts.viewer.app import (
    install_plate_interactions,
    remove_plate_layers,
    show_plate,
    show_well,
)
from plate_concepts.viewer.plate_layers import plate_layer_data
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari

FOLDER_SOURCE = "Folder or OME-Zarr"
CSV_SOURCE = "LoadData CSV file"
NO_FILTER = "(no filter)"
FORMAT_NAMES = {
    "ome-zarr": "OME-Zarr HCS plate",
    "loaddata": "CellProfiler LoadData CSV",
    "tiff-folder": "folder of TIFF exports (file names parsed when opened)",
}


class PlatePanel(Container):
    """Open a plate (OME-Zarr, TIFF folder or LoadData CSV, with an optional plate map, channel
    names and colours), show its mosaic and summary, list the wells with a chosen label, and
    show one well's fields at full resolution (choose it in the list, or double-click it)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.source_kind = ComboBox(
            label="Source", choices=[FOLDER_SOURCE, CSV_SOURCE], value=FOLDER_SOURCE
        )
        self.path = FileEdit(label="Plate", mode="d")
        self.format_label = Label(label="Format", value="choose a plate")
        self.platemap_path = FileEdit(
            label="Plate map", mode="r", filter="Plate maps (*.csv *.tsv *.parquet)"
        )
        self.channel_names = LineEdit(label="Channel names")
        self.colors = LineEdit(label="Colours")
        self.open_button = PushButton(text="Open plate")
        self.message = Label(label="", value="")
        self.summary = Label(label="Plate", value="no plate open")
        # Choices are callables: napari resets docked widgets' choices whenever layers change.
        self.filter_column = ComboBox(label="Filter by", choices=self._filter_columns)
        self.filter_value = ComboBox(label="Value", choices=self._filter_values)
        self.well_list = Select(label="Wells", choices=self._filtered_wells, allow_multiple=False)
        super().__init__(
            widgets=[
                self.source_kind, self.path, self.format_label, self.platemap_path,
                self.channel_names, self.colors, self.open_button, self.message, self.summary,
                self.filter_column, self.filter_value, self.well_list,
            ],
        )  # fmt: skip
        self.channel_names.native.setPlaceholderText("optional, e.g. DNA,ER,RNA,AGP,Mito")
        self.colors.native.setPlaceholderText("optional, e.g. blue,green,yellow,magenta,red")
        self.platemap_path.line_edit.native.setPlaceholderText(
            "optional: a CSV/TSV/parquet, one row per well"
        )
        self.well_list.tooltip = (
            "Choose a well to show its fields at full resolution (or double-click it on the plate)"
        )
        self.job: Job | None = None

        self.source_kind.changed.connect(self._on_source_kind)
        self.path.changed.connect(self._on_path)
        self.open_button.changed.connect(lambda: self.open_plate())
        self.filter_column.changed.connect(self._on_filter_column)
        self.filter_value.changed.connect(self._update_well_list)
        self.well_list.changed.connect(self._on_well_chosen)

        state = get_state(viewer)
        state.plate_changed.connect(self._on_plate_changed)
        install_plate_interactions(viewer)
        if state.plate is not None:
            self._on_plate_changed(state.plate)

    # ------------------------------------------------------------------ opening
    def open_plate(
        self,
        path: str | Path | None = None,
        platemap: str | Path | None = None,
        channel_names: str | None = None,
        colors: str | None = None,
    ) -> Any:
        """Open a plate in a background job (the fields are listed and a few are read for the
        contrast limits there), then show it; the arguments fill the panel's fields first.
        Returns the job (None when no plate is chosen); the Open button is enabled again
        when it has ended."""
        if path is not None:
            self.path.value = Path(path)
        if platemap is not None:
            self.platemap_path.value = Path(platemap)
        if channel_names is not None:
            self.channel_names.value = channel_names
        if colors is not None:
            self.colors.value = colors
        source = self._text_path(self.path)
        if source is None:
            self._show_error(
                "choose a plate: a folder of TIFF exports, an OME-Zarr plate or a LoadData CSV"
            )
            return None
        names = _split(self.channel_names.value)
        colours = _split(self.colors.value)
        platemap_path = self._text_path(self.platemap_path)
        self.open_button.enabled = False
        self.message.value = f"opening {source.name}..."
        self.job = start_job(
            lambda _job: _open_plate_job(source, platemap_path, names),
            returned=lambda result: self._show_opened(*result, colors=colours),
            errored=self._on_open_error,
            finished=lambda: setattr(self.open_button, "enabled", True),
        )
        return self.job

    def _show_opened(
        self, plate: Plate, mosaic: PlateMosaic, layer_data: list, colors: list[str] | None
    ) -> None:
        try:
            remove_plate_layers(self.viewer)
            show_plate(self.viewer, plate, colors=colors, mosaic=mosaic, layer_data=layer_data)
        except ValueError as err:
            self._show_error(str(err))
            return
        self.message.value = f"opened {plate.name} ({plate.reader})"

    def _on_open_error(self, err: Exception) -> None:
        self._show_error(f"could not open the plate: {err}")

    def _show_error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.message.value = text
        show_error(text)

    # ------------------------------------------------------------------ path fields
    def _on_source_kind(self, kind: str) -> None:
        self.path.mode = "r" if kind == CSV_SOURCE else "d"
        self.path.filter = "LoadData CSV (*.csv)" if kind == CSV_SOURCE else None

    def _on_path(self, value: Any = None) -> None:
        source = self._text_path(self.path)
        if source is None:
            self.format_label.value = "choose a plate"
            return
        try:
            kind = detect_plate_format(source)
        except (OSError, ValueError) as err:
            self.format_label.value = f"not a plate: {err}"
            return
        self.format_label.value = FORMAT_NAMES[kind]
        if self._text_path(self.platemap_path) is None and kind != "ome-zarr":
            found = discover_platemap(source)
            if found is not None:
                self.platemap_path.value = found

    @staticmethod
    def _text_path(widget: FileEdit) -> Path | None:
        text = widget.line_edit.value.strip()
        return Path(text).expanduser() if text and text != "." else None

    # ------------------------------------------------------------------ plate and wells
    def _filter_columns(self, widget: Any = None) -> list[str]:
        plate = get_state(self.viewer).plate
        return [NO_FILTER] if plate is None else [NO_FILTER, *plate_label_columns(plate)]

    def _filter_values(self, widget: Any = None) -> list[str]:
        plate = get_state(self.viewer).plate
        column = self.filter_column.value if hasattr(self, "filter_column") else NO_FILTER
        if plate is None or column in (None, NO_FILTER):
            return [ALL_VALUES]
        return [ALL_VALUES, *label_values(plate, column)]

    def _filtered_wells(self, widget: Any = None) -> list[str]:
        plate = get_state(self.viewer).plate
        if plate is None or not hasattr(self, "filter_value"):
            return []
        column = None if self.filter_column.value == NO_FILTER else self.filter_column.value
        return wells_with_label(plate, column, self.filter_value.value)

    def _on_plate_changed(self, plate: Plate) -> None:
        self.summary.value = plate_summary(plate)
        self.filter_column.reset_choices()
        self.filter_column.value = NO_FILTER
        self._on_filter_column(NO_FILTER)

    def _on_filter_column(self, column: str) -> None:
        self.filter_value.reset_choices()
        self.filter_value.value = ALL_VALUES
        self._update_well_list()

    def _update_well_list(self, value: Any = None) -> None:
        self.well_list.reset_choices()

    def _on_well_chosen(self, selected: list[str]) -> None:
        if selected and selected[0] != self.shown_well():
            show_well(self.viewer, selected[0])

    def shown_well(self) -> str | None:
        """The viewer's selected well (the one whose fields :func:`show_well` showed), if any."""
        return get_state(self.viewer).well

    def choose_well(self, well: str) -> list:
        """Choose ``well`` in the list (which shows its fields); returns its field layers."""
        if well not in self.well_list.choices:
            self.filter_column.value = NO_FILTER
        self.well_list.value = well
        return [
            layer
            for layer in self.viewer.layers
            if layer.metadata.get("plate_concepts", {}).get("well") == well
        ]


def _open_plate_job(
    path: Path, platemap: Path | None, channel_names: list[str] | None
) -> tuple[Plate, PlateMosaic, list]:
    """Worker body: open the plate lazily and prepare its layers (reads a few fields)."""
    from plate_concepts.viewer._embedding_views import attach_discovered_platemap

    plate = open_plate(path, platemap=platemap, channel_names=channel_names)
    if platemap is None and plate.platemap is None and detect_plate_format(path) == "tiff-folder":
        attach_discovered_platemap(plate, path)
    mosaic = PlateMosaic(plate)
    return plate, mosaic, plate_layer_data(plate, mosaic)


def _split(text: str) -> list[str] | None:
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None
