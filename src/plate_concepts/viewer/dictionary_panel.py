"""The Dictionary panel: fit a sparse dictionary (ICFL or TopK) on the open embedding store in
the background, watch it learn, cancel it, save it, or load one from a file; or compare the
methods, whitened and not, at matched sparsity and keep the run that finds most
(:class:`~plate_concepts.viewer._dictionary_compare.CompareBox`).

A fitted or loaded dictionary becomes the viewer's dictionary (``state.set_dictionary``); the
viewer's :class:`~plate_concepts.viewer._explorer_jobs.ExplorerPreparer` then encodes the store
with it in the background and hands the explorer to the Features panel; this panel shows its
progress and can cancel it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, LineEdit, SpinBox, Widget
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QWidget,
)

from plate_concepts._device import available_devices
from plate_concepts.analysis.activation_pass import label_columns_of
from plate_concepts.dictionary.checkpoints import default_checkpoint_path
from plate_concepts.dictionary.estimators import ICFL, METHODS
from plate_concepts.dictionary.settings import FitSettings, parse_value, setting_help, setting_info
from plate_concepts.dictionary.trainer import FitMessage
from plate_concepts.viewer._dictionary_compare import CompareBox
from plate_concepts.viewer._dictionary_fit import (
    METHOD_CHOICES,
    WHITENING_LABELS,
    PanelFit,
    describe_dictionary,
    describe_event,
    fit_steps,
    label_choices,
    token_labels,
)
from plate_concepts.viewer._explorer_jobs import explorer_preparer
from plate_concepts.viewer._jobs import Job, Progress, start_job
from plate_concepts.viewer._layout import scrolled_body
from plate_concepts.viewer._plots import LossCurve
from plate_concepts.viewer.state import connect_while_alive, get_state

if TYPE_CHECKING:
    import napari

    from plate_concepts.dictionary.trainer import TrainingEvent

DICTIONARY_FILTER = "Dictionary files (*.safetensors)"
_INT_MAX = 2**31 - 1


def setting_widgets(settings_class: type[FitSettings], names: list[str]) -> dict[str, Widget]:
    """magicgui widgets for the settings ``names`` of ``settings_class``: labels, tooltips
    (the setting's documentation and default) and initial values from the settings; a setting
    whose default is "automatic" (None) is a text field, empty for automatic."""
    by_name = {f.name: f for f in fields(settings_class)}
    widgets: dict[str, Widget] = {}
    for name in names:
        f, info = by_name[name], setting_info(by_name[name])
        common = {"label": info.label or name.replace("_", " "), "tooltip": setting_help(f)}
        if isinstance(f.default, bool):
            widget: Widget = CheckBox(value=f.default, **common)
        elif name == "whiten":
            choices = [(WHITENING_LABELS[value], value) for value in info.choices or ()]
            widget = ComboBox(choices=choices, value=f.default, **common)
        elif name == "device":
            widget = ComboBox(choices=available_devices(), value=f.default, **common)
        elif isinstance(f.default, int):
            minimum = int(info.minimum or 0)
            widget = SpinBox(value=f.default, min=minimum, max=_INT_MAX, **common)
        else:
            widget = LineEdit(value="" if f.default is None else str(f.default), **common)
            widget.native.setPlaceholderText("auto" if info.auto else "none")
        widgets[name] = widget
    return widgets


def read_setting(settings_class: type[FitSettings], name: str, widget: Widget) -> Any:
    """A setting's value from its widget (text parsed as on the command line; empty text is the
    setting's default)."""
    f = next(f for f in fields(settings_class) if f.name == name)
    if isinstance(widget, LineEdit):
        text = widget.value.strip()
        return f.default if not text else parse_value(f, text)
    return widget.value


def _panel_settings(settings_class: type[FitSettings], *, common: bool) -> list[str]:
    """The settings the panel shows (the advanced ones are left to Python and the command
    line): those every method shares, or only this method's own."""
    shared = {f.name for f in fields(FitSettings)}
    return [
        f.name for f in fields(settings_class)
        if not setting_info(f).advanced and (f.name in shared) == common
    ]


class DictionaryPanel(QWidget):
    """Fit, cancel, save and load the viewer's dictionary."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self._labels: dict[str, list[str]] = {}
        self._fit_job: Job | None = None
        self.preparer = explorer_preparer(viewer)
        self._build()
        self._refresh_labels()
        self._show_dictionary(self.state.dictionary)

        connections = [
            (self.state.store_changed, self._on_store_changed),
            (self.state.plate_changed, self._on_plate_changed),
            (self.state.dictionary_changed, self._on_dictionary_changed),
        ]
        connect_while_alive(self, connections, on_destroyed=self._cancel_jobs)
        # Qt signals: disconnected by Qt when this panel goes.
        self.preparer.status_changed.connect(self.explorer_label.setText)
        self.preparer.progress.connect(self._on_explorer_progress)
        self.explorer_label.setText(self.preparer.status or " ")

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = scrolled_body(self)

        self.store_label = QLabel()
        self.store_label.setWordWrap(True)
        layout.addWidget(self.store_label)

        controls = QGroupBox("Controls (unperturbed wells)")
        form = QFormLayout(controls)
        self.control_column = QComboBox()
        self.control_column.setToolTip("The label column that marks the control wells")
        self.control_column.currentTextChanged.connect(self._fill_control_values)
        self.control_values = QListWidget()
        self.control_values.setToolTip(
            "Tick the value(s) of the controls; whitening is fitted on their tokens"
        )
        self.control_values.setMaximumHeight(90)
        form.addRow("column", self.control_column)
        form.addRow("is one of", self.control_values)
        layout.addWidget(controls)

        # The settings' widgets come from the settings themselves (shared ones once, each
        # method's own in a stack); the controls and the batch column are picked from the labels.
        self.fields = setting_widgets(FitSettings, _panel_settings(FitSettings, common=True))
        self.method_fields = {
            name: setting_widgets(cls.settings_class, _panel_settings(cls.settings_class, common=False))
            for name, cls in METHODS.items()
        }
        whitening = QGroupBox("Whitening")
        whitening_form = QFormLayout(whitening)
        self._add_rows(whitening_form, ["whiten", "shrinkage"])
        self.batch_column = QComboBox()
        self.batch_column.setToolTip("The column naming each token's experiment batch")
        whitening_form.addRow("batch column", self.batch_column)
        self.fields["whiten"].changed.connect(self._update_enabled)
        layout.addWidget(whitening)

        method = QGroupBox("Dictionary")
        form = QFormLayout(method)
        self.method = QComboBox()
        self.method.addItems(list(METHOD_CHOICES))
        self.method.setToolTip(
            "ICFL: iterative codebook feature learning (no encoder); TopK: a sparse autoencoder"
        )
        self.method.currentTextChanged.connect(self._show_method_fields)
        form.addRow("method", self.method)
        self._add_rows(form, ["n_features"])
        self._method_rows: dict[str, list[QWidget]] = {}
        for name, widgets in self.method_fields.items():
            self._method_rows[name] = []
            for widget in widgets.values():
                label = QLabel(widget.label)
                form.addRow(label, widget.native)
                self._method_rows[name] += [label, widget.native]
        shown = {"whiten", "shrinkage", "n_features"}
        self._add_rows(form, [name for name in self.fields if name not in shown])
        self._show_method_fields()
        layout.addWidget(method)

        buttons = QHBoxLayout()
        self.fit_button = QPushButton("Fit")
        self.fit_button.setToolTip("Fit a dictionary on the embedding store in the background")
        self.fit_button.clicked.connect(self.start_fit)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current step; the dictionary so far is kept")
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.fit_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)

        self.compare_box = CompareBox(self._compare_request, self._keep_compared, self._on_compare_progress,
                                      self._update_enabled)
        layout.addWidget(self.compare_box)

        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress_label = QLabel(" ")
        self.progress_label.setWordWrap(True)
        self.loss_curve = LossCurve(title="training loss")
        layout.addWidget(self.progress)
        layout.addWidget(self.progress_label)
        layout.addWidget(self.loss_curve)

        files = QHBoxLayout()
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip(
            "Write the dictionary and its whitening to one .safetensors file"
        )
        self.save_button.clicked.connect(self._ask_save)
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Open a dictionary file (.safetensors)")
        self.load_button.clicked.connect(self._ask_load)
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)
        layout.addLayout(files)
        self.dictionary_label = QLabel()
        self.dictionary_label.setWordWrap(True)
        self.explorer_label = QLabel(" ")
        self.explorer_label.setWordWrap(True)
        layout.addWidget(self.dictionary_label)
        layout.addWidget(self.explorer_label)
        layout.addStretch(1)
        self._update_enabled()

    def _add_rows(self, form: QFormLayout, names: list[str]) -> None:
        for name in names:
            form.addRow(self.fields[name].label, self.fields[name].native)

    def _show_method_fields(self, *_: Any) -> None:
        """Only the chosen method's own settings are shown."""
        for name, widgets in self._method_rows.items():
            for widget in widgets:
                widget.setVisible(name == self.chosen_method)

    # ------------------------------------------------------------------ labels from the store
    def _refresh_labels(self) -> None:
        store = self.state.store
        self.compare_box.set_label_columns(
            [] if store is None else [c for c in label_columns_of(store) if c != "is_control"]
        )
        if store is None:
            self._labels = {}
            self.store_label.setText(
                "No embedding store: compute or open one in the Embeddings panel."
            )
        else:
            self._labels = label_choices(token_labels(store, self.state.plate))
            self.store_label.setText(
                f"Store {Path(store.path).name}: {len(store):,} tokens of dimension {store.dim}"
            )
        previous_control, previous_batch = (
            self.control_column.currentText(),
            self.batch_column.currentText(),
        )
        for combo, previous in (
            (self.control_column, previous_control),
            (self.batch_column, previous_batch),
        ):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(list(self._labels))
            if previous in self._labels:
                combo.setCurrentText(previous)
            combo.blockSignals(False)
        batch_guess = next((c for c in self._labels if "batch" in c.lower()), None)
        if batch_guess and previous_batch not in self._labels:
            self.batch_column.setCurrentText(batch_guess)
        self._fill_control_values(self.control_column.currentText())
        self._update_enabled()

    def _fill_control_values(self, column: str) -> None:
        ticked = set(self.selected_control_values())
        self.control_values.clear()
        values = self._labels.get(column, [])
        guesses = {"true", "dmso", "control", "ctrl", "wt", "untreated", "negative", "neg"}
        for value in values:
            item = QListWidgetItem(value)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            tick = value in ticked or (not ticked and value.lower() in guesses)
            item.setCheckState(Qt.CheckState.Checked if tick else Qt.CheckState.Unchecked)
            self.control_values.addItem(item)

    def selected_control_values(self) -> list[str]:
        return [
            self.control_values.item(i).text()
            for i in range(self.control_values.count())
            if self.control_values.item(i).checkState() == Qt.CheckState.Checked
        ]

    def set_controls(self, column: str, values: list[str]) -> None:
        """Choose the control column and tick exactly ``values`` (for scripts and tests)."""
        if column not in self._labels:
            raise ValueError(
                f"{column!r} is not a label column of the store (columns: {list(self._labels)})"
            )
        self.control_column.setCurrentText(column)
        wanted = {str(v) for v in values}
        missing = wanted - set(self._labels[column])
        if missing:
            raise ValueError(f"column {column!r} has no value(s) {sorted(missing)}")
        for i in range(self.control_values.count()):
            item = self.control_values.item(i)
            item.setCheckState(
                Qt.CheckState.Checked if item.text() in wanted else Qt.CheckState.Unchecked
            )

    def _setting_widgets(self) -> list[Widget]:
        return [*self.fields.values(), *(w for ws in self.method_fields.values() for w in ws.values())]

    def _update_enabled(self) -> None:
        fitting = self._fit_job is not None or self.compare_box.job is not None
        has_store = self.state.store is not None
        for widget in (self.control_column, self.control_values, self.method, self.load_button):
            widget.setEnabled(not fitting)
        for setting in self._setting_widgets():
            setting.enabled = not fitting
        self.batch_column.setEnabled(not fitting and self.fields["whiten"].value == "pca-batch")
        self.fit_button.setEnabled(has_store and not fitting)
        self.compare_box.compare_button.setEnabled(has_store and not fitting)
        self.cancel_button.setEnabled(fitting)
        self.save_button.setEnabled(not fitting and self.state.dictionary is not None)

    # ------------------------------------------------------------------ fitting
    @property
    def chosen_method(self) -> str:
        return METHOD_CHOICES[self.method.currentText()]

    def settings(self) -> PanelFit:
        """The fit the widgets describe (raises ValueError with a readable message)."""
        settings_class = METHODS[self.chosen_method].settings_class
        widgets = {**self.fields, **self.method_fields[self.chosen_method]}
        values = {name: read_setting(settings_class, name, widget) for name, widget in widgets.items()}
        settings = settings_class(**values)
        return PanelFit(
            settings=settings,
            control_column=self.control_column.currentText(),
            control_values=self.selected_control_values(),
            batch_column=self.batch_column.currentText() if settings.whiten == "pca-batch" else None,
        )

    def start_fit(self) -> Job | None:
        """Start fitting in a background job; returns it (None if nothing started)."""
        if self._fit_job is not None:
            return None
        store = self.state.store
        if store is None:
            show_info("Open or compute an embedding store first (Embeddings panel).")
            return None
        try:
            fit = self.settings()
        except ValueError as err:
            show_error(str(err))
            return None
        plate = self.state.plate
        self.progress.setRange(0, 0)  # busy until the first step: the whitening is being fitted
        self.progress.setFormat("fitting whitening on controls…")
        self.progress_label.setText(
            f"{METHODS[fit.method].title} on {len(store):,} tokens; controls: {fit.control_spec}"
        )
        self.loss_curve.clear(fit.settings.steps or 0)
        self._fit_job = start_job(
            lambda job: fit_steps(store, fit, plate=plate, cancel=job),
            yielded=self._on_training_event,
            returned=self._on_fitted,
            errored=self._on_fit_error,
            finished=self._on_fit_finished,
        )
        self._update_enabled()
        return self._fit_job

    def cancel(self) -> None:
        """Stop the fit after the current step (the dictionary so far is kept), or stop
        preparing the feature explorer."""
        if self._fit_job is not None:
            self._fit_job.cancel()
            self.progress_label.setText("cancelling after the current step…")
        elif self.compare_box.cancel():
            self.progress_label.setText("cancelling the comparison after the current step…")
        else:
            self.preparer.cancel()

    def _on_training_event(self, event: TrainingEvent | FitMessage) -> None:
        if isinstance(event, FitMessage):
            if event.category is None:  # information: the whitening chosen
                self.progress_label.setText(event.text)
            else:
                show_info(event.text)
            return
        if self.loss_curve.total_steps != event.total_steps:
            self.loss_curve.clear(event.total_steps)
        self.progress.setRange(0, event.total_steps)
        self.progress.setValue(event.step)
        self.progress.setFormat("step %v / %m")
        self.progress_label.setText(describe_event(event))
        self.loss_curve.add_point(event.step, event.loss)

    def _on_fitted(self, estimator: Any) -> None:
        training = estimator.training_
        if training.get("cancelled"):
            show_info(
                f"Fit cancelled at step {training['steps']} of {training['total_steps']}; the "
                f"dictionary so far is kept (checkpoint: {self.checkpoint_path()})."
            )
        self.state.set_dictionary(estimator)

    def checkpoint_path(self) -> Path | None:
        """Where a fit of the open store with the chosen method keeps its checkpoint."""
        store = self.state.store
        return None if store is None else default_checkpoint_path(store_path=store.path, method=self.chosen_method)

    def _on_fit_error(self, error: Exception) -> None:
        if isinstance(error, InterruptedError):  # cancelled before training began
            self.progress_label.setText(f"Fit cancelled: {error}")
            return
        self.progress_label.setText(f"Fit failed: {error}")
        show_error(f"Dictionary fit failed: {error}")

    def _on_fit_finished(self) -> None:
        self._fit_job = None
        if self.progress.maximum() == 0:  # ended before the first step
            self.progress.setRange(0, 1)
            self.progress.setFormat(" ")
        self._update_enabled()

    @property
    def is_busy(self) -> bool:
        """True while a fit, a comparison or an explorer preparation runs."""
        return self._fit_job is not None or self.compare_box.job is not None or self.preparer.is_busy

    # ------------------------------------------------------------------ comparing
    def _compare_request(self) -> tuple[PanelFit, Any, Any] | None:
        """What the comparison runs with: the panel's controls and shared settings (raises
        ValueError with a readable message)."""
        store = self.state.store
        if store is None:
            show_info("Open or compute an embedding store first (Embeddings panel).")
            return None
        return self.settings(), store, token_labels(store, self.state.plate)

    def _on_compare_progress(self, progress: Progress) -> None:
        self.progress.setRange(0, max(progress.total, 1))
        self.progress.setValue(progress.done)
        self.progress.setFormat("%v / %m")
        self.progress_label.setText(progress.what)

    def _keep_compared(self, estimator: Any) -> None:
        self.state.set_dictionary(estimator)
        show_info(f"Kept {estimator.title} ({estimator.whitening_.method} whitening) as the dictionary.")

    # ------------------------------------------------------------------ files
    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save dictionary", "dictionary.safetensors", DICTIONARY_FILTER
        )
        if path:
            self.save(path)

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open dictionary", "", DICTIONARY_FILTER)
        if path:
            self.load(path)

    def save(self, path: str | Path) -> Path | None:
        """Write the viewer's dictionary to ``path`` (``.safetensors`` added if missing)."""
        dictionary = self.state.dictionary
        if dictionary is None:
            show_info("There is no dictionary to save yet.")
            return None
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        try:
            written = dictionary.save(path)  # atomic: temporary sibling, then rename
        except (OSError, ValueError) as err:
            show_error(f"Could not save the dictionary to {path}: {err}")
            return None
        show_info(f"Dictionary saved to {written}")
        self.state.dictionary_saved(written)  # its feature names are kept beside it now
        return written

    def load(self, path: str | Path) -> Any:
        """Read a dictionary file and make it the viewer's dictionary."""
        device = self.fields["device"].value
        try:
            dictionary = ICFL.load(path, device=device)  # ICFL or TopKSAE, from the file
        except (OSError, ValueError, KeyError) as err:
            show_error(f"Could not open dictionary {path}: {err}")
            return None
        self.state.set_dictionary(dictionary, path)
        return dictionary

    # ------------------------------------------------------------------ the explorer
    def _show_dictionary(self, dictionary: Any) -> None:
        self.dictionary_label.setText(describe_dictionary(dictionary))
        self._update_enabled()

    def _on_dictionary_changed(self, dictionary: Any) -> None:
        self._show_dictionary(dictionary)

    def _on_store_changed(self, _store: Any) -> None:
        self._refresh_labels()

    def _on_plate_changed(self, _plate: Any) -> None:
        self._refresh_labels()

    def _on_explorer_progress(self, what: str, done: int, total: int) -> None:
        if self._fit_job is None:
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(done)
            self.progress.setFormat(f"{what} %v / %m")

    # ------------------------------------------------------------------ cleanup
    def _cancel_jobs(self) -> None:
        if self._fit_job is not None:
            self._fit_job.cancel()  # the explorer's job goes on: the Features panel may want it
        self.compare_box.cancel()
