"""Crash-safe writing: build the output beside its destination, then rename it into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(destination: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or folder into; rename it onto
    ``destination`` only if the block finishes without an exception.

    A crash or error leaves ``destination`` as it was (absent, or its old content) and removes
    the partial output. The rename is atomic for files on POSIX; a folder that already exists is
    moved aside first and deleted after the new one is in place.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; choose another path or remove it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path for {destination}")
        if tmp.is_dir() and destination.exists():
            old = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(destination, old)
            os.replace(tmp, destination)
            _remove(old)
        else:
            os.replace(tmp, destination)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
