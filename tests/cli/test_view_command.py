"""``plate-concepts view``: a plate, an embedding store or a dictionary, with the plugin's
panels docked; ``--screenshot`` works without a display."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plate_concepts.cli import main

PANELS = "napari-plate-concepts"


@pytest.fixture
def fitted(tiny_store, tmp_path):
    """(plate path, store, dictionary path) of the tiny plate."""
    from plate_concepts.dictionary.estimators import ICFL

    plate_path, store = tiny_store
    torch.manual_seed(0)
    dictionary = ICFL(n_features=8, n_rounds=1, per_round=2, steps=10, batch_size=16, device="cpu")
    path = dictionary.fit(store).save(tmp_path / "tiny.safetensors")
    return plate_path, store, Path(path)


def docked(viewer) -> list[str]:
    return sorted(name.split(" (")[0] for name in viewer.window.dock_widgets)


@pytest.mark.gui
def test_show_results_docks_the_panels_and_selects_the_best_feature(make_napari_viewer, qtbot, fitted):
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.app import show_results
    from plate_concepts.viewer.state import get_state

    plate_path, store, dictionary = fitted
    plate = open_plate(plate_path)
    viewer = make_napari_viewer()
    assert show_results(viewer, plate, store=store) is None
    assert docked(viewer) == ["Embeddings", "Plate"]
    assert any(layer.metadata.get("plate_concepts", {}).get("role") == "crop-points" for layer in viewer.layers)
    assert get_state(viewer).store is store

    explorer = FeatureExplorer(store, dictionary, plate=plate).prepare()
    viewer = make_napari_viewer(show=True)
    feature = show_results(viewer, plate, explorer=explorer)
    table = explorer.feature_table()
    live = table[~table["dead"]]
    assert table.loc[feature, "max_selectivity"] == live["max_selectivity"].max()
    assert docked(viewer) == ["Dictionary", "Embeddings", "Features", "Perturbations", "Plate"]
    state = get_state(viewer)
    assert state.explorer is explorer and state.feature == feature
    qtbot.waitUntil(  # the Features panel draws the feature's layers
        lambda: any(layer.name.startswith(f"feature {feature}") for layer in viewer.layers),
        timeout=20000,
    )
    # The Features tab is the one shown (not the last docked), and the tall panels scroll
    # inside a laptop-sized window rather than making it taller than the screen.
    from qtpy.QtWidgets import QTabBar

    tabs = [bar for bar in viewer.window._qt_window.findChildren(QTabBar) if bar.count() >= 4]
    assert [bar.tabText(bar.currentIndex()).split(" (")[0] for bar in tabs] == ["Features"]
    viewer.window.resize(1200, 720)
    qtbot.waitUntil(lambda: viewer.window._qt_window.height() <= 720, timeout=5000)


def test_view_says_what_to_pass_when_the_store_or_plate_is_gone(fitted, tmp_path, capsys):
    import shutil

    plate_path, store, dictionary = fitted
    moved = shutil.move(plate_path, tmp_path / "elsewhere.zarr")
    assert main(["view", str(store.path), "--screenshot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "the plate that embedding store" in err and "cannot be opened" in err
    assert err.rstrip().endswith("pass --plate")
    shutil.move(moved, plate_path)
    shutil.move(store.path, tmp_path / "moved.store")
    assert main(["view", str(dictionary), "--screenshot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plate-concepts view: error: the embedding store") and "pass --store" in err


def test_view_a_dictionary_without_a_display(fitted, tmp_path):
    """The real command in a process with no $DISPLAY: it runs itself under xvfb-run."""
    if not Path("/usr/bin/xvfb-run").exists() and not any(
        Path(p, "xvfb-run").exists() for p in os.environ.get("PATH", "").split(os.pathsep)
    ):
        pytest.skip("xvfb-run is not installed")
    _, _, dictionary = fitted
    shot = tmp_path / "view.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-m", "plate_concepts.cli", "view", str(dictionary), "--screenshot",
         str(shot), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "showing feature" in result.stdout and shot.is_file()
    from skimage.io import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 600 and pixels[..., :3].std() > 10  # a drawn window, not blank
    assert np.unique(pixels[..., :3].reshape(-1, 3), axis=0).shape[0] > 50


@pytest.mark.gui
def test_the_demo_run_shows_the_feature_of_its_concept(make_napari_viewer, qtbot, fitted):
    from types import SimpleNamespace

    import pandas as pd

    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.demo_view import show_demo_run
    from plate_concepts.viewer.state import get_state

    plate_path, store, dictionary = fitted
    explorer = FeatureExplorer(store, dictionary, plate=open_plate(plate_path)).prepare()
    run = SimpleNamespace(explorer=explorer, report=pd.DataFrame({"concept": ["drug"], "feature": [3]}))
    viewer = make_napari_viewer()
    with pytest.raises(ValueError, match="no planted concept 'DMSO'"):
        show_demo_run(viewer, run, concept="DMSO")
    assert show_demo_run(viewer, run, concept="drug") == 3
    assert get_state(viewer).feature == 3 and "Features" in docked(viewer)
    qtbot.waitUntil(  # the Features panel has drawn the feature (before the viewer closes)
        lambda: any(layer.name.startswith("feature 3") for layer in viewer.layers), timeout=20000
    )
