"""What the Dictionary panel runs, without Qt: label choices, the control mask and the fit job.

The panel only collects :class:`FitSettings` from its widgets and drives :func:`fit_steps`
(a generator of :class:`~plate_concepts.dictionary.trainer.TrainingEvent` whose return value
is the fitted estimator) in a napari thread worker.
"""

from __future__ import annotations

import tempfile
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from plate_concepts.dictionary.estimators import ICFL, TopKSAE
from plate_concepts.dictionary.trainer import (
    Cancel,
    TrainingConfig,
    TrainingEvent,
    TrainingResult,
    build_model,
    fit_whitening,
    iter_train,
    resolve_device,
)
from plate_concepts.dictionary.whitening import ControlWhitening
from plate_concepts.plates.platemap import ControlSpec, as_text, control_mask

if TYPE_CHECKING:
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates.model import Plate

#: obs columns that locate a token rather than label it; never offered as labels.
POSITION_COLUMNS = ("field", "crop_y", "crop_x", "crop_size")
#: A column with more distinct values than this is an identifier, not a label.
MAX_LABEL_VALUES = 2000
WHITENING_CHOICES = {
    "PCA on controls": "pca",
    "PCA, then per batch": "pca-batch",
    "none (centre on controls)": "none",
}
METHOD_CHOICES = {"ICFL": "icfl", "TopK SAE": "topk"}


def available_devices() -> list[str]:
    """ "auto" and the torch devices present on this machine (cpu always)."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        if torch.cuda.device_count() > 1:
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


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
class FitSettings:
    """Everything the Dictionary panel asks for one fit."""

    control_column: str
    control_values: list[str]
    whiten: str = "pca"  # "pca", "pca-batch" or "none"
    batch_column: str | None = None
    method: str = "icfl"  # "icfl" or "topk"
    n_features: int = 512
    n_rounds: int = 20  # ICFL J
    per_round: int = 5  # ICFL L
    k: int = 32  # TopK
    steps: int = 2000
    batch_size: int = 4096
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_path: str | Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHOD_CHOICES.values():
            raise ValueError(
                f"method must be one of {list(METHOD_CHOICES.values())}, got {self.method!r}"
            )
        if self.whiten not in WHITENING_CHOICES.values():
            raise ValueError(
                f"whitening must be one of {list(WHITENING_CHOICES.values())}, got {self.whiten!r}"
            )
        if self.whiten == "pca-batch" and not self.batch_column:
            raise ValueError("per-batch whitening needs a batch column")
        if not self.control_values:
            raise ValueError(f"choose at least one control value of {self.control_column!r}")

    @property
    def control_spec(self) -> ControlSpec:
        return ControlSpec(self.control_column, list(self.control_values))


def default_checkpoint_path(store: EmbeddingStore, method: str) -> Path:
    """Where a panel fit keeps its checkpoint: the temp folder, named after the store, so
    cancelling never writes next to the user's data."""
    folder = Path(tempfile.gettempdir()) / "plate-concepts"
    return folder / f"{Path(store.path).name}-{method}.ckpt.safetensors"


def control_flags(labels: pd.DataFrame, settings: FitSettings) -> np.ndarray:
    """Bool per token: its control column holds one of the control values."""
    return control_mask(labels, settings.control_spec)


def fit_steps(
    store: EmbeddingStore,
    settings: FitSettings,
    plate: Plate | None = None,
    cancel: Cancel | None = None,
) -> Generator[TrainingEvent, None, ICFL | TopKSAE]:
    """Fit a dictionary on ``store``: whitening on its controls, then :func:`iter_train`.

    Yields the training events; returns the fitted estimator (an :class:`ICFL` or a
    :class:`TopKSAE`; a cancelled fit returns the dictionary so far, with
    ``training_['cancelled']`` True).
    """
    labels = token_labels(store, plate)
    is_control = control_flags(labels, settings)
    batches = None
    if settings.whiten == "pca-batch":
        if settings.batch_column not in labels.columns:
            raise ValueError(
                f"batch column {settings.batch_column!r} is not a column of store {store.path} or its plate map"
            )
        batches = labels[settings.batch_column].map(as_text).to_numpy()
    device = str(resolve_device(settings.device))
    whitening = ControlWhitening(method=settings.whiten)
    fit_whitening(whitening, store, is_control, batches, seed=settings.seed)
    if settings.method == "icfl":
        options: dict[str, Any] = {"n_rounds": settings.n_rounds, "per_round": settings.per_round}
    else:
        options = {"k": settings.k}
    model = build_model(
        settings.method, settings.n_features, whitening.output_dim, seed=settings.seed, **options
    )
    config = TrainingConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        device=device,
        log_every=settings.log_every,
        checkpoint_path=settings.checkpoint_path,
    )
    result: TrainingResult = yield from iter_train(
        model,
        whitening,
        store,
        config,
        is_control=is_control,
        batches=batches,
        cancel=cancel,
    )
    return estimator_from_result(result, settings, store)


def estimator_from_result(
    result: TrainingResult, settings: FitSettings, store: EmbeddingStore
) -> ICFL | TopKSAE:
    """Wrap a training result in the estimator a file save/load and the explorer expect."""
    common = {
        "n_features": settings.n_features,
        "whiten": settings.whiten,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
        "device": result.device,
    }
    if settings.method == "icfl":
        estimator: ICFL | TopKSAE = ICFL(
            n_rounds=settings.n_rounds, per_round=settings.per_round, **common
        )
    else:
        estimator = TopKSAE(k=settings.k, **common)
    training = result.info()
    training["store"] = {
        "path": str(Path(store.path).resolve()),
        "n_tokens": len(store),
        "dim": store.dim,
    }
    training["control"] = str(settings.control_spec)
    if settings.batch_column:
        training["batch_column"] = settings.batch_column
    # The estimators' own fit() ends the same way; the panel trains through iter_train for
    # live progress, so it finishes the estimator here.
    estimator._set_fitted(result.model, result.whitening, training)
    return estimator


def recorded_batch_column(estimator: Any) -> str | None:
    """The batch column a per-batch-whitened dictionary was fitted with (panel fits record it
    in ``training_``, command-line fits in the file's ``control`` entry); None otherwise."""
    if getattr(getattr(estimator, "whitening_", None), "method", None) != "pca-batch":
        return None
    training = getattr(estimator, "training_", {}) or {}
    control = (getattr(estimator, "metadata_", {}) or {}).get("control", {})
    return training.get("batch_column") or (
        control.get("batch_column") if isinstance(control, dict) else None
    )


def describe_dictionary(estimator: Any) -> str:
    """One line about a dictionary: method, size, training outcome."""
    if estimator is None:
        return "No dictionary yet: fit one or load a file."
    method = "ICFL" if getattr(estimator, "method", "") == "icfl" else "TopK SAE"
    parts = [f"{method}, {estimator.n_features} features"]
    if estimator.method == "icfl":
        parts.append(f"J = {estimator.n_rounds}, L = {estimator.per_round}")
    else:
        parts.append(f"k = {estimator.k}")
    parts.append(f"whitening {estimator.whiten}")
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
    return ", ".join(parts)


def describe_event(event: TrainingEvent) -> str:
    """Progress line of one training event."""
    return (
        f"step {event.step} / {event.total_steps}   loss {event.loss:.4g}   FVU {event.fvu:.3f}   "
        f"dead {100 * event.dead_fraction:.1f} %   {event.tokens_per_s:,.0f} tokens/s"
    )
