"""Evaluate a fitted dictionary on an embedding store: reconstruction, sparsity, selectivity.

The numbers come from an activation pass (:mod:`plate_concepts.analysis.activation_pass`): one
written by ``plate-concepts encode`` (nothing is encoded again), or one run here, in process,
through the same code — so both give the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plate_concepts._progress import CancelLike
from plate_concepts.analysis.activation_pass import (
    ActivationPass,
    file_sha256,
    plan_pass,
    run_pass,
    store_plates_digest,
)
from plate_concepts.dictionary.estimators import recorded_batch_column
from plate_concepts.embeddings.store import EmbeddingStore


def evaluate_dictionary(
    estimator: Any,
    store: EmbeddingStore,
    labels: Sequence[str] = (),
    *,
    batch_size: int | None = None,
    dead_threshold: float = 1e-5,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelLike | None = None,
    activation_pass: ActivationPass | None = None,
) -> dict[str, Any]:
    """Metrics of ``estimator`` (an ICFL or TopKSAE) on every token of ``store``.

    Returns ``fvu``, ``cosine`` (of the reconstructions, in the pre-processed space), ``l0``,
    ``dead_fraction`` and ``n_dead`` (frequency below ``dead_threshold`` over the store),
    ``n_features``, ``n_tokens``, ``selectivity`` (for each label column, the best feature's
    max selectivity per value and how many features have average selectivity above 0.5 / 0.2)
    and ``dictionary``: whether its fit was ``cancelled``, at which of its ``total_steps``.
    ``activation_pass``: a pass of this dictionary over this store to read instead of encoding;
    otherwise one runs here in blocks of ``batch_size`` tokens (default: the store's chunks, as
    ``encode``).
    """
    labels = [store.resolve_column(column, "label column") for column in labels]
    if activation_pass is None:
        if len(store) == 0:
            raise ValueError(f"embedding store {store.path} holds no tokens to evaluate on")
        spec = plan_pass(store, estimator, None, labels=labels, batch_column=_batch_column(estimator, store),
                         rows_per_task=batch_size)
        activation_pass = run_pass(spec, estimator=estimator, progress=progress, cancel=cancel)
    else:
        check_pass_matches(activation_pass, store, labels)
    result = activation_pass.evaluation(labels, dead_threshold)
    training = getattr(estimator, "training_", {}) or {}
    result["dictionary"] = {
        "cancelled": bool(training.get("cancelled", False)),
        "steps": training.get("steps"),
        "total_steps": training.get("total_steps"),
    }
    return result


def check_pass_matches(
    activation_pass: ActivationPass,
    store: EmbeddingStore,
    labels: Sequence[str] = (),
    dictionary: str | os.PathLike | None = None,
) -> None:
    """A clear error when a pass was not made on this store (as it is now: same plates in the
    same order), with this ``dictionary`` file (default: the one it records) as it is now, or
    lacks label columns. Stores and dictionaries are recognised by content (the store's digest,
    the file's SHA-256), so a copied or moved project still reads its passes; passes made before
    those were recorded are matched by path."""
    spec = activation_pass.spec
    same_path = Path(spec.store).resolve() == Path(store.path).resolve()
    same_rows = spec.store_plates is not None and spec.store_plates == store_plates_digest(store)
    if spec.n_tokens != len(store) or not (same_rows or same_path):
        raise ValueError(
            f"the activation pass {activation_pass.folder} was made on {spec.store} "
            f"({spec.n_tokens} tokens), not on {store.path} ({len(store)} tokens)"
        )
    if spec.store_plates is not None and not same_rows:  # the same folder, other rows
        raise ValueError(
            f"{store.path} changed since the activation pass {activation_pass.folder} was made (made "
            "again, or a plate replaced, appended or reordered): its codes would be other tokens'; "
            "run encode again (--overwrite replaces the pass)"
        )
    _check_pass_dictionary(activation_pass, dictionary)
    missing = [c for c in labels if c not in activation_pass.label_columns]
    if missing:
        raise ValueError(
            f"the activation pass {activation_pass.folder} has no statistics for label column(s) "
            f"{missing} (it has {activation_pass.label_columns}); run encode with --label for them"
        )


def _check_pass_dictionary(activation_pass: ActivationPass, dictionary: str | os.PathLike | None) -> None:
    spec = activation_pass.spec
    recorded = spec.dictionary_sha256  # passes made before it was recorded: matched by path
    same_file = dictionary is not None and spec.dictionary is not None and (
        Path(spec.dictionary).resolve() == Path(dictionary).resolve()
    )
    if dictionary is not None and not same_file:
        if recorded is None or file_sha256(dictionary) != recorded:
            raise ValueError(
                f"the activation pass {activation_pass.folder} was made with dictionary {spec.dictionary}, "
                f"not {dictionary}" + ("" if recorded is None else " (their contents differ)")
                + "; run encode with this dictionary"
            )
        return
    if spec.dictionary is not None and recorded is not None and (
        not Path(spec.dictionary).is_file() or file_sha256(spec.dictionary) != recorded
    ):
        raise ValueError(
            f"the dictionary file {spec.dictionary} changed since the activation pass "
            f"{activation_pass.folder} was made (fitted again?), or is gone: its numbers would not "
            "be this dictionary's; run encode again (--overwrite replaces the pass)"
        )


def _batch_column(estimator: Any, store: EmbeddingStore) -> str | None:
    """The batch column of a dictionary whitened per batch (checked against the store)."""
    if estimator.whitening_.method != "pca-batch":
        return None
    column = recorded_batch_column(estimator)
    if column is None:
        raise ValueError(
            "this dictionary was whitened per batch, but its file does not say which column names "
            "the batches; it cannot pre-process this store's tokens"
        )
    try:  # as the user spelled it at fit time (Metadata_Batch finds batch)
        return store.resolve_column(column, "batch column")
    except ValueError:
        raise ValueError(
            f"this dictionary was whitened per batch of {column!r}, but store {store.path} has no "
            f"column {column!r} (columns: {store.obs_columns})"
        ) from None
