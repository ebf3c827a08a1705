"""``fit`` and ``evaluate`` on the command line: what they write, replace and refuse, Ctrl-C, and
one clear line for every expected failure. Data-loss cases run the real command line in a
temporary folder and compare checksums of what must survive."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from plate_concepts.cli import main
from plate_concepts.dictionary import ICFL, load_dictionary, read_dictionary_metadata
from plate_concepts.dictionary.checkpoints import read_checkpoint
from plate_concepts.embeddings.store import EmbeddingStore

torch.set_num_threads(1)
DIM, N = 16, 600
#: A small, quick fit (the defaults would pick sizes from the store's size).
QUICK = ["--features", "32", "--rounds", "2", "--per-round", "2", "--steps", "6", "--batch-size", "64",
         "--device", "cpu", "--quiet"]


def token_store(path: Path, n_controls: int = 200) -> Path:
    """N tokens of dimension DIM: noise plus two of 24 planted directions, except the first
    ``n_controls`` (treatment DMSO, noise only); batches 1.0 and 2.0 (numbers, as read from a
    spreadsheet)."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(24, DIM))
    tokens = rng.normal(scale=0.05, size=(N, DIM))
    for i in range(n_controls, N):
        tokens[i] += (rng.random(2) + 0.5) @ atoms[rng.choice(24, 2, replace=False)]
    obs = pd.DataFrame({
        "plate": "P1", "well": [f"B{1 + i % 12:02d}" for i in range(N)], "field": 1,
        "crop_y": np.arange(N), "crop_x": 0, "crop_size": 64,
        "is_control": np.arange(N) < n_controls,
        "treatment": np.where(np.arange(N) < n_controls, "DMSO", "drug"),
        "batch": np.where(np.arange(N) % 2 == 0, 1.0, 2.0),
    })  # fmt: skip
    store = EmbeddingStore.create(path, dim=DIM, chunk_rows=50)
    store.append(tokens.astype(np.float32), obs)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return token_store(tmp_path_factory.mktemp("store") / "tokens.store")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(capsys, command: str = "fit") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"plate-concepts {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------- what fit writes and replaces
def test_fit_replaces_only_a_dictionary_and_only_when_asked(store, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        table = tmp_path / "results.parquet"
        pd.DataFrame({"a": [1, 2]}).to_parquet(table)
        kept = sha(table)
        for extra in ([], ["--overwrite"]):
            assert main(["fit", str(store), str(table), *QUICK, *extra]) == 2
            assert "is not a dictionary file; refusing to replace it" in one_error_line(capsys)
            assert sha(table) == kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]  # checked before training

        out = tmp_path / "d.safetensors"
        assert main(["fit", str(store), str(out), *QUICK]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "results.parquet"]  # no checkpoint
        assert oct(out.stat().st_mode & 0o777) == oct(0o644)  # like any other output, not 0600
        finished = sha(out)
        assert main(["fit", str(store), str(out), *QUICK, "--seed", "1"]) == 2
        assert "already exists (a dictionary file)" in one_error_line(capsys) and sha(out) == finished
        assert main(["fit", str(store), str(out), *QUICK, "--seed", "1", "--overwrite", "--keep-checkpoint"]) == 0
        assert read_dictionary_metadata(out)["hyperparameters"]["seed"] == 1
        assert read_checkpoint(tmp_path / "d.ckpt.safetensors")[1]["step"] == 6  # kept, as asked
        capsys.readouterr()
        # A finished fit's kept checkpoint belongs with its dictionary: a new fit never replaces it.
        assert main(["fit", str(store), str(out), *QUICK, "--overwrite"]) == 2
        assert "checkpoint kept of a finished fit" in one_error_line(capsys)
    finally:
        os.umask(previous)


def test_ctrl_c_during_fit_keeps_the_finished_dictionary_and_writes_beside_it(store, tmp_path):
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(store), str(out), *QUICK]) == 0
    finished = sha(out)
    checkpoint, partial = tmp_path / "d.ckpt.safetensors", tmp_path / "d.partial.safetensors"
    command = [sys.executable, "-m", "plate_concepts.cli", "fit", str(store), str(out), *QUICK,
               "--steps", "1000000", "--checkpoint-every", "1", "--overwrite", "--save-partial"]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "the fit never wrote a checkpoint"
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted at step" in err and f"{out} was not written" in err and "--resume" in err
    assert sha(out) == finished  # the finished dictionary is untouched
    step = read_checkpoint(checkpoint)[1]["step"]
    assert 0 < step < 1_000_000
    _, _, meta = load_dictionary(partial)
    assert meta["training"]["cancelled"] and meta["training"]["steps"] >= step - 1

    # The same command with --resume continues it; finishing replaces OUT and removes the checkpoint.
    resume = ["fit", str(store), str(out), *QUICK, "--steps", str(step + 2), "--checkpoint-every", "1",
              "--overwrite", "--resume"]
    assert main(resume) == 0
    assert read_dictionary_metadata(out)["training"]["steps"] == step + 2 and not checkpoint.exists()


def test_ctrl_c_while_the_whitening_is_fitted_stops_at_once_and_writes_nothing(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(store), str(out), *QUICK]) == 0
    finished = sha(out)
    capsys.readouterr()
    reading = EmbeddingStore.iter_batches

    def interrupted(self, *args, **kwargs):  # Ctrl-C arrives while the controls are read
        if kwargs.get("rows") is not None:
            os.kill(os.getpid(), signal.SIGINT)
        return reading(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingStore, "iter_batches", interrupted)
    started = time.monotonic()
    assert main(["fit", str(store), str(out), *QUICK, "--overwrite", "--save-partial"]) == 130
    assert time.monotonic() - started < 10
    assert "interrupted: cancelled while reading the control tokens; nothing was trained" in capsys.readouterr().err
    assert sha(out) == finished and sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


# ---------------------------------------------------------------------- evaluate
def test_evaluate_says_when_a_dictionary_is_partial(store, tmp_path, capsys):
    polls = iter(range(100))
    partial = ICFL(32, n_rounds=2, per_round=2, steps=50, batch_size=64, device="cpu").fit(
        EmbeddingStore.open(store), cancel=lambda: next(polls) >= 6
    )
    steps = partial.training_["steps"]
    assert partial.training_["cancelled"] and 0 < steps < 50
    path = partial.save(tmp_path / "partial.safetensors")
    assert main(["evaluate", str(store), str(path)]) == 0
    assert f"partial dictionary: its fit was cancelled at step {steps} of 50" in capsys.readouterr().out
    assert main(["evaluate", str(store), str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dictionary"] == {"cancelled": True, "steps": steps, "total_steps": 50}
    assert main(["fit", str(store), str(tmp_path / "full.safetensors"), *QUICK]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(store), str(tmp_path / "full.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dictionary"]["cancelled"] is False


def test_evaluate_json_is_strict_json_when_a_number_is_undefined(tmp_path, capsys):
    flat = EmbeddingStore.create(tmp_path / "flat.store", dim=DIM)  # tokens that do not vary: FVU 0/0
    flat.append(np.ones((64, DIM), np.float32), pd.DataFrame({
        "plate": "P1", "well": "B02", "field": 1, "crop_y": np.arange(64), "crop_x": 0, "crop_size": 64,
        "is_control": True}))  # fmt: skip
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(tmp_path / "flat.store"), str(out), *QUICK, "--whiten", "none"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "flat.store"), str(out), "--json"]) == 0

    def not_json(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(capsys.readouterr().out, parse_constant=not_json)["fvu"] is None


# ---------------------------------------------------------------------- one clear line
def test_fit_and_evaluate_failures_are_one_line(store, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(store), str(out), *QUICK, "--lr", "1e30"]) == 2
    line = one_error_line(capsys)
    assert "the fit diverged at step" in line and "learning rate 1e+30 is too high" in line
    assert not out.exists()
    assert main(["fit", str(store), str(tmp_path), *QUICK]) == 2
    assert "is a folder; the output (a dictionary file) is a file" in one_error_line(capsys)
    assert main(["fit", str(store), str(out), *QUICK, "--k", "3"]) == 2
    assert "k (--k) is a setting of TopK SAE, not of ICFL" in one_error_line(capsys)
    assert main(["fit", str(store), str(out), *QUICK, "--control", "treatment=water"]) == 2
    assert "no row has treatment in ['water']" in one_error_line(capsys)
    assert main(["fit", str(store), str(out), *QUICK, "--control", "treatment"]) == 2
    assert ("control column 'treatment' of embedding store" in (line := one_error_line(capsys))
            and "not a column of booleans (its values: DMSO, drug)" in line
            and "e.g. --control treatment=DMSO" in line)
    assert not any(tmp_path.iterdir())

    assert main(["evaluate", str(store), str(tmp_path)]) == 2
    assert "is a folder, not a dictionary file" in one_error_line(capsys, "evaluate")
    with pytest.raises(SystemExit):
        main(["evaluate", str(store), str(out), "--batch-size", "0"])
    assert "must be a positive whole number" in capsys.readouterr().err

    # A dictionary whitened per batch of a column the store lacks, and an empty store.
    assert main(["fit", str(store), str(out), *QUICK, "--whiten", "pca-batch", "--batch-column", "batch"]) == 0
    other = tmp_path / "other.store"
    table = EmbeddingStore.open(store)
    EmbeddingStore.create(other, dim=DIM).append(table.read(), table.obs.drop(columns="batch"))
    assert main(["evaluate", str(other), str(out)]) == 2
    assert "whitened per batch of 'batch', but store" in one_error_line(capsys, "evaluate")
    EmbeddingStore.create(tmp_path / "empty.store", dim=DIM)
    assert main(["evaluate", str(tmp_path / "empty.store"), str(out)]) == 2
    assert "holds no tokens to evaluate on" in one_error_line(capsys, "evaluate")


def test_a_numeric_batch_column_round_trips_through_fit_and_evaluate(store, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(store), str(out), *QUICK, "--whiten", "pca-batch", "--batch-column", "batch"]) == 0
    assert read_dictionary_metadata(out)["whitening"]["batches"] == ["1", "2"]
    capsys.readouterr()
    assert main(["evaluate", str(store), str(out), "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["fvu"])


def test_a_batch_column_spelled_as_in_the_imported_table_is_found_again_by_evaluate(store, tmp_path, capsys):
    """fit --batch-column Metadata_Batch finds the store's 'batch'; evaluate, reading the column
    the file records, must find it too (it refused: "store ... has no column 'Metadata_Batch'")."""
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(store), str(out), *QUICK, "--whiten", "pca-batch", "--batch-column", "Metadata_Batch"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(store), str(out), "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["fvu"])


# ---------------------------------------------------------------------- small stores
def test_defaults_fit_a_small_store_and_say_so_in_one_line(tmp_path, capsys):
    few = token_store(tmp_path / "few.store", n_controls=10)  # 10 controls in 16 dimensions
    out = tmp_path / "d.safetensors"
    assert main(["fit", str(few), str(out), "--steps", "4", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr()
    err = printed.err
    notes = [line for line in err.splitlines() if line.startswith("plate-concepts fit: note: ")]
    assert notes == [
        (
            "plate-concepts fit: note: small store (600 tokens): using 64 features, 128 tokens per "
            "step (--features, --batch-size to choose)"
        ),
    ], err
    # The default whitening keeps every dimension with so few controls, and says why in one line.
    assert printed.out.splitlines()[0] == (
        "whitening: pca on 10 control tokens, Ledoit-Wolf shrunk covariance (weight "
        f"{read_dictionary_metadata(out)['whitening']['shrinkage_coefficient']:.3g}) (auto: 10 controls < "
        "10 x 16 dimensions); 16 of 16 dimensions kept"
    )
    # The exact covariance, as published, drops what the controls do not span, and says so.
    assert main(["fit", str(few), str(tmp_path / "exact.safetensors"), *QUICK, "--shrinkage", "none"]) == 0
    assert (
        "plate-concepts fit: note: the 10 control tokens (full rank needs at least 17) vary along "
        "only 9 of the 16 embedding dimensions, so the other 7 directions (where no control "
        "varies, and perturbations may) are dropped before the dictionary is fitted; to keep "
        "them, use shrinkage 'auto' (--shrinkage auto)"
    ) in capsys.readouterr().err.splitlines()
    assert "Warning" not in err and "Traceback" not in err
    assert load_dictionary(out)[0].n_features == 64
    assert main(["fit", str(few), str(tmp_path / "big.safetensors"), *QUICK, "--features", "1000"]) == 2
    assert "1000 features for 600 tokens: more features than tokens" in one_error_line(capsys)
    assert main(["fit", str(few), str(tmp_path / "big.safetensors"), *QUICK, "--features", "1000",
                 "--force", "--shrinkage", "auto"]) == 0


def test_every_fit_option_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--features N_FEATURES Dictionary size M (number of features). (default: 8192, on a small store",
                     "--rounds N_ROUNDS ICFL: pursuit rounds J. (default: 20)",
                     "--k K TopK: active features per token. (default: 32)",
                     "--checkpoint-minutes CHECKPOINT_MINUTES", "(default: 2)",
                     "--use-gram, --no-use-gram", "--save-partial", "--keep-checkpoint", "--force"):
        assert expected in text, expected
