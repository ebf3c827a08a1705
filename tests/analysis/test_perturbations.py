"""Perturbation profiles and confound flags on a pass of planted codes: z-scores equal a hand
computation, planted perturbations top their own feature with full replicate agreement and a
high mAP (noise does not), and planted plate, batch, edge and field effects are flagged by name
while the perturbation features are not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from plate_concepts.analysis.activation_pass import pass_of_codes, plan_pass, run_pass
from plate_concepts.analysis.confounds import confound_scores, epsilon_squared, gradient_fraction
from plate_concepts.analysis.perturbations import (
    MAD_SCALE,
    ValueProfile,
    most_selective_text,
    perturbation_profiles,
    robust_z,
    well_profiles,
)
from plate_concepts.dictionary import ICFL
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates.geometry import well_name

M = 12
PLANTED = {"A": 0, "B": 1, "C": 2}  # value -> its feature
BATCH_FEATURE, PLATE_FEATURE, EDGE_FEATURE, FIELD_FEATURE = 3, 4, 5, 6
NOISE_FEATURES = range(7, M)


def planted_codes(seed: int = 0, tokens_per_well: int = 6) -> tuple[pd.DataFrame, np.ndarray]:
    """Two 24-well plates (4 x 6). Per plate and batch (rows A-B: b1, C-D: b2): 4 DMSO wells and
    2 wells each of A, B, C and "noise", shuffled. Features: 0-2 fire on A, B, C (80 % of their
    tokens); 3 on batch b2, 4 on plate P2, 5 on edge wells, 6 on field 1; every feature also
    fires weakly on 10 % of all tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for plate in ("P1", "P2"):
        for batch, well_rows in (("b1", (0, 1)), ("b2", (2, 3))):
            wells = [well_name(r, c) for r in well_rows for c in range(6)]
            labels = ["DMSO"] * 4 + [t for t in ("A", "B", "C", "noise") for _ in range(2)]
            rng.shuffle(labels)
            for well, label in zip(wells, labels, strict=True):
                for t in range(tokens_per_well):
                    rows.append({"plate": plate, "well": well, "field": t % 2, "crop_y": 0, "crop_x": 32 * t,
                                 "crop_size": 32, "treatment": label, "batch": batch,
                                 "is_control": label == "DMSO"})
    obs = pd.DataFrame(rows)
    n = len(obs)
    dense = np.zeros((n, M))

    def fire(feature: int, where: np.ndarray, p: float, scale: float = 1.0) -> None:
        on = where & (rng.random(n) < p)
        dense[on, feature] = scale * (1 + rng.exponential(0.3, on.sum()))

    for value, feature in PLANTED.items():
        fire(feature, (obs["treatment"] == value).to_numpy(), 0.8)
    fire(BATCH_FEATURE, (obs["batch"] == "b2").to_numpy(), 0.7)
    fire(PLATE_FEATURE, (obs["plate"] == "P2").to_numpy(), 0.7)
    row, column = obs["well"].str[0].map("ABCD".index), obs["well"].str[1:].astype(int) - 1
    fire(EDGE_FEATURE, ((row == 0) | (row == 3) | (column == 0) | (column == 5)).to_numpy(), 0.7)
    fire(FIELD_FEATURE, (obs["field"] == 1).to_numpy(), 0.8)
    for feature in range(M):
        fire(feature, np.ones(n, bool), 0.1, 0.5)
    return obs, dense


def sparse_codes(dense: np.ndarray) -> SparseCodes:
    k = int((dense != 0).sum(axis=1).max())
    slots = np.argsort(-(dense != 0).astype(int), axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(dense, slots, axis=1)
    return SparseCodes(torch.from_numpy(slots.astype(np.int64)), torch.from_numpy(values.astype(np.float32)), M)


@pytest.fixture(scope="module")
def planted():
    obs, dense = planted_codes()
    x = dense.astype(np.float32)
    activation_pass = pass_of_codes(sparse_codes(dense), x, x, obs, labels=["treatment", "batch"])
    return obs, dense.astype(np.float32).astype(np.float64), activation_pass


@pytest.fixture(scope="module")
def profiles(planted):
    return perturbation_profiles(planted[2], "treatment", null_size=2000)


def test_robust_z_known_answer():
    controls = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])  # median 3, MAD 1
    np.testing.assert_allclose(robust_z(np.array([[3.0], [6.0]]), controls), [[0.0], [3 / MAD_SCALE]])
    # A floor replaces a MAD of 0; a scale of 0 gives z = 0, not inf.
    flat = np.zeros((4, 2))
    np.testing.assert_allclose(robust_z(np.array([[0.5, 0.5]]), flat, np.array([0.25, 0.0])), [[2.0, 0.0]])


def test_well_z_scores_equal_a_hand_computation(planted):
    obs, dense, activation_pass = planted
    wells = well_profiles(activation_pass, "treatment")
    for plate in ("P1", "P2"):
        on = (obs["plate"] == plate).to_numpy()
        control = on & obs["is_control"].to_numpy()
        control_wells = sorted(set(obs.loc[control, "well"]))
        means = np.array([dense[control & (obs["well"] == w).to_numpy()].mean(axis=0) for w in control_wells])
        median = np.median(means, axis=0)
        mad = MAD_SCALE * np.median(np.abs(means - median), axis=0)
        sd = dense[control].std(axis=0)  # population sd of the control tokens
        floor = sd / np.sqrt(6)  # every control well has 6 tokens
        scale = np.maximum(mad, floor)
        for well in sorted(set(obs.loc[on, "well"])):
            tokens = on & (obs["well"] == well).to_numpy()
            expected = (dense[tokens].mean(axis=0) - median) / scale
            row = np.flatnonzero((wells.meta["plate"] == plate) & (wells.meta["well"] == well))
            assert len(row) == 1
            np.testing.assert_allclose(wells.z[row[0]], expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(wells.fraction[row[0]], (dense[tokens] != 0).mean(axis=0), atol=1e-6)
            assert wells.meta["is_control"].iloc[row[0]] == (obs.loc[tokens, "treatment"].iloc[0] == "DMSO")


def test_planted_values_top_their_feature_with_agreeing_replicates(planted, profiles):
    obs, dense, _ = planted
    assert set(profiles.values) == {"A", "B", "C", "noise"} and profiles.control_values == ["DMSO"]
    for value, feature in PLANTED.items():
        profile = profiles.values[value]
        assert profile.n_wells == 8 and profile.n_plates == 2
        top = profile.top(3)
        assert top["feature"].iloc[0] == feature
        assert top["replicate_fraction"].iloc[0] == 1.0
        # Combined across plates = the mean of the replicate wells' own z-scores.
        rows = (profiles.wells.meta["value"] == value).to_numpy()
        np.testing.assert_allclose(profile.z, profiles.wells.z[rows].mean(axis=0), rtol=1e-5)
        tokens = (obs["treatment"] == value).to_numpy()
        np.testing.assert_allclose(profile.mean, dense[tokens].mean(axis=0), rtol=1e-5)
    assert profiles.values["noise"].z.max() < 3


def test_max_selectivity_beside_z_equals_a_hand_computation(planted, profiles):
    obs, dense, _ = planted
    rates = {v: (dense[(obs["treatment"] == v).to_numpy()] != 0).mean(axis=0) for v in obs["treatment"].unique()}
    for value, feature in PLANTED.items():
        expected = rates[value] - np.max([r for v, r in rates.items() if v != value], axis=0)
        profile = profiles.values[value]
        np.testing.assert_allclose(profile.max_selectivity, expected, atol=1e-6)
        assert profile.most_selective() == (feature, pytest.approx(expected[feature]), 1)
        np.testing.assert_allclose(profile.top(M)["max_selectivity"], expected[profile.top(M)["feature"]], atol=1e-6)
        assert most_selective_text(profile) == f"most selective: feature {feature} (max selectivity {expected[feature]:.3f}), first by z"


def test_most_selective_feature_ranked_by_z_when_they_disagree():
    # Feature 2 is the most selective but third by z (feature 0 is almost silent on controls).
    z, selectivity = np.array([9.0, 5.0, 4.0, 1.0]), np.array([0.30, 0.10, 0.45, 0.0])
    blank = np.zeros(4)
    profile = ValueProfile("drug", 2, 1, 64, z, blank, blank, blank, selectivity)
    assert profile.most_selective() == (2, 0.45, 3)
    assert most_selective_text(profile) == "most selective: feature 2 (max selectivity 0.450), 3rd by z"
    # Nothing is selective (a value among many, every feature as common elsewhere): none named.
    for nothing in (np.array([0.0, -0.2, -0.1, 0.0]), np.full(4, np.nan)):
        flat = ValueProfile("drug", 2, 1, 64, z, blank, blank, blank, nothing)
        assert flat.most_selective() is None
        assert most_selective_text(flat) == "no feature is selective for it (max selectivity 0 or less)"


def test_a_label_of_the_control_wells_only_has_no_profile_and_no_error(planted):
    obs, dense, _ = planted
    obs = obs.assign(vehicle=np.where(obs["is_control"], "DMSO", None))
    x = dense.astype(np.float32)
    activation_pass = pass_of_codes(sparse_codes(dense), x, x, obs, labels=["vehicle"])
    result = perturbation_profiles(activation_pass, "vehicle", null_size=10)
    assert result.values == {} and result.control_values == ["DMSO"]
    assert result.to_json() == {"label": "vehicle", "values": {}}


def test_map_separates_planted_replicates_from_noise(profiles):
    for value in PLANTED:
        assert profiles.values[value].map > 0.9 and profiles.values[value].map_p_value < 0.01
    noise = profiles.values["noise"]
    assert noise.map < 0.6 and noise.map_p_value > 0.05


def test_json_record_has_the_documented_keys(profiles, planted):
    flags = confound_scores(planted[2], ["treatment"], "batch").flags
    record = profiles.to_json(top=5, confounds=flags)
    assert set(record) == {"label", "values", "confounds"} and record["label"] == "treatment"
    entry = record["values"]["A"]
    assert set(entry) == {"n_wells", "map", "features", "most_selective"} and len(entry["features"]) == 5
    assert set(entry["features"][0]) == {"feature", "z", "replicate_fraction", "mean", "max_selectivity"}
    assert entry["most_selective"] == {"feature": PLANTED["A"], "rank_by_z": 1,
                                       "max_selectivity": pytest.approx(entry["features"][0]["max_selectivity"])}
    zs = [f["z"] for f in entry["features"]]
    assert zs == sorted(zs, reverse=True)
    assert record["confounds"][str(BATCH_FEATURE)] == {"by": "batch", "score": pytest.approx(flags[BATCH_FEATURE].score)}


def test_edge_wells_are_those_of_the_plate_format_the_store_recorded(tmp_path):
    """P1 is recorded as a 384-well plate imaged in A01-D06 only: its edge is row A and
    column 1, not row D and column 6; P2 has no record (a store embedded before formats were
    recorded) and falls back on the smallest standard plate holding its wells (24 wells)."""
    from plate_concepts.analysis.confounds import well_table

    obs, dense = planted_codes()
    store = EmbeddingStore.create(tmp_path / "s", dim=M, chunk_rows=64)
    store.append(dense.astype(np.float32), obs)
    store.update_provenance(plates={"P1": {"format": [16, 24]}})
    x = dense.astype(np.float32)
    activation_pass = pass_of_codes(sparse_codes(dense), x, x, obs, labels=["treatment"], store=tmp_path / "s")
    meta = well_table(activation_pass).meta
    for plate, (last_row, last_column) in {"P1": (None, None), "P2": (3, 5)}.items():
        wells = meta[meta["plate"] == plate]
        expected = (wells["row"] == 0) | (wells["column"] == 0)
        if last_row is not None:
            expected |= (wells["row"] == last_row) | (wells["column"] == last_column)
        assert (wells["edge"] == expected).all() and len(wells) == 24
    assert meta[meta["plate"] == "P1"]["edge"].sum() == 9  # A01-A06 and B01-D01
    assert meta[meta["plate"] == "P2"]["edge"].sum() == 16


def test_epsilon_squared_and_gradient_known_answers():
    values = np.array([[1.0], [1.0], [3.0], [3.0]])
    np.testing.assert_allclose(epsilon_squared(values, np.array(["a", "a", "b", "b"])), [1.0])
    # SS_between = 4, SS_total = 8, MS_within = 4 / 2 -> (4 - 1 * 2) / 8.
    noisy = np.array([[0.0], [2.0], [2.0], [4.0]])
    np.testing.assert_allclose(epsilon_squared(noisy, np.array(["a", "a", "b", "b"])), [0.25])
    assert np.isnan(epsilon_squared(values, np.array(["a", "b", "c", "d"]))[0])  # one row per group
    line = np.arange(6, dtype=float)[:, None]
    np.testing.assert_allclose(gradient_fraction(line, np.arange(6), np.zeros(6)), [1.0])


def test_planted_nuisances_are_flagged_by_name_and_perturbations_are_not(planted):
    scores = confound_scores(planted[2], batch="batch")
    flags = scores.flags
    assert {f: flag.by for f, flag in flags.items()} == {
        BATCH_FEATURE: "batch", PLATE_FEATURE: "plate", EDGE_FEATURE: "edge", FIELD_FEATURE: "field",
    }
    assert flags[BATCH_FEATURE].score > 0.6 and flags[BATCH_FEATURE].label == "treatment"
    assert "batch" in flags[BATCH_FEATURE].why() and "column" not in flags[BATCH_FEATURE].why()
    # A batch read from a column of another name is named in the reason.
    renamed = pass_of_codes(sparse_codes(planted[1]), planted[1].astype(np.float32), planted[1].astype(np.float32),
                            planted[0].rename(columns={"batch": "run"}), labels=["treatment", "run"])
    assert confound_scores(renamed, batch="run").flags[BATCH_FEATURE].why().startswith(
        "the batch (column run) explains")
    for feature in PLANTED.values():
        assert scores.labels.loc[feature, "treatment"] > 0.6
    assert list(scores.labels.columns) == ["treatment"]  # the batch column is no label here
    # Without the batch column the batch feature's wells are only a row gradient.
    without = confound_scores(planted[2], labels=["treatment"])
    assert without.flags[BATCH_FEATURE].by == "row"


# ---------------------------------------------------------------------- the demo's claims, small
def screen_with_batch(root, seed: int = 0) -> tuple[EmbeddingStore, object]:
    """One 96-well plate of 16-d tokens, 8 per well: per batch (rows A-D: b1, E-H: b2) 16 DMSO
    wells, 8 wells each of perturbations A, B, C (80 % of their tokens shifted by 4 along their
    own direction) and 8 "noise" wells, shuffled; every b2 token is shifted by 4 along a fourth
    direction (the intensity batch). A 32-feature ICFL dictionary on control-whitened tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for batch, well_rows in (("b1", range(4)), ("b2", range(4, 8))):
        wells = [well_name(r, c) for r in well_rows for c in range(12)]
        labels = ["DMSO"] * 16 + [p for p in PLANTED for _ in range(8)] + ["noise"] * 8
        rng.shuffle(labels)
        for well, label in zip(wells, labels, strict=True):
            for t in range(8):
                rows.append({"plate": "S1", "well": well, "field": t // 4, "crop_y": 0, "crop_x": 32 * (t % 4),
                             "crop_size": 32, "perturbation": label, "batch": batch, "is_control": label == "DMSO"})
    obs = pd.DataFrame(rows)
    directions = np.linalg.qr(rng.normal(size=(16, 16)))[0][:, :4].T
    tokens = rng.normal(size=(len(obs), 16))
    for i, value in enumerate(PLANTED):
        tokens[(obs["perturbation"] == value).to_numpy() & (rng.random(len(obs)) < 0.8)] += 4 * directions[i]
    tokens[(obs["batch"] == "b2").to_numpy()] += 4 * directions[3]
    store = EmbeddingStore.create(root / "store", dim=16, chunk_rows=256)
    store.append(tokens.astype(np.float32), obs)
    estimator = ICFL(n_features=32, n_rounds=2, per_round=2, steps=60, batch_size=128, device="cpu", seed=seed)
    estimator.fit(tokens, is_control=obs["is_control"].to_numpy())
    return EmbeddingStore.open(root / "store"), estimator.save(root / "dict.safetensors")


def test_demo_claims_on_a_small_screen_with_a_batch(tmp_path):
    """The user guide's demo claims: each planted perturbation's profile ranks first its most
    selective feature, with replicate fraction > 0.5; the batch is flagged (by batch) on at
    least one feature; no most-selective feature is flagged."""
    torch.set_num_threads(1)
    store, dictionary = screen_with_batch(tmp_path)
    activation_pass = run_pass(plan_pass(store, dictionary, None, labels=["perturbation", "batch"]))
    profiles = perturbation_profiles(activation_pass, "perturbation", null_size=1000)
    selectivity = activation_pass.selectivity("perturbation")
    flags = confound_scores(activation_pass, ["perturbation"], "batch").flags
    for value in PLANTED:
        most_selective = int(selectivity.maximum[selectivity.values.index(value)].argmax())
        top = profiles.values[value].top(1)
        assert int(top["feature"].iloc[0]) == most_selective
        assert top["replicate_fraction"].iloc[0] > 0.5
        assert most_selective not in flags
        assert profiles.values[value].map > 0.9
    assert any(flag.by == "batch" for flag in flags.values())


# ---------------------------------------------------------------------- what a user can get wrong
def planted_pass(obs: pd.DataFrame, dense: np.ndarray, labels=("treatment", "batch")):
    x = dense.astype(np.float32)
    return pass_of_codes(sparse_codes(dense), x, x, obs, labels=list(labels))


def test_a_plate_without_controls_is_left_out_with_a_warning_naming_it():
    obs, dense = planted_codes()
    obs.loc[obs["plate"] == "P2", "is_control"] = False
    obs.loc[(obs["plate"] == "P2") & (obs["treatment"] == "noise"), "treatment"] = "only on P2"
    with pytest.warns(UserWarning, match=r"1 plate\(s\) have no control wells and are left out of the profiles: P2"), \
            pytest.warns(UserWarning, match=r"1 value\(s\) of treatment occur only on plates without control wells and get no profile: only on P2"):
        profiles = perturbation_profiles(planted_pass(obs, dense), "treatment", null_size=200)
    assert profiles.wells.plates_with_controls == ["P1"] and "only on P2" not in profiles.values
    assert profiles.values["A"].n_wells == 4 and profiles.values["A"].n_plates == 1
    assert int(profiles.values["A"].top(1)["feature"].iloc[0]) == PLANTED["A"]


def test_too_few_control_wells_warn_that_z_rests_on_token_sampling():
    obs, dense = planted_codes()
    dmso = obs["treatment"] == "DMSO"
    first = obs.loc[dmso].groupby("plate")["well"].transform("min")  # one control well per plate
    obs.loc[first.index[obs.loc[first.index, "well"] != first], "is_control"] = False
    with pytest.warns(UserWarning, match=r"2 plate\(s\) have fewer than 3 control wells: P1 \(1\), P2 \(1\)"):
        well_profiles(planted_pass(obs, dense), "treatment")


def test_confound_floor_and_a_batch_of_one_value_are_said(planted):
    activation_pass = planted[2]
    for bad in (float("nan"), -0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match=r"min_score \(--min-score\) is a variance fraction: a number from 0 to 1"):
            confound_scores(activation_pass, min_score=bad)
    assert confound_scores(activation_pass, batch="batch", min_score=np.float32(0.5)).flags  # numpy numbers are numbers
    obs, dense = planted_codes()
    obs["batch"] = "only"
    with pytest.warns(UserWarning, match=r"the batch column 'batch' has one value, 'only' over the wells: .*none is flagged by batch"):
        flags = confound_scores(planted_pass(obs, dense), ["treatment"], "batch").flags
    assert "batch" not in {flag.by for flag in flags.values()}


def test_profiles_and_names_commands_refuse_what_they_cannot_do(tmp_path, capsys):
    from plate_concepts.cli import main

    torch.set_num_threads(1)
    store, dictionary = screen_with_batch(tmp_path)
    common = [str(store.path), str(dictionary), "--quiet"]
    # The batch named as the label would flag the perturbation's own features as "batch".
    assert main(["profiles", *common, "--label", "perturbation", "--batch", "Perturbation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("plate-concepts profiles: error: --batch Perturbation is the profiled --label perturbation: give "
                   "the column of batches (plates, runs, staining days), not of perturbations")
    with pytest.raises(SystemExit):
        main(["profiles", *common, "--label", "perturbation", "--top", "ten"])
    assert "argument --top: must be a positive whole number, got 'ten'" in capsys.readouterr().err
    assert main(["profiles", *common, "--label", "perturbation", "--min-score", "nan"]) == 2
    assert "a number from 0 to 1, got nan" in capsys.readouterr().err
    # names: a mistyped dictionary is an error, not a new names file beside nothing.
    assert main(["names", str(tmp_path / "dict.safetensor"), "3", "--name", "x"]) == 2
    assert capsys.readouterr().err.strip().endswith("dict.safetensor does not exist")
    assert not list(tmp_path.glob("*.names.json"))
    assert main(["names", str(dictionary), "3", "--search", "x"]) == 2
    assert "not both" in capsys.readouterr().err
