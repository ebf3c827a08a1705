"""The per-token index of an embedding store (its ``obs`` table): validation, and the per-plate
summaries (tokens per well, controls, label value counts) the store keeps beside it, so that
describing a store of any size never scans its rows.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from plate_concepts.plates.geometry import canonical_well
from plate_concepts.plates.platemap import as_text

INDEX_COLUMNS = ("plate", "well", "field", "crop_y", "crop_x", "crop_size")
#: The columns that identify one crop; used to resume an interrupted embedding run.
KEY_COLUMNS = ("plate", "well", "field", "crop_y", "crop_x")
#: The obs columns of a token of one segmented object (:mod:`~plate_concepts.embeddings.objects`);
#: ``field_objects`` counts the objects of its field (a resumed run knows a field is done).
OBJECT_COLUMNS = ("object_label", "object_y", "object_x", "object_area", "field_objects")
#: Columns that are neither index nor label: not counted in the label summaries.
NOT_LABELS = (*INDEX_COLUMNS, *OBJECT_COLUMNS, "is_control", "foreground_fraction", "obs_name")
#: Distinct values of a label column counted per plate; a column with more is a measurement or
#: an identifier, and its summary keeps only the number of missing values.
MAX_SUMMARY_VALUES = 512
#: The same limit for the whole store's label counts (what ``info`` lists).
MAX_STORE_VALUES = 10_000
_INTEGER_COLUMNS = ("field", "crop_y", "crop_x", "crop_size")


# ---------------------------------------------------------------------- validation
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


def plate_runs(plates: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive equal values."""
    if len(plates) == 0:
        return []
    change = np.flatnonzero(plates[1:] != plates[:-1]) + 1
    return list(itertools.pairwise([0, *change.tolist(), len(plates)]))


# ---------------------------------------------------------------------- per-plate summaries
def summarise(obs: pd.DataFrame) -> dict[str, Any]:
    """The summary of one plate's obs rows: tokens, tokens per well, control tokens per well
    (None without an ``is_control`` column) and, per label column, its value counts (values
    as text; None when it has more than :data:`MAX_SUMMARY_VALUES` distinct values)."""
    controls = None
    if "is_control" in obs.columns:
        flags = obs["is_control"].fillna(False).astype(bool).to_numpy()
        controls = _counts(obs["well"].to_numpy()[flags])
    labels = {}
    for column in obs.columns:
        if column in NOT_LABELS:
            continue
        values = obs[column]
        missing = int(values.isna().sum())
        if values.nunique(dropna=True) > MAX_SUMMARY_VALUES:
            labels[column] = {"values": None, "missing": missing}
            continue
        counts: dict[str, int] = {}
        for value, n in values.value_counts(dropna=True).items():
            text = as_text(value)
            counts[text] = counts.get(text, 0) + int(n)
        labels[column] = {"values": counts, "missing": missing}
    return {
        "n_tokens": len(obs),
        "wells": _counts(obs["well"].to_numpy()),
        "controls": controls,
        "labels": labels,
    }


def merge_summaries(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """The summary of the rows of two summaries together."""
    if first is None:
        return second
    controls = None
    if first["controls"] is not None or second["controls"] is not None:
        controls = _add(first["controls"] or {}, second["controls"] or {})
    return {
        "n_tokens": first["n_tokens"] + second["n_tokens"],
        "wells": _add(first["wells"], second["wells"]),
        "controls": controls,
        "labels": merge_labels(first["labels"], second["labels"]),
    }


def merge_labels(
    first: dict[str, Any], second: dict[str, Any], limit: int = MAX_SUMMARY_VALUES
) -> dict[str, Any]:
    """Label value counts of two summaries together (a column with more than ``limit`` values
    keeps only its missing count)."""
    labels = dict(first)
    for column, counts in second.items():
        before = labels.get(column)
        if before is None:
            labels[column] = counts
            continue
        values = None
        if before["values"] is not None and counts["values"] is not None:
            values = _add(before["values"], counts["values"])
            if len(values) > limit:
                values = None
        labels[column] = {"values": values, "missing": before["missing"] + counts["missing"]}
    return labels


def _counts(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values.astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    total = dict(a)
    for key, n in b.items():
        total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def label_overview(labels: dict[str, Any], max_values: int) -> dict[str, dict[str, Any]]:
    """Per label column: its number of distinct values (None when too many to count), its
    ``max_values`` most frequent values with their token counts, and its missing values."""
    overview = {}
    for column, counts in labels.items():
        values = counts["values"]
        ranked = (
            [] if values is None else sorted(values.items(), key=lambda item: (-item[1], item[0]))
        )
        overview[column] = {
            "n_values": None if values is None else len(ranked),
            "values": dict(ranked[:max_values]),
            "missing": counts["missing"],
        }
    return overview
