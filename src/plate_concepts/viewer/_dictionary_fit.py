"""What the Dictionary panel runs, without Qt: label choices, the fit it asks for, and the job.

The panel collects a :class:`PanelFit` (the controls and batches it picks from the store's
labels, and the method's settings read from widgets built from those settings) and runs
:func:`fit_steps` — the estimators' one fit path, ``fit_iter`` — in a background job.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from plate_concepts.dictionary.checkpoints import default_checkpoint_path
from plate_concepts.dictionary.estimators import METHODS, DictionaryEstimator, method_class
from plate_concepts.dictionary.settings import FitSettings
from plate_concepts.dictionary.trainer import Cancel, FitMessage, TrainingEvent
from plate_concepts.embeddings.obs_index import OBJECT_COLUMNS
from plate_concepts.plates.platemap import ControlSpec, as_text

if TYPE_CHECKING:
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates.model import Plate

#: obs columns that locate a token rather than label it; never offered as labels.
POSITION_COLUMNS = ("field", "crop_y", "crop_x", "crop_size", *OBJECT_COLUMNS)
#: A column with more distinct values than this is an identifier, not a label.
MAX_LABEL_VALUES = 2000
#: How the panel names the whitening methods (the ``whiten`` setting's values).
WHITENING_LABELS = {
    "pca": "PCA on controls",
    "pca-batch": "PCA, then per batch",
    "none": "none (centre on controls)",
}
#: Method titles shown by the panel -> method names, from the registry.
METHOD_CHOICES = {cls.title: name for name, cls in METHODS.items()}


def token_labels(store: EmbeddingStore, plate: Plate | None = None) -> pd.DataFrame:
    """One row per store token: its obs columns plus the plate map's columns the obs lacks
    (joined on the well, for the tokens of ``plate``; all tokens when the store names no
    plate that matches)."""
    obs = store.obs
    if plate is None or plate.platemap is None or "well" not in obs.columns:
        return obs
    platemap = plate.platemap
    extra = [c for c in platemap.columns if str(c) not in obs.columns]
    if not extra:
        return obs
    rows = np.ones(len(obs), dtype=bool)
    if "plate" in obs.columns and (obs["plate"].astype(str) == plate.name).any():
        rows = (obs["plate"].astype(str) == plate.name).to_numpy()
    joined = platemap[extra].reindex(obs["well"].astype(str).to_numpy())
    joined.index = obs.index
    if not rows.all():  # tokens of other plates get no plate-map labels
        joined = joined.where(pd.Series(rows, index=joined.index), axis=0)
    joined.columns = [str(c) for c in joined.columns]
    return pd.concat([obs, joined], axis=1)


def label_choices(labels: pd.DataFrame) -> dict[str, list[str]]:
    """Columns usable as labels (controls, batches) -> their distinct values as text, sorted.
    ``is_control`` first when present; position columns and identifiers left out."""
    choices: dict[str, list[str]] = {}
    for name in labels.columns:
        if name in POSITION_COLUMNS:
            continue
        values = labels[name].dropna().unique()
        if not 1 <= len(values) <= MAX_LABEL_VALUES:
            continue
        texts = sorted({as_text(v) for v in values} - {""}, key=_natural_key)
        if texts:
            choices[str(name)] = texts
    ordered = sorted(choices, key=lambda c: (c != "is_control", c == "well", c == "plate"))
    return {name: choices[name] for name in ordered}


def _natural_key(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


@dataclass
class PanelFit:
    """One fit the Dictionary panel asks for: which tokens are controls (a column of the
    store's labels and its control values), the batch column for per-batch whitening, and the
    method's settings."""

    settings: FitSettings
    control_column: str
    control_values: list[str]
    batch_column: str | None = None

    def __post_init__(self) -> None:
        if not self.control_values:
            raise ValueError(f"choose at least one control value of {self.control_column!r}")
        if self.settings.whiten == "pca-batch" and not self.batch_column:
            raise ValueError("per-batch whitening needs a batch column")

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def control_spec(self) -> ControlSpec:
        return ControlSpec(self.control_column, list(self.control_values))


def fit_steps(
    store: EmbeddingStore,
    fit: PanelFit,
    plate: Plate | None = None,
    cancel: Cancel | None = None,
) -> Generator[TrainingEvent | FitMessage, None, DictionaryEstimator]:
    """Fit a dictionary on ``store`` through the estimators' ``fit_iter``: the controls and
    batches are looked up in the store's labels joined with the plate map. Yields the training
    events and messages; returns the fitted estimator (a cancelled fit returns the dictionary
    so far, with ``training_['cancelled']`` True, and keeps its checkpoint; without an output
    file, the checkpoint lies in the temporary folder: ``default_checkpoint_path``)."""
    estimator = method_class(fit.method)(**asdict(fit.settings))
    batches = fit.batch_column if fit.settings.whiten == "pca-batch" else None
    return (yield from estimator.fit_iter(
        store, fit.control_spec, batches, labels=token_labels(store, plate), cancel=cancel,
        checkpoint_path=default_checkpoint_path(store_path=store.path, method=fit.method),
    ))


def describe_dictionary(estimator: Any) -> str:
    """One line about a dictionary (method, size, training outcome), then one about its
    whitening (which control covariance, and why)."""
    if estimator is None:
        return "No dictionary yet: fit one or load a file."
    hyper = estimator.model_.hyperparameters()
    parts = [f"{estimator.title}, {hyper['n_features']} features"]
    if "n_rounds" in hyper:
        parts.append(f"J = {hyper['n_rounds']}, L = {hyper['per_round']}")
    if "k" in hyper:
        parts.append(f"k = {hyper['k']}")
    training = getattr(estimator, "training_", {}) or {}
    if training.get("steps") is not None:
        steps = f"{training['steps']} steps"
        if training.get("cancelled"):
            steps += f" of {training.get('total_steps')} (cancelled)"
        parts.append(steps)
    final = training.get("final", {}) or {}
    if final.get("fvu") is not None:
        parts.append(f"FVU {final['fvu']:.3f}")
    if final.get("dead_fraction") is not None:
        parts.append(f"{100 * final['dead_fraction']:.1f} % dead")
    return ", ".join(parts) + "\n" + estimator.whitening_.describe()


def describe_event(event: TrainingEvent) -> str:
    """Progress line of one training event."""
    return (
        f"step {event.step} / {event.total_steps}   loss {event.loss:.4g}   FVU {event.fvu:.3f}   "
        f"dead {100 * event.dead_fraction:.1f} %   {event.tokens_per_s:,.0f} tokens/s"
    )
