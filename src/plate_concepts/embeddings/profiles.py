"""Bring embeddings into and out of an :class:`EmbeddingStore`: pycytominer/JUMP-style profile
tables (parquet or CSV; importing them lives in :mod:`~plate_concepts.embeddings.profile_tables`),
numpy arrays and AnnData.

Every importer builds the store beside its destination and renames it into place at the end,
so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
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
from plate_concepts.embeddings.profile_tables import (
    default_block_rows,
    fill_index_defaults,
    import_profiles,
    metadata_renames,
    table_kind,
)
from plate_concepts.embeddings.store import (
    INDEX_COLUMNS,
    EmbeddingStore,
    check_replaceable,
    default_chunk_rows,
    json_default,
)
from plate_concepts.plates.platemap import METADATA_PREFIX

__all__ = ["export_profiles", "from_anndata", "from_numpy", "import_profiles", "to_anndata"]

_EXPORT_NAMES = {"plate": "Metadata_Plate", "well": "Metadata_Well", "field": "Metadata_Site"}


# ---------------------------------------------------------------------- profile tables
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
    kind = table_kind(path)
    provenance = store.provenance
    feature_names = provenance.get("feature_names")
    if not isinstance(feature_names, list) or len(feature_names) != store.dim:
        width = max(4, len(str(store.dim - 1)))
        feature_names = [f"emb{i:0{width}d}" for i in range(store.dim)]
    source_names = provenance.get("profile_metadata_columns", {})
    defaulted = set(provenance.get("profile_defaulted_columns", []))
    columns = [c for c in store.obs_columns if c not in defaulted]
    renames = {c: _export_name(c, source_names) for c in columns}
    obs_schema = store.obs_schema(columns)
    schema = pa.schema([obs_schema.field(c).with_name(renames[c]) for c in columns])
    for name in feature_names:
        schema = schema.append(pa.field(name, pa.float32()))
    block_rows = block_rows or default_block_rows(store.dim, store.chunk_rows)

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
        for obs in store.iter_obs(columns):  # part by part: memory bounded by one part
            part = pa.Table.from_pandas(obs, schema=obs_schema, preserve_index=False)
            rows = obs.index.to_numpy()
            for start in range(0, len(rows), block_rows):
                piece = rows[start : start + block_rows]
                values = np.ascontiguousarray(store.read(slice(piece[0], piece[-1] + 1)).T)
                block = part.slice(start, len(piece))
                arrays = list(block.columns) + [pa.array(column) for column in values]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        if len(store) == 0:
            writer.write_table(schema.empty_table())
    return path


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
    check_replaceable(store_path, bool(create_kwargs.pop("overwrite", False)))
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
    check_replaceable(store_path, overwrite)
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
        block_rows = block_rows or default_block_rows(dim, chunk_rows)
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
    renames, _ = metadata_renames(metadata, Path(source))
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
    return fill_index_defaults(obs, default_plate)


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
            kept[str(key)] = json.loads(json.dumps(value, default=json_default, allow_nan=False))
        except (TypeError, ValueError):
            warnings.warn(
                f"{source}: uns entry {key!r} ({type(value).__name__}) is not JSON-serialisable; not kept",
                stacklevel=3,
            )
    return kept
