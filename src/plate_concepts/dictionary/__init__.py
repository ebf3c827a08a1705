"""Sparse dictionaries on control-whitened embeddings: ICFL, TopK SAE, their training and files.

The estimators (:class:`ICFL`, :class:`TopKSAE`) are the easy way in; :func:`train` /
:func:`iter_train` drive any :class:`DictionaryModule` with a :class:`ControlWhitening`, and
:func:`fit_dictionary` is the one call behind the command line (store in, file out, torchrun-ready).
"""

from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.estimators import ICFL, TopKSAE
from plate_concepts.dictionary.icfl import ICFLModule
from plate_concepts.dictionary.io import load_dictionary, read_dictionary_metadata, save_dictionary
from plate_concepts.dictionary.topk import TopKModule
from plate_concepts.dictionary.trainer import (
    TrainingConfig,
    TrainingEvent,
    TrainingResult,
    fit_dictionary,
    fit_whitening,
    iter_train,
    resolve_device,
    train,
)
from plate_concepts.dictionary.whitening import ControlWhitening

__all__ = [
    "ControlWhitening",
    "DictionaryModule",
    "ICFL",
    "ICFLModule",
    "SparseCodes",
    "TopKModule",
    "TopKSAE",
    "TrainingConfig",
    "TrainingEvent",
    "TrainingResult",
    "fit_dictionary",
    "fit_whitening",
    "iter_train",
    "load_dictionary",
    "read_dictionary_metadata",
    "resolve_device",
    "save_dictionary",
    "train",
]
