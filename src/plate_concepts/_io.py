"""Crash-safe writing: build the output beside its destination, then rename it into place.

Two rules protect what is on disk:

- :func:`replaceable_output` decides whether an existing path may be replaced by an output of a
  given kind: only an output of that same kind (an OME-Zarr plate, an embedding store, a demo
  folder or a dictionary file this package wrote; an empty folder), only when asked
  (``overwrite``), and never a path that is, holds or lies inside the output's source.
- :func:`atomic_path` writes into a hidden sibling (``.NAME.partial-<host>-<pid>-<random>``) and
  renames it onto the destination only when the writing finished. Leftovers of runs that were
  killed (their process is gone) are cleaned up by the next write to the same destination.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _is_ome_zarr_plate(path: Path) -> bool:
    from plate_concepts.plates.omezarr import is_ome_zarr_plate

    return is_ome_zarr_plate(path)


def _is_embedding_store(path: Path) -> bool:
    from plate_concepts.embeddings.store import EmbeddingStore

    return EmbeddingStore.is_store(path)


def _is_demo_folder(path: Path) -> bool:
    from plate_concepts.demo import is_demo_folder

    return is_demo_folder(path)


def _is_dictionary_file(path: Path) -> bool:
    from plate_concepts.dictionary.io import read_dictionary_metadata

    try:
        read_dictionary_metadata(path)
    except (OSError, ValueError):
        return False
    return True


def _is_report(path: Path) -> bool:
    from plate_concepts.analysis.report import is_report

    return is_report(path)


def _is_concept_report(path: Path) -> bool:
    from plate_concepts.demo_pipeline import is_concept_report

    return is_concept_report(path)


def _is_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


OUTPUT_KINDS: dict[str, tuple[str, bool, Callable[[Path], bool]]] = {
    "ome-zarr-plate": ("an OME-Zarr plate", True, _is_ome_zarr_plate),
    "embedding-store": ("an embedding store", True, _is_embedding_store),
    "demo-folder": ("a demo plate folder", True, _is_demo_folder),
    "dictionary": ("a dictionary file", False, _is_dictionary_file),
    "report": ("an HTML report", False, _is_report),
    "figure": ("a PNG image", False, _is_png),
    "concept-report": ("a concept report of this demo", False, _is_concept_report),
}
"""Output kind -> (what it is called, whether it is a folder, how to recognise one)."""

_EXAMPLE_FILE_NAMES = {"dictionary": "dictionary.safetensors", "report": "report.html", "figure": "figure.png",
                       "concept-report": "concept_report.json"}


def output_kind(path: str | os.PathLike, kinds: Iterable[str] = tuple(OUTPUT_KINDS)) -> str | None:
    """Which of ``kinds`` (keys of :data:`OUTPUT_KINDS`, all by default) of this package's
    outputs ``path`` is, or None."""
    path = Path(path)
    for kind in kinds:
        _, is_folder, recognise = OUTPUT_KINDS[kind]
        if (path.is_dir() if is_folder else path.is_file()) and recognise(path):
            return kind
    return None


def replaceable_output(
    path: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool,
    sources: Iterable[str | os.PathLike] = (),
) -> Path:
    """Check that writing an output of ``kind`` (a key of :data:`OUTPUT_KINDS`) at ``path``
    loses nothing the user did not ask to replace; return the path.

    A path that does not exist is always fine. An existing one is replaced only when
    ``overwrite`` is true, it is an output of the same kind (or an empty folder), and it is not,
    does not hold and does not lie inside any of ``sources`` (what the output is made from).

    Raises
    ------
    FileExistsError
        With a sentence saying what is there and what to do; nothing is touched.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {sorted(OUTPUT_KINDS)}")
    what, is_folder, recognise = OUTPUT_KINDS[kind]
    path = Path(path)
    if not path.exists():
        check_writable_folder(path)
        return path
    if is_folder and not path.is_dir():
        raise FileExistsError(
            f"{path} is a file; the output ({what}) is a folder: choose another output path"
        )
    if not is_folder and path.is_dir():
        raise FileExistsError(
            f"{path} is a folder; the output ({what}) is a file: give a file path such as "
            f"{path / _EXAMPLE_FILE_NAMES[kind]}"
        )
    for source in sources:
        relation = _overlap(path, Path(source))
        if relation:
            raise FileExistsError(
                f"refusing to replace {path}: it {relation} the source {source}, which would be "
                "lost; choose another output path"
            )
    empty_folder = path.is_dir() and not any(path.iterdir())
    if not empty_folder and not recognise(path):
        raise FileExistsError(
            f"{path} already exists and is not {what}; refusing to replace it (only {what} "
            "written by plate-concepts is ever replaced): choose another output path"
        )
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists ({what}); choose another output path, or replace it with "
            "--overwrite (overwrite=True from Python)"
        )
    return path


def check_writable_folder(path: str | os.PathLike) -> None:
    """Fail before the work, not after, when ``path`` cannot be written: the nearest folder that
    exists above it is a file, or is not writable."""
    path = Path(path)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: no permission to write in {folder}")


def _overlap(output: Path, source: Path) -> str:
    """How an output path relates to a source path: 'is', 'holds', 'lies inside' or ''."""
    output, source = output.resolve(), source.resolve()
    if output == source:
        return "is"
    if output in source.parents:
        return "holds"
    if source in output.parents:
        return "lies inside"
    return ""


@contextmanager
def atomic_path(
    destination: str | os.PathLike,
    overwrite: bool = True,
    kind: str | None = None,
    sources: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or folder into; rename it onto
    ``destination`` only if the block finishes without an exception.

    With ``kind`` (see :data:`OUTPUT_KINDS`), an existing destination is checked by
    :func:`replaceable_output` first (with ``overwrite`` and ``sources``); without it, an
    existing destination is replaced when ``overwrite`` is true (the package's own files: store
    parts, reports).

    A crash or error leaves ``destination`` as it was (absent, or its old content) and removes
    the partial output. The rename is atomic for files on POSIX; a folder that already exists is
    moved aside first and deleted after the new one is in place. A process killed outright
    leaves its hidden sibling behind: the next write to the same destination removes it (or
    puts a folder that was moved aside back, if the new one never arrived).
    """
    destination = Path(destination)
    if kind is not None:
        replaceable_output(destination, kind, overwrite=overwrite, sources=sources)
    elif destination.exists() and not overwrite:
        raise FileExistsError(
            f"{destination} already exists; choose another path, or replace it with --overwrite "
            "(overwrite=True from Python)"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(destination)
    tmp = _sibling(destination, "partial")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path for {destination}")
        if tmp.is_dir() and destination.exists():
            old = _sibling(destination, "old")
            os.replace(destination, old)
            os.replace(tmp, destination)
            _remove(old)
        else:
            os.replace(tmp, destination)
    except BaseException:
        _remove(tmp)
        raise


def _host_id() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _sibling(destination: Path, role: str) -> Path:
    """``.NAME.<role>-<host>-<pid>-<random>``: whose it is, so leftovers can be told apart."""
    owner = f"{_host_id()}-{os.getpid()}"
    return destination.with_name(f".{destination.name}.{role}-{owner}-{uuid.uuid4().hex[:8]}")


def _leftover_pattern(destination: Path) -> re.Pattern[str]:
    # Earlier versions named them without host and pid: recognised, but only reported.
    return re.compile(
        rf"\.{re.escape(destination.name)}\.(?P<role>partial|old)-"
        r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{8}"
    )


def clean_leftovers(destination: str | os.PathLike) -> list[Path]:
    """Deal with the hidden siblings of ``destination`` that killed runs of :func:`atomic_path`
    left (exactly its naming pattern; nothing else is touched) and return them.

    A leftover whose process still runs is being written: it is left alone. One of a process
    that is gone is removed, except a folder moved aside (``.old-``) while the destination is
    missing: that is the previous output, and it is put back. A leftover whose owner cannot be
    told (another machine, an earlier version of this package) is reported, not touched.
    Each action is reported as a warning naming the path.
    """
    destination = Path(destination)
    pattern = _leftover_pattern(destination)
    try:
        siblings = list(destination.parent.iterdir())
    except OSError:
        return []
    found = []
    for path in sorted(siblings):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        found.append(path)
        owner_alive = _owner_alive(match["host"], match["pid"])
        if owner_alive:
            continue
        if owner_alive is None:
            warnings.warn(
                f"{path} was left by an interrupted or running write of {destination} (another "
                "machine or an earlier version); delete it once nothing writes there",
                UserWarning,
                stacklevel=3,
            )
            continue
        try:
            if match["role"] == "old" and not destination.exists():
                os.replace(path, destination)
                message = f"put back {destination} from {path.name}, left by an interrupted run"
            else:
                _remove(path)
                message = f"removed {path}, left by an interrupted run"
        except OSError as error:  # another process cleaning up at the same time
            message = f"could not clean up {path}, left by an interrupted run: {error}"
        warnings.warn(message, UserWarning, stacklevel=3)
    return found


def _owner_alive(host: str | None, pid: str | None) -> bool | None:
    """Whether the process that made a leftover still runs; None when that cannot be told."""
    if host is None or pid is None or host != _host_id() or sys.platform == "win32":
        return None
    if int(pid) == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return not _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    """Whether a process was killed but not yet reaped (Linux; in a container whose first
    process reaps nothing, a killed run stays so): it writes nothing more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])  # after "pid (command)"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()

