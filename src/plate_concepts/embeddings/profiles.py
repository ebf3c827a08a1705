"""Bring embeddings into and out of an :class:`EmbeddingStore`: pycytominer/JUMP-style profile
tables (parquet or CSV), numpy arrays and AnnData.

Profile tables: ``Metadata_*`` columns become obs columns — ``Metadata_Plate`` -> ``plate``,
``Metadata_Well`` -> ``well`` (canonical 'B07'), ``Metadata_Site`` or ``Metadata_Field`` ->
``field``, ``Metadata_Crop_Y``/``_Crop_X``/``_Crop_Size``/``_is_control`` -> their lower-case
index names, any other ``Metadata_X`` -> ``X`` (case kept). The well column is required; the
other index columns default when absent: ``plate`` = the file's stem (or ``plate=``), ``field``,
``crop_y``, ``crop_x``, ``crop_size`` = 0. Which columns were renamed or defaulted is kept in the
store's provenance, so :func:`export_profiles` writes the table back with its original names.
Features are, by default, every numeric column not starting with ``Metadata_``.

Every importer builds the store beside its destination and renames it into place at the end,
so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from plate_concepts._io import atomic_path
from plate_concepts.embeddings.store import (
    INDEX_COLUMNS,
    EmbeddingStore,
    _check_replaceable,
    _json_default,
    canonical_wells,
    default_chunk_rows,
)

METADATA_PREFIX = "Metadata_"
#: Metadata names (lower-cased, without prefix) that map onto the store's index columns.
_INDEX_ALIASES = {
    "plate": "plate",
    "well": "well",
    "site": "field",
    "field": "field",
    "crop_y": "crop_y",
    "crop_x": "crop_x",
    "crop_size": "crop_size",
    "is_control": "is_control",
}
_DEFAULTED = ("field", "crop_y", "crop_x", "crop_size")
_EXPORT_NAMES = {"plate": "Metadata_Plate", "well": "Metadata_Well", "field": "Metadata_Site"}
_BLOCK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------- profile tables
def import_profiles(
    table_path: str | os.PathLike,
    store_path: str | os.PathLike,
    features: str | None = None,
    overwrite: bool = False,
    *,
    plate: str | None = None,
    dtype: str = "float32",
    block_rows: int | None = None,
) -> EmbeddingStore:
    """Import a profile table (parquet or CSV, ``Metadata_*`` + feature columns) into a store.

    ``features`` is a regex (``re.search``) picking feature columns among the non-``Metadata_``
    ones; by default all numeric ones are taken. The table is streamed in blocks of
    ``block_rows`` rows (parquet via pyarrow, CSV via pandas), never read whole.
    """
    table_path, store_path = Path(table_path), Path(store_path)
    if not table_path.is_file():
        raise FileNotFoundError(f"profile table {table_path} does not exist")
    _check_replaceable(store_path, overwrite)
    kind = _table_kind(table_path)
    if kind == "parquet":
        parquet = pq.ParquetFile(table_path)
        columns = list(parquet.schema_arrow.names)
        numeric = [
            name
            for name, field_type in zip(columns, parquet.schema_arrow.types, strict=True)
            if pa.types.is_integer(field_type)
            or pa.types.is_floating(field_type)
            or pa.types.is_decimal(field_type)
        ]
    else:
        sample = pd.read_csv(table_path, nrows=1000, dtype=_csv_string_columns(table_path))
        columns = list(sample.columns)
        numeric = [
            c
            for c in columns
            if pd.api.types.is_numeric_dtype(sample[c]) and sample[c].dtype != bool
        ]
    feature_names = _select_features(columns, numeric, features, table_path)
    metadata = [c for c in columns if c.startswith(METADATA_PREFIX)]
    renames, source_names = _metadata_renames(metadata, table_path)
    if "well" not in renames.values():
        raise ValueError(
            f"profile table {table_path} has no Metadata_Well column; every row needs a well"
        )
    defaulted = [c for c in ("plate", *_DEFAULTED) if c not in renames.values()]
    default_plate = plate if plate is not None else table_path.stem

    dim = len(feature_names)
    chunk_rows = default_chunk_rows(dim * np.dtype(dtype).itemsize)
    block_rows = block_rows or _default_block_rows(dim, chunk_rows)
    provenance = {
        "source": str(table_path),
        "imported_from": "profiles",
        "feature_names": feature_names,
        "profile_metadata_columns": source_names,
        "profile_defaulted_columns": defaulted,
    }
    with atomic_path(store_path, overwrite=True) as tmp:
        store = EmbeddingStore.create(
            tmp, dim=dim, dtype=dtype, chunk_rows=chunk_rows, provenance=provenance
        )
        first_row = 0
        for block in _table_blocks(table_path, kind, metadata + feature_names, block_rows):
            values = _feature_block(
                block, feature_names, first_row, table_path, source_names["well"]
            )
            obs = _fill_index_defaults(block[metadata].rename(columns=renames), default_plate)
            obs["well"] = canonical_wells(
                obs["well"], f"profile table {table_path} data", first_row
            )
            store.append(values, obs)
            first_row += len(block)
    return EmbeddingStore.open(store_path)


def export_profiles(
    store: EmbeddingStore | str | os.PathLike,
    path: str | os.PathLike,
    *,
    block_rows: int | None = None,
) -> Path:
    """Write the store as a profile table: ``Metadata_*`` columns from obs, then one column per
    token dimension (names from the import, else ``emb0000``...). Parquet or CSV by extension;
    written in row blocks, atomically."""
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
    path = Path(path)
    kind = _table_kind(path)
    provenance = store.provenance
    feature_names = provenance.get("feature_names")
    if not isinstance(feature_names, list) or len(feature_names) != store.dim:
        width = max(4, len(str(store.dim - 1)))
        feature_names = [f"emb{i:0{width}d}" for i in range(store.dim)]
    source_names = provenance.get("profile_metadata_columns", {})
    defaulted = set(provenance.get("profile_defaulted_columns", []))
    obs = store.obs
    obs = obs[[c for c in obs.columns if c not in defaulted]]
    obs = obs.rename(columns={c: _export_name(c, source_names) for c in obs.columns})
    obs_table = pa.Table.from_pandas(obs, preserve_index=False)
    schema = obs_table.schema
    for name in feature_names:
        schema = schema.append(pa.field(name, pa.float32()))
    block_rows = block_rows or _default_block_rows(store.dim, store.chunk_rows)

    compression = {".gz": "gzip", ".bz2": "bz2"}.get(path.suffix.lower())
    if kind == "csv" and compression is None and path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: CSV export writes .csv, .csv.gz or .csv.bz2")

    with atomic_path(path) as tmp, ExitStack() as stack:
        if kind == "parquet":
            writer = stack.enter_context(pq.ParquetWriter(str(tmp), schema))
        else:
            sink = (
                stack.enter_context(pa.CompressedOutputStream(str(tmp), compression))
                if compression
                else str(tmp)
            )
            writer = stack.enter_context(pacsv.CSVWriter(sink, schema))
        for start in range(0, len(store), block_rows):
            stop = min(start + block_rows, len(store))
            values = np.ascontiguousarray(store.read(slice(start, stop)).T)
            block = obs_table.slice(start, stop - start)
            arrays = list(block.columns) + [pa.array(column) for column in values]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        if len(store) == 0:
            writer.write_table(schema.empty_table())
    return path


def _table_kind(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if path.suffix.lower() == ".csv" or suffixes.endswith(
        (".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz")
    ):
        return "csv"
    raise ValueError(f"{path}: expected a .parquet or .csv profile table")


def _csv_string_columns(path: Path) -> dict[str, type]:
    """Read plate and well columns of a CSV as text (a numeric barcode keeps its leading zeros)."""
    header = pd.read_csv(path, nrows=0).columns
    return {
        c: str
        for c in header
        if c.startswith(METADATA_PREFIX) and c[len(METADATA_PREFIX) :].lower() in ("plate", "well")
    }


def _select_features(
    columns: list[str], numeric: list[str], pattern: str | None, table: Path
) -> list[str]:
    candidates = [c for c in columns if not c.startswith(METADATA_PREFIX)]
    if pattern is None:
        chosen = [c for c in candidates if c in numeric]
        skipped = [c for c in candidates if c not in numeric]
        if skipped:
            warnings.warn(
                f"{table}: non-numeric columns {skipped} are neither Metadata_ nor features; they are left out",
                stacklevel=3,
            )
    else:
        regex = re.compile(pattern)
        chosen = [c for c in candidates if regex.search(c)]
        not_numeric = [c for c in chosen if c not in numeric]
        if not_numeric:
            raise ValueError(
                f"{table}: feature column {not_numeric[0]!r} (selected by {pattern!r}) is not numeric"
            )
    if not chosen:
        raise ValueError(
            f"{table}: no feature columns"
            + (
                f" match {pattern!r}"
                if pattern is not None
                else " (no numeric column without the Metadata_ prefix)"
            )
        )
    return chosen


def _metadata_renames(metadata: list[str], table: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Metadata_* names -> obs names, and the reverse map (obs name -> original name)."""
    renames: dict[str, str] = {}
    for column in metadata:
        bare = column[len(METADATA_PREFIX) :]
        renames[column] = _INDEX_ALIASES.get(bare.lower(), bare)
    source: dict[str, str] = {}
    for column, name in renames.items():
        if name in source:
            raise ValueError(
                f"{table}: columns {source[name]!r} and {column!r} both map to obs column {name!r}; drop one"
            )
        source[name] = column
    return renames, source


def _fill_index_defaults(obs: pd.DataFrame, default_plate: str) -> pd.DataFrame:
    obs = obs.reset_index(drop=True)
    if "plate" not in obs.columns:
        obs.insert(0, "plate", default_plate)
    for column in _DEFAULTED:
        if column not in obs.columns:
            obs[column] = 0
    return obs


def _default_block_rows(dim: int, chunk_rows: int) -> int:
    """About 64 MiB of float32 features per block, a whole number of chunks (no chunk rewrites)."""
    chunks = max(1, _BLOCK_BYTES // (dim * 4 * chunk_rows))
    return chunks * chunk_rows


def _table_blocks(
    path: Path, kind: str, columns: list[str], block_rows: int
) -> Iterator[pd.DataFrame]:
    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=block_rows, columns=columns):
            yield batch.to_pandas()
    else:
        dtypes = _csv_string_columns(path)
        yield from pd.read_csv(path, usecols=columns, dtype=dtypes, chunksize=block_rows)


def _feature_block(
    block: pd.DataFrame, features: list[str], first_row: int, table: Path, well_column: str
) -> np.ndarray:
    """Feature values as float64, or an error naming the table row and column of the first
    non-numeric, NaN or infinite value."""
    frame = block[features]
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    values = numeric.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raw = frame.iat[row, col]
        if pd.isna(raw):
            what = "is empty (NaN)"
        elif np.isnan(values[row, col]):
            what = f"is not numeric ({raw!r})"
        else:
            what = "is infinite"
        well = block[well_column].iloc[row]
        raise ValueError(
            f"{table}: feature {features[col]!r} in data row {first_row + row} (well {well}) {what}; "
            "fill or drop missing features first"
        )
    return values


def _export_name(column: str, source_names: dict[str, str]) -> str:
    if column in source_names:
        return source_names[column]
    if column in _EXPORT_NAMES:
        return _EXPORT_NAMES[column]
    return column if column.startswith(METADATA_PREFIX) else METADATA_PREFIX + column


# ---------------------------------------------------------------------- numpy
def from_numpy(
    tokens: np.ndarray,
    index: pd.DataFrame,
    store_path: str | os.PathLike,
    *,
    patch_tokens: np.ndarray | None = None,
    **create_kwargs: Any,
) -> EmbeddingStore:
    """A new store from an in-memory (N x d) token matrix and its obs table (same rows);
    ``create_kwargs`` go to :meth:`EmbeddingStore.create` (dtype, chunk_rows, provenance,
    overwrite, ...)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-d array (n, d), got shape {tokens.shape}")
    store_path = Path(store_path)
    _check_replaceable(store_path, bool(create_kwargs.pop("overwrite", False)))
    if patch_tokens is not None and "patch_grid" not in create_kwargs:
        create_kwargs["patch_grid"] = tuple(np.shape(patch_tokens)[1:3])
    with atomic_path(store_path, overwrite=True) as tmp:
        EmbeddingStore.create(tmp, dim=tokens.shape[1], **create_kwargs).append(
            tokens, index, patch_tokens
        )
    return EmbeddingStore.open(store_path)


# ---------------------------------------------------------------------- AnnData
def to_anndata(
    store: EmbeddingStore | str | os.PathLike, *, patch_tokens: bool = False
):  # -> anndata.AnnData
    """The store in memory as AnnData: ``X`` tokens (stored dtype), ``obs`` (index '0'..'N-1'),
    ``uns`` provenance; ``obsm['patch_tokens']`` (float16) only when asked."""
    import anndata

    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
    obs = store.obs.copy()
    obs.index = obs.index.astype(str)
    feature_names = store.provenance.get("feature_names")
    var = None
    if isinstance(feature_names, list) and len(feature_names) == store.dim:
        var = pd.DataFrame(index=pd.Index(feature_names, dtype=str))
    adata = anndata.AnnData(
        X=store.read(slice(None), dtype=store.dtype), obs=obs, var=var, uns=store.provenance
    )
    if patch_tokens:
        adata.obsm["patch_tokens"] = store.read_patches(slice(None), dtype=np.float16)
    return adata


def from_anndata(
    adata_or_path: Any,
    store_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    plate: str | None = None,
    block_rows: int | None = None,
) -> EmbeddingStore:
    """A new store from an AnnData object or an ``.h5ad``/``.zarr`` file.

    ``obs`` columns may use the store's names or ``Metadata_*`` names; missing index columns
    default as for profile tables (plate: ``plate``, else the file stem, else 'plate');
    meaningful obs names are kept in an ``obs_name`` column. ``X`` (dense or sparse) becomes
    the tokens, ``uns`` the provenance (its JSON-able entries), a 4-d ``obsm['patch_tokens']``
    the patch tokens. From a file, ``X`` and the patch tokens are read in row blocks (never
    whole); obs and uns are read into memory.
    """
    store_path = Path(store_path)
    _check_replaceable(store_path, overwrite)
    with _anndata_parts(adata_or_path) as (x, obs, uns, patches, source, default_plate):
        if x is None or len(x.shape) != 2:
            raise ValueError(
                f"{source}: X must be a 2-d (n_obs x n_vars) matrix, got {None if x is None else x.shape}"
            )
        obs = _obs_from_anndata(obs, plate or default_plate, source)
        if patches is not None and len(patches.shape) != 4:
            patches = None
        n, dim = x.shape
        provenance = _jsonable(dict(uns), source)
        provenance.setdefault("imported_from", source)
        chunk_rows = default_chunk_rows(dim * np.dtype(dtype).itemsize)
        block_rows = block_rows or _default_block_rows(dim, chunk_rows)
        grid = tuple(patches.shape[1:3]) if patches is not None else None
        with atomic_path(store_path, overwrite=True) as tmp:
            store = EmbeddingStore.create(
                tmp,
                dim=dim,
                dtype=dtype,
                chunk_rows=chunk_rows,
                patch_grid=grid,
                provenance=provenance,
            )
            for start in range(0, n, block_rows):
                stop = min(start + block_rows, n)
                block = x[start:stop]
                block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
                patch_block = None if patches is None else np.asarray(patches[start:stop])
                store.append(block, obs.iloc[start:stop], patch_block)
    return EmbeddingStore.open(store_path)


@contextmanager
def _anndata_parts(adata_or_path: Any) -> Iterator[tuple[Any, pd.DataFrame, dict, Any, str, str]]:
    """(X, obs, uns, patch tokens or None, source name, default plate) of an AnnData object or
    file. For files X and patch tokens stay on disk (h5py/zarr arrays, or anndata's backed
    sparse datasets), so row slices read only those rows."""
    import anndata

    if isinstance(adata_or_path, anndata.AnnData):
        adata = adata_or_path
        yield (
            adata.X,
            adata.obs,
            adata.uns,
            adata.obsm.get("patch_tokens"),
            "AnnData object",
            "plate",
        )
        return
    if not isinstance(adata_or_path, (str, os.PathLike)):
        raise TypeError(
            f"expected an AnnData or a path to .h5ad/.zarr, got {type(adata_or_path).__name__}"
        )
    from anndata.io import read_elem, sparse_dataset

    file = Path(adata_or_path)
    if not file.exists():
        raise FileNotFoundError(f"AnnData file {file} does not exist")
    with ExitStack() as stack:
        if file.suffix.lower() == ".h5ad":
            import h5py

            root = stack.enter_context(h5py.File(file, "r"))
            dense_type: type = h5py.Dataset
        elif file.suffix.lower() == ".zarr":
            import zarr

            root = zarr.open_group(file, mode="r")
            dense_type = zarr.Array
        else:
            raise ValueError(f"{file}: expected an AnnData .h5ad file or .zarr folder")
        x = root["X"]
        x = x if isinstance(x, dense_type) else sparse_dataset(x)
        uns = read_elem(root["uns"]) if "uns" in root else {}
        patches = (
            root["obsm"]["patch_tokens"]
            if "obsm" in root and "patch_tokens" in root["obsm"]
            else None
        )
        yield x, read_elem(root["obs"]), uns, patches, str(file), file.stem


def _obs_from_anndata(obs: pd.DataFrame, default_plate: str, source: str) -> pd.DataFrame:
    metadata = [c for c in obs.columns if str(c).startswith(METADATA_PREFIX)]
    renames, _ = _metadata_renames(metadata, Path(source))
    obs = obs.rename(columns=renames)
    # Keep meaningful obs names (cell ids, ...); the default '0'..'n-1' carries nothing.
    if "obs_name" not in obs.columns and not obs.index.astype(str).equals(
        pd.RangeIndex(len(obs)).astype(str)
    ):
        obs = obs.assign(obs_name=obs.index.astype(str))
    clashes = [c for c in INDEX_COLUMNS if list(obs.columns).count(c) > 1]
    if clashes:
        raise ValueError(f"{source}: obs has both Metadata_ and plain columns for {clashes}")
    if "well" not in obs.columns:
        raise ValueError(
            f"{source}: obs has no 'well' (or Metadata_Well) column; every token needs a well"
        )
    return _fill_index_defaults(obs, default_plate)


def _jsonable(record: dict[str, Any], source: str) -> dict[str, Any]:
    """The JSON-serialisable part of an AnnData uns (numpy values converted); others are
    dropped with a warning naming them."""
    import json

    kept: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            kept[str(key)] = _jsonable(value, source)
            continue
        try:
            kept[str(key)] = json.loads(json.dumps(value, default=_json_default, allow_nan=False))
        except (TypeError, ValueError):
            warnings.warn(
                f"{source}: uns entry {key!r} ({type(value).__name__}) is not JSON-serialisable; not kept",
                stacklevel=3,
            )
    return kept
