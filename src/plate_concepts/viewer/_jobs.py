"""Background work in the viewer, one way for every panel: :func:`start_job`.

A job runs ``work(job)`` in a napari generator thread worker (the project's convention; napari
also lists it in its activity dock, whose cancel button stops it like the panel's own). The
work reports progress through ``job.progress(what)`` callbacks (what the library's long calls
take) or by yielding, and stops when asked: ``job`` itself is the ``cancel=`` argument of the
library's long calls. Progress, yielded values, the result, errors and the end come back on
the GUI thread through the callbacks given to :func:`start_job`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` ``what`` (e.g. 120 of 768 "crops")."""

    what: str
    done: int
    total: int


class Job:
    """One piece of background work: ask it to stop, feed its progress, see whether it runs."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._finished = threading.Event()
        self.worker: _JobWorker | None = None

    def is_set(self) -> bool:
        """Whether the work was asked to stop (the ``cancel=`` protocol of the library)."""
        return self._stop.is_set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return not self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (from another worker: never on the GUI thread, which
        delivers the end); whether it had."""
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        """Ask the work to stop at its next check; how it ends (a partial result, or
        :class:`~plate_concepts._progress.Cancelled`) is the work's choice."""
        self._stop.set()

    def progress(self, what: str = "") -> ProgressCallback:
        """A ``progress(done, total)`` callback for a library call, reported as ``what``."""

        def report(done: int, total: int) -> None:
            if self.worker is not None:
                # From the worker's thread, as the worker itself emits what is yielded.
                self.worker.yielded.emit(Progress(what, int(done), int(total)))

        return report


@dataclass(frozen=True)
class _Failed:
    """What the work raised, returned through the worker."""

    error: Exception


class _JobWorker(GeneratorWorker):
    """A generator worker whose ``quit`` (napari's cancel button) asks the job to stop, so
    that the work ends as it would after the panel's own Cancel (its result still arrives)."""

    job: Job

    def quit(self) -> None:
        self.job.cancel()


def start_job(
    work: Callable[[Job], Any],
    *,
    progress: Callable[[Progress], None] | None = None,
    yielded: Callable[[Any], None] | None = None,
    returned: Callable[[Any], None] | None = None,
    errored: Callable[[Exception], None] | None = None,
    finished: Callable[[], None] | None = None,
) -> Job:
    """Run ``work(job)`` in a thread worker and return the job.

    ``work`` may be a plain function (its return value goes to ``returned``) or a generator
    (what it yields goes to ``yielded``, :class:`Progress` to ``progress``, its return value to
    ``returned``). Errors go to ``errored`` (default: a napari error notification), never
    re-raised; ``finished`` is called last in every case.
    """
    job = Job()
    on_error = errored or (lambda error: show_error(str(error)))

    def body() -> Generator[Any, None, Any]:
        try:
            outcome = work(job)
            if isinstance(outcome, Generator):
                outcome = yield from outcome
        except Exception as error:  # noqa: BLE001 - handed to ``errored`` on the GUI thread
            # Not raised: a generator worker takes a RuntimeError (torch's errors, Cancelled)
            # for a deleted worker, and ends without a signal.
            return _Failed(error)
        return outcome

    def deliver(outcome: Any) -> None:
        if isinstance(outcome, _Failed):
            on_error(outcome.error)
        elif returned is not None:
            returned(outcome)

    def dispatch(value: Any) -> None:
        if isinstance(value, Progress):
            if progress is not None:
                progress(value)
        elif yielded is not None:
            yielded(value)

    def end() -> None:
        job._finished.set()
        if finished is not None:
            finished()

    worker = create_worker(body, _start_thread=False, _worker_class=_JobWorker, _ignore_errors=True)
    worker.job, job.worker = job, worker
    worker.yielded.connect(dispatch)
    worker.returned.connect(deliver)
    worker.errored.connect(on_error)
    worker.finished.connect(end)
    worker.start()
    return job
