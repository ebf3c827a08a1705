"""ICFL on planted data, through the public API (estimator, metrics, selectivity): for J x L in
{2x2, 4x1, 1x4}, with and without whitening, it recovers the planted atoms, reconstructs the
tokens and has a selective feature for every class — the bar the TopK SAE passes on the same data.

The data follow the pre-processing's premise: tokens are sums of a few planted atoms (positive
weights) plus a little anisotropic noise, and the controls are the tokens without atoms, so the
control mean is the origin of the planted model. With the bias learned (the model before issue
10) the J = 4, L = 1 fits drift and fail this bar.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from plate_concepts.analysis.metrics import fvu
from plate_concepts.analysis.selectivity import selectivity
from plate_concepts.dictionary import ICFL, TopKSAE

N_TOKENS, DIM, N_ATOMS, N_CLASSES, N_OTHERS = 6000, 64, 48, 6, 2
CONTROL_FRACTION = 0.03
#: A dictionary twice the planted size (and overcomplete: 96 > 64 dimensions).
FIT = {"n_features": 96, "steps": 500, "batch_size": 256, "seed": 0, "device": "cpu"}


@dataclass
class Planted:
    tokens: np.ndarray  # (n, DIM) float32
    is_control: np.ndarray  # (n,) bool
    labels: np.ndarray  # (n,) class of each token, None for the controls
    atoms: np.ndarray  # (N_ATOMS, DIM) unit rows; the first N_CLASSES are the class atoms


@pytest.fixture(scope="module")
def planted() -> Iterator[Planted]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; small fits gain nothing from threads
    yield make_planted(seed=0)
    torch.set_num_threads(previous)


def make_planted(seed: int) -> Planted:
    """Every non-control token: its class atom plus N_OTHERS other atoms, weights in [0.5, 1.5];
    every token: noise of standard deviation 0.02 to 0.01 depending on the direction."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(N_ATOMS, DIM))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    tokens = rng.normal(size=(N_TOKENS, DIM)) * (0.02 * np.geomspace(1.0, 0.5, DIM))
    is_control = rng.random(N_TOKENS) < CONTROL_FRACTION
    classes = rng.integers(0, N_CLASSES, N_TOKENS)
    others = N_CLASSES + rng.random((N_TOKENS, N_ATOMS - N_CLASSES)).argsort(axis=1)[:, :N_OTHERS]
    active = np.concatenate([classes[:, None], others], axis=1)
    weights = rng.uniform(0.5, 1.5, size=active.shape) * ~is_control[:, None]
    tokens += np.einsum("nk,nkd->nd", weights, atoms[active])
    labels = np.where(is_control, None, classes.astype(object))
    return Planted(tokens.astype(np.float32), is_control, labels, atoms)


def recovery(estimator: ICFL | TopKSAE, data: Planted) -> tuple[float, float, float]:
    """(fraction of the atoms matched by a feature at cosine >= 0.9 in the pre-processed space,
    FVU over all tokens, the worst class's best max selectivity)."""
    x = estimator.preprocess(data.tokens)
    codes = estimator.transform(data.tokens)
    error = fvu(x, estimator.decode(codes))
    # An atom a is the raw displacement from the control mean: control_mean + a pre-processed.
    directions = estimator.preprocess(data.atoms + estimator.whitening_.control_mean_)
    best_cosine = (directions @ estimator.components_.T).max(axis=1)
    recovered = float(np.mean(best_cosine >= 0.9))
    best_selectivity = selectivity(codes, data.labels).summary()["best_max_selectivity"]
    assert set(best_selectivity) == set(range(N_CLASSES))  # the controls (no label) left out
    return recovered, error, min(best_selectivity.values())


def assert_recovers(estimator: ICFL | TopKSAE, data: Planted) -> None:
    """>= 90 % of the atoms recovered, FVU < 0.1 and every class has a selective feature."""
    recovered, error, worst = recovery(estimator, data)
    assert recovered >= 0.9 and error < 0.1 and worst >= 0.5, (
        f"recovered {recovered:.3f} of the atoms, FVU {error:.3f}, worst class's best max "
        f"selectivity {worst:.2f}"
    )


@pytest.mark.parametrize("whiten", ["none", "pca"])
@pytest.mark.parametrize(("n_rounds", "per_round"), [(2, 2), (4, 1), (1, 4)])
def test_icfl_recovers_planted_atoms_and_classes(
    planted: Planted, n_rounds: int, per_round: int, whiten: str
) -> None:
    icfl = ICFL(n_rounds=n_rounds, per_round=per_round, whiten=whiten, **FIT)
    icfl.fit(planted.tokens, is_control=planted.is_control)
    assert icfl.model_.offset == "zero" and not icfl.model_.bias.any()
    assert_recovers(icfl, planted)


@pytest.mark.parametrize("whiten", ["none", "pca"])
def test_topk_reference_passes_the_same_bar(planted: Planted, whiten: str) -> None:
    topk = TopKSAE(k=4, whiten=whiten, **FIT)
    topk.fit(planted.tokens, is_control=planted.is_control)
    assert_recovers(topk, planted)
