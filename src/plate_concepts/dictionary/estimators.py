"""scikit-learn-style estimators: ``ICFL`` and ``TopKSAE``.

Each bundles the pre-processing (control centring, whitening, unit norm) with a dictionary::

    icfl = ICFL(n_features=512, steps=2000).fit(tokens, is_control=controls)
    codes = icfl.transform(new_tokens)        # SparseCodes; codes.dense() for a matrix
    icfl.save("dictionary.safetensors")
    icfl = ICFL.load("dictionary.safetensors")

``encode``/``decode``/``reconstruct`` work in the pre-processed space; ``transform`` and
``preprocess`` take raw tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.io import load_dictionary, save_dictionary
from plate_concepts.dictionary.trainer import (
    Callback,
    Cancel,
    TrainingConfig,
    build_model,
    fit_whitening,
    is_store,
    resolve_device,
    train,
)
from plate_concepts.dictionary.whitening import ControlWhitening

#: Tokens per chunk when pre-processing / encoding many tokens.
ENCODE_BATCH = 8192


class _DictionaryEstimator(BaseEstimator):
    """Shared fit / transform / save logic; subclasses name the method and its options."""

    method: ClassVar[str]
    _model_options: ClassVar[tuple[str, ...]]

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: Any,
        is_control: Any = None,
        batches: Any = None,
        callback: Callback | None = None,
        cancel: Cancel | None = None,
    ) -> _DictionaryEstimator:
        """Fit the whitening on the control tokens of ``X`` (raw tokens, (n, dim) array or an
        EmbeddingStore), then the dictionary on all tokens. ``is_control``: bool per token
        (a store's default is ``obs['is_control']``); ``batches``: per-token batch labels (or a
        store's obs column) for ``whiten="pca-batch"``. A cancelled fit keeps the model so far
        (``training_['cancelled']`` is True)."""
        if not is_store(X):
            X = _as_tokens(X, "X")
        whitening = ControlWhitening(method=self.whiten, eps=self.eps, shrinkage=self.shrinkage)
        fit_whitening(whitening, X, is_control, batches, max_tokens=self.max_control_tokens, seed=self.seed)
        options = {name: getattr(self, name) for name in self._model_options}
        model = build_model(self.method, self.n_features, whitening.output_dim, seed=self.seed, **options)
        config = TrainingConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
            seed=self.seed, device=self.device, autocast_bf16=self.autocast_bf16,
            log_every=self.log_every, checkpoint_every=self.checkpoint_every,
            checkpoint_path=self.checkpoint_path, max_control_tokens=self.max_control_tokens,
        )
        result = train(model, whitening, X, config, batches=batches, callback=callback, cancel=cancel)
        self._set_fitted(result.model, result.whitening, result.info())
        return self

    def _set_fitted(self, model: DictionaryModule, whitening: ControlWhitening, training: dict[str, Any]) -> None:
        self.model_ = model.eval()
        self.whitening_ = whitening
        self.training_ = training
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
                raise ValueError(
                    "this dictionary was fitted with whiten='pca-batch': pass batches= (one label per token)"
                )
            index = torch.from_numpy(self.whitening_.batch_indices(batches, len(X)))
        device = self.model_.decoder.device
        for start in range(0, len(X), ENCODE_BATCH):
            rows = slice(start, start + ENCODE_BATCH)
            yield self.whitening_.transform_torch(X[rows].to(device), None if index is None else index[rows])

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the dictionary and its pre-processing to one ``.safetensors`` file."""
        self._check_fitted()
        params = {key: os.fspath(v) if isinstance(v, os.PathLike) else v for key, v in self.get_params().items()}
        return save_dictionary(
            path, self.model_, self.whitening_,
            {"training": self.training_, "estimator": {"class": type(self).__name__, "params": params}},
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> _DictionaryEstimator:
        """Read a dictionary file; returns an :class:`ICFL` or a :class:`TopKSAE` according to
        the file's method (whichever class this is called on)."""
        model, whitening, metadata = load_dictionary(path, device=resolve_device(device))
        estimator_class = {"icfl": ICFL, "topk": TopKSAE}[model.method]
        hyper = model.hyperparameters()
        options = {name: hyper[name] for name in estimator_class._model_options if name in hyper}
        params: dict[str, Any] = {
            "n_features": hyper["n_features"], "whiten": whitening.method, "eps": whitening.eps,
            "shrinkage": whitening.shrinkage,
            "seed": hyper.get("seed", 0), **options,
        }
        saved = metadata.get("estimator", {})
        if saved.get("class") == estimator_class.__name__:  # the settings it was fitted with
            known = estimator_class._get_param_names()
            params.update({key: v for key, v in saved.get("params", {}).items() if key in known})
        estimator = estimator_class(**{**params, "device": device})
        estimator._set_fitted(model, whitening, metadata.get("training", {}))
        estimator.metadata_ = metadata
        return estimator

    # ------------------------------------------------------------------ checks
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() or load() first")

    def _check_raw(self, X: Any) -> torch.Tensor:
        return _as_tokens(X, "X", expected_dim=self.n_features_in_, what="raw tokens")


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


_COMMON_DOC = """
    whiten
        Pre-processing: "pca" (control-centred PCA whitening), "pca-batch" (plus per-batch
        centre-and-scale) or "none" (control centring only); unit norm follows in all cases.
    eps
        Whitening ridge, relative to the largest control eigenvalue.
    steps, batch_size, lr, warmup_steps, seed, device, autocast_bf16, log_every,
    checkpoint_every, checkpoint_path, max_control_tokens
        Training settings, see :class:`~plate_concepts.dictionary.trainer.TrainingConfig`.
"""


class ICFL(_DictionaryEstimator):
    __doc__ = (
        """Iterative Codebook Feature Learning with control whitening (method.md, "ICFL").

    Parameters
    ----------
    n_features
        Dictionary size M.
    n_rounds, per_round
        Pursuit rounds J and features per round L (at most J*L non-zeros per token).
    resample_every, resample_threshold
        Redraw one of each pair of features with cosine above the threshold every so many steps.
    use_gram
        Encode with the Gram-matrix pursuit (faster, same codes)."""
        + _COMMON_DOC
    )

    method = "icfl"
    _model_options = ("n_rounds", "per_round", "resample_every", "resample_threshold", "use_gram")

    def __init__(
        self,
        n_features: int = 8192,
        n_rounds: int = 20,
        per_round: int = 5,
        *,
        resample_every: int = 100,
        resample_threshold: float = 0.9,
        use_gram: bool = True,
        whiten: str = "pca",
        eps: float = 1e-6,
        shrinkage: float | str | None = None,
        steps: int = 2000,
        batch_size: int = 4096,
        lr: float | None = None,
        warmup_steps: int | None = None,
        seed: int = 0,
        device: str = "auto",
        autocast_bf16: bool = False,
        log_every: int = 50,
        checkpoint_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        max_control_tokens: int = 50_000,
    ) -> None:
        self.n_features = n_features
        self.n_rounds = n_rounds
        self.per_round = per_round
        self.resample_every = resample_every
        self.resample_threshold = resample_threshold
        self.use_gram = use_gram
        self.whiten = whiten
        self.eps = eps
        self.shrinkage = shrinkage
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.device = device
        self.autocast_bf16 = autocast_bf16
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = checkpoint_path
        self.max_control_tokens = max_control_tokens


class TopKSAE(_DictionaryEstimator):
    __doc__ = (
        """TopK sparse autoencoder with AuxK loss and control whitening (method.md, "TopK").

    Parameters
    ----------
    n_features
        Dictionary size M.
    k
        Active features per token.
    k_aux, aux_weight, dead_window_tokens
        AuxK loss: the top ``k_aux`` dead features (silent for ``dead_window_tokens`` tokens)
        reconstruct the residual, weighted by ``aux_weight``."""
        + _COMMON_DOC
    )

    method = "topk"
    _model_options = ("k", "k_aux", "aux_weight", "dead_window_tokens")

    def __init__(
        self,
        n_features: int = 8192,
        k: int = 32,
        *,
        k_aux: int | None = None,
        aux_weight: float = 1 / 32,
        dead_window_tokens: int = 1_000_000,
        whiten: str = "pca",
        eps: float = 1e-6,
        shrinkage: float | str | None = None,
        steps: int = 2000,
        batch_size: int = 4096,
        lr: float | None = None,
        warmup_steps: int | None = None,
        seed: int = 0,
        device: str = "auto",
        autocast_bf16: bool = False,
        log_every: int = 50,
        checkpoint_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        max_control_tokens: int = 50_000,
    ) -> None:
        self.n_features = n_features
        self.k = k
        self.k_aux = k_aux
        self.aux_weight = aux_weight
        self.dead_window_tokens = dead_window_tokens
        self.whiten = whiten
        self.eps = eps
        self.shrinkage = shrinkage
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.device = device
        self.autocast_bf16 = autocast_bf16
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = checkpoint_path
        self.max_control_tokens = max_control_tokens
