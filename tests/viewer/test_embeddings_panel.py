"""The Embeddings panel: computing a store in a background job (progress, cancel, resume),
opening one, token counts; and its Qt-free helpers."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.viewer._embedding_views import (
    available_devices,
    embedder_spec,
    obs_label_columns,
    tokens_per_label,
    tokens_per_well,
)

CROPS_PER_FIELD = 2 * 3  # 64 x 96 px fields, 32 px crops
N_FIELDS = 3 * 2


GATED_MODULE = '''
import threading
import torch

GATE = threading.Event()
CALLS = []


class Gated(torch.nn.Module):
    """Pools like TinyEmbedder; from its third call on, waits for GATE (the test's hand brake)."""

    def forward(self, crops):
        CALLS.append(len(crops))
        if len(CALLS) > 2:
            GATE.wait(30)
        pooled = torch.nn.functional.avg_pool2d(crops, 16)
        return torch.cat([pooled, pooled * pooled, pooled.sqrt()], dim=1).permute(0, 2, 3, 1)


def build():
    return Gated()
'''


# ---------------------------------------------------------------------- without a viewer
def test_token_counts_per_well_and_label():
    obs = pd.DataFrame({
        "plate": "p", "well": ["C02", "B02", "B02", "C02", "B03"], "field": 0,
        "crop_y": [0, 0, 32, 32, 0], "crop_x": 0, "crop_size": 32,
        "treatment": ["DMSO", "DMSO", "DMSO", "DMSO", "drug"], "dose": [0.0, 0.0, 0.0, 0.0, 1.5],
        "foreground_fraction": [0.1, 0.2, 0.3, 0.4, 0.5],
    })  # fmt: skip
    assert obs_label_columns(obs) == ["treatment", "dose"]
    per_well = tokens_per_well(obs)
    assert per_well.to_dict("list") == {
        "well": ["B02", "B03", "C02"], "treatment": ["DMSO", "drug", "DMSO"], "dose": ["0", "1.5", "0"], "tokens": [2, 1, 2],
    }  # fmt: skip
    per_label = tokens_per_label(obs, "treatment")
    assert per_label.to_dict("list") == {
        "treatment": ["DMSO", "drug"],
        "tokens": [4, 1],
        "wells": [2, 1],
    }
    with pytest.raises(ValueError, match="no column 'genotype'"):
        tokens_per_label(obs, "genotype")


def test_devices_and_embedder_specs(tmp_path):
    devices = available_devices()
    assert devices[0] == "cpu" and ("cuda" in devices) == torch.cuda.is_available()
    assert embedder_spec("EfficientNet-Lite0 (built in)") == "efficientnet-lite0"
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    assert embedder_spec("TorchScript file", model) == f"torchscript:{model}"
    assert (
        embedder_spec("Python module:callable", module=" pkg.mod:build ") == "module:pkg.mod:build"
    )
    with pytest.raises(ValueError, match="TorchScript model file"):
        embedder_spec("TorchScript file", tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="package.module:callable"):
        embedder_spec("Python module:callable", module="pkg.mod")


# ---------------------------------------------------------------------- in napari
@pytest.fixture
def panel_with_plate(make_napari_viewer, tiny_zarr):
    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.embeddings_panel import EmbeddingsPanel

    viewer = make_napari_viewer()
    panel = EmbeddingsPanel(viewer)
    viewer.window.add_dock_widget(panel)
    show_plate(viewer, open_plate(tiny_zarr))
    panel.crop_size.value = 32
    panel.batch_size.value = 2
    panel.device.value = "cpu"
    return viewer, panel


def wait_for(panel, job, qtbot):
    """Wait until the job has ended: the Compute button comes back then."""
    assert job is not None, panel.message.value
    qtbot.waitUntil(lambda: panel.compute_button.enabled, timeout=60_000)


@pytest.mark.gui
def test_compute_with_a_torchscript_model_fills_the_store_and_counts(
    panel_with_plate, qtbot, tmp_path, tiny_embedder
):
    from plate_concepts.viewer.state import get_state

    viewer, panel = panel_with_plate
    assert panel.plate_label.value.startswith("tiny: 3 wells")
    # (isHidden: hidden on purpose, whether or not the window is on screen)
    assert panel.model_file.native.isHidden() and panel.module.native.isHidden()
    panel.embedder.value = "TorchScript file"
    assert not panel.model_file.native.isHidden() and panel.module.native.isHidden()
    panel.model_file.value = tiny_embedder
    panel.control_column.value = "treatment"
    assert panel.control_column.choices == ("(no controls)", "treatment", "dose", "batch")
    assert panel.control_values.choices == ("DMSO", "drug")
    panel.control_values.value = ["DMSO"]
    panel.patch_tokens.value = True
    panel.store_path.value = tmp_path / "tiny.store"
    job = panel.compute()
    wait_for(panel, job, qtbot)

    total = N_FIELDS * CROPS_PER_FIELD
    store = get_state(viewer).store
    assert (
        store is not None and len(store) == total and store.patch_grid == (2, 2) and store.dim == 6
    )
    assert panel.progress.value == total and panel.progress.label == f"{total} / {total} crops"
    assert store.provenance["plates"]["tiny"]["complete"] is True
    obs = store.obs
    assert (
        obs.loc[obs["well"] == "B03", "is_control"].eq(False).all()
        and obs["is_control"].sum() == 2 * 2 * 6
    )
    assert panel.per_well.to_dataframe().to_dict("list") == {
        "well": ["B02", "B03", "C02"], "treatment": ["DMSO", "drug", "DMSO"], "dose": ["0", "1.5", "0"],
        "batch": ["b1", "b1", "b2"], "is_control": ["True", "False", "True"], "tokens": [12, 12, 12],
    }  # fmt: skip
    assert panel.count_by.value == "treatment"  # the control column
    assert panel.per_label.to_dataframe().to_dict("list") == {
        "treatment": ["DMSO", "drug"],
        "tokens": [24, 12],
        "wells": [2, 1],
    }
    panel.count_by.value = "batch"
    assert panel.per_label.to_dataframe()["tokens"].tolist() == [24, 12]
    from plate_concepts.viewer._table_tooltips import elided_text

    table = panel.per_well.native  # a column too narrow for its text: a tooltip shows it all
    table.setColumnWidth(1, 8)
    assert elided_text(table, table.model().index(1, 1)) == "drug"
    table.setColumnWidth(1, 200)
    assert elided_text(table, table.model().index(1, 1)) is None
    assert f"{total} tokens of dimension 6" in panel.store_info.value

    # Opening the store from the panel gives the same counts.
    get_state(viewer).store = None
    opened = panel.open_store(tmp_path / "tiny.store")
    assert opened is not None and len(get_state(viewer).store) == total


@pytest.mark.gui
def test_cancel_keeps_a_consistent_store_that_resumes(
    panel_with_plate, qtbot, tmp_path, monkeypatch
):
    from plate_concepts.viewer.state import get_state

    viewer, panel = panel_with_plate
    (tmp_path / "gated_embedder.py").write_text(GATED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gated_embedder", raising=False)
    panel.embedder.value = "Python module:callable"
    panel.module.value = "gated_embedder:build"
    panel.store_path.value = tmp_path / "gated.store"
    job = panel.compute()
    assert panel.cancel_button.enabled and not panel.compute_button.enabled
    qtbot.waitUntil(
        lambda: "gated_embedder" in sys.modules and len(sys.modules["gated_embedder"].CALLS) > 2,
        timeout=30_000,
    )
    gated = sys.modules["gated_embedder"]
    panel.cancel_button.clicked.emit()  # the user presses Cancel while a batch is running
    gated.GATE.set()
    wait_for(panel, job, qtbot)
    assert "cancelled" in panel.message.value and panel.compute_button.enabled

    total = N_FIELDS * CROPS_PER_FIELD
    reopened = EmbeddingStore.open(tmp_path / "gated.store")
    assert 0 < len(reopened) < total and len(reopened.obs) == len(reopened)
    assert reopened.read().shape == (len(reopened), 6)
    assert reopened.provenance["plates"]["tiny"]["complete"] is False
    assert len(get_state(viewer).store) == len(reopened)

    job = panel.compute()  # same settings: resumes where it stopped
    wait_for(panel, job, qtbot)
    finished = EmbeddingStore.open(tmp_path / "gated.store")
    assert (
        len(finished) == total
        and not finished.obs.duplicated(["well", "field", "crop_y", "crop_x"]).any()
    )
    assert finished.provenance["plates"]["tiny"]["complete"] is True


@pytest.mark.gui
def test_errors_are_reported_and_leave_the_panel_usable(panel_with_plate, qtbot, tmp_path):
    _, panel = panel_with_plate
    panel.embedder.value = "Python module:callable"
    panel.module.value = "no_such_package_here:build"
    panel.store_path.value = tmp_path / "never.store"
    wait_for(panel, panel.compute(), qtbot)
    assert (
        "embedding failed" in panel.message.value and "no_such_package_here" in panel.message.value
    )
    assert panel.compute_button.enabled and not (tmp_path / "never.store").exists()

    panel.control_column.value = "treatment"  # a control column without values
    panel.module.value = "x:y"
    assert (
        panel.compute() is None
        and "choose the control value(s) of 'treatment'" in panel.message.value
    )
