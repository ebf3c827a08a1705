"""The Dictionary panel's "Compare" box: the publication's grid (ICFL and TopK, whitened and not,
at matched sparsity) on the open store, in a background job, as a table; a row can be kept as the
viewer's dictionary. The grid is :func:`plate_concepts.analysis.compare.compare`, as on the
command line (``plate-concepts compare``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from plate_concepts.analysis.compare import (
    DEFAULT_SPARSITY,
    CompareProgress,
    Comparison,
    compare,
    grid,
    sparsity_split,
)
from plate_concepts.dictionary.estimators import METHODS
from plate_concepts.viewer._jobs import Job, Progress, start_job

#: Label columns offered first for selectivity, when the store has them.
_LIKELY_LABELS = ("perturbation", "treatment", "compound", "cell_type", "genotype", "cell_line")


class CompareBox(QGroupBox):
    """Runs the comparison with the panel's controls and shared settings (``fit_request()``
    returns (:class:`~plate_concepts.viewer._dictionary_fit.PanelFit`, store, label table), or
    None), shows the table, and hands the kept run's estimator to ``keep``. ``report`` gets the
    job's progress, ``changed`` is called when a comparison starts or ends."""

    def __init__(self, fit_request: Callable[[], Any], keep: Callable[[Any], None],
                 report: Callable[[Progress], None], changed: Callable[[], None],
                 parent: QWidget | None = None) -> None:
        super().__init__("Compare methods (matched sparsity)", parent)
        self._fit_request, self._keep, self._report, self._changed = fit_request, keep, report, changed
        self.job: Job | None = None
        self.comparison: Comparison | None = None
        form = QFormLayout(self)
        self.labels = QListWidget()
        self.labels.setToolTip("The label columns whose values the features are scored against (selectivity)")
        self.labels.setMaximumHeight(80)
        form.addRow("labels", self.labels)
        self.sparsity = QSpinBox()
        self.sparsity.setRange(1, 4096)
        self.sparsity.setValue(DEFAULT_SPARSITY)
        self.sparsity.setToolTip("Features per token S: ICFL J x L = TopK k = S")
        self.sparsity.valueChanged.connect(self._show_split)
        form.addRow("sparsity S", self.sparsity)
        choices = QHBoxLayout()
        self.methods = {name: QCheckBox(cls.title) for name, cls in METHODS.items()}
        self.whitens = {"pca": QCheckBox("whitened"), "none": QCheckBox("not whitened")}
        for box in (*self.methods.values(), *self.whitens.values()):
            box.setChecked(True)
            choices.addWidget(box)
        form.addRow("runs", choices)
        buttons = QHBoxLayout()
        self.compare_button = QPushButton("Compare")
        self.compare_button.setToolTip(
            "Fit and evaluate every chosen method with every chosen whitening (same features, steps "
            "and seed as above) in the background; Cancel stops it and keeps the finished runs"
        )
        self.compare_button.clicked.connect(self.start)
        self.keep_button = QPushButton("Keep selected run")
        self.keep_button.setToolTip("Make the selected run's dictionary the viewer's dictionary")
        self.keep_button.clicked.connect(self.keep_selected)
        buttons.addWidget(self.compare_button)
        buttons.addWidget(self.keep_button)
        form.addRow(buttons)
        self.table = QTableWidget(0, 0)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._update_enabled)
        form.addRow(self.table)
        self._show_split()
        self._update_enabled()

    # ------------------------------------------------------------------ choices
    def set_label_columns(self, columns: list[str]) -> None:
        """Offer ``columns`` (store columns); keep the ticks of those offered before."""
        ticked = set(self.chosen_labels())
        self.labels.clear()
        likely = [c for c in _LIKELY_LABELS if c in columns]
        for column in columns:
            item = QListWidgetItem(column)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            tick = column in ticked or (not ticked and column in likely)
            item.setCheckState(Qt.CheckState.Checked if tick else Qt.CheckState.Unchecked)
            self.labels.addItem(item)
        self._update_enabled()

    def chosen_labels(self) -> list[str]:
        return [self.labels.item(i).text() for i in range(self.labels.count())
                if self.labels.item(i).checkState() == Qt.CheckState.Checked]

    def set_labels(self, columns: list[str]) -> None:
        """Tick exactly ``columns`` (for scripts and tests)."""
        for i in range(self.labels.count()):
            item = self.labels.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in columns else Qt.CheckState.Unchecked)

    def _show_split(self) -> None:
        rounds, per_round = sparsity_split(self.sparsity.value())
        self.sparsity.setSuffix(f"   (ICFL J = {rounds}, L = {per_round}; TopK k = {self.sparsity.value()})")

    # ------------------------------------------------------------------ running
    def start(self) -> Job | None:
        """Start the comparison in a background job; returns it (None if nothing started)."""
        if self.job is not None:
            return None
        labels = self.chosen_labels()
        methods = [name for name, box in self.methods.items() if box.isChecked()]
        whitens = [name for name, box in self.whitens.items() if box.isChecked()]
        if not labels or not methods or not whitens:
            show_info("Tick at least one label, one method and one whitening to compare.")
            return None
        try:
            request = self._fit_request()
        except ValueError as err:
            show_error(str(err))
            return None
        if request is None:
            return None
        fit, store, label_table = request
        settings = fit.settings
        runs = grid(methods, whitens, settings.shrinkage)
        sparsity = self.sparsity.value()

        def work(job: Job) -> Comparison:
            def report(event: CompareProgress) -> None:
                what = f"run {event.run}/{event.n_runs} ({event.spec.name}): {event.stage}"
                job.progress(what)(event.done, event.total)

            return compare(
                store, labels, runs, control=fit.control_spec, batch_column=fit.batch_column,
                label_table=label_table, n_features=settings.n_features, sparsity=sparsity,
                steps=settings.steps, batch_size=settings.batch_size, seed=settings.seed,
                device=settings.device, progress=report, cancel=job,
            )

        self.job = start_job(work, progress=self._report, returned=self._on_compared,
                             errored=self._on_error, finished=self._on_finished)
        self._update_enabled()
        self._changed()
        return self.job

    def cancel(self) -> bool:
        """Stop the comparison after the current step (True if one was running)."""
        if self.job is None:
            return False
        self.job.cancel()
        return True

    def _on_compared(self, comparison: Comparison) -> None:
        self.comparison = comparison
        self._fill_table(comparison)
        if comparison.cancelled:
            show_info(f"Comparison cancelled: {len(comparison.runs)} run(s) finished and are shown.")

    def _on_error(self, error: Exception) -> None:
        show_error(f"Comparison failed: {error}")

    def _on_finished(self) -> None:
        self.job = None
        self._update_enabled()
        self._changed()

    def _fill_table(self, comparison: Comparison) -> None:
        table = comparison.table()
        self.table.clear()
        self.table.setRowCount(len(table))
        self.table.setColumnCount(len(table.columns))
        self.table.setHorizontalHeaderLabels([str(c) for c in table.columns])
        for r, row in enumerate(table.itertuples(index=False)):
            for c, value in enumerate(row):
                text = f"{value:.3f}" if isinstance(value, float) else str(value)
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()
        self._update_enabled()

    # ------------------------------------------------------------------ keeping a run
    def selected_run(self) -> Any:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if self.comparison is None or not rows:
            return None
        return self.comparison.runs[rows[0].row()]

    def keep_selected(self) -> Any:
        """Make the selected run's dictionary the viewer's; returns the estimator (or None)."""
        run = self.selected_run()
        if run is None:
            show_info("Select a row of the comparison first.")
            return None
        self._keep(run.estimator)
        return run.estimator

    def _update_enabled(self) -> None:
        running = self.job is not None
        for widget in (self.labels, self.sparsity, self.compare_button,
                       *self.methods.values(), *self.whitens.values()):
            widget.setEnabled(not running)
        self.keep_button.setEnabled(not running and self.selected_run() is not None)
