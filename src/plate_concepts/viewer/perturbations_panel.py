"""The Perturbations panel: what a label value (a compound, a gene knock-out, a cell line) does
in terms of the dictionary's features.

Choose a label column and one of its values: the panel lists the features with the highest
z-score against the control wells of the same plate (combined over the value's replicate wells
and plates), with replicate agreement, mean activation and the confound flag of each feature
(the nuisance that explains it better than any label), and shows the top crops of its best
features (over the whole store, each from its own plate). Clicking a feature, or one of its
crops, selects it in every panel (the viewer state's feature). The profiles and flags are the
explorer preparer's (:mod:`~plate_concepts.viewer._screen_profiles`); changing the batch column
recomputes the flags in a background job.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd
from napari.utils.notifications import show_error
from qtpy.QtCore import QModelIndex, QSize, QSortFilterProxyModel, Qt, Signal
from qtpy.QtGui import QIcon
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QLabel,
    QToolButton,
    QWidget,
)

from plate_concepts.viewer._explorer_jobs import explorer_preparer
from plate_concepts.viewer._feature_table import FeatureTableModel
from plate_concepts.viewer._jobs import Job, start_job
from plate_concepts.viewer._layout import plain_label, plain_tooltip, scrolled_body
from plate_concepts.viewer._plots import rgb_pixmap
from plate_concepts.viewer._screen_profiles import (
    ScreenCrops,
    ScreenProfiles,
    describe_profiles,
    describe_value,
)
from plate_concepts.viewer._table_tooltips import row_table
from plate_concepts.viewer.state import connect_while_alive, get_state

if TYPE_CHECKING:
    import napari

NO_BATCH = "(none)"
#: Features listed per value, and those whose crops are shown (with how many crops each).
N_FEATURES = 20
CROP_FEATURES = 4
CROPS_PER_FEATURE = 6
THUMBNAIL = 64


class PerturbationsPanel(QWidget):
    """A label value's profile over the features, their confound flags and top crops."""

    #: Emitted once a value's profile (table and crops) is shown.
    profile_shown = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self.preparer = explorer_preparer(viewer)
        self._crops_job: Job | None = None
        self._flags_job: Job | None = None
        self._crops: ScreenCrops | None = None
        self._requests = 0
        self._build()
        connections = [
            (self.state.profiles_changed, self._on_profiles_changed),
            (self.state.explorer_changed, lambda _e: self._on_profiles_changed(self.state.profiles)),
            (self.state.notes_changed, lambda _f: self._show_value()),
            (self.state.feature_selected, self._on_feature_selected),
        ]
        connect_while_alive(self, connections)
        self.preparer.status_changed.connect(self._on_preparer_status)
        self._on_profiles_changed(self.state.profiles)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = scrolled_body(self)
        self.status = plain_label()
        layout.addWidget(self.status)
        form = QFormLayout()
        self.column = QComboBox()
        self.column.setToolTip("The label column whose values are profiled (perturbation, compound, gene…)")
        self.value = QComboBox()
        self.value.setToolTip("The label value whose profile is shown (best phenotypic activity, mAP, first)")
        self.batch = QComboBox()
        self.batch.setToolTip(
            "The column of batches: features that follow it more than any label are flagged as "
            "confounds (as are those following the plate, edge wells, row/column gradients, the "
            "field or the crop's foreground)"
        )
        form.addRow("label", self.column)
        form.addRow("value", self.value)
        form.addRow("batch column", self.batch)
        layout.addLayout(form)
        self.summary = plain_label()
        layout.addWidget(self.summary)
        self.model = FeatureTableModel()
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.proxy.setSourceModel(self.model)
        self.table = row_table(self.proxy, min_height=160)
        self.table.clicked.connect(self._on_clicked)
        self.table.selectionModel().currentRowChanged.connect(lambda current, _p: self._on_clicked(current))
        layout.addWidget(self.table, stretch=1)
        self.crops_title = QLabel("Top crops of the best features (click one to select its feature)")
        layout.addWidget(self.crops_title)
        self.gallery = QGridLayout()
        self.gallery.setSpacing(2)
        self.row_labels: list[QLabel] = []
        self.crop_buttons: list[list[QToolButton]] = []
        for row in range(CROP_FEATURES):
            label = plain_label()
            self.gallery.addWidget(label, 2 * row, 0, 1, CROPS_PER_FEATURE)
            self.row_labels.append(label)
            buttons = []
            for column in range(CROPS_PER_FEATURE):
                button = QToolButton()
                button.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
                button.setAutoRaise(True)
                button.setVisible(False)
                self.gallery.addWidget(button, 2 * row + 1, column)
                buttons.append(button)
            self.crop_buttons.append(buttons)
        layout.addLayout(self.gallery)
        self.column.currentTextChanged.connect(self._on_column_changed)
        self.value.currentIndexChanged.connect(lambda _i: self._show_value())
        self.batch.activated.connect(lambda _i: self._on_batch_chosen())

    # ------------------------------------------------------------------ profiles
    @property
    def profiles(self) -> ScreenProfiles | None:
        return self.state.profiles

    def _on_preparer_status(self, text: str) -> None:
        if self.profiles is None:
            self.status.setText(text)

    def _on_profiles_changed(self, profiles: ScreenProfiles | None) -> None:
        explorer = self.state.explorer
        if self._crops is None or explorer is None or self._crops.explorer is not explorer:
            self._crops = None if explorer is None else ScreenCrops(explorer)
        for combo in (self.column, self.batch):
            combo.blockSignals(True)
        previous = self.column.currentText()
        self.column.clear()
        self.batch.clear()
        if profiles is None or explorer is None:
            self.status.setText(
                "Perturbation profiles are computed once the features are ready (Features panel)."
                if self.state.dictionary is None or explorer is None
                else "Profiling label values against the controls of each plate…"
            )
            self.value.clear()
            self._set_table(None)
        else:
            self.column.addItems(profiles.columns)
            if previous in profiles.columns:
                self.column.setCurrentText(previous)
            self.batch.addItems([NO_BATCH, *explorer.activation_pass.label_columns])
            self.batch.setCurrentText(profiles.batch or NO_BATCH)
            self.status.setText(describe_profiles(profiles, len(explorer.store.plates)))
        for combo in (self.column, self.batch):
            combo.blockSignals(False)
        self._on_column_changed(self.column.currentText())

    def _on_column_changed(self, column: str) -> None:
        profiles = self.profiles
        self.value.blockSignals(True)
        previous = self.value.currentData()
        self.value.clear()
        if profiles is not None and column in profiles.profiles:
            values = profiles.profiles[column].values

            def activity(value: Any) -> float:
                score = values[value].map
                return -score if math.isfinite(score) else math.inf

            for value in sorted(values, key=lambda v: (activity(v), str(v))):
                self.value.addItem(str(value), value)
            index = self.value.findData(previous)
            self.value.setCurrentIndex(max(index, 0))
        self.value.blockSignals(False)
        self._show_value()

    def choose(self, column: str, value: Any) -> None:
        """Show the profile of ``value`` of label ``column`` (as choosing them would)."""
        self.column.setCurrentText(column)
        index = self.value.findData(value)
        if index < 0:
            index = self.value.findText(str(value))
        if index < 0:
            raise ValueError(f"{column} = {value!r} has no profile (values: {[self.value.itemText(i) for i in range(self.value.count())]})")
        self.value.setCurrentIndex(index)
        self._show_value()

    def _show_value(self) -> None:
        profiles, column, value = self.profiles, self.column.currentText(), self.value.currentData()
        if profiles is None or column not in profiles.profiles or value is None:
            self._set_table(None)
            self.summary.setText(" ")
            return
        result = profiles.profiles[column]
        if value not in result.values:
            return
        self.summary.setText(describe_value(result, value))
        top = profiles.profile_table(column, value, N_FEATURES)
        notes = self.state.notes
        table = pd.DataFrame({
            "feature": top["feature"].to_numpy(),
            **({"name": [notes.name(int(f)) for f in top["feature"]]} if notes is not None else {}),
            "z": top["z"].to_numpy(),
            "max selectivity": top["max_selectivity"].to_numpy(),
            "replicates z>2": top["replicate_fraction"].to_numpy(),
            "mean": top["mean"].to_numpy(),
            "fraction active": top["fraction_active"].to_numpy(),
            "confound": top["confound"].to_numpy(),
        })
        why = {int(f): profiles.why_flagged(int(f)) for f in top["feature"] if profiles.flag_text(int(f))}
        self._set_table(table, {"confound": why})
        self._show_crops([int(f) for f in top["feature"][:CROP_FEATURES]], f"{column}={value}")

    def _set_table(self, table: pd.DataFrame | None, tips: dict[str, dict[int, str]] | None = None) -> None:
        self.model = FeatureTableModel(table, tips=tips)
        self.proxy.setSourceModel(self.model)
        if "z" in self.model.shown:
            self.table.sortByColumn(self.model.shown.index("z"), Qt.SortOrder.DescendingOrder)
        if self.state.feature is not None:
            self._on_feature_selected(self.state.feature)

    # ------------------------------------------------------------------ confound flags
    def _on_batch_chosen(self) -> None:
        """Recompute the confound flags with the chosen batch column, in a job."""
        profiles, explorer = self.profiles, self.state.explorer
        batch = None if self.batch.currentText() in ("", NO_BATCH) else self.batch.currentText()
        if profiles is None or explorer is None or batch == profiles.batch or self._flags_job is not None:
            return
        activation_pass = explorer.activation_pass
        columns = [c for c in activation_pass.label_columns if c != batch]

        def work(_job: Job) -> ScreenProfiles:
            from plate_concepts.analysis.confounds import confound_scores

            flags = confound_scores(activation_pass, columns, batch)
            return ScreenProfiles(profiles.profiles, profiles.problems, flags, batch)

        def done(result: ScreenProfiles) -> None:
            if self.state.profiles is profiles:
                self.state.set_profiles(result)

        self.status.setText(f"Flagging confounds with batch column {batch or 'none'}…")
        self._flags_job = start_job(
            work, returned=done, errored=lambda err: show_error(f"Could not flag confounds: {err}"),
            finished=lambda: setattr(self, "_flags_job", None),
        )  # fmt: skip

    # ------------------------------------------------------------------ selecting features
    def _on_clicked(self, index: QModelIndex) -> None:
        if not index.isValid():
            return
        feature = self.model.feature_at(self.proxy.mapToSource(index).row())
        if feature != self.state.feature:
            self.state.select_feature(feature)

    def select_row(self, row: int) -> int:
        """Click row ``row`` of the table (as shown); returns its feature."""
        index = self.proxy.index(row, 0)
        self.table.setCurrentIndex(index)
        self._on_clicked(index)
        return self.model.feature_at(self.proxy.mapToSource(index).row())

    def _on_feature_selected(self, feature: int) -> None:
        row = self.model.row_of(feature)
        if row is None:
            self.table.clearSelection()
            return
        index = self.proxy.mapFromSource(self.model.index(row, 0))
        if index.isValid() and self.table.currentIndex().row() != index.row():
            self.table.selectionModel().blockSignals(True)
            self.table.setCurrentIndex(index)
            self.table.selectionModel().blockSignals(False)

    # ------------------------------------------------------------------ crops
    def _show_crops(self, features: list[int], what: str) -> None:
        """Read the top crops of ``features`` in a job, then show them row by row."""
        self._requests += 1
        number, crops = self._requests, self._crops
        for label, buttons in zip(self.row_labels, self.crop_buttons, strict=True):
            label.setText("")
            for button in buttons:
                button.setVisible(False)
        if crops is None or not features:
            self.profile_shown.emit(what)
            return

        def work(_job: Job) -> list[Any]:
            return [(f, *crops.thumbnails(f, CROPS_PER_FEATURE, THUMBNAIL)) for f in features]

        def shown(rows: list[Any]) -> None:
            if number != self._requests:
                return  # another value was chosen meanwhile
            try:
                self._fill_gallery(rows)
            except RuntimeError:  # the panel was closed while its crops were read
                return
            self.profile_shown.emit(what)

        self._crops_job = start_job(
            work, returned=shown, errored=lambda err: show_error(f"Could not read the crops: {err}"),
            finished=lambda: setattr(self, "_crops_job", None),
        )  # fmt: skip

    def _fill_gallery(self, rows: list[Any]) -> None:
        z = dict(zip(self.model.table.get("feature", []), self.model.table.get("z", []), strict=False))
        for (feature, thumbnails, missing), label, buttons in zip(rows, self.row_labels, self.crop_buttons, strict=False):
            text = f"{self.state.feature_label(feature)}" + (f", z {z[feature]:.1f}" if feature in z else "")
            if missing:
                text += f" ({missing} crop(s) on plates whose images were not found)"
            label.setText(text)
            for button, (crop, plate, rgb) in zip(buttons, thumbnails, strict=False):
                button.setIcon(QIcon(rgb_pixmap(rgb, THUMBNAIL)))
                tip = (f"{self.state.feature_label(feature)}: plate {plate}, well {crop.well}, field "
                       f"{crop.field + 1}, activation {crop.value:.4g} (click to select the feature)")
                button.setToolTip(plain_tooltip(tip))  # a name or plate may look like HTML
                button.setVisible(True)
                try:
                    button.clicked.disconnect()
                except (TypeError, RuntimeError):
                    pass  # nothing connected yet
                button.clicked.connect(lambda _=False, f=feature: self.state.select_feature(f))

    @property
    def is_busy(self) -> bool:
        return self._crops_job is not None or self._flags_job is not None
