"""The publication's comparison on your own store: fit a grid of dictionaries (methods x
whitenings) at matched sparsity, evaluate each, and tabulate and plot what they find.

Matched sparsity: every run codes each token with at most ``S`` features — TopK with
``k = S``, ICFL with ``J x L = S`` (:func:`sparsity_split`: ``J`` the largest divisor of ``S``
not above ``sqrt(S)``, so ``S = 8`` gives ``J = 2`` rounds of ``L = 4``, ``S = 16`` gives 4 x 4:
fewer pursuit rounds, which run one after the other, than features per round). Every run has
the same dictionary size, steps, batch size and seed; only the method and the whitening differ.

Each run goes through the one fit path (:meth:`~plate_concepts.dictionary.estimators.
DictionaryEstimator.fit_iter`) and :func:`~plate_concepts.analysis.evaluation.evaluate_dictionary`.
:func:`compare` reports progress and can be cancelled (between steps, and between blocks of the
evaluation); a cancelled comparison returns the runs that finished. Its result keeps every fitted
estimator, so one can be kept as the dictionary (the Dictionary panel's "Keep").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from plate_concepts._progress import Cancelled, cancel_requested
from plate_concepts.analysis.evaluation import evaluate_dictionary
from plate_concepts.dictionary.controls import control_mask
from plate_concepts.dictionary.estimators import DictionaryEstimator, method_class
from plate_concepts.dictionary.settings import sparsity_split
from plate_concepts.dictionary.trainer import Cancel, FitMessage, TrainingEvent
from plate_concepts.dictionary.whitening import METHODS as WHITEN_METHODS

#: The grid the publication reports.
DEFAULT_METHODS = ("icfl", "topk")
DEFAULT_WHITENS = ("pca", "none")
DEFAULT_SPARSITY = 8
#: Average-selectivity thresholds counted per label (the publication's).
THRESHOLDS = (0.5, 0.2)


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a method and a whitening (and its covariance estimate)."""

    method: str
    whiten: str
    shrinkage: float | str | None = "auto"

    def __post_init__(self) -> None:
        method_class(self.method)  # a readable error for an unknown method
        if self.whiten not in WHITEN_METHODS:
            raise ValueError(f"unknown whitening {self.whiten!r}; expected one of {list(WHITEN_METHODS)}")

    @property
    def name(self) -> str:
        return f"{method_class(self.method).title}, whitening {self.whiten}"


def grid(methods: Sequence[str] = DEFAULT_METHODS, whitens: Sequence[str] = DEFAULT_WHITENS,
         shrinkage: float | str | None = "auto") -> list[RunSpec]:
    """Every method with every whitening, whitening by whitening."""
    if not methods or not whitens:
        raise ValueError("the comparison needs at least one method and one whitening")
    return [RunSpec(method, whiten, shrinkage) for whiten in whitens for method in methods]


@dataclass(frozen=True)
class CompareProgress:
    """Where the comparison is: run ``run`` (1-based) of ``n_runs``, its ``stage`` ("fitting"
    or "evaluating") and ``done`` of ``total`` steps or tokens."""

    run: int
    n_runs: int
    spec: RunSpec
    stage: str
    done: int
    total: int

    def describe(self) -> str:
        unit = "steps" if self.stage == "fitting" else "tokens"
        return f"run {self.run}/{self.n_runs} ({self.spec.name}): {self.stage}, {self.done:,}/{self.total:,} {unit}"


@dataclass
class RunResult:
    """One finished run: its spec, the fitted estimator, its evaluation and the notes of its fit."""

    spec: RunSpec
    estimator: DictionaryEstimator
    evaluation: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity_text(self) -> str:
        hyper = self.estimator.model_.hyperparameters()
        if "n_rounds" in hyper:
            return f"J = {hyper['n_rounds']}, L = {hyper['per_round']}"
        return f"k = {hyper['k']}"

    def record(self) -> dict[str, Any]:
        """The run as the JSON output has it."""
        e = self.evaluation
        return {
            "method": self.spec.method, "whiten": self.spec.whiten, "fvu": e["fvu"], "cosine": e["cosine"],
            "l0": e["l0"], "dead_fraction": e["dead_fraction"], "selectivity": e["selectivity"],
        }


@dataclass
class Comparison:
    """The runs of a comparison, in grid order; ``cancelled`` when it stopped early."""

    runs: list[RunResult]
    labels: list[str]
    sparsity: int
    n_features: int | None
    #: Per label column, its values whose tokens are all controls (left out of the means).
    control_values: dict[str, list[str]] = field(default_factory=dict)
    cancelled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"runs": [run.record() for run in self.runs]}

    def mean_best(self, run: RunResult, label: str) -> float:
        """Mean over the label's values (its control values left out) of the best feature's max
        selectivity."""
        best = run.evaluation["selectivity"][label]["best_max_selectivity"]
        values = [v for k, v in best.items() if k not in self.control_values.get(label, [])] or list(best.values())
        return float(np.mean(values)) if values else math.nan

    def table(self) -> pd.DataFrame:
        """One row per run: the publication's columns."""
        rows = []
        for run in self.runs:
            e = run.evaluation
            row: dict[str, Any] = {
                "method": method_class(run.spec.method).title, "whiten": run.spec.whiten,
                "sparsity": run.sparsity_text, "FVU": e["fvu"], "cosine": e["cosine"], "L0": e["l0"],
                "dead": f"{e['n_dead']}/{e['n_features']}",
            }
            for label in self.labels:
                summary = e["selectivity"][label]
                for t in THRESHOLDS:
                    row[f"{label}: avg > {t:g}"] = summary[f"n_avg_above_{t:g}"]
                row[f"{label}: mean best max"] = self.mean_best(run, label)
            rows.append(row)
        return pd.DataFrame(rows)

    def value_table(self, label: str) -> pd.DataFrame:
        """Best max selectivity per value of ``label`` (rows) for each run (columns)."""
        columns = {
            f"{method_class(run.spec.method).title} {run.spec.whiten}":
                run.evaluation["selectivity"][label]["best_max_selectivity"]
            for run in self.runs
        }
        return pd.DataFrame(columns)

    def format(self) -> str:
        """The tables as text: the runs, then best max selectivity per label value."""
        if not self.runs:
            return "no run finished"
        table = self.table()
        lines = [table.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
        for label in self.labels:
            values = self.value_table(label)
            left_out = self.control_values.get(label)
            note = f" (controls, left out of the mean: {', '.join(left_out)})" if left_out else ""
            lines += ["", f"best max selectivity per value of {label}{note}:",
                      values.to_string(float_format=lambda v: f"{v:.3f}")]
        return "\n".join(lines)

    def figure(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A PNG: per label, the best max selectivity of each value for every run; then the
        reconstruction cosine and dead fraction of every run. Written atomically; an existing
        file is replaced only with ``overwrite`` and only if it is a PNG image."""
        return comparison_figure(self, path, overwrite)


def compare(
    store: Any,
    labels: Sequence[str],
    runs: Sequence[RunSpec] | None = None,
    *,
    control: Any = "is_control",
    batch_column: str | None = None,
    label_table: pd.DataFrame | None = None,
    n_features: int | None = None,
    sparsity: int = DEFAULT_SPARSITY,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: Callable[[CompareProgress], Any] | None = None,
    cancel: Cancel | None = None,
    **settings: Any,
) -> Comparison:
    """Fit and evaluate every run of ``runs`` (default: :func:`grid`) on ``store`` at matched
    ``sparsity``; selectivity for the ``labels`` columns.

    ``control``/``batch_column`` as for a fit; ``label_table`` is the per-token table controls and
    batches are looked up in (default: the store's obs; the Dictionary panel joins the plate
    map); the ``labels`` are columns of the store. ``n_features``, ``steps``, ``batch_size`` (None: from the store's size, as
    ``fit``), ``seed``, ``device`` and further ``settings`` are shared by every run.
    ``progress`` gets a :class:`CompareProgress` per reported step and evaluation block;
    ``cancel`` (an Event or a callable) stops at the next step or block: the runs that finished
    are returned, with ``cancelled`` set.
    """
    sparsity_split(sparsity)  # a bad S is one clear error before anything is read
    runs = list(runs) if runs is not None else grid()
    labels = [store.resolve_column(column, "label column") for column in dict.fromkeys(labels)]
    table = store.read_obs(columns=labels) if label_table is None else label_table
    matched = {name: method_class(name).settings_class.at_sparsity(sparsity)
               for name in dict.fromkeys(run.method for run in runs)}
    controls = control_mask(store, control, label_table)
    result = Comparison([], labels, int(sparsity), n_features, _control_values(table, labels, controls))
    for index, spec in enumerate(runs, start=1):
        params = {**settings, "n_features": n_features, "whiten": spec.whiten, "shrinkage": spec.shrinkage,
                  "steps": steps, "batch_size": batch_size, "seed": seed, "device": device}
        params |= matched[spec.method]
        estimator = method_class(spec.method)(**params)
        notes: list[str] = []
        events = estimator.fit_iter(store, control, batch_column if spec.whiten == "pca-batch" else None,
                                    labels=label_table, cancel=cancel)
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                estimator = stop.value
                break
            if isinstance(event, FitMessage):
                notes.append(event.text)
            elif isinstance(event, TrainingEvent) and progress is not None:
                progress(CompareProgress(index, len(runs), spec, "fitting", event.step, event.total_steps))
        if estimator.training_.get("cancelled") or cancel_requested(cancel):
            result.cancelled = True
            return result

        def report(done: int, total: int, index: int = index, spec: RunSpec = spec) -> None:
            if progress is not None:
                progress(CompareProgress(index, len(runs), spec, "evaluating", done, total))

        try:
            evaluation = evaluate_dictionary(estimator, store, labels, progress=report, cancel=cancel)
        except Cancelled:
            result.cancelled = True
            return result
        result.runs.append(RunResult(spec, estimator, evaluation, notes))
    return result


def _control_values(table: pd.DataFrame, labels: list[str], controls: np.ndarray) -> dict[str, list[str]]:
    """Per label, the values all of whose tokens are controls (e.g. perturbation = DMSO)."""
    out = {}
    for label in labels:
        values = table[label].to_numpy()
        known = pd.notna(values)
        frame = pd.DataFrame({"value": values[known], "control": controls[known]})
        all_control = frame.groupby("value")["control"].all()
        out[label] = [str(v) for v in all_control.index[all_control.to_numpy()]]
    return out


def comparison_figure(comparison: Comparison, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """See :meth:`Comparison.figure`."""
    from matplotlib.figure import Figure  # not pyplot: no backend, no display, no global state

    from plate_concepts._io import atomic_path
    from plate_concepts.analysis.report_figures import shorten

    path = Path(path)
    if not comparison.runs:
        raise ValueError("no run finished: there is nothing to plot")
    names = [f"{method_class(r.spec.method).title}, {r.spec.whiten}" for r in comparison.runs]
    colours = [f"C{i}" for i in range(len(names))]
    panels = len(comparison.labels) + 1
    widths = [max(2.5, 1.1 * len(comparison.value_table(label))) for label in comparison.labels] + [2.8]
    figure = Figure(figsize=(min(4 + sum(widths), 24), 4.2), layout="constrained")
    axes = figure.subplots(1, panels, width_ratios=widths, squeeze=False)[0]
    width = 0.8 / len(names)
    for ax, label in zip(axes, comparison.labels, strict=False):
        values = comparison.value_table(label)
        x = np.arange(len(values))
        for i, column in enumerate(values.columns):
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values[column].to_numpy(), width, color=colours[i])
        ax.set_xticks(x, [shorten(str(v), 18) for v in values.index], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(min(0.0, float(np.nanmin(values.to_numpy())) - 0.05), 1.0)
        ax.axhline(0.5, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{label}: best max selectivity", fontsize=9)
    ax = axes[-1]
    x = np.arange(2)
    for i, run in enumerate(comparison.runs):
        e = run.evaluation
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [e["cosine"], e["dead_fraction"]], width,
               color=colours[i], label=names[i])
    ax.set_xticks(x, ["cosine", "dead fraction"], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("reconstruction", fontsize=9)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(names), 4), fontsize=8)
    figure.suptitle(f"matched sparsity S = {comparison.sparsity}"
                    + (f", M = {comparison.runs[0].evaluation['n_features']}" if comparison.runs else ""), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=overwrite, kind="figure") as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path

