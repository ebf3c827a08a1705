"""The Dictionary panel: choices from the store, fitting through iter_train in a worker,
cancelling, saving and loading, and handing a prepared explorer to the state."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import make_feature_dictionary, make_feature_plate, make_feature_store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    plate = make_feature_plate()
    return plate, make_feature_store(tmp_path_factory.mktemp("store") / "tiny.store", plate)


@pytest.fixture(scope="module")
def numeric_batches(tiny, tmp_path_factory):
    """The tiny store with its batch column as numbers (1.0 in row A, 2.0 in row B), as a
    table read from a spreadsheet often has it."""
    from plate_concepts.embeddings.store import EmbeddingStore

    _plate, store = tiny
    obs = store.obs.assign(batch=np.where(store.obs["batch"] == "b1", 1.0, 2.0))
    copy = EmbeddingStore.create(tmp_path_factory.mktemp("numeric") / "numeric.store", dim=store.dim,
                                 patch_grid=store.patch_grid)
    copy.append(store.read(), obs.reset_index(drop=True), patch_tokens=store.read_patches())
    return copy


def _settings(method: str = "icfl", control_values=("DMSO",), batch_column=None, **changes):
    from plate_concepts.dictionary import ICFLSettings, TopKSettings
    from plate_concepts.viewer._dictionary_fit import PanelFit

    values = {"n_features": 16, "steps": 20, "batch_size": 64, "device": "cpu", "log_every": 5, **changes}
    if method == "icfl":
        settings = ICFLSettings(n_rounds=2, per_round=2, **values)
    else:
        settings = TopKSettings(**values)
    return PanelFit(settings, control_column="treatment", control_values=list(control_values),
                    batch_column=batch_column)


def _run(generator):
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            return events, stop.value


# ---------------------------------------------------------------------- Qt-free logic
def test_label_choices_join_the_plate_map(tiny):
    from plate_concepts.viewer._dictionary_fit import label_choices, token_labels

    plate, store = tiny
    plate.platemap["compound_id"] = [
        f"cpd{i}" for i in range(len(plate.platemap))
    ]  # only in the plate map
    try:
        labels = token_labels(store, plate)
    finally:
        del plate.platemap["compound_id"]
    assert len(labels) == len(store)
    first_b02 = int(np.flatnonzero(labels["well"] == "B02")[0])
    assert labels["compound_id"].iloc[first_b02] == "cpd4"
    choices = label_choices(labels)
    assert next(iter(choices)) == "is_control"  # offered first
    assert choices["treatment"] == ["DMSO", "drug"] and choices["is_control"] == ["False", "True"]
    assert "crop_y" not in choices and "field" not in choices  # positions are not labels


def test_settings_reject_bad_choices():
    with pytest.raises(ValueError, match="at least one control value"):
        _settings(control_values=[])
    with pytest.raises(ValueError, match="needs a batch column"):
        _settings(whiten="pca-batch")
    with pytest.raises(ValueError, match="whiten must be one of"):
        _settings(whiten="zca")


def test_fit_steps_yields_progress_and_returns_a_usable_estimator(tiny):
    from plate_concepts.dictionary.checkpoints import default_checkpoint_path
    from plate_concepts.dictionary.estimators import ICFL, TopKSAE
    from plate_concepts.viewer._dictionary_fit import fit_steps

    plate, store = tiny
    events, estimator = _run(fit_steps(store, _settings(whiten="pca-batch", batch_column="batch"), plate=plate))
    whitening, *steps = events  # first the whitening chosen (one line), then the steps
    assert whitening.text == estimator.whitening_.describe() and whitening.category is None
    assert [e.step for e in steps] == [5, 10, 15, 20]
    assert isinstance(estimator, ICFL) and estimator.model_.n_features == 16
    assert estimator.whitening_.method == "pca-batch" and estimator.training_["steps"] == 20
    assert estimator.provenance_["control"] == {"spec": "treatment=DMSO", "n_controls": 128, "batch_column": "batch"}
    codes = estimator.transform(store.read(slice(0, 8)), batches=["b1"] * 8)
    assert codes.n_features == 16 and len(codes) == 8
    checkpoint = default_checkpoint_path(store_path=store.path, method="topk")
    assert checkpoint.parent.name == "plate-concepts" and checkpoint.name == "tiny.store-topk.ckpt.safetensors"
    assert not default_checkpoint_path(store_path=store.path, method="icfl").exists()  # finished: removed

    cancel = threading.Event()
    polls = iter(range(1000))
    events, topk = _run(fit_steps(store, _settings("topk", k=4), cancel=lambda: next(polls) >= 3))
    assert isinstance(topk, TopKSAE) and topk.training_["cancelled"] and 0 < topk.training_["steps"] < 20
    assert checkpoint.is_file()  # a cancelled panel fit keeps its checkpoint, in the temp folder
    checkpoint.unlink()
    cancel.set()  # cancelled while the whitening is fitted: nothing trained, nothing written
    with pytest.raises(InterruptedError, match="nothing was trained"):
        _run(fit_steps(store, _settings("topk", k=4), cancel=cancel))
    assert not checkpoint.exists()


def test_fit_steps_names_a_missing_control_value(tiny):
    from plate_concepts.viewer._dictionary_fit import fit_steps

    _plate, store = tiny
    with pytest.raises(ValueError, match="no row has treatment in"):
        next(fit_steps(store, _settings(control_values=["water"])))


def test_a_numeric_batch_column_through_the_panel_path_opens_in_the_features_explorer(numeric_batches):
    """The panel fits with a per-batch whitening on a batch column of numbers (1.0, 2.0); the
    explorer then encodes the store and a field's patches with the batch names the fit recorded
    (this failed with "batch '1.0' has no control tokens": the panel stored '1', '2')."""
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.dictionary import recorded_batch_column
    from plate_concepts.viewer._dictionary_fit import fit_steps

    store = numeric_batches
    _events, estimator = _run(fit_steps(store, _settings(whiten="pca-batch", batch_column="batch")))
    assert estimator.whitening_.batch_names_ == ["1", "2"] and recorded_batch_column(estimator) == "batch"
    explorer = FeatureExplorer(store, estimator, batch_column=recorded_batch_column(estimator)).prepare()
    assert explorer.is_prepared
    text_batches = np.where(store.obs["batch"] == 1.0, "1", "2")
    np.testing.assert_array_equal(  # the raw 1.0 of the store reads as the fitted batch "1"
        explorer.plate_codes.dense().numpy(), estimator.transform(store.read(), text_batches).dense().numpy()
    )
    well = str(store.obs["well"].iloc[0])
    patches = explorer.fields._field_patches(well, 0)  # what a field's activation map reads
    assert np.isfinite(patches).all() and patches.shape[-1] == estimator.model_.dim


# ---------------------------------------------------------------------- the panel
def _panel(make_napari_viewer, store, plate=None):
    from plate_concepts.viewer.dictionary_panel import DictionaryPanel
    from plate_concepts.viewer.state import get_state

    viewer = make_napari_viewer()
    state = get_state(viewer)
    if plate is not None:
        from plate_concepts.viewer.app import show_plate

        show_plate(viewer, plate)
    state.set_store(store)
    panel = DictionaryPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Dictionary")
    panel.set_controls("treatment", ["DMSO"])
    panel.fields["n_features"].value = "16"
    panel.method_fields["icfl"]["n_rounds"].value = 2
    panel.method_fields["icfl"]["per_round"].value = 2
    panel.fields["batch_size"].value = "64"
    panel.fields["device"].value = "cpu"
    return viewer, state, panel


def _wait_for_fit(qtbot, panel, job) -> None:
    qtbot.waitUntil(lambda: not job.running and panel._fit_job is None, timeout=30_000)


@pytest.mark.gui
def test_the_panel_widgets_are_built_from_the_settings(make_napari_viewer, tiny):
    from plate_concepts.dictionary import ICFLSettings, TopKSettings

    _plate, store = tiny
    _viewer, _state, panel = _panel(make_napari_viewer, store)
    # Every widget shows its setting's default and documents it; advanced settings stay out.
    assert panel.fields["seed"].value == ICFLSettings.seed and panel.fields["lr"].value == ""
    assert "Adam learning rate" in panel.fields["lr"].tooltip and "(default: the method's" in panel.fields["lr"].tooltip
    assert panel.method_fields["topk"]["k"].value == TopKSettings.k
    assert "eps" not in panel.fields and "checkpoint_minutes" not in panel.fields
    panel.fields["steps"].value = ""
    panel.fields["n_features"].value = ""
    automatic = panel.settings().settings
    assert automatic.steps is None and automatic.n_features is None  # chosen from the store's size
    panel.fields["shrinkage"].value = "auto"
    panel.fields["lr"].value = "0.003"
    assert panel.settings().settings.shrinkage == "auto" and panel.settings().settings.lr == 0.003


@pytest.mark.gui
def test_fit_through_the_panel_then_the_explorer_is_prepared(make_napari_viewer, qtbot, tiny):
    from plate_concepts.dictionary.estimators import ICFL

    plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store, plate)
    assert "192 tokens" in panel.store_label.text()
    panel.fields["steps"].value = "20"
    panel.fields["whiten"].value = "pca-batch"  # the explorer must get the batch column too
    job = panel.start_fit()
    assert job is not None and not panel.fit_button.isEnabled() and panel.cancel_button.isEnabled()
    _wait_for_fit(qtbot, panel, job)
    assert isinstance(state.dictionary, ICFL) and state.dictionary.model_.n_features == 16
    assert state.dictionary.whitening_.method == "pca-batch"
    assert state.dictionary.provenance_["control"]["batch_column"] == "batch"
    assert state.dictionary.training_["steps"] == 20 and not state.dictionary.training_["cancelled"]
    assert panel.progress.value() == 20 and "step 20 / 20" in panel.progress_label.text()
    assert len(panel.loss_curve.values) >= 2 and all(np.isfinite(panel.loss_curve.values))
    assert "ICFL, 16 features" in panel.dictionary_label.text()
    qtbot.waitUntil(lambda: state.explorer is not None, timeout=30_000)
    assert state.explorer.estimator is state.dictionary and state.explorer.is_prepared
    assert state.explorer.batch_column == "batch"
    assert panel.fit_button.isEnabled() and panel.save_button.isEnabled()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=10_000)
    # Then the same worker read every field for instant browsing.
    assert "in memory" in panel.explorer_label.text() and "all" in panel.explorer_label.text()
    well = state.explorer.well_values(0).index[0]
    assert state.explorer.in_memory(
        well, label_name=plate.label_names[0] if plate.label_names else None
    )


@pytest.mark.gui
def test_a_numeric_batch_column_fitted_in_the_panel_opens_in_the_features_panel(
    make_napari_viewer, qtbot, numeric_batches
):
    _viewer, state, panel = _panel(make_napari_viewer, numeric_batches)
    panel.fields["steps"].value = "20"
    panel.fields["whiten"].value = "pca-batch"
    assert panel.batch_column.currentText() == "batch"
    _wait_for_fit(qtbot, panel, panel.start_fit())
    assert state.dictionary.whitening_.batch_names_ == ["1", "2"]
    qtbot.waitUntil(lambda: state.explorer is not None, timeout=30_000)  # failed: batch '1.0'
    assert state.explorer.is_prepared and state.explorer.batch_column == "batch"
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)


@pytest.mark.gui
def test_a_batch_column_spelled_as_in_the_imported_table_opens_in_the_features_explorer(
    make_napari_viewer, qtbot, numeric_batches
):
    """A dictionary whitened per batch of 'Metadata_batch' (what the store calls 'batch') is
    browsed (the explorer was refused: "which the store's tokens do not carry")."""
    from plate_concepts.dictionary import recorded_batch_column
    from plate_concepts.viewer._dictionary_fit import fit_steps

    fit = _settings(whiten="pca-batch", batch_column="Metadata_batch")
    _events, estimator = _run(fit_steps(numeric_batches, fit))
    assert recorded_batch_column(estimator) == "Metadata_batch"
    _viewer, state, panel = _panel(make_napari_viewer, numeric_batches)
    state.set_dictionary(estimator)
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
    assert state.explorer is not None, panel.explorer_label.text()
    assert state.explorer.batch_column == "batch"


@pytest.mark.gui
def test_cancel_keeps_a_usable_dictionary_and_a_checkpoint(make_napari_viewer, qtbot, tiny):
    _plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store)
    panel.fields["steps"].value = "1000000"
    checkpoint = panel.checkpoint_path()
    checkpoint.unlink(missing_ok=True)
    job = panel.start_fit()
    qtbot.waitUntil(lambda: len(panel.loss_curve.values) >= 2, timeout=30_000)
    panel.cancel()
    _wait_for_fit(qtbot, panel, job)
    training = state.dictionary.training_
    assert training["cancelled"] and 0 < training["steps"] < 1_000_000
    assert checkpoint.is_file()
    assert state.dictionary.transform(store.read(slice(0, 4))).n_features == 16  # usable
    assert panel.fit_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert "(cancelled)" in panel.dictionary_label.text()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
    checkpoint.unlink()


@pytest.mark.gui
def test_save_and_load_round_trip(make_napari_viewer, qtbot, tiny, tmp_path):
    _plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store)
    assert not panel.save_button.isEnabled()
    fitted = make_feature_dictionary(store)
    state.set_dictionary(fitted)
    written = panel.save(tmp_path / "my dictionary")
    assert written == tmp_path / "my dictionary.safetensors" and written.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [
        "my dictionary.safetensors"
    ]  # no temporary left
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)

    loaded = panel.load(written)
    assert state.dictionary is loaded and loaded is not fitted
    np.testing.assert_allclose(loaded.components_, fitted.components_)
    x = store.read(slice(0, 16))
    np.testing.assert_allclose(loaded.transform(x).dense(), fitted.transform(x).dense(), atol=1e-5)
    qtbot.waitUntil(
        lambda: state.explorer is not None and state.explorer.estimator is loaded, timeout=30_000
    )

    (tmp_path / "broken.safetensors").write_bytes(b"not a dictionary")
    assert panel.load(tmp_path / "broken.safetensors") is None  # an error notification, no crash
    assert state.dictionary is loaded
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=10_000)


@pytest.mark.gui
def test_cancel_stops_the_explorer_job_and_says_what_is_left(make_napari_viewer, qtbot, tiny):
    _plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store)
    state.set_dictionary(make_feature_dictionary(store))  # the explorer job starts
    assert panel.is_busy and "Encoding" in panel.explorer_label.text()
    panel.cancel()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
    text = panel.explorer_label.text()
    if state.explorer is None:  # stopped while encoding
        assert text == "Feature preparation cancelled."
    else:  # the features were handed over, reading ahead stopped
        assert text.startswith("Reading ahead cancelled: the features can be browsed")
    # A new dictionary starts a new job, which runs to the end.
    state.set_dictionary(make_feature_dictionary(store))
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
    assert state.explorer is not None and "in memory" in panel.explorer_label.text()


@pytest.mark.gui
def test_bad_settings_start_nothing_and_the_panel_renders(make_napari_viewer, qtbot, tiny):
    _plate, store = tiny
    _viewer, _state, panel = _panel(make_napari_viewer, store)
    panel.fields["lr"].value = "fast"
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        panel.settings()
    assert panel.start_fit() is None and panel.fit_button.isEnabled()
    panel.fields["lr"].value = ""
    panel.fields["whiten"].value = "pca-batch"
    assert panel.batch_column.isEnabled() and panel.batch_column.currentText() == "batch"
    assert panel.settings().settings.whiten == "pca-batch" and panel.settings().batch_column == "batch"
    panel.method.setCurrentText("TopK SAE")
    assert panel.settings().method == "topk" and panel.settings().settings.k == 32
    assert panel.method_fields["topk"]["k"].native.isVisibleTo(panel)
    assert not panel.method_fields["icfl"]["n_rounds"].native.isVisibleTo(panel)
    panel.show()
    qtbot.wait(50)
    shot = panel.grab().toImage()
    assert shot.width() > 100 and shot.height() > 300
    colours = {
        shot.pixel(x, y) for x in range(0, shot.width(), 7) for y in range(0, shot.height(), 7)
    }
    assert len(colours) > 10  # text, boxes and buttons are drawn


@pytest.mark.gui
def test_compare_runs_the_grid_shows_the_table_and_keeps_a_row(make_napari_viewer, qtbot, tiny):
    from plate_concepts.dictionary.estimators import TopKSAE

    plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store, plate)
    box = panel.compare_box
    assert box.chosen_labels() == ["treatment"]  # a likely label, ticked for the user
    assert "ICFL J = 2, L = 4" in box.sparsity.suffix()
    panel.fields["steps"].value = "20"
    box.sparsity.setValue(4)
    box.whitens["none"].setChecked(False)
    job = box.start()
    assert job is not None and not panel.fit_button.isEnabled() and panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: box.job is None, timeout=60_000)
    assert box.table.rowCount() == 2 and box.comparison is not None and not box.comparison.cancelled
    headers = [box.table.horizontalHeaderItem(c).text() for c in range(box.table.columnCount())]
    assert headers[:3] == ["method", "whiten", "sparsity"] and "treatment: mean best max" in headers
    assert box.table.item(1, 2).text() == "k = 4" and box.table.item(0, 2).text() == "J = 2, L = 2"
    assert panel.fit_button.isEnabled() and not box.keep_button.isEnabled()  # nothing selected yet
    box.table.selectRow(1)
    kept = box.keep_selected()
    assert isinstance(kept, TopKSAE) and state.dictionary is kept and kept.model_.hyperparameters()["k"] == 4
    assert "TopK SAE" in panel.dictionary_label.text()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
