"""Perturbation profiles: what each value of a label column (a compound, a gene knock-out, a cell
line) does to every feature of a dictionary, against the controls of the same plate.

Everything is read from an activation pass (:class:`~plate_concepts.analysis.activation_pass.
ActivationPass`): per-well sums per label value and the control tokens of every well, so a
one-plate store and a screen of hundreds of plates go through the same code.

The unit is the **replicate well**: the tokens of one value in one well of one plate. For each
unit and feature:

- its **mean activation** (mean code over the unit's tokens, inactive = 0);
- its **robust z-score** against the control wells of the same plate, as pycytominer's
  ``robustize_mad`` normalises profiles: ``z = (mean - median) / scale`` where ``median`` is the
  median over the plate's control wells of their per-well mean (control tokens only) and
  ``scale = 1.4826 * MAD`` of those means. A dictionary's features are sparse, so the MAD of a
  feature that is rarely active in controls is often 0; the scale is therefore never taken
  below the standard error that token sampling alone gives a well mean
  (``sd / sqrt(n)``: ``sd`` of the feature over the plate's control tokens, ``n`` the median
  number of tokens of a control well; the plate's labelled tokens stand in when the feature
  never varies on its controls). A feature that is 0 on every token of the plate has z = 0.

**Combined across plates.** A value's z-score for a feature is the mean of its replicate wells'
z-scores, over every plate where it occurs (each well counts once). Each well is first
normalised to its own plate's controls, so plate-to-plate shifts (staining, focus, cell
density) cancel before anything is pooled; the mean (not a sum) keeps z an effect size, so
values with 2 or 20 replicates are ranked on the same scale. **Replicate agreement** is the
fraction of those wells whose own z-score exceeds 2: a feature driven by one outlier well has a
high mean but a low fraction.

**Phenotypic activity** of a whole profile is the mean average precision (mAP) of a value's
replicate wells against the control wells (``copairs``, as in the JUMP Cell Painting
analyses): each replicate well ranks all its replicates and all control wells by the cosine
similarity of their well profiles (the per-well z-scores of every feature), and the average
precision says how far up its replicates come; the mAP is their mean, with a permutation
p-value. Wells of the controls themselves form no profile: they are the reference.

**Max selectivity** sits beside z (see the method's metrics): ``P(active | value) - max over
other values of P(active | other)``, over all the value's tokens. The two answer different
questions and need not agree on the first feature: z ranks how far a feature moves from the
controls *in units of the controls' own spread* (so a feature almost silent on controls ranks
high), max selectivity how exclusively it fires for this value rather than any other. When a
concept is split over several co-active features their max selectivities often tie within
sampling error (about ``sqrt(p (1 - p) / n)``, 0.02 for 640 tokens), and which one z puts first
then varies with the fit's seed. :meth:`ValueProfile.most_selective` says where the most
selective feature ranks by z.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from plate_concepts.analysis.activation_pass import ActivationPass
from plate_concepts.analysis.pass_stats import PlateStats

#: 1.4826 * MAD estimates the standard deviation of a normal distribution (pycytominer's scale).
MAD_SCALE = 1.4826
#: A replicate well "agrees" when its z-score for the feature exceeds this.
REPLICATE_Z = 2.0
#: A well is a control well when at least this fraction of its tokens are control tokens.
CONTROL_WELL_FRACTION = 0.5
#: Fewer control wells on a plate than this give no usable spread between wells (the MAD of
#: one well is 0, of two half their difference): z then rests on the sampling floor; warn.
MIN_CONTROL_WELLS = 3
#: Permutations of the mAP's null distribution (copairs' ``null_size``).
MAP_NULL_SIZE = 10_000
#: copairs matches pairs with duckdb's default connection, which one thread at a time may use
#: (the viewer profiles in one worker while another writes a report).
_COPAIRS = threading.Lock()


def robust_z(values: np.ndarray, controls: np.ndarray, floor: np.ndarray | float = 0.0) -> np.ndarray:
    """Robust z-scores of ``values`` (n, M) against ``controls`` (c, M): ``(values - median) /
    max(1.4826 * MAD, floor)`` per column, 0 where that scale is 0."""
    controls = np.asarray(controls, dtype=np.float64)
    if controls.ndim != 2 or len(controls) == 0:
        raise ValueError(f"robust_z needs at least one control row, got shape {controls.shape}")
    median = np.median(controls, axis=0)
    scale = np.maximum(MAD_SCALE * np.median(np.abs(controls - median), axis=0), floor)
    shifted = np.asarray(values, dtype=np.float64) - median
    return np.divide(shifted, scale, out=np.zeros_like(shifted), where=scale > 0)


@dataclass
class WellProfiles:
    """Per replicate well of a label column: ``meta`` (one row per (plate, well, value): plate,
    well, value, n_tokens, is_control), ``mean`` and ``fraction`` (U, M) the mean activation and
    fraction of active tokens of every feature, ``z`` (U, M) the robust z-score against the
    plate's control wells (NaN on a plate without control wells)."""

    column: str
    meta: pd.DataFrame
    mean: np.ndarray
    fraction: np.ndarray
    z: np.ndarray

    @property
    def n_features(self) -> int:
        return self.mean.shape[1]

    @property
    def plates_with_controls(self) -> list[str]:
        """The plates whose wells have z-scores (the others have no control wells)."""
        usable = ~np.isnan(self.z).any(axis=1) if self.n_features else np.ones(len(self.meta), bool)
        return list(pd.unique(self.meta["plate"][usable]))


def well_profiles(activation_pass: ActivationPass, column: str) -> WellProfiles:
    """The :class:`WellProfiles` of a label column of the pass, plate by plate."""
    _check_column(activation_pass, column)
    metas, means, fractions, zs = [], [], [], []
    without_controls, few_controls = [], []
    for plate in activation_pass.plates:
        stats = activation_pass.plate(plate)
        meta, mean, fraction = _plate_units(stats, column)
        meta.insert(0, "plate", plate)
        controls = _control_means(stats)
        if controls is None:
            without_controls.append(plate)
            z = np.full(mean.shape, np.nan)
        else:
            control_means, floor = controls
            z = robust_z(mean, control_means, floor)
            if len(control_means) < MIN_CONTROL_WELLS:
                few_controls.append(f"{plate} ({len(control_means)})")
        metas.append(meta)
        means.append(mean)
        fractions.append(fraction)
        zs.append(z)
    if len(without_controls) == len(activation_pass.plates):
        if activation_pass.spec.control_column is None:
            raise ValueError(
                "the store marks no control tokens: z-scores need control wells; embed with "
                "--control (e.g. --control treatment=DMSO) to mark them"
            )
        raise ValueError(
            "the activation pass has no control tokens: z-scores need control wells (control "
            f"column of this pass: {activation_pass.spec.control_column!r}, true on no token)"
        )
    if without_controls:
        warnings.warn(
            f"{len(without_controls)} plate(s) have no control wells and are left out of the "
            f"profiles: {_first_few(without_controls)}",
            UserWarning, stacklevel=2,
        )
    if few_controls:
        warnings.warn(
            f"{len(few_controls)} plate(s) have fewer than {MIN_CONTROL_WELLS} control wells: "
            f"{_first_few(few_controls)}, too few to measure "
            "the controls' spread between wells: their z-scores rest mostly on token sampling; read them with care",
            UserWarning, stacklevel=2,
        )
    return WellProfiles(
        column,
        pd.concat(metas, ignore_index=True),
        np.concatenate(means).astype(np.float32),
        np.concatenate(fractions).astype(np.float32),
        np.concatenate(zs).astype(np.float32),
    )


def _check_column(activation_pass: ActivationPass, column: str) -> None:
    if column not in activation_pass.label_columns:
        raise ValueError(
            f"the activation pass has no statistics for label column {column!r} (it has: "
            f"{', '.join(activation_pass.label_columns) or 'none'}); run encode with --label {column}"
        )


def _plate_units(stats: PlateStats, column: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """One plate's (well, value) units: their meta, mean activation and fraction active."""
    sums = stats.label_wells(column)
    keep = sums.counts > 0
    counts = sums.counts[keep]
    keys = [key for key, kept in zip(sums.keys, keep, strict=True) if kept]
    control_counts = dict(zip(stats.controls.keys, stats.controls.counts, strict=True))
    well_counts = dict(zip(stats.wells.keys, stats.wells.counts, strict=True))
    wells = [well for well, _ in keys]
    meta = pd.DataFrame({
        "well": wells,
        "value": [value for _, value in keys],
        "n_tokens": counts,
        "is_control": [
            control_counts.get(well, 0) >= CONTROL_WELL_FRACTION * well_counts[well] for well in wells
        ],
    })
    return meta, sums.sums[keep] / counts[:, None], sums.active[keep] / counts[:, None]


def _first_few(items: Sequence[Any], n: int = 5) -> str:
    """``"a, b, c, d, e, ..."``: the first ``n`` items of a warning's list."""
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


def _control_means(stats: PlateStats) -> tuple[np.ndarray, np.ndarray] | None:
    """The plate's control wells' per-well means (control tokens only) and the z-score scale's
    floor (see the module docstring); None when the plate has no control tokens."""
    controls = stats.controls
    inside = controls.counts > 0
    if not inside.any():
        return None
    counts = controls.counts[inside]
    means = controls.sums[inside] / counts[:, None]
    typical_well = float(np.median(counts))
    sd = _token_sd(counts.sum(), controls.sums[inside].sum(0), controls.sumsq[inside].sum(0))
    flat = sd == 0
    if flat.any() and stats.label_columns:  # constant on the controls: the plate's labelled tokens
        labelled = stats.label_wells(stats.label_columns[0])
        plate_sd = _token_sd(labelled.counts.sum(), labelled.sums.sum(0), labelled.sumsq.sum(0))
        sd = np.where(flat, plate_sd, sd)
    return means, sd / np.sqrt(typical_well)


def _token_sd(n: int, sums: np.ndarray, sumsq: np.ndarray) -> np.ndarray:
    if n == 0:
        return np.zeros_like(sums)
    mean = sums / n
    return np.sqrt(np.maximum(sumsq / n - mean * mean, 0.0))


@dataclass
class ValueProfile:
    """One label value's profile over every feature (see the module docstring): ``z`` the mean
    of its replicate wells' z-scores, ``replicate_fraction`` the fraction of them above 2,
    ``mean`` and ``fraction`` the mean activation and fraction of active tokens over all its
    tokens, ``max_selectivity`` each feature's max selectivity for the value; ``map`` and
    ``map_p_value`` its phenotypic activity (NaN with one replicate)."""

    value: Hashable
    n_wells: int
    n_plates: int
    n_tokens: int
    z: np.ndarray
    replicate_fraction: np.ndarray
    mean: np.ndarray
    fraction: np.ndarray
    max_selectivity: np.ndarray
    map: float = float("nan")
    map_p_value: float = float("nan")

    def _by_z(self) -> np.ndarray:
        """Features by z-score, highest first (ties: lower feature)."""
        return np.lexsort((np.arange(len(self.z)), -self.z))

    def top(self, n: int = 20) -> pd.DataFrame:
        """The ``n`` features with the highest z-score, best first (ties: lower feature)."""
        order = self._by_z()[:n]
        return pd.DataFrame({
            "feature": order,
            "z": self.z[order].astype(float),
            "replicate_fraction": self.replicate_fraction[order].astype(float),
            "mean": self.mean[order].astype(float),
            "fraction_active": self.fraction[order].astype(float),
            "max_selectivity": self.max_selectivity[order].astype(float),
        })

    def most_selective(self) -> tuple[int, float, int] | None:
        """(feature, its max selectivity, its rank by z from 1) of the feature most selective
        for this value (ties: lower feature); None when no feature is (every max selectivity
        is 0 or less, or the label has one value)."""
        selectivity = np.nan_to_num(self.max_selectivity, nan=-np.inf)
        if not len(selectivity) or selectivity.max() <= 0:
            return None
        feature = int(np.argmax(selectivity))
        return feature, float(self.max_selectivity[feature]), int(np.flatnonzero(self._by_z() == feature)[0]) + 1


@dataclass
class PerturbationProfiles:
    """Every non-control value's :class:`ValueProfile` of one label column, and the well
    profiles they come from."""

    column: str
    values: dict[Hashable, ValueProfile]
    wells: WellProfiles
    control_values: list[Hashable] = field(default_factory=list)

    def z_table(self, features: Sequence[int] | None = None) -> pd.DataFrame:
        """(values x features) z-scores, values in order, all features by default."""
        table = pd.DataFrame(
            np.stack([p.z for p in self.values.values()]) if self.values else np.empty((0, self.wells.n_features)),
            index=pd.Index(list(self.values), name=self.column),
        )
        return table if features is None else table[list(features)]

    def to_json(self, top: int = 20, confounds: dict[int, Any] | None = None) -> dict[str, Any]:
        """The ``profiles --json`` record: ``{"label", "values": {VALUE: {"n_wells", "map",
        "features": [{"feature", "z", "replicate_fraction", "mean", "max_selectivity"}, ...],
        "most_selective": {"feature", "max_selectivity", "rank_by_z"}}}}`` (top ``top`` features
        by z), plus ``"confounds"`` when given (see :mod:`.confounds`)."""
        values = {}
        for value, profile in self.values.items():
            best = profile.top(top)
            most = profile.most_selective()
            values[str(value)] = {
                "n_wells": profile.n_wells,
                "map": _json_float(profile.map),
                "features": [
                    {"feature": int(row.feature), "z": float(row.z),
                     "replicate_fraction": float(row.replicate_fraction), "mean": float(row.mean),
                     "max_selectivity": _json_float(row.max_selectivity)}
                    for row in best.itertuples()
                ],
                "most_selective": None if most is None else dict(zip(("feature", "max_selectivity", "rank_by_z"), most)),
            }
        record: dict[str, Any] = {"label": self.column, "values": values}
        if confounds is not None:
            record["confounds"] = {
                str(feature): {"by": flag.by, "score": float(flag.score)} for feature, flag in confounds.items()
            }
        return record


def most_selective_text(profile: ValueProfile) -> str:
    """``"most selective: feature 76 (max selectivity 0.470), 3rd by z"``."""
    most = profile.most_selective()
    if most is None:
        return "no feature is selective for it (max selectivity 0 or less)"
    feature, selectivity, rank = most
    where = "first by z" if rank == 1 else f"{_ordinal(rank)} by z"
    return f"most selective: feature {feature} (max selectivity {selectivity:.3f}), {where}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _json_float(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def perturbation_profiles(
    activation_pass: ActivationPass,
    column: str,
    *,
    null_size: int = MAP_NULL_SIZE,
    seed: int = 0,
) -> PerturbationProfiles:
    """Profiles of every value of label ``column`` of a pass (see the module docstring).

    Values found only in control wells are the reference and get no profile (they are listed
    in ``control_values``). ``null_size`` and ``seed``: the mAP's permutation test.
    """
    wells = well_profiles(activation_pass, column)
    meta = wells.meta
    usable = ~np.isnan(wells.z[:, 0]) if wells.n_features else np.ones(len(meta), bool)
    treated = usable & ~meta["is_control"].to_numpy()
    totals = activation_pass.label_sums(column)
    position = {key: i for i, key in enumerate(totals.keys)}
    max_selectivity = _max_selectivity(activation_pass, column)
    activity = phenotypic_activity(wells, null_size=null_size, seed=seed)
    profiles: dict[Hashable, ValueProfile] = {}
    for value in pd.unique(meta["value"][treated]):
        rows = np.flatnonzero(treated & (meta["value"] == value).to_numpy())
        z = wells.z[rows].astype(np.float64)
        i = position[value]
        count = max(int(totals.counts[i]), 1)
        mean_ap, p_value = activity.get(value, (float("nan"), float("nan")))
        profiles[value] = ValueProfile(
            value=value,
            n_wells=len(rows),
            n_plates=int(meta["plate"].iloc[rows].nunique()),
            n_tokens=int(totals.counts[i]),
            z=z.mean(axis=0),
            replicate_fraction=(z > REPLICATE_Z).mean(axis=0),
            mean=totals.sums[i] / count,
            fraction=totals.active[i] / count,
            max_selectivity=max_selectivity.get(value, np.full(wells.n_features, np.nan)),
            map=mean_ap,
            map_p_value=p_value,
        )
    control_values = [v for v in pd.unique(meta["value"][meta["is_control"]]) if v not in profiles]
    lost = [v for v in pd.unique(meta["value"][~meta["is_control"]]) if v not in profiles and v not in control_values]
    if lost:  # treated only on plates without control wells
        warnings.warn(
            f"{len(lost)} value(s) of {column} occur only on plates without control wells and get no "
            f"profile: {_first_few(lost)}",
            UserWarning, stacklevel=2,
        )
    return PerturbationProfiles(column, profiles, wells, control_values)


def _max_selectivity(activation_pass: ActivationPass, column: str) -> dict[Hashable, np.ndarray]:
    """value -> every feature's max selectivity; empty when the column has a single value
    (nothing to be selective against)."""
    try:
        result = activation_pass.selectivity(column)
    except ValueError:
        return {}
    return dict(zip(result.values, result.maximum, strict=True))


def phenotypic_activity(
    wells: WellProfiles, *, null_size: int = MAP_NULL_SIZE, seed: int = 0
) -> dict[Hashable, tuple[float, float]]:
    """value -> (mAP, p-value) of its replicate wells against the control wells, from their
    well profiles (z-scores of every feature; cosine similarity), with ``copairs``. Values with
    one replicate well have no mAP (no positive pair)."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import UnpairedException

    usable = ~np.isnan(wells.z).any(axis=1)
    meta = wells.meta.loc[usable, ["plate", "value", "is_control"]].reset_index(drop=True)
    feats = wells.z[usable].astype(np.float64)
    # Features constant over the wells carry nothing and would make zero-norm rows likelier.
    feats = feats[:, feats.std(axis=0) > 0]
    if feats.shape[1] == 0 or not meta["is_control"].any() or (~meta["is_control"]).sum() < 2:
        return {}
    # copairs' recipe: each control well is its own reference group (never a positive pair),
    # treated wells share -1; negatives differ in value and reference (treated vs control).
    meta["value_key"] = ["\x00controls" if c else repr(v) for v, c in zip(meta["value"], meta["is_control"], strict=True)]
    meta["reference"] = np.where(meta["is_control"], np.arange(len(meta)), -1)
    zero = np.linalg.norm(feats, axis=1) == 0  # cosine is undefined: a tiny constant instead
    feats[zero] = 1e-12
    keys = ["value_key", "reference"]
    try:
        with _COPAIRS, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = average_precision(meta, feats, keys, [], [], keys, progress_bar=False)
    except UnpairedException:
        return {}
    ap = ap[~ap["is_control"]].dropna(subset=["average_precision"])
    if ap.empty:
        return {}
    with _COPAIRS, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = mean_average_precision(ap, ["value_key"], null_size=null_size, threshold=0.05,
                                         seed=seed, progress_bar=False, max_workers=1)
    by_key = {repr(v): v for v in meta["value"][~meta["is_control"]]}
    return {
        by_key[row.value_key]: (float(row.mean_average_precision), float(row.p_value))
        for row in summary.itertuples()
    }
