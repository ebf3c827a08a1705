"""The activation pass: its statistics equal direct computations on the codes, and the same
pass in this process, written to a folder, or on a 2-worker Dask cluster gives identical
numbers; interrupted and killed runs resume without counting anything twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from plate_concepts._progress import Cancelled
from plate_concepts.analysis.activation_pass import (
    ActivationPass,
    label_columns_of,
    plan_pass,
    run_pass,
)
from plate_concepts.analysis.activations import top_tokens, well_aggregates
from plate_concepts.analysis.metrics import FeatureUsage, ReconstructionMetrics
from plate_concepts.analysis.selectivity import selectivity
from plate_concepts.dictionary import ICFL
from plate_concepts.embeddings.store import EmbeddingStore

torch.set_num_threads(1)
DIM, M = 12, 24
PLATES = ("P1", "P2", "P3")
TREATMENTS = ("DMSO", "drugA", "drugB")


def screen_obs(rng: np.random.Generator) -> pd.DataFrame:
    """Three plates of six wells, 14 tokens per well; a plate-level batch label."""
    rows = []
    for p, plate in enumerate(PLATES):
        for w in range(6):
            well = f"B{w + 2:02d}"
            treatment = TREATMENTS[w % 3]
            for t in range(14):
                rows.append({
                    "plate": plate, "well": well, "field": t // 7, "crop_y": 0, "crop_x": 32 * (t % 7),
                    "crop_size": 32, "treatment": treatment, "batch": p % 2 + 1,
                    "is_control": treatment == "DMSO",
                    "dose": np.nan if treatment == "DMSO" else float(w % 2 + 1),
                })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    rng = np.random.default_rng(0)
    obs = screen_obs(rng)
    directions = rng.normal(size=(3, DIM))
    tokens = rng.normal(size=(len(obs), DIM)) + 3 * directions[obs["treatment"].map(TREATMENTS.index)]
    root = tmp_path_factory.mktemp("pass")
    store = EmbeddingStore.create(root / "store", dim=DIM, chunk_rows=40)
    store.append(tokens.astype(np.float32), obs)
    estimator = ICFL(n_features=M, n_rounds=2, per_round=2, steps=40, batch_size=64, device="cpu", seed=0)
    estimator.fit(tokens, is_control=obs["is_control"].to_numpy())
    dictionary = estimator.save(root / "dict.safetensors")
    return root, EmbeddingStore.open(root / "store"), dictionary, estimator, obs


def expected(estimator, store, obs):
    x = estimator.preprocess(store.read())
    codes = estimator.encode(x)
    return x, codes


def test_label_columns_are_the_labels(screen, tmp_path):
    store, obs = screen[1], screen[4]
    assert label_columns_of(store) == ["treatment", "batch", "dose"]
    assert label_columns_of(store, exclude=["batch"], max_values=2) == ["dose"]
    # A plate map's own is_control column (kept as platemap_is_control) marks controls: no label.
    flagged = EmbeddingStore.create(tmp_path / "s", dim=DIM, chunk_rows=40)
    flagged.append(np.zeros((len(obs), DIM), np.float32), obs.assign(platemap_is_control=obs["is_control"]))
    assert label_columns_of(flagged) == ["treatment", "batch", "dose"]


def test_columns_are_found_as_the_user_spells_them(screen):
    _, store, dictionary, _, _ = screen
    spec = plan_pass(store, dictionary, None, labels=["Metadata_treatment", "DOSE"],
                     control_column="Metadata_is_control", batch_column="Metadata_batch")
    assert spec.label_columns == ("treatment", "dose")
    assert (spec.control_column, spec.batch_column) == ("is_control", "batch")
    with pytest.raises(ValueError, match=r"label column 'genotype' not found; available columns: \['plate'"):
        plan_pass(store, dictionary, None, labels=["genotype"])
    with pytest.raises(ValueError, match="batch column 'run' not found"):
        plan_pass(store, dictionary, None, batch_column="run")


def test_in_memory_pass_equals_direct_computations(screen):
    _, store, dictionary, estimator, obs = screen
    spec = plan_pass(store, dictionary, None, rows_per_task=40)
    assert spec.n_chunks == 7 and spec.label_columns == ("treatment", "batch", "dose")
    result = run_pass(spec)
    x, codes = expected(estimator, store, obs)

    usage = FeatureUsage(M)
    usage.update(codes)
    np.testing.assert_allclose(result.frequency, usage.frequency)
    np.testing.assert_allclose(result.mean_activation, usage.mean_activation, rtol=1e-6, atol=1e-9)
    metrics = ReconstructionMetrics()
    metrics.update(x, estimator.decode(codes))
    assert result.fvu == pytest.approx(metrics.fvu, rel=1e-6)
    assert result.cosine == pytest.approx(metrics.cosine, rel=1e-6)

    for column in ("treatment", "dose"):  # dose: NaN for controls, 1.0 and 2 are labels 1 and 2
        direct = selectivity(codes, obs[column], label=column)
        mine = result.selectivity(column)
        assert [str(v) for v in mine.values] == [str(int(v)) if isinstance(v, float) else str(v) for v in direct.values]
        np.testing.assert_array_equal(mine.active_counts, direct.active_counts)
        np.testing.assert_allclose(mine.maximum, direct.maximum)
        assert mine.n_excluded == direct.n_excluded

    dense = codes.dense().numpy()
    for plate in PLATES:
        rows = np.flatnonzero(obs["plate"] == plate)
        wells = well_aggregates(codes[torch.from_numpy(rows)], obs["well"].to_numpy()[rows])
        mine = result.well_aggregates(plate)
        assert mine.wells == wells.wells
        np.testing.assert_allclose(mine.mean_activation, wells.mean_activation, rtol=1e-6)
        np.testing.assert_array_equal(mine.fraction_active, wells.fraction_active)
        # Sums and sums of squares per (plate, label value) and over the plate's controls.
        stats = result.plate(plate)
        by_value = stats.label_values("treatment")
        for value in TREATMENTS:
            on = rows[obs["treatment"].to_numpy()[rows] == value]
            i = by_value.keys.index(value)
            np.testing.assert_allclose(by_value.sums[i], dense[on].sum(axis=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(by_value.sumsq[i], (dense[on] ** 2).sum(axis=0), rtol=1e-5, atol=1e-6)
        by_well = stats.label_wells("treatment")
        assert sorted(by_well.keys) == sorted({(w, t) for w, t in zip(obs["well"][rows], obs["treatment"][rows])})
        control = rows[obs["is_control"].to_numpy()[rows]]
        controls = stats.controls
        assert controls.counts.sum() == len(control)
        assert sorted(k for k, c in zip(controls.keys, controls.counts) if c) == sorted(set(obs["well"][control]))
        np.testing.assert_allclose(controls.sumsq.sum(axis=0), (dense[control] ** 2).sum(axis=0), rtol=1e-5, atol=1e-6)
        by_field = stats.groups["field"]
        assert sorted(by_field.keys) == [0, 1] and by_field.counts.sum() == len(rows)
        # Top tokens per plate and over the store: the largest codes, ties to the lower row.
        for feature in range(M):
            plate_values = np.where(np.isin(np.arange(len(obs)), rows), dense[:, feature], 0)
            want = [int(r) for r in top_tokens(codes, feature, len(obs)) if plate_values[r] != 0][: spec.top_n]
            assert [r for r, _ in result.top_tokens(feature, plate=plate)] == want
    for feature in range(M):
        assert [r for r, _ in result.top_tokens(feature)] == top_tokens(codes, feature, spec.top_n).tolist()
    frequency = result.plate_frequency()
    assert list(frequency.index) == list(PLATES)
    np.testing.assert_allclose(frequency.loc["P2"].to_numpy(), (dense[obs["plate"] == "P2"] != 0).mean(axis=0))


def assert_same_pass(a: ActivationPass, b: ActivationPass) -> None:
    assert a.plates == b.plates
    for name in ("active", "sums", "plate_active", "plate_tokens"):
        np.testing.assert_array_equal(getattr(a.totals, name), getattr(b.totals, name))
    assert a.fvu == b.fvu and a.cosine == b.cosine
    np.testing.assert_array_equal(a.totals.top.rows, b.totals.top.rows)
    for column in a.label_columns:
        np.testing.assert_array_equal(a.selectivity(column).maximum, b.selectivity(column).maximum)
    for plate in a.plates:
        pa, pb = a.plate(plate), b.plate(plate)
        np.testing.assert_array_equal(pa.wells.sums, pb.wells.sums)
        np.testing.assert_array_equal(pa.label_wells("treatment").sumsq, pb.label_wells("treatment").sumsq)
        np.testing.assert_array_equal(pa.top.rows, pb.top.rows)


def test_written_pass_equals_in_memory_and_keeps_codes(screen, tmp_path):
    _, store, dictionary, estimator, obs = screen
    in_memory = run_pass(plan_pass(store, dictionary, None, rows_per_task=40))
    written = run_pass(plan_pass(store, dictionary, tmp_path / "pass", rows_per_task=40), workers=0)
    assert_same_pass(in_memory, written)
    reopened = ActivationPass.open(tmp_path / "pass")
    assert_same_pass(in_memory, reopened)
    _, codes = expected(estimator, store, obs)
    rows = np.array([3, 77, 200, 251])
    np.testing.assert_array_equal(reopened.codes(rows).dense().numpy(), codes.dense().numpy()[rows])
    # A plate's statistics come from its own file alone.
    for other in ("plate-00000.safetensors", "plate-00002.safetensors"):
        os.remove(tmp_path / "pass" / "plates" / other)
    assert reopened.plate("P2").n_tokens == 84


def test_an_index_column_as_a_label_is_counted_once(screen, tmp_path):
    _, store, dictionary, _, obs = screen  # profiling by well, or by plate
    result = run_pass(plan_pass(store, dictionary, tmp_path / "pass", labels=["well", "plate", "treatment"]), workers=0)
    for column in ("well", "plate"):
        sums = result.label_sums(column)
        assert dict(zip(sums.keys, sums.counts.tolist())) == obs[column].value_counts().to_dict()


def test_complete_pass_is_kept_unless_overwrite(screen, tmp_path):
    _, store, dictionary, _, _ = screen
    spec = plan_pass(store, dictionary, tmp_path / "pass", rows_per_task=40)
    run_pass(spec, workers=0)
    before = (tmp_path / "pass" / "global.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="complete activation pass"):
        run_pass(spec, workers=0)
    run_pass(spec, workers=0, overwrite=True)
    assert (tmp_path / "pass" / "global.safetensors").stat().st_mtime_ns != before
    assert not (tmp_path / ".pass.next").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an activation pass"):
        run_pass(plan_pass(store, dictionary, notes), workers=0, overwrite=True)
    assert (notes / "todo.txt").read_text() == "mine"


def test_cancelled_pass_resumes_without_redoing_chunks(screen, tmp_path):
    _, store, dictionary, _, _ = screen
    spec = plan_pass(store, dictionary, tmp_path / "pass", rows_per_task=40)
    seen = []

    def progress(done, total):
        seen.append(done)

    with pytest.raises(Cancelled):
        run_pass(spec, workers=0, progress=progress, cancel=lambda: len(seen) > 3)
    chunks = sorted((tmp_path / "pass" / "chunks").iterdir())
    assert len(chunks) == 3
    stamps = {c.name: c.stat().st_mtime_ns for c in chunks}
    with pytest.raises(ValueError, match="unfinished"):
        ActivationPass.open(tmp_path / "pass")
    with pytest.raises(ValueError, match="top_n differ"):
        run_pass(plan_pass(store, dictionary, tmp_path / "pass", rows_per_task=40, top_n=5), workers=0)
    result = run_pass(spec, workers=0)
    assert {c.name: c.stat().st_mtime_ns for c in chunks} == stamps  # not redone
    assert_same_pass(result, run_pass(plan_pass(store, dictionary, None, rows_per_task=40)))


def test_two_dask_workers_equal_in_process_even_when_one_dies(screen, tmp_path):
    distributed = pytest.importorskip("distributed")
    _, store, dictionary, _, _ = screen
    marker = tmp_path / "kill-once"
    marker.write_text("")

    class KillOnce(distributed.WorkerPlugin):
        """Kill the worker the first time it starts chunk 2's task."""

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).endswith("-chunk-2") and os.path.exists(self.marker):
                os.remove(self.marker)
                os._exit(1)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        client.register_plugin(KillOnce(str(marker)))
        on_dask = run_pass(plan_pass(store, dictionary, tmp_path / "pass", rows_per_task=40),
                           scheduler=cluster.scheduler_address)
    assert not marker.exists()  # the worker did die once
    assert_same_pass(on_dask, run_pass(plan_pass(store, dictionary, None, rows_per_task=40)))


def test_dask_from_an_unguarded_script_says_to_guard_it(tmp_path):
    pytest.importorskip("distributed")
    script = tmp_path / "unguarded.py"
    script.write_text("from plate_concepts._dask import dask_cluster\n"
                      "with dask_cluster(1, None):\n    pass\n")
    run = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: could not start 1 local Dask worker")
    assert 'if __name__ == "__main__":' in last


def test_a_second_local_cluster_starts_without_a_port_warning(recwarn):
    pytest.importorskip("distributed")
    from plate_concepts._dask import dask_cluster

    with dask_cluster(1, None), dask_cluster(1, None) as second:
        assert second.n_workers == 1
    assert not [w for w in recwarn if "already in use" in str(w.message)]


def test_evaluate_from_the_pass_equals_evaluate(screen, tmp_path, capsys):
    from plate_concepts.cli import main

    root, store, dictionary, _, _ = screen
    assert main(["encode", str(root / "store"), str(dictionary), str(tmp_path / "pass"),
                 "--workers", "0", "--label", "treatment", "--quiet"]) == 0
    capsys.readouterr()
    outputs = []
    for extra in ([], ["--codes", str(tmp_path / "pass")]):
        assert main(["evaluate", str(root / "store"), str(dictionary), "--label", "treatment", "--json", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert outputs[0]["n_tokens"] == len(store) and set(outputs[0]["selectivity"]) == {"treatment"}
    assert set(outputs[0]["selectivity"]["treatment"]["best_feature"]) == set(TREATMENTS)
    # A pass lacking a label, or made with another dictionary, is refused in one line.
    assert main(["evaluate", str(root / "store"), str(dictionary), "--label", "dose", "--codes", str(tmp_path / "pass")]) == 2
    assert "no statistics for label column" in capsys.readouterr().err


def test_a_pass_of_a_dictionary_fitted_again_in_its_place_is_refused(screen, tmp_path, capsys):
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.cli import main

    root, store, _dictionary, estimator, obs = screen
    mine = tmp_path / "dict.safetensors"
    estimator.save(mine)
    run_pass(plan_pass(store, mine, tmp_path / "pass", rows_per_task=40), workers=0)
    evaluate = ["evaluate", str(root / "store"), str(mine), "--codes", str(tmp_path / "pass"), "--json"]
    assert main(evaluate) == 0
    capsys.readouterr()
    refitted = ICFL(n_features=M, n_rounds=2, per_round=2, steps=5, batch_size=64, device="cpu", seed=1)
    refitted.fit(store.read(), is_control=obs["is_control"].to_numpy())
    refitted.save(mine)  # `fit --overwrite` to the same file: the pass no longer describes it
    assert main(evaluate) == 2
    assert f"the dictionary file {mine} changed since the activation pass" in capsys.readouterr().err
    with pytest.raises(ValueError, match="changed since the activation pass"):
        FeatureExplorer.from_pass(tmp_path / "pass")


def test_a_pass_of_a_store_whose_plates_moved_is_refused(screen, tmp_path):
    from plate_concepts.analysis.evaluation import check_pass_matches

    _, store, dictionary, _, obs = screen
    tokens = store.read()
    first, second = (obs["plate"] == "P1").to_numpy(), (obs["plate"] == "P2").to_numpy()

    def make(order):  # P1 and P2, in this order, at the same path (as --overwrite leaves it)
        if (tmp_path / "s").exists():
            import shutil

            shutil.rmtree(tmp_path / "s")
        made = EmbeddingStore.create(tmp_path / "s", dim=DIM, chunk_rows=40)
        for rows in order:
            made.append(tokens[rows].astype(np.float32), obs[rows].reset_index(drop=True))
        return EmbeddingStore.open(tmp_path / "s")

    made = make([first, second])
    result = run_pass(plan_pass(made, dictionary, tmp_path / "pass", rows_per_task=40), workers=0)
    check_pass_matches(result, made)
    # Same path, same number of tokens, but P2's rows come first now: the codes of a row are
    # another token's (after `embed --append --replace-plate P1`, P1 moves to the end).
    with pytest.raises(ValueError, match=r"changed since the activation pass .* reordered"):
        check_pass_matches(ActivationPass.open(tmp_path / "pass"), make([second, first]))
    # Made again with the same plates, order and sizes (other tokens: embedded again with
    # another normalisation, say): another store all the same.
    with pytest.raises(ValueError, match=r"changed since the activation pass .*made again"):
        check_pass_matches(ActivationPass.open(tmp_path / "pass"), make([first, second]))


def test_a_moved_or_copied_project_still_reads_its_passes(screen, tmp_path, capsys):
    """Store, dictionary and pass moved together (a project folder renamed or copied to another
    disk): the pass finds them again and is read; a copy of the dictionary elsewhere is the same
    dictionary (same content); another fit is refused by content, not by path."""
    import shutil

    from plate_concepts.analysis.evaluation import check_pass_matches
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.cli import main

    root, store, dictionary, estimator, obs = screen
    project = tmp_path / "project"
    shutil.copytree(root / "store", project / "store")
    shutil.copy(dictionary, project / "dict.safetensors")
    run_pass(plan_pass(EmbeddingStore.open(project / "store"), project / "dict.safetensors", project / "pass",
                       rows_per_task=40), workers=0)
    moved = tmp_path / "moved"
    shutil.move(project, moved)

    reopened = ActivationPass.open(moved / "pass")
    assert reopened.spec.dictionary == os.fspath((moved / "dict.safetensors").resolve())
    assert reopened.spec.store == os.fspath((moved / "store").resolve())
    check_pass_matches(reopened, EmbeddingStore.open(moved / "store"))
    explorer = FeatureExplorer.from_pass(moved / "pass").prepare()
    assert explorer.activation_pass.n_tokens == len(obs)
    profiles = ["profiles", str(moved / "store"), str(moved / "dict.safetensors"), "--label", "treatment",
                "--codes", str(moved / "pass"), "--json", "--quiet"]
    assert main(profiles) == 0
    assert set(json.loads(capsys.readouterr().out)["values"]) == {"drugA", "drugB"}
    # The original dictionary (same bytes, another path) and store (same rows) are accepted too.
    check_pass_matches(reopened, store, dictionary=dictionary)
    # Another fit is another dictionary, wherever it lies.
    other = ICFL(n_features=M, n_rounds=2, per_round=2, steps=5, batch_size=64, device="cpu", seed=1)
    other.fit(store.read(), is_control=obs["is_control"].to_numpy())
    other_path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="their contents differ"):
        check_pass_matches(reopened, store, dictionary=other_path)
    assert main([*profiles[:2], str(other_path), *profiles[3:]]) == 2
    assert "their contents differ" in capsys.readouterr().err


def test_tokens_of_another_dimension_are_refused_before_encoding(screen, tmp_path, capsys):
    from plate_concepts.cli import main

    _, _, dictionary, _, obs = screen
    narrow = EmbeddingStore.create(tmp_path / "narrow", dim=DIM - 4, chunk_rows=40)
    narrow.append(np.zeros((len(obs), DIM - 4), np.float32), obs)
    with pytest.raises(ValueError, match=rf"dictionary .*dict.safetensors expects {DIM}-dimensional tokens but "
                                         rf"embedding store .*narrow holds {DIM - 4}-dimensional ones"):
        plan_pass(narrow, dictionary, tmp_path / "pass")
    assert not (tmp_path / "pass").exists()
    for command in (["encode", str(tmp_path / "narrow"), str(dictionary), str(tmp_path / "pass")],
                    ["profiles", str(tmp_path / "narrow"), str(dictionary), "--label", "treatment"]):
        assert main([*command, "--quiet"]) == 2
        assert f"expects {DIM}-dimensional tokens" in capsys.readouterr().err


def test_explorer_from_a_written_pass_equals_one_prepared_in_memory(screen, tmp_path):
    from plate_concepts.analysis.explorer import FeatureExplorer

    _, store, dictionary, estimator, obs = screen
    run_pass(plan_pass(store, dictionary, tmp_path / "pass", rows_per_task=40), workers=0)
    opened = FeatureExplorer.from_pass(tmp_path / "pass", plate_name="P2").prepare()
    in_memory = FeatureExplorer(store, estimator, plate_name="P2", encode_batch_size=40).prepare()
    pd.testing.assert_frame_equal(opened.feature_table("treatment"), in_memory.feature_table("treatment"))
    table = opened.feature_table("treatment")
    assert {"n_plates", "top_plate"} <= set(table.columns)
    _, codes = expected(estimator, store, obs)
    dense = codes.dense().numpy()
    on = {plate: (obs["plate"] == plate).to_numpy() for plate in PLATES}
    np.testing.assert_array_equal(table["n_plates"], sum((dense[on[p]] != 0).any(axis=0) for p in PLATES))
    feature = int(np.argmax(table["frequency"]))
    assert opened.top_plate(feature) == max(PLATES, key=lambda p: (dense[on[p], feature] != 0).mean())
    # The explorer holds its plate's codes only, and they are the plate's rows' codes.
    rows = np.flatnonzero(on["P2"])
    assert list(opened.plate_obs.index) == rows.tolist()
    np.testing.assert_array_equal(opened.plate_codes.dense().numpy(), dense[rows])
    np.testing.assert_array_equal(in_memory.plate_codes.dense().numpy(), dense[rows])
    pd.testing.assert_series_equal(opened.well_values(feature), in_memory.well_values(feature))
    assert [c.row for c in opened.top_crops(feature, 5, on_plate=True)] == [
        c.row for c in in_memory.top_crops(feature, 5, on_plate=True)
    ]
    assert all(on["P2"][c.row] for c in opened.top_crops(feature, 5, on_plate=True))
    # Another plate: its wells and codes, nothing of the others.
    opened.set_plate("P3")
    np.testing.assert_array_equal(opened.plate_codes.dense().numpy(), dense[on["P3"]])
    wells = opened.well_values(feature, "fraction")
    p3 = obs[on["P3"]]
    np.testing.assert_allclose(
        wells.to_numpy(), [(dense[p3.index[p3["well"] == w], feature] != 0).mean() for w in wells.index]
    )
    plates = opened.plate_table()
    assert list(plates["plate"]) == list(PLATES) and plates["n_wells"].tolist() == [6, 6, 6]
    assert plates["n_controls"].tolist() == [28, 28, 28]
