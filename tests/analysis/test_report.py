"""The HTML report (self-contained, with crops from the plate, refusing to replace what is not a
report), feature names and notes beside the dictionary, and the profiles/report/names commands."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from plate_concepts._progress import Cancelled
from plate_concepts.analysis.activation_pass import plan_pass, run_pass
from plate_concepts.analysis.feature_notes import FeatureNotes, notes_path
from plate_concepts.analysis.report import ReportSettings, is_report, size_text, write_report
from plate_concepts.cli import main
from plate_concepts.demo import write_demo_plate
from plate_concepts.dictionary import ICFL
from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates import open_plate

M = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The 6-well demo plate (1 field of 128 px per well) and a store of its 32-px crops (16 per
    well) whose tokens carry a direction per perturbation (80 % of the tokens) and per batch
    ("vehicle": DMSO in the control wells, nothing elsewhere); a 16-feature ICFL dictionary."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    plate_dir = write_demo_plate(root / "demo", n_wells=6, fields_per_well=1, field_size=128, seed=0)
    plate = open_plate(plate_dir / "demo_plate.zarr")
    platemap = pd.read_csv(plate_dir / "platemap.csv").set_index("well")
    rows = []
    for well in platemap.index:
        for t in range(16):
            rows.append({"plate": plate.name, "well": well, "field": 0, "crop_y": 32 * (t // 4),
                         "crop_x": 32 * (t % 4), "crop_size": 32, **platemap.loc[well].to_dict()})
    obs = pd.DataFrame(rows)
    obs["is_control"] = obs["is_control"].astype(bool)
    obs["vehicle"] = np.where(obs["is_control"], "DMSO", None)  # a label of the control wells only
    rng = np.random.default_rng(0)
    values = sorted(obs["perturbation"].unique())
    directions = rng.normal(size=(len(values) + 1, 12))
    tokens = rng.normal(size=(len(obs), 12))
    code = obs["perturbation"].map(values.index).to_numpy()
    treated = ~obs["is_control"].to_numpy() & (rng.random(len(obs)) < 0.8)
    tokens[treated] += 3 * directions[code[treated]]
    tokens[(obs["batch"] == "batch2").to_numpy()] += 2 * directions[-1]
    store = EmbeddingStore.create(root / "store", dim=12, chunk_rows=64)
    store.append(tokens.astype(np.float32), obs)
    estimator = ICFL(n_features=M, n_rounds=2, per_round=2, steps=40, batch_size=64, device="cpu", seed=0)
    estimator.fit(tokens, is_control=obs["is_control"].to_numpy())
    dictionary = estimator.save(root / "dict.safetensors")
    store = EmbeddingStore.open(root / "store")
    activation_pass = run_pass(plan_pass(store, dictionary, None, labels=["perturbation", "cell_type", "batch"]))
    return root, plate_dir / "demo_plate.zarr", store, dictionary, activation_pass


def external_references(text: str) -> list[str]:
    """Anything the page would fetch: links, sources other than embedded data, scripts."""
    found = re.findall(r"https?://[^\s\"'<>]*", text)
    found += [s for s in re.findall(r"src=\"([^\"]*)\"", text) if not s.startswith("data:image/png;base64,")]
    found += re.findall(r"<(?:script|link|iframe)\b[^>]*>", text)
    return found


def test_report_is_one_self_contained_file_with_crops_and_names(world, tmp_path):
    _, plate_path, store, dictionary, activation_pass = world
    notes = FeatureNotes.load(dictionary)
    notes.set(3, name="swollen ER <b>", tags=["ER"], note="checked by eye")
    notes.save()
    try:
        out = write_report(tmp_path / "report.html", activation_pass, dictionary, labels=["perturbation"],
                           batch="batch", store=store, plate=plate_path,
                           settings=ReportSettings(values_per_label=2, crops_per_feature=4))
    finally:
        notes_path(dictionary).unlink()
    text = out.read_text(encoding="utf-8")
    assert is_report(out)
    assert external_references(text) == []
    for heading in ("The dictionary", "Perturbation profiles: perturbation", "Confounds", "Named features"):
        assert f"<h2>{heading}" in text
    assert "swollen ER &lt;b&gt;" in text and "swollen ER <b>" not in text  # names are escaped
    images = re.findall(r"src=\"data:image/png;base64,([^\"]+)\"", text)
    assert len(images) >= 1 + 1 + 2 * (1 + 3)  # histogram, heatmap, 2 values x (wells + 3 crop strips)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert "Top crops of feature" in text and "No crop images" not in text
    # Every non-control value of the plate map is profiled; two are detailed.
    for value in ("er-stress", "mito-fragmentation", "multinucleation", "nuclear-enlargement"):
        assert f"<tr><td>{value}</td>" in text
    assert len(re.findall(r"<h3>perturbation = ", text)) == 2
    assert len(re.findall(r"most selective: feature \d+ \(max selectivity [-0-9.]+\), \w+ by z", text)) == 2
    assert text.count("<th>max selectivity</th>") == 2


def test_a_true_false_label_gets_every_value_in_its_heatmap(world, tmp_path, monkeypatch):
    from plate_concepts.analysis import perturbations, report_figures

    _, _, store, dictionary, _ = world
    activation_pass = run_pass(plan_pass(store, dictionary, None, labels=["is_control"]))
    profiled = list(perturbations.perturbation_profiles(activation_pass, "is_control").values)
    drawn = []
    heatmap = report_figures.profile_heatmap
    monkeypatch.setattr(report_figures, "profile_heatmap", lambda z, *args: drawn.append(z) or heatmap(z, *args))
    write_report(tmp_path / "r.html", activation_pass, dictionary, labels=["is_control"], store=store)
    # Values True/False are labels, not a mask that selects rows.
    assert profiled and [list(z.index) for z in drawn] == [profiled]


def test_each_feature_s_crops_are_drawn_once_then_linked(world, tmp_path):
    from PIL import Image

    _, plate_path, store, dictionary, activation_pass = world
    settings = ReportSettings(features_per_value=M, crops_per_feature=3)  # every feature under every value
    text = write_report(tmp_path / "r.html", activation_pass, dictionary, labels=["perturbation", "cell_type"],
                        store=store, plate=plate_path, settings=settings).read_text(encoding="utf-8")
    drawn = re.findall(r'<img alt="top crops of feature (\d+)" src="data:image/png;base64,([^"]+)"', text)
    anchors = re.findall(r"id=crops-(\d+)>", text)
    links = re.findall(r'href="#crops-(\d+)"', text)
    assert len(drawn) == len({f for f, _ in drawn}) == len(anchors) <= M  # once per feature
    assert links and set(links) <= set(anchors)  # the others point to it
    assert len(drawn) + len(links) == text.count("<p class=caption>Top crops of feature") + len(anchors)
    strip = Image.open(io.BytesIO(base64.b64decode(drawn[0][1])))
    assert strip.mode == "P"  # crops as 256 colours: a third of the size


def test_a_label_of_the_control_wells_only_and_a_cut_heatmap_are_said(world, tmp_path):
    _, _, store, dictionary, _ = world
    activation_pass = run_pass(plan_pass(store, dictionary, None, labels=["perturbation", "vehicle"]))
    out = write_report(tmp_path / "r.html", activation_pass, dictionary, labels=["perturbation", "vehicle"],
                       settings=ReportSettings(values_per_label=0, heatmap_values=2))
    text = out.read_text(encoding="utf-8")
    assert is_report(out) and "<h2>Confounds</h2>" in text
    assert re.search(r"<tr><td>vehicle</td><td>—</td><td>—</td><td>none: [^<]*DMSO", text)  # no selectivity
    assert re.search(r"<h2>vehicle</h2><p class=note>", text)  # why it has no profiles
    assert "The heatmap shows the first 2 of 4 values (best mAP first)" in text


def test_report_says_when_the_plate_images_are_not_found(world, tmp_path):
    _, _, store, dictionary, activation_pass = world
    out = write_report(tmp_path / "r.html", activation_pass, dictionary, labels=["perturbation"], store=store,
                       settings=ReportSettings(values_per_label=1, features_per_value=1))
    text = out.read_text(encoding="utf-8")
    assert "No crop images" in text and "give the plate with --plate" in text


def test_report_replaces_only_a_report_and_only_when_asked(world, tmp_path):
    _, _, _, dictionary, activation_pass = world
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(FileExistsError, match="not an HTML report"):
        write_report(mine, activation_pass, dictionary, overwrite=True)
    assert mine.read_text() == "<html>my notes</html>"
    out = write_report(tmp_path / "r.html", activation_pass, dictionary, labels=["perturbation"],
                       settings=ReportSettings(values_per_label=0))
    assert re.fullmatch(r"[1-9]\d* kB", size_text(out))  # a small report is not "0.0 MB"
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_report(out, activation_pass, dictionary)
    before = out.stat().st_mtime_ns
    with pytest.raises(Cancelled):  # a cancelled report leaves the finished one as it was
        write_report(out, activation_pass, dictionary, overwrite=True, cancel=lambda: True)
    assert out.stat().st_mtime_ns == before and is_report(out)
    write_report(out, activation_pass, dictionary, labels=["perturbation"], overwrite=True,
                 settings=ReportSettings(values_per_label=0))
    assert out.stat().st_mtime_ns != before


def test_names_round_trip_search_and_errors(world, tmp_path):
    dictionary = tmp_path / "d.safetensors"
    dictionary.write_bytes(world[3].read_bytes())
    notes = FeatureNotes.load(dictionary)
    assert notes.path == tmp_path / "d.names.json" and notes.n_features == M and notes.named == {}
    notes.set(2, name="Nuclear size", note="bigger nuclei")
    notes.tag(2, "nucleus", "size", "nucleus")
    notes.tag(5, "artefact")
    notes.save()
    again = FeatureNotes.load(dictionary)
    assert again.get(2).name == "Nuclear size" and again.get(2).tags == ["nucleus", "size"]
    assert again.label(2) == "feature 2: Nuclear size" and again.label(4) == "feature 4"
    assert again.search("NUCLE") == [2] and again.search("artefact") == [5] and again.tags() == ["artefact", "nucleus", "size"]
    again.untag(5, "artefact")
    assert 5 not in again.named  # nothing left: forgotten
    with pytest.raises(ValueError, match="feature 16 is not a feature"):
        again.set(16, name="x")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial files
    # A corrupt file is named and left as it is.
    notes_path(dictionary).write_text('{"format": "plate-concepts-feature-notes", "version": 1, "features": {"2": ')
    with pytest.raises(ValueError, match=r"d\.names\.json is not a readable feature-names file"):
        FeatureNotes.load(dictionary)
    notes_path(dictionary).write_text(json.dumps({"format": "plate-concepts-feature-notes", "version": 1,
                                                  "features": {"99": {"name": "x"}}}))
    with pytest.raises(ValueError, match="no feature 99"):
        FeatureNotes.load(dictionary)
    assert "99" in notes_path(dictionary).read_text()


def test_profiles_report_and_names_commands(world, tmp_path, capsys):
    _, plate_path, store, dictionary, _ = world
    assert main(["profiles", str(store.path), str(dictionary), "--label", "perturbation", "--batch", "batch",
                 "--top", "4", "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"label", "values", "confounds"} and record["label"] == "perturbation"
    assert set(record["values"]) == {"er-stress", "mito-fragmentation", "multinucleation", "nuclear-enlargement"}
    entry = record["values"]["er-stress"]
    assert set(entry) == {"n_wells", "map", "features", "most_selective"} and entry["n_wells"] == 1 and entry["map"] is None
    assert len(entry["features"]) == 4
    assert set(entry["features"][0]) == {"feature", "z", "replicate_fraction", "mean", "max_selectivity"}
    assert set(entry["most_selective"]) == {"feature", "max_selectivity", "rank_by_z"}
    for flag in record["confounds"].values():
        assert set(flag) == {"by", "score"}

    assert main(["profiles", str(store.path), str(dictionary), "--label", "perturbation", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "er-stress: 1 well(s)" in text and "max sel" in text and "most selective: feature " in text

    out = tmp_path / "report.html"
    assert main(["report", str(store.path), str(dictionary), str(out), "--label", "perturbation",
                 "--batch", "batch", "--plate", str(plate_path), "--detail", "1", "--quiet"]) == 0
    assert is_report(out) and f"wrote {out}" in capsys.readouterr().out
    assert main(["report", str(store.path), str(dictionary), str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["report", str(store.path), str(dictionary), str(tmp_path / "b.html"), "--label", "batch",
                 "--batch", "batch", "--quiet"]) == 2  # its only label would be left out
    assert "--batch batch is also a --label" in capsys.readouterr().err and not (tmp_path / "b.html").exists()

    names_file = notes_path(dictionary)
    try:
        assert main(["names", str(dictionary), "7", "--name", "mito puncta", "--tag", "mito"]) == 0
        capsys.readouterr()
        assert main(["names", str(dictionary), "--search", "puncta", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"7": {"name": "mito puncta", "tags": ["mito"], "note": ""}}
        assert main(["names", str(dictionary), "99", "--name", "x"]) == 2
        assert "feature 99 is not a feature" in capsys.readouterr().err
    finally:
        names_file.unlink(missing_ok=True)
