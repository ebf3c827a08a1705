"""The demo, end to end: demo plate -> EfficientNet-Lite0 embeddings -> ICFL on control-whitened
tokens -> did the dictionary find the planted concepts?

Each step is cached in a work folder and skipped when its output is there (the embedding step
resumes), so running the pipeline again costs only the report. The report compares features to
the demo's ground truth:

- per planted perturbation and cell type, the best feature's max selectivity for that value of
  the well label (``perturbation`` or ``cell_type``), on crop tokens;
- how well that feature's per-cell activation (mean of its activation map inside each cell of the
  ``cells`` label image) separates the cells showing the concept from all other cells of the
  plate: ROC AUC against the per-cell ground-truth table (``affected`` for perturbations, the
  cell's type for cell types).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from plate_concepts._io import atomic_path, replaceable_output
from plate_concepts._progress import Cancelled
from plate_concepts.analysis.explorer import FeatureExplorer

CONTROL = "perturbation=DMSO"
REPORT_NAME = "concept_report.json"
#: Keys every record of the concept report has (what :func:`is_concept_report` recognises).
REPORT_KEYS = frozenset({"label", "concept", "feature", "max_selectivity", "cell_auc"})
CONCEPT_COLUMNS = ("perturbation", "cell_type")


@dataclass
class DemoSettings:
    """What the pipeline does; the defaults run on 2 CPU cores in a few minutes."""

    n_wells: int = 96
    fields_per_well: int = 2
    field_size: int = 512
    seed: int = 0
    crop_size: int = 128
    patch_tokens: bool = True  # per-cell values from patch-level maps, not whole crops
    model: Any = "efficientnet-lite0:concat:blocks"  # an embedder spec, or an Embedder
    # None: sized from the store like any fit (256 features, 1024 tokens a step and 600 steps for
    # the 96-well demo's 3,072 crops; smaller for fewer wells).
    n_features: int | None = None
    n_rounds: int = 2
    per_round: int = 4
    steps: int | None = None
    batch_size: int | None = None
    shrinkage: str | float | None = "auto"
    device: str = "auto"


@dataclass
class DemoRun:
    plate_dir: Path
    store_path: Path
    dictionary_path: Path
    report: pd.DataFrame
    explorer: FeatureExplorer


def run_demo_pipeline(
    workdir: str | os.PathLike,
    settings: DemoSettings | None = None,
    *,
    log: Callable[[str], Any] = print,
    progress_factory: Callable[[str], Callable[[int, int], Any]] | None = None,
    cancel: threading.Event | None = None,
) -> DemoRun:
    """Run (or resume) every step in ``workdir`` and return the concept report."""
    from plate_concepts.demo import cached_demo_plate
    from plate_concepts.dictionary.checkpoints import default_checkpoint_path
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.dictionary.fitting import fit_dictionary
    from plate_concepts.dictionary.trainer import FitMessage, TrainingEvent
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.plates import open_plate

    settings = settings or DemoSettings()
    workdir = Path(workdir)
    # Before the long steps: the report is written last, and replaces only an earlier report.
    report_path = replaceable_output(workdir / REPORT_NAME, "concept-report", overwrite=True)
    workdir.mkdir(parents=True, exist_ok=True)
    progress = progress_factory or (lambda _name: None)

    log("1/4 demo plate (generated once, then cached)")
    plate_dir = cached_demo_plate(
        n_wells=settings.n_wells, fields_per_well=settings.fields_per_well, field_size=settings.field_size,
        seed=settings.seed, progress=progress("fields"),
    )
    plate = open_plate(plate_dir / "demo_plate.zarr")

    model_name = settings.model if isinstance(settings.model, str) else settings.model.name
    patches = "-patches" if settings.patch_tokens else ""
    store_path = workdir / f"store-{model_name.replace(':', '-')}-{settings.crop_size}px{patches}"
    log(f"2/4 embeddings with {model_name}, {settings.crop_size}-px crops -> {store_path}")
    store = embed_plate(
        plate, store_path, settings.model, crop_size=settings.crop_size, control=CONTROL,
        patch_tokens=settings.patch_tokens,
        device=settings.device, progress=progress("crops"), cancel=cancel,
    )
    if cancel is not None and cancel.is_set():
        raise Cancelled("demo cancelled during embedding; run again to resume")

    # The size the fit will choose (automatic: from the store), for the file name and the log.
    n_features = ICFL(settings.n_features).settings().resolved(len(store)).n_features
    dictionary_path = workdir / (
        f"{store_path.name}-icfl-M{n_features}-J{settings.n_rounds}L{settings.per_round}.safetensors"
    )
    if not dictionary_path.exists():
        log(f"3/4 ICFL with {n_features} features on control-whitened tokens -> {dictionary_path}")
        fit_progress = progress("steps")

        def report(event: TrainingEvent | FitMessage) -> None:
            if isinstance(event, FitMessage):
                log(event.text)
            elif fit_progress is not None:
                fit_progress(event.step, event.total_steps)

        fitted = fit_dictionary(
            store_path, dictionary_path, "icfl", control="is_control", shrinkage=settings.shrinkage,
            n_features=settings.n_features, n_rounds=settings.n_rounds, per_round=settings.per_round,
            steps=settings.steps, batch_size=settings.batch_size, device=settings.device,
            seed=settings.seed, resume=default_checkpoint_path(dictionary_path).exists(),
            progress=report, cancel=cancel,
        )
        if fitted.training_["cancelled"]:
            raise Cancelled("demo cancelled during the fit; run again to resume it")
    else:
        log(f"3/4 ICFL dictionary already fitted: {dictionary_path}")

    log("4/4 concept report against the ground truth")
    explorer = FeatureExplorer(store, ICFL.load(dictionary_path), plate=plate, label_column="perturbation")
    explorer.prepare(progress=progress("tokens"), cancel=cancel)
    ground_truth = pd.read_parquet(plate_dir / "ground_truth.parquet")
    report = concept_report(explorer, ground_truth)
    with atomic_path(report_path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(orient="records"), indent=2))
    return DemoRun(plate_dir, store_path, dictionary_path, report, explorer)


def is_concept_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a concept report (:func:`run_demo_pipeline` writes one): a JSON
    list of records, each with the concept, its best feature and the scores."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(records, list) and all(isinstance(r, dict) and REPORT_KEYS <= r.keys() for r in records)


def concept_report(explorer: FeatureExplorer, ground_truth: pd.DataFrame,
                   columns: tuple[str, ...] = CONCEPT_COLUMNS) -> pd.DataFrame:
    """One row per planted concept (a non-control value of each label column): the best
    feature by max selectivity, its max and average selectivity, and the per-cell ROC AUC."""
    rows = []
    cells_cache: dict[int, pd.DataFrame] = {}
    for column in columns:
        result = explorer.selectivity(column)
        for value in result.values:
            if column == "perturbation" and value == CONTROL.split("=")[1]:
                continue
            index = list(result.values).index(value)
            feature = int(np.argmax(result.maximum[index]))
            if feature not in cells_cache:
                cells_cache[feature] = per_cell_activation(explorer, feature, ground_truth)
            cells = cells_cache[feature]
            positive = (cells[column] == value) & (cells["affected"] if column == "perturbation" else True)
            auc = roc_auc_score(positive, cells["activation"]) if 0 < positive.sum() < len(cells) else np.nan
            rows.append({
                "label": column, "concept": value, "feature": feature,
                "max_selectivity": float(result.maximum[index, feature]),
                "average_selectivity": float(result.average[index, feature]),
                "cell_auc": float(auc), "n_positive_cells": int(positive.sum()), "n_cells": len(cells),
            })
    return pd.DataFrame(rows)


def per_cell_activation(explorer: FeatureExplorer, feature: int, ground_truth: pd.DataFrame) -> pd.DataFrame:
    """The ground-truth table with each cell's mean activation of ``feature`` (0 where no crop
    covers it)."""
    parts = []
    for (well, field_index), cells in ground_truth.groupby(["well", "field"], sort=False):
        values = explorer.cell_values(feature, well, int(field_index), label_name="cells")
        merged = cells.merge(values[["label", "mean_activation"]], left_on="cell_id", right_on="label", how="left")
        parts.append(merged.drop(columns="label"))
    table = pd.concat(parts, ignore_index=True)
    table["activation"] = table.pop("mean_activation").fillna(0.0)
    return table


def format_report(report: pd.DataFrame) -> str:
    """The report as a text table, its first column as wide as the longest concept name."""
    names = [f"{row.label}: {row.concept}" for row in report.itertuples()]
    width = max([len("concept"), *map(len, names)]) + 2
    lines = [f"{'concept':<{width}}{'feature':>8}{'max sel.':>10}{'avg sel.':>10}{'cell AUC':>10}"]
    for name, row in zip(names, report.itertuples(), strict=True):
        lines.append(f"{name:<{width}}{row.feature:>8}{row.max_selectivity:>10.3f}"
                     f"{row.average_selectivity:>10.3f}{row.cell_auc:>10.3f}")
    return "\n".join(lines)
