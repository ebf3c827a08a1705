"""Metrics, selectivity and linear probes on hand-computed and planted examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from plate_concepts.analysis.metrics import FeatureUsage, ReconstructionMetrics, fvu, mean_cosine
from plate_concepts.analysis.probes import compare_probes, linear_probe, split_groups
from plate_concepts.analysis.selectivity import (
    SelectivityAccumulator,
    activation_rates,
    mean_pool_by_group,
    selectivity,
)
from plate_concepts.dictionary.codes import SparseCodes


def codes_from_lists(active: list[dict[int, float]], n_features: int, k: int) -> SparseCodes:
    """SparseCodes with k slots per token; unused slots repeat index 0 with value 0."""
    indices = torch.zeros(len(active), k, dtype=torch.int64)
    values = torch.zeros(len(active), k)
    for row, entries in enumerate(active):
        for slot, (feature, value) in enumerate(entries.items()):
            indices[row, slot], values[row, slot] = feature, value
    return SparseCodes(indices, values, n_features)


# ---------------------------------------------------------------------------- reconstruction


def test_fvu_and_cosine_by_hand_3x2() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    x_hat = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    # mean(x) = (1, 1); sum ||x - mean||^2 = 1 + 1 + 2 = 4
    # sum ||x - x_hat||^2 = 1 + 0 + 2 = 3  ->  FVU = 3 / 4
    # cosines: (1,0)/(1,1) -> 1/sqrt(2); identical -> 1; (2,2)/(1,1) parallel -> 1
    assert fvu(x, x_hat) == pytest.approx(0.75)
    assert mean_cosine(x, x_hat) == pytest.approx((1 / math.sqrt(2) + 2) / 3)
    assert fvu(torch.tensor(x), torch.tensor(x_hat)) == pytest.approx(0.75)


def test_fvu_zero_for_perfect_and_one_for_mean() -> None:
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert fvu(x, x) == pytest.approx(0.0)
    assert mean_cosine(x, x) == pytest.approx(1.0)
    assert fvu(x, np.broadcast_to(x.mean(axis=0), x.shape)) == pytest.approx(1.0)


def test_reconstruction_metrics_over_batches_equal_one_shot() -> None:
    rng = np.random.default_rng(1)
    # Batches with different means and sizes: the denominator needs the *global* mean.
    xs = [rng.normal(loc=mu, size=(n, 5)) for mu, n in [(100.0, 7), (101.0, 13), (99.0, 4)]]
    x_hats = [x + rng.normal(scale=0.3, size=x.shape) for x in xs]
    metrics = ReconstructionMetrics()
    for x, x_hat in zip(xs, x_hats):
        metrics.update(torch.tensor(x, dtype=torch.float32), x_hat.astype(np.float32))
    x, x_hat = np.vstack(xs), np.vstack(x_hats)
    x32 = x.astype(np.float32).astype(np.float64)
    x_hat32 = x_hat.astype(np.float32).astype(np.float64)
    expected_fvu = ((x32 - x_hat32) ** 2).sum() / ((x32 - x32.mean(axis=0)) ** 2).sum()
    expected_cos = np.mean(
        (x32 * x_hat32).sum(1) / np.linalg.norm(x32, axis=1) / np.linalg.norm(x_hat32, axis=1)
    )
    result = metrics.result()
    assert result["n_tokens"] == 24
    assert result["fvu"] == pytest.approx(expected_fvu, rel=1e-9)
    assert result["cosine"] == pytest.approx(expected_cos, rel=1e-12)
    # Centring each batch on its own mean would give a clearly different (wrong) FVU here.
    per_batch_variance = sum(((b - b.mean(axis=0)) ** 2).sum() for b in xs)
    assert not np.isclose(result["fvu"], ((x - x_hat) ** 2).sum() / per_batch_variance, rtol=0.05)


def test_reconstruction_metrics_do_not_depend_on_the_thread_count() -> None:
    # An activation pass's workers run one thread each; `evaluate` in this process runs several.
    # Their FVU and cosine must be the same numbers, to the last digit.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 1600)).astype(np.float32)
    x_hat = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            metrics = ReconstructionMetrics()
            metrics.update(x, x_hat)
            results.append((metrics.fvu, metrics.cosine))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]


def test_reconstruction_metrics_errors() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        _ = ReconstructionMetrics().fvu
    with pytest.raises(ValueError, match="must both be"):
        fvu(np.zeros((3, 2)), np.zeros((3, 3)))
    metrics = ReconstructionMetrics()
    metrics.update(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="dim 3"):
        metrics.update(np.ones((2, 3)), np.ones((2, 3)))
    assert math.isnan(metrics.fvu)  # identical tokens: no variance to explain


# ---------------------------------------------------------------------------- feature usage


def usage_codes() -> SparseCodes:
    # 4 features, 3 slots. Token 0: features 1 (0.5) and 2 (2.0), slot 3 repeats 2 with value 0.
    # Token 1: feature 1 (1.0), padding repeats 1 with value 0. Token 2: nothing active.
    return SparseCodes(
        torch.tensor([[1, 2, 2], [1, 1, 1], [0, 0, 0]]),
        torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        n_features=4,
    )


def test_feature_usage_by_hand() -> None:
    usage = FeatureUsage(4)
    usage.update(usage_codes())
    np.testing.assert_allclose(usage.frequency, [0, 2 / 3, 1 / 3, 0])
    assert usage.l0 == pytest.approx(1.0)  # (2 + 1 + 0) / 3
    assert usage.l0 == pytest.approx(usage_codes().l0().float().mean().item())
    np.testing.assert_array_equal(usage.dead_mask(), [True, False, False, True])
    assert usage.n_dead == 2 and usage.dead_fraction == 0.5
    np.testing.assert_allclose(usage.mean_activation, [0, 0.5, 2 / 3, 0])  # (0.5 + 1) / 3, 2 / 3
    np.testing.assert_allclose(usage.mean_activation, usage_codes().dense().mean(0).numpy())
    # A higher threshold also calls the feature seen on 1 token in 3 dead.
    np.testing.assert_array_equal(usage.dead_mask(threshold=0.5), [True, False, True, True])


def test_feature_usage_over_batches_equals_one_shot() -> None:
    rng = np.random.default_rng(2)
    n, k, m = 60, 5, 12
    indices = torch.from_numpy(rng.integers(0, m, size=(n, k)))
    values = torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32))
    values[rng.random((n, k)) < 0.4] = 0
    # Keep the invariant: an index repeats within a token only with value 0.
    for row in range(n):
        seen: set[int] = set()
        for slot in range(k):
            if values[row, slot] != 0 and int(indices[row, slot]) in seen:
                values[row, slot] = 0
            elif values[row, slot] != 0:
                seen.add(int(indices[row, slot]))
    codes = SparseCodes(indices, values, m)
    whole, batched = FeatureUsage(m), FeatureUsage(m)
    whole.update(codes)
    for start in range(0, n, 17):
        batched.update(codes[start : start + 17])
    dense = codes.dense().numpy()
    np.testing.assert_allclose(batched.frequency, (dense != 0).mean(0))
    np.testing.assert_allclose(batched.frequency, whole.frequency)
    np.testing.assert_allclose(batched.mean_activation, dense.mean(0), atol=1e-6)
    assert batched.l0 == pytest.approx((dense != 0).sum(1).mean())
    with pytest.raises(ValueError, match="5 features"):
        batched.update(SparseCodes(indices, values, 5))


# ---------------------------------------------------------------------------- selectivity

# 9 tokens, 3 per label value A, B, C; 3 features.
#   f0 active on A0 A1 A2 and B0      -> rates A=1,   B=1/3, C=0
#   f1 active on B1 B2 and C0 C1      -> rates A=0,   B=2/3, C=2/3
#   f2 active on all 9                -> rates 1, 1, 1
# average = P(active | i) - P(active | not i), pooling the 6 other tokens:
#   f0: A 1 - 1/6 = 5/6      B 1/3 - 3/6 = -1/6   C 0 - 4/6 = -2/3
#   f1: A 0 - 4/6 = -2/3     B 2/3 - 2/6 = 1/3    C 2/3 - 2/6 = 1/3
#   f2: 0 everywhere
# max = P(active | i) - max_{j != i} P(active | j):
#   f0: A 1 - 1/3 = 2/3      B 1/3 - 1 = -2/3     C 0 - 1 = -1
#   f1: A 0 - 2/3 = -2/3     B 2/3 - 2/3 = 0      C 0
#   f2: 0 everywhere
EXPECTED_AVERAGE = np.array([[5 / 6, -2 / 3, 0], [-1 / 6, 1 / 3, 0], [-2 / 3, 1 / 3, 0]])
EXPECTED_MAX = np.array([[2 / 3, -2 / 3, 0], [-2 / 3, 0, 0], [-1, 0, 0]])
LABELS = ["A", "A", "A", "B", "B", "B", "C", "C", "C"]
ACTIVE = [
    {0: 1.0, 2: 0.3},
    {0: 2.0, 2: 1.0},
    {0: 0.5, 2: -1.0},  # negative values are active too
    {0: 1.0, 2: 1.0},
    {1: 1.0, 2: 1.0},
    {1: 3.0, 2: 1.0},
    {1: 1.0, 2: 1.0},
    {1: 1.0, 2: 1.0},
    {2: 1.0},  # padding slots repeat feature 0 with value 0: must not count for f0 on C
]


def hand_codes() -> SparseCodes:
    return codes_from_lists(ACTIVE, n_features=3, k=3)


def test_selectivity_by_hand() -> None:
    result = selectivity(hand_codes(), pd.Series(LABELS, name="cell_type"))
    assert result.label == "cell_type"
    assert result.values == ["A", "B", "C"]
    np.testing.assert_array_equal(result.counts, [3, 3, 3])
    np.testing.assert_allclose(result.rates, [[1, 0, 1], [1 / 3, 2 / 3, 1], [0, 2 / 3, 1]])
    np.testing.assert_allclose(result.average, EXPECTED_AVERAGE)
    np.testing.assert_allclose(result.maximum, EXPECTED_MAX)

    summary = result.summary()
    assert summary["best_max_selectivity"] == pytest.approx({"A": 2 / 3, "B": 0.0, "C": 0.0})
    assert summary["n_avg_above_0.5"] == 1  # f0 (5/6 for A)
    assert summary["n_avg_above_0.2"] == 2  # f0, and f1 once although it is 1/3 for both B and C

    best = result.best_features("A", n=2)
    assert best["feature"].tolist() == [0, 2]
    assert best["max_selectivity"].tolist() == pytest.approx([2 / 3, 0])
    assert result.best_features("B", n=1, kind="average")["feature"].tolist() == [1]

    table = result.feature_table()
    assert table["feature"].tolist() == [0, 1, 2]
    assert table["best_value"].tolist()[:2] == ["A", "B"]  # f1 ties B and C at 0: first wins
    np.testing.assert_allclose(table["max_selectivity"], [2 / 3, 0, 0])
    np.testing.assert_allclose(table["average_selectivity"], [5 / 6, 1 / 3, 0])
    np.testing.assert_allclose(table["frequency"], [4 / 9, 4 / 9, 1])
    with pytest.raises(KeyError, match="'D' is not a value of label 'cell_type'"):
        result.best_features("D")


def test_selectivity_accepts_dense_and_scipy_activity() -> None:
    dense = hand_codes().dense().numpy() != 0
    as_given = (dense, torch.from_numpy(dense), sparse.csr_array(dense), sparse.coo_matrix(dense))
    for activity in as_given:
        result = selectivity(activity, LABELS)
        np.testing.assert_allclose(result.average, EXPECTED_AVERAGE)
        np.testing.assert_allclose(result.maximum, EXPECTED_MAX)
    values, rates = activation_rates(dense, LABELS)
    assert values == ["A", "B", "C"]
    np.testing.assert_allclose(rates[0], [1, 0, 1])


def test_selectivity_accumulator_over_batches_equals_one_shot() -> None:
    rng = np.random.default_rng(3)
    n, m = 300, 20
    labels = rng.choice(["x", "y", "z", "w"], size=n).astype(object)
    labels[rng.random(n) < 0.1] = None
    active = rng.random((n, m)) < rng.random(m) * 0.5
    codes = SparseCodes(
        torch.from_numpy(np.argsort(~active, axis=1, kind="stable")[:, :m]),
        torch.from_numpy(np.sort(active, axis=1)[:, ::-1].astype(np.float32).copy()),
        m,
    )  # active features first, then zero-valued slots
    np.testing.assert_array_equal(codes.dense().numpy() != 0, active)
    one_shot = selectivity(codes, labels)
    acc = SelectivityAccumulator(m)
    # Batches in which values first appear in different orders: rows must still line up.
    for rows in (np.arange(250, 300), np.arange(0, 7), np.arange(7, 250)):
        acc.update(codes[torch.from_numpy(rows)], labels[rows])
    batched = acc.result()
    assert batched.values == one_shot.values == ["w", "x", "y", "z"]
    np.testing.assert_array_equal(batched.active_counts, one_shot.active_counts)
    np.testing.assert_allclose(batched.maximum, one_shot.maximum)
    # Against a direct dense computation.
    kept = pd.notna(labels)
    for row, value in enumerate(batched.values):
        mine, rest = labels == value, kept & (labels != value)
        np.testing.assert_allclose(
            batched.average[row], active[mine].mean(0) - active[rest].mean(0), atol=1e-12
        )
        others = [active[labels == v].mean(0) for v in batched.values if v != value]
        expected_max = active[mine].mean(0) - np.max(others, axis=0)
        np.testing.assert_allclose(batched.maximum[row], expected_max)
    assert batched.n_excluded == int((~kept).sum()) > 0


def test_selectivity_excludes_missing_labels() -> None:
    # Token 9 is active on f0 but has no label: f0 on A must stay at rate 1, counts at 3.
    codes = codes_from_lists([*ACTIVE, {0: 1.0, 1: 1.0}], n_features=3, k=3)
    labels = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, np.nan])
    result = selectivity(codes, labels)
    assert result.values == [1.0, 2.0, 3.0]
    assert result.n_excluded == 1
    np.testing.assert_array_equal(result.counts, [3, 3, 3])
    np.testing.assert_allclose(result.average, EXPECTED_AVERAGE)
    result_none = selectivity(codes, [*LABELS, None])
    np.testing.assert_allclose(result_none.maximum, EXPECTED_MAX)


def test_selectivity_errors() -> None:
    with pytest.raises(ValueError, match=r"'batch' has 1 distinct value.*at least 2"):
        selectivity(hand_codes(), pd.Series(["p1"] * 9, name="batch"))
    with pytest.raises(ValueError, match="8 entries for 9 tokens"):
        selectivity(hand_codes(), LABELS[:8])
    with pytest.raises(ValueError, match="batch has 3 features"):
        SelectivityAccumulator(4).update(hand_codes(), LABELS)


def test_mean_pool_by_group() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0]])
    keys, pooled = mean_pool_by_group(x, ["b", "b", "a", "b"])
    assert keys == ["a", "b"]
    np.testing.assert_allclose(pooled, [[10, 0], [3, 11 / 3]])
    frame = pd.DataFrame({"well": ["A01", "A01", "A02", "A02"], "field": [1, 2, 1, 1]})
    keys, pooled = mean_pool_by_group(torch.tensor(x), frame)
    assert keys.to_dict("list") == {"well": ["A01", "A01", "A02"], "field": [1, 2, 1]}
    np.testing.assert_allclose(pooled, [[1, 2], [3, 4], [7.5, 2.5]])
    with pytest.raises(ValueError, match="missing for 1 rows"):
        mean_pool_by_group(x, ["a", None, "b", "b"])


# ---------------------------------------------------------------------------- probes


def planted_data(
    n_per_group: int = 30, n_groups: int = 8, n_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every group holds every class; class c shifts feature c by +4 (well separated)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"exp{g}" for g in range(n_groups)], n_per_group)
    labels = np.tile(np.arange(n_classes), len(groups) // n_classes + 1)[: len(groups)]
    x = rng.normal(scale=0.5, size=(len(groups), 6))
    x[np.arange(len(groups)), labels] += 4.0
    return x, labels, groups


def test_probe_separable_data_scores_one_and_splits_by_group() -> None:
    x, labels, groups = planted_data()
    result = linear_probe(x, [f"type{c}" for c in labels], groups, seed=0)
    assert result.balanced_accuracy == 1.0
    assert result.n_classes == 3 and result.classes == ["type0", "type1", "type2"]
    assert result.n_train + result.n_test == len(x)
    assert result.test_groups and not set(result.test_groups) & set(result.train_groups)
    assert len(result.test_groups) == 2  # 25 % of 8 groups
    for seed in range(5):
        train, test = split_groups(labels, groups, seed=seed)
        assert not set(groups[train]) & set(groups[test]) and test.any() and train.any()


def test_probe_random_labels_near_chance() -> None:
    rng = np.random.default_rng(4)
    n = 2000
    x = rng.normal(size=(n, 10))
    labels = rng.integers(0, 4, size=n)
    groups = rng.integers(0, 10, size=n)
    result = linear_probe(x, labels, groups, test_groups=[0, 1, 2])
    assert result.test_groups == [0, 1, 2] and result.train_groups == list(range(3, 10))
    assert result.chance == 0.25
    assert abs(result.balanced_accuracy - 0.25) < 0.06


def test_probe_on_sparse_codes_and_compare() -> None:
    x, labels, groups = planted_data(n_classes=4, seed=5)
    n = len(labels)
    rng = np.random.default_rng(5)
    # Codes: the class's feature is on with a positive value, plus two random noise features.
    indices = np.stack([labels, rng.integers(4, 40, n), rng.integers(4, 40, n)], axis=1)
    values = np.stack([rng.uniform(1, 2, n), rng.normal(size=n), np.zeros(n)], axis=1)
    codes = SparseCodes(torch.from_numpy(indices), torch.from_numpy(values.astype(np.float32)), 40)
    result = linear_probe(codes, labels, groups, test_groups=["exp0", "exp1"])
    assert result.balanced_accuracy == 1.0 and result.n_test == 60

    noise = rng.normal(size=(n, 6))  # "reconstructions" that lost the signal
    results = compare_probes(x, noise, codes, labels, groups, seed=1)
    assert set(results) == {"tokens", "reconstructions", "codes"}
    assert len({tuple(r.test_groups) for r in results.values()}) == 1  # one shared split
    assert results["tokens"].balanced_accuracy == 1.0
    assert results["codes"].balanced_accuracy == 1.0
    assert results["reconstructions"].balanced_accuracy < 0.5


def test_probe_missing_labels_are_dropped() -> None:
    x, labels, groups = planted_data()
    labels = labels.astype(float)
    labels[:10] = np.nan
    result = linear_probe(x, labels, groups, test_groups=["exp7"])
    assert result.n_train == 7 * 30 - 10 and result.n_test == 30
    assert result.classes == [0.0, 1.0, 2.0]


def test_probe_errors() -> None:
    x, labels, groups = planted_data()
    only_in_test = labels.astype(object)
    only_in_test[groups == "exp7"] = "rare"
    with pytest.raises(ValueError, match="classes 'rare' are in the test groups but never in"):
        linear_probe(x, only_in_test, groups, test_groups=["exp7"])
    with pytest.raises(ValueError, match="at least 2 groups"):
        linear_probe(x, labels, ["one"] * len(labels))
    with pytest.raises(ValueError, match="1 class"):
        linear_probe(x, np.zeros(len(labels)), groups)
    with pytest.raises(ValueError, match="test groups 'exp99' have no labelled samples"):
        linear_probe(x, labels, groups, test_groups=["exp99"])
    with pytest.raises(ValueError, match="features have 240 rows but there are 10 labels"):
        linear_probe(x, labels[:10], groups[:10])
