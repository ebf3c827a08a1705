"""The napari panels on a screen (a store of three plates): the Features panel's plate chooser
(layers redrawn for the chosen plate, a plate whose images are gone), going to a feature's top
plate, the screen columns of the feature table, the Perturbations panel, feature names through
the panel, "Export report", and opening an activation pass (reader and ``view``)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FEATURE_DIM, make_feature_dictionary, make_feature_plate, make_feature_store

pytestmark = pytest.mark.gui

PLATES = ("P1", "P2", "P3")  # P3's images are not where the store says


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """Plates P1 and P2 (the feature plate: drug in A02 and B02, planted along axis 3) written as
    OME-Zarr, and P3 (4 wells, one field) whose recorded source does not exist; on P2 well B03
    is "drug2", planted along axis 5. One store of all three (provenance: their sources) and
    a 16-feature dictionary fitted on it."""
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates.omezarr import write_ome_zarr_plate

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("screen")
    plates = [make_feature_plate(seed=0), make_feature_plate(seed=1),
              make_feature_plate(wells=["A01", "A02", "B01", "B02"], n_fields=1, seed=2)]  # fmt: skip
    store = EmbeddingStore.create(root / "screen.store", dim=FEATURE_DIM, patch_grid=(4, 4))
    sources = {}
    for index, (plate, name) in enumerate(zip(plates, PLATES, strict=True)):
        plate.name = name
        part = make_feature_store(root / f"{name}.part", plate, seed=index)
        tokens, patches, obs = part.read(), part.read_patches(), part.obs.reset_index(drop=True)
        if name == "P2":
            extra = (obs["well"] == "B03").to_numpy()
            planted = np.zeros(FEATURE_DIM, np.float32)
            planted[5] = 4.0
            tokens[extra] += planted
            patches[extra] += planted
            obs.loc[extra, "treatment"] = "drug2"
            obs.loc[extra, "is_control"] = False
        store.append(tokens, obs, patch_tokens=patches)
        path = root / f"{name}.ome.zarr"
        if name != "P3":
            write_ome_zarr_plate(plate, path)
        sources[name] = {"source": str(path), "channels": list(plate.channels)}
    store.update_provenance(plates=sources)
    store = EmbeddingStore.open(store.path)
    estimator = make_feature_dictionary(store)
    dictionary = estimator.save(root / "dict.safetensors")
    return SimpleNamespace(root=root, store=store, estimator=estimator, dictionary=dictionary,
                           paths={name: root / f"{name}.ome.zarr" for name in PLATES})  # fmt: skip


@pytest.fixture
def open_screen(make_napari_viewer, screen, qtbot):
    """``open(dictionary=None, perturbations=False)`` -> (viewer, state, Features panel,
    Perturbations panel or None, explorer): plate P1 shown, an explorer of the store prepared
    on it, the panels docked and the profiles computed."""

    def show(dictionary: Path | None = None, perturbations: bool = False):
        from plate_concepts.analysis.explorer import FeatureExplorer
        from plate_concepts.plates import open_plate
        from plate_concepts.viewer._explorer_jobs import explorer_preparer
        from plate_concepts.viewer.app import show_plate
        from plate_concepts.viewer.features_panel import FeaturesPanel
        from plate_concepts.viewer.perturbations_panel import PerturbationsPanel
        from plate_concepts.viewer.state import get_state

        plate = open_plate(screen.paths["P1"])
        explorer = FeatureExplorer(screen.store, screen.estimator, plate=plate).prepare()
        viewer = make_napari_viewer()
        show_plate(viewer, plate)
        state = get_state(viewer)
        state.set_store(screen.store)
        panel = FeaturesPanel(viewer)
        viewer.window.add_dock_widget(panel, name="Features")
        other = None
        if perturbations:
            other = PerturbationsPanel(viewer)
            viewer.window.add_dock_widget(other, name="Perturbations")
        state.set_dictionary(screen.estimator, dictionary)
        state.set_explorer(explorer)
        preparer = explorer_preparer(viewer)
        qtbot.waitUntil(lambda: state.profiles is not None and not preparer.is_busy, timeout=30_000)
        return viewer, state, panel, other, explorer

    return show


def _role(layer):
    return layer.metadata.get("plate_concepts", {}).get("role")


def _feature_layers(viewer):
    return {_role(layer): layer for layer in viewer.layers if (_role(layer) or "").startswith("feature-")}


def _heatmap_value(layer, mosaic, well):
    oy, ox = mosaic.field_origin(well, 0)
    index = np.round((np.array([oy + 10, ox + 10]) - layer.translate) / layer.scale).astype(int)
    return float(layer.data[tuple(index)])


def _planted(explorer, value):
    """The feature with the highest z-score for ``value`` of treatment, and that z."""
    from plate_concepts.analysis.perturbations import perturbation_profiles

    z = perturbation_profiles(explorer.activation_pass, "treatment").values[value].z
    return int(np.argmax(z)), float(z.max())


def test_choosing_a_plate_redraws_its_layers(open_screen, qtbot):
    viewer, state, panel, _, explorer = open_screen()
    table = explorer.plate_table()
    assert not panel.plates.isHidden()  # a screen: the chooser is there
    assert panel.plates.plates() == list(PLATES) and panel.plates.current == "P1"
    rows = [[panel.plates.model.item(r, c).text() for c in range(4)] for r in range(3)]
    assert rows == [[p, f"{t:,}", f"{w:,}", f"{c:,}"] for p, t, w, c in table.itertuples(index=False)]
    feature = _planted(explorer, "drug2")[0]
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(feature)
    before = _heatmap_value(_feature_layers(viewer)["feature-heatmap"], state.mosaic, "B03")

    with qtbot.waitSignal(panel.feature_shown, timeout=30_000):
        panel.plates.choose("P2")
    assert explorer.plate_name == "P2" and state.plate.name == "P2" and panel.plates.current == "P2"
    names = [layer.name for layer in viewer.layers]
    assert not any(name.startswith("P1") for name in names) and "P2 DNA" in names
    layers = _feature_layers(viewer)
    assert set(layers) == {"feature-heatmap", "feature-map", "feature-cells"}
    values = explorer.well_values(feature)  # the values of P2 now
    for well in values.index:
        assert _heatmap_value(layers["feature-heatmap"], state.mosaic, well) == pytest.approx(values[well])
    assert values["B03"] != pytest.approx(before)  # drug2 is on P2 only: another map
    assert layers["feature-map"].metadata["plate_concepts"]["plate"] == "P2"
    assert all(layers[r].colorbar.visible for r in ("feature-heatmap", "feature-map"))  # colour bars
    order = [_role(layer) for layer in viewer.layers]
    assert order.index("feature-heatmap") > max(i for i, r in enumerate(order) if r == "plate-channel")
    assert panel.well.findText("B03") >= 0 and "plate P2 shown" in panel.status.text()
    qtbot.waitUntil(lambda: not panel.is_busy and panel.preparer.switching is None, timeout=20_000)


def test_a_plate_without_images_shows_its_wells_in_the_chart(open_screen, qtbot):
    viewer, _state, panel, _, explorer = open_screen()
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(3)
    with qtbot.waitSignal(panel.feature_shown, timeout=30_000):
        panel.plates.choose("P3")
    assert explorer.plate_name == "P3" and explorer.plate is None
    assert "images of plate P3 were not found" in panel.status.text()
    assert _feature_layers(viewer) == {}  # nothing drawn over the plate still shown
    values = explorer.well_values(3)
    shown = dict(zip(panel.bars.labels, panel.bars.values, strict=True))
    assert {well: shown[well] for well in values.index} == pytest.approx(values.to_dict())
    qtbot.waitUntil(lambda: not panel.is_busy and panel.preparer.switching is None, timeout=20_000)


def test_a_feature_can_take_the_viewer_to_its_top_plate(open_screen, qtbot):
    viewer, state, panel, _, explorer = open_screen()
    feature = _planted(explorer, "drug2")[0]
    assert explorer.top_plate(feature) == "P2" and explorer.plate_name == "P1"
    panel.plates.follow.setChecked(True)
    with qtbot.waitSignal(state.explorer_plate_changed, timeout=30_000):
        panel.select_feature(feature)
    qtbot.waitUntil(lambda: state.mosaic.plate.name == "P2" and "feature-heatmap" in _feature_layers(viewer),
                    timeout=20_000)  # fmt: skip
    assert explorer.plate_name == "P2" and panel.plates.current == "P2"
    assert _feature_layers(viewer)["feature-heatmap"].metadata["plate_concepts"]["feature"] == feature
    qtbot.waitUntil(lambda: not panel.is_busy and panel.preparer.switching is None, timeout=20_000)


def test_the_table_has_the_screen_columns(open_screen):
    _viewer, _state, panel, _, explorer = open_screen()
    table = panel.model.table
    assert {"plates", "top plate", "top values (z)"} <= set(panel.model.shown)
    expected = explorer.feature_table("treatment").set_index("feature")
    assert list(table["top plate"]) == [explorer.top_plate(f) for f in table["feature"]]
    assert list(table["plates"]) == list(expected.loc[table["feature"], "n_plates"])
    feature, z = _planted(explorer, "drug2")
    text = table.set_index("feature").loc[feature, "top values (z)"]
    assert text.startswith(f"drug2 ({z:.1f})")
    assert re.fullmatch(r"(\S+ \(-?\d+\.\d\)(, )?)*", text)


def test_the_perturbations_panel_selects_features_everywhere(open_screen, qtbot):
    from plate_concepts.analysis.confounds import confound_scores

    _viewer, state, panel, perturbations, explorer = open_screen(perturbations=True)
    with qtbot.waitSignal(perturbations.profile_shown, timeout=20_000):
        perturbations.choose("treatment", "drug2")
    feature, z = _planted(explorer, "drug2")
    shown = perturbations.model.table
    assert int(perturbations.proxy.index(0, 0).data()) == feature  # best z first
    assert shown.set_index("feature").loc[feature, "z"] == pytest.approx(z)
    assert "1 well" in perturbations.summary.text() and "drug2" in perturbations.summary.text()
    selectivity = explorer.activation_pass.selectivity("treatment")
    expected = selectivity.maximum[list(selectivity.values).index("drug2")]
    np.testing.assert_allclose(shown["max selectivity"], expected[shown["feature"].to_numpy()], atol=1e-6)
    best = int(np.argmax(expected))
    assert f"most selective: feature {best} (max selectivity {expected[best]:.3f})" in perturbations.summary.text()
    flags = confound_scores(explorer.activation_pass, ["treatment"], "batch").flags
    for row in shown.itertuples():
        flag = flags.get(int(row.feature))
        assert row.confound == ("" if flag is None else f"{flag.by} {flag.score:.2f}")
    assert perturbations.row_labels[0].text().startswith(f"feature {feature}, z {z:.1f}")
    assert any(not button.isHidden() for button in perturbations.crop_buttons[0])

    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        assert perturbations.select_row(0) == feature  # a click on the first row
    assert state.feature == feature
    current = panel.proxy.mapToSource(panel.table.currentIndex()).row()
    assert panel.model.feature_at(current) == feature
    qtbot.waitUntil(lambda: not panel.is_busy and not perturbations.is_busy, timeout=20_000)


def test_names_tags_and_notes_round_trip_through_the_panel(open_screen, screen, qtbot, tmp_path):
    from plate_concepts.analysis.feature_notes import FeatureNotes

    dictionary = screen.estimator.save(tmp_path / "named.safetensors")
    viewer, _state, panel, perturbations, explorer = open_screen(dictionary, perturbations=True)
    feature = _planted(explorer, "drug")[0]
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(feature)
    panel.notes.name.setText("bright cell 1")
    panel.notes.tags.setText("drug, cell body")
    panel.notes.note.setText("checked by eye")
    panel.notes.save_button.click()

    saved = FeatureNotes.load(dictionary).get(feature)
    assert (saved.name, saved.tags, saved.note) == ("bright cell 1", ["drug", "cell body"], "checked by eye")
    assert panel.model.table.set_index("feature").loc[feature, "name"] == "bright cell 1"
    assert _feature_layers(viewer)["feature-heatmap"].name == f"feature {feature} (bright cell 1): mean activation per well"
    panel.search.setText("cell body")  # a tag
    assert [int(panel.proxy.index(r, 0).data()) for r in range(panel.proxy.rowCount())] == [feature]
    panel.search.clear()
    with qtbot.waitSignal(perturbations.profile_shown, timeout=20_000):
        perturbations.choose("treatment", "drug")
    assert perturbations.model.table.set_index("feature").loc[feature, "name"] == "bright cell 1"

    # Typing for another feature and selecting a third saves it too; a new viewer reads both.
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(0 if feature else 1)
    panel.notes.name.setText("second")
    with qtbot.waitSignal(panel.feature_shown, timeout=20_000):
        panel.select_feature(feature)
    assert panel.notes.name.text() == "bright cell 1"
    assert FeatureNotes.load(dictionary).name(0 if feature else 1) == "second"
    qtbot.waitUntil(lambda: not panel.is_busy and not perturbations.is_busy, timeout=20_000)


def test_export_report_writes_the_report_and_can_be_cancelled(open_screen, screen, qtbot, tmp_path):
    from plate_concepts.analysis.report import is_report

    dictionary = screen.estimator.save(tmp_path / "dict.safetensors")
    _viewer, _state, panel, _, _explorer = open_screen(dictionary)
    out = tmp_path / "report.html"
    job = panel.report.export(out)
    job.cancel()  # at its first section: nothing is written
    qtbot.waitUntil(lambda: not panel.report.is_busy, timeout=60_000)
    assert not out.exists() and "cancelled" in panel.report.message.text()

    panel.report.export(out)
    qtbot.waitUntil(lambda: not panel.report.is_busy, timeout=120_000)
    assert is_report(out) and "Wrote" in panel.report.message.text()
    text = out.read_text()
    assert not re.findall(r"https?://", text)  # self-contained: nothing fetched
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', text))
    assert "drug2" in text and "<h2>Confounds</h2>" in text
    assert "Top crops of feature" in text and "No crop images" not in text.split("Top crops")[1][:400]
    written = out.stat().st_mtime_ns
    panel.report.export(out)  # replaced only when asked (the file dialog asks): kept here
    qtbot.waitUntil(lambda: not panel.report.is_busy, timeout=60_000)
    assert "Could not write the report" in panel.report.message.text() and out.stat().st_mtime_ns == written


def test_an_activation_pass_opens_in_the_viewer_and_in_view(make_napari_viewer, screen, qtbot, tmp_path):
    from plate_concepts.analysis.activation_pass import plan_pass, run_pass
    from plate_concepts.cli import main
    from plate_concepts.viewer._explorer_jobs import explorer_preparer
    from plate_concepts.viewer.features_panel import FeaturesPanel
    from plate_concepts.viewer.state import get_state

    folder = tmp_path / "pass"
    run_pass(plan_pass(screen.store, screen.dictionary, folder), workers=0)
    viewer = make_napari_viewer()
    panel = FeaturesPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Features")
    state = get_state(viewer)
    viewer.open(str(folder), plugin="napari-plate-concepts")  # = drag and drop
    preparer = explorer_preparer(viewer)
    qtbot.waitUntil(lambda: state.explorer is not None and state.profiles is not None and not preparer.is_busy,
                    timeout=30_000)  # fmt: skip
    explorer = state.explorer
    assert explorer.activation_pass.folder == folder and state.dictionary_path == Path(screen.dictionary)
    assert explorer.plate_name == "P1" and state.plate.name == "P1" and explorer.plate is state.plate
    assert panel.model.rowCount() == explorer.n_features and panel.plates.plates() == list(PLATES)

    shot = tmp_path / "view.png"
    assert main(["view", str(folder), "--screenshot", str(shot), "--quiet"]) == 0
    assert shot.is_file()
    assert main(["view", str(screen.dictionary), "--codes", str(folder), "--screenshot", str(shot), "--quiet"]) == 0
    other = screen.estimator.save(tmp_path / "other.safetensors")
    assert main(["view", str(other), "--codes", str(folder), "--store", str(screen.store.path),
                 "--screenshot", str(shot)]) == 2  # fmt: skip


def test_the_perturbations_status_says_why_there_are_no_profiles(screen):
    from plate_concepts.analysis.activation_pass import plan_pass, run_pass
    from plate_concepts.viewer._screen_profiles import describe_profiles, screen_profiles

    no_labels = screen_profiles(run_pass(plan_pass(screen.store, screen.dictionary, None, labels=[])))
    assert describe_profiles(no_labels, 3).startswith("No perturbation profiles: the store has no label column")
    no_controls = screen_profiles(run_pass(plan_pass(screen.store, screen.dictionary, None, labels=["treatment", "batch"],
                                                     control_column=None)))
    assert not no_controls.profiles and set(no_controls.problems) == {"treatment", "batch"}
    problem = no_controls.problems["treatment"]
    text = describe_profiles(no_controls, 3)
    assert text.startswith("No perturbation profiles;") and text.count(problem) == 1  # said once, for both
    assert f"treatment, batch: {problem}" in text


def test_a_screen_without_control_column_lists_its_plates(screen, qtbot, tmp_path):
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.viewer._plate_chooser import PlateChooser

    store = EmbeddingStore.create(tmp_path / "no-controls.store", dim=FEATURE_DIM)
    store.append(screen.store.read(), screen.store.read_obs().drop(columns="is_control"))
    chooser = PlateChooser()
    qtbot.addWidget(chooser)
    chooser.set_plates(FeatureExplorer(store, screen.estimator).plate_table(), "P1")  # raised a TypeError
    assert chooser.plates() == list(PLATES) and chooser.current == "P1"
    assert [chooser.model.item(row, 3).text() for row in range(3)] == ["—"] * 3


def test_report_counts_the_crops_of_a_plate_whose_images_are_gone(screen):
    from plate_concepts.analysis import report
    from plate_concepts.analysis.activation_pass import plan_pass, run_pass

    activation_pass = run_pass(plan_pass(screen.store, screen.dictionary, None))
    plate_of = screen.store.read_obs(None, ["plate"])["plate"].to_numpy()
    n = 24
    mixed = [f for f in range(activation_pass.n_features)
             if len({plate_of[row] for row, _ in activation_pass.top_tokens(f, n)} & {"P3"}) == 1
             and len({plate_of[row] for row, _ in activation_pass.top_tokens(f, n)}) > 1]  # fmt: skip
    feature = mixed[0]
    gone = sum(plate_of[row] == "P3" for row, _ in activation_pass.top_tokens(feature, n))
    context = report._Context(activation_pass, None, screen.store, None, report.ReportSettings(crops_per_feature=n))
    text = html.unescape(report._crops(context, feature, "treatment", "here"))
    assert 'alt="top crops of feature' in text  # the crops of P1 and P2
    assert f"{gone} of its {n} top crops are not shown: the images of plate 'P3' were not found" in text


def test_names_that_look_like_html_are_shown_as_typed(open_screen, screen, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    from plate_concepts.analysis.feature_notes import FeatureNotes

    dictionary = screen.estimator.save(tmp_path / "named.safetensors")
    _viewer, state, features, perturbations, explorer = open_screen(dictionary, perturbations=True)
    feature = _planted(explorer, "drug")[0]
    notes = FeatureNotes.load(dictionary)
    notes.set(feature, name="<img src=x> & co")
    notes.save()
    state.dictionary_saved(dictionary)  # the names are read again
    with qtbot.waitSignal(perturbations.profile_shown, timeout=20_000):
        perturbations.choose("treatment", "drug")
    label = perturbations.row_labels[0]
    assert label.text().startswith(f"feature {feature}: <img src=x> & co")
    for shown in (label, perturbations.summary, perturbations.status):
        assert shown.textFormat() == Qt.TextFormat.PlainText  # not an image and "&"
    assert "&lt;img src=x&gt; &amp; co" in perturbations.crop_buttons[0][0].toolTip()
    # The Features panel's title and status name the feature as typed too.
    with qtbot.waitSignal(features.feature_shown, timeout=20_000):
        perturbations.select_row(0)
    assert "<img src=x> & co" in features.title.text()
    assert features.title.textFormat() == features.status.textFormat() == Qt.TextFormat.PlainText
    qtbot.waitUntil(lambda: not perturbations.is_busy, timeout=20_000)
