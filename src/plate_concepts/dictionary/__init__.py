"""Sparse dictionaries on control-whitened embeddings: ICFL, TopK SAE, their training and files.

The estimators (:class:`ICFL`, :class:`TopKSAE`; the registry :data:`METHODS`) are the way in:
``fit_iter`` is the one fit path (``fit`` runs it to the end), with the settings of
:mod:`~plate_concepts.dictionary.settings`; :func:`fit_dictionary` is the command line's (store
in, file out, torchrun-ready). :func:`train` / :func:`iter_train` drive any
:class:`DictionaryModule` with a :class:`ControlWhitening`.

Modules: ``settings`` (what a fit takes), ``estimators`` (fit, transform, save, load),
``fitting`` (store to file), ``trainer`` (the loop), ``data`` (token sources), ``controls``
(controls, batches, whitening fit), ``distributed`` (collectives), ``checkpoints``, ``io``
(dictionary files), ``whitening``, and the models ``icfl`` and ``topk``.
"""

from plate_concepts._device import resolve_device
from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.controls import fit_whitening
from plate_concepts.dictionary.estimators import (
    ICFL,
    METHODS,
    TopKSAE,
    method_class,
    recorded_batch_column,
)
from plate_concepts.dictionary.fitting import fit_dictionary
from plate_concepts.dictionary.icfl import ICFLModule
from plate_concepts.dictionary.io import load_dictionary, read_dictionary_metadata, save_dictionary
from plate_concepts.dictionary.settings import FitSettings, ICFLSettings, TopKSettings
from plate_concepts.dictionary.topk import TopKModule
from plate_concepts.dictionary.trainer import (
    FitDiverged,
    FitMessage,
    TrainingConfig,
    TrainingEvent,
    TrainingResult,
    iter_train,
    train,
)
from plate_concepts.dictionary.whitening import ControlWhitening

__all__ = [
    "ICFL",
    "METHODS",
    "ControlWhitening",
    "DictionaryModule",
    "FitDiverged",
    "FitMessage",
    "FitSettings",
    "ICFLModule",
    "ICFLSettings",
    "SparseCodes",
    "TopKModule",
    "TopKSAE",
    "TopKSettings",
    "TrainingConfig",
    "TrainingEvent",
    "TrainingResult",
    "fit_dictionary",
    "fit_whitening",
    "iter_train",
    "load_dictionary",
    "method_class",
    "read_dictionary_metadata",
    "recorded_batch_column",
    "resolve_device",
    "save_dictionary",
    "train",
]
