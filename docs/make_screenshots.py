"""Screenshots of the plugin's panels for the documentation.

    python docs/make_screenshots.py [OUT_DIR [NAME ...]]   # default OUT_DIR: docs/images

One function per panel, each taking the output folder and returning the file it wrote; ``main``
runs them all (add yours to ``SCREENSHOTS``). Needs a display (or ``xvfb-run -a``). The NF1 images
come from the Schwann-cell Cell Painting data of Tomkinson, Mattson, Mattson-Hoss, Sarnoff, Bouley,
Walker and Way (CC BY 4.0); cite them wherever the screenshot is shown.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REAL_DATA = Path(
    os.environ.get(
        "PLATE_CONCEPTS_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
    )
)
NF1 = REAL_DATA / "nf1_plate2"
WINDOW_SIZE = (1600, 1000)


def _new_viewer() -> Any:
    import napari

    viewer = napari.Viewer(show=True)
    viewer.window.resize(*WINDOW_SIZE)
    return viewer


def _wait(done: Callable[[], bool], timeout_s: float = 120) -> None:
    """Let the Qt event loop run until ``done()`` (e.g. a panel's button is enabled again)."""
    from qtpy.QtWidgets import QApplication

    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"still waiting after {timeout_s} s")
        QApplication.processEvents()
        time.sleep(0.01)


def _settle(seconds: float = 1.0) -> None:
    """Process events for a while so that every layer is sliced and drawn."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def plate_panel(out_dir: Path) -> Path:
    """The Plate panel docked, with the NF1 plate (TIFF folder + its plate map) open, the wells
    filtered by genotype, and the cursor over a well (its labels in the overlay)."""
    from plate_concepts.viewer.app import describe_position, text_overlay
    from plate_concepts.viewer.plate_panel import PlatePanel
    from plate_concepts.viewer.state import get_state

    viewer = _new_viewer()
    panel = PlatePanel(viewer)
    viewer.window.add_dock_widget(panel, name="Plate", area="right")
    panel.path.value = NF1 / "images"  # the plate map next to it is found and filled in
    panel.open_plate()
    _wait(lambda: panel.open_button.enabled)
    panel.filter_column.value = "genotype"
    panel.filter_value.value = "Null"
    mosaic = get_state(viewer).mosaic
    oy, ox = mosaic.field_origin("D07", 0)
    viewer.cursor.position = (oy + 400, ox + 600)
    text_overlay(viewer).text = describe_position(viewer, viewer.cursor.position)
    viewer.reset_view()
    _settle()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "plate-panel.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    viewer.close()
    return path


# ---------------------------------------------------------------------- dictionary and features
#: A small demo plate for the dictionary and feature screenshots (24 wells: quick to make).
DEMO = {"n_wells": 24, "fields_per_well": 2, "field_size": 512, "seed": 0}
DEMO_CROP = 128  # 16 crops per field, 4 x 4 patch tokens each
DEMO_CONTROLS = ("perturbation", ["DMSO"])
DEMO_DICTIONARY = "dictionary-icfl-256.safetensors"


def _wait_until(condition: Callable[[], bool], timeout_s: float = 600, what: str = "") -> None:
    from qtpy.QtWidgets import QApplication

    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.02)


def demo_world() -> tuple[Any, Any, Path]:
    """(plate, embedding store, cache folder) of a small demo plate, made once and cached in the
    demo cache: EfficientNet-Lite0 embeddings (channel mean, d = 1280) of 128-px crops with
    patch tokens, controls = the DMSO wells."""
    from plate_concepts.demo import ZARR_NAME, cached_demo_plate
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates import open_plate

    folder = cached_demo_plate(**DEMO)
    plate = open_plate(folder / ZARR_NAME)
    store_path = folder / f"embeddings-efficientnet-mean-{DEMO_CROP}px.store"
    if EmbeddingStore.is_store(store_path) and len(EmbeddingStore.open(store_path)) > 0:
        return plate, EmbeddingStore.open(store_path), folder
    column, values = DEMO_CONTROLS
    store = embed_plate(
        plate,
        store_path,
        "efficientnet-lite0:mean",
        crop_size=DEMO_CROP,
        patch_tokens=True,
        control=f"{column}={','.join(values)}",
        overwrite=True,
    )
    return plate, store, folder


def _dictionary_panel_on_demo(viewer: Any) -> tuple[Any, Any, Path]:
    """The demo plate with its store, and a docked Dictionary panel set up for a small ICFL fit."""
    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.dictionary_panel import DictionaryPanel
    from plate_concepts.viewer.state import get_state

    plate, store, folder = demo_world()
    show_plate(viewer, plate)
    state = get_state(viewer)
    state.set_store(store)
    panel = DictionaryPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Dictionary", area="right")
    panel.set_controls(*DEMO_CONTROLS)
    panel.fields["n_features"].value = "256"
    panel.method_fields["icfl"]["n_rounds"].value = 4
    panel.method_fields["icfl"]["per_round"].value = 4
    panel.fields["steps"].value = "600"
    panel.fields["batch_size"].value = "256"
    _settle(0.2)
    viewer.reset_view()  # the docked panel narrowed the canvas
    return panel, state, folder


def dictionary_panel(out_dir: Path) -> Path:
    """The Dictionary panel fitting ICFL on the demo plate's embeddings, caught mid-fit: live
    progress, loss curve, Cancel enabled. The fitted dictionary is saved for features_panel."""
    viewer = _new_viewer()
    try:
        panel, _state, folder = _dictionary_panel_on_demo(viewer)
        panel.start_fit()

        def done() -> bool:
            return panel.fit_button.isEnabled()  # back when the fit has ended

        _wait_until(lambda: panel.progress.value() >= 450 or done(), what="the fit to progress")
        from qtpy.QtWidgets import QScrollArea

        panel.findChild(QScrollArea).ensureWidgetVisible(panel.loss_curve)  # the panel scrolls
        _settle(0.5)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "dictionary-panel.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        _wait_until(done, what="the fit to finish")
        panel.save(folder / DEMO_DICTIONARY)
        _wait_until(lambda: not panel.is_busy, what="the feature explorer")
        return path
    finally:
        viewer.close()


def features_panel(out_dir: Path) -> Path:
    """The Features panel on the demo plate: the feature most selective for a perturbation,
    its per-well heatmap, activation map and cells over its top well, top crops and bars."""
    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.dictionary_panel import DictionaryPanel
    from plate_concepts.viewer.features_panel import FeaturesPanel
    from plate_concepts.viewer.state import get_state, viewer_camera

    plate, store, folder = demo_world()
    if not (folder / DEMO_DICTIONARY).is_file():  # dictionary_panel() makes it
        dictionary_panel(out_dir)
    viewer = _new_viewer()
    try:
        show_plate(viewer, plate)
        state = get_state(viewer)
        state.set_store(store)
        loader = DictionaryPanel(viewer)  # not docked: it prepares the explorer of what it loads
        panel = FeaturesPanel(viewer)
        viewer.window.add_dock_widget(panel, name="Features", area="right")
        loader.load(folder / DEMO_DICTIONARY)
        _wait_until(lambda: state.explorer is not None, what="the feature explorer")
        panel.label_column.setCurrentText("perturbation")
        table = panel.model.table
        candidates = table[~table["dead"] & (table["most selective for"] != DEMO_CONTROLS[1][0])]
        feature = int(candidates.sort_values("max selectivity", ascending=False).iloc[0]["feature"])
        shown: list[int] = []
        panel.feature_shown.connect(shown.append)
        panel.select_feature(feature)
        _wait_until(lambda: bool(shown), what="the feature's layers")
        for layer in viewer.layers:  # the plate's own segmentation would hide the feature's cells
            if layer.metadata.get("plate_concepts", {}).get("role") == "plate-labels":
                layer.visible = False
        y0, x0, y1, x1 = state.mosaic.well_box(panel._view.well)
        viewer.reset_view()
        camera = viewer_camera(viewer)
        camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)  # the shown well and its neighbours
        camera.zoom = camera.zoom * 2.2
        _settle()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "features-panel.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        _wait_until(lambda: not panel.is_busy and not loader.is_busy, what="the workers")
        return path
    finally:
        viewer.close()


def features_on_nf1(out_dir: Path) -> Path:
    """The Features panel on the real NF1 plate: its images embedded (EfficientNet-Lite0,
    128-px crops with patch tokens; controls = the WT well), a 64-feature ICFL dictionary, and
    the feature most selective for a genotype over well B07, its nuclei (the CellProfiler masks
    beside the images) coloured by their mean activation."""
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.demo import demo_cache_dir
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.features_panel import FeaturesPanel
    from plate_concepts.viewer.state import get_state, viewer_camera

    plate = open_plate(NF1 / "images", platemap=NF1 / "platemap_NF1_plate2.csv")
    cache = demo_cache_dir() / "nf1_plate2"
    store_path, dictionary_path = cache / "embeddings-128px.store", cache / "icfl-64.safetensors"
    if not (EmbeddingStore.is_store(store_path) and len(EmbeddingStore.open(store_path))):
        embed_plate(
            plate,
            store_path,
            "efficientnet-lite0:concat:blocks",
            crop_size=128,
            patch_tokens=True,
            control="genotype=WT",
            overwrite=True,
        )
    store = EmbeddingStore.open(store_path)
    if not dictionary_path.is_file():
        ICFL(n_features=64, n_rounds=2, per_round=2, steps=300, batch_size=256, shrinkage="auto")\
            .fit(store).save(dictionary_path)  # fmt: skip
    explorer = FeatureExplorer(store, ICFL.load(dictionary_path), plate=plate).prepare()
    explorer.preload()
    viewer = _new_viewer()
    try:
        show_plate(viewer, plate)
        state = get_state(viewer)
        panel = FeaturesPanel(viewer)
        viewer.window.add_dock_widget(panel, name="Features", area="right")
        state.set_store(store)
        state.set_dictionary(explorer.estimator)
        state.set_explorer(explorer)
        panel.label_column.setCurrentText("genotype")
        panel.well.setCurrentText("B07")
        panel.objects.setCurrentText("nuclei")
        table = panel.model.table
        feature = int(table[~table["dead"]].sort_values("max selectivity").iloc[-1]["feature"])
        shown: list[int] = []
        panel.feature_shown.connect(shown.append)
        panel.select_feature(feature)
        _wait_until(lambda: bool(shown) and not panel.is_busy, what="the feature's layers")
        y0, x0, y1, x1 = state.mosaic.well_box("B07")
        viewer.reset_view()
        camera = viewer_camera(viewer)
        camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
        camera.zoom = 0.6
        _settle()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "features-nf1.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        return path
    finally:
        viewer.close()


SCREENSHOTS: list[Callable[[Path], Path]] = [
    plate_panel,
    dictionary_panel,
    features_panel,
    features_on_nf1,
]


def main(argv: list[str] | None = None) -> list[Path]:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else Path(__file__).resolve().parent / "images"
    only = [make for make in SCREENSHOTS if make.__name__ in args[1:]] or SCREENSHOTS
    written = [make(out_dir) for make in only]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
