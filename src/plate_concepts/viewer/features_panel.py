"""The Features panel: browse a dictionary's features and see where each one lights up.

A sortable, searchable table lists every feature with its frequency and the label value it is
most selective for. Selecting one (click or arrow keys) shows, over the plate:

- ``feature N: mean activation per well`` (or fraction of active crops): a plate heatmap;
- ``feature N: activation map``: the patch-level map over the fields of one well (the well
  chosen here or in the Plate panel, else the feature's top well);
- ``feature N: cells``: that well's cells coloured by their mean activation;

and, in the panel, its top-activating crops and its activation per label value against the
controls. The well is this panel's choice, else the viewer's selected well (the Plate panel's),
else the feature's top well. On a screen (a store of several plates) the panel chooses the
plate (its images opened from the store's recorded sources, by the explorer preparer) and can
follow each feature to the plate where it is most active; the table then also says on how many
plates a feature is active and its top plate, and, once the perturbation profiles are computed,
the label values that raise it most (z-score against the same plate's controls). Features are
named, tagged and annotated below the table (kept beside the dictionary file), and "Export
report" writes the HTML report. What a selection shows is decided once (:func:`resolve_selection`)
and computed on the GUI thread when it is all in memory and small (tens of ms, after the
explorer's preload), else in a background job; the panel only turns results into layers,
updated in place. The layers are results: not editable, each with its colour scale (napari's
colour bars for the images; the panel's scales name each, and the objects' too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error
from qtpy.QtCore import QModelIndex, QSize, Qt, Signal
from qtpy.QtGui import QIcon
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QToolButton,
    QWidget,
)

from plate_concepts.analysis.explorer import cell_label_name
from plate_concepts.viewer._explorer_jobs import ENCODING, PROFILING, explorer_preparer
from plate_concepts.viewer._feature_layer_sync import FeatureLayers
from plate_concepts.viewer._feature_layers import (
    FEATURE_ROLES,
    METADATA_KEY,
    N_CROPS,
    ROLE_CELLS,
    ROLE_HEATMAP,
    ROLE_MAP,
    THUMBNAIL_SIZE,
    CropThumbnail,
    FeatureView,
    colormap_colors,
    computed_quickly,
    feature_table,
    feature_view,
    resolve_selection,
)
from plate_concepts.viewer._feature_table import FeatureFilter, FeatureTableModel
from plate_concepts.viewer._jobs import Job, start_job
from plate_concepts.viewer._layout import plain_label, scrolled_body
from plate_concepts.viewer._notes_editor import NotesEditor
from plate_concepts.viewer._plate_chooser import PlateChooser
from plate_concepts.viewer._plots import BarChart, ColorScales, rgb_pixmap
from plate_concepts.viewer._report_export import ReportExport
from plate_concepts.viewer._table_tooltips import row_table
from plate_concepts.viewer.state import connect_while_alive, get_state, viewer_camera

if TYPE_CHECKING:
    import napari

KINDS = {"mean activation": "mean", "fraction of active crops": "fraction"}
MODES = {"cosine with feature direction": "cosine", "feature code": "code"}
AUTO_WELL = "automatic"
LABEL_COLUMN_WIDTH = 110
GALLERY_COLUMNS = 6  # two rows of thumbnails leave the table and plot room in a docked panel
PANEL_MIN_WIDTH = 460  # the five table columns side by side
#: The name of each feature layer's colour scale, from its metadata.
SCALE_NAMES = {
    ROLE_HEATMAP: lambda info: (
        "wells: " + {"mean": "mean activation", "fraction": "fraction active"}[info["kind"]]
    ),
    ROLE_MAP: lambda info: f"activation map: {info['mode']}",
    ROLE_CELLS: lambda info: f"{info['label_name']}: mean activation",
}


class FeaturesPanel(QWidget):
    """Feature table, feature layers over the plate, top crops and per-label activation."""

    #: Emitted with the feature number once all its layers and plots are shown.
    feature_shown = Signal(int)

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self._job: Job | None = None
        self._pending: tuple[Any, ...] | None = None  # the arguments of _start
        self._requests = 0  # numbers the requests: only the latest one's view is shown
        self._view: FeatureView | None = None
        self.layers = FeatureLayers(viewer, self.state)
        self._build()
        # Prepares the explorer whenever the dictionary or store changes, also when no
        # Dictionary panel is open (a dictionary opened with File > Open).
        self.preparer = explorer_preparer(viewer)
        self.preparer.status_changed.connect(self._on_preparer_status)
        self.preparer.progress.connect(self._on_preparer_progress)
        self.preparer.switch_started.connect(self._on_switch_started)
        self._on_explorer_changed(self.state.explorer)

        connections = [
            (self.state.explorer_changed, self._on_explorer_changed),
            (self.state.explorer_plate_changed, self._on_explorer_plate_changed),
            (self.state.profiles_changed, self._on_profiles_changed),
            (self.state.notes_changed, self._on_notes_changed),
            (self.state.dictionary_changed, self._on_dictionary_changed),
            (self.state.feature_selected, self._on_feature_selected),
            (self.state.well_selected, self._on_well_selected),
        ]
        connect_while_alive(self, connections)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = scrolled_body(self)
        self.setMinimumWidth(PANEL_MIN_WIDTH)
        self.status = plain_label()  # texts name features and label values, which may look like HTML
        layout.addWidget(self.status)

        options = QFormLayout()
        self.plates = PlateChooser()
        self.plates.plate_chosen.connect(self.choose_plate)
        self.plates.follow.toggled.connect(lambda on: on and self._follow_feature())
        self.label_column = QComboBox()
        self.label_column.setToolTip(
            "The label whose values the selectivity columns and the bar chart describe"
        )
        self.label_column.currentTextChanged.connect(self._on_label_column_changed)
        self.kind = QComboBox()
        self.kind.addItems(list(KINDS))
        self.kind.setToolTip("What the plate heatmap shows per well")
        self.kind.currentTextChanged.connect(lambda _: self.refresh())
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.mode.setToolTip(
            "Activation map: cosine of each patch token with the feature direction, "
            "or the feature's code of each patch token"
        )
        self.mode.currentTextChanged.connect(lambda _: self.refresh())
        self.well = QComboBox()
        self.well.setToolTip(
            "Whose fields get the activation map and the cell colours; automatic: the well "
            "chosen in the Plate panel, else the feature's most active well"
        )
        self.well.currentTextChanged.connect(lambda _: self.refresh())
        self.objects = QComboBox()
        self.objects.setToolTip(
            "Whose objects (a label image of the plate: cells, nuclei…) are coloured by their "
            "mean activation"
        )
        self.objects.currentTextChanged.connect(lambda _: self.refresh())
        options.addRow("plate", self.plates)
        options.addRow("label", self.label_column)
        options.addRow("wells coloured by", self.kind)
        options.addRow("activation map", self.mode)
        options.addRow("fields of well", self.well)
        options.addRow("objects coloured", self.objects)
        layout.addLayout(options)
        self.options = options

        self.search = QLineEdit()
        self.search.setPlaceholderText("search: feature number, name, tag, note, label value, plate…")
        self.search.setClearButtonEnabled(True)
        self.hide_dead = QCheckBox("hide dead features")
        self.hide_dead.setChecked(True)
        self.model = FeatureTableModel()
        self.proxy = FeatureFilter(self)
        self.proxy.setSourceModel(self.model)
        self.search.textChanged.connect(self.proxy.set_search)
        self.proxy.set_notes(self.state.notes)
        self.hide_dead.toggled.connect(self.proxy.set_hide_dead)
        self.table = row_table(self.proxy, min_height=180)
        self.table.selectionModel().currentRowChanged.connect(self._on_row_changed)
        layout.addWidget(self.search)
        layout.addWidget(self.hide_dead)
        layout.addWidget(self.table, stretch=1)

        self.title = plain_label()
        layout.addWidget(self.title)
        self.notes = NotesEditor(self.state)
        layout.addWidget(self.notes)
        # napari's colour bars on the canvas have no names, and labels have none: here they are.
        self.scales = ColorScales()
        self.scales.setToolTip("Colour scales of the feature's layers")
        layout.addWidget(self.scales)
        self.bars = BarChart()
        layout.addWidget(self.bars)
        self.gallery_title = QLabel("Top-activating crops")
        layout.addWidget(self.gallery_title)
        self.gallery = QGridLayout()
        self.gallery.setSpacing(2)
        self.crop_buttons: list[QToolButton] = []
        for index in range(N_CROPS):
            button = QToolButton()
            button.setIconSize(QSize(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextUnderIcon)
            button.setAutoRaise(True)
            button.setVisible(False)
            button.clicked.connect(lambda _=False, i=index: self.go_to_crop(i))
            self.gallery.addWidget(button, index // GALLERY_COLUMNS, index % GALLERY_COLUMNS)
            self.crop_buttons.append(button)
        layout.addLayout(self.gallery)
        self.report = ReportExport(self.state)
        layout.addWidget(self.report)

    # ------------------------------------------------------------------ explorer and table
    def _on_well_selected(self, _well: str | None) -> None:
        """The viewer's well changed (e.g. the Plate panel shows its fields): follow it when
        no well is chosen here, and keep the feature layers above its field layers."""
        well = self.state.well
        if (
            self.well.currentText() == AUTO_WELL
            and well is not None
            and (self._view is None or self._view.well != well)
        ):
            self.refresh()
        else:
            self.layers.raise_above_plate()

    def _on_dictionary_changed(self, _dictionary: Any) -> None:
        # The old dictionary's layers would mislead: they go until the new features are ready.
        self._view = None
        self.layers.remove()
        self._show_crops([])
        self.bars.set_data("", [], [])
        self.scales.set_scales([], [])
        self.title.setText(" ")
        self.proxy.set_notes(self.state.notes)
        self.notes.set_feature(None)
        self.report.changed()
        if self.state.explorer is None:
            self._on_explorer_changed(None)

    def _on_explorer_changed(self, explorer: Any) -> None:
        self.label_column.blockSignals(True)
        previous_column = self.label_column.currentText()
        self.label_column.clear()
        if explorer is None:
            self.status.setText(
                "No features yet: fit or load a dictionary in the Dictionary panel, or open a "
                "dictionary file or an activation pass (File > Open)."
                if self.state.dictionary is None
                else self.preparer.status or "Encoding the store with the dictionary…"
            )
            self.plates.set_plates(None, None)
            self._fill_wells(None)
            model = FeatureTableModel()
        else:
            columns = list(explorer.label_columns)
            self.label_column.addItems(columns)
            if previous_column in columns:
                self.label_column.setCurrentText(previous_column)
            elif explorer.label_column in columns:
                self.label_column.setCurrentText(explorer.label_column)
            screen = len(explorer.store.plates) > 1
            self.plates.setVisible(screen)  # a store of one plate has nothing to choose
            self.options.labelForField(self.plates).setVisible(screen)
            self.plates.set_plates(explorer.plate_table() if screen else None, explorer.plate_name)
            self._fill_wells(explorer)
            self._fill_objects(explorer)
            self._show_status(explorer)
            model = FeatureTableModel(self._table(explorer))
        self.label_column.blockSignals(False)
        self._set_model(model)
        self.table.sortByColumn(
            self.model.shown.index("max selectivity")
            if "max selectivity" in self.model.shown
            else 0,
            Qt.SortOrder.DescendingOrder,
        )
        self.report.changed()
        if (
            explorer is not None
            and self.state.feature is not None
            and self.state.feature < explorer.n_features
        ):
            self._on_feature_selected(self.state.feature)

    def _table(self, explorer: Any, column: str | None = None) -> Any:
        return feature_table(
            explorer, column or self.label_column.currentText() or None, self.state.notes, self.state.profiles
        )

    def _show_status(self, explorer: Any, problem: str = "") -> None:
        store = explorer.store
        where = (
            f"{len(store):,} crops of {len(store.plates)} plates; plate {explorer.plate_name} shown"
            if len(store.plates) > 1
            else f"{len(store):,} crops of plate {explorer.plate_name}"
        )
        if explorer.plate is None and not problem:
            problem = self.preparer.plate_problem or "its images are not open: its per-well values are in the chart"
        self.status.setText(
            f"{explorer.n_features} features over {where}"
            + (f" ({problem})" if problem else "")
            + ". Select one to see where it is active."
        )

    def _fill_wells(self, explorer: Any) -> None:
        """The explorer plate's wells (the user's choice stays when the plate has it)."""
        previous = self.well.currentText()
        self.well.blockSignals(True)
        self.well.clear()
        self.well.addItem(AUTO_WELL)
        if explorer is not None and explorer.n_features:
            self.well.addItems(list(explorer.well_values(0).index))
        if self.well.findText(previous) >= 0:
            self.well.setCurrentText(previous)
        self.well.blockSignals(False)

    def _fill_objects(self, explorer: Any) -> None:
        """The plate's label images, the one outlining whole cells first chosen."""
        names = list(explorer.plate.label_names) if explorer.plate is not None else []
        previous = self.objects.currentText()
        self.objects.blockSignals(True)
        self.objects.clear()
        self.objects.addItems(names)
        chosen = previous if previous in names else cell_label_name(names)
        if chosen:
            self.objects.setCurrentText(chosen)
        self.objects.setEnabled(bool(names))
        self.objects.blockSignals(False)

    def _on_preparer_status(self, text: str) -> None:
        if self.state.explorer is None and self.state.dictionary is not None:
            self.status.setText(text)

    def _on_preparer_progress(self, what: str, done: int, total: int) -> None:
        if self.state.explorer is None and what == ENCODING:
            self.status.setText(
                f"Encoding the store with the dictionary: {done:,} of {total:,} tokens…"
            )
        elif what == PROFILING and self.state.explorer is not None and self.state.profiles is None:
            self.status.setText(f"Profiling label values against controls: {done} of {total}…")

    def _on_profiles_changed(self, _profiles: Any) -> None:
        """Perturbation profiles arrived: the table gains the top values by z-score."""
        explorer = self.state.explorer
        if explorer is not None:
            self._show_status(explorer)
            self._reset_table(explorer)

    def _on_notes_changed(self, feature: int) -> None:
        """A name changed (here or in another panel): the table, the layers and the title."""
        explorer = self.state.explorer
        self.proxy.set_notes(self.state.notes)
        if feature < 0:  # all of them (the dictionary was saved elsewhere)
            self.notes.set_feature(self.state.feature)
            self.report.changed()
            if explorer is not None:
                self._reset_table(explorer)
            return
        self.model.set_name(feature, self.state.notes.name(feature) if self.state.notes else "")
        self.proxy.invalidateFilter()
        self.layers.rename(feature)
        if feature == self.notes.feature and self.state.notes is not None:
            self.notes.set_feature(feature)
        if self._view is not None and self._view.feature == feature:
            self._show_title(self._view)

    def _reset_table(self, explorer: Any) -> None:
        """Rebuild the table (new columns), keeping its sorting and the selected row."""
        header = self.table.horizontalHeader()
        sort_name = self.model.shown[header.sortIndicatorSection()] if 0 <= header.sortIndicatorSection() < len(self.model.shown) else None
        order = header.sortIndicatorOrder()
        self._set_model(FeatureTableModel(self._table(explorer)))
        if sort_name in self.model.shown:
            self.table.sortByColumn(self.model.shown.index(sort_name), order)
        if self.state.feature is not None:
            self._select_row(self.state.feature)

    # ------------------------------------------------------------------ plates of a screen
    def choose_plate(self, name: str) -> Job | None:
        """Show plate ``name`` of the store (its images, wells and feature layers); returns
        the job that opens it, None when it is already shown."""
        try:
            return self.preparer.switch_plate(name)
        except ValueError as err:
            show_error(str(err))
            return None

    def _on_switch_started(self, name: str) -> None:
        self.plates.show_plate(name)
        self.plates.setEnabled(False)
        self.status.setText(f"Opening plate {name}: its images and codes…")

    def _on_explorer_plate_changed(self, name: str) -> None:
        explorer = self.state.explorer
        self.plates.setEnabled(True)
        if explorer is None:
            return
        self.plates.show_plate(explorer.plate_name)
        self._fill_wells(explorer)
        self._fill_objects(explorer)
        self._show_status(explorer)
        self.refresh()

    def _follow_feature(self) -> bool:
        """With "go to top plate" on: show the plate where the selected feature is most active;
        whether a plate switch started."""
        explorer, feature = self.state.explorer, self.state.feature
        if not self.plates.follow.isChecked() or explorer is None or feature is None or len(explorer.store.plates) < 2:
            return False
        top = explorer.top_plate(feature)
        return top != explorer.plate_name and self.choose_plate(top) is not None

    def _on_label_column_changed(self, column: str) -> None:
        explorer = self.state.explorer
        if explorer is None or not column:
            return
        feature = self.state.feature
        self._set_model(FeatureTableModel(self._table(explorer, column)))
        if feature is not None:
            self._select_row(feature)
        self.refresh()

    def _set_model(self, model: FeatureTableModel) -> None:
        """Show a new table; the text columns take the width the numbers leave."""
        self.model = model
        self.proxy.setSourceModel(model)
        header = self.table.horizontalHeader()
        for name in ("most selective for", "name", "top values (z)"):
            if name in model.shown:  # long values are elided, the numbers stay in view
                column = model.shown.index(name)
                header.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
                header.resizeSection(column, LABEL_COLUMN_WIDTH)

    def _on_row_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if not current.isValid():
            return
        feature = self.model.feature_at(self.proxy.mapToSource(current).row())
        if feature != self.state.feature:
            self.state.select_feature(feature)

    def _select_row(self, feature: int) -> None:
        row = self.model.row_of(feature)
        if row is None:
            return
        index = self.proxy.mapFromSource(self.model.index(row, 0))
        if index.isValid() and self.table.currentIndex().row() != index.row():
            self.table.selectionModel().blockSignals(True)
            self.table.setCurrentIndex(index)
            self.table.selectionModel().blockSignals(False)
            self.table.scrollTo(index)

    def select_feature(self, feature: int) -> None:
        """Show ``feature`` (as a click on its row would)."""
        self.state.select_feature(feature)

    # ------------------------------------------------------------------ showing a feature
    def _on_feature_selected(self, feature: int) -> None:
        explorer = self.state.explorer
        if explorer is None or not 0 <= feature < explorer.n_features:
            return
        self._select_row(feature)
        self.notes.set_feature(feature)
        if self.preparer.switching is None and self._follow_feature():
            return  # the feature is shown once its top plate is
        self.refresh()

    def _mosaic(self, explorer: Any) -> Any:
        """The viewer's plate mosaic when the viewer shows the explorer's plate, else None."""
        plate = self.state.plate
        if plate is None or self.state.mosaic is None:
            return None
        if len(explorer.store.plates) == 1 or plate.name == explorer.plate_name:
            return self.state.mosaic
        return None

    def refresh(self) -> None:
        """Recompute the selected feature's layers and plots: at once when everything is in
        memory and small (:func:`computed_quickly`), else in a background job."""
        explorer, feature = self.state.explorer, self.state.feature
        if explorer is None or feature is None or not 0 <= feature < explorer.n_features:
            return
        if self.preparer.switching is not None:
            return  # the explorer is reading another plate: shown when it is ready
        self._requests += 1
        number = self._requests
        mosaic = self._mosaic(explorer)
        try:
            selection = resolve_selection(
                explorer,
                feature,
                kind=KINDS[self.kind.currentText()],
                mode=MODES[self.mode.currentText()],
                well=self.chosen_well(),
                label_name=self.objects.currentText() or None,
                # Without the plate's images, its per-well values go into the chart.
                label_column="well" if mosaic is None else self.label_column.currentText() or None,
                n_crops=N_CROPS,
                name=self.state.notes.name(feature) if self.state.notes is not None else "",
            )
        except Exception as error:  # noqa: BLE001 - as a job's errors: a notification
            show_error(f"Could not show feature {feature}: {error}")
            return
        limits, colors = self.layers.channel_display() if mosaic is not None else (None, None)

        def compute(_job: Any = None) -> FeatureView:
            return feature_view(
                explorer,
                mosaic,
                selection,
                channel_limits=limits,
                channel_colors=colors,
                thumbnail_size=THUMBNAIL_SIZE,
            )

        if computed_quickly(explorer, mosaic, selection, thumbnail_size=THUMBNAIL_SIZE):
            self._pending = None  # any job still running was for an older selection
            try:
                view = compute()
            except Exception as error:  # noqa: BLE001 - as a job's errors: a notification
                show_error(f"Could not show feature {feature}: {error}")
                return
            self._apply(view, explorer, number)
            return
        self.title.setText(f"Feature {feature}: computing…")
        if self._job is not None:  # only the latest matters (arrow keys held down)
            self._pending = (compute, explorer, feature, number)
            return
        self._start(compute, explorer, feature, number)

    def _start(self, compute: Any, explorer: Any, feature: int, number: int) -> None:
        def errored(error: Exception) -> None:
            if number == self._requests:  # an older request may fail as the plate changes
                show_error(f"Could not show feature {feature}: {error}")

        self._job = start_job(
            compute,
            returned=lambda view: self._apply(view, explorer, number),
            errored=errored,
            finished=self._on_job_finished,
        )

    def _on_job_finished(self) -> None:
        self._job = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._start(*pending)

    def chosen_well(self) -> str | None:
        """The well whose fields are shown: this panel's choice, else the viewer's selected
        well (the Plate panel's), else None (the feature's most active well)."""
        if self.well.currentText() and self.well.currentText() != AUTO_WELL:
            return self.well.currentText()
        explorer = self.state.explorer
        return self.state.well if explorer is not None and self._mosaic(explorer) is not None else None

    def _apply(self, view: FeatureView, explorer: Any = None, number: int | None = None) -> None:
        if (
            (number is not None and number != self._requests)
            or view.feature != self.state.feature
            or self.state.explorer is None
            or (explorer is not None and explorer is not self.state.explorer)
        ):
            return  # a newer selection, or another dictionary, is on its way
        self._view = view
        present = set()
        for data, kwargs, layer_type in view.layers:
            present.add(kwargs["metadata"][METADATA_KEY]["role"])
            layer, new = self.layers.upsert(data, kwargs, layer_type)
            if new and layer_type == "image":
                layer.events.contrast_limits.connect(self._show_scales)
        self.layers.remove(keep=present)
        self.layers.raise_above_plate()
        self._show_title(view)
        self._show_scales()
        if view.bars is not None:
            self.bars.set_data(
                view.bars.title, view.bars.labels, view.bars.values, view.bars.is_control
            )
        self._show_crops(view.crops)
        self.feature_shown.emit(view.feature)

    def _show_title(self, view: FeatureView) -> None:
        row = self.model.row_of(view.feature)
        name = self.state.notes.name(view.feature) if self.state.notes is not None else ""
        text = f"Feature {view.feature}" + (f" ({name})" if name else "")
        if row is not None:
            record = self.model.table.iloc[row]
            text += f": active in {100 * record['frequency']:.1f} % of crops"
            if record["most selective for"]:
                text += (
                    f"; most selective for {self.label_column.currentText()} = {record['most selective for']} "
                    f"(max selectivity {record['max selectivity']:.2f})"
                )
            if "top plate" in record:
                text += f"; most active on plate {record['top plate']}"
        if not view.layers:
            text += ". Per-well values of this plate in the chart (no images shown)."
        elif view.well:
            text += f". Fields of well {view.well} shown."
        self.title.setText(text)

    def _show_scales(self, _event: Any = None) -> None:
        """One colour scale per feature layer: the images' contrast limits (as their colour
        bars show them, also after the user changes them), the objects' value range."""
        rows = []
        for layer in self.viewer.layers:
            info = layer.metadata.get(METADATA_KEY, {})
            role = info.get("role")
            if role in (ROLE_HEATMAP, ROLE_MAP):
                low, high = layer.contrast_limits
            elif role == ROLE_CELLS:
                low, high = info["limits"]
            else:
                continue
            rows.append((FEATURE_ROLES.index(role), SCALE_NAMES[role](info), low, high))
        # Wells, then the map, then the objects: as they nest.
        self.scales.set_scales(colormap_colors(), [row[1:] for row in sorted(rows)])

    def _show_crops(self, crops: list[CropThumbnail]) -> None:
        self.gallery_title.setText(
            "Top-activating crops (click one to go there)"
            if crops
            else "Top-activating crops: open the plate to see them"
        )
        for index, button in enumerate(self.crop_buttons):
            if index < len(crops):
                crop = crops[index].crop
                button.setIcon(QIcon(rgb_pixmap(crops[index].rgb, THUMBNAIL_SIZE)))
                button.setText(crops[index].caption)
                button.setToolTip(
                    f"well {crop.well}, field {crop.field + 1}, crop at ({crop.crop_y}, {crop.crop_x}), "
                    f"activation {crop.value:.4g}"
                )
                button.setVisible(True)
            else:
                button.setVisible(False)

    def go_to_crop(self, index: int) -> None:
        """Centre the view on a top crop and show its well's fields."""
        if self._view is None or index >= len(self._view.crops) or self.state.mosaic is None:
            return
        crop = self._view.crops[index].crop
        y, x = self.state.mosaic.to_mosaic(
            crop.well,
            crop.field,
            crop.crop_y + crop.crop_size / 2,
            crop.crop_x + crop.crop_size / 2,
        )
        camera = viewer_camera(self.viewer)
        camera.center = (y, x)
        camera.zoom = max(camera.zoom, 100 / crop.crop_size)  # the crop at least ~100 screen px
        if self.well.findText(crop.well) >= 0:
            self.well.setCurrentText(crop.well)

    @property
    def is_busy(self) -> bool:
        return self._job is not None or self._pending is not None
