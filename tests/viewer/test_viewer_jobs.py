"""Background jobs in the viewer (start_job): progress, yielded values, results, errors and
cancelling, all delivered on the GUI thread."""

from __future__ import annotations

import threading

import pytest

from plate_concepts._progress import Cancelled, cancel_requested
from plate_concepts.viewer._jobs import Progress, start_job

pytestmark = pytest.mark.gui


def _run(qtbot, work, **callbacks):
    """Start ``work`` and wait for its end; returns what each callback received."""
    seen: dict[str, list] = {name: [] for name in ("progress", "yielded", "returned", "errored")}
    gui = threading.get_ident()

    def record(name):
        def callback(value):
            assert threading.get_ident() == gui  # delivered on the GUI thread
            seen[name].append(value)

        return callback

    job = start_job(work, **{name: record(name) for name in seen}, **callbacks)
    qtbot.waitUntil(lambda: not job.running, timeout=10_000)
    return job, seen


def test_a_function_reports_progress_and_returns(qtbot):
    def count(job):
        report = job.progress("crops")
        for done in range(1, 4):
            report(done, 3)
        return "store"

    job, seen = _run(qtbot, count)
    assert seen["progress"] == [Progress("crops", d, 3) for d in (1, 2, 3)]
    assert seen["returned"] == ["store"] and seen["errored"] == [] and not job.cancelled


def test_a_generator_yields_then_returns(qtbot):
    def two_stages(job):
        job.progress("tokens")(5, 5)
        yield "explorer"
        return "summary"

    _job, seen = _run(qtbot, two_stages)
    assert seen["progress"] == [Progress("tokens", 5, 5)]
    assert seen["yielded"] == ["explorer"] and seen["returned"] == ["summary"]


def test_errors_come_back_and_the_end_is_always_reported(qtbot):
    ended = []

    def failing(job):
        raise ValueError("bad crop size")

    _job, seen = _run(qtbot, failing, finished=lambda: ended.append(True))
    assert [str(e) for e in seen["errored"]] == ["bad crop size"] and seen["returned"] == []
    assert ended == [True]


@pytest.mark.parametrize("how", ["job.cancel", "worker.quit"])  # the panel's / napari's button
def test_cancel_is_the_work_s_cancel_argument(qtbot, how):
    started = threading.Event()

    def endless(job):
        started.set()
        while not cancel_requested(job):  # as the library's long calls check cancel=
            job.progress("steps")(1, 0)
        raise Cancelled("stopped")

    job = start_job(endless, errored=lambda error: caught.append(error))
    caught: list[Exception] = []
    assert started.wait(10) and job.running and not job.cancelled
    job.cancel() if how == "job.cancel" else job.worker.quit()
    qtbot.waitUntil(lambda: not job.running, timeout=10_000)
    assert job.cancelled and isinstance(caught[0], Cancelled)


def test_a_runtime_error_is_reported_not_lost(qtbot):
    """torch raises RuntimeError; a generator worker alone would end without any signal."""

    def torch_like(job):
        raise RuntimeError("CUDA out of memory")

    job, seen = _run(qtbot, torch_like)
    assert [str(e) for e in seen["errored"]] == ["CUDA out of memory"] and not job.running
