"""The Dictionary panel: choices from the store, fitting through iter_train in a worker,
cancelling, saving and loading, and handing a prepared explorer to the state."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_feature_layers import make_plate, make_store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    plate = make_plate()
    return plate, make_store(tmp_path_factory.mktemp("store") / "tiny.store", plate)


def _settings(**changes):
    from plate_concepts.viewer._dictionary_fit import FitSettings

    values = {
        "control_column": "treatment",
        "control_values": ["DMSO"],
        "n_features": 16,
        "n_rounds": 2,
        "per_round": 2,
        "steps": 20,
        "batch_size": 64,
        "device": "cpu",
        "log_every": 5,
    }
    return FitSettings(**{**values, **changes})


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
    with pytest.raises(ValueError, match="method must be one of"):
        _settings(method="pca")


def test_fit_steps_yields_progress_and_returns_a_usable_estimator(tiny, tmp_path):
    from plate_concepts.dictionary.estimators import ICFL, TopKSAE
    from plate_concepts.viewer._dictionary_fit import fit_steps

    plate, store = tiny
    generator = fit_steps(store, _settings(whiten="pca-batch", batch_column="batch"), plate=plate)
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            estimator = stop.value
            break
    assert [e.step for e in events] == [5, 10, 15, 20]
    assert (
        isinstance(estimator, ICFL)
        and estimator.n_features == 16
        and estimator.whiten == "pca-batch"
    )
    assert estimator.training_["steps"] == 20 and estimator.training_["control"] == "treatment=DMSO"
    assert estimator.training_["batch_column"] == "batch"
    codes = estimator.transform(store.read(slice(0, 8)), batches=["b1"] * 8)
    assert codes.n_features == 16 and len(codes) == 8

    cancel = threading.Event()
    cancel.set()  # cancelled before the first step: still a (barely trained) dictionary
    topk = fit_steps(
        store,
        _settings(method="topk", k=4, checkpoint_path=tmp_path / "c.safetensors"),
        cancel=cancel,
    )
    with pytest.raises(StopIteration) as stop:
        while True:
            next(topk)
    assert isinstance(stop.value.value, TopKSAE)
    assert stop.value.value.training_["cancelled"] and stop.value.value.training_["steps"] == 0
    assert (tmp_path / "c.safetensors").is_file()


def test_fit_steps_names_a_missing_control_value(tiny):
    from plate_concepts.viewer._dictionary_fit import fit_steps

    _plate, store = tiny
    with pytest.raises(ValueError, match="no row has treatment in"):
        next(fit_steps(store, _settings(control_values=["water"])))


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
    panel.n_features.setValue(16)
    panel.n_rounds.setValue(2)
    panel.per_round.setValue(2)
    panel.batch_size.setValue(64)
    panel.device.setCurrentText("cpu")
    return viewer, state, panel


@pytest.mark.gui
def test_fit_through_the_panel_then_the_explorer_is_prepared(make_napari_viewer, qtbot, tiny):
    from plate_concepts.dictionary.estimators import ICFL

    plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store, plate)
    assert "192 tokens" in panel.store_label.text()
    panel.steps.setValue(20)
    panel.whitening.setCurrentText(
        "PCA, then per batch"
    )  # the explorer must get the batch column too
    worker = panel.start_fit()
    assert (
        worker is not None and not panel.fit_button.isEnabled() and panel.cancel_button.isEnabled()
    )
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    assert isinstance(state.dictionary, ICFL) and state.dictionary.n_features == 16
    assert (
        state.dictionary.whiten == "pca-batch"
        and state.dictionary.training_["batch_column"] == "batch"
    )
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
def test_cancel_keeps_a_usable_dictionary_and_a_checkpoint(make_napari_viewer, qtbot, tiny):
    from plate_concepts.viewer._dictionary_fit import default_checkpoint_path

    _plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store)
    panel.steps.setValue(1_000_000)
    checkpoint = default_checkpoint_path(store, "icfl")
    checkpoint.unlink(missing_ok=True)
    worker = panel.start_fit()
    qtbot.waitUntil(lambda: len(panel.loss_curve.values) >= 2, timeout=30_000)
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        panel.cancel()
    training = state.dictionary.training_
    assert training["cancelled"] and 0 < training["steps"] < 1_000_000
    assert checkpoint.is_file()
    assert state.dictionary.transform(store.read(slice(0, 4))).n_features == 16  # usable
    assert panel.fit_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert "(cancelled)" in panel.dictionary_label.text()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)


@pytest.mark.gui
def test_save_and_load_round_trip(make_napari_viewer, qtbot, tiny, tmp_path):
    from test_feature_layers import make_dictionary

    _plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store)
    assert not panel.save_button.isEnabled()
    fitted = make_dictionary(store)
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
    from test_feature_layers import make_dictionary

    _plate, store = tiny
    _viewer, state, panel = _panel(make_napari_viewer, store)
    state.set_dictionary(make_dictionary(store))  # the explorer job starts
    assert panel.is_busy and "Encoding" in panel.explorer_label.text()
    panel.cancel()
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
    text = panel.explorer_label.text()
    if state.explorer is None:  # stopped while encoding
        assert text == "Feature preparation cancelled."
    else:  # the features were handed over, reading ahead stopped
        assert text.startswith("Reading ahead cancelled: the features can be browsed")
    # A new dictionary starts a new job, which runs to the end.
    state.set_dictionary(make_dictionary(store))
    qtbot.waitUntil(lambda: not panel.is_busy, timeout=30_000)
    assert state.explorer is not None and "in memory" in panel.explorer_label.text()


@pytest.mark.gui
def test_bad_settings_start_nothing_and_the_panel_renders(make_napari_viewer, qtbot, tiny):
    _plate, store = tiny
    _viewer, _state, panel = _panel(make_napari_viewer, store)
    panel.learning_rate.setText("fast")
    assert panel.start_fit() is None and panel.fit_button.isEnabled()
    panel.learning_rate.setText("")
    panel.whitening.setCurrentText("PCA, then per batch")
    assert panel.batch_column.isEnabled() and panel.batch_column.currentText() == "batch"
    assert panel.settings().whiten == "pca-batch" and panel.settings().batch_column == "batch"
    panel.method.setCurrentText("TopK SAE")
    assert panel.sparsity.currentIndex() == 1 and panel.settings().method == "topk"
    panel.show()
    qtbot.wait(50)
    shot = panel.grab().toImage()
    assert shot.width() > 100 and shot.height() > 300
    colours = {
        shot.pixel(x, y) for x in range(0, shot.width(), 7) for y in range(0, shot.height(), 7)
    }
    assert len(colours) > 10  # text, boxes and buttons are drawn
