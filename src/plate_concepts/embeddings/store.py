"""The on-disk embedding store: tokens streamed from disk, never all in memory.

A store is a folder::

    store.json                commit record (written last, atomically): format, n_tokens, dim,
                              dtype, patch grid, chunk sizes, committed obs parts, provenance
    zarr.json                 a zarr v3 group holding
    tokens/                   N x d float16/float32, chunked by rows, grown on append
    patch_tokens/             optional N x gh x gw x d float16 patch-token grids
    obs/part-00000.parquet    per-token index and metadata, one file per append

Every token row has an index (``plate``, ``well`` in canonical 'B07' spelling, ``field``,
``crop_y``, ``crop_x``, ``crop_size``), optionally ``is_control`` and any label columns.

Crash safety: an append writes array rows beyond the committed count, then its parquet part
(temporary file + rename), and only then rewrites ``store.json``. ``store.json`` is the single
source of truth: rows beyond its ``n_tokens`` and parquet parts it does not list are ignored,
and the next append overwrites or removes them. Zarr's local store replaces chunk files
atomically, so rewriting the last, partly filled chunk never corrupts committed rows.
One writer at a time: a handle whose store was changed by another writer refuses to append.
Readers opened before an append do not see its rows (open the store again).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from plate_concepts._io import atomic_path
from plate_concepts.plates.geometry import canonical_well

STORE_FILE = "store.json"
FORMAT_NAME = "plate-concepts-embedding-store"
FORMAT_VERSION = 1
INDEX_COLUMNS = ("plate", "well", "field", "crop_y", "crop_x", "crop_size")
#: The columns that identify one crop; used to resume an interrupted embedding run.
KEY_COLUMNS = ("plate", "well", "field", "crop_y", "crop_x")
TOKEN_DTYPES = ("float16", "float32")
PATCH_DTYPE = "float16"
_MAX_CHUNK_BYTES = 8 * 2**20
_INTEGER_COLUMNS = ("field", "crop_y", "crop_x", "crop_size")

RowSelection = slice | range | np.ndarray | list[int] | int


def default_chunk_rows(row_bytes: int) -> int:
    """The largest power-of-two row count whose chunk fits in 8 MiB, so a chunk holds 4-8 MiB
    (one row per chunk when a single row is larger than that)."""
    rows = 1
    while rows * 2 * row_bytes <= _MAX_CHUNK_BYTES:
        rows *= 2
    return rows


class EmbeddingStore:
    """Tokens (N x d), optional patch-token grids and their per-token index on disk.

    Make one with :meth:`create`, open one with :meth:`open`. Opening reads only ``store.json``;
    the obs table is read on first use and cached, tokens are read on demand (:meth:`read`,
    :meth:`iter_batches`, :meth:`tokens_dask`).
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        # Private: use EmbeddingStore.create / EmbeddingStore.open.
        self._path = path
        self._meta = meta
        self._arrays: dict[str, zarr.Array] = {}
        self._obs_cache: pd.DataFrame | None = None

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
        dim = _positive_int(dim, "dim")
        dtype = np.dtype(dtype).name
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
        grid = None
        if patch_grid is not None:
            if len(patch_grid) != 2:
                raise ValueError(f"patch_grid must be (rows, columns), got {patch_grid!r}")
            grid = [_positive_int(g, "patch_grid") for g in patch_grid]
        itemsize = np.dtype(dtype).itemsize
        chunk_rows = (
            default_chunk_rows(dim * itemsize)
            if chunk_rows is None
            else _positive_int(chunk_rows, "chunk_rows")
        )
        if grid is not None:
            patch_row_bytes = grid[0] * grid[1] * dim * np.dtype(PATCH_DTYPE).itemsize
            chunk_rows_patch = (
                default_chunk_rows(patch_row_bytes)
                if chunk_rows_patch is None
                else _positive_int(chunk_rows_patch, "chunk_rows_patch")
            )
        else:
            chunk_rows_patch = None
        uns = _json_roundtrip(provenance or {}, "provenance")
        _check_replaceable(path, overwrite)

        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n_tokens": 0,
            "dim": dim,
            "dtype": dtype,
            "patch_grid": grid,
            "patch_dtype": PATCH_DTYPE if grid is not None else None,
            "chunk_rows": chunk_rows,
            "chunk_rows_patch": chunk_rows_patch,
            "parts": [],
            "uns": uns,
        }
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
        return cls(path, _read_meta(meta_path))

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
    def provenance(self) -> dict[str, Any]:
        """A copy of the provenance record (model, crop size, channels, ...)."""
        return copy.deepcopy(self._meta["uns"])

    def update_provenance(self, **entries: Any) -> None:
        """Merge ``entries`` into the provenance and rewrite ``store.json`` atomically."""
        update = _json_roundtrip(entries, "provenance")
        self._check_unchanged_on_disk()
        meta = copy.deepcopy(self._meta)
        meta["uns"].update(update)
        _write_meta(self._path / STORE_FILE, meta)
        self._meta = meta

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self._path)!r}, n_tokens={len(self)}, dim={self.dim}, "
            f"dtype={self.dtype.name}, patch_grid={self.patch_grid})"
        )

    # ------------------------------------------------------------------ obs
    @property
    def obs(self) -> pd.DataFrame:
        """Index and metadata of every committed token (row i of obs is token i).

        Read from the parquet parts on first use and cached; a shallow copy is returned, so
        adding columns to it does not change the store.
        """
        if self._obs_cache is None:
            frames = [self._read_part(part) for part in self._meta["parts"]]
            if frames:
                obs = pd.concat(frames, ignore_index=True)
            else:
                obs = pd.DataFrame(
                    {
                        c: pd.Series(dtype=object if c in ("plate", "well") else np.int64)
                        for c in INDEX_COLUMNS
                    }
                )
            self._obs_cache = obs
        return self._obs_cache.copy(deep=False)

    def _read_part(self, part: dict[str, Any]) -> pd.DataFrame:
        file = self._path / part["file"]
        if not file.is_file():
            raise FileNotFoundError(
                f"obs part {file} listed in {self._path / STORE_FILE} is missing"
            )
        frame = pd.read_parquet(file)
        if len(frame) != part["stop"] - part["start"]:
            raise ValueError(
                f"obs part {file} has {len(frame)} rows but {STORE_FILE} records "
                f"{part['stop'] - part['start']} (rows {part['start']}..{part['stop'] - 1}); "
                "the store is corrupt"
            )
        return frame

    def completed_keys(self) -> set[tuple[str, str, int, int, int]]:
        """The (plate, well, field, crop_y, crop_x) of every stored token, for resuming a run."""
        obs = self.obs
        if len(obs) == 0:
            return set()
        return set(
            zip(
                obs["plate"].astype(str),
                obs["well"].astype(str),
                *(obs[c].astype(np.int64).tolist() for c in KEY_COLUMNS[2:]),
                strict=True,
            )
        )

    def has_rows(self, keys: pd.DataFrame | Iterable[tuple[Any, ...]]) -> np.ndarray:
        """Boolean per key: is a token with this (plate, well, field, crop_y, crop_x) stored?

        ``keys`` is a DataFrame with those columns or an iterable of 5-tuples; wells may be in
        any spelling.
        """
        if isinstance(keys, pd.DataFrame):
            missing = [c for c in KEY_COLUMNS if c not in keys.columns]
            if missing:
                raise ValueError(f"keys lack column(s) {missing}; expected {list(KEY_COLUMNS)}")
            rows = keys[list(KEY_COLUMNS)].itertuples(index=False, name=None)
        else:
            rows = keys
        done = self.completed_keys()
        found = [
            (str(p), canonical_well(w), int(f), int(y), int(x)) in done for p, w, f, y, x in rows
        ]
        return np.asarray(found, dtype=bool)

    # ------------------------------------------------------------------ reading tokens
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                array = zarr.open_array(self._path / name, mode="r", zarr_format=3)
            except Exception as exc:  # zarr raises several types for a missing/broken array
                raise ValueError(
                    f"cannot open the {name!r} array of embedding store {self._path}: {exc}"
                ) from exc
            if array.shape[0] < len(self):
                raise ValueError(
                    f"embedding store {self._path} is corrupt: {name!r} has {array.shape[0]} rows "
                    f"but {STORE_FILE} commits {len(self)}"
                )
            self._arrays[name] = array
        return self._arrays[name]

    def read(self, rows: RowSelection = slice(None), dtype: Any = np.float32) -> np.ndarray:
        """Tokens of the given rows (slice, range, int, index array or boolean mask over all
        rows), in that order, as ``dtype`` (float32 by default)."""
        return self._read("tokens", rows, dtype)

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
                return np.asarray(array[start : max(start, stop)], dtype=dtype)
            rows = np.arange(start, stop, step)
        index = self._row_indices(rows)
        if index.size == 0:
            return np.empty((0, *array.shape[1:]), dtype=dtype)
        # Read each needed row once, in sorted order (zarr then touches every chunk once).
        unique, inverse = np.unique(index, return_inverse=True)
        block = array.get_orthogonal_selection((unique,) + (slice(None),) * (array.ndim - 1))
        return np.asarray(block[inverse], dtype=dtype)

    def _row_indices(self, rows: Any) -> np.ndarray:
        """A boolean mask (length N) or integer indices (negatives count from the end) ->
        int64 row indices, checked against the committed count."""
        n = len(self)
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
        """A lazy dask array (N x d, the stored dtype) over the committed rows, one block per chunk."""
        import dask.array as da

        array = self._array("tokens")
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

        ``rows``: a boolean mask or index array selecting a subset (e.g. controls); each selected
        row comes exactly once per epoch. ``shard=(rank, world_size)``: each rank takes every
        world_size-th chunk of the epoch's (shared) chunk order, so ranks are disjoint and
        together cover every row. Ranks can get different numbers of batches; under DDP use
        ``epochs=None`` (endless) and a fixed number of steps. ``drop_last`` drops the short last
        batch of each epoch.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        buffer_chunks = _positive_int(buffer_chunks, "buffer_chunks")
        rank, world_size = (int(s) for s in shard)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        selected = None if rows is None else np.unique(self._row_indices(rows))
        n_chunks = math.ceil(len(self) / self.chunk_rows)
        chunk_ids = (
            np.arange(n_chunks) if selected is None else np.unique(selected // self.chunk_rows)
        )
        if len(chunk_ids) == 0:
            raise ValueError(
                f"nothing to iterate in {self._path}: "
                + ("the store is empty" if selected is None else "rows selects no token")
            )
        if len(chunk_ids) < world_size:
            raise ValueError(
                f"only {len(chunk_ids)} chunk(s) hold the selected rows, fewer than the {world_size} shards; "
                "use a store with smaller chunk_rows or fewer ranks"
            )
        dim = self.dim

        def batches() -> Iterator[Any]:
            epoch = 0
            while epochs is None or epoch < epochs:
                rng = np.random.default_rng([seed, epoch])
                order = rng.permutation(chunk_ids) if shuffle else chunk_ids
                chunks = self._stream_chunks(order[rank::world_size], selected)
                pool_x = np.empty((0, dim), dtype=np.float32)
                pool_i = np.empty(0, dtype=np.int64)
                while loaded := [
                    chunk for _, chunk in zip(range(buffer_chunks), chunks, strict=False)
                ]:
                    pool_x = np.concatenate([pool_x] + [x for x, _ in loaded])
                    pool_i = np.concatenate([pool_i] + [i for _, i in loaded])
                    del loaded
                    if shuffle:
                        perm = rng.permutation(len(pool_i))
                        pool_x, pool_i = pool_x[perm], pool_i[perm]
                    n_full = len(pool_i) // batch_size * batch_size
                    for start in range(0, n_full, batch_size):
                        x, i = (
                            pool_x[start : start + batch_size],
                            pool_i[start : start + batch_size],
                        )
                        yield (x, i) if return_index else x
                    # Copy the leftover so the pool just cut into batches can be freed.
                    pool_x, pool_i = pool_x[n_full:].copy(), pool_i[n_full:].copy()
                if len(pool_i) and not drop_last:
                    yield (pool_x, pool_i) if return_index else pool_x
                epoch += 1

        return batches()

    def _stream_chunks(
        self, chunk_ids: np.ndarray, selected: np.ndarray | None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 rows, row indices) of each chunk in turn, reading one chunk ahead in a thread."""
        array = self._array("tokens")
        n, chunk_rows = len(self), self.chunk_rows

        def load(chunk: int) -> tuple[np.ndarray, np.ndarray]:
            start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)
            if selected is None:
                return np.asarray(array[start:stop], dtype=np.float32), np.arange(
                    start, stop, dtype=np.int64
                )
            lo, hi = np.searchsorted(selected, [start, stop])
            index = selected[lo:hi]
            block = array[index[0] : index[-1] + 1]
            return np.asarray(block[index - index[0]], dtype=np.float32), index

        if len(chunk_ids) == 0:
            return
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(load, int(chunk_ids[0]))
            for k in range(len(chunk_ids)):
                result = pending.result()
                if k + 1 < len(chunk_ids):
                    pending = prefetch.submit(load, int(chunk_ids[k + 1]))
                yield result

    # ------------------------------------------------------------------ appending
    def append(self, tokens: Any, obs: pd.DataFrame, patch_tokens: Any | None = None) -> range:
        """Append tokens (n x d) with their obs rows (and patch grids when the store has them).

        Returns the store rows they got. Validates everything before writing; a crash part-way
        leaves the store at its previous committed state.
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
        tokens = _finite_as(tokens, self.dtype, obs, start, "tokens")
        patches = self._check_patches(patch_tokens, n, obs, start)
        if n == 0:
            return range(start, start)
        try:
            table = pa.Table.from_pandas(obs, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"obs cannot be stored as parquet (mixed types in a column?): {exc}"
            ) from exc

        self._check_unchanged_on_disk()
        self._remove_orphans()
        stop = start + n
        group = zarr.open_group(self._path, mode="r+", zarr_format=3)
        written = (
            {"tokens": tokens, "patch_tokens": patches}
            if patches is not None
            else {"tokens": tokens}
        )
        for name, values in written.items():
            array = group[name]
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = values
        part_file = self._next_part_file()
        with atomic_path(self._path / part_file) as tmp:
            _write_parquet(table, tmp)
        meta = copy.deepcopy(self._meta)
        meta["n_tokens"] = stop
        meta["parts"].append({"file": part_file, "start": start, "stop": stop})
        _write_meta(self._path / STORE_FILE, meta)  # the commit point

        self._meta = meta
        self._arrays.clear()  # their cached shapes are stale
        if self._obs_cache is not None:
            self._obs_cache = pd.concat([self._obs_cache, obs], ignore_index=True)
        return range(start, stop)

    def _check_patches(
        self, patch_tokens: Any | None, n: int, obs: pd.DataFrame, start: int
    ) -> np.ndarray | None:
        grid = self.patch_grid
        if grid is None:
            if patch_tokens is not None:
                raise ValueError(
                    f"embedding store {self._path} was created without patch_grid; it cannot take patch tokens"
                )
            return None
        if patch_tokens is None:
            raise ValueError(
                f"embedding store {self._path} holds patch tokens; pass patch_tokens of shape "
                f"(n, {grid[0]}, {grid[1]}, {self.dim})"
            )
        patches = np.asarray(patch_tokens)
        expected = (n, grid[0], grid[1], self.dim)
        if patches.shape != expected:
            raise ValueError(
                f"patch_tokens have shape {patches.shape}, expected {expected} ({self._path})"
            )
        return _finite_as(patches, np.dtype(PATCH_DTYPE), obs, start, "patch_tokens")

    def compact_obs(self) -> None:
        """Merge all obs parts into one parquet file (many small appends make reading obs slow).

        The merged file gets a new name and is committed by ``store.json`` before the old
        parts are deleted, so a crash at any point leaves a valid store.
        """
        parts = self._meta["parts"]
        if len(parts) <= 1:
            return
        self._check_unchanged_on_disk()
        obs = self.obs
        self._remove_orphans()
        part_file = self._next_part_file()
        with atomic_path(self._path / part_file) as tmp:
            _write_parquet(pa.Table.from_pandas(obs, preserve_index=False), tmp)
        meta = copy.deepcopy(self._meta)
        meta["parts"] = [{"file": part_file, "start": 0, "stop": len(self)}]
        _write_meta(self._path / STORE_FILE, meta)
        self._meta = meta
        self._remove_orphans()

    def _next_part_file(self) -> str:
        # One past the highest listed number: never the name of a committed part.
        numbers = [int(Path(part["file"]).stem.rsplit("-", 1)[1]) for part in self._meta["parts"]]
        return f"obs/part-{max(numbers, default=-1) + 1:05d}.parquet"

    def _check_unchanged_on_disk(self) -> None:
        """Refuse to write through a stale handle (another writer committed since we read)."""
        on_disk = _read_meta(self._path / STORE_FILE)
        if on_disk["n_tokens"] != len(self) or on_disk["parts"] != self._meta["parts"]:
            raise RuntimeError(
                f"embedding store {self._path} changed on disk since it was opened "
                f"({len(self)} -> {on_disk['n_tokens']} tokens); open it again before writing"
            )

    def _remove_orphans(self) -> None:
        """Delete leftovers of a crashed append: obs files that store.json does not list."""
        listed = {Path(part["file"]).name for part in self._meta["parts"]}
        obs_dir = self._path / "obs"
        obs_dir.mkdir(exist_ok=True)
        for file in obs_dir.iterdir():
            if file.name not in listed and file.is_file():
                file.unlink()


# ---------------------------------------------------------------------- obs validation
def normalise_obs(obs: pd.DataFrame, n_rows: int) -> pd.DataFrame:
    """Check and normalise an obs table for ``n_rows`` tokens: required index columns present,
    wells canonical ('B07'), integer columns integral, ``is_control`` boolean, categoricals
    decoded. Returns a new DataFrame with a 0..n-1 index."""
    if not isinstance(obs, pd.DataFrame):
        raise TypeError(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
    if len(obs) != n_rows:
        raise ValueError(
            f"obs has {len(obs)} rows but there are {n_rows} tokens; they must match row for row"
        )
    missing = [c for c in INDEX_COLUMNS if c not in obs.columns]
    if missing:
        raise ValueError(
            f"obs is missing required column(s) {missing}; every token needs {list(INDEX_COLUMNS)}"
        )
    if not all(isinstance(c, str) for c in obs.columns) or obs.columns.has_duplicates:
        raise ValueError(f"obs column names must be unique strings, got {list(obs.columns)}")
    obs = obs.reset_index(drop=True).copy()
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = np.asarray(obs[column])
    for column in ("plate", "well"):
        if obs[column].isna().any():
            raise ValueError(
                f"obs column {column!r} is empty in row {int(np.argmax(obs[column].isna()))}"
            )
    obs["plate"] = obs["plate"].astype(str)
    obs["well"] = canonical_wells(obs["well"], "obs")
    for column in _INTEGER_COLUMNS:
        obs[column] = integer_column(obs[column], column, "obs")
    if "is_control" in obs.columns:
        obs["is_control"] = _bool_column(obs["is_control"])
    return obs


def canonical_wells(wells: pd.Series, where: str, first_row: int = 0) -> pd.Series:
    """Canonical well names ('B07') of a column in any spelling; the error names the row
    (counted from ``first_row``)."""
    mapping = {}
    for value in pd.unique(wells):
        try:
            mapping[value] = canonical_well(str(value))
        except ValueError:
            row = int(np.argmax((wells == value).to_numpy()))
            raise ValueError(
                f"{where} row {first_row + row}: well {value!r} is not a well name "
                "(expected e.g. 'B07', 'B7' or 'r02c07')"
            ) from None
    return wells.map(mapping).astype(object)


def integer_column(values: pd.Series, column: str, where: str) -> pd.Series:
    """``values`` as int64, or an error naming the first row that is empty or not a whole number."""
    numeric = pd.to_numeric(values, errors="coerce").astype(float)
    bad = numeric.isna().to_numpy() | (numeric.to_numpy() != np.round(numeric.to_numpy()))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{where} column {column!r} row {row}: {values.iloc[row]!r} is not a whole number"
        )
    return numeric.astype(np.int64)


def _bool_column(values: pd.Series) -> pd.Series:
    if values.dtype == bool:
        return values
    ok = values.isin([True, False, 0, 1]) & values.notna()
    if not ok.all():
        row = int(np.argmax(~ok.to_numpy()))
        raise ValueError(
            f"obs column 'is_control' row {row}: {values.iloc[row]!r} is not a boolean (True/False or 1/0)"
        )
    return values.astype(bool)


def _finite_as(
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


# ---------------------------------------------------------------------- files
def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, allow_nan=False))


def _read_meta(path: Path) -> dict[str, Any]:
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
            f"this plate_concepts reads up to {FORMAT_VERSION}"
        )
    required = (
        "n_tokens",
        "dim",
        "dtype",
        "patch_grid",
        "chunk_rows",
        "chunk_rows_patch",
        "parts",
        "uns",
    )
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
        expected_start = part["stop"]
    if expected_start != meta["n_tokens"]:
        raise ValueError(
            f"{path} is corrupt: its obs parts cover {expected_start} rows "
            f"but n_tokens is {meta['n_tokens']}"
        )
    return meta


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.is_dir() or (any(path.iterdir()) and not EmbeddingStore.is_store(path)):
        raise FileExistsError(
            f"{path} exists and is not an embedding store; refusing to overwrite it"
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _json_roundtrip(record: dict[str, Any], what: str) -> dict[str, Any]:
    """``record`` as plain JSON types (numpy scalars/arrays and paths converted)."""
    if not isinstance(record, dict):
        raise TypeError(f"{what} must be a dict, got {type(record).__name__}")
    try:
        return json.loads(json.dumps(record, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be JSON-serialisable (str/int/float/bool/list/dict, no NaN): {exc}"
        ) from exc


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
