"""scikit-learn-style estimators, ``ICFL`` and ``TopKSAE``, and the method registry.

Each bundles the pre-processing (control centring, whitening, unit norm) with a dictionary::

    icfl = ICFL(n_features=512, steps=2000).fit(tokens, is_control=controls)
    codes = icfl.transform(new_tokens)        # SparseCodes; codes.dense() for a matrix
    icfl.save("dictionary.safetensors")
    icfl = ICFL.load("dictionary.safetensors")

:meth:`DictionaryEstimator.fit_iter` is the one way a dictionary is fitted (the command line,
the demo, the Dictionary panel and :meth:`~DictionaryEstimator.fit` all go through it): it yields
the training events and returns the fitted estimator; given an output file it also writes it,
and a cancelled fit never replaces a finished one. An estimator's parameters are the fields of
its method's settings (:mod:`~plate_concepts.dictionary.settings`).

``encode``/``decode``/``reconstruct`` work in the pre-processed space; ``transform`` and
``preprocess`` take raw tokens.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Generator
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from plate_concepts._device import resolve_device
from plate_concepts._io import replaceable_output
from plate_concepts._progress import Cancelled, cancel_requested
from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.checkpoints import (
    checkpoint_whitening,
    default_checkpoint_path,
    partial_path,
    read_checkpoint,
)
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.controls import (
    DEFAULT_CONTROL,
    Controls,
    batch_values,
    control_mask,
    fit_whitening,
    is_control_spec,
)
from plate_concepts.dictionary.data import is_store, n_tokens_of
from plate_concepts.dictionary.distributed import barrier, is_rank0
from plate_concepts.dictionary.icfl import ICFLModule
from plate_concepts.dictionary.io import load_dictionary, save_dictionary
from plate_concepts.dictionary.settings import (
    FitSettings,
    ICFLSettings,
    TopKSettings,
    setting_fields,
    setting_help,
)
from plate_concepts.dictionary.topk import TopKModule
from plate_concepts.dictionary.trainer import (
    Callback,
    Cancel,
    FitMessage,
    TrainingEvent,
    iter_train,
    run_to_end,
)
from plate_concepts.dictionary.whitening import ControlWhitening, RankDeficientWarning

#: Tokens per chunk when pre-processing / encoding many tokens.
ENCODE_BATCH = 8192

FitEvents = Generator[TrainingEvent | FitMessage, None, "DictionaryEstimator"]


class DictionaryEstimator(BaseEstimator):
    """Shared fit / transform / save logic; a subclass names its method, model and settings.

    Its parameters (``__init__`` keywords, ``get_params``) are the fields of ``settings_class``.
    """

    method: ClassVar[str]  # the name in dictionary files and on the command line
    title: ClassVar[str]  # the name shown to people
    module_class: ClassVar[type[DictionaryModule]]
    settings_class: ClassVar[type[FitSettings]]

    def __init__(self, **params: Any) -> None:
        names = self._get_param_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no parameter(s) {unknown}; its parameters: {names}")
        for f in fields(self.settings_class):
            setattr(self, f.name, params.get(f.name, f.default))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each estimator an ``__init__`` whose signature is its settings' fields (what
        scikit-learn's ``get_params``/``clone``/``repr`` read) and a docstring listing them."""
        super().__init_subclass__(**kwargs)
        settings_fields = setting_fields(cls.settings_class)

        def __init__(self: DictionaryEstimator, n_features: int | None = None, **params: Any) -> None:
            DictionaryEstimator.__init__(self, n_features=n_features, **params)

        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD  # n_features, as in ICFL(512)
        __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("self", positional)]
            + [inspect.Parameter(f.name, positional if f.name == "n_features" else inspect.Parameter.KEYWORD_ONLY,
                                 default=f.default)
               for f in sorted(settings_fields, key=lambda f: f.name != "n_features")]
        )
        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.__doc__ = (cls.__doc__ or "") + "\n\n    Parameters\n    ----------\n" + "".join(
            f"    {f.name}\n        {setting_help(f)}\n" for f in settings_fields
        )

    @classmethod
    def _get_param_names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls.settings_class))

    def settings(self) -> FitSettings:
        """The parameters as a validated settings object (raises ValueError naming a bad one)."""
        return self.settings_class(**self.get_params())

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: Any,
        is_control: Controls = None,
        batches: Any = None,
        callback: Callback | None = None,
        cancel: Cancel | None = None,
        **options: Any,
    ) -> Self:
        """Fit to the end (see :meth:`fit_iter`); ``callback`` gets each training event, and
        messages are issued as warnings."""
        return run_to_end(self.fit_iter(X, is_control, batches, cancel=cancel, **options), callback)

    def fit_iter(
        self,
        X: Any,
        is_control: Controls = None,
        batches: Any = None,
        *,
        labels: pd.DataFrame | None = None,
        cancel: Cancel | None = None,
        out_path: str | os.PathLike | None = None,
        overwrite: bool = False,
        save_partial: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        resume: bool | str | os.PathLike = False,
        keep_checkpoint: bool = False,
        force: bool = False,
    ) -> FitEvents:
        """Fit the whitening on the controls of ``X``, then the dictionary on all its tokens,
        yielding :class:`~plate_concepts.dictionary.trainer.TrainingEvent` progress and
        :class:`~plate_concepts.dictionary.trainer.FitMessage` notes; returns ``self``, fitted.

        Parameters
        ----------
        X
            Raw tokens: an (n, dim) array or an EmbeddingStore (streamed).
        is_control
            A bool per token, or (store or ``labels``) a control spec: a column of booleans
            (default ``"is_control"``), ``"column=value[,value]"``, a ControlSpec or ``"all"``.
        batches
            For ``whiten="pca-batch"``: the raw batch label of every token, or a column name.
        labels
            The per-token table specs and column names are looked up in (default: the store's
            obs; the Dictionary panel joins the plate map to it).
        cancel
            An Event or a callable, polled while the controls are read and before every step.
            Cancelled while fitting the whitening: :class:`~plate_concepts._progress.Cancelled`, nothing is
            written. Cancelled while training: a checkpoint is written and ``self`` returns
            with ``training_['cancelled']`` True (usable, partly trained).
        out_path, overwrite, save_partial
            Write the finished dictionary to this file (checked before anything is computed: an
            existing file is replaced only with ``overwrite``, and only if it is a dictionary
            file). A cancelled fit never writes ``out_path``; with ``save_partial`` it writes
            its partial dictionary beside it (:func:`~.checkpoints.partial_path`).
        checkpoint_path, resume, keep_checkpoint
            Where checkpoints go (default: beside ``out_path``; None without one: no
            checkpoints); ``resume`` continues from it (True) or from the checkpoint file given.
            A finished fit removes its checkpoint unless ``keep_checkpoint``. Beside an output,
            a fresh fit replaces an interrupted fit's checkpoint only with ``overwrite``, and a
            finished fit's kept checkpoint never.
        force
            Allow more features than tokens (a degenerate dictionary otherwise refused).
        """
        settings = self.settings()
        data = X if is_store(X) else _as_tokens(X, "X")
        n_tokens = n_tokens_of(data)
        if out_path is not None:
            out_path = Path(out_path)
            sources = [data.path] if is_store(data) else []
            replaceable_output(out_path, "dictionary", overwrite=overwrite, sources=sources)
            if checkpoint_path is None:
                checkpoint_path = default_checkpoint_path(out_path)
        resume_from = _resume_path(resume, checkpoint_path)
        if out_path is not None and resume_from is None:  # beside the user's output
            _check_checkpoint_free(Path(checkpoint_path), overwrite)  # type: ignore[arg-type]

        if settings.n_features is not None and settings.n_features > n_tokens and not force:
            raise ValueError(
                f"{settings.n_features} features for {n_tokens:,} tokens: more features than tokens "
                "gives a degenerate dictionary (most features never used); choose fewer features "
                "(the default picks a number from the store's size) or force it (--force)"
            )
        mask = control_mask(data, is_control, labels)
        raw_batches = batch_values(data, batches, labels)
        note = settings.size_note(n_tokens)
        if note is not None:
            yield FitMessage(note)
        settings = settings.resolved(n_tokens)
        if resume_from is not None:
            whitening = checkpoint_whitening(*read_checkpoint(resume_from))
        else:
            whitening = ControlWhitening(method=settings.whiten, eps=settings.eps, shrinkage=settings.shrinkage)
            fit_whitening(whitening, data, mask, raw_batches, max_tokens=settings.max_control_tokens,
                          seed=settings.seed, cancel=cancel, warn=False)
            yield FitMessage(whitening.describe(), None)  # which covariance, and why
            if whitening.rank_note_ is not None:
                yield FitMessage(whitening.rank_note_, RankDeficientWarning)
            if cancel_requested(cancel):
                raise Cancelled("cancelled after fitting the whitening; nothing was trained")
        model = self.module_class(
            settings.n_features, whitening.output_dim, seed=settings.seed, **settings.model_options()
        )
        result = yield from iter_train(
            model, whitening, data, settings, batches=raw_batches, cancel=cancel,
            checkpoint_path=checkpoint_path, resume_from=resume_from, keep_checkpoint=keep_checkpoint,
        )
        self._set_fitted(result.model, result.whitening, result.info(), {
            "store": {
                "path": os.fspath(Path(data.path).resolve()) if is_store(data) else None,
                "n_tokens": n_tokens,
                "dim": int(data.dim if is_store(data) else data.shape[1]),
            },
            "control": {
                "spec": _control_text(is_control),
                "n_controls": int(mask.sum()),
                "batch_column": batches if isinstance(batches, str) else None,
            },
        })
        if out_path is not None and is_rank0():
            if not result.cancelled:
                self.save(out_path)
            elif save_partial and result.steps > 0:
                self.save(partial_path(out_path))
        barrier()
        if not result.cancelled and checkpoint_path is not None and not keep_checkpoint and is_rank0():
            Path(checkpoint_path).unlink(missing_ok=True)  # the finished dictionary replaces it
        return self

    def _set_fitted(
        self, model: DictionaryModule, whitening: ControlWhitening, training: dict[str, Any],
        provenance: dict[str, Any],
    ) -> None:
        self.model_ = model.eval()
        self.whitening_ = whitening
        self.training_ = training
        self.provenance_ = provenance
        self.n_features_in_ = int(whitening.metadata()["dim"])

    # ------------------------------------------------------------------ using
    @property
    def components_(self) -> np.ndarray:
        """(n_features, dim) feature directions (decoder rows) in the pre-processed space."""
        self._check_fitted()
        return self.model_.decoder.detach().cpu().numpy().copy()

    def preprocess(self, X: Any, batches: Any = None) -> np.ndarray:
        """Raw tokens (n, n_features_in_) -> pre-processed tokens (n, dim), float32: the saved
        control centring, whitening and unit norm."""
        self._check_fitted()
        X = self._check_raw(X)
        return torch.cat([p.cpu() for p in self._preprocessed_chunks(X, batches)]).numpy()

    def encode(self, X: Any) -> SparseCodes:
        """Sparse codes of pre-processed tokens (n, dim); ``.dense()`` gives (n, n_features)."""
        self._check_fitted()
        X = _as_tokens(X, "X", expected_dim=self.model_.dim, what="pre-processed tokens")
        device = self.model_.decoder.device
        chunks = (X[i : i + ENCODE_BATCH].to(device) for i in range(0, len(X), ENCODE_BATCH))
        return SparseCodes.cat([self.model_.encode(chunk).to("cpu") for chunk in chunks])

    def decode(self, codes: SparseCodes) -> np.ndarray:
        """Reconstructions (n, dim) of codes, in the pre-processed space."""
        self._check_fitted()
        if codes.n_features != self.model_.n_features:
            raise ValueError(
                f"codes have {codes.n_features} features, this dictionary has {self.model_.n_features}"
            )
        with torch.no_grad():
            chunks = (codes[i : i + ENCODE_BATCH] for i in range(0, len(codes), ENCODE_BATCH))
            parts = [self.model_.decode(chunk).cpu() for chunk in chunks]
        return torch.cat(parts).numpy() if parts else np.empty((0, self.model_.dim), np.float32)

    def transform(self, X: Any, batches: Any = None) -> SparseCodes:
        """Raw tokens -> sparse codes (pre-processing then encoding, chunk by chunk)."""
        self._check_fitted()
        X = self._check_raw(X)
        return SparseCodes.cat([self.model_.encode(x).to("cpu") for x in self._preprocessed_chunks(X, batches)])

    def reconstruct(self, X: Any, batches: Any = None) -> np.ndarray:
        """Raw tokens -> their reconstructions in the pre-processed space (n, dim)."""
        self._check_fitted()
        X = self._check_raw(X)
        with torch.no_grad():
            chunks = self._preprocessed_chunks(X, batches)
            parts = [self.model_.decode(self.model_.encode(x)).cpu() for x in chunks]
        return torch.cat(parts).numpy()

    def _preprocessed_chunks(self, X: torch.Tensor, batches: Any):  # -> Iterator[torch.Tensor]
        index = None
        if self.whitening_.method == "pca-batch":
            if batches is None:
                column = recorded_batch_column(self)
                raise ValueError(
                    "this dictionary was whitened per batch ('pca-batch'): the batch of every token "
                    f"is needed{f' (the {column!r} column)' if column else ''}"
                )
            index = torch.from_numpy(self.whitening_.batch_indices(batches, len(X)))
        device = self.model_.decoder.device
        for start in range(0, len(X), ENCODE_BATCH):
            rows = slice(start, start + ENCODE_BATCH)
            yield self.whitening_.transform_torch(X[rows].to(device), None if index is None else index[rows])

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the dictionary, its pre-processing and its provenance to one ``.safetensors``
        file (atomically: a crash never leaves a half-written file)."""
        self._check_fitted()
        params = {key: os.fspath(v) if isinstance(v, os.PathLike) else v for key, v in self.get_params().items()}
        return save_dictionary(path, self.model_, self.whitening_, {
            "training": self.training_,
            **self.provenance_,
            "estimator": {"class": type(self).__name__, "params": params},
        })

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> DictionaryEstimator:
        """Read a dictionary file; returns the estimator of the file's method (an :class:`ICFL`
        or a :class:`TopKSAE`, whichever class this is called on)."""
        model, whitening, metadata = load_dictionary(path, device=resolve_device(device))
        estimator_class = method_class(model.method)
        hyper = model.hyperparameters()
        params: dict[str, Any] = {
            "whiten": whitening.method, "eps": whitening.eps, "shrinkage": whitening.shrinkage,
            **{name: hyper[name] for name in ("n_features", "seed", *estimator_class.settings_class.model_fields())
               if name in hyper},
        }
        saved = metadata.get("estimator", {})
        if saved.get("class") == estimator_class.__name__:  # the settings it was fitted with
            known = estimator_class._get_param_names()
            params.update({key: v for key, v in saved.get("params", {}).items() if key in known})
        params["n_features"] = hyper["n_features"]  # what was fitted, also when it was automatic
        estimator = estimator_class(**{**params, "device": device})
        training = dict(metadata.get("training", {}))
        estimator._set_fitted(model, whitening, training, _provenance(metadata, training))
        estimator.metadata_ = metadata
        return estimator

    # ------------------------------------------------------------------ checks
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() or load() first")

    def _check_raw(self, X: Any) -> torch.Tensor:
        return _as_tokens(X, "X", expected_dim=self.n_features_in_, what="raw tokens")


class ICFL(DictionaryEstimator):
    """Iterative Codebook Feature Learning with control whitening (method.md, "ICFL")."""

    method = ICFLModule.method
    title = "ICFL"
    module_class = ICFLModule
    settings_class = ICFLSettings


class TopKSAE(DictionaryEstimator):
    """TopK sparse autoencoder with AuxK loss and control whitening (method.md, "TopK")."""

    method = TopKModule.method
    title = "TopK SAE"
    module_class = TopKModule
    settings_class = TopKSettings


#: The method registry: name (in files, on the command line) -> estimator class, which names
#: its model class, its settings and its title.
METHODS: dict[str, type[DictionaryEstimator]] = {cls.method: cls for cls in (ICFL, TopKSAE)}


def method_class(name: str) -> type[DictionaryEstimator]:
    """The estimator class of a method name ("icfl", "topk")."""
    if name not in METHODS:
        raise ValueError(f"unknown dictionary method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def recorded_batch_column(estimator: Any) -> str | None:
    """The batch column a per-batch-whitened dictionary was fitted with (its provenance), or
    None (not whitened per batch, or fitted on batch labels given as an array)."""
    if getattr(getattr(estimator, "whitening_", None), "method", None) != "pca-batch":
        return None
    control = (getattr(estimator, "provenance_", None) or {}).get("control") or {}
    return control.get("batch_column")


def _provenance(metadata: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The ``store`` and ``control`` entries of a file's metadata; files written by the
    Dictionary panel before they were unified kept them inside ``training``."""
    store = metadata.get("store") or training.pop("store", None)
    control = metadata.get("control")
    if not isinstance(control, dict):
        spec = control if isinstance(control, str) else training.pop("control", None)
        control = {"spec": spec, "n_controls": None, "batch_column": training.pop("batch_column", None)}
    return {"store": store, "control": control}


def _control_text(is_control: Controls) -> str | None:
    """How the controls were chosen, as recorded in the file (None: a mask given per token)."""
    if is_control is None:
        return DEFAULT_CONTROL
    return str(is_control) if is_control_spec(is_control) else None


def _resume_path(resume: bool | str | os.PathLike, checkpoint_path: str | os.PathLike | None) -> Path | None:
    if resume is False or resume is None:
        return None
    path = checkpoint_path if resume is True else resume
    if path is None:
        raise ValueError("resume=True needs a checkpoint path (or an output file beside which it lies)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist")
    return Path(path)


def _check_checkpoint_free(path: Path, overwrite: bool) -> None:
    """A fresh fit must not replace another fit's checkpoint: that of an interrupted fit only
    with ``overwrite`` (start over), that kept of a finished fit never (it belongs with its
    dictionary: continue it, or remove it)."""
    if not path.exists():
        return
    try:
        _, meta = read_checkpoint(path)
    except (OSError, ValueError):
        raise FileExistsError(
            f"{path} exists and is not a training checkpoint; refusing to replace it: move it away"
        ) from None
    if meta["step"] >= meta["total_steps"]:
        raise FileExistsError(
            f"{path} is the checkpoint kept of a finished fit ({meta['step']} steps); continue that "
            "fit with --resume (and more --steps), or remove the checkpoint to start over"
        )
    if not overwrite:
        raise FileExistsError(
            f"{path} holds the checkpoint of an interrupted fit (step {meta['step']} of "
            f"{meta['total_steps']}): continue it with --resume, or start over with --overwrite"
        )


def _as_tokens(X: Any, name: str, expected_dim: int | None = None, what: str = "tokens") -> torch.Tensor:
    """A float32 (n, dim) tensor, checked for shape and finiteness."""
    tensor = X.detach() if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X, dtype=np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D ({what}: n_tokens x dim), got shape {tuple(tensor.shape)}")
    if expected_dim is not None and tensor.shape[1] != expected_dim:
        raise ValueError(
            f"{name} has {tensor.shape[1]} columns, expected {expected_dim} ({what} of this dictionary)"
        )
    tensor = tensor.float()
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{name} row {int((~finite).nonzero()[0])} holds NaN or inf values")
    return tensor
