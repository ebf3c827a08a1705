"""The Features panel's "Export report": the HTML report of the viewer's dictionary over its
store (the same file as ``plate-concepts report``, :func:`~plate_concepts.analysis.report.
write_report`), written in a background job with progress and Cancel."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from plate_concepts.viewer._jobs import Job, Progress, start_job

if TYPE_CHECKING:
    from plate_concepts.viewer.state import PlateConceptsState

REPORT_FILTER = "HTML report (*.html)"
EXPORT_TIP = (
    "Write one self-contained HTML file (figures embedded) to share: the dictionary, "
    "perturbation profiles, best features with their crops and per-well maps, confound "
    "flags and named features (the file `plate-concepts report` writes)"
)


class ReportExport(QWidget):
    """An "Export report…" button, the job's progress and a Cancel button."""

    def __init__(self, state: PlateConceptsState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.job: Job | None = None
        self.written: Path | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.button = QPushButton("Export report…")
        self.button.setToolTip(EXPORT_TIP)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setVisible(False)
        row.addWidget(self.button)
        row.addWidget(self.progress, stretch=1)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setOpenExternalLinks(True)
        layout.addWidget(self.message)
        self.button.clicked.connect(lambda: self.export())
        self.cancel_button.clicked.connect(self.cancel)

    @property
    def is_busy(self) -> bool:
        return self.job is not None

    def _problem(self) -> str | None:
        explorer = self.state.explorer
        if explorer is None or not explorer.is_prepared:
            return "the features are not ready yet"
        if self.state.dictionary_path is None:
            return "save the dictionary first (Dictionary panel): the report reads its file and names"
        return None

    def export(self, path: str | Path | None = None, *, overwrite: bool = False) -> Job | None:
        """Write the report to ``path`` in a job (None: ask with a file dialog, which also asks
        before replacing a file; ``overwrite``: replace an earlier report at ``path``).
        Returns the job, or None when nothing was started (the message says why)."""
        problem = self._problem()
        if problem is not None:
            self.message.setText(f"Cannot export a report: {problem}.")
            return None
        if self.job is not None:
            return None
        if path is None:
            default = self.state.dictionary_path.with_suffix(".report.html")  # type: ignore[union-attr]
            chosen, _ = QFileDialog.getSaveFileName(self, "Export report", str(default), REPORT_FILTER)
            if not chosen:
                return None
            path, overwrite = chosen, True  # the dialog asked before replacing a file
        out = Path(path)
        if out.suffix.lower() not in (".html", ".htm"):
            out = out.with_name(out.name + ".html")
        explorer, dictionary = self.state.explorer, self.state.dictionary_path
        profiles = self.state.profiles
        batch = profiles.batch if profiles is not None else None
        plate = explorer.plate  # type: ignore[union-attr]
        plate_path = getattr(plate, "source", None) or None

        def work(job: Job) -> Path:
            from plate_concepts.analysis.report import write_report

            return write_report(
                out, explorer.activation_pass, dictionary, batch=batch, store=explorer.store,  # type: ignore[union-attr]
                plate=plate_path, overwrite=overwrite, progress=job.progress("report sections"), cancel=job,
            )  # fmt: skip

        self._set_running(True)
        self.message.setText(f"Writing {out.name}…")
        self.job = start_job(
            work,
            progress=self._on_progress,
            returned=self._on_written,
            errored=self._on_error,
            finished=lambda: self._set_running(False),
        )
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.message.setText("Cancelling the report (nothing is written)…")

    def _set_running(self, running: bool) -> None:
        if not running:
            self.job = None
        self.button.setEnabled(not running)
        self.progress.setVisible(running)
        self.cancel_button.setVisible(running)
        if running:
            self.progress.setRange(0, 0)

    def _on_progress(self, update: Progress) -> None:
        self.progress.setRange(0, max(update.total, 1))
        self.progress.setValue(min(update.done, update.total))
        self.progress.setFormat(f"{update.done} / {update.total} sections")

    def _on_written(self, path: Path) -> None:
        from plate_concepts.analysis.report import size_text

        self.written = path
        self.message.setText(
            f'Wrote <a href="{path.resolve().as_uri()}">{html.escape(path.name)}</a> '
            f"({size_text(path)}): one file that opens in any browser."
        )

    def _on_error(self, error: Exception) -> None:
        from plate_concepts._progress import Cancelled

        if isinstance(error, Cancelled):
            self.message.setText("Report cancelled: nothing was written.")
            return
        self.message.setText(f"Could not write the report: {html.escape(str(error))}")
        show_error(f"Could not write the report: {error}")

    def changed(self, *_: Any) -> None:
        """The dictionary or explorer changed: say what an export needs."""
        problem = self._problem()
        self.button.setEnabled(self.job is None and problem is None)
        self.button.setToolTip(EXPORT_TIP if problem is None else f"Cannot export yet: {problem}")
        if problem is None and self.message.text().startswith("Cannot export"):
            self.message.clear()
