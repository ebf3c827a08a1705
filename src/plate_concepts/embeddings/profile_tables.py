"""Import pycytominer/JUMP-style profile tables (parquet or CSV, one per plate) into one
:class:`EmbeddingStore`.

``Metadata_*`` columns become obs columns — ``Metadata_Plate`` -> ``plate``, ``Metadata_Well`` ->
``well`` (canonical 'B07'), ``Metadata_Site`` or ``Metadata_Field`` -> ``field``,
``Metadata_Crop_Y``/``_Crop_X``/``_Crop_Size``/``_is_control`` -> their lower-case index names,
any other ``Metadata_X`` -> ``X`` (case kept; :func:`~plate_concepts.plates.platemap.resolve_column`
finds it under either name later). The well column is required; the other index columns default
when absent: ``plate`` = the file's stem (or ``plate=``), ``field``, ``crop_y``, ``crop_x``,
``crop_size`` = 0. Which columns were renamed or defaulted is kept in the store's provenance, so
:func:`~plate_concepts.embeddings.profiles.export_profiles` writes the table back with its
original names.

Features are, by default, every numeric column not starting with ``Metadata_``; the tables must
share them (``features_join="inner"`` keeps the common ones). A feature column with a text cell
is an error naming the cell; so is a NaN or infinite feature value, unless ``drop_na`` drops the
columns or rows holding them (what was dropped is recorded in the provenance). Tables are
streamed in row blocks, never read whole; the store is built beside its destination and renamed
into place at the end, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from plate_concepts._io import atomic_path
from plate_concepts.embeddings.store import (
    EmbeddingStore,
    canonical_wells,
    check_replaceable,
    default_chunk_rows,
)
from plate_concepts.plates.platemap import METADATA_ALIASES, METADATA_PREFIX

_DEFAULTED = ("field", "crop_y", "crop_x", "crop_size")
_BLOCK_BYTES = 64 * 2**20
_SAMPLE_ROWS = 1000
FEATURE_JOINS = ("exact", "inner")
DROP_NA = ("columns", "rows")


@dataclass
class ProfileTable:
    """One profile table, from its header (and a sample of rows): what import reads of it."""

    path: Path
    kind: str
    features: list[str]
    metadata: list[str]
    renames: dict[str, str]  # Metadata_* -> obs name
    source_names: dict[str, str]  # obs name -> Metadata_*
    default_plate: str

    @classmethod
    def scan(cls, path: Path, pattern: str | None, plate: str | None) -> ProfileTable:
        if not path.is_file():
            raise FileNotFoundError(f"profile table {path} does not exist")
        kind = table_kind(path)
        try:
            columns, numeric = _columns_and_numeric(path, kind)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, pa.ArrowException, UnicodeDecodeError) as error:
            raise ValueError(f"profile table {path} cannot be read as a {kind} table: {error}") from None
        metadata = [c for c in columns if c.startswith(METADATA_PREFIX)]
        renames, source_names = metadata_renames(metadata, path)
        if "well" not in renames.values():
            raise ValueError(
                f"profile table {path} has no Metadata_Well column; every row needs a well"
            )
        features = _select_features(path, kind, columns, numeric, pattern)
        return cls(path, kind, features, metadata, renames, source_names, plate or path.stem)

    def blocks(self, columns: list[str], block_rows: int) -> Iterator[pd.DataFrame]:
        yield from table_blocks(self.path, self.kind, columns, block_rows)


def import_profiles(
    tables: str | os.PathLike | Sequence[str | os.PathLike],
    store_path: str | os.PathLike,
    features: str | None = None,
    overwrite: bool = False,
    *,
    plate: str | None = None,
    dtype: str = "float32",
    block_rows: int | None = None,
    features_join: str = "exact",
    drop_na: str | None = None,
) -> EmbeddingStore:
    """Import profile tables (one per plate; a path or a list) into a new store.

    ``features`` is a regex (``re.search``) picking feature columns among the non-``Metadata_``
    ones; by default all numeric ones are taken. ``features_join``: ``"exact"`` requires every
    table to have the same features, ``"inner"`` keeps those all tables have. ``drop_na``:
    None (a NaN/inf feature value is an error), ``"columns"`` (features holding one anywhere
    are dropped) or ``"rows"`` (rows holding one are dropped). The provenance records what was
    dropped: ``dropped_features`` (column -> why) and ``dropped_rows`` (table -> count).
    Tables are streamed in blocks of ``block_rows`` rows.
    """
    paths = [Path(tables)] if isinstance(tables, (str, os.PathLike)) else [Path(t) for t in tables]
    if not paths:
        raise ValueError("no profile table to import")
    if features_join not in FEATURE_JOINS:
        raise ValueError(f"features_join must be one of {FEATURE_JOINS}, got {features_join!r}")
    if drop_na not in (None, *DROP_NA):
        raise ValueError(f"drop_na must be None or one of {DROP_NA}, got {drop_na!r}")
    if plate is not None and len(paths) > 1:
        raise ValueError("plate= names the plate of a single table; several tables name theirs")
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"profile table(s) {twice} given twice")
    store_path = Path(store_path)
    check_replaceable(store_path, overwrite, sources=paths)
    scanned = [ProfileTable.scan(path, features, plate) for path in paths]
    names, dropped = aligned_features(scanned, features_join)
    if drop_na == "columns":
        holding = _features_holding_na(scanned, names, block_rows or 65536)
        dropped.update({name: "holds NaN or inf" for name in holding})
        names = [name for name in names if name not in holding]
        if not names:
            raise ValueError(
                f"every feature column holds NaN or inf values in {[str(p) for p in paths]}"
            )

    dim = len(names)
    chunk_rows = default_chunk_rows(dim * np.dtype(dtype).itemsize)
    block_rows = block_rows or default_block_rows(dim, chunk_rows)
    source_names: dict[str, str] = {}
    for table in scanned:
        source_names = {**table.source_names, **source_names}  # the first table's names win
    defaulted = [
        c
        for c in ("plate", *_DEFAULTED)
        if all(c not in table.renames.values() for table in scanned)
    ]
    provenance = {
        "source": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths],
        "imported_from": "profiles",
        "feature_names": names,
        "profile_metadata_columns": source_names,
        "profile_defaulted_columns": defaulted,
        "dropped_features": dropped,
        "dropped_rows": {},
    }
    dropped_rows: dict[str, int] = {}
    plate_tables: dict[str, Path] = {}
    with atomic_path(store_path, overwrite=True) as tmp:
        store = EmbeddingStore.create(
            tmp, dim=dim, dtype=dtype, chunk_rows=chunk_rows, provenance=provenance
        )
        for table in scanned:
            first_row = 1  # data rows count from 1 in messages, as in a plate map's
            for block in table.blocks(table.metadata + names, block_rows):
                values, keep = feature_block(
                    block,
                    names,
                    first_row,
                    table.path,
                    table.source_names["well"],
                    drop_rows=drop_na == "rows",
                )
                obs = fill_index_defaults(
                    block[table.metadata].rename(columns=table.renames), table.default_plate
                )
                obs["well"] = canonical_wells(
                    obs["well"], f"profile table {table.path} data", first_row
                )
                _check_one_table_per_plate(obs, table.path, plate_tables)
                if keep is not None:
                    dropped_rows[str(table.path)] = dropped_rows.get(str(table.path), 0) + int(
                        (~keep).sum()
                    )
                    values, obs = values[keep], obs[keep]
                store.append(values, obs)
                first_row += len(block)
        store.update_provenance(dropped_rows=dropped_rows)
    return EmbeddingStore.open(store_path)


def aligned_features(tables: list[ProfileTable], join: str) -> tuple[list[str], dict[str, str]]:
    """The features every table has (in the first table's order) and the dropped ones (name ->
    which tables lack it); with ``join="exact"`` a difference is an error naming it."""
    common = [name for name in tables[0].features if all(name in t.features for t in tables[1:])]
    every = list(dict.fromkeys(name for t in tables for name in t.features))
    lacking = {
        name: [str(t.path) for t in tables if name not in t.features]
        for name in every
        if name not in common
    }
    if lacking and join == "exact":
        shown = "; ".join(
            f"{name!r} is missing from {', '.join(where)}"
            for name, where in list(lacking.items())[:5]
        )
        more = f" (and {len(lacking) - 5} more)" if len(lacking) > 5 else ""
        raise ValueError(
            f"the profile tables do not have the same feature columns: {shown}{more}; pass "
            f"--features-join inner (features_join='inner') to keep the {len(common)} they share"
        )
    if not common:
        raise ValueError(
            f"the profile tables share no feature column ({[str(t.path) for t in tables]})"
        )
    return common, {name: f"missing from {', '.join(where)}" for name, where in lacking.items()}


def _features_holding_na(tables: list[ProfileTable], names: list[str], block_rows: int) -> set[str]:
    """The features with a NaN or infinite value in any table (one streaming pass)."""
    holding: set[str] = set()
    for table in tables:
        first_row = 1
        for block in table.blocks(table.metadata + names, block_rows):
            values = _numeric(block, names, first_row, table.path, table.source_names["well"])
            holding.update(np.asarray(names)[~np.isfinite(values).all(axis=0)].tolist())
            first_row += len(block)
    return holding


def _check_one_table_per_plate(
    obs: pd.DataFrame, path: Path, plate_tables: dict[str, Path]
) -> None:
    for name in pd.unique(obs["plate"]):
        first = plate_tables.setdefault(str(name), path)
        if first != path:
            raise ValueError(
                f"plate {name!r} is in two profile tables, {first} and {path}; give each plate "
                "one table (or fix its Metadata_Plate)"
            )


# ---------------------------------------------------------------------- reading tables
def table_kind(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if path.suffix.lower() == ".csv" or suffixes.endswith(
        (".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz")
    ):
        return "csv"
    raise ValueError(f"{path}: expected a .parquet or .csv profile table")


def _columns_and_numeric(path: Path, kind: str) -> tuple[list[str], list[str]]:
    """A table's columns and those holding numbers (CSV: judged on a sample of rows)."""
    if kind == "parquet":
        schema = pq.read_schema(path)
        numeric = [
            name
            for name, field_type in zip(schema.names, schema.types, strict=True)
            if pa.types.is_integer(field_type)
            or pa.types.is_floating(field_type)
            or pa.types.is_decimal(field_type)
        ]
        return list(schema.names), numeric
    sample = pd.read_csv(path, nrows=_SAMPLE_ROWS, dtype=csv_string_columns(path))
    numeric = [c for c in sample.columns if pd.api.types.is_numeric_dtype(sample[c]) and sample[c].dtype != bool]
    return list(sample.columns), numeric


def csv_string_columns(path: Path) -> dict[str, type]:
    """Read plate and well columns of a CSV as text (a numeric barcode keeps its leading zeros)."""
    header = pd.read_csv(path, nrows=0).columns
    return {
        c: str
        for c in header
        if c.startswith(METADATA_PREFIX) and c[len(METADATA_PREFIX) :].lower() in ("plate", "well")
    }


def table_blocks(
    path: Path, kind: str, columns: list[str], block_rows: int
) -> Iterator[pd.DataFrame]:
    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=block_rows, columns=columns):
            yield batch.to_pandas()
    else:
        yield from pd.read_csv(
            path, usecols=columns, dtype=csv_string_columns(path), chunksize=block_rows
        )


def metadata_renames(metadata: list[str], table: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Metadata_* names -> obs names, and the reverse map (obs name -> original name)."""
    renames: dict[str, str] = {}
    for column in metadata:
        bare = column[len(METADATA_PREFIX) :]
        renames[column] = METADATA_ALIASES.get(bare.lower(), bare)
    source: dict[str, str] = {}
    for column, name in renames.items():
        if name in source:
            raise ValueError(
                f"{table}: columns {source[name]!r} and {column!r} both map to obs column {name!r}; drop one"
            )
        source[name] = column
    return renames, source


def fill_index_defaults(obs: pd.DataFrame, default_plate: str) -> pd.DataFrame:
    obs = obs.reset_index(drop=True)
    if "plate" not in obs.columns:
        obs.insert(0, "plate", default_plate)
    for column in _DEFAULTED:
        if column not in obs.columns:
            obs[column] = 0
    return obs


def default_block_rows(dim: int, chunk_rows: int) -> int:
    """About 64 MiB of float32 features per block, a whole number of chunks (no chunk rewrites)."""
    chunks = max(1, _BLOCK_BYTES // (dim * 4 * chunk_rows))
    return chunks * chunk_rows


def _select_features(
    path: Path, kind: str, columns: list[str], numeric: list[str], pattern: str | None
) -> list[str]:
    candidates = [c for c in columns if not c.startswith(METADATA_PREFIX)]
    if pattern is None:
        chosen = [c for c in candidates if c in numeric]
        text = [c for c in candidates if c not in numeric]
        for column in text:  # a number column with a stray text cell is an error, not text
            _check_not_mixed(path, kind, column)
        if text:
            warnings.warn(
                f"{path}: text columns {text} are neither Metadata_ nor features; they are left out",
                stacklevel=3,
            )
    else:
        chosen = [c for c in candidates if re.search(pattern, c)]
        for column in [c for c in chosen if c not in numeric]:
            _check_not_mixed(path, kind, column)
            raise ValueError(
                f"{path}: feature column {column!r} (selected by {pattern!r}) is not numeric"
            )
    if not chosen:
        raise ValueError(
            f"{path}: no feature columns"
            + (
                f" match {pattern!r}"
                if pattern is not None
                else " (no numeric column without the Metadata_ prefix)"
            )
        )
    return chosen


def _check_not_mixed(path: Path, kind: str, column: str) -> None:
    """A column of numbers with a text cell: an error naming the cell (the whole column for
    parquet, the first rows for CSV, whose later cells the import checks block by block)."""
    if kind == "parquet":
        values = pq.read_table(path, columns=[column]).column(0).to_pandas()
    else:
        values = pd.read_csv(path, usecols=[column], nrows=_SAMPLE_ROWS, dtype=str)[column]
    numbers = pd.to_numeric(values, errors="coerce")
    text = numbers.isna() & values.notna()
    if numbers.notna().any() and text.any():
        row = int(np.argmax(text.to_numpy()))
        raise ValueError(
            f"{path}: feature column {column!r} holds text in data row {row + 1} ({values.iloc[row]!r}) "
            "among numbers; fix or empty that cell (an empty cell is a missing value)"
        )


def _numeric(
    block: pd.DataFrame, features: list[str], first_row: int, table: Path, well_column: str
) -> np.ndarray:
    """Feature values as float64 (NaN where missing); a text cell is an error naming it."""
    frame = block[features]
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    text = np.isnan(values) & frame.notna().to_numpy()
    if text.any():
        row, col = (int(i) for i in np.argwhere(text)[0])
        raise ValueError(
            f"{table}: feature {features[col]!r} in data row {first_row + row} (well "
            f"{block[well_column].iloc[row]}) is not numeric ({frame.iat[row, col]!r})"
        )
    return values


def feature_block(
    block: pd.DataFrame,
    features: list[str],
    first_row: int,
    table: Path,
    well_column: str,
    drop_rows: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Feature values as float64 and, with ``drop_rows``, the mask of rows to keep (those
    without NaN/inf); without it a NaN/inf value is an error naming its table row and column."""
    values = _numeric(block, features, first_row, table, well_column)
    finite = np.isfinite(values)
    if drop_rows:
        return values, finite.all(axis=1)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        what = "is empty (NaN)" if np.isnan(values[row, col]) else "is infinite"
        raise ValueError(
            f"{table}: feature {features[col]!r} in data row {first_row + row} (well "
            f"{block[well_column].iloc[row]}) {what}; fill it, or drop such features or rows "
            "with --drop-na columns|rows"
        )
    return values, None
