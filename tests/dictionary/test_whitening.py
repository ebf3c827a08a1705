"""ControlWhitening: known answers on planted covariances, round trips, batches, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from plate_concepts.dictionary import whitening as whitening_module
from plate_concepts.dictionary.whitening import ControlWhitening, RankDeficientWarning

DIM = 8


def _correlated(rng: np.random.Generator, n: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Tokens with a strongly anisotropic covariance and a non-zero mean; first 70% are controls."""
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(10.0, 0.1, dim)
    X = rng.normal(size=(n, dim)) @ mixing.T + rng.normal(size=dim) * 5
    X[int(0.7 * n) :] += 3.0  # perturbed tokens: shifted
    is_control = np.arange(n) < int(0.7 * n)
    return X, is_control


def test_controls_are_centred_and_white() -> None:
    X, is_control = _correlated(np.random.default_rng(0), 3000)
    whitening = ControlWhitening(eps=0.0, unit_norm=False).fit(X, is_control)
    Z = whitening.transform(X[is_control])
    assert whitening.output_dim == DIM
    # Known answers up to the float32 precision of the saved state (~1e-7 of the raw values).
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(DIM), atol=1e-5)
    # The perturbed tokens keep their shift: they are not centred.
    assert np.linalg.norm(whitening.transform(X[~is_control]).mean(axis=0)) > 1.0


def test_eps_caps_the_gain_of_weak_directions() -> None:
    X, is_control = _correlated(np.random.default_rng(1), 3000)
    eps = 1e-2
    whitening = ControlWhitening(eps=eps, unit_norm=False).fit(X, is_control)
    lam = whitening.eigenvalues_
    variances = np.var(whitening.transform(X[is_control]), axis=0, ddof=1)
    np.testing.assert_allclose(variances, lam / (lam + eps * lam[0]), rtol=1e-5)
    assert variances[-1] < 0.5  # the weakest direction is down-weighted, not blown up


def test_unit_norm_and_float_types() -> None:
    X, is_control = _correlated(np.random.default_rng(2), 500)
    whitening = ControlWhitening().fit(X, is_control)
    Z = whitening.transform(X.astype(np.float32))
    assert Z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-6)
    Z_torch = whitening.transform(torch.from_numpy(X))
    assert isinstance(Z_torch, torch.Tensor) and Z_torch.dtype == torch.float64
    np.testing.assert_allclose(Z_torch.numpy(), whitening.transform(X), atol=1e-12)


def test_method_none_only_centres_on_controls() -> None:
    X, is_control = _correlated(np.random.default_rng(3), 400)
    Z = ControlWhitening(method="none").fit_transform(X, is_control)
    centred = X - X[is_control].mean(axis=0)
    np.testing.assert_allclose(
        Z, centred / np.linalg.norm(centred, axis=1, keepdims=True), atol=1e-6
    )


def test_inverse_transform_round_trip() -> None:
    X, is_control = _correlated(np.random.default_rng(4), 1000)
    whitening = ControlWhitening(unit_norm=False).fit(X, is_control)
    np.testing.assert_allclose(whitening.inverse_transform(whitening.transform(X)), X, atol=1e-8)
    # With unit norm only the direction from the control mean survives.
    unit = ControlWhitening().fit(X, is_control)
    back = unit.inverse_transform(unit.transform(X)) - unit.control_mean_
    original = X - unit.control_mean_
    cosine = (
        (back * original).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(original, axis=1)
    )
    np.testing.assert_allclose(cosine, 1.0, atol=1e-9)


def _planted_batches(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three batches sharing one biology (control covariance + a treatment shift ``effect``),
    each distorted by its own scale and offset."""
    rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    mixing = rotation * np.geomspace(3.0, 0.3, DIM)  # control stds 3 .. 0.3 along rotated axes
    effect = rng.normal(size=DIM) * 2
    parts, controls, labels, treated = [], [], [], []
    for name, scale, offset in (("b1", 1.0, 0.0), ("b2", 2.5, 4.0), ("b3", 0.5, -7.0)):
        y = rng.normal(size=(1200, DIM)) @ mixing.T
        is_treated = np.arange(1200) >= 900
        y[is_treated] += effect
        parts.append(scale * y + offset * rng.normal(size=DIM))
        controls.append(~is_treated)
        treated.append(is_treated)
        labels.append(np.full(1200, name))
    return (
        np.concatenate(parts),
        np.concatenate(controls),
        np.concatenate(labels),
        np.concatenate(treated),
    )


def test_pca_batch_removes_planted_batch_shift_and_scale() -> None:
    X, is_control, batches, treated = _planted_batches(np.random.default_rng(5))
    per_batch = ControlWhitening(method="pca-batch", unit_norm=False).fit(X, is_control, batches)
    Z = per_batch.transform(X, batches)
    for name in ("b1", "b2", "b3"):
        controls = Z[(batches == name) & is_control]
        np.testing.assert_allclose(controls.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(controls.std(axis=0, ddof=1), 1.0, rtol=1e-6)

    def spread_of_treated_means(Z: np.ndarray) -> float:
        means = np.stack([Z[(batches == b) & treated].mean(axis=0) for b in ("b1", "b2", "b3")])
        return float(
            np.linalg.norm(means - means.mean(axis=0), axis=1).max()
            / np.linalg.norm(means.mean(axis=0))
        )

    # The treatment looks the same in every batch after per-batch whitening, not after pooled PCA.
    pooled = ControlWhitening(method="pca", unit_norm=False).fit_transform(X, is_control)
    assert spread_of_treated_means(Z) < 0.1
    assert spread_of_treated_means(pooled) > 0.5


@pytest.mark.parametrize("method", ["pca", "pca-batch"])
def test_streaming_over_chunks_gives_the_one_chunk_fit(method: str, monkeypatch) -> None:
    X, is_control, batches, _ = _planted_batches(np.random.default_rng(13))
    whole = ControlWhitening(method=method).fit(X, is_control, batches)
    monkeypatch.setattr(whitening_module, "_CHUNK_ROWS", 97)
    chunked = ControlWhitening(method=method).fit(X, is_control, batches)
    for name in ("control_mean_", "whitening_", "batch_mean_", "batch_scale_"):
        if getattr(whole, name) is not None:
            np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-6)
    np.testing.assert_allclose(
        chunked.transform(X, batches), whole.transform(X, batches), atol=1e-6
    )
    bad = X.copy()
    bad[1000, 3] = np.inf
    with pytest.raises(ValueError, match="X row 1000 holds NaN or inf"):
        chunked.transform(bad, batches)


def test_rank_deficient_controls_warn_with_the_effective_rank() -> None:
    rng = np.random.default_rng(6)
    X = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 10))  # controls span 6 of 10 dimensions
    with pytest.warns(RankDeficientWarning, match="vary along only 6 of the 10 embedding dimensions"):
        whitening = ControlWhitening(unit_norm=False).fit(X, np.ones(200, bool))
    assert whitening.output_dim == 6
    np.testing.assert_allclose(np.cov(whitening.transform(X), rowvar=False), np.eye(6), atol=1e-4)
    # Fewer controls than dim + 1: the warning says how many a full rank needs.
    with pytest.warns(
        RankDeficientWarning,
        match=r"the 5 control tokens \(full rank needs at least 9\) vary along only 4 of the 8",
    ):
        few = ControlWhitening(shrinkage=None).fit(rng.normal(size=(5, 8)), np.ones(5, bool))
    assert few.output_dim == 4
    # One line, saying which option keeps the dropped directions; warn=False only records it.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = ControlWhitening(shrinkage=None).fit(rng.normal(size=(5, 8)), np.ones(5, bool), warn=False)
    assert "\n" not in quiet.rank_note_ and "--shrinkage auto" in quiet.rank_note_
    assert ControlWhitening().fit(X, np.ones(200, bool), warn=False).rank_note_.startswith("the 200")
    assert ControlWhitening(shrinkage="ledoit-wolf").fit(X, np.ones(200, bool)).rank_note_ is None


def test_batch_labels_are_normalised_once_from_raw_values() -> None:
    """1, 1.0, "1" and np.int64(1) are one batch wherever the labels come from (store obs as
    floats, plate map as ints, text): the names and the transform agree."""
    X, is_control, batches, _ = _planted_batches(np.random.default_rng(8))
    numbers = np.select([batches == "b1", batches == "b2"], [1, 2], 3)
    as_ints = ControlWhitening(method="pca-batch").fit(X, is_control, numbers)
    as_floats = ControlWhitening(method="pca-batch").fit(X, is_control, numbers.astype(float))
    assert as_ints.batch_names_ == as_floats.batch_names_ == ["1", "2", "3"]
    expected = as_ints.transform(X, numbers)
    for raw in (numbers.astype(float), numbers.astype(str), numbers.astype(object), pd.Series(numbers * 1.0)):
        np.testing.assert_array_equal(as_ints.transform(X, raw), expected)
    with pytest.raises(ValueError, match="batch '4' was not among the batches this whitening was fitted on"):
        as_ints.transform(X[:2], [4.0, 1.0])
    with pytest.raises(ValueError, match="token 1 has no batch label"):
        as_ints.transform(X[:2], [1.0, np.nan])
    with pytest.raises(ValueError, match="choose the batch column"):
        as_ints.transform(X[:2])
    # A file written before the rule stored str(1.0) = "1.0": it still reads raw 1.0 (and 1).
    legacy = {**as_floats.metadata(), "batches": ["1.0", "2.0", "3.0"]}
    del legacy["batch_labels"]
    old = ControlWhitening.from_state(as_floats.state_tensors(), legacy)
    assert old.batch_names_ == ["1", "2", "3"]
    np.testing.assert_array_equal(old.transform(X, numbers.astype(float)), expected)
    text = {**as_floats.metadata(), "batches": ["2.50", "b", "3.0"]}  # new files keep text as is
    assert ControlWhitening.from_state(as_floats.state_tensors(), text).batch_names_ == ["2.50", "b", "3.0"]


def test_errors_name_what_is_wrong() -> None:
    rng = np.random.default_rng(7)
    X = rng.normal(size=(50, 4))
    with pytest.raises(ValueError, match="no control tokens: is_control selects 0 of 50"):
        ControlWhitening().fit(X, np.zeros(50, bool))
    with pytest.raises(ValueError, match="at least 2 .* got 1"):
        ControlWhitening().fit(X, np.arange(50) == 3)
    bad = X.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="X row 7 holds NaN or inf"):
        ControlWhitening().fit(bad, np.ones(50, bool))
    with pytest.raises(ValueError, match="2-D"):
        ControlWhitening().fit(X[:, 0], np.ones(50, bool))
    with pytest.raises(ValueError, match=r"is_control must have shape \(50,\)"):
        ControlWhitening().fit(X, np.ones(49, bool))
    with pytest.raises(ValueError, match="unknown whitening method 'zca'"):
        ControlWhitening(method="zca").fit(X, np.ones(50, bool))
    fitted = ControlWhitening().fit(X, np.ones(50, bool))
    with pytest.raises(ValueError, match="X has 5 columns; the fitted transform expects 4"):
        fitted.transform(rng.normal(size=(3, 5)))
    inf = X[:3].copy()
    inf[1, 0] = np.inf
    with pytest.raises(ValueError, match="X row 1 holds NaN or inf"):
        fitted.transform(inf)
    with pytest.raises(RuntimeError, match="not fitted"):
        ControlWhitening().transform(X)


def test_pca_batch_errors_name_the_batch() -> None:
    rng = np.random.default_rng(8)
    X = rng.normal(size=(60, 3))
    batches = np.repeat(["p1", "p2", "p3"], 20)
    is_control = batches != "p2"
    with pytest.raises(ValueError, match="batch 'p2' has 20 tokens but 0 control tokens"):
        ControlWhitening(method="pca-batch").fit(X, is_control, batches)
    with pytest.raises(ValueError, match="needs the batch of every token"):
        ControlWhitening(method="pca-batch").fit(X, is_control)
    fitted = ControlWhitening(method="pca-batch").fit(X, np.ones(60, bool), batches)
    with pytest.raises(
        ValueError, match=r"batch 'p9' was not among the batches .* \('p1', 'p2', 'p3'\)"
    ):
        fitted.transform(X[:2], np.array(["p1", "p9"]))


@pytest.mark.parametrize("method", ["pca", "pca-batch", "none"])
def test_state_round_trip_gives_identical_transforms(method: str, tmp_path) -> None:
    X, is_control, batches, _ = _planted_batches(np.random.default_rng(9))
    whitening = ControlWhitening(method=method, eps=1e-4).fit(X, is_control, batches)
    path = tmp_path / "whitening.safetensors"
    save_file({k: v.contiguous() for k, v in whitening.state_tensors().items()}, str(path))
    metadata = json.loads(json.dumps(whitening.metadata()))
    restored = ControlWhitening.from_state(load_file(str(path)), metadata)
    assert restored.metadata() == whitening.metadata()
    assert all(t.dtype == torch.float32 for t in whitening.state_tensors().values())
    np.testing.assert_array_equal(restored.transform(X, batches), whitening.transform(X, batches))
    np.testing.assert_array_equal(
        restored.inverse_transform(X[:5], batches[:5]),
        whitening.inverse_transform(X[:5], batches[:5]),
    )


def test_from_state_rejects_inconsistent_tensors() -> None:
    X, is_control, batches, _ = _planted_batches(np.random.default_rng(10))
    whitening = ControlWhitening(method="pca-batch").fit(X, is_control, batches)
    tensors, metadata = whitening.state_tensors(), whitening.metadata()
    with pytest.raises(ValueError, match=r"missing \['batch_scale'\]"):
        ControlWhitening.from_state(
            {k: v for k, v in tensors.items() if k != "batch_scale"}, metadata
        )
    with pytest.raises(ValueError, match="2 batch names"):
        ControlWhitening.from_state(tensors, {**metadata, "batches": ["b1", "b2"]})


@pytest.mark.parametrize("method", ["pca", "pca-batch"])
def test_torch_path_matches_numpy_path(method: str) -> None:
    X, is_control, batches, _ = _planted_batches(np.random.default_rng(11))
    whitening = ControlWhitening(method=method).fit(X, is_control, batches)
    index = torch.from_numpy(whitening.batch_indices(batches)) if method == "pca-batch" else None
    fast = whitening.transform_torch(torch.from_numpy(X).float(), index)
    assert fast.dtype == torch.float32
    np.testing.assert_allclose(fast.numpy(), whitening.transform(X, batches), atol=1e-5)
    if method == "pca-batch":
        with pytest.raises(ValueError, match="needs batch_index"):
            whitening.transform_torch(torch.from_numpy(X).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_path_on_gpu() -> None:
    X, is_control, batches, _ = _planted_batches(np.random.default_rng(12))
    whitening = ControlWhitening(method="pca-batch").fit(X, is_control, batches)
    index = torch.from_numpy(whitening.batch_indices(batches)).cuda()
    fast = whitening.transform_torch(torch.from_numpy(X).float().cuda(), index)
    assert fast.device.type == "cuda"
    np.testing.assert_allclose(fast.cpu().numpy(), whitening.transform(X, batches), atol=1e-5)


def test_ledoit_wolf_shrinkage_matches_scikit_learn_and_keeps_every_dimension():
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(3)
    dim, n_controls = 40, 25  # fewer controls than dimensions: exact PCA is rank-deficient
    controls = rng.normal(size=(n_controls, dim)) * np.linspace(3, 0.5, dim)
    perturbed = rng.normal(size=(10, dim))
    perturbed[:, -1] += 8.0  # an effect along a direction the controls barely vary in
    X = np.vstack([controls, perturbed])
    is_control = np.arange(len(X)) < n_controls
    shrunk = ControlWhitening(unit_norm=False).fit(X, is_control)  # few controls: auto shrinks
    assert shrunk.covariance_ == "ledoit-wolf"
    expected = ledoit_wolf_shrinkage(controls - controls.mean(axis=0), assume_centered=True)
    assert shrunk.shrinkage_ == pytest.approx(expected, rel=1e-6)
    assert shrunk.output_dim == dim
    with pytest.warns(RankDeficientWarning, match="use shrinkage 'auto'"):
        exact = ControlWhitening(shrinkage=None, unit_norm=False).fit(X, is_control)
    assert exact.output_dim == n_controls - 1
    # the perturbation stays far from the controls with shrinkage
    z = shrunk.transform(X)
    assert np.linalg.norm(z[~is_control].mean(axis=0)) > 3 * np.linalg.norm(z[is_control].mean(axis=0)) + 1
    # fixed coefficient, state round trip
    fixed = ControlWhitening(shrinkage=0.3).fit(X, is_control)
    assert fixed.shrinkage_ == 0.3
    again = ControlWhitening.from_state(fixed.state_tensors(), fixed.metadata())
    np.testing.assert_array_equal(again.transform(X), fixed.transform(X))
    with pytest.raises(ValueError, match="shrinkage"):
        ControlWhitening(shrinkage=1.5).fit(X, is_control)


def test_auto_is_exact_with_plentiful_controls_and_shrinks_with_few() -> None:
    from plate_concepts.dictionary.whitening import PLENTIFUL_CONTROLS

    rng = np.random.default_rng(21)
    dim = 12
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(4, 0.2, dim)
    many = rng.normal(size=(PLENTIFUL_CONTROLS * dim, dim)) @ mixing.T
    plentiful = ControlWhitening().fit(many, np.ones(len(many), bool))
    exact = ControlWhitening(shrinkage=None).fit(many, np.ones(len(many), bool))
    assert (plentiful.covariance_, plentiful.shrinkage_) == ("exact", 0.0)
    np.testing.assert_array_equal(plentiful.whitening_, exact.whitening_)
    assert "exact covariance (auto: 120 controls >= 10 x 12 dimensions)" in plentiful.describe()

    few = many[: PLENTIFUL_CONTROLS * dim - 1]
    shrunk = ControlWhitening().fit(few, np.ones(len(few), bool))
    assert shrunk.covariance_ == "ledoit-wolf" and 0 < shrunk.shrinkage_ < 1
    line = shrunk.describe()
    assert "\n" not in line and "Ledoit-Wolf shrunk covariance" in line and "119 controls < 10 x 12" in line
    assert shrunk.metadata()["covariance"] == "ledoit-wolf" and shrunk.metadata()["choice"] == line


def test_oas_matches_scikit_learn() -> None:
    from sklearn.covariance import oas

    rng = np.random.default_rng(22)
    controls = rng.normal(size=(30, 50)) * np.linspace(2, 0.5, 50) + 3.0
    fitted = ControlWhitening(shrinkage="oas").fit(controls, np.ones(30, bool))
    _, expected = oas(controls)
    assert fitted.covariance_ == "oas" and fitted.shrinkage_ == pytest.approx(expected, rel=1e-9)
    assert fitted.output_dim == 50
    with pytest.raises(ValueError, match="shrinkage must be None, 'auto', 'ledoit-wolf', 'oas'"):
        ControlWhitening(shrinkage="ridge").fit(controls, np.ones(30, bool))


def test_file_from_before_the_choice_loads_with_the_same_transform() -> None:
    """Old files recorded shrinkage "auto" (then always Ledoit-Wolf) or None, and no choice:
    they load, transform as saved, and say what they did."""
    rng = np.random.default_rng(23)
    X = rng.normal(size=(40, 30))
    is_control = np.arange(40) < 20
    fitted = ControlWhitening(shrinkage="ledoit-wolf").fit(X, is_control)
    old = {key: value for key, value in fitted.metadata().items()
           if key not in ("covariance", "batch_shrinkage", "choice")} | {"shrinkage": "auto"}
    restored = ControlWhitening.from_state(fitted.state_tensors(), old)
    np.testing.assert_array_equal(restored.transform(X), fitted.transform(X))
    assert restored.covariance_ == restored.shrinkage == "ledoit-wolf"
    assert "Ledoit-Wolf shrunk covariance" in restored.describe()
    exact_old = {**old, "shrinkage": None, "shrinkage_coefficient": 0.0}
    assert ControlWhitening.from_state(fitted.state_tensors(), exact_old).covariance_ == "exact"


def _few_controls_per_batch(rng: np.random.Generator, n_per_batch: int, dim: int = 40):
    """Four batches, each with its own offset but the same scale, ``n_per_batch`` controls each."""
    names = np.repeat(["a", "b", "c", "d"], n_per_batch)
    offsets = {name: rng.normal(size=dim) * 3 for name in "abcd"}
    X = rng.normal(size=(len(names), dim)) * np.linspace(2, 0.5, dim)
    X += np.stack([offsets[name] for name in names])
    return X, names


def test_pca_batch_with_few_controls_per_batch_shrinks_its_estimates() -> None:
    rng = np.random.default_rng(24)
    X, names = _few_controls_per_batch(rng, 4)
    is_control = np.ones(len(X), bool)
    careful = ControlWhitening(method="pca-batch").fit(X, is_control, names)
    published = ControlWhitening(method="pca-batch", shrinkage=None).fit(X, is_control, names)
    # The batches differ by offset only: 3 degrees of freedom per variance carry no signal, so
    # the per-component scales are shrunk all the way to the batch's average ...
    assert careful.batch_shrinkage_.shape == (4, 2)
    np.testing.assert_allclose(careful.batch_shrinkage_[:, 1], 0.0, atol=0.05)
    for b in range(4):
        spread = careful.batch_scale_[b].std() / careful.batch_scale_[b].mean()
        assert spread < 0.05 < published.batch_scale_[b].std() / published.batch_scale_[b].mean()
    # ... while the large offsets are kept (James-Stein keeps most of a mean far above its noise).
    assert (careful.batch_shrinkage_[:, 0] > 0.5).all()
    # The shrunk covariance keeps the 28 directions no control varies along; a batch's own
    # standard deviation there is 0, which (floored at sqrt(eps)) would multiply them by 1000:
    # they take the batch's average ratio instead.
    assert careful.output_dim == 40 and published.output_dim == 12
    assert careful.batch_scale_.min() > 0.1
    # Plentiful controls per batch: the published estimates, exactly.
    many, many_names = _few_controls_per_batch(rng, 500, dim=6)
    a = ControlWhitening(method="pca-batch").fit(many, np.ones(len(many), bool), many_names)
    b = ControlWhitening(method="pca-batch", shrinkage=None).fit(many, np.ones(len(many), bool), many_names)
    np.testing.assert_allclose(a.batch_scale_, b.batch_scale_, rtol=1e-6)
    np.testing.assert_array_equal(a.batch_mean_, b.batch_mean_)
    np.testing.assert_array_equal(a.batch_shrinkage_, 1.0)
    # The weights are saved and restored with the state.
    again = ControlWhitening.from_state(careful.state_tensors(), json.loads(json.dumps(careful.metadata())))
    np.testing.assert_array_equal(again.batch_shrinkage_, careful.batch_shrinkage_)
    assert "per batch (4): 4 with few controls shrunk" in careful.describe()
