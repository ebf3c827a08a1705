"""Linear probes: how well a label can be read linearly from tokens, reconstructions or codes.

A class-balanced logistic regression is trained on some groups (e.g. experiments or plates) and
scored by balanced accuracy on the others, so that no group is on both sides of the split.
Tokens whose label is missing are left out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from plate_concepts.analysis.selectivity import label_series
from plate_concepts.dictionary.codes import SparseCodes

Features = np.ndarray | torch.Tensor | SparseCodes | sparse.sparray | sparse.spmatrix


@dataclass
class ProbeResult:
    """Balanced test accuracy of one probe and what it was computed on."""

    balanced_accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    classes: list[Any]
    train_groups: list[Any] = field(default_factory=list)
    test_groups: list[Any] = field(default_factory=list)
    converged: bool = True

    @property
    def chance(self) -> float:
        """Balanced accuracy of a constant or random guess."""
        return 1.0 / self.n_classes


def _as_matrix(features: Features) -> np.ndarray | sparse.csr_matrix:
    """A 2-D numpy array, or a CSR matrix for sparse inputs (codes are never densified)."""
    if isinstance(features, SparseCodes):
        n, k = features.indices.shape
        rows = np.repeat(np.arange(n), k)
        csr = sparse.csr_matrix(
            (
                features.values.detach().cpu().numpy().astype(np.float64).ravel(),
                (rows, features.indices.detach().cpu().numpy().ravel()),
            ),
            shape=(n, features.n_features),
        )  # repeated indices add up, as in SparseCodes.dense()
        csr.eliminate_zeros()
        return csr
    if sparse.issparse(features):
        return sparse.csr_matrix(features, dtype=np.float64)
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"features must be (n_samples, n_features), got shape {matrix.shape}")
    return matrix


def _describe(values: Any, limit: int = 10) -> str:
    values = list(values)
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(map(repr, values[:limit])) + more


def split_groups(
    labels: Any,
    groups: Any,
    *,
    test_groups: Any = None,
    test_size: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, test) masks over samples: whole groups go to one side only.

    Samples with a missing label are in neither. With ``test_groups`` those groups form the test
    set; otherwise a random :class:`~sklearn.model_selection.GroupShuffleSplit` puts about
    ``test_size`` of the groups in it.
    """
    y = label_series(labels, "labels")
    g = label_series(groups, "groups")
    if len(y) != len(g):
        raise ValueError(f"{len(y)} labels but {len(g)} group keys")
    if g.isna().any():
        raise ValueError(f"group keys are missing for {int(g.isna().sum())} samples")
    labelled = y.notna().to_numpy()
    present = g[labelled].unique()
    if len(present) < 2:
        raise ValueError(
            f"a group split needs at least 2 groups with labelled samples, found {len(present)} "
            f"({_describe(present)})"
        )
    if test_groups is not None:
        wanted = list(np.atleast_1d(np.asarray(test_groups, dtype=object)))
        missing = [t for t in wanted if t not in set(present)]
        if missing:
            raise ValueError(
                f"test groups {_describe(missing)} have no labelled samples; "
                f"groups: {_describe(present)}"
            )
        test = g.isin(wanted).to_numpy() & labelled
    else:
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        idx = np.flatnonzero(labelled)
        _, test_idx = next(splitter.split(idx, groups=g.to_numpy()[idx]))
        test = np.zeros(len(y), dtype=bool)
        test[idx[test_idx]] = True
    train = labelled & ~test
    if not train.any():
        raise ValueError("every labelled group is in the test set; leave at least one for training")
    return train, test


def linear_probe(
    features: Features,
    labels: Any,
    groups: Any,
    *,
    test_groups: Any = None,
    test_size: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> ProbeResult:
    """Balanced test accuracy of a class-balanced logistic regression predicting ``labels``.

    ``features`` is (n, p): an array or tensor (standardised), a scipy sparse matrix or
    :class:`SparseCodes` (kept sparse, scaled to unit variance without centring so it stays
    sparse). Train and test are split by ``groups`` (see :func:`split_groups`).
    """
    x = _as_matrix(features)
    y = label_series(labels, "labels")
    if x.shape[0] != len(y):
        raise ValueError(f"features have {x.shape[0]} rows but there are {len(y)} labels")
    train, test = split_groups(
        labels, groups, test_groups=test_groups, test_size=test_size, seed=seed
    )
    # Fit on integer class codes: scikit-learn rejects object arrays of non-strings.
    y_codes, class_values = pd.factorize(y, use_na_sentinel=True)
    class_values = np.asarray(class_values, dtype=object)
    train_codes, test_codes = y_codes[train], y_codes[test]

    train_classes = np.unique(train_codes)
    if len(train_classes) < 2:
        raise ValueError(
            f"the training split has {len(train_classes)} class(es) "
            f"{_describe(class_values[train_classes].tolist())}; a probe needs at least 2"
        )
    unseen = np.setdiff1d(np.unique(test_codes), train_classes)
    if len(unseen):
        raise ValueError(
            f"classes {_describe(class_values[unseen].tolist())} are in the test groups but "
            "never in the training groups; choose other test groups or drop those samples"
        )

    model = make_pipeline(
        StandardScaler(with_mean=not sparse.issparse(x)),  # centring would densify sparse input
        LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed),
    )
    model.fit(x[train], train_codes)
    converged = bool(np.max(model[-1].n_iter_) < max_iter)
    predicted = model.predict(x[test])
    g = label_series(groups, "groups").to_numpy(dtype=object)
    return ProbeResult(
        balanced_accuracy=_balanced_accuracy(test_codes, predicted),
        n_train=int(train.sum()),
        n_test=int(test.sum()),
        n_classes=len(train_classes),
        classes=_sorted(class_values[train_classes].tolist()),
        train_groups=_sorted(set(g[train].tolist())),
        test_groups=_sorted(set(g[test].tolist())),
        converged=converged,
    )


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in the test set."""
    with warnings.catch_warnings():
        # Predicting a class that happens to be absent from the test groups is just an error
        # counted in the recalls; scikit-learn's warning about it is noise here.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def _sorted(values: Any) -> list[Any]:
    """Sorted when the values compare, else in the order given."""
    values = list(values)
    try:
        return sorted(values)
    except TypeError:
        return values


def compare_probes(
    tokens: Features | None,
    reconstructions: Features | None,
    codes: Features | None,
    labels: Any,
    groups: Any,
    *,
    test_groups: Any = None,
    test_size: float = 0.25,
    seed: int = 0,
    **probe_kwargs: Any,
) -> dict[str, ProbeResult]:
    """The publication's comparison: probes on tokens, reconstructions and codes, same split.

    The test groups are drawn once and shared, so the three accuracies are comparable. Inputs
    given as None are skipped. ``probe_kwargs`` go to :func:`linear_probe` (C, max_iter).
    """
    _, test = split_groups(labels, groups, test_groups=test_groups, test_size=test_size, seed=seed)
    shared_test_groups = _sorted(set(label_series(groups, "groups")[test].tolist()))
    inputs = {"tokens": tokens, "reconstructions": reconstructions, "codes": codes}
    return {
        name: linear_probe(
            features, labels, groups, test_groups=shared_test_groups, seed=seed, **probe_kwargs
        )
        for name, features in inputs.items()
        if features is not None
    }
