"""How fast the viewer answers: selecting a feature, and opening a 384-well plate.

1. Feature selection on the demo plate, after the explorer's ``prepare`` and ``preload`` (what
   the Dictionary panel runs after a fit or load): the time from selecting a feature in the
   Features panel to all its layers (plate heatmap, activation map, cells), gallery and plot
   being updated (``FeaturesPanel.feature_shown``), and to the next draw of the canvas, while
   stepping through features (as with the arrow keys) - with the fields of a chosen well on
   display, and following each feature's top well; plus the Qt-free part (``feature_view``).
2. Opening a 384-well OME-Zarr plate (one small field per well, written once with
   ``write_ome_zarr_plate`` into the cache): reading it (``open_plate``), building the mosaic
   and layer data, and showing it in a viewer until the first draw.

Needs a display (``xvfb-run -a``). Everything it makes is cached (demo plate, embeddings,
dictionary, the 384-well plate), so the first run takes minutes and later runs seconds::

    xvfb-run -a python benchmarks/bench_feature_selection.py [--wells 96] [--features 20]

or on the output of the main job (``plate-concepts demo-run out/demo``)::

    xvfb-run -a python benchmarks/bench_feature_selection.py --only selection \
        --store out/demo/store-efficientnet-lite0-concat-blocks-128px-patches \
        --dictionary out/demo/icfl-M256-J2L4.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _wait_until(condition: Callable[[], bool], timeout_s: float = 600, what: str = "") -> None:
    from qtpy.QtWidgets import QApplication

    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.001)


def _summary(times: list[float]) -> str:
    ms = [1000 * t for t in times]
    return f"median {statistics.median(ms):7.1f} ms   min {min(ms):7.1f} ms   max {max(ms):7.1f} ms   (n = {len(ms)})"


def _features_viewer(plate: Any, store: Any, explorer: Any) -> tuple[Any, Any, Any]:
    """A shown viewer with the plate, the Features panel docked and the explorer set."""
    import napari

    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.features_panel import FeaturesPanel
    from plate_concepts.viewer.state import get_state

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    show_plate(viewer, plate)
    state = get_state(viewer)
    panel = FeaturesPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Features", area="right")
    state.set_store(store)
    state.set_dictionary(explorer.estimator)
    state.set_explorer(explorer)
    return viewer, state, panel


# ---------------------------------------------------------------------- the demo world
def demo_world(
    wells: int,
    cache: Path | None,
    n_features: int,
    steps: int,
    crop: int = 256,
    store_path: Path | None = None,
    dictionary: Path | None = None,
) -> tuple[Any, Any, Path]:
    """(plate, store, dictionary file) of the demo plate, each made once and cached (or the
    given store and dictionary, e.g. a ``plate-concepts demo-run`` output's)."""
    from plate_concepts.demo import ZARR_NAME, cached_demo_plate
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates import open_plate

    started = time.perf_counter()
    folder = cached_demo_plate(cache, n_wells=wells, fields_per_well=2, field_size=512, seed=0)
    plate = open_plate(folder / ZARR_NAME)
    store_path = store_path or folder / f"bench-embeddings-efficientnet-mean-{crop}px.store"
    if not (EmbeddingStore.is_store(store_path) and len(EmbeddingStore.open(store_path))):
        print("embedding the demo plate (once)...")
        embed_plate(
            plate,
            store_path,
            "efficientnet-lite0:mean",
            crop_size=crop,
            patch_tokens=True,
            control="perturbation=DMSO",
            overwrite=True,
        )
    store = EmbeddingStore.open(store_path)
    dictionary = dictionary or folder / f"bench-icfl-{crop}px-{n_features}-{steps}.safetensors"
    if not dictionary.is_file():
        print("fitting the dictionary (once)...")
        ICFL(n_features=n_features, n_rounds=4, per_round=4, steps=steps, batch_size=512).fit(
            store
        ).save(dictionary)
    print(
        f"demo plate: {len(plate.wells)} wells, {len(plate.images)} fields of {plate.image_shape}; "
        f"store: {len(store)} crops, d = {store.dim}, patch grid {store.patch_grid}; "
        f"set-up {time.perf_counter() - started:.1f} s"
    )
    return plate, store, dictionary


def bench_feature_selection(args: argparse.Namespace) -> None:

    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.viewer._feature_layers import (
        N_CROPS,
        THUMBNAIL_SIZE,
        feature_view,
        resolve_selection,
    )
    from plate_concepts.viewer.features_panel import AUTO_WELL

    plate, store, dictionary_file = demo_world(
        args.wells, args.cache, args.n_features, args.steps, args.crop, args.store, args.dictionary
    )
    estimator = ICFL.load(dictionary_file)
    started = time.perf_counter()
    explorer = FeatureExplorer(store, estimator, plate=plate).prepare()
    print(
        f"explorer prepare (encode {len(store)} crops, per-well and selectivity tables): "
        f"{time.perf_counter() - started:.2f} s"
    )
    started = time.perf_counter()
    summary = explorer.preload(n_top_crops=N_CROPS, thumbnail_size=THUMBNAIL_SIZE)
    print(f"explorer preload: {time.perf_counter() - started:.2f} s ({summary.describe()})")

    viewer, state, panel = _features_viewer(plate, store, explorer)
    shown: list[int] = []
    panel.feature_shown.connect(shown.append)
    drawn: list[float] = []
    scene_canvas = viewer.window._qt_viewer.canvas._scene_canvas  # private: the vispy canvas
    # After the scene's own draw callback: the time the frame has been drawn.
    scene_canvas.events.draw.connect(
        lambda _event: drawn.append(time.perf_counter()), position="last"
    )

    table = explorer.feature_table()
    alive = table.loc[~table["dead"], "feature"].to_numpy()
    features = [int(f) for f in np.random.default_rng(0).permutation(alive)[: args.features + 1]]

    def select(feature: int) -> tuple[float, float]:
        """Seconds from selecting ``feature`` to its layers and plots updated, and to the
        canvas drawn with them."""
        count = len(shown)
        start = time.perf_counter()
        panel.select_feature(feature)
        _wait_until(lambda: len(shown) > count and shown[-1] == feature, what=f"feature {feature}")
        updated = time.perf_counter()
        _wait_until(lambda: bool(drawn) and drawn[-1] > updated, what="a draw")
        return updated - start, drawn[-1] - start

    results = {}
    for scenario, well in (
        ("fields of a chosen well", str(explorer.well_values(0).index[0])),
        ("automatic well (each feature's top well)", AUTO_WELL),
    ):
        panel.well.setCurrentText(well)
        select(features[0])
        results[scenario] = [select(f) for f in features[1:]]
    viewer.close()

    direct = []
    for feature in features[1:]:
        start = time.perf_counter()
        feature_view(
            explorer,
            state.mosaic,
            resolve_selection(explorer, feature, n_crops=N_CROPS),
            channel_limits=[(0, 1)] * len(plate.channels),
            channel_colors=[(1, 1, 1)] * len(plate.channels),
            thumbnail_size=THUMBNAIL_SIZE,
        )
        direct.append(time.perf_counter() - start)
    print("\nfeature selection on the demo plate (Features panel), stepping through new features")
    for scenario, times in results.items():
        print(f"  {scenario}:")
        print(f"    layers and plots updated  {_summary([t for t, _ in times])}")
        print(f"    canvas drawn              {_summary([d for _, d in times])}")
    print(f"  feature_view alone (no Qt)    {_summary(direct)}")


# ---------------------------------------------------------------------- large fields
def bench_big_wells(args: argparse.Namespace) -> None:
    """Selection on wells of 9 fields of 1080 x 1080 px (a usual Cell Painting site layout):
    synthetic images, square cells and random 384-d tokens (the timing does not depend on them),
    128-px crops with 4 x 4 patch tokens."""
    import dask.array as da
    import pandas as pd

    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates.geometry import PlateFormat
    from plate_concepts.plates.model import Plate

    size, crop, grid, dim = 1080, 128, 4, 384
    wells = ["A01", "A02", "B01", "B02"]
    rng = np.random.default_rng(0)
    cells = np.zeros((size, size), np.int32)
    for index, (y, x) in enumerate(
        (y, x) for y in range(0, size - 40, 45) for x in range(0, size - 40, 45)
    ):
        cells[y + 5 : y + 40, x + 5 : x + 40] = index + 1  # 576 cells of 35 x 35 px per field
    images = {
        (w, f): [
            da.from_array(
                rng.integers(0, 4000, (3, size, size), dtype=np.uint16), chunks=(1, size, size)
            )
        ]
        for w in wells
        for f in range(9)
    }
    labels = {(w, f): {"cells": [da.from_array(cells)]} for w in wells for f in range(9)}
    platemap = pd.DataFrame(
        {"treatment": ["DMSO", "a", "b", "DMSO"]}, index=pd.Index(wells, name="well")
    )
    plate = Plate(name="big", channels=["DNA", "ER", "Mito"], images=images, labels=labels, reader="bench",
                  plate_format=PlateFormat.from_n_wells(96), platemap=platemap)  # fmt: skip
    positions = [
        (y, x) for y in range(0, size - crop + 1, crop) for x in range(0, size - crop + 1, crop)
    ]
    obs = pd.DataFrame(
        [
            {"plate": "big", "well": w, "field": f, "crop_y": y, "crop_x": x, "crop_size": crop,
             "treatment": platemap.loc[w, "treatment"], "is_control": platemap.loc[w, "treatment"] == "DMSO"}
            for w in wells for f in range(9) for y, x in positions
        ]
    )  # fmt: skip
    patches = rng.normal(size=(len(obs), grid, grid, dim)).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="bench-big-wells-"))
    store = EmbeddingStore.create(folder / "store", dim=dim, patch_grid=(grid, grid))
    store.append(patches.mean(axis=(1, 2)), obs, patch_tokens=patches)
    estimator = ICFL(n_features=128, n_rounds=2, per_round=2, steps=50, batch_size=256).fit(store)
    explorer = FeatureExplorer(store, estimator, plate=plate).prepare()
    started = time.perf_counter()
    summary = explorer.preload()
    print(
        f"\nwells of 9 fields of {size} px: {len(store)} crops; preload {time.perf_counter() - started:.1f} s ({summary.describe()})"
    )
    viewer, _state, panel = _features_viewer(plate, store, explorer)
    panel.well.setCurrentText("A02")
    shown: list[int] = []
    panel.feature_shown.connect(shown.append)
    times = []
    for feature in range(args.features + 1):
        count, start = len(shown), time.perf_counter()
        panel.select_feature(feature)
        _wait_until(
            lambda count=count: len(shown) > count and not panel.is_busy, what=f"feature {feature}"
        )
        times.append(time.perf_counter() - start)
    viewer.close()
    print(f"  selection -> layers updated (fields of well A02) {_summary(times[1:])}")


# ---------------------------------------------------------------------- the 384-well plate
def plate_384(cache: Path, field: int) -> Path:
    """A 384-well OME-Zarr plate, one ``field`` x ``field`` 3-channel field per well, with a
    plate map; written once."""
    import dask.array as da
    import pandas as pd

    from plate_concepts.plates.geometry import PlateFormat
    from plate_concepts.plates.model import Plate
    from plate_concepts.plates.omezarr import write_ome_zarr_plate

    path = cache / f"bench-384-wells-{field}px.ome.zarr"
    if path.exists():
        return path
    fmt = PlateFormat.from_n_wells(384)
    wells = [
        f"{chr(ord('A') + r)}{c + 1:02d}" for r in range(fmt.n_rows) for c in range(fmt.n_columns)
    ]
    rng = np.random.default_rng(0)
    images = {
        (w, 0): [
            da.from_array(
                rng.integers(0, 4000, (3, field, field), dtype=np.uint16), chunks=(1, field, field)
            )
        ]
        for w in wells
    }
    platemap = pd.DataFrame(
        {
            "compound": [f"cpd{i % 40}" for i in range(len(wells))],
            "dose": [str(i % 8) for i in range(len(wells))],
        },
        index=pd.Index(wells, name="well"),
    )
    plate = Plate(
        name="bench-384",
        channels=["DNA", "ER", "Mito"],
        images=images,
        reader="bench",
        plate_format=fmt,
        platemap=platemap,
    )
    started = time.perf_counter()
    write_ome_zarr_plate(plate, path)
    print(f"wrote {path} in {time.perf_counter() - started:.1f} s (once)")
    return path


def bench_open_384(args: argparse.Namespace) -> None:
    import napari

    from plate_concepts.demo import demo_cache_dir
    from plate_concepts.plates import open_plate
    from plate_concepts.plates.mosaic import PlateMosaic
    from plate_concepts.viewer.app import show_plate
    from plate_concepts.viewer.plate_layers import plate_layer_data

    path = plate_384(demo_cache_dir(args.cache), args.field)
    rows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plate = open_plate(path)
        t1 = time.perf_counter()
        mosaic = PlateMosaic(plate)
        data = plate_layer_data(plate, mosaic)
        t2 = time.perf_counter()
        viewer = napari.Viewer(show=True)
        t3 = time.perf_counter()
        show_plate(viewer, plate, mosaic=mosaic, layer_data=data)
        _wait_until(lambda: True)
        viewer.screenshot(canvas_only=True, flash=False)  # forces slicing and a first draw
        t4 = time.perf_counter()
        viewer.close()
        rows.append((t1 - t0, t2 - t1, t4 - t3, (t1 - t0) + (t2 - t1) + (t4 - t3)))
    best = np.min(np.array(rows), axis=0)
    median = np.median(np.array(rows), axis=0)
    print(
        f"\nopening a 384-well OME-Zarr plate ({len(plate.wells)} wells, {args.field} px fields, 3 channels)"
    )
    for name, b, m in zip(
        ("open_plate (metadata)", "mosaic + layer data", "show in viewer, first draw", "total"),
        best,
        median,
        strict=True,
    ):
        print(f"  {name:28s} median {1000 * m:8.1f} ms   best {1000 * b:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wells", type=int, default=96, help="demo plate wells (the sample has 96)"
    )
    parser.add_argument(
        "--crop", type=int, default=256, help="crop size of the demo embeddings (px)"
    )
    parser.add_argument("--features", type=int, default=20, help="features to step through")
    parser.add_argument("--n-features", type=int, default=512, help="dictionary size M")
    parser.add_argument("--steps", type=int, default=300, help="dictionary training steps")
    parser.add_argument(
        "--field", type=int, default=128, help="field size of the 384-well plate (px)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="times the 384-well plate is opened")
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: the demo cache)"
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="an embedding store of the demo plate to use"
    )
    parser.add_argument(
        "--dictionary", type=Path, default=None, help="a dictionary file fitted on --store"
    )
    parser.add_argument("--only", choices=["selection", "bigwells", "open384"], default=None)
    args = parser.parse_args()
    if args.only in (None, "selection"):
        bench_feature_selection(args)
    if args.only in (None, "bigwells"):
        bench_big_wells(args)
    if args.only in (None, "open384"):
        bench_open_384(args)


if __name__ == "__main__":
    main()
