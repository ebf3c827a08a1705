"""Selectivity of dictionary features for the values of a label column.

For feature f and label value i, with "active" meaning a non-zero code, on one token per image:

- average selectivity = P(f active | label i) - P(f active | label != i)
- max selectivity     = P(f active | label i) - max over j != i of P(f active | label j)

Only counts of (label value, feature) co-activations are kept, gathered from the active entries of
sparse codes, so no tokens x features dense matrix is ever built and batches can be streamed
through :class:`SelectivityAccumulator`. Tokens whose label is missing (NaN / None / pd.NA) are
left out of every probability and counted in ``n_excluded``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from plate_concepts.analysis.metrics import active_pairs
from plate_concepts.dictionary.codes import SparseCodes

Activity = SparseCodes | np.ndarray | torch.Tensor | sparse.sparray | sparse.spmatrix


def label_series(labels: Any, name: str = "label") -> pd.Series:
    """``labels`` (list, array, tensor, Series) as a Series with a 0..n-1 index."""
    if isinstance(labels, pd.Series):
        return labels.reset_index(drop=True)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels, dtype=object) if isinstance(labels, list) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels {name!r} must be one-dimensional, got shape {arr.shape}")
    return pd.Series(arr, name=name)


def _activity_pairs(activity: Activity) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(rows, features) of the distinct active entries, plus the matrix shape (n, n_features)."""
    if isinstance(activity, SparseCodes):
        rows, features = active_pairs(activity)
        return rows, features, len(activity), activity.n_features
    if sparse.issparse(activity):
        csr = sparse.csr_array(activity)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        coo = csr.tocoo()
        return coo.row.astype(np.int64), coo.col.astype(np.int64), *csr.shape
    if isinstance(activity, torch.Tensor):
        activity = activity.detach().cpu().numpy()
    dense = np.asarray(activity)
    if dense.ndim != 2:
        raise ValueError(
            f"activity must be a (n_tokens, n_features) matrix, got shape {dense.shape}"
        )
    rows, features = np.nonzero(dense)
    return rows.astype(np.int64), features.astype(np.int64), *dense.shape


def _sorted_order(values: list[Any]) -> list[int]:
    """Positions of ``values`` in sorted order; insertion order when they do not compare."""
    try:
        return sorted(range(len(values)), key=values.__getitem__)
    except TypeError:
        return list(range(len(values)))


@dataclass
class SelectivityResult:
    """Selectivity of every feature for every value of one label column.

    ``values`` (n_values) are the label values (sorted when comparable); ``counts`` (n_values)
    the labelled tokens per value; ``active_counts``, ``rates`` (= P(f active | value)),
    ``average`` and ``maximum`` are (n_values, n_features).
    """

    label: str
    values: list[Any]
    counts: np.ndarray
    active_counts: np.ndarray
    rates: np.ndarray
    average: np.ndarray
    maximum: np.ndarray
    n_excluded: int = 0

    @property
    def n_features(self) -> int:
        return self.rates.shape[1]

    def _row(self, value: Hashable) -> int:
        for i, v in enumerate(self.values):
            if v == value:
                return i
        shown = ", ".join(map(repr, self.values[:10])) + (", ..." if len(self.values) > 10 else "")
        raise KeyError(f"{value!r} is not a value of label {self.label!r} (values: {shown})")

    def best_features(
        self, value: Hashable, n: int = 10, kind: Literal["max", "average"] = "max"
    ) -> pd.DataFrame:
        """The ``n`` features most selective for ``value``, best first, by ``kind`` selectivity.

        Columns: feature, max_selectivity, average_selectivity, rate (P(active | value)).
        """
        if kind not in ("max", "average"):
            raise ValueError(f"kind must be 'max' or 'average', got {kind!r}")
        row = self._row(value)
        score = self.maximum[row] if kind == "max" else self.average[row]
        order = np.argsort(-score, kind="stable")[:n]
        return pd.DataFrame(
            {
                "feature": order,
                "max_selectivity": self.maximum[row, order],
                "average_selectivity": self.average[row, order],
                "rate": self.rates[row, order],
            }
        )

    def summary(self, thresholds: Sequence[float] = (0.5, 0.2)) -> dict[str, Any]:
        """The publication's per-column summary.

        ``best_max_selectivity``: {value: max selectivity of the best feature for that value}.
        ``n_avg_above_<t>``: the number of *features* whose average selectivity exceeds t (strictly)
        for at least one value; a feature selective for two values counts once.
        """
        out: dict[str, Any] = {
            "label": self.label,
            "n_values": len(self.values),
            "n_tokens": int(self.counts.sum()),
            "n_excluded": self.n_excluded,
            "best_max_selectivity": {
                v: float(best) for v, best in zip(self.values, self.maximum.max(axis=1))
            },
        }
        best_average = self.average.max(axis=0)
        for t in thresholds:
            out[f"n_avg_above_{t:g}"] = int((best_average > t).sum())
        return out

    def feature_table(self) -> pd.DataFrame:
        """One row per feature: its best value by max selectivity and its selectivities there.

        Columns: feature, best_value, max_selectivity, average_selectivity, rate
        (P(active | best value)) and frequency (fraction of labelled tokens where it is active).
        A feature that is never active gets selectivity 0 for the first value.
        """
        best = self.maximum.argmax(axis=0)
        features = np.arange(self.n_features)
        return pd.DataFrame(
            {
                "feature": features,
                "best_value": np.array(self.values, dtype=object)[best],
                "max_selectivity": self.maximum[best, features],
                "average_selectivity": self.average[best, features],
                "rate": self.rates[best, features],
                "frequency": self.active_counts.sum(axis=0) / self.counts.sum(),
            }
        )


class SelectivityAccumulator:
    """Counts of tokens per label value and of active features per label value, over batches."""

    def __init__(self, n_features: int, label: str = "label") -> None:
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_features = n_features
        self.label = label
        self.n_excluded = 0
        self._values: list[Any] = []
        self._row_of: dict[Any, int] = {}
        self._counts = np.zeros(0, dtype=np.int64)
        self._active = np.zeros((0, n_features), dtype=np.int64)

    @classmethod
    def from_counts(
        cls, label: str, values: Sequence[Any], counts: np.ndarray, active: np.ndarray, n_excluded: int = 0
    ) -> SelectivityAccumulator:
        """An accumulator holding counts gathered elsewhere (e.g. an activation pass):
        tokens per value ``counts`` (V,) and active tokens per value and feature ``active`` (V, M)."""
        active = np.asarray(active, dtype=np.int64)
        acc = cls(active.shape[1], label=label)
        acc._values = list(values)
        acc._row_of = {value: i for i, value in enumerate(acc._values)}
        acc._counts = np.asarray(counts, dtype=np.int64).copy()
        acc._active = active.copy()
        acc.n_excluded = int(n_excluded)
        return acc

    def update(self, codes_or_active: Activity, labels: Any) -> None:
        """Add a batch: SparseCodes or an (n, n_features) activity matrix, and n labels."""
        rows, features, n_rows, n_features = _activity_pairs(codes_or_active)
        if n_features != self.n_features:
            raise ValueError(
                f"batch has {n_features} features, this accumulator counts {self.n_features}"
            )
        series = label_series(labels, self.label)
        if len(series) != n_rows:
            raise ValueError(
                f"label {self.label!r} has {len(series)} entries for {n_rows} tokens"
            )
        token_rows = self._value_rows(series)  # -1 where the label is missing
        labelled = token_rows >= 0
        self.n_excluded += int((~labelled).sum())
        n_values = len(self._values)
        self._counts += np.bincount(token_rows[labelled], minlength=n_values)

        pair_rows = token_rows[rows]
        keep = pair_rows >= 0
        keys, n = np.unique(pair_rows[keep] * self.n_features + features[keep], return_counts=True)
        self._active.reshape(-1)[keys] += n  # keys are unique, so fancy += is safe

    def _value_rows(self, series: pd.Series) -> np.ndarray:
        """Row of each token's label value (new values get new rows); -1 for missing labels."""
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        batch_to_row = np.empty(len(uniques), dtype=np.int64)
        for i, value in enumerate(np.asarray(uniques, dtype=object).tolist()):
            if value not in self._row_of:
                self._row_of[value] = len(self._values)
                self._values.append(value)
            batch_to_row[i] = self._row_of[value]
        n_new = len(self._values) - len(self._counts)
        if n_new:
            self._counts = np.concatenate([self._counts, np.zeros(n_new, dtype=np.int64)])
            self._active = np.vstack(
                [self._active, np.zeros((n_new, self.n_features), dtype=np.int64)]
            )
        return np.where(codes >= 0, batch_to_row[np.maximum(codes, 0)], -1)

    def rates(self) -> tuple[list[Any], np.ndarray]:
        """(values, P(active | value) as (n_values, n_features)), values sorted when comparable."""
        order = _sorted_order(self._values)
        return [self._values[i] for i in order], self._active[order] / self._counts[order, None]

    def result(self) -> SelectivityResult:
        """Average and max selectivity; needs at least two label values."""
        order = _sorted_order(self._values)
        values = [self._values[i] for i in order]
        if len(values) < 2:
            raise ValueError(
                f"label {self.label!r} has {len(values)} distinct value(s) {values} among "
                f"{int(self._counts.sum())} labelled tokens; selectivity needs at least 2 values"
            )
        counts = self._counts[order]
        active = self._active[order]
        rates = active / counts[:, None]
        # P(active | label != i) pools the tokens of all other values.
        rest_rates = (active.sum(axis=0) - active) / (counts.sum() - counts)[:, None]
        average = rates - rest_rates
        # max over j != i: the column maximum, or the runner-up on the row that holds the maximum.
        top_row = rates.argmax(axis=0)
        columns = np.arange(self.n_features)
        top = rates[top_row, columns]
        without_top = rates.copy()
        without_top[top_row, columns] = -np.inf
        runner_up = without_top.max(axis=0)
        other_max = np.where(np.arange(len(values))[:, None] == top_row, runner_up, top)
        return SelectivityResult(
            label=self.label,
            values=values,
            counts=counts,
            active_counts=active,
            rates=rates,
            average=average,
            maximum=rates - other_max,
            n_excluded=self.n_excluded,
        )


def _n_features_of(activity: Activity) -> int:
    return activity.n_features if isinstance(activity, SparseCodes) else int(activity.shape[1])


def activation_rates(codes_or_active: Activity, labels: Any) -> tuple[list[Any], np.ndarray]:
    """(label values, P(feature active | value) (n_values, n_features)); missing labels dropped."""
    acc = SelectivityAccumulator(_n_features_of(codes_or_active))
    acc.update(codes_or_active, labels)
    return acc.rates()


def selectivity(
    codes_or_active: Activity, labels: Any, *, label: str | None = None
) -> SelectivityResult:
    """Selectivity of every feature for every value of ``labels`` (one token per image).

    ``label`` names the column in messages and results (default: the Series name or "label").
    """
    if label is None:
        label = str(labels.name) if isinstance(labels, pd.Series) and labels.name else "label"
    acc = SelectivityAccumulator(_n_features_of(codes_or_active), label=label)
    acc.update(codes_or_active, labels)
    return acc.result()


def mean_pool_by_group(x: np.ndarray | torch.Tensor, groups: Any) -> tuple[Any, np.ndarray]:
    """Average the rows of ``x`` (n, d) per group, e.g. crop tokens to one token per image.

    ``groups`` is one key per row (array-like) or a DataFrame of key columns (e.g. plate, well,
    field). Returns (keys, pooled): keys as a list, or a DataFrame for DataFrame input, in sorted
    order, and pooled (n_groups, d).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be (n_rows, dim), got shape {x.shape}")
    frame = groups if isinstance(groups, pd.DataFrame) else label_series(groups, "group").to_frame()
    if len(frame) != len(x):
        raise ValueError(f"{len(frame)} group keys for {len(x)} rows")
    missing = frame.isna().any(axis=1)
    if missing.any():
        raise ValueError(
            f"group keys are missing for {int(missing.sum())} rows "
            f"(first row {int(np.argmax(missing))})"
        )
    grouped = frame.reset_index(drop=True).groupby(list(frame.columns), sort=True)
    group_of_row = grouped.ngroup().to_numpy()
    n_groups = int(grouped.ngroups)
    # Sparse (n_groups x n) indicator product: one pass over x, no per-group Python loop.
    indicator = sparse.csr_array(
        (np.ones(len(x)), (group_of_row, np.arange(len(x)))), shape=(n_groups, len(x))
    )
    sizes = np.bincount(group_of_row, minlength=n_groups)
    pooled = (indicator @ x.astype(np.float64, copy=False)) / sizes[:, None]
    keys_frame = grouped.size().index.to_frame(index=False)
    keys = keys_frame if isinstance(groups, pd.DataFrame) else keys_frame.iloc[:, 0].tolist()
    return keys, pooled.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)
