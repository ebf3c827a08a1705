"""Evaluate a fitted dictionary on an embedding store: reconstruction, sparsity, selectivity.

Streams the store in row blocks; per block: pre-process, encode, decode, and feed the
accumulators, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from plate_concepts.analysis.metrics import FeatureUsage, ReconstructionMetrics
from plate_concepts.analysis.selectivity import SelectivityAccumulator
from plate_concepts.dictionary.estimators import recorded_batch_column
from plate_concepts.embeddings.store import EmbeddingStore


def evaluate_dictionary(
    estimator: Any,
    store: EmbeddingStore,
    labels: Sequence[str] = (),
    *,
    batch_size: int = 4096,
    dead_threshold: float = 1e-5,
    progress: Callable[[int, int], Any] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Metrics of ``estimator`` (an ICFL or TopKSAE) on every token of ``store``.

    Returns ``fvu``, ``cosine`` (of the reconstructions, in the pre-processed space), ``l0``,
    ``dead_fraction`` and ``n_dead`` (frequency below ``dead_threshold`` over the store),
    ``n_features``, ``n_tokens``, ``selectivity`` (for each label column, the best feature's
    max selectivity per value and how many features have average selectivity above 0.5 / 0.2)
    and ``dictionary``: whether its fit was ``cancelled``, at which of its ``total_steps``.
    """
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"the batch size must be a positive whole number of tokens, got {batch_size!r}")
    obs = store.obs
    n = len(store)
    if n == 0:
        raise ValueError(f"embedding store {store.path} holds no tokens to evaluate on")
    missing = [c for c in labels if c not in obs.columns]
    if missing:
        raise ValueError(
            f"label column(s) {missing} not in the store {store.path}; it has {list(obs.columns)}"
        )
    batches = _batch_labels(estimator, store)
    n_features = estimator.model_.n_features
    reconstruction, usage = ReconstructionMetrics(), FeatureUsage(n_features)
    accumulators = {column: SelectivityAccumulator(n_features, label=column) for column in labels}
    for start in range(0, n, int(batch_size)):
        if cancel is not None and cancel.is_set():
            raise InterruptedError("evaluation cancelled")
        rows = slice(start, min(start + int(batch_size), n))
        x = estimator.preprocess(store.read(rows), batches=None if batches is None else batches[rows])
        codes = estimator.encode(x)
        reconstruction.update(x, estimator.decode(codes))
        usage.update(codes)
        for column, accumulator in accumulators.items():
            accumulator.update(codes, obs[column].to_numpy()[rows])
        if progress is not None:
            progress(rows.stop, n)
    training = getattr(estimator, "training_", {}) or {}
    return {
        "fvu": reconstruction.fvu,
        "cosine": reconstruction.cosine,
        "l0": usage.l0,
        "dead_fraction": float(np.mean(usage.dead_mask(dead_threshold))),
        "n_dead": int(usage.dead_mask(dead_threshold).sum()),
        "n_features": n_features,
        "n_tokens": n,
        "selectivity": {column: _summary(acc) for column, acc in accumulators.items()},
        "dictionary": {
            "cancelled": bool(training.get("cancelled", False)),
            "steps": training.get("steps"),
            "total_steps": training.get("total_steps"),
        },
    }


def _batch_labels(estimator: Any, store: EmbeddingStore) -> np.ndarray | None:
    """The raw batch of every token, for a dictionary whitened per batch."""
    if estimator.whitening_.method != "pca-batch":
        return None
    column = recorded_batch_column(estimator)
    if column is None:
        raise ValueError(
            "this dictionary was whitened per batch, but its file does not say which column names "
            "the batches; it cannot pre-process this store's tokens"
        )
    if column not in store.obs.columns:
        raise ValueError(
            f"this dictionary was whitened per batch of {column!r}, but store {store.path} has no "
            f"column {column!r} (columns: {list(store.obs.columns)})"
        )
    return store.obs[column].to_numpy()


def _summary(accumulator: SelectivityAccumulator) -> dict[str, Any]:
    summary = accumulator.result().summary()
    return {
        "best_max_selectivity": {str(k): float(v) for k, v in summary["best_max_selectivity"].items()},
        "n_avg_above_0.5": int(summary["n_avg_above_0.5"]),
        "n_avg_above_0.2": int(summary["n_avg_above_0.2"]),
    }
