"""The on-disk embedding store: tokens streamed from disk, never all in memory, read per plate.

A store is a folder::

    store.json                commit record (written last, atomically): format, n_tokens, dim,
                              dtype, patch grid, chunk sizes, obs columns, the committed obs
                              parts (each with its plates), per-plate entries, provenance
    zarr.json                 a zarr v3 group holding
    tokens/                   N x d float16/float32, chunked by rows, grown on append
    patch_tokens/             optional N x gh x gw x d float16 patch-token grids
    obs/part-00000.parquet    per-token index and metadata; an append writes one part per run
                              of rows of one plate, so a plate's rows are read from its parts only
    plates/00000-00003.json   per-plate summary (tokens per well, controls per well, label value
                              counts), rewritten when the plate gains rows; ``store.json`` names
                              the current one

Every token row has an index (``plate``, ``well`` in canonical 'B07' spelling, ``field``,
``crop_y``, ``crop_x``, ``crop_size``), optionally ``is_control`` and any label columns.

Opening reads ``store.json`` only (its size grows with the number of parts and plates, not of
tokens); :meth:`EmbeddingStore.describe` reads the per-plate summaries; obs rows are read per
plate, per row range or per column (:meth:`EmbeddingStore.read_obs`, :meth:`iter_obs`).
``EmbeddingStore.obs`` still loads (and caches) the whole table, for small stores.

Crash safety: an append writes array rows beyond the committed count, then its parquet parts
and plate summaries (temporary file + rename), and only then rewrites ``store.json``.
``store.json`` is the single source of truth: rows beyond its ``n_tokens`` and files it does not
list are ignored, and the next write removes them. Zarr's local store replaces chunk files
atomically, so rewriting the last, partly filled chunk never corrupts committed rows. Every chunk
holding committed rows exists (they are written even when all zero), so a missing chunk file is
damage (an interrupted copy): reads fail naming the file and rows instead of returning zeros.
One writer at a time: a handle whose store was changed by another writer refuses to write.
Readers opened before an append do not see its rows (open the store again).

Format version 2 added the per-plate parts and summaries; version 1 stores open and read as
before (their per-plate index is computed on first use) and are upgraded by their next write.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from plate_concepts._io import atomic_path
from plate_concepts.embeddings import store_batches, store_obs, store_rewrite, store_summary
from plate_concepts.embeddings.obs_index import (
    INDEX_COLUMNS,
    KEY_COLUMNS,
    MAX_STORE_VALUES,
    canonical_wells,
    integer_column,
    merge_labels,
    normalise_obs,
    plate_runs,
    summarise,
)
from plate_concepts.embeddings.store_files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PATCH_DTYPE,
    STORE_FILE,
    StoreDamagedError,
    StoreIncompleteError,
    arrow_table,
    check_replaceable,
    checked_patches,
    chunk_file,
    default_chunk_rows,
    empty_obs,
    finite_as,
    json_default,
    json_roundtrip,
    missing_chunk_ids,
    naming_damaged_chunk,
    new_meta,
    new_summary_file,
    next_part_number,
    read_meta,
    read_part,
    write_json,
)
from plate_concepts.embeddings.store_files import write_meta as _write_meta
from plate_concepts.embeddings.store_files import write_parquet as _write_parquet
from plate_concepts.plates.platemap import resolve_column

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_COLUMNS",
    "KEY_COLUMNS",
    "STORE_FILE",
    "EmbeddingStore",
    "StoreDamagedError",
    "StoreIncompleteError",
    "canonical_wells",
    "check_replaceable",
    "default_chunk_rows",
    "integer_column",
    "normalise_obs",
]

#: An append whose rows switch plate more often than this is stored as one mixed part (a
#: plate's rows are then found by reading the part's plate column).
_MAX_RUNS_PER_APPEND = 64
_WRITE_EMPTY = {"write_empty_chunks": True}
# Names other modules imported before the split into store_files.
_check_replaceable, _json_default = check_replaceable, json_default

RowSelection = slice | range | np.ndarray | list[int] | int


class EmbeddingStore:
    """Tokens (N x d), optional patch-token grids and their per-token index on disk.

    Make one with :meth:`create`, open one with :meth:`open`. Opening reads only ``store.json``;
    obs rows are read on demand (:meth:`read_obs`, :meth:`iter_obs`, or the cached whole table
    :attr:`obs`), tokens too (:meth:`read`, :meth:`iter_batches`, :meth:`tokens_dask`).
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        # Private: use EmbeddingStore.create / EmbeddingStore.open.
        self._path = path
        self._meta = meta
        self._arrays: dict[str, zarr.Array] = {}
        self._obs_cache: pd.DataFrame | None = None
        self._verified: dict[str, np.ndarray] = {}  # per array: chunks known to exist
        self._plate_rows: dict[str, np.ndarray] = {}
        self._legacy: dict[str, Any] | None = None  # version 1: the index computed from obs

    # ------------------------------------------------------------------ making and opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dim: int,
        dtype: str = "float32",
        patch_grid: tuple[int, int] | None = None,
        chunk_rows: int | None = None,
        provenance: dict[str, Any] | None = None,
        overwrite: bool = False,
        chunk_rows_patch: int | None = None,
    ) -> EmbeddingStore:
        """Create an empty store of ``dim``-dimensional tokens at ``path``.

        ``chunk_rows`` defaults to 4-8 MiB chunks; ``patch_grid`` (gh, gw) adds a patch-token
        array (float16). ``overwrite`` replaces an existing store, but never a folder that is
        not a store.
        """
        path = Path(path)
        meta = new_meta(dim, dtype, patch_grid, chunk_rows, chunk_rows_patch, provenance)
        check_replaceable(path, overwrite)
        dim, dtype, grid = meta["dim"], meta["dtype"], meta["patch_grid"]
        chunk_rows, chunk_rows_patch = meta["chunk_rows"], meta["chunk_rows_patch"]
        # Build the whole folder beside the destination and rename it in: no half-made store.
        with atomic_path(path, overwrite=True) as tmp:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            group.create_array(
                "tokens", shape=(0, dim), chunks=(chunk_rows, dim), dtype=dtype, fill_value=0
            )
            if grid is not None:
                group.create_array(
                    "patch_tokens",
                    shape=(0, grid[0], grid[1], dim),
                    chunks=(chunk_rows_patch, grid[0], grid[1], dim),
                    dtype=PATCH_DTYPE,
                    fill_value=0,
                )
            (tmp / "obs").mkdir()
            (tmp / "plates").mkdir()
            _write_meta(tmp / STORE_FILE, meta)
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingStore:
        """Open an existing store (reads only its ``store.json``)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"embedding store {path} does not exist")
        meta_path = path / STORE_FILE
        if not meta_path.is_file():
            raise ValueError(f"{path} is not an embedding store: it has no {STORE_FILE}")
        return cls(path, read_meta(meta_path))

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        """True when ``path`` is a folder with a ``store.json`` (cheap check for readers)."""
        return (Path(path) / STORE_FILE).is_file()

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    def __len__(self) -> int:
        return int(self._meta["n_tokens"])

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._meta["dtype"])

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        grid = self._meta["patch_grid"]
        return None if grid is None else (int(grid[0]), int(grid[1]))

    @property
    def chunk_rows(self) -> int:
        return int(self._meta["chunk_rows"])

    @property
    def chunk_rows_patch(self) -> int | None:
        return self._meta["chunk_rows_patch"]

    @property
    def format_version(self) -> int:
        return int(self._meta["version"])

    @property
    def provenance(self) -> dict[str, Any]:
        """A copy of the provenance record (model, crop size, channels, ...)."""
        return copy.deepcopy(self._meta["uns"])

    def update_provenance(self, **entries: Any) -> None:
        """Merge ``entries`` into the provenance and rewrite ``store.json`` atomically."""
        update = json_roundtrip(entries, "provenance")
        self._check_unchanged_on_disk()
        meta = copy.deepcopy(self._meta)
        meta["uns"].update(update)
        _write_meta(self._path / STORE_FILE, meta)
        self._meta = meta

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self._path)!r}, n_tokens={len(self)}, dim={self.dim}, "
            f"dtype={self.dtype.name}, patch_grid={self.patch_grid}, "
            f"plates={len(self._meta.get('plates', {})) if self.format_version >= 2 else '?'})"
        )

    # ------------------------------------------------------------------ completeness
    def incomplete_plates(self) -> list[str]:
        """Plates whose embedding run was interrupted, or was asked for but not started."""
        return store_summary.incomplete_plates(self._meta["uns"])

    @property
    def is_complete(self) -> bool:
        """False while an embedding run into the store is unfinished (see :meth:`check_complete`)."""
        return not self.incomplete_plates()

    def check_complete(self, allow_incomplete: bool = False) -> None:
        """Refuse (``StoreIncompleteError``) a store whose embedding run was interrupted, or only
        warn when ``allow_incomplete``: its tokens miss part of the plates it was asked for.
        Every consumer of a whole store (fit, evaluate, encode) calls this first."""
        store_summary.check_complete(self, allow_incomplete)

    # ------------------------------------------------------------------ plates
    @property
    def plates(self) -> list[str]:
        """The plates with tokens in the store, in the order they were first appended."""
        return list(self._plate_entries())

    def rows_identity(self) -> dict[str, Any]:
        """What says which tokens the rows are: the store's creation id (None for stores
        written before it was recorded) and the files holding the rows (a plate embedded again
        goes to new files), with every plate's token count in row order."""
        return {
            "uid": self._meta.get("uid"),
            "parts": [[part["file"], part["start"], part["stop"]] for part in self._meta.get("parts", [])],
            "plates": list(self.tokens_per_plate().items()),
        }

    def tokens_per_plate(self) -> dict[str, int]:
        return {name: int(e["n_tokens"]) for name, e in self._plate_entries().items()}

    def plate_rows(self, plate: str) -> np.ndarray:
        """The store rows (sorted int64) of one plate; reads no obs file unless the plate shares
        a mixed part with other plates."""
        if plate not in self._plate_entries():
            raise KeyError(f"plate {plate!r} has no tokens in {self._path} (plates: {self.plates})")
        if plate not in self._plate_rows:
            self._plate_rows[plate] = store_obs.plate_rows(self, plate)
        return self._plate_rows[plate]

    def plate_summary(self, plate: str) -> dict[str, Any]:
        """Tokens, tokens per well, control tokens per well (None without ``is_control``) and
        label value counts of one plate, from the store's metadata (no row is read)."""
        entries = self._plate_entries()
        if plate not in entries:
            raise KeyError(f"plate {plate!r} has no tokens in {self._path} (plates: {self.plates})")
        if self._legacy is not None:
            return copy.deepcopy(self._legacy["summaries"][plate])
        file = self._path / entries[plate]["summary"]
        try:
            return json.loads(file.read_text())
        except FileNotFoundError:
            raise StoreDamagedError(
                f"embedding store {self._path} is damaged: the summary {file} of plate {plate!r} "
                f"listed in {STORE_FILE} is missing"
            ) from None

    def describe(self, max_values: int = 50) -> dict[str, Any]:
        """What ``plate-concepts info`` shows: size, plates, tokens, wells and controls per
        plate, label columns with their most frequent values (up to ``max_values`` each),
        completeness. Reads ``store.json`` and one label-count file, never the rows."""
        return store_summary.describe(self, max_values)

    # ------------------------------------------------------------------ obs
    @property
    def obs_columns(self) -> list[str]:
        """Every obs column of the store (no row is read)."""
        if self._meta["version"] < 2:
            return list(self._legacy_index()["columns"])
        return list(self._meta["columns"])

    @property
    def obs(self) -> pd.DataFrame:
        """Index and metadata of every committed token (row i of obs is token i).

        The whole table, read on first use and cached: for small stores. A store of millions of
        tokens is better read per plate (:meth:`read_obs` with ``plate=``), per row range or per
        column. A shallow copy is returned, so adding columns to it does not change the store.
        """
        if self._obs_cache is None:
            frames = [self._read_part(part) for part in self._meta["parts"]]
            if frames:
                obs = pd.concat(frames, ignore_index=True)
            else:
                obs = empty_obs(INDEX_COLUMNS)
            self._obs_cache = obs
        return self._obs_cache.copy(deep=False)

    def read_obs(
        self,
        rows: RowSelection | None = None,
        columns: Sequence[str] | None = None,
        *,
        plate: str | None = None,
    ) -> pd.DataFrame:
        """Obs rows indexed by their store row: ``rows`` (slice, indices or boolean mask, in that
        order), or every row of ``plate``, or all rows; only ``columns`` (default all) are
        read, and only from the parts that hold the rows."""
        if plate is not None and rows is not None:
            raise ValueError("pass rows or plate, not both")
        if plate is not None:
            frames = list(self.iter_obs(columns, plate=plate))
            return pd.concat(frames) if frames else empty_obs(columns or self.obs_columns)
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)), dtype=np.int64)
        elif isinstance(rows, (int, np.integer)):
            rows = [int(rows)]
        return store_obs.read_obs_rows(self, self._row_indices(rows), columns)

    def iter_obs(
        self, columns: Sequence[str] | None = None, *, plate: str | None = None
    ) -> Iterator[pd.DataFrame]:
        """Obs part by part (index = store rows), only ``columns``, only ``plate``'s parts."""
        if plate is not None and plate not in self._plate_entries():
            raise KeyError(f"plate {plate!r} has no tokens in {self._path} (plates: {self.plates})")
        return store_obs.iter_obs(self, columns, plate)

    def resolve_column(self, name: str, what: str = "column") -> str:
        """The obs column ``name`` means, as the user may spell it: the name in the imported
        table (``Metadata_cell_line`` for ``cell_line``), another case; a ``ValueError`` lists
        the columns otherwise (:func:`~plate_concepts.plates.platemap.resolve_column`)."""
        try:
            return resolve_column(name, self.obs_columns, what)
        except ValueError as error:
            raise ValueError(f"embedding store {self._path}: {error}") from None

    def obs_schema(self, columns: Sequence[str] | None = None) -> pa.Schema:
        """One arrow schema of the obs ``columns`` (default all) over every part, types promoted
        across parts (whole numbers on one plate and decimals on another: float), read from the
        parts' footers only (for writing obs part by part, e.g. an export)."""
        schemas = [pq.read_schema(self._path / part["file"]) for part in self._meta["parts"]]
        merged = (
            pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        )
        fields = []
        for column in self.obs_columns if columns is None else columns:
            index = merged.get_field_index(column)
            fields.append(merged.field(index) if index >= 0 else pa.field(column, pa.string()))
        return pa.schema(fields)

    def _read_part(
        self, part: dict[str, Any], columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        if columns is not None:
            unknown = [c for c in columns if c not in self.obs_columns]
            if unknown:
                raise KeyError(f"{unknown} are not obs columns of {self._path}: {self.obs_columns}")
        return read_part(self._path, part, columns)

    def completed_keys(self, plate: str | None = None) -> set[tuple[str, str, int, int, int]]:
        """The (plate, well, field, crop_y, crop_x) of every stored token (of one plate), for
        resuming a run."""
        return store_obs.completed_keys(self, plate)

    def has_rows(self, keys: pd.DataFrame | Iterable[tuple[Any, ...]]) -> np.ndarray:
        """Boolean per key: is a token with this (plate, well, field, crop_y, crop_x) stored?

        ``keys`` is a DataFrame with those columns or an iterable of 5-tuples; wells may be in
        any spelling.
        """
        return store_obs.has_rows(self, keys)

    # ------------------------------------------------------------------ reading tokens
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                array = zarr.open_array(self._path / name, mode="r", zarr_format=3)
            except Exception as exc:  # zarr raises several types for a missing/broken array
                raise StoreDamagedError(
                    f"cannot open the {name!r} array of embedding store {self._path}: {exc}"
                ) from exc
            if array.shape[0] < len(self):
                raise StoreDamagedError(
                    f"embedding store {self._path} is corrupt: {name!r} has {array.shape[0]} rows "
                    f"but {STORE_FILE} commits {len(self)}"
                )
            self._arrays[name] = array
        return self._arrays[name]

    def _require_chunks(self, name: str, rows_first: int, rows_last: int) -> None:
        """Fail unless every chunk file holding committed rows rows_first..rows_last exists
        (each chunk is checked once per handle)."""
        if rows_last < rows_first:
            return
        array = self._array(name)
        chunk = int(array.chunks[0])
        n_chunks = math.ceil(len(self) / chunk)
        verified = self._verified.get(name)
        if verified is None or len(verified) != n_chunks:
            verified = self._verified[name] = np.zeros(n_chunks, dtype=bool)
        ids = np.arange(rows_first // chunk, rows_last // chunk + 1)
        self._check_chunk_ids(name, array, ids[~verified[ids]])
        verified[ids] = True

    def _check_chunk_ids(self, name: str, array: zarr.Array, ids: Iterable[int]) -> None:
        missing = missing_chunk_ids(self._path / name, array, ids)
        if missing:
            chunk, first = int(array.chunks[0]), missing[0]
            rows = f"rows {first * chunk}..{min((first + 1) * chunk, len(self)) - 1}"
            more = (
                f" (and {len(missing) - 1} more chunk(s) of this read)" if len(missing) > 1 else ""
            )
            raise StoreDamagedError(
                f"embedding store {self._path} is damaged: the chunk file "
                f"{chunk_file(self._path / name, array, first)} holding committed {name} {rows} is "
                f"missing{more}. The store was probably copied or synced incompletely; copy it "
                "again from its source, or embed again"
            )

    def missing_chunks(self) -> dict[str, list[int]]:
        """Every array's missing chunk numbers among those holding committed rows (a full check,
        one file-system look-up per chunk)."""
        found = {}
        for name in ("tokens", "patch_tokens") if self.patch_grid else ("tokens",):
            array = self._array(name)
            every = range(math.ceil(len(self) / array.chunks[0]))
            found[name] = missing_chunk_ids(self._path / name, array, every)
        return found

    def read(self, rows: RowSelection = slice(None), dtype: Any = np.float32) -> np.ndarray:
        """Tokens of the given rows (slice, range, int, index array or boolean mask over all
        rows), in that order, as ``dtype`` (float32 by default)."""
        return self._read("tokens", rows, dtype)

    def read_plate(self, plate: str, dtype: Any = np.float32) -> np.ndarray:
        """The tokens of one plate, in store order (rows :meth:`plate_rows`)."""
        return self._read("tokens", self.plate_rows(plate), dtype)

    def read_patches(self, rows: RowSelection = slice(None), dtype: Any = np.float32) -> np.ndarray:
        """Patch-token grids (n, gh, gw, d) of the given rows, as ``dtype``."""
        if self.patch_grid is None:
            raise ValueError(
                f"embedding store {self._path} has no patch tokens (created without patch_grid)"
            )
        return self._read("patch_tokens", rows, dtype)

    def _read(self, name: str, rows: RowSelection, dtype: Any) -> np.ndarray:
        array = self._array(name)
        n = len(self)
        if isinstance(rows, (int, np.integer)):
            return self._read(name, np.array([rows]), dtype)[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                self._require_chunks(name, start, stop - 1)
                chunk_ids = range(start // int(array.chunks[0]), stop // int(array.chunks[0]) + 1)
                with naming_damaged_chunk(self._path, name, array, chunk_ids):
                    return np.asarray(array[start : max(start, stop)], dtype=dtype)
            rows = np.arange(start, stop, step)
        index = self._row_indices(rows)
        if index.size == 0:
            return np.empty((0, *array.shape[1:]), dtype=dtype)
        # Read each needed row once, in sorted order (zarr then touches every chunk once).
        unique, inverse = np.unique(index, return_inverse=True)
        chunk = int(array.chunks[0])
        chunk_ids = np.unique(unique // chunk)
        for chunk_id in chunk_ids:
            self._require_chunks(name, int(chunk_id) * chunk, int(chunk_id) * chunk)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        with naming_damaged_chunk(self._path, name, array, chunk_ids):
            if len(breaks) < 64:  # a few runs (a plate's rows): slices read faster than an index
                runs = np.split(unique, breaks)
                block = np.concatenate([array[run[0] : run[-1] + 1] for run in runs])
            else:
                block = array.get_orthogonal_selection((unique,) + (slice(None),) * (array.ndim - 1))
        return np.asarray(block[inverse], dtype=dtype)

    def _row_indices(self, rows: Any) -> np.ndarray:
        """A boolean mask (length N) or integer indices (negatives count from the end) ->
        int64 row indices, checked against the committed count."""
        n = len(self)
        if isinstance(rows, range):
            rows = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
        index = np.asarray(rows)
        if index.dtype == bool:
            if index.shape != (n,):
                raise ValueError(f"a boolean row mask must have shape ({n},), got {index.shape}")
            return np.flatnonzero(index)
        if index.size == 0:
            return np.empty(0, dtype=np.int64)
        if index.dtype.kind not in "iu":
            raise TypeError(
                f"rows must be a slice, integer indices or a boolean mask, got dtype {index.dtype}"
            )
        index = index.astype(np.int64).ravel()
        bad = (index < -n) | (index >= n)
        if bad.any():
            raise IndexError(
                f"row {int(index[np.argmax(bad)])} is out of range for a store of {n} tokens"
            )
        return np.where(index < 0, index + n, index)

    def tokens_dask(self):  # -> dask.array.Array (dask imported lazily)
        """A lazy dask array (N x d, the stored dtype) over the committed rows, one block per
        chunk (every chunk's file is checked to exist first)."""
        import dask.array as da

        array = self._array("tokens")
        self._require_chunks("tokens", 0, len(self) - 1)
        return da.from_array(array, chunks=array.chunks, inline_array=True)[: len(self)]

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 8,
        rows: np.ndarray | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        epochs: int | None = 1,
        return_index: bool = False,
    ) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream float32 token batches (and their row indices if ``return_index``).

        Chunks are read whole, in a seeded random order that changes every epoch; the rows of
        ``buffer_chunks`` chunks are pooled, shuffled and cut into batches (leftovers carry into
        the next pool). Memory is bounded by the pool, independent of N; I/O stays sequential
        within chunks. Same arguments, same batches.

        ``rows``: a boolean mask or index array selecting a subset (e.g. controls, or a plate's
        :meth:`plate_rows`); each selected row comes exactly once per epoch.
        ``shard=(rank, world_size)``: each rank takes every world_size-th chunk of the epoch's
        (shared) chunk order, so ranks are disjoint and together cover every row. Ranks can get
        different numbers of batches; under DDP use ``epochs=None`` (endless) and a fixed number
        of steps. ``drop_last`` drops the short last batch of each epoch.
        """
        return store_batches.iter_batches(
            self, batch_size, shuffle=shuffle, seed=seed, buffer_chunks=buffer_chunks, rows=rows,
            drop_last=drop_last, shard=shard, epochs=epochs, return_index=return_index,
        )  # fmt: skip

    # ------------------------------------------------------------------ appending
    def append(self, tokens: Any, obs: pd.DataFrame, patch_tokens: Any | None = None) -> range:
        """Append tokens (n x d) with their obs rows (and patch grids when the store has them).

        Returns the store rows they got. Validates everything before writing; a crash part-way
        leaves the store at its previous committed state. Each run of rows of one plate becomes
        its own obs part, so the plate is later read without the others.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be a 2-d array (n, d), got shape {tokens.shape} ({self._path})"
            )
        if tokens.shape[1] != self.dim:
            raise ValueError(
                f"token dimension {tokens.shape[1]} differs from the store's {self.dim} ({self._path})"
            )
        n = len(tokens)
        obs = normalise_obs(obs, n)
        start = len(self)
        tokens = finite_as(tokens, self.dtype, obs, start, "tokens")
        patches = checked_patches(self, patch_tokens, obs, start)
        if n == 0:
            return range(start, start)
        runs = plate_runs(obs["plate"].to_numpy())
        if len(runs) > _MAX_RUNS_PER_APPEND:
            runs = [(0, n)]
        tables = [arrow_table(obs.iloc[a:b]) for a, b in runs]

        self._check_unchanged_on_disk()
        meta = store_rewrite.upgraded_meta(self)
        self._remove_orphans(meta)
        stop = start + n
        written = (
            {"tokens": tokens} if patches is None else {"tokens": tokens, "patch_tokens": patches}
        )
        for name, values in written.items():
            array = zarr.open_array(self._path / name, mode="r+", zarr_format=3)
            array = array.with_config(_WRITE_EMPTY)  # a missing chunk is then always damage
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = values
        number = next_part_number(meta)
        for (a, b), table in zip(runs, tables, strict=True):
            part_file = f"obs/part-{number:05d}.parquet"
            with atomic_path(self._path / part_file) as tmp:
                _write_parquet(table, tmp)
            plates = list(dict.fromkeys(obs["plate"].iloc[a:b]))
            meta["parts"].append(
                {"file": part_file, "start": start + a, "stop": start + b, "plates": plates}
            )
            number += 1
        replaced, labels = [meta.get("labels")], store_rewrite.store_labels(self, meta)
        for plate, rows in obs.groupby("plate", sort=False).groups.items():
            added = summarise(obs.loc[rows])
            replaced.append(store_rewrite.add_to_summary(self.path, meta, str(plate), added))
            labels = merge_labels(labels, added["labels"], MAX_STORE_VALUES)
        meta["labels"] = new_summary_file(meta, None)
        write_json(self._path / meta["labels"], labels)
        meta["columns"] += [c for c in obs.columns if c not in meta["columns"]]
        meta["n_tokens"] = stop
        _write_meta(self._path / STORE_FILE, meta)  # the commit point
        for file in replaced:  # summaries the commit superseded
            if file is not None:
                (self._path / file).unlink(missing_ok=True)

        self._set_meta(meta)
        if self._obs_cache is not None:
            self._obs_cache = pd.concat([self._obs_cache, obs], ignore_index=True)
        return range(start, stop)

    def compact_obs(self, plate: str | None = None) -> None:
        """Merge consecutive obs parts of the same plate (of ``plate``, or of every plate) into
        one file each: many small appends make reading obs slow. Parts of different plates are
        never merged, so per-plate reads stay per plate.

        Merged files get new names and are committed by ``store.json`` before the old parts are
        deleted, so a crash at any point leaves a valid store.
        """
        store_rewrite.compact_obs(self, plate)

    def remove_plates(self, plates: Sequence[str]) -> None:
        """Delete every row of ``plates`` (and their provenance records).

        The kept rows are copied, in order and in bounded blocks, into a new store built beside
        this one, which then replaces it: a crash leaves the old store whole. Needs free disk
        space for the kept rows.
        """
        store_rewrite.remove_plates(self, plates)

    def _reload(self) -> None:
        self._set_meta(read_meta(self._path / STORE_FILE))
        self._obs_cache = None
        self._verified.clear()

    def _set_meta(self, meta: dict[str, Any]) -> None:
        self._meta = meta
        self._legacy = None
        self._arrays.clear()  # their cached shapes are stale
        self._plate_rows.clear()

    def _check_unchanged_on_disk(self) -> None:
        """Refuse to write through a stale handle (another writer committed since we read)."""
        on_disk = read_meta(self._path / STORE_FILE)
        if on_disk["n_tokens"] != len(self) or on_disk["parts"] != self._meta["parts"]:
            raise RuntimeError(
                f"embedding store {self._path} changed on disk since it was opened "
                f"({len(self)} -> {on_disk['n_tokens']} tokens); open it again before writing"
            )

    def _remove_orphans(self, meta: dict[str, Any]) -> None:
        """Delete leftovers of a crashed write: obs parts and plate summaries that ``meta``
        does not list."""
        listed = {Path(part["file"]).name for part in meta["parts"]}
        listed |= {Path(entry["summary"]).name for entry in meta["plates"].values()}
        listed |= {Path(meta["labels"]).name} if meta.get("labels") else set()
        for folder in ("obs", "plates"):
            (self._path / folder).mkdir(exist_ok=True)
            for file in (self._path / folder).iterdir():
                if file.name not in listed and file.is_file():
                    file.unlink()

    # ------------------------------------------------------------------ the per-plate index
    def _plate_entries(self) -> dict[str, dict[str, Any]]:
        if self._meta["version"] < 2:
            return self._legacy_index()["plates"]
        return self._meta["plates"]

    def _part_plates(self, i: int) -> list[str]:
        if self._meta["version"] < 2:
            return self._legacy_index()["part_plates"][i]
        return self._meta["parts"][i]["plates"]

    def _legacy_index(self) -> dict[str, Any]:
        """A version-1 store's per-plate index, computed from its obs once per handle."""
        if self._legacy is None:
            self._legacy = store_rewrite.legacy_index(self)
        return self._legacy
