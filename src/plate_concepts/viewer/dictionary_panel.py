"""The Dictionary panel: fit a sparse dictionary (ICFL or TopK) on the open embedding store in
the background, watch it learn, cancel it, save it, or load one from a file.

A fitted or loaded dictionary becomes the viewer's dictionary (``state.set_dictionary``); the
viewer's :class:`~plate_concepts.viewer._explorer_jobs.ExplorerPreparer` then encodes the store
with it in the background and hands the explorer to the Features panel; this panel shows its
progress and can cancel it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from plate_concepts.dictionary.estimators import ICFL
from plate_concepts.viewer._dictionary_fit import (
    METHOD_CHOICES,
    WHITENING_CHOICES,
    FitSettings,
    available_devices,
    default_checkpoint_path,
    describe_dictionary,
    describe_event,
    fit_steps,
    label_choices,
    token_labels,
)
from plate_concepts.viewer._explorer_jobs import explorer_preparer
from plate_concepts.viewer._plots import LossCurve
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari

    from plate_concepts.dictionary.trainer import TrainingEvent

DICTIONARY_FILTER = "Dictionary files (*.safetensors)"


def _spin(low: int, high: int, value: int, step: int = 1, tip: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setSingleStep(step)
    box.setToolTip(tip)
    return box


class DictionaryPanel(QWidget):
    """Fit, cancel, save and load the viewer's dictionary."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = get_state(viewer)
        self._labels: dict[str, list[str]] = {}
        self._fit_worker: Any = None
        self._fit_cancel: threading.Event | None = None
        self.preparer = explorer_preparer(viewer)
        self._build()
        self._refresh_labels()
        self._show_dictionary(self.state.dictionary)

        connections = [
            (self.state.store_changed, self._on_store_changed),
            (self.state.plate_changed, self._on_plate_changed),
            (self.state.dictionary_changed, self._on_dictionary_changed),
        ]
        for signal, slot in connections:
            signal.connect(slot)
        self.destroyed.connect(lambda *_: self._teardown(connections))
        # Qt signals: disconnected by Qt when this panel goes.
        self.preparer.status_changed.connect(self.explorer_label.setText)
        self.preparer.progress.connect(self._on_explorer_progress)
        self.explorer_label.setText(self.preparer.status or " ")

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)

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

        whitening = QGroupBox("Whitening")
        form = QFormLayout(whitening)
        self.whitening = QComboBox()
        self.whitening.addItems(list(WHITENING_CHOICES))
        self.whitening.setToolTip(
            "PCA whitening fitted on the controls down-weights what varies among unperturbed cells "
            "(cell cycle, density); 'per batch' also centres and scales each batch on its own controls"
        )
        self.batch_column = QComboBox()
        self.batch_column.setToolTip("The column naming each token's experiment batch")
        self.whitening.currentTextChanged.connect(self._update_enabled)
        form.addRow("method", self.whitening)
        form.addRow("batch column", self.batch_column)
        layout.addWidget(whitening)

        method = QGroupBox("Dictionary")
        form = QFormLayout(method)
        self.method = QComboBox()
        self.method.addItems(list(METHOD_CHOICES))
        self.method.setToolTip(
            "ICFL: iterative codebook feature learning (no encoder); TopK: a sparse autoencoder"
        )
        self.n_features = _spin(
            2, 262_144, 512, 64, "M, the number of features (dictionary columns)"
        )
        self.n_rounds = _spin(1, 1000, 20, 1, "J, pursuit rounds per token")
        self.per_round = _spin(
            1, 1000, 5, 1, "L, features picked per round (at most J x L per token)"
        )
        self.k = _spin(1, 10_000, 32, 1, "k, active features per token")
        icfl = QWidget()
        icfl_form = QHBoxLayout(icfl)
        icfl_form.setContentsMargins(0, 0, 0, 0)
        icfl_form.addWidget(QLabel("J"))
        icfl_form.addWidget(self.n_rounds)
        icfl_form.addWidget(QLabel("L"))
        icfl_form.addWidget(self.per_round)
        topk = QWidget()
        topk_form = QHBoxLayout(topk)
        topk_form.setContentsMargins(0, 0, 0, 0)
        topk_form.addWidget(QLabel("k"))
        topk_form.addWidget(self.k)
        self.sparsity = QStackedWidget()
        self.sparsity.addWidget(icfl)
        self.sparsity.addWidget(topk)
        self.sparsity.setMaximumHeight(icfl.sizeHint().height())
        self.method.currentIndexChanged.connect(self.sparsity.setCurrentIndex)
        self.steps = _spin(1, 10_000_000, 2000, 100, "Optimiser steps")
        self.batch_size = _spin(1, 1_000_000, 4096, 256, "Tokens per step")
        self.learning_rate = QLineEdit()
        self.learning_rate.setPlaceholderText("default")
        self.learning_rate.setToolTip("Adam learning rate; leave blank for the method's default")
        self.seed = _spin(0, 2**31 - 1, 0, 1, "Seeds the initialisation and the data order")
        self.device = QComboBox()
        self.device.addItems(available_devices())
        self.device.setToolTip("auto: CUDA, then Apple MPS, then CPU")
        form.addRow("method", self.method)
        form.addRow("features (M)", self.n_features)
        form.addRow("sparsity", self.sparsity)
        form.addRow("steps", self.steps)
        form.addRow("batch size", self.batch_size)
        form.addRow("learning rate", self.learning_rate)
        form.addRow("seed", self.seed)
        form.addRow("device", self.device)
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

    # ------------------------------------------------------------------ labels from the store
    def _refresh_labels(self) -> None:
        store = self.state.store
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

    def _update_enabled(self) -> None:
        fitting = self._fit_worker is not None
        has_store = self.state.store is not None
        for widget in (
            self.control_column,
            self.control_values,
            self.whitening,
            self.method,
            self.n_features,
            self.sparsity,
            self.steps,
            self.batch_size,
            self.learning_rate,
            self.seed,
            self.device,
            self.load_button,
        ):
            widget.setEnabled(not fitting)
        self.batch_column.setEnabled(
            not fitting and WHITENING_CHOICES[self.whitening.currentText()] == "pca-batch"
        )
        self.fit_button.setEnabled(has_store and not fitting)
        self.cancel_button.setEnabled(fitting)
        self.save_button.setEnabled(not fitting and self.state.dictionary is not None)

    # ------------------------------------------------------------------ fitting
    def settings(self) -> FitSettings:
        """The fit the widgets describe (raises ValueError with a readable message)."""
        text = self.learning_rate.text().strip()
        try:
            lr = float(text) if text else None
        except ValueError:
            raise ValueError(
                f"learning rate {text!r} is not a number (leave it blank for the default)"
            ) from None
        if lr is not None and not lr > 0:
            raise ValueError(f"learning rate must be positive, got {text}")
        whiten = WHITENING_CHOICES[self.whitening.currentText()]
        store = self.state.store
        return FitSettings(
            control_column=self.control_column.currentText(),
            control_values=self.selected_control_values(),
            whiten=whiten,
            batch_column=self.batch_column.currentText() if whiten == "pca-batch" else None,
            method=METHOD_CHOICES[self.method.currentText()],
            n_features=self.n_features.value(),
            n_rounds=self.n_rounds.value(),
            per_round=self.per_round.value(),
            k=self.k.value(),
            steps=self.steps.value(),
            batch_size=self.batch_size.value(),
            lr=lr,
            seed=self.seed.value(),
            device=self.device.currentText(),
            log_every=max(1, min(50, self.steps.value() // 100)),
            checkpoint_path=None
            if store is None
            else default_checkpoint_path(store, METHOD_CHOICES[self.method.currentText()]),
        )

    def start_fit(self) -> Any:
        """Start fitting in a thread worker; returns the worker (None if nothing started)."""
        if self._fit_worker is not None:
            return None
        store = self.state.store
        if store is None:
            show_info("Open or compute an embedding store first (Embeddings panel).")
            return None
        try:
            settings = self.settings()
        except ValueError as err:
            show_error(str(err))
            return None
        self._fit_cancel = threading.Event()
        worker = create_worker(
            fit_steps,
            store,
            settings,
            plate=self.state.plate,
            cancel=self._fit_cancel,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(self._on_training_event)
        worker.returned.connect(self._on_fitted)
        worker.errored.connect(self._on_fit_error)
        worker.finished.connect(self._on_fit_finished)
        self._fit_worker = worker
        self.progress.setRange(0, settings.steps)
        self.progress.setValue(0)
        self.progress.setFormat("fitting whitening on controls…")
        self.progress_label.setText(
            f"{settings.method.upper()} with {settings.n_features} features on {len(store):,} tokens; "
            f"controls: {settings.control_spec}"
        )
        self.loss_curve.clear(settings.steps)
        self._update_enabled()
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the fit after the current step (the dictionary so far is kept), or stop
        preparing the feature explorer."""
        if self._fit_cancel is not None:
            self._fit_cancel.set()
            self.progress_label.setText("cancelling after the current step…")
        else:
            self.preparer.cancel()

    def _on_training_event(self, event: TrainingEvent) -> None:
        self.progress.setMaximum(event.total_steps)
        self.progress.setValue(event.step)
        self.progress.setFormat("step %v / %m")
        self.progress_label.setText(describe_event(event))
        self.loss_curve.add_point(event.step, event.loss)

    def _on_fitted(self, estimator: Any) -> None:
        training = estimator.training_
        if training.get("cancelled"):
            show_info(
                f"Fit cancelled at step {training['steps']}; the dictionary so far is kept "
                f"(checkpoint: {self.settings_checkpoint()})."
            )
        self.state.set_dictionary(estimator)

    def settings_checkpoint(self) -> str:
        store = self.state.store
        return (
            ""
            if store is None
            else str(default_checkpoint_path(store, METHOD_CHOICES[self.method.currentText()]))
        )

    def _on_fit_error(self, error: Exception) -> None:
        self.progress_label.setText(f"Fit failed: {error}")
        show_error(f"Dictionary fit failed: {error}")

    def _on_fit_finished(self) -> None:
        self._fit_worker, self._fit_cancel = None, None
        self._update_enabled()

    @property
    def is_busy(self) -> bool:
        """True while a fit or an explorer preparation runs."""
        return self._fit_worker is not None or self.preparer.is_busy

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
        return written

    def load(self, path: str | Path) -> Any:
        """Read a dictionary file and make it the viewer's dictionary."""
        device = self.device.currentText()
        try:
            dictionary = ICFL.load(path, device=device)  # ICFL or TopKSAE, from the file
        except (OSError, ValueError, KeyError) as err:
            show_error(f"Could not open dictionary {path}: {err}")
            return None
        self.state.set_dictionary(dictionary)
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
        if self._fit_worker is None:
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(done)
            self.progress.setFormat(f"{what} %v / %m")

    # ------------------------------------------------------------------ cleanup
    def _teardown(self, connections: list[tuple[Any, Any]]) -> None:
        if self._fit_cancel is not None:
            self._fit_cancel.set()  # the explorer's job goes on: the Features panel may want it
        for signal, slot in connections:
            signal.disconnect(slot)
