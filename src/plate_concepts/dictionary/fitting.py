"""Fit a dictionary on an embedding store and write it to a file: the command line's and the
demo's entry point, ready for ``torchrun``.

A thin use of :meth:`~plate_concepts.dictionary.estimators.DictionaryEstimator.fit_iter`: it
opens the store, starts a process group when launched by torchrun (NCCL on CUDA, else gloo),
builds the method's estimator from its settings, and runs the fit with the output rules of
``fit_iter`` (an existing file is replaced only with ``overwrite`` and only if it is a dictionary;
a cancelled fit writes its checkpoint, and if asked its partial dictionary, beside the output).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from plate_concepts._device import resolve_device
from plate_concepts.dictionary.distributed import init_from_env, is_rank0
from plate_concepts.dictionary.estimators import DictionaryEstimator, method_class
from plate_concepts.dictionary.trainer import Callback, Cancel, run_to_end


def fit_dictionary(
    store_path: str | os.PathLike,
    out_path: str | os.PathLike,
    method: str = "icfl",
    *,
    control: Any = "is_control",
    batch_column: str | None = None,
    overwrite: bool = False,
    resume: bool | str | os.PathLike = False,
    save_partial: bool = False,
    keep_checkpoint: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    force: bool = False,
    progress: Callback | None = None,
    cancel: Cancel | None = None,
    **settings: Any,
) -> DictionaryEstimator:
    """Fit a ``method`` dictionary on the store at ``store_path`` and write it to ``out_path``.

    ``settings`` are the method's settings (:class:`~plate_concepts.dictionary.settings.ICFLSettings`
    or :class:`~plate_concepts.dictionary.settings.TopKSettings` fields; an option of the other
    method is an error). ``control`` is a control spec (see
    :func:`~plate_concepts.dictionary.controls.control_mask`), ``batch_column`` the obs column
    of the batches for ``whiten="pca-batch"``. The other keywords are those of ``fit_iter``.
    ``progress`` gets the training events and messages on rank 0 (without it, messages become
    warnings there). Returns the fitted (or cancelled) estimator.
    """
    from plate_concepts.embeddings.store import EmbeddingStore

    estimator_class = method_class(method)
    _check_options(estimator_class, settings)
    estimator = estimator_class(**settings)
    created_group = init_from_env(resolve_device(estimator.settings().device))
    try:
        store = EmbeddingStore.open(store_path)
        events = estimator.fit_iter(
            store, control, batch_column, cancel=cancel, out_path=out_path, overwrite=overwrite,
            save_partial=save_partial, checkpoint_path=checkpoint_path, resume=resume,
            keep_checkpoint=keep_checkpoint, force=force,
        )
        if progress is None and is_rank0():
            return run_to_end(events)
        while True:  # progress on rank 0 only; the other ranks say nothing
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            if progress is not None and is_rank0():
                progress(event)
    finally:
        if created_group:
            dist.destroy_process_group()


def _check_options(estimator_class: type[DictionaryEstimator], settings: dict[str, Any]) -> None:
    """A setting of another method is a mistake worth naming (e.g. k for ICFL)."""
    from dataclasses import fields

    from plate_concepts.dictionary.estimators import METHODS
    from plate_concepts.dictionary.settings import setting_info

    known = set(estimator_class._get_param_names())
    for name in sorted(set(settings) - known):
        owners = {cls.title: f for cls in METHODS.values() for f in fields(cls.settings_class) if f.name == name}
        if owners:
            flag = setting_info(next(iter(owners.values()))).flag or "--" + name.replace("_", "-")
            raise ValueError(
                f"{name} ({flag}) is a setting of {' and '.join(owners)}, not of {estimator_class.title}"
            )
        raise ValueError(f"unknown fit setting {name!r}; the {estimator_class.title} settings are {sorted(known)}")
