"""Keeping a viewer's feature explorer in step with its dictionary, store and plate.

Whenever the viewer's dictionary or store changes (a fit, a file opened in a panel or with
File > Open), :class:`ExplorerPreparer` makes the explorer in a background job (through
:func:`~plate_concepts.viewer._jobs.start_job`): from the state's activation pass when there is
one (``plate-concepts encode``: it only reads the plate's codes), else by encoding the store
(``FeatureExplorer.prepare``). On a screen whose plate the viewer does not show, it opens the
explorer's plate from the store's recorded sources. It sets the explorer in the state, so the
Features panel lists the features, then computes the perturbation profiles and confound flags
of the pass (:func:`~plate_concepts.viewer._screen_profiles.screen_profiles`, for the feature
table's z-score column and the Perturbations panel) and reads what makes selecting a feature
instant (``FeatureExplorer.preload``). :meth:`ExplorerPreparer.switch_plate` shows another plate
of the store the same way. There is one per viewer (:func:`explorer_preparer`), made by the
first panel that needs it; the panels show its status and progress (its Qt signals, emitted on
the GUI thread).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
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
    from plate_concepts.plates.model import Plate
    from plate_concepts.plates.mosaic import PlateMosaic

ENCODING = "encoding tokens"
PROFILING = "profiling label values"
PRELOADING = "reading fields and crops"


@dataclass
class OpenedPlate:
    """A plate of the store opened for the viewer (its layers made in the worker), or why its
    images could not be opened (``plate`` None)."""

    name: str
    plate: Plate | None = None
    mosaic: PlateMosaic | None = None
    layer_data: list[Any] | None = None
    problem: str = ""


def open_plate_view(store: Any, name: str) -> OpenedPlate:
    """Open plate ``name`` of ``store`` from its recorded source and make its layers (reads a
    few fields for the contrast limits: run it in a worker)."""
    from plate_concepts.embeddings.source_plates import open_plate_named, store_plate_sources
    from plate_concepts.plates.mosaic import PlateMosaic
    from plate_concepts.viewer.plate_layers import plate_layer_data

    plate = open_plate_named(store, name)
    if plate is None:
        source = store_plate_sources(store).get(name, {}).get("source")
        return OpenedPlate(name, problem=(
            f"the images of plate {name} were not found (recorded source: {source or 'none'}); "
            "its per-well values are in the chart"
        ))
    try:
        mosaic = PlateMosaic(plate)
        return OpenedPlate(name, plate, mosaic, plate_layer_data(plate, mosaic))
    except (OSError, ValueError) as err:
        return OpenedPlate(name, problem=f"the images of plate {name} could not be read ({err})")


@dataclass
class _Ready:
    """What a job hands over on the GUI thread: the prepared explorer and its opened plate."""

    explorer: FeatureExplorer
    opened: OpenedPlate | None


class ExplorerPreparer(QObject):
    """Prepares the explorer of one viewer's dictionary and store in the background."""

    #: A sentence for the panels: what is happening, or why nothing can be browsed.
    status_changed = Signal(str)
    #: (what, done, total): ``ENCODING`` tokens, ``PROFILING`` columns, ``PRELOADING`` items.
    progress = Signal(str, int, int)
    #: The name of the plate a :meth:`switch_plate` job is opening.
    switch_started = Signal(str)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = weakref.ref(viewer)  # the registry is keyed by the viewer: no cycle
        self.state = get_state(viewer)
        self.status = ""
        #: The plate a switch job is opening (None: none); the explorer is not queried meanwhile.
        self.switching: str | None = None
        #: Why the explorer's plate has no images in the viewer ("" when it has, or is unknown).
        self.plate_problem = ""
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
            # Someone else (a script, the demo, `view`) provided one: ours is not needed, but
            # its profiles are.
            self.cancel()
            self._own = explorer
            self._start(self._profiles_work(explorer), "Profiling label values…")

    # ------------------------------------------------------------------ preparing
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
        if batch_column is not None:
            try:  # as the user spelled it at fit time (Metadata_Batch finds batch)
                batch_column = store.resolve_column(batch_column, "batch column")
            except ValueError:
                self._set_status(
                    f"This dictionary was whitened per batch of {batch_column!r}, which the store's "
                    "tokens do not carry; features can only be browsed on a store that has that column."
                )
                return None
        activation_pass = self.state.activation_pass
        if activation_pass is not None and Path(activation_pass.spec.store).resolve() != Path(store.path).resolve():
            activation_pass = None  # a pass over another store: encode this one
        # On a screen the viewer's plate is the explorer's when it is one of the store's.
        shown = plate is not None and (plate.name in store.plates or len(store.plates) == 1)
        profiles = self._profiles_work

        def build(job: Job) -> Any:
            """Yields the explorer once prepared, then its profiles; returns the preload
            summary, or None when cancelled (an expected end, not an error)."""
            from plate_concepts._progress import Cancelled
            from plate_concepts.analysis.explorer import FeatureExplorer

            explorer = FeatureExplorer(
                store, dictionary, plate=plate if shown else None,
                batch_column=batch_column or (activation_pass.spec.batch_column if activation_pass else None),
                activation_pass=activation_pass,
            )  # fmt: skip
            try:
                explorer.prepare(progress=job.progress(ENCODING), cancel=job)
            except Cancelled:
                return None
            opened = None
            if not shown and not job.cancelled:
                opened = open_plate_view(store, explorer.plate_name)
                if opened.plate is not None:
                    explorer.set_plate(explorer.plate_name, opened.plate)
            yield _Ready(explorer, opened)  # browsable now
            yield from profiles(explorer)(job)
            return (yield from _preload(explorer, job))

        self._set_status(
            "Reading the activation pass…" if activation_pass is not None
            else "Encoding the store with the dictionary…"
        )
        return self._start(build)

    def _profiles_work(self, explorer: FeatureExplorer) -> Any:
        """A job's work: the profiles of ``explorer``'s pass, yielded (None on error: said in
        the status)."""
        from plate_concepts.viewer._screen_profiles import default_batch_column, screen_profiles

        def work(job: Job) -> Any:
            from plate_concepts._progress import Cancelled

            activation_pass = explorer.activation_pass
            batch = default_batch_column(activation_pass.label_columns, explorer.batch_column)
            try:
                result = screen_profiles(activation_pass, batch, progress=job.progress(PROFILING), cancel=job)
            except Cancelled:
                return None
            except (ValueError, KeyError) as err:
                result = err
            yield (explorer, result)
            return None

        return work

    def _start(self, work: Any, status: str | None = None) -> Job:
        if status is not None:
            self._set_status(status)
        job = self._job = start_job(
            work,
            progress=self._on_progress,
            yielded=lambda value: self._on_yielded(value, job),
            returned=lambda summary: self._on_preloaded(summary, job),
            errored=lambda error: self._on_error(error, job),
            finished=lambda: self._on_finished(job),
        )
        return job

    # ------------------------------------------------------------------ another plate
    def switch_plate(self, name: str) -> Job | None:
        """Show plate ``name`` of the store: open its images from the store's recorded source
        and read its codes (``FeatureExplorer.set_plate``) in a job, then show its layers
        instead of the previous plate's (``state.explorer_plate_changed``) and read ahead for
        it. Returns the job; None when there is no explorer or it already shows that plate."""
        explorer = self.state.explorer
        if explorer is None or not explorer.is_prepared or (name == explorer.plate_name and self.switching is None):
            return None
        if name not in explorer.store.plates:
            raise ValueError(f"plate {name!r} has no tokens in {explorer.store.path}")
        previous = self._job
        self.cancel()  # a preload of the old plate stops at its next block
        self.switching = name
        self.switch_started.emit(name)
        old_name, old_plate = explorer.plate_name, explorer.plate

        def work(job: Job) -> Any:
            if previous is not None:
                previous.wait()  # nothing else reads the explorer's plate meanwhile
            opened = open_plate_view(explorer.store, name)
            try:
                explorer.set_plate(name, opened.plate)
            except Exception:
                explorer.set_plate(old_name, old_plate)
                raise
            yield _Ready(explorer, opened)
            return (yield from _preload(explorer, job))

        return self._start(work, f"Opening plate {name}: its images and codes…")

    # ------------------------------------------------------------------ on the GUI thread
    def _on_progress(self, update: Progress) -> None:
        self.progress.emit(update.what, update.done, update.total)

    def _on_yielded(self, value: Any, job: Job) -> None:
        if isinstance(value, _Ready):
            self._on_ready(value, job)
            return
        explorer, result = value
        if explorer is not self.state.explorer:
            return
        if isinstance(result, Exception):
            self._set_status(f"No perturbation profiles: {result}")
            return
        self.state.set_profiles(result)

    def _on_ready(self, ready: _Ready, job: Job) -> None:
        explorer, opened = ready.explorer, ready.opened
        switched = explorer is self.state.explorer
        if job is not self._job or (job.cancelled and not switched):
            return  # replaced (a newer plate, dictionary or store) or cancelled meanwhile
        if opened is not None and opened.plate is not None:
            from plate_concepts.viewer.app import remove_plate_layers, show_plate

            viewer = self._viewer()
            if viewer is not None:
                remove_plate_layers(viewer)
                show_plate(viewer, opened.plate, mosaic=opened.mosaic, layer_data=opened.layer_data)
        self.plate_problem = opened.problem if opened is not None else ""
        problem = f" ({opened.problem})" if self.plate_problem else ""
        if switched:
            self.switching = None
            self.state.explorer_plate_changed.emit(explorer.plate_name)
            self._set_status(f"Plate {explorer.plate_name} shown{problem}. Reading ahead for it…")
            return
        self._own = explorer
        self.state.set_explorer(explorer)
        self._set_status(
            f"Features ready{problem}: browse them in the Features panel. Profiling label values "
            "and reading the fields' patch tokens, labels and top crops so that selecting a "
            "feature is instant…"
        )

    def _on_preloaded(self, summary: PreloadSummary | None, job: Job) -> None:
        if summary is not None:
            if self._job is job or self.state.explorer is self._own:
                self._set_status(
                    f"Features ready: browse them in the Features panel ({summary.describe()})."
                )
        elif self._job is job:  # cancelled, or no preload (profiles only), not replaced
            handed_over = self._own is not None and self.state.explorer is self._own
            if not handed_over:
                self._set_status("Feature preparation cancelled.")
            elif job.cancelled:
                self._set_status(
                    "Reading ahead cancelled: the features can be browsed, each selection reads "
                    "what it shows from disk."
                )
            elif self.status.startswith("Profiling"):
                self._set_status("Features ready: browse them in the Features panel.")

    def _on_error(self, error: Exception, job: Job) -> None:
        if self._job is not job:
            return  # a replaced job: the newer one's status stands
        if self.switching is not None:
            name, self.switching = self.switching, None
            self._set_status(f"Could not open plate {name}: {error}")
            show_error(f"Opening plate {name} failed: {error}")
            self.state.explorer_plate_changed.emit(self.state.explorer.plate_name if self.state.explorer else "")
            return
        self._set_status(f"Could not prepare the features: {error}")
        show_error(f"Preparing the features failed: {error}")

    def _on_finished(self, job: Job) -> None:
        if self._job is job:
            self._job = None
            if self.switching is not None:  # cancelled before the plate was handed over
                self.switching = None
                if self.state.explorer is not None:
                    self.state.explorer_plate_changed.emit(self.state.explorer.plate_name)


def _preload(explorer: FeatureExplorer, job: Job) -> Any:
    """Read ahead for the explorer's plate (a generator, for ``yield from`` in a job's work);
    the summary, or None when cancelled."""
    from plate_concepts._progress import Cancelled

    if job.cancelled:
        return None
    try:
        return explorer.preload(
            n_top_crops=N_CROPS,
            thumbnail_size=THUMBNAIL_SIZE,
            progress=job.progress(PRELOADING),
            cancel=job,
        )
    except Cancelled:
        return None
    yield  # a generator: a job's work may ``yield from`` it


_PREPARERS: weakref.WeakKeyDictionary[Any, ExplorerPreparer] = weakref.WeakKeyDictionary()


def explorer_preparer(viewer: napari.viewer.Viewer) -> ExplorerPreparer:
    """The viewer's explorer preparer, made on first use (it prepares at once when the viewer
    already has a dictionary but no explorer)."""
    if viewer not in _PREPARERS:
        _PREPARERS[viewer] = ExplorerPreparer(viewer)
    return _PREPARERS[viewer]
