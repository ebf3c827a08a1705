"""One adapter for every ``progress=`` argument of the library, and the one way every long
computation is cancelled (``cancel=``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

CancelLike = threading.Event | Callable[[], bool]
"""A ``threading.Event`` (or anything with ``is_set``) or a callable returning whether to stop."""


class Cancelled(InterruptedError):
    """A long computation stopped because its ``cancel`` was set (what it finished is kept where
    it says so). An :class:`InterruptedError`, so one ``except InterruptedError`` catches every
    cancellation of the library."""


def cancel_requested(cancel: CancelLike | None) -> bool:
    """True when ``cancel`` (a ``threading.Event`` or a callable returning bool) is set."""
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    if is_set is not None:
        return bool(is_set())
    if callable(cancel):
        return bool(cancel())
    raise TypeError(
        f"cancel must be a threading.Event or a callable returning bool, got {type(cancel).__name__}"
    )


ProgressLike = Callable[[int, int], Any] | Any
"""None/False (silent), True (a tqdm bar), a tqdm-like object (has ``update``), or a callable
``progress(done, total)``."""


@contextmanager
def progress_ticker(
    progress: ProgressLike | None, total: int, description: str = "", unit: str = "it"
) -> Iterator[Callable[[int], None]]:
    """Yield ``tick(done)``, to call with the cumulative count of finished items."""
    if progress is None or progress is False:
        yield lambda done: None
        return
    if callable(progress) and not hasattr(progress, "update"):
        yield lambda done: progress(done, total)
        return
    owned = None
    if progress is True:
        from tqdm.auto import tqdm

        owned = progress = tqdm(total=total, desc=description, unit=unit)
    if not hasattr(progress, "update"):
        raise TypeError(
            "progress must be None, True, a tqdm-like object or a callable(done, total), "
            f"got {type(progress).__name__}"
        )
    if getattr(progress, "total", 0) is None:
        progress.total = total
    last = 0

    def tick(done: int) -> None:
        nonlocal last
        progress.update(done - last)
        last = done

    try:
        yield tick
    finally:
        if owned is not None:
            owned.close()
