"""Plate maps: per-well metadata tables (CSV, TSV or parquet), joined to plates on the well.

A plate map has one row per well. Its well may be spelled in one column (``B7``, ``B07``,
``r02c07``) or split into a row and a column (``B``/``2`` and ``7``); whatever the spelling,
:func:`read_platemap` indexes the table by the canonical well name (``B07``), in an index named
``well``, and keeps every original column.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from plate_concepts.plates.geometry import PlateFormat, canonical_well, parse_well, well_name
from plate_concepts.plates.model import Plate

WELL_INDEX_NAME = "well"
"""Name of the canonical-well index of every normalised plate map."""

WELL_COLUMN_NAMES = (
    "well",
    "well_position",
    "Metadata_Well",
    "Metadata_well_position",
    "WellName",
    "Well",
)
"""Single well columns, in order of preference (matched case-insensitively)."""

ROW_COLUMN_PAIRS = (
    ("row", "column"),
    ("row", "col"),
    ("WellRow", "WellCol"),
    ("Metadata_Row", "Metadata_Col"),
    ("Metadata_Row", "Metadata_Column"),
)
"""(row, column) column pairs, used when no single well column exists."""

_POSITION_NAMES = {name.lower() for name in WELL_COLUMN_NAMES} | {
    name.lower() for pair in ROW_COLUMN_PAIRS for name in pair
}

METADATA_PREFIX = "Metadata_"
"""The prefix of metadata columns in pycytominer/JUMP tables (dropped when imported)."""

METADATA_ALIASES = {
    "plate": "plate",
    "well": "well",
    "site": "field",
    "field": "field",
    "crop_y": "crop_y",
    "crop_x": "crop_x",
    "crop_size": "crop_size",
    "is_control": "is_control",
}
"""``Metadata_`` names (lower case, without the prefix) that an imported table stores under an
index column of the embedding store (``Metadata_Site`` -> ``field``)."""


def resolve_column(name: str, columns: Iterable[object], what: str = "column") -> str:
    """The column among ``columns`` that ``name`` means: the same name; else the name as it
    reads after an import dropped (or another tool kept) the ``Metadata_`` prefix
    (``Metadata_cell_line`` <-> ``cell_line``, ``Metadata_Site`` -> ``field``); else the one
    column equal to it ignoring case. A ``ValueError`` lists the columns when none (or several)
    match. The one rule wherever a user names a column of a plate map, a profile table or a
    store (control specs, labels, batch columns).
    """
    names = [str(c) for c in columns]
    if name in names:
        return name
    bare = (
        name[len(METADATA_PREFIX) :] if name.lower().startswith(METADATA_PREFIX.lower()) else None
    )
    spellings = [METADATA_PREFIX + name]
    if bare is not None:
        spellings = [bare, METADATA_ALIASES.get(bare.lower(), bare)]
    for spelling in spellings:
        if spelling in names:
            return spelling
    for spelling in [name, *spellings]:
        matches = [n for n in names if n.lower() == spelling.lower()]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(f"{what} {name!r} not found; available columns: {names}")


def as_text(value: object) -> str:
    """A table cell as text, so that 1, 1.0 and '1' all read '1' (missing values read '')."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):  # type: ignore[arg-type]
        return ""
    if (
        isinstance(value, (float, np.floating))
        and math.isfinite(value)
        and float(value).is_integer()
    ):
        return str(int(value))
    return str(value).strip()


def find_well_columns(table: pd.DataFrame, source: str = "table") -> str | tuple[str, str]:
    """The column holding the well, or the (row, column) pair of columns, of a table.

    Names are matched case-insensitively against :data:`WELL_COLUMN_NAMES`, then
    :data:`ROW_COLUMN_PAIRS`; the first match wins.
    """
    by_lower = {str(c).lower(): c for c in table.columns}
    for name in WELL_COLUMN_NAMES:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    for row_name, column_name in ROW_COLUMN_PAIRS:
        if row_name.lower() in by_lower and column_name.lower() in by_lower:
            return by_lower[row_name.lower()], by_lower[column_name.lower()]
    raise ValueError(
        f"{source}: no well column found among the columns {list(table.columns)}; expected one "
        f"of {list(WELL_COLUMN_NAMES)} (any case), or a row + column pair such as "
        f"{[f'{r}/{c}' for r, c in ROW_COLUMN_PAIRS]}"
    )


def wells_from_table(
    table: pd.DataFrame, well_column: str | tuple[str, str] | None = None, source: str = "table"
) -> pd.Series:
    """Canonical well name of every row of a table (same index as ``table``).

    ``well_column`` names the well column or a (row, column) pair; ``None`` detects it with
    :func:`find_well_columns`. Rows may be letters (``B``) or 1-based numbers (``2``).
    """
    if well_column is None:
        well_column = find_well_columns(table, source)
    used = [well_column] if isinstance(well_column, str) else list(well_column)
    for name in used:
        if name not in table.columns:
            raise ValueError(
                f"{source}: well column {name!r} not found; the columns are {list(table.columns)}"
            )
    wells = []
    for number, (_, record) in enumerate(table[used].iterrows(), start=1):
        values = [as_text(record[name]) for name in used]
        if len(values) == 1:
            text = values[0]
        elif values[0].isdigit():  # numeric row: 2 -> B
            text = f"r{values[0]}c{values[1]}"
        else:
            text = f"{values[0]}{values[1]}"
        try:
            wells.append(canonical_well(text))
        except ValueError:
            shown = ", ".join(f"{n}={v!r}" for n, v in zip(used, values, strict=True))
            raise ValueError(
                f"{source}: data row {number} has {shown}, which is not a well "
                "(expected e.g. 'B7', 'B07', 'r02c07', or a row letter/number and a column number)"
            ) from None
    return pd.Series(wells, index=table.index, name=WELL_INDEX_NAME, dtype=object)


def normalize_platemap(
    table: pd.DataFrame, well_column: str | tuple[str, str] | None = None, source: str = "plate map"
) -> pd.DataFrame:
    """Index a plate-map table by canonical well name, keeping all its columns.

    Without ``well_column`` the well column(s) are detected (see :func:`find_well_columns`); a
    table with none but an index of well names (e.g. one from :func:`read_platemap` whose index
    has been kept) uses its index.
    """
    if well_column is None and _index_holds_wells(table.index):
        try:
            well_column = find_well_columns(table, source)
        except ValueError:
            well_column = None
    if well_column is None and _index_holds_wells(table.index):
        wells = pd.Series([canonical_well(w) for w in table.index], index=table.index)
    else:
        wells = wells_from_table(table, well_column, source)
    duplicated = sorted(set(wells[wells.duplicated(keep=False)]), key=parse_well)
    if duplicated:
        raise ValueError(
            f"{source}: wells appear more than once: {duplicated}; a plate map needs one row "
            "per well"
        )
    result = table.copy()
    result.index = pd.Index(wells.to_list(), name=WELL_INDEX_NAME)
    return result


def _index_holds_wells(index: pd.Index) -> bool:
    if len(index) == 0 or pd.api.types.is_numeric_dtype(index):
        return False
    try:
        for value in index:
            parse_well(str(value))
    except ValueError:
        return False
    return True


def read_platemap(
    path: str | Path, well_column: str | tuple[str, str] | None = None
) -> pd.DataFrame:
    """Read a plate map (CSV, TSV or parquet, by extension) indexed by canonical well name.

    Parameters
    ----------
    path
        ``.csv``, ``.tsv``/``.tab``/``.txt`` (tab-separated) or ``.parquet``/``.pq``; a ``.gz``
        etc. compression suffix after CSV/TSV is fine.
    well_column
        The column holding the well, or a (row column, column column) pair; ``None`` detects it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plate map {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".gz", ".bz2", ".xz", ".zst", ".zip"}:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in {".csv", ".tsv", ".tab", ".txt", ".parquet", ".pq"}:
        raise ValueError(
            f"plate map {path}: unknown file type {path.suffix!r}; expected .csv, .tsv or .parquet"
        )
    try:
        if kind == ".csv":
            table = pd.read_csv(path)
            if table.shape[1] == 1 and ";" in str(table.columns[0]):  # Excel's, where 0,5 is a number
                table = pd.read_csv(path, sep=";", decimal=",")
        elif kind in {".parquet", ".pq"}:
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t")
    except (ValueError, OSError) as error:  # empty, cut short, not this format (pandas, pyarrow)
        raise ValueError(f"plate map {path} cannot be read as a {kind.lstrip('.')} table: {error}") from None
    return normalize_platemap(table, well_column, source=f"plate map {path}")


def attach_platemap(plate: Plate, platemap: pd.DataFrame | str | Path) -> Plate:
    """Set ``plate.platemap`` to the plate map's rows for the plate's wells; returns the plate.

    Wells of the plate missing from the map get all-NaN rows (with a warning naming them); a
    well of the map that is not on the plate (``Z99``, or ``H13`` on a 96-well plate) is an
    error naming its row.
    """
    if isinstance(platemap, (str, Path)):
        source = f"plate map {platemap}"
        table = read_platemap(platemap)
    else:
        source = "the plate map"
        table = normalize_platemap(platemap)
    _check_wells_exist(table.index, source)
    wells = plate.wells
    missing = [w for w in wells if w not in table.index]
    if len(missing) == len(wells):
        raise ValueError(
            f"the plate map matches no well of plate {plate.name!r}: the plate has wells {wells}, "
            f"the map has e.g. {list(table.index[:8])} ({len(table)} wells)"
        )
    plate.include_wells(table.index, source=f"the plate map of {plate.name!r}")
    _check_wells_exist(table.index, source, plate.plate_format)
    if missing:
        warnings.warn(
            f"plate {plate.name!r}: wells {missing} are not in the plate map; their metadata "
            "is NaN",
            UserWarning,
            stacklevel=2,
        )
    plate.platemap = table.reindex(pd.Index(wells, name=WELL_INDEX_NAME))
    return plate


def _check_wells_exist(
    wells: pd.Index, source: str, plate_format: PlateFormat | None = None
) -> None:
    """Every well of a plate map lies on a standard plate (and on ``plate_format``), else an
    error naming the first that does not and its data row (the map keeps the file's order)."""
    for number, well in enumerate(wells, start=1):
        row, column = parse_well(well)
        if plate_format is None:
            try:
                PlateFormat.smallest_containing([(row, column)])
            except ValueError:
                raise ValueError(
                    f"{source}: data row {number} has well {well!r}, which is on no plate (the "
                    "largest, 1536 wells, ends at AF48)"
                ) from None
        elif not plate_format.contains(row, column):
            last = well_name(plate_format.n_rows - 1, plate_format.n_columns - 1)
            raise ValueError(
                f"{source}: data row {number} has well {well!r}, which is not on this "
                f"{plate_format.n_wells}-well plate (A01..{last}); is it the plate map of "
                "another plate?"
            )


def label_columns(platemap: pd.DataFrame) -> list[str]:
    """Plate-map columns worth using as labels, in table order.

    Rule: a column is a label if it is not a well or position column (a name in
    :data:`WELL_COLUMN_NAMES` or :data:`ROW_COLUMN_PAIRS`, any case, or a column whose values all
    spell the row's own well) and it has more than 1 and fewer than ``len(platemap)`` distinct
    non-missing values: a constant column separates nothing, and one value per well is an
    identifier rather than a label.
    """
    n_wells = len(platemap)
    index_wells = [str(w) for w in platemap.index]
    labels = []
    for name in platemap.columns:
        column = platemap[name]
        if str(name).lower() in _POSITION_NAMES or _spells_wells(column, index_wells):
            continue
        if 1 < column.nunique(dropna=True) < n_wells:
            labels.append(str(name))
    return labels


def _spells_wells(column: pd.Series, index_wells: list[str]) -> bool:
    try:
        return (
            all(
                canonical_well(as_text(v)) == w
                for v, w in zip(column, index_wells, strict=True)
                if as_text(v)
            )
            and column.notna().any()
        )
    except ValueError:
        return False


@dataclass
class ControlSpec:
    """Which wells (or embedding rows) are controls: ``column`` takes one of ``values``."""

    column: str
    values: list[str]

    @classmethod
    def parse(cls, text: str) -> ControlSpec:
        """``"genotype=WT"`` or ``"treatment=DMSO,untreated"`` -> a ControlSpec."""
        column, sep, values_text = text.partition("=")
        values = [v.strip() for v in values_text.split(",") if v.strip()]
        if not sep or not column.strip() or not values:
            raise ValueError(
                f"control spec {text!r} is not 'column=value[,value...]' (e.g. 'genotype=WT')"
            )
        return cls(column.strip(), values)

    def __str__(self) -> str:
        """The spec as typed (``parse`` reads it back); values as compared (1.0 -> "1")."""
        return f"{self.column}={','.join(as_text(v) for v in self.values)}"


def control_mask(table: pd.DataFrame, spec: ControlSpec) -> np.ndarray:
    """Boolean mask of the rows of a plate map or obs table whose ``spec.column`` is a control.

    Values are compared as text (see :func:`as_text`), so 1, 1.0 and '1' match. The column may
    also be the table's index name (e.g. ``well``), and is found by :func:`resolve_column`
    (``Metadata_cell_line`` and ``cell_line`` name the same column).
    """
    if spec.column not in table.columns and table.index.name == spec.column:
        column = table.index.to_series()
    else:
        column = table[resolve_column(spec.column, table.columns, "control column")]
    text = np.array([as_text(v) for v in column], dtype=object)
    wanted = [as_text(v) for v in spec.values]
    mask = np.isin(text, wanted)
    distinct = sorted({t for t in text if t})
    if not mask.any():
        raise ValueError(
            f"no row has {spec.column} in {wanted}; the column's values are {distinct[:30]}"
            + (f" ... ({len(distinct)} in all)" if len(distinct) > 30 else "")
        )
    unmatched = [v for v in wanted if v not in distinct]
    if unmatched:
        warnings.warn(
            f"control values {unmatched} match no row of column {spec.column!r}",
            UserWarning,
            stacklevel=2,
        )
    return mask
