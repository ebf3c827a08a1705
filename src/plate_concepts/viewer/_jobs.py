"""Turn a library call that reports progress through a callback into a generator of progress
updates, so a napari generator worker can yield them and be quit (Qt-free)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")
Progress = Callable[[int, int], None]


def run_with_progress(
    task: Callable[[Progress], T],
    cancel: threading.Event | None = None,
    poll_s: float = 0.1,
) -> Generator[tuple[int, int] | None, None, T]:
    """Run ``task(progress)`` in a thread; yield each ``(done, total)`` it reports, and ``None``
    every ``poll_s`` seconds while it works (so a worker's ``quit()`` is noticed); return its
    result or re-raise its exception.

    Closing the generator early (a quit worker) sets ``cancel`` and waits for the task to stop,
    so a library call that honours its ``cancel=`` argument finishes its write before the
    worker ends.
    """
    updates: queue.Queue[tuple[int, int]] = queue.Queue()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = task(lambda done, total: updates.put((int(done), int(total))))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="plate-concepts-job", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not updates.empty():
            try:
                yield updates.get(timeout=poll_s)
            except queue.Empty:
                yield None
    finally:
        if thread.is_alive():
            if cancel is not None:
                cancel.set()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
