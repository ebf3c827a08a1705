"""Keeping a viewer's feature explorer in step with its dictionary and store.

Whenever the viewer's dictionary or store changes (a fit, a file opened in a panel or with
File > Open), :class:`ExplorerPreparer` encodes the store with the dictionary in a background
job (``FeatureExplorer.prepare``, through :func:`~plate_concepts.viewer._jobs.start_job`), sets
the explorer in the state, so the Features panel lists the features, and then, in the same job,
reads what makes selecting a feature instant (``FeatureExplorer.preload``). There is one per
viewer (:func:`explorer_preparer`), made by the first panel that needs it; the Dictionary and
Features panels show its status and progress (its Qt signals, emitted on the GUI thread).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from plate_concepts.dictionary.estimators import recorded_batch_column
from plate_concepts.viewer._feature_layers import N_CROPS, THUMBNAIL_SIZE
from plate_concepts.viewer._jobs import Job, Progress, start_job
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari

    from plate_concepts.analysis.explorer import FeatureExplorer, PreloadSummary

ENCODING = "encoding tokens"
PRELOADING = "reading fields and crops"


class ExplorerPreparer(QObject):
    """Prepares the explorer of one viewer's dictionary and store in the background."""

    #: A sentence for the panels: what is happening, or why nothing can be browsed.
    status_changed = Signal(str)
    #: (what, done, total): ``ENCODING`` tokens, then ``PRELOADING`` fields and crops.
    progress = Signal(str, int, int)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.state = get_state(viewer)
        self.status = ""
        self._job: Job | None = None
        self._own: FeatureExplorer | None = None  # the explorer this job made, when it made one
        self.state.dictionary_changed.connect(self._on_dictionary_changed)
        self.state.store_changed.connect(self._on_store_changed)
        self.state.explorer_changed.connect(self._on_explorer_changed)
        if self.state.dictionary is not None and self.state.explorer is None:
            self.prepare()

    @property
    def is_busy(self) -> bool:
        return self._job is not None

    def cancel(self) -> None:
        """Stop the job at its next block; an explorer already handed over stays."""
        if self._job is not None:
            self._job.cancel()

    def _set_status(self, text: str) -> None:
        self.status = text
        self.status_changed.emit(text)

    def _on_dictionary_changed(self, _dictionary: Any) -> None:
        self.prepare()

    def _on_store_changed(self, _store: Any) -> None:
        if self.state.dictionary is not None:
            self.prepare()

    def _on_explorer_changed(self, explorer: Any) -> None:
        if explorer is not None and explorer is not self._own:
            self.cancel()  # someone else (a script, the demo) provided one: ours is not needed

    def prepare(self) -> Job | None:
        """Start the job for the state's dictionary and store (replacing a running one);
        returns it, or None when there is nothing to prepare (the status says why)."""
        self.cancel()
        dictionary, store, plate = self.state.dictionary, self.state.store, self.state.plate
        if dictionary is None:
            return None
        if store is None:
            self._set_status("Open an embedding store to browse this dictionary's features.")
            return None
        if getattr(dictionary, "n_features_in_", store.dim) != store.dim:
            self._set_status(
                f"This dictionary was fitted on {dictionary.n_features_in_}-dimensional tokens; the "
                f"store has {store.dim}. Open the store it was fitted on."
            )
            return None
        batch_column = recorded_batch_column(dictionary)
        if batch_column is not None and batch_column not in store.obs.columns:
            self._set_status(
                f"This dictionary was whitened per batch of {batch_column!r}, which the store's tokens "
                "do not carry; features can only be browsed on a store that has that column."
            )
            return None

        def build(job: Job) -> Any:
            """Yields the explorer once prepared; returns the preload summary, or None when
            cancelled (an expected end, not an error)."""
            from plate_concepts.analysis.activations import Cancelled
            from plate_concepts.analysis.explorer import FeatureExplorer

            explorer = FeatureExplorer(store, dictionary, plate=plate, batch_column=batch_column)
            try:
                explorer.prepare(progress=job.progress(ENCODING), cancel=job)
            except Cancelled:
                return None
            yield explorer  # browsable now; the reads below make selection instant
            try:
                return explorer.preload(
                    n_top_crops=N_CROPS,
                    thumbnail_size=THUMBNAIL_SIZE,
                    progress=job.progress(PRELOADING),
                    cancel=job,
                )
            except Cancelled:
                return None

        self._set_status("Encoding the store with the dictionary…")
        job = self._job = start_job(
            build,
            progress=self._on_progress,
            yielded=lambda explorer: self._on_ready(explorer, dictionary, store, job),
            returned=lambda summary: self._on_preloaded(summary, dictionary, store, job),
            errored=lambda error: self._on_error(error, job),
            finished=lambda: self._on_finished(job),
        )
        return job

    def _on_progress(self, update: Progress) -> None:
        self.progress.emit(update.what, update.done, update.total)

    def _current(self, dictionary: Any, store: Any) -> bool:
        return dictionary is self.state.dictionary and store is self.state.store

    def _on_ready(self, explorer: FeatureExplorer, dictionary: Any, store: Any, job: Job) -> None:
        if job.cancelled or not self._current(dictionary, store):
            return  # replaced or cancelled while it was being prepared
        self._own = explorer
        self.state.set_explorer(explorer)
        self._set_status(
            "Features ready: browse them in the Features panel. Reading the fields' patch tokens, "
            "labels and top crops so that selecting a feature is instant…"
        )

    def _on_preloaded(
        self, summary: PreloadSummary | None, dictionary: Any, store: Any, job: Job
    ) -> None:
        if summary is not None:
            if self._current(dictionary, store):
                self._set_status(
                    f"Features ready: browse them in the Features panel ({summary.describe()})."
                )
        elif self._job is job:  # cancelled, not replaced by a newer job
            handed_over = self._own is not None and self.state.explorer is self._own
            self._set_status(
                "Reading ahead cancelled: the features can be browsed, each selection reads what "
                "it shows from disk."
                if handed_over
                else "Feature preparation cancelled."
            )

    def _on_error(self, error: Exception, job: Job) -> None:
        if self._job is not job:
            return  # a replaced job: the newer one's status stands
        self._set_status(f"Could not prepare the features: {error}")
        show_error(f"Preparing the features failed: {error}")

    def _on_finished(self, job: Job) -> None:
        if self._job is job:
            self._job = None


_PREPARERS: weakref.WeakKeyDictionary[Any, ExplorerPreparer] = weakref.WeakKeyDictionary()


def explorer_preparer(viewer: napari.viewer.Viewer) -> ExplorerPreparer:
    """The viewer's explorer preparer, made on first use (it prepares at once when the viewer
    already has a dictionary but no explorer)."""
    if viewer not in _PREPARERS:
        _PREPARERS[viewer] = ExplorerPreparer(viewer)
    return _PREPARERS[viewer]
