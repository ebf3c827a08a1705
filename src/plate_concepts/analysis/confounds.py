"""Confound flags: which features follow the plate, the batch, the well's position, the field or
the crop's foreground rather than the biology the labels describe.

The statistic is the **variance fraction** a factor explains, adjusted for its number of groups
(epsilon squared, ε² = (SS_between - (k - 1) MS_within) / SS_total, so a factor with many groups
does not explain noise): a factor that explains nothing scores about 0, one that explains all of
the variance 1. Two levels, each compared with the labels at the same level:

- **Wells** (the per-well mean activation of the feature, every well of every plate counting
  once): ``plate``; ``batch`` (the ``batch`` column); ``edge`` (outer row or column of the plate
  format the store recorded, vs the inner wells: a 384-well plate imaged in A01-H12 has its
  edge in row A and column 1 only); ``row``
  and ``column`` gradients (the variance fraction of a straight line in the row or column
  number, fitted within each plate). The labels: ε² of each label column's value of the well.
- **Tokens** (the feature's code on every token, variance pooled within plates, from the pass's
  sums and sums of squares per group): ``field`` (the field's number in its well) and
  ``foreground`` (decile of the crop's foreground fraction). The labels: ε² of each label
  column's value of the token.

A feature is **flagged** when its best nuisance explains at least ``min_score`` of its variance
and more than every label does at that level; the flag names the nuisance (``by``) and its
ε² (``score``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd

from plate_concepts.analysis.activation_pass import ActivationPass
from plate_concepts.analysis.pass_stats import FIELD, FOREGROUND, GroupSums
from plate_concepts.plates.geometry import parse_well

WELL_FACTORS = ("plate", "batch", "edge", "row", "column")
TOKEN_FACTORS = (FIELD, FOREGROUND)
#: What each nuisance means, for reports.
FACTOR_TEXT = {
    "plate": "the plate", "batch": "the batch", "edge": "edge vs inner wells",
    "row": "a gradient along the plate's rows", "column": "a gradient along the plate's columns",
    FIELD: "the field's position in its well", FOREGROUND: "the crop's foreground fraction",
}
#: A nuisance must explain at least this variance fraction to flag a feature: a "large" effect
#: by Cohen's convention for (eta) squared variance fractions (0.01 small, 0.06 medium, 0.14 large).
MIN_SCORE = 0.14


@dataclass(frozen=True)
class ConfoundFlag:
    """A feature whose activation follows a nuisance (``by``, with variance fraction ``score``)
    more than any label (the best: ``label``, with ``label_score``; None when no label was
    measured)."""

    feature: int
    by: str
    score: float
    label: str | None
    label_score: float
    batch_column: str | None = None  # the column the batch was read from, when by == "batch"

    def why(self) -> str:
        level = "its code on each token" if self.by in TOKEN_FACTORS else "its per-well mean activation"
        nuisance = FACTOR_TEXT.get(self.by, self.by)
        if self.by == "batch" and self.batch_column and self.batch_column.casefold() != "batch":
            nuisance += f" (column {self.batch_column})"
        text = f"{nuisance} explains {self.score:.0%} of the variance of {level}"
        if self.label is None:
            return text + " (no label measured)"
        return text + f"; the best label, {self.label}, {max(self.label_score, 0.0):.0%}"


@dataclass
class ConfoundScores:
    """Per feature (rows) the ε² of every nuisance (``nuisance``: columns of WELL_FACTORS and
    TOKEN_FACTORS that could be measured) and every label (``labels``: well level,
    ``label_tokens``: token level), and the flagged features."""

    nuisance: pd.DataFrame
    labels: pd.DataFrame
    label_tokens: pd.DataFrame
    flags: dict[int, ConfoundFlag]
    min_score: float
    batch_column: str | None = None


def epsilon_squared(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """ε² of a grouping (one group label per row) for each column of ``values`` (n, M); NaN
    when it cannot be measured (fewer than 2 groups, no row beyond one per group, a constant
    column)."""
    codes, uniques = pd.factorize(pd.Series(groups, dtype=object))
    keep = codes >= 0
    values, codes = np.asarray(values, np.float64)[keep], codes[keep]
    k = len(uniques)
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    sums = np.zeros((k, values.shape[1]))
    np.add.at(sums, codes, values)
    sumsq = np.zeros((k, values.shape[1]))
    np.add.at(sumsq, codes, values * values)
    return _epsilon_squared_of_sums([(counts, sums, sumsq)])


def _epsilon_squared_of_sums(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """ε² pooled within parts (plates): each part's (counts (k,), sums (k, M), sumsq (k, M))
    per group; the variance and the groups of each part are taken about the part's own mean."""
    ss_total = ss_between = 0.0
    df_between = df_within = 0
    for counts, sums, sumsq in parts:
        present = counts > 0
        counts, sums, sumsq = counts[present], sums[present], sumsq[present]
        n, k = counts.sum(), len(counts)
        if k == 0:
            continue
        total = sums.sum(axis=0)
        correction = total * total / n
        ss_total = ss_total + sumsq.sum(axis=0) - correction
        ss_between = ss_between + (sums * sums / counts[:, None]).sum(axis=0) - correction
        df_between += k - 1
        df_within += int(n) - k
    if df_between < 1 or df_within < 1:
        return np.full(np.shape(ss_total) or (0,), np.nan)
    ss_total = np.maximum(ss_total, 0.0)
    ss_between = np.clip(ss_between, 0.0, ss_total)
    ms_within = (ss_total - ss_between) / df_within
    scale = np.max(ss_total) if np.size(ss_total) else 0.0
    constant = ss_total <= 1e-12 * max(scale, 1e-300)
    out = np.divide(ss_between - df_between * ms_within, ss_total, out=np.zeros_like(ss_total), where=~constant)
    return np.where(constant, np.nan, out)


def gradient_fraction(values: np.ndarray, position: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Variance fraction (adjusted, as ε² with one slope) of a straight line in ``position``
    fitted within each plate (values and positions centred per plate), for each column of
    ``values`` (n, M); NaN where it cannot be measured."""
    values = np.asarray(values, np.float64)
    position = np.asarray(position, np.float64)
    centred_y = values.copy()
    centred_x = position.copy()
    for plate in pd.unique(plates):
        on = plates == plate
        centred_y[on] -= centred_y[on].mean(axis=0)
        centred_x[on] -= centred_x[on].mean()
    sxx = float(centred_x @ centred_x)
    n = len(values)
    ss_total = ((values - values.mean(axis=0)) ** 2).sum(axis=0)
    if sxx == 0 or n < 3:
        return np.full(values.shape[1], np.nan)
    ss_line = (centred_x @ centred_y) ** 2 / sxx
    ms_residual = np.maximum(ss_total - ss_line, 0.0) / (n - 2)
    constant = ss_total <= 1e-12 * max(float(ss_total.max(initial=0.0)), 1e-300)
    out = np.divide(ss_line - ms_residual, ss_total, out=np.zeros_like(ss_total), where=~constant)
    return np.where(constant, np.nan, out)


@dataclass
class WellTable:
    """Every well of every plate of a pass: ``meta`` (plate, well, row, column, edge, n_tokens
    and the majority value of each label column) and ``mean`` (W, M) its mean activations."""

    meta: pd.DataFrame
    mean: np.ndarray


def well_table(activation_pass: ActivationPass, columns: Sequence[str] = ()) -> WellTable:
    """The :class:`WellTable` of a pass, with the label ``columns`` (of the pass) per well."""
    missing = [c for c in columns if c not in activation_pass.label_columns]
    if missing:
        raise ValueError(
            f"the activation pass has no statistics for column(s) {missing} (it has: "
            f"{', '.join(activation_pass.label_columns) or 'none'}); run encode with --label for them"
        )
    metas, means = [], []
    for plate in activation_pass.plates:
        stats = activation_pass.plate(plate)
        wells = stats.wells
        keep = wells.counts > 0
        names = [w for w, k in zip(wells.keys, keep, strict=True) if k]
        positions = [parse_well(str(w)) for w in names]
        layout = activation_pass.plate_format(plate)
        meta = pd.DataFrame({
            "plate": plate, "well": names,
            "row": [r for r, _ in positions], "column": [c for _, c in positions],
            "n_tokens": wells.counts[keep],
        })
        meta["edge"] = (
            (meta["row"] == 0) | (meta["row"] == layout.n_rows - 1)
            | (meta["column"] == 0) | (meta["column"] == layout.n_columns - 1)
        )
        for column in columns:
            meta[column] = meta["well"].map(_majority_value(stats.label_wells(column)))
        metas.append(meta)
        means.append(wells.sums[keep] / wells.counts[keep][:, None])
    return WellTable(pd.concat(metas, ignore_index=True), np.concatenate(means))


def _majority_value(sums: GroupSums) -> dict[Any, Any]:
    """well -> the value of most of its tokens, from sums keyed by (well, value)."""
    best: dict[Any, tuple[int, Any]] = {}
    for (well, value), count in zip(sums.keys, sums.counts, strict=True):
        if count > best.get(well, (0, None))[0]:
            best[well] = (int(count), value)
    return {well: value for well, (_, value) in best.items()}


def confound_scores(
    activation_pass: ActivationPass,
    labels: Sequence[str] | None = None,
    batch: str | None = None,
    *,
    min_score: float = MIN_SCORE,
) -> ConfoundScores:
    """Score every feature of a pass against each nuisance and label (see the module
    docstring) and flag the confounded ones. ``labels`` default to the pass's label columns
    other than ``batch``; ``batch`` must be a label column of the pass."""
    if isinstance(min_score, bool) or not isinstance(min_score, Real) or not 0 <= min_score <= 1:
        raise ValueError(f"min_score (--min-score) is a variance fraction: a number from 0 to 1, got {min_score!r}")
    if batch is not None and batch not in activation_pass.label_columns:
        raise ValueError(
            f"the activation pass has no statistics for the batch column {batch!r} (it has: "
            f"{', '.join(activation_pass.label_columns) or 'none'}); run encode with --label {batch}"
        )
    labels = [c for c in (activation_pass.label_columns if labels is None else labels) if c != batch]
    table = well_table(activation_pass, [*labels, *([batch] if batch else [])])
    meta, mean = table.meta, table.mean
    M = activation_pass.n_features
    nuisance: dict[str, np.ndarray] = {}
    if meta["plate"].nunique() > 1:
        nuisance["plate"] = epsilon_squared(mean, meta["plate"].to_numpy())
    if batch is not None:
        if meta[batch].nunique() < 2:
            values = list(pd.unique(meta[batch].dropna()))
            warnings.warn(
                f"the batch column {batch!r} has {'one value, ' + repr(values[0]) if values else 'no value'} "
                "over the wells: no feature can follow it, so none is flagged by batch",
                UserWarning, stacklevel=2,
            )
        nuisance["batch"] = epsilon_squared(mean, meta[batch].to_numpy())
    if meta["edge"].nunique() > 1:
        nuisance["edge"] = epsilon_squared(mean, meta["edge"].to_numpy())
    for axis in ("row", "column"):
        nuisance[axis] = gradient_fraction(mean, meta[axis].to_numpy(), meta["plate"].to_numpy())
    for factor in TOKEN_FACTORS:
        parts = _token_parts(activation_pass, lambda stats, f=factor: stats.groups.get(f))
        if parts:
            nuisance[factor] = _epsilon_squared_of_sums(parts)
    label_wells = {c: epsilon_squared(mean, meta[c].to_numpy()) for c in labels}
    label_tokens = {
        c: _epsilon_squared_of_sums(_token_parts(
            activation_pass, lambda stats, c=c: stats.label_wells(c).regroup(lambda key: key[1])))
        for c in labels
    }
    def frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:  # only what could be measured
        measured = {k: v for k, v in columns.items() if np.size(v) and not np.all(np.isnan(v))}
        return pd.DataFrame(measured, index=pd.RangeIndex(M, name="feature"))

    scores = ConfoundScores(frame(nuisance), frame(label_wells), frame(label_tokens), {}, min_score, batch)
    scores.flags = _flags(scores)
    return scores


def _token_parts(activation_pass: ActivationPass, grouping: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per plate the (counts, sums, sumsq) of a grouping of its tokens; empty when a plate
    lacks it or its squares (a pass written before they were kept)."""
    parts = []
    for plate in activation_pass.plates:
        sums = grouping(activation_pass.plate(plate))
        if sums is None or sums.sumsq is None:
            return []
        parts.append((sums.counts.astype(np.float64), sums.sums, sums.sumsq))
    return parts


def _flags(scores: ConfoundScores) -> dict[int, ConfoundFlag]:
    flags: dict[int, ConfoundFlag] = {}
    levels = (
        ([f for f in WELL_FACTORS if f in scores.nuisance], scores.labels),
        ([f for f in TOKEN_FACTORS if f in scores.nuisance], scores.label_tokens),
    )
    for factors, label_scores in levels:
        if not factors:
            continue
        nuisance = scores.nuisance[factors].to_numpy()
        labels = label_scores.to_numpy() if label_scores.shape[1] else np.full((len(nuisance), 1), np.nan)
        for feature in range(len(nuisance)):
            row = nuisance[feature]
            if np.all(np.isnan(row)):
                continue
            best = int(np.nanargmax(row))
            score = float(row[best])
            label_row = labels[feature]
            has_label = not np.all(np.isnan(label_row))
            label_best = int(np.nanargmax(label_row)) if has_label else -1
            label_score = float(label_row[label_best]) if has_label else float("nan")
            if score < scores.min_score or (has_label and score <= label_score):
                continue
            if feature in flags and flags[feature].score >= score:
                continue
            flags[feature] = ConfoundFlag(
                feature, factors[best], score,
                str(label_scores.columns[label_best]) if has_label else None, label_score,
                scores.batch_column if factors[best] == "batch" else None,
            )
    return dict(sorted(flags.items()))
