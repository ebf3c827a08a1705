"""Control whitening: centre tokens on the unperturbed controls, PCA-whiten with the control
covariance, then normalise each token to unit length (method.md, "Pre-processing").

The transform is fitted on control tokens only and is saved inside the dictionary file
(:meth:`ControlWhitening.state_tensors` / :meth:`ControlWhitening.metadata`), so tokens encoded
later (patch tokens included) get exactly the same pre-processing.

Choices where the publication is silent (ours):

- ``eps`` is relative to the largest control eigenvalue: the ridge added to every eigenvalue is
  ``eps * lambda_max``, which bounds the gain of the weakest directions at
  ``1/sqrt(eps * lambda_max)``.
- The control covariance (``shrinkage``). The publication used the exact covariance; with fewer
  control tokens than dimensions it is singular and exact whitening keeps only the directions
  the controls span, silently dropping the rest of the embedding space (where perturbations may
  vary). The default, ``"auto"``, chooses from the data: the exact covariance when there are at
  least ``PLENTIFUL_CONTROLS`` control tokens per dimension, else the Ledoit-Wolf shrinkage
  estimate ``(1 - a) C + a tr(C)/d I`` (``a`` estimated from the controls), which keeps every
  dimension and scales the directions no control varies along by the average control variance.
  ``"ledoit-wolf"``, ``"oas"`` (Chen et al.'s oracle approximating shrinkage) or a fixed ``a``
  force an estimate; ``None`` is the exact covariance, as published. The choice is recorded
  (:meth:`ControlWhitening.describe`, one line, and in the metadata).
- With the exact covariance, eigenvalues below ``RANK_RTOL * lambda_max`` are dropped
  (numerically zero) and a :class:`RankDeficientWarning` names the effective rank. Fewer than
  2 controls (or, per batch, fewer than 2 in some batch for ``"pca-batch"``) is an error.
- ``"pca-batch"``: PCA on the pooled controls, each batch's controls centred on their own mean
  first (so batch offsets do not inflate the covariance); then each batch is centred and scaled
  per component with its own whitened controls' mean and standard deviation (floored at
  ``sqrt(eps)`` so a component constant within one batch does not blow up). A batch with few
  controls (fewer than ``PLENTIFUL_CONTROLS`` per component) estimates ``rank`` means and
  ``rank`` variances from a handful of tokens; unless the covariance is exact by request
  (``shrinkage=None``), its estimates are shrunk, with weights estimated from the data: its
  mean towards the pooled control mean (positive-part James-Stein: only as far as the noise of
  a mean of so few tokens explains it), its per-component variances, as ratios to the pooled
  within-batch variance, towards their average over components (method of moments: by the part
  of their spread that chi-square noise explains). A component the pooled controls do not vary
  along keeps the batch's average ratio, so shrinkage's unseen directions are not blown up.
- Batch labels are normalised here, and only here, from the raw values
  (:func:`batch_label_texts`): compared as text with
  :func:`~plate_concepts.plates.platemap.as_text`, so ``1``, ``1.0`` and ``"1"`` are the same
  batch whichever table (store obs, plate map) and dtype they come from. Callers pass raw values.
- Unit norm maps a zero vector to zero (norm clamped at a tiny value).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator

from plate_concepts.plates.platemap import as_text

METHODS = ("pca", "pca-batch", "none")
#: Covariance estimates by name (``shrinkage``); None is the exact covariance.
SHRINKAGE_ESTIMATES = ("auto", "ledoit-wolf", "oas")
#: ``"auto"`` uses the exact covariance from this many control tokens per dimension on (and,
#: for ``"pca-batch"``, a batch's exact mean and scales from this many per component on).
PLENTIFUL_CONTROLS = 10
#: The estimate ``"auto"`` uses when controls are few (chosen by ``benchmarks/bench_whitening.py``).
AUTO_SHRINKAGE = "ledoit-wolf"
#: Eigenvalues below this fraction of the largest are treated as exactly zero (rank-deficient).
RANK_RTOL = 1e-10
#: The rule batch names follow, recorded in the metadata (files without it stored ``str(value)``).
BATCH_LABELS = "as_text"
#: Rows per chunk in the float64 numpy path, so big token arrays are not copied whole to float64.
_CHUNK_ROWS = 65536
_TINY = 1e-12
#: A pooled whitened variance below this fraction of the largest: a direction no control varies along.
_SEEN_RTOL = 1e-9


class RankDeficientWarning(UserWarning):
    """The control covariance has fewer non-zero eigenvalues than the token dimension."""


class ControlWhitening(BaseEstimator):
    """Control-centred PCA whitening followed by unit-norm scaling, scikit-learn style.

    Parameters
    ----------
    method
        ``"pca"`` (one whitening fitted on all controls), ``"pca-batch"`` (pooled PCA, then
        per-batch centre-and-scale on each batch's controls) or ``"none"`` (centre on the control
        mean only, no whitening).
    eps
        Ridge added to the eigenvalues, relative to the largest eigenvalue.
    shrinkage
        The control covariance: ``"auto"`` (default; exact with plentiful controls, else
        Ledoit-Wolf — see the module docstring), ``"ledoit-wolf"``, ``"oas"``, a fixed weight
        ``a`` in [0, 1] of ``(1 - a) C + a tr(C)/d I``, or None (the exact covariance, as
        published: with fewer controls than dimensions only the components the controls span are
        kept, and a warning says so).
    unit_norm
        Normalise each transformed token to unit L2 norm (the last pre-processing step).

    Attributes (after fit)
    ----------------------
    control_mean_ : (dim,) mean of the control tokens.
    whitening_ : (rank, dim) matrix ``diag(lambda + eps*lambda_max)^(-1/2) U^T``.
        These and the batch arrays are float64 arrays rounded to float32 precision, so that the
        saved float32 state reproduces the transform exactly.
    eigenvalues_ : (rank,) control eigenvalues kept, descending (None after :meth:`from_state`).
    batch_names_ : list of batch labels (as str), ``"pca-batch"`` only, else None.
    batch_mean_, batch_scale_ : (n_batches, rank) per-batch centre and scale (``"pca-batch"``).
    rank_ : number of components kept (= :attr:`output_dim`).
    rank_note_ : one line explaining a rank-deficient control covariance, else None.
    n_controls_ : number of control tokens the transform was fitted on.
    covariance_ : the covariance estimate used: "exact", "ledoit-wolf", "oas" or "fixed".
    shrinkage_ : its shrinkage weight (0 for exact).
    batch_shrinkage_ : ``"pca-batch"`` only: per batch, the weight kept of its own mean
        (James-Stein) and of its own per-component scales (1, 1 when exact).
    """

    def __init__(
        self, method: str = "pca", eps: float = 1e-6, unit_norm: bool = True, shrinkage: float | str | None = "auto"
    ) -> None:
        self.method = method
        self.eps = eps
        self.unit_norm = unit_norm
        self.shrinkage = shrinkage

    # ------------------------------------------------------------------ fitting
    def fit(self, X: Any, is_control: Any, batches: Any = None, *, warn: bool = True) -> ControlWhitening:
        """Fit on the control tokens of X (n, dim); ``batches`` (n,) is needed for ``"pca-batch"``
        (and ignored by the other methods). Streams over row chunks in float64: memory is
        O(chunk x dim + dim^2), not a float64 copy of the controls. A rank-deficient control
        covariance is explained in ``rank_note_`` (and a :class:`RankDeficientWarning` if
        ``warn``)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown whitening method {self.method!r}; expected one of {METHODS}")
        if not (np.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        X = _to_numpy_2d(X, "X")
        _check_finite(X, "X")
        n, dim = X.shape
        mask = _to_mask(is_control, n)
        n_controls = int(mask.sum())
        if n_controls == 0:
            raise ValueError(f"no control tokens: is_control selects 0 of {n}")

        # Groups whose own control mean is removed before the covariance: one per batch for
        # "pca-batch" (so batch offsets stay out of it), else a single group.
        names = None
        group = np.zeros(n, dtype=np.int64)
        if self.method == "pca-batch":
            labels = batch_label_texts(batches, n)
            names, group = np.unique(labels, return_inverse=True)
            names = names.tolist()
            counts = np.bincount(group[mask], minlength=len(names))
            for index, name in enumerate(names):
                if counts[index] < 2:
                    raise ValueError(
                        f"batch {name!r} has {int((group == index).sum())} tokens but "
                        f"{int(counts[index])} control tokens; 'pca-batch' centres and scales each "
                        "batch on its own controls and needs at least 2 per batch (use "
                        "method='pca', or drop that batch)"
                    )
        else:
            counts = np.array([n_controls])
        n_groups = len(counts)

        sums = np.zeros((n_groups, dim))
        for x, g in _control_chunks(X, mask, group):
            sums += _one_hot(g, n_groups).T @ x
        group_means = sums / counts[:, None]
        control_mean = sums.sum(axis=0) / n_controls

        self.rank_note_: str | None = None
        self.covariance_, self.shrinkage_ = "exact", 0.0
        if self.method == "none":
            whitening, eigenvalues = np.eye(dim), None
        else:
            if n_controls < 2:
                raise ValueError(
                    f"too few control tokens: PCA whitening needs at least 2 to estimate a "
                    f"covariance (and {dim + 1} for full rank in dimension {dim}), got {n_controls}"
                )
            scatter, fourth_moment = np.zeros((dim, dim)), 0.0
            for x, g in _control_chunks(X, mask, group):
                centred = x - group_means[g]
                scatter += centred.T @ centred
                fourth_moment += float(((centred**2).sum(axis=1) ** 2).sum())
            covariance = scatter / (n_controls - n_groups)
            self.covariance_, self.shrinkage_ = self._covariance_estimate(
                scatter / n_controls, fourth_moment, n_controls
            )
            if self.shrinkage_ > 0:
                mean_variance = np.trace(covariance) / dim
                covariance = (1 - self.shrinkage_) * covariance + self.shrinkage_ * mean_variance * np.eye(dim)
            whitening, eigenvalues = self._pca(covariance, n_controls)
            if self.rank_note_ is not None and warn:
                warnings.warn(self.rank_note_, RankDeficientWarning, stacklevel=2)
        # The saved state is float32: round now so fitted and reloaded transforms are identical.
        self.whitening_ = _float32_exact(whitening)
        self.eigenvalues_ = eigenvalues
        self.control_mean_ = _float32_exact(control_mean)
        self.rank_ = self.whitening_.shape[0]
        self.n_controls_ = n_controls
        self.dim_ = dim
        self.batch_names_ = names
        self.batch_mean_ = self.batch_scale_ = self.batch_shrinkage_ = None
        if self.method == "pca-batch":
            self._fit_batches(X, mask, group, group_means, counts)
        self._reset_caches()
        return self

    def _fit_batches(
        self, X: np.ndarray, mask: np.ndarray, group: np.ndarray, group_means: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """Per batch, the whitened controls' mean (linear in the batch mean) and per-component
        standard deviation; shrunk for a batch with few controls (see the module docstring)."""
        n_groups = len(counts)
        means = (group_means - self.control_mean_) @ self.whitening_.T
        squares = np.zeros((n_groups, self.rank_))
        for x, g in _control_chunks(X, mask, group):
            squares += _one_hot(g, n_groups).T @ ((x - group_means[g]) @ self.whitening_.T) ** 2
        variances = squares / (counts[:, None] - 1)
        # Each batch's variances as ratios to the pooled within-batch variance; a component the
        # pooled controls do not vary along (shrinkage keeps it) takes the batch's average ratio.
        pooled = squares.sum(axis=0) / (counts.sum() - n_groups)
        seen = pooled > _SEEN_RTOL * pooled.max()
        ratios = np.where(seen, variances / np.where(seen, pooled, 1.0), np.nan)
        kept = np.ones((n_groups, 2))
        if self.shrinkage is not None and not _is_none_text(self.shrinkage):
            for b in np.flatnonzero(counts < PLENTIFUL_CONTROLS * self.rank_):
                means[b], kept[b, 0] = _james_stein(means[b], variances[b] / counts[b])
                ratios[b, seen], kept[b, 1] = _shrunk_ratios(ratios[b, seen], int(counts[b]))
        ratios = np.where(seen, ratios, np.nanmean(ratios[:, seen], axis=1, keepdims=True))
        # Exact covariance: each batch's controls end white (as published); a shrunk one: the
        # batch is corrected only for how it differs from the pooled controls.
        variances = ratios * (pooled if self.covariance_ == "exact" else 1.0)
        self.batch_mean_ = _float32_exact(means)
        # A component with (near) zero spread inside one batch must not blow up: floor it.
        self.batch_scale_ = _float32_exact(np.maximum(np.sqrt(variances), np.sqrt(max(self.eps, _TINY))))
        self.batch_shrinkage_ = kept

    def _covariance_estimate(self, scatter_mean: np.ndarray, fourth_moment: float, n: int) -> tuple[str, float]:
        """Which covariance estimate, and its shrinkage weight, from the centred controls'
        second moment S and sum of ||x||^4 (streamed, so no n x d copy is needed)."""
        choice = self.shrinkage
        if choice is None or _is_none_text(choice):
            return "exact", 0.0
        if not isinstance(choice, str):
            value = float(choice)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"shrinkage must be in [0, 1], got {value}")
            return "fixed", value
        choice = choice.strip().lower()
        if choice not in SHRINKAGE_ESTIMATES:
            raise ValueError(
                f"shrinkage must be None, {', '.join(map(repr, SHRINKAGE_ESTIMATES))} or a number in "
                f"[0, 1], got {self.shrinkage!r}"
            )
        dim = scatter_mean.shape[0]
        if choice == "auto":
            if n >= PLENTIFUL_CONTROLS * dim:
                return "exact", 0.0
            choice = AUTO_SHRINKAGE
        mu = np.trace(scatter_mean) / dim
        frobenius2 = float(np.linalg.norm(scatter_mean, "fro") ** 2)
        if choice == "oas":  # Chen, Wiesel, Eldar & Hero (2010), as scikit-learn computes it
            alpha = frobenius2 / dim**2
            denominator = (n + 1) * (alpha - mu**2 / dim)
            return "oas", float(min((alpha + mu**2) / denominator, 1.0)) if denominator > 0 else 1.0
        # Ledoit & Wolf (2004): sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2
        delta = (frobenius2 - 2 * mu * np.trace(scatter_mean) + dim * mu**2) / dim
        beta = (fourth_moment - n * frobenius2) / (n**2 * dim)
        return "ledoit-wolf", float(min(max(beta, 0.0), delta) / delta) if delta > 0 else 1.0

    def describe(self) -> str:
        """One line: the pre-processing and why this covariance estimate (for logs and panels)."""
        self._check_fitted()
        if self.method == "none":
            return f"whitening: none (centred on the mean of {self.n_controls_:,} control tokens)"
        n, dim = self.n_controls_, self.dim_
        name = {"exact": "exact", "ledoit-wolf": "Ledoit-Wolf shrunk", "oas": "OAS shrunk",
                "fixed": "shrunk"}[self.covariance_]
        coefficient = "" if self.covariance_ == "exact" else f" (weight {self.shrinkage_:.3g})"
        if self.shrinkage is None or _is_none_text(self.shrinkage):
            why = "as asked"
        elif isinstance(self.shrinkage, str) and self.shrinkage.strip().lower() == "auto" and n:
            relation = ">=" if self.covariance_ == "exact" else "<"
            why = f"auto: {n:,} controls {relation} {PLENTIFUL_CONTROLS} x {dim:,} dimensions"
        else:
            why = "as asked"
        kept = f"{self.rank_:,} of {dim:,} dimensions kept"
        batches = ""
        if self.batch_shrinkage_ is not None:
            few = int((np.asarray(self.batch_shrinkage_) < 1).any(axis=1).sum())
            batches = f"; per batch ({len(self.batch_names_ or [])}): {few} with few controls shrunk"
        controls = f"{n:,} control tokens" if n else "the controls"
        return f"whitening: {self.method} on {controls}, {name} covariance{coefficient} ({why}); {kept}{batches}"

    def _pca(self, covariance: np.ndarray, n_controls: int) -> tuple[np.ndarray, np.ndarray]:
        dim = covariance.shape[0]
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # descending
        # Deterministic signs (largest entry of each eigenvector positive): refits agree.
        largest = np.abs(eigenvectors).argmax(axis=0)
        eigenvectors = eigenvectors * np.sign(eigenvectors[largest, np.arange(dim)])
        lambda_max = float(eigenvalues[0])
        if lambda_max <= 0:
            raise ValueError(
                f"the {n_controls} control tokens have zero covariance (all identical within "
                "their batches); cannot whiten"
            )
        keep = eigenvalues > RANK_RTOL * lambda_max
        rank = int(keep.sum())
        if rank < dim:
            need = f" (full rank needs at least {dim + 1})" if n_controls <= dim else ""
            self.rank_note_ = (
                f"the {n_controls} control tokens{need} vary along only {rank} of the {dim} "
                f"embedding dimensions, so the other {dim - rank} directions (where no control "
                "varies, and perturbations may) are dropped before the dictionary is fitted; "
                "to keep them, use shrinkage 'auto' (--shrinkage auto)"
            )
        kept = eigenvalues[keep]
        gain = 1.0 / np.sqrt(kept + self.eps * lambda_max)
        return (eigenvectors[:, keep] * gain).T, kept

    def fit_transform(self, X: Any, is_control: Any, batches: Any = None) -> Any:
        return self.fit(X, is_control, batches).transform(X, batches)

    # ------------------------------------------------------------------ transforming
    @property
    def input_dim(self) -> int:
        """Dimension of the raw tokens the transform expects."""
        self._check_fitted()
        return int(self.dim_)

    @property
    def output_dim(self) -> int:
        """Dimension of transformed tokens (the number of components kept)."""
        self._check_fitted()
        return int(self.rank_)

    def batch_indices(self, batches: Any, n: int | None = None) -> np.ndarray:
        """Map batch labels to row indices of ``batch_mean``/``batch_scale`` (for
        :meth:`transform_torch`); an unknown batch raises, naming it."""
        self._check_fitted()
        if self.batch_names_ is None:
            raise ValueError(f"method {self.method!r} has no batches")
        labels = batch_label_texts(batches, n)
        lookup = {name: i for i, name in enumerate(self.batch_names_)}
        try:
            return np.fromiter(
                (lookup[b] for b in labels.tolist()), dtype=np.int64, count=len(labels)
            )
        except KeyError as err:
            raise ValueError(
                f"batch {err.args[0]!r} was not among the batches this whitening was fitted on "
                f"({', '.join(map(repr, self.batch_names_))}): each batch is centred on its own "
                "controls, so tokens of another batch cannot be pre-processed"
            ) from None

    def transform(self, X: Any, batches: Any = None) -> Any:
        """Pre-process tokens X (n, dim); numpy in -> numpy out, torch in -> torch out (same
        device). Computed in float64; output float64 for float64 input, else float32."""
        self._check_fitted()
        is_torch, device, out_dtype = _input_kind(X)
        X = _to_numpy_2d(X, "X")
        self._check_dim(X, self.dim_, "X")
        _check_finite(X, "X")
        index = self._batch_index_for(batches, X.shape[0])
        out = np.empty((X.shape[0], self.rank_), dtype=out_dtype)
        for rows in _chunks(X.shape[0]):
            z = (X[rows].astype(np.float64) - self.control_mean_) @ self.whitening_.T
            if index is not None:
                z = (z - self.batch_mean_[index[rows]]) / self.batch_scale_[index[rows]]
            if self.unit_norm:
                z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), _TINY)
            out[rows] = z
        return _output(out, is_torch, device)

    def inverse_transform(self, Z: Any, batches: Any = None) -> Any:
        """Undo the whitening (and per-batch centre-and-scale): tokens in the original space.

        Unit norm is not invertible: for unit-norm inputs the result lies on the same ray from the
        control mean as the original token (its direction), not at the token itself. With a
        reduced rank, the result is the token's projection on the kept components.
        """
        self._check_fitted()
        is_torch, device, out_dtype = _input_kind(Z)
        Z = _to_numpy_2d(Z, "Z")
        self._check_dim(Z, self.rank_, "Z")
        _check_finite(Z, "Z")
        index = self._batch_index_for(batches, Z.shape[0])
        if self._unwhitening is None:
            self._unwhitening = np.linalg.pinv(self.whitening_)  # (dim, rank)
        out = np.empty((Z.shape[0], self.dim_), dtype=out_dtype)
        for rows in _chunks(Z.shape[0]):
            z = Z[rows].astype(np.float64)
            if index is not None:
                z = z * self.batch_scale_[index[rows]] + self.batch_mean_[index[rows]]
            out[rows] = z @ self._unwhitening.T + self.control_mean_
        return _output(out, is_torch, device)

    def transform_torch(
        self, x: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 transform on x's device (GPU-friendly, for training and encoding loops).

        ``batch_index`` (n,) int: rows of :attr:`batch_names_` (see :meth:`batch_indices`),
        required for ``"pca-batch"``. Matches :meth:`transform` up to float32 rounding, which the
        whitening amplifies by at most ``1/sqrt(eps)`` along the weakest control directions.
        """
        self._check_fitted()
        if x.ndim != 2 or x.shape[1] != self.dim_:
            raise ValueError(f"x must be (n, {self.dim_}), got shape {tuple(x.shape)}")
        cache = self._torch_cache.get(x.device)
        if cache is None:
            cache = {
                name: t.to(x.device, torch.float32) for name, t in self.state_tensors().items()
            }
            self._torch_cache[x.device] = cache
        z = (x.to(torch.float32) - cache["control_mean"]) @ cache["whitening"].T
        if self.method == "pca-batch":
            if batch_index is None:
                raise ValueError("method 'pca-batch' needs batch_index (see batch_indices())")
            batch_index = batch_index.to(x.device, torch.long)
            if batch_index.shape != (x.shape[0],):
                raise ValueError(
                    f"batch_index must be ({x.shape[0]},), got {tuple(batch_index.shape)}"
                )
            z = (z - cache["batch_mean"][batch_index]) / cache["batch_scale"][batch_index]
        if self.unit_norm:
            z = torch.nn.functional.normalize(z, dim=1, eps=_TINY)
        return z

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for the dictionary file, all float32 (lossless: the fitted values are rounded
        to float32 precision): ``control_mean`` (dim), ``whitening`` (rank x dim) and, for
        ``"pca-batch"``, ``batch_mean`` and ``batch_scale`` (n_batches x rank)."""
        self._check_fitted()
        arrays = {"control_mean": self.control_mean_, "whitening": self.whitening_}
        if self.method == "pca-batch":
            arrays |= {"batch_mean": self.batch_mean_, "batch_scale": self.batch_scale_}
        return {name: torch.from_numpy(a.astype(np.float32)) for name, a in arrays.items()}

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable settings and fit summary (for the dictionary file header)."""
        self._check_fitted()
        return {
            "method": self.method,
            "eps": float(self.eps),
            "unit_norm": bool(self.unit_norm),
            "shrinkage": self.shrinkage,
            "covariance": self.covariance_,
            "shrinkage_coefficient": float(self.shrinkage_),
            "batch_shrinkage": None if self.batch_shrinkage_ is None else np.asarray(self.batch_shrinkage_).tolist(),
            "choice": self.describe(),
            "dim": int(self.dim_),
            "rank": int(self.rank_),
            "n_controls": int(self.n_controls_),
            "batches": None if self.batch_names_ is None else list(self.batch_names_),
            "batch_labels": BATCH_LABELS,
        }

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
    ) -> ControlWhitening:
        """Rebuild a fitted transform from :meth:`state_tensors` and :meth:`metadata`."""
        for key in ("method", "eps", "unit_norm"):
            if key not in metadata:
                raise ValueError(f"whitening metadata lacks {key!r} (has {sorted(metadata)})")
        shrinkage = metadata.get("shrinkage")
        self = cls(method=metadata["method"], eps=metadata["eps"], unit_norm=metadata["unit_norm"],
                   shrinkage=shrinkage)
        self.shrinkage_ = float(metadata.get("shrinkage_coefficient", 0.0))
        self.covariance_ = metadata.get("covariance")
        if self.covariance_ is None:  # a file from before the choice was recorded
            self.covariance_ = "exact" if shrinkage is None else "fixed"
            if shrinkage == "auto":  # "auto" then meant Ledoit-Wolf, whatever the controls
                self.covariance_ = self.shrinkage = "ledoit-wolf"
        batch_shrinkage = metadata.get("batch_shrinkage")
        self.batch_shrinkage_ = None if batch_shrinkage is None else np.asarray(batch_shrinkage, dtype=np.float64)
        if self.method not in METHODS:
            raise ValueError(
                f"unknown whitening method {self.method!r} in metadata; expected {METHODS}"
            )
        needed = ["control_mean", "whitening"] + (
            ["batch_mean", "batch_scale"] if self.method == "pca-batch" else []
        )
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise ValueError(f"whitening tensors missing {missing} (have {sorted(tensors)})")

        def as64(name: str) -> np.ndarray:
            return tensors[name].detach().cpu().to(torch.float64).numpy().copy()

        self.control_mean_ = as64("control_mean")
        self.whitening_ = as64("whitening")
        if (
            self.control_mean_.ndim != 1
            or self.whitening_.ndim != 2
            or self.whitening_.shape[1] != len(self.control_mean_)
        ):
            raise ValueError(
                f"whitening tensors disagree: control_mean {tuple(self.control_mean_.shape)}, "
                f"whitening {tuple(self.whitening_.shape)} (expected (dim,) and (rank, dim))"
            )
        self.dim_ = len(self.control_mean_)
        self.rank_ = self.whitening_.shape[0]
        self.eigenvalues_ = None
        self.rank_note_ = None
        self.n_controls_ = int(metadata.get("n_controls", 0))
        self.batch_names_ = self.batch_mean_ = self.batch_scale_ = None
        if self.method == "pca-batch":
            names = metadata.get("batches")
            if self.batch_shrinkage_ is None:
                self.batch_shrinkage_ = np.ones((len(names or []), 2))
            self.batch_mean_, self.batch_scale_ = as64("batch_mean"), as64("batch_scale")
            expected = (len(names or []), self.rank_)
            if (
                not names
                or self.batch_mean_.shape != expected
                or self.batch_scale_.shape != expected
            ):
                raise ValueError(
                    f"pca-batch state disagrees: {len(names or [])} batch names, "
                    f"batch_mean {tuple(self.batch_mean_.shape)}, "
                    f"batch_scale {tuple(self.batch_scale_.shape)} (expected {expected})"
                )
            self.batch_names_ = [str(name) for name in names]
            if metadata.get("batch_labels") != BATCH_LABELS:  # older file: str(value) names
                self.batch_names_ = [_legacy_batch_name(name) for name in self.batch_names_]
        self._reset_caches()
        return self

    # ------------------------------------------------------------------ helpers
    def _reset_caches(self) -> None:
        self._unwhitening: np.ndarray | None = None
        self._torch_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _check_fitted(self) -> None:
        if not hasattr(self, "whitening_"):
            raise RuntimeError(
                "ControlWhitening is not fitted yet: call fit() or from_state() first"
            )

    @staticmethod
    def _check_dim(X: np.ndarray, expected: int, name: str) -> None:
        if X.shape[1] != expected:
            raise ValueError(
                f"{name} has {X.shape[1]} columns; the fitted transform expects {expected}"
            )

    def _batch_index_for(self, batches: Any, n: int) -> np.ndarray | None:
        if self.method != "pca-batch":
            return None
        if batches is None:
            raise ValueError(_NEEDS_BATCHES)
        return self.batch_indices(batches, n)


def _input_kind(X: Any) -> tuple[bool, torch.device | None, type]:
    """Whether X is a tensor, its device, and the output numpy dtype."""
    if isinstance(X, torch.Tensor):
        return True, X.device, (np.float64 if X.dtype == torch.float64 else np.float32)
    dtype = getattr(X, "dtype", None)
    return False, None, (np.float64 if dtype == np.float64 else np.float32)


def _output(out: np.ndarray, is_torch: bool, device: torch.device | None) -> Any:
    return torch.from_numpy(out).to(device) if is_torch else out


def _to_numpy_2d(X: Any, name: str) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu()
        if X.dtype in (torch.float16, torch.bfloat16):
            X = X.float()
        X = X.numpy()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens x dim), got {X.ndim}-D with shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"{name} must hold numbers, got dtype {X.dtype}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    return X


def _check_finite(X: np.ndarray, name: str) -> None:
    for rows in _chunks(X.shape[0]):
        bad = ~np.isfinite(X[rows]).all(axis=1)
        if bad.any():
            row = rows.start + int(np.argmax(bad))
            raise ValueError(f"{name} row {row} holds NaN or inf values")


def _to_mask(is_control: Any, n: int) -> np.ndarray:
    if isinstance(is_control, torch.Tensor):
        is_control = is_control.detach().cpu().numpy()
    mask = np.asarray(is_control)
    if mask.shape != (n,):
        raise ValueError(
            f"is_control must have shape ({n},) (one flag per token), got {mask.shape}"
        )
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("is_control must be boolean (or 0/1)")
        mask = mask.astype(bool)
    return mask


_NEEDS_BATCHES = (
    "whitening per batch ('pca-batch') needs the batch of every token: choose the batch column "
    "(--batch-column on the command line)"
)


def batch_label_texts(batches: Any, n: int | None = None) -> np.ndarray:
    """Raw batch labels (n,) -> their names as text (object array): the one normalisation of
    batch labels, with :func:`~plate_concepts.plates.platemap.as_text` (1, 1.0, "1" -> "1").
    A token without a batch label is an error naming it."""
    if batches is None:
        raise ValueError(_NEEDS_BATCHES)
    if isinstance(batches, torch.Tensor):
        batches = batches.detach().cpu().numpy()
    values = batches.to_numpy() if isinstance(batches, pd.Series) else np.asarray(batches, dtype=object)
    if values.ndim != 1 or (n is not None and values.shape[0] != n):
        raise ValueError(
            f"batch labels must be one per token ({n} tokens), got an array of shape {values.shape}"
        )
    codes, uniques = pd.factorize(values, use_na_sentinel=True)  # as_text once per distinct value
    if (codes < 0).any():
        raise ValueError(f"token {int(np.argmax(codes < 0))} has no batch label (an empty cell)")
    texts = np.array([as_text(value) for value in uniques] + [""], dtype=object)
    return texts[codes]


def _is_none_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "none"


def _james_stein(mean: np.ndarray, noise_variance: np.ndarray) -> tuple[np.ndarray, float]:
    """A batch's whitened control mean shrunk towards 0 (the pooled control mean) by the
    positive-part James-Stein rule, given the variance of each component's estimate; returns it
    and the weight kept."""
    p = len(mean)
    norm2 = float(mean @ mean)
    noise = float(noise_variance.sum()) * max(p - 2, 0) / p
    kept = max(0.0, 1.0 - noise / norm2) if norm2 > 0 else 0.0
    return kept * mean, kept


def _shrunk_ratios(ratios: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Per-component variance ratios of a batch of ``n`` controls shrunk towards their average:
    the weight kept is the part of their spread over components that the chi-square noise of a
    variance from ``n - 1`` degrees of freedom does not explain (method of moments)."""
    average = float(ratios.mean())
    noise = 2.0 * average**2 / max(n - 1, 1)
    signal = max(float(ratios.var()) - noise, 0.0)
    kept = signal / (signal + noise) if signal + noise > 0 else 0.0
    return average + kept * (ratios - average), kept


def _legacy_batch_name(name: str) -> str:
    """A batch name as older files stored it (``str(1.0)`` = "1.0") -> the name :func:`as_text`
    gives the same value ("1")."""
    try:
        value = float(name)
    except ValueError:
        return name
    return as_text(value) if str(value) == name else name


def _control_chunks(
    X: np.ndarray, mask: np.ndarray, group: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The control rows of X, chunk by chunk, in float64, with their group indices."""
    for rows in _chunks(X.shape[0]):
        keep = mask[rows]
        if keep.any():
            yield X[rows][keep].astype(np.float64), group[rows][keep]


def _float32_exact(values: np.ndarray) -> np.ndarray:
    """float64 array holding float32-representable values (what the saved state can hold)."""
    return values.astype(np.float32).astype(np.float64)


def _one_hot(group: np.ndarray, n_groups: int) -> np.ndarray:
    return (group[:, None] == np.arange(n_groups)).astype(np.float64)


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _CHUNK_ROWS):
        yield slice(start, min(start + _CHUNK_ROWS, n))
