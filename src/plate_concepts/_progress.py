"""One adapter for every ``progress=`` argument of the library."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
