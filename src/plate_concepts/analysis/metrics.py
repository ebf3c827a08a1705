"""Reconstruction and feature-usage metrics, accumulated batch by batch.

Both accumulators only keep a few sums, so a metric over a whole embedding store is computed by
streaming it through :meth:`update` and reads exactly the same as a one-shot computation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import sparse

from plate_concepts.dictionary.codes import SparseCodes

ArrayLike = np.ndarray | torch.Tensor

# Norms below this count as zero when computing a cosine (same convention as
# torch.nn.functional.cosine_similarity): a zero vector has cosine 0 with anything.
_COSINE_EPS = 1e-8


def _as_float64(a: ArrayLike, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float64 tensor; stays on a CUDA device (no copy of a whole batch to the host)."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64
            t = t.cpu()
    else:
        arr = np.asarray(a, dtype=np.float64)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if like is not None:
        t = t.to(like.device)
    return t.to(torch.float64)


def _total(per_token: torch.Tensor) -> float:
    """The sum of per-token values in a fixed order. Torch sums a whole tensor in pieces, one per
    thread, so its last digits would change with the thread count (a pass's Dask workers run one
    thread each, ``evaluate`` in this process several) and the two would not read the same."""
    return float(np.sum(per_token.cpu().numpy()))


class ReconstructionMetrics:
    """Fraction of variance unexplained (FVU) and mean cosine similarity of x and x_hat.

    ``fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` with the mean over *all* tokens seen.
    The denominator is accumulated with Chan's pairwise update of (mean, sum of squared
    deviations), so it is exact over batches and does not suffer from cancellation when the
    mean is large compared with the spread.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self._mean: np.ndarray | None = None  # (d,) running mean of x
        self._sq_dev = 0.0  # sum ||x - mean||^2 over tokens seen
        self._sq_err = 0.0  # sum ||x - x_hat||^2
        self._cos_sum = 0.0

    def update(self, x: ArrayLike, x_hat: ArrayLike) -> None:
        """Add a batch of tokens ``x`` (n, d) and their reconstructions ``x_hat`` (n, d)."""
        xt = _as_float64(x)
        xh = _as_float64(x_hat, like=xt)
        if xt.ndim != 2 or xt.shape != xh.shape:
            raise ValueError(
                f"x {tuple(xt.shape)} and x_hat {tuple(xh.shape)} must both be (n_tokens, dim)"
            )
        if self._mean is not None and xt.shape[1] != self._mean.shape[0]:
            raise ValueError(
                f"batch has dim {xt.shape[1]}, earlier batches had {self._mean.shape[0]}"
            )
        n_b = xt.shape[0]
        if n_b == 0:
            return
        mean_b = xt.mean(dim=0)
        sq_dev_b = _total(((xt - mean_b) ** 2).sum(dim=1))
        self._sq_err += _total(((xt - xh) ** 2).sum(dim=1))
        dot = (xt * xh).sum(dim=1)
        norms = xt.norm(dim=1).clamp_min(_COSINE_EPS) * xh.norm(dim=1).clamp_min(_COSINE_EPS)
        self._cos_sum += _total(dot / norms)

        mean_b_np = mean_b.cpu().numpy()
        if self._mean is None:
            self._mean, self._sq_dev = mean_b_np, sq_dev_b
        else:
            n_a = self.n_tokens
            delta = mean_b_np - self._mean
            n = n_a + n_b
            self._sq_dev += sq_dev_b + float(delta @ delta) * n_a * n_b / n
            self._mean = self._mean + delta * (n_b / n)
        self.n_tokens += n_b

    def _require_tokens(self) -> None:
        if self.n_tokens == 0:
            raise ValueError("no tokens were added: call update(x, x_hat) first")

    @property
    def fvu(self) -> float:
        """Fraction of variance unexplained; NaN when all tokens are identical (no variance)."""
        self._require_tokens()
        if self._sq_dev == 0.0:
            return math.nan
        return self._sq_err / self._sq_dev

    @property
    def cosine(self) -> float:
        """Mean over tokens of cos(x, x_hat)."""
        self._require_tokens()
        return self._cos_sum / self.n_tokens

    @property
    def mse(self) -> float:
        """Mean over tokens of ||x - x_hat||^2."""
        self._require_tokens()
        return self._sq_err / self.n_tokens

    def result(self) -> dict[str, Any]:
        return {"fvu": self.fvu, "cosine": self.cosine, "mse": self.mse, "n_tokens": self.n_tokens}


def fvu(x: ArrayLike, x_hat: ArrayLike) -> float:
    """Fraction of variance unexplained of one batch (see :class:`ReconstructionMetrics`)."""
    m = ReconstructionMetrics()
    m.update(x, x_hat)
    return m.fvu


def mean_cosine(x: ArrayLike, x_hat: ArrayLike) -> float:
    """Mean cosine similarity between the rows of ``x`` and ``x_hat``."""
    m = ReconstructionMetrics()
    m.update(x, x_hat)
    return m.cosine


def codes_matrix(codes: SparseCodes) -> sparse.csr_array:
    """Codes as a sparse (n_tokens, n_features) CSR matrix equal to ``codes.dense()``: repeated
    indices summed, zeros (inactive slots) dropped, so its stored entries are the active pairs."""
    indices = codes.indices.detach().cpu().numpy().astype(np.int64, copy=False)
    values = codes.values.detach().cpu().numpy()
    if indices.size and (indices.min() < 0 or indices.max() >= codes.n_features):
        raise ValueError(
            f"code indices must lie in [0, {codes.n_features}), found {indices.min()}..{indices.max()}"
        )
    rows = np.repeat(np.arange(len(codes), dtype=np.int64), indices.shape[1])
    matrix = sparse.csr_array((values.ravel(), (rows, indices.ravel())), shape=(len(codes), codes.n_features))
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def active_pairs(codes: SparseCodes) -> tuple[np.ndarray, np.ndarray]:
    """(rows, features) of the distinct active (non-zero) entries of ``codes``: the support of
    :meth:`SparseCodes.dense`, whatever the slot layout (a CSR build, much faster than np.unique)."""
    coo = codes_matrix(codes).tocoo()
    return coo.row.astype(np.int64), coo.col.astype(np.int64)


class FeatureUsage:
    """How often each of ``n_features`` features fires, accumulated over batches of codes.

    A feature counts as dead when its frequency over the tokens seen is below a threshold
    (publication: 1e-5 over a recent window; use a fresh accumulator per window).
    """

    def __init__(self, n_features: int) -> None:
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_features = n_features
        self.n_tokens = 0
        self._active_counts = np.zeros(n_features, dtype=np.int64)
        self._value_sums = np.zeros(n_features, dtype=np.float64)

    def update(self, codes: SparseCodes) -> None:
        if codes.n_features != self.n_features:
            raise ValueError(
                f"codes have {codes.n_features} features, this accumulator counts {self.n_features}"
            )
        _, features = active_pairs(codes)
        self._active_counts += np.bincount(features, minlength=self.n_features)
        values = codes.values.detach().cpu().numpy().astype(np.float64).ravel()
        indices = codes.indices.detach().cpu().numpy().astype(np.int64).ravel()
        # Inactive slots carry value 0 and so add nothing, whatever index they repeat.
        self._value_sums += np.bincount(indices, weights=values, minlength=self.n_features)
        self.n_tokens += len(codes)

    def _require_tokens(self) -> None:
        if self.n_tokens == 0:
            raise ValueError("no codes were added: call update(codes) first")

    @property
    def active_counts(self) -> np.ndarray:
        """(n_features,) number of tokens on which each feature is non-zero."""
        return self._active_counts.copy()

    @property
    def frequency(self) -> np.ndarray:
        """(n_features,) fraction of tokens on which each feature is non-zero."""
        self._require_tokens()
        return self._active_counts / self.n_tokens

    @property
    def l0(self) -> float:
        """Mean number of distinct non-zero features per token."""
        self._require_tokens()
        return float(self._active_counts.sum() / self.n_tokens)

    @property
    def mean_activation(self) -> np.ndarray:
        """(n_features,) mean code value of each feature over all tokens (inactive = 0)."""
        self._require_tokens()
        return self._value_sums / self.n_tokens

    def dead_mask(self, threshold: float = 1e-5) -> np.ndarray:
        """(n_features,) bool: features whose frequency is below ``threshold``."""
        return self.frequency < threshold

    @property
    def n_dead(self) -> int:
        return int(self.dead_mask().sum())

    @property
    def dead_fraction(self) -> float:
        return self.n_dead / self.n_features

    def result(self) -> dict[str, Any]:
        return {
            "l0": self.l0,
            "n_dead": self.n_dead,
            "dead_fraction": self.dead_fraction,
            "n_tokens": self.n_tokens,
            "n_features": self.n_features,
        }
