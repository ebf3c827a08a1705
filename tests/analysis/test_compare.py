"""compare: the grid at matched sparsity, its table, JSON and figure, cancelling, and the command."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import make_feature_plate, make_feature_store

from plate_concepts.analysis.compare import RunSpec, compare, grid, sparsity_split
from plate_concepts.cli import main
from plate_concepts.dictionary.estimators import METHODS

QUICK = ["--features", "8", "--steps", "30", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """192 crop tokens (d = 16); in the drug wells the patches of one cell per field carry a
    planted direction. Controls: the DMSO wells."""
    torch.set_num_threads(1)
    return make_feature_store(tmp_path_factory.mktemp("store") / "tiny.store", make_feature_plate())


def test_sparsity_split_and_grid():
    assert [sparsity_split(s) for s in (1, 4, 8, 12, 16, 32, 7)] == [
        (1, 1), (2, 2), (2, 4), (3, 4), (4, 4), (4, 8), (1, 7)
    ]
    with pytest.raises(ValueError, match="positive whole number"):
        sparsity_split(0)
    assert [(r.method, r.whiten) for r in grid()] == [("icfl", "pca"), ("topk", "pca"), ("icfl", "none"),
                                                       ("topk", "none")]
    with pytest.raises(ValueError, match="unknown whitening 'zca'"):
        RunSpec("icfl", "zca")
    with pytest.raises(ValueError, match="unknown dictionary method 'nmf'"):
        RunSpec("nmf", "pca")


def test_every_registered_method_codes_a_token_with_the_matched_sparsity():
    """Each method's settings say how it reaches S features per token (no switch on names)."""
    for name, estimator_class in METHODS.items():
        for sparsity in (1, 8, 12):
            params = estimator_class.settings_class.at_sparsity(sparsity)
            assert estimator_class.module_class(32, 16, **params).code_slots == sparsity, name
    with pytest.raises(ValueError, match="positive whole number"):
        METHODS["topk"].settings_class.at_sparsity(0)


def test_compare_fits_at_matched_sparsity_and_finds_the_planted_feature(store):
    seen = []
    result = compare(store, ["treatment"], n_features=8, sparsity=4, steps=60, batch_size=64, device="cpu",
                     progress=seen.append)
    assert [(r.spec.method, r.spec.whiten) for r in result.runs] == [(r.method, r.whiten) for r in grid()]
    for run in result.runs:
        hyper = run.estimator.model_.hyperparameters()
        assert hyper.get("k", hyper.get("n_rounds", 0) * hyper.get("per_round", 0)) == 4
        assert run.evaluation["l0"] <= 4 + 1e-9 and run.estimator.training_["steps"] == 60
        assert any(note.startswith("whitening: ") for note in run.notes)
    assert {e.stage for e in seen} == {"fitting", "evaluating"} and seen[-1].run == 4
    assert result.control_values == {"treatment": ["DMSO"]}  # left out of the means
    # Whitened ICFL finds the planted drug feature (its best max selectivity equals the mean).
    icfl_pca = result.runs[0]
    best = icfl_pca.evaluation["selectivity"]["treatment"]["best_max_selectivity"]
    assert result.mean_best(icfl_pca, "treatment") == best["drug"] >= 0.2
    table = result.table()
    assert list(table.columns[:7]) == ["method", "whiten", "sparsity", "FVU", "cosine", "L0", "dead"]
    assert table["sparsity"].tolist() == ["J = 2, L = 2", "k = 4"] * 2
    text = result.format()
    assert "best max selectivity per value of treatment (controls, left out of the mean: DMSO)" in text


def test_cancel_returns_the_finished_runs(store):
    stop = threading.Event()

    def progress(event):
        if event.run == 2 and event.stage == "fitting":
            stop.set()

    result = compare(store, ["treatment"], grid(["icfl", "topk"], ["pca"]), n_features=8, sparsity=4,
                     steps=30, batch_size=64, device="cpu", progress=progress, cancel=stop)
    assert result.cancelled and [r.spec.method for r in result.runs] == ["icfl"]


def test_compare_command_json_table_and_figure(store, tmp_path, capsys):
    figure = tmp_path / "compare.png"
    args = ["compare", str(store.path), "--label", "treatment", "--sparsity", "4", *QUICK, "--quiet"]
    assert main([*args, "--whiten", "pca", "--out", str(figure), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["runs"] and [r["method"] for r in out["runs"]] == ["icfl", "topk"]
    for run in out["runs"]:
        assert list(run) == ["method", "whiten", "fvu", "cosine", "l0", "dead_fraction", "selectivity"]
        assert run["whiten"] == "pca" and set(run["selectivity"]) == {"treatment"}
        assert {"best_max_selectivity", "n_avg_above_0.5", "n_avg_above_0.2"} <= set(run["selectivity"]["treatment"])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table, the whitening each run used, and the figure only replaced when asked.
    assert main([*args, "--methods", "icfl", "--whiten", "none", "--out", str(figure)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--methods", "icfl", "--whiten", "none", "--out", str(figure), "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "1 runs at S = 4 (ICFL J = 2, L = 2; TopK k = 4)" in text
    assert "icfl none: whitening: none (centred on the mean of 128 control tokens)" in text
    assert "mean best max" in text and f"wrote {figure}" in text
    table = tmp_path / "table.csv"
    table.write_text("a,b\n")
    assert main([*args, "--out", str(table), "--overwrite"]) == 2  # never a file of another kind
    assert table.read_text() == "a,b\n"
    assert main([*args, "--whiten", "pca-batch"]) == 2
    assert "needs --batch-column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--methods", "icfl,pca"])
    assert "expected a comma-separated list of ['icfl', 'topk'], got 'icfl,pca'" in capsys.readouterr().err
