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
    ``n_features``, ``n_tokens``, and ``selectivity``: for each label column, the best feature's
    max selectivity per value and how many features have average selectivity above 0.5 / 0.2.
    """
    obs = store.obs
    missing = [c for c in labels if c not in obs.columns]
    if missing:
        raise ValueError(
            f"label column(s) {missing} not in the store {store.path}; it has {list(obs.columns)}"
        )
    batch_column = (estimator.metadata_ or {}).get("control", {}).get("batch_column") if hasattr(
        estimator, "metadata_") else None
    n_features = estimator.model_.n_features
    reconstruction, usage = ReconstructionMetrics(), FeatureUsage(n_features)
    accumulators = {column: SelectivityAccumulator(n_features, label=column) for column in labels}
    n = len(store)
    for start in range(0, n, batch_size):
        if cancel is not None and cancel.is_set():
            raise InterruptedError("evaluation cancelled")
        rows = slice(start, min(start + batch_size, n))
        batches = obs[batch_column].to_numpy()[rows] if batch_column else None
        x = estimator.preprocess(store.read(rows), batches=batches)
        codes = estimator.encode(x)
        reconstruction.update(x, estimator.decode(codes))
        usage.update(codes)
        for column, accumulator in accumulators.items():
            accumulator.update(codes, obs[column].to_numpy()[rows])
        if progress is not None:
            progress(rows.stop, n)
    return {
        "fvu": reconstruction.fvu,
        "cosine": reconstruction.cosine,
        "l0": usage.l0,
        "dead_fraction": float(np.mean(usage.dead_mask(dead_threshold))),
        "n_dead": int(usage.dead_mask(dead_threshold).sum()),
        "n_features": n_features,
        "n_tokens": n,
        "selectivity": {column: _summary(acc) for column, acc in accumulators.items()},
    }


def _summary(accumulator: SelectivityAccumulator) -> dict[str, Any]:
    summary = accumulator.result().summary()
    return {
        "best_max_selectivity": {str(k): float(v) for k, v in summary["best_max_selectivity"].items()},
        "n_avg_above_0.5": int(summary["n_avg_above_0.5"]),
        "n_avg_above_0.2": int(summary["n_avg_above_0.2"]),
    }
