"""The files of an embedding store: its commit record (``store.json``) and how it is checked,
obs parts, plate summaries, and the errors a damaged or unfinished store raises."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from plate_concepts._io import atomic_path, replaceable_output
from plate_concepts.embeddings.obs_index import INDEX_COLUMNS

STORE_FILE = "store.json"
FORMAT_NAME = "plate-concepts-embedding-store"
FORMAT_VERSION = 2
TOKEN_DTYPES = ("float16", "float32")
PATCH_DTYPE = "float16"
_MAX_CHUNK_BYTES = 8 * 2**20


class StoreDamagedError(ValueError):
    """Committed rows of a store are missing on disk (a deleted or never-copied file)."""


class StoreIncompleteError(ValueError):
    """An embedding run into the store was interrupted and not resumed to its end."""


def default_chunk_rows(row_bytes: int) -> int:
    """The largest power-of-two row count whose chunk fits in 8 MiB, so a chunk holds 4-8 MiB
    (one row per chunk when a single row is larger than that)."""
    rows = 1
    while rows * 2 * row_bytes <= _MAX_CHUNK_BYTES:
        rows *= 2
    return rows


# ---------------------------------------------------------------------- the commit record
def new_meta(
    dim: int,
    dtype: str,
    patch_grid: Sequence[int] | None,
    chunk_rows: int | None,
    chunk_rows_patch: int | None,
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """The record of a new, empty store (settings checked; chunks of 4-8 MiB by default)."""
    dim = positive_int(dim, "dim")
    dtype = np.dtype(dtype).name
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
    grid = None
    if patch_grid is not None:
        if len(patch_grid) != 2:
            raise ValueError(f"patch_grid must be (rows, columns), got {patch_grid!r}")
        grid = [positive_int(g, "patch_grid") for g in patch_grid]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(dim * np.dtype(dtype).itemsize)
    if grid is None:
        chunk_rows_patch = None
    elif chunk_rows_patch is None:
        chunk_rows_patch = default_chunk_rows(
            grid[0] * grid[1] * dim * np.dtype(PATCH_DTYPE).itemsize
        )
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        # Which store this is: one made again at the same path (--overwrite) is another.
        "uid": uuid.uuid4().hex,
        "n_tokens": 0,
        "dim": dim,
        "dtype": dtype,
        "patch_grid": grid,
        "patch_dtype": PATCH_DTYPE if grid is not None else None,
        "chunk_rows": positive_int(chunk_rows, "chunk_rows"),
        "chunk_rows_patch": None
        if grid is None
        else positive_int(chunk_rows_patch, "chunk_rows_patch"),
        "columns": list(INDEX_COLUMNS),
        "parts": [],
        "plates": {},
        "uns": json_roundtrip(provenance or {}, "provenance"),
    }


def read_meta(path: Path) -> dict[str, Any]:
    """``store.json``, checked: a clear error for a file that is not one, is corrupt, or is
    newer than this package reads."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is corrupt or truncated ({exc}); the embedding store cannot be opened"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not an embedding-store record (expected format {FORMAT_NAME!r})"
        )
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {meta.get('version')!r}; "
            f"this plate_concepts reads up to {FORMAT_VERSION} (update plate_concepts)"
        )
    required = [
        "n_tokens",
        "dim",
        "dtype",
        "patch_grid",
        "chunk_rows",
        "chunk_rows_patch",
        "parts",
        "uns",
    ]
    if meta["version"] >= 2:
        required += ["columns", "plates"]
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path} is corrupt: it lacks {missing}")
    if meta["dtype"] not in TOKEN_DTYPES:
        raise ValueError(
            f"{path} is corrupt: token dtype {meta['dtype']!r} is not one of {TOKEN_DTYPES}"
        )
    expected_start = 0
    for part in meta["parts"]:
        if part.get("start") != expected_start or part.get("stop", -1) < expected_start:
            raise ValueError(
                f"{path} is corrupt: obs part {part} does not continue at row {expected_start}"
            )
        if meta["version"] >= 2 and not part.get("plates"):
            raise ValueError(f"{path} is corrupt: obs part {part} names no plate")
        expected_start = part["stop"]
    if expected_start != meta["n_tokens"]:
        raise ValueError(
            f"{path} is corrupt: its obs parts cover {expected_start} rows "
            f"but n_tokens is {meta['n_tokens']}"
        )
    return meta


def plate_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``store.json`` keeps of a plate's summary: counts that need no file read."""
    controls = summary["controls"]
    return {
        "n_tokens": summary["n_tokens"],
        "n_wells": len(summary["wells"]),
        "n_controls": None if controls is None else int(sum(controls.values())),
        "n_control_wells": None if controls is None else len(controls),
    }


def new_summary_file(meta: dict[str, Any], plate_id: int | None) -> str:
    """A new, never used name for a plate's summary (``plate_id`` None: the whole store's
    label counts); a serial number kept in the record makes it new."""
    serial = meta.get("summary_serial", 0)
    meta["summary_serial"] = serial + 1
    owner = "labels" if plate_id is None else f"{plate_id:05d}"
    return f"plates/{owner}-{serial:06d}.json"


def next_part_number(meta: dict[str, Any]) -> int:
    # One past the highest listed number: never the name of a committed part.
    numbers = [int(Path(part["file"]).stem.rsplit("-", 1)[1]) for part in meta["parts"]]
    return max(numbers, default=-1) + 1


def write_json(path: Path, record: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, allow_nan=False))


# ---------------------------------------------------------------------- obs parts
def read_part(
    store_path: Path, part: dict[str, Any], columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """One obs part (only ``columns``; a column the part lacks, which other plates' parts
    have, reads as missing values)."""
    file = store_path / part["file"]
    rows = f"rows {part['start']}..{part['stop'] - 1}"
    try:
        with pq.ParquetFile(file) as parquet:
            names = parquet.schema_arrow.names
            present = None if columns is None else [c for c in columns if c in names]
            frame = parquet.read(columns=present, use_pandas_metadata=True).to_pandas()
    except FileNotFoundError:
        raise StoreDamagedError(
            f"embedding store {store_path} is damaged: obs part {file} ({rows}) listed in "
            f"{STORE_FILE} is missing"
        ) from None
    except pa.ArrowException as error:  # truncated, or not parquet at all
        raise StoreDamagedError(
            f"embedding store {store_path} is damaged: obs part {file} ({rows}) cannot be read "
            f"({error}). The store was probably copied or synced incompletely; copy it again "
            "from its source, or embed again"
        ) from error
    if len(frame) != part["stop"] - part["start"]:
        raise StoreDamagedError(
            f"obs part {file} has {len(frame)} rows but {STORE_FILE} records "
            f"{part['stop'] - part['start']} (rows {part['start']}..{part['stop'] - 1}); "
            "the store is corrupt"
        )
    if columns is not None:
        for column in columns:
            if column not in frame.columns:
                frame[column] = None
        frame = frame[list(columns)]
    return frame


def arrow_table(obs: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(obs.reset_index(drop=True), preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(
            f"a metadata column mixes numbers and text, which cannot be stored: {exc}"
        ) from exc


def empty_obs(columns: Sequence[str]) -> pd.DataFrame:
    integers = set(INDEX_COLUMNS) - {"plate", "well"}
    return pd.DataFrame(
        {c: pd.Series(dtype=np.int64 if c in integers else object) for c in columns}
    )


# ---------------------------------------------------------------------- checks
def check_replaceable(
    path: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()
) -> None:
    """Refuse an existing ``path`` unless ``overwrite``, and never replace anything but an
    embedding store (or an empty folder), nor a path that holds or lies in one of ``sources``
    (see :func:`plate_concepts._io.replaceable_output`)."""
    replaceable_output(path, "embedding-store", overwrite=overwrite, sources=sources)


def checked_patches(
    store: Any, patch_tokens: Any | None, obs: pd.DataFrame, start: int
) -> np.ndarray | None:
    """The patch tokens of an append as float16 (None for a store without them), checked
    against the store's grid and for NaN/inf."""
    grid, n = store.patch_grid, len(obs)
    if grid is None:
        if patch_tokens is not None:
            raise ValueError(
                f"embedding store {store.path} was created without patch_grid; it cannot take patch tokens"
            )
        return None
    if patch_tokens is None:
        raise ValueError(
            f"embedding store {store.path} holds patch tokens; pass patch_tokens of shape "
            f"(n, {grid[0]}, {grid[1]}, {store.dim})"
        )
    patches = np.asarray(patch_tokens)
    expected = (n, grid[0], grid[1], store.dim)
    if patches.shape != expected:
        raise ValueError(
            f"patch_tokens have shape {patches.shape}, expected {expected} ({store.path})"
        )
    return finite_as(patches, np.dtype(PATCH_DTYPE), obs, start, "patch_tokens")


def finite_as(
    values: np.ndarray, dtype: np.dtype, obs: pd.DataFrame, start: int, what: str
) -> np.ndarray:
    """``values`` cast to ``dtype``; an error naming the first row with NaN/inf (or a value too
    large for float16) and its plate/well/field."""
    if values.dtype.kind not in "fiub":
        raise TypeError(f"{what} must be numeric, got dtype {values.dtype}")
    with np.errstate(over="ignore"):  # overflow is reported below, with the row
        cast = values.astype(dtype, copy=False)
    finite = (
        np.isfinite(cast).reshape(len(cast), -1).all(axis=1)
        if cast.size
        else np.ones(len(cast), bool)
    )
    if not finite.all():
        row = int(np.argmin(finite))
        was_finite = bool(np.isfinite(values[row]).all()) if values.dtype.kind == "f" else True
        reason = (
            f"has a value beyond the {dtype.name} range" if was_finite else "contains NaN or inf"
        )
        where = obs.iloc[row]
        raise ValueError(
            f"{what} row {row} of this append (store row {start + row}; plate {where['plate']}, "
            f"well {where['well']}, field {where['field']}) {reason}"
        )
    return cast


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def json_roundtrip(record: dict[str, Any], what: str) -> dict[str, Any]:
    """``record`` as plain JSON types (numpy scalars/arrays and paths converted)."""
    if not isinstance(record, dict):
        raise TypeError(f"{what} must be a dict, got {type(record).__name__}")
    try:
        return json.loads(json.dumps(record, default=json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be JSON-serialisable (str/int/float/bool/list/dict, no NaN): {exc}"
        ) from exc


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``store.json`` atomically: the commit point of every change."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, allow_nan=False))


# ---------------------------------------------------------------------- chunk files
def chunk_file(array_path: Path, array: Any, chunk: int) -> Path:
    """The file of row-chunk ``chunk`` of a zarr v3 array stored at ``array_path``."""
    return array_path / array.metadata.encode_chunk_key((int(chunk),) + (0,) * (array.ndim - 1))


def missing_chunk_ids(array_path: Path, array: Any, ids: Any) -> list[int]:
    """The row chunks among ``ids`` whose file does not exist."""
    return [int(c) for c in ids if not chunk_file(array_path, array, c).is_file()]


@contextmanager
def naming_damaged_chunk(store_path: Path, name: str, array: Any, ids: Iterable[int]) -> Iterator[None]:
    """Reading row chunks ``ids`` of the store's array ``name`` inside this block: a chunk file
    that is there but cannot be decoded (truncated, corrupt) fails naming it, not as a bare
    decompression error."""
    try:
        yield
    except MemoryError:
        raise
    except Exception:
        chunk, n = int(array.chunks[0]), int(array.shape[0])
        for c in map(int, ids):  # find the culprit: only a failed read pays for this
            first, last = c * chunk, min((c + 1) * chunk, n) - 1
            try:
                array[first : last + 1]
            except Exception as error:  # codecs raise many kinds
                raise StoreDamagedError(
                    f"embedding store {store_path} is damaged: the chunk file "
                    f"{chunk_file(store_path / name, array, c)} holding {name} rows {first}..{last} "
                    f"cannot be read ({type(error).__name__}: {error}). The store was probably "
                    "copied or synced incompletely; copy it again from its source, or embed again"
                ) from error
        raise
