"""Feature statistics for browsing, read from an activation pass: the feature table, selectivity,
per-well values of a plate, activation per label value, and where over a screen each feature
is active. Nothing here touches tokens; every answer is a few array reads of the pass's sums.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from plate_concepts.analysis.activation_pass import ActivationPass
from plate_concepts.analysis.activations import WellAggregates, check_feature
from plate_concepts.analysis.lru import LRU
from plate_concepts.analysis.selectivity import SelectivityResult, _sorted_order

#: Name of the extra row of :meth:`FeatureStatistics.label_value_activation` for control tokens.
CONTROL_GROUP = "controls"


class FeatureStatistics:
    """Store-wide and per-plate feature statistics of one activation pass.

    ``dead_threshold``: a feature is dead when its frequency over the store is below it.
    """

    def __init__(self, activation_pass: ActivationPass, dead_threshold: float = 1e-5, cache_size: int = 64) -> None:
        self.activation_pass = activation_pass
        self.dead_threshold = float(dead_threshold)
        self.n_features = activation_pass.n_features
        self._cache = LRU(cache_size)

    @property
    def label_columns(self) -> list[str]:
        return self.activation_pass.label_columns

    @property
    def plates(self) -> list[str]:
        return self.activation_pass.plates

    @property
    def frequency(self) -> np.ndarray:
        return self.activation_pass.frequency

    def selectivity(self, column: str) -> SelectivityResult:
        return self._cache.get(("selectivity", column), lambda: self.activation_pass.selectivity(column))

    def feature_table(self, column: str | None) -> pd.DataFrame:
        """One row per feature: feature, frequency, dead, mean_activation, best_value (the label
        value it is most selective for), max_selectivity and average_selectivity there; on a
        screen also n_plates (plates where it is active) and top_plate (where it is most
        frequent)."""

        def build() -> pd.DataFrame:
            frequency = self.frequency
            table = pd.DataFrame({
                "feature": np.arange(self.n_features),
                "frequency": frequency,
                "dead": frequency < self.dead_threshold,
                "mean_activation": self.activation_pass.mean_activation,
            })
            if column is None:
                table["best_value"] = None
                table["max_selectivity"] = np.nan
                table["average_selectivity"] = np.nan
            else:
                result = self.selectivity(column).feature_table()
                for name in ("best_value", "max_selectivity", "average_selectivity"):
                    table[name] = result[name].to_numpy()
            if len(self.plates) > 1:
                totals = self.activation_pass.totals
                table["n_plates"] = (totals.plate_active > 0).sum(axis=0)
                table["top_plate"] = np.asarray(self.plates, dtype=object)[self.plate_frequency().to_numpy().argmax(axis=0)]
            return table

        return self._cache.get(("table", column), build).copy()

    def plate_frequency(self) -> pd.DataFrame:
        """(plates x features) fraction of each plate's tokens where each feature is active."""
        return self._cache.get(("plate_frequency",), self.activation_pass.plate_frequency)

    def top_plate(self, feature: int) -> str:
        """The plate where ``feature`` is active on the largest fraction of tokens."""
        feature = check_feature(feature, self.n_features)
        return str(self.plate_frequency().iloc[:, feature].idxmax())

    def well_aggregates(self, plate: str) -> WellAggregates:
        return self._cache.get(("wells", plate), lambda: self.activation_pass.well_aggregates(plate))

    def well_values(self, plate: str, feature: int, kind: Literal["mean", "fraction"] = "mean") -> pd.Series:
        """Per-well mean activation (``"mean"``) or fraction of active tokens (``"fraction"``)
        of ``feature`` on ``plate``, indexed by well (row by row)."""
        feature = check_feature(feature, self.n_features)
        aggregates = self.well_aggregates(plate)
        if kind not in ("mean", "fraction"):
            raise ValueError(f"kind must be 'mean' or 'fraction', got {kind!r}")
        table = aggregates.mean_activation if kind == "mean" else aggregates.fraction_active
        return pd.Series(table[:, feature], index=pd.Index(aggregates.wells, name="well"),
                         name=f"feature {feature} {kind}")

    def top_rows(self, feature: int, n: int, plate: str | None = None) -> list[tuple[int, float]]:
        """(store row, code) of the tokens where ``feature`` is largest, over the store or on one
        plate (at most the pass's ``top_n``)."""
        feature = check_feature(feature, self.n_features)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.activation_pass.top_tokens(feature, n, plate=plate)

    def label_value_activation(self, feature: int, column: str, plate: str | None = None) -> pd.DataFrame:
        """Per value of a label column, over the store: n_tokens, n_control (how many of them
        are control tokens), mean_activation (mean code, inactive = 0) and fraction_active of
        ``feature``; plus a last row ``group == "control"`` (value ``"controls"``) over the
        control tokens, for plotting each value against controls. ``column="well"`` gives the
        wells of ``plate`` against that plate's controls."""
        feature = check_feature(feature, self.n_features)

        def build() -> pd.DataFrame:
            if column == "well":
                stats = self.activation_pass.plate(plate)  # type: ignore[arg-type]
                sums, controls = stats.wells, stats.controls
                control_counts = dict(zip(controls.keys, controls.counts.tolist(), strict=True))
                control_total = controls.regroup(lambda _: CONTROL_GROUP)
            else:
                totals = self.activation_pass.totals
                sums = self.activation_pass.label_sums(column)
                control_counts = totals.control_counts.get(column, {})
                control_total = totals.controls
            order = _sorted_order(list(sums.keys))
            counts = sums.counts[order]
            columns: dict[str, list[Any]] = {
                "value": [sums.keys[i] for i in order],
                "group": ["label"] * len(order),
                "n_tokens": counts.tolist(),
                "n_control": [int(control_counts.get(sums.keys[i], 0)) for i in order],
                "mean_activation": (sums.sums[order, feature] / np.maximum(counts, 1)).tolist(),
                "fraction_active": (sums.active[order, feature] / np.maximum(counts, 1)).tolist(),
            }
            n_control = int(control_total.counts.sum())
            if n_control:
                for name, value in (
                    ("value", CONTROL_GROUP), ("group", "control"), ("n_tokens", n_control),
                    ("n_control", n_control),
                    ("mean_activation", float(control_total.sums[:, feature].sum() / n_control)),
                    ("fraction_active", float(control_total.active[:, feature].sum() / n_control)),
                ):
                    columns[name].append(value)
            return pd.DataFrame(columns)

        key = ("label_values", feature, column, plate if column == "well" else None)
        return self._cache.get(key, build).copy()
