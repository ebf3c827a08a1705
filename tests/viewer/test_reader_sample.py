"""The napari reader (plates, embedding stores, dictionary files) and the demo-plate sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REAL_DATA

from plate_concepts.plates import discover_platemap
from plate_concepts.viewer.reader import napari_get_reader

NF1 = REAL_DATA / "nf1_plate2"
PLUGIN = "napari-plate-concepts"


# ---------------------------------------------------------------------- without a viewer
def test_discover_platemap_finds_the_single_map_next_to_a_plate(tmp_path):
    assert discover_platemap(NF1 / "images") == NF1 / "platemap_NF1_plate2.csv"  # in the parent
    plate = tmp_path / "plate" / "images"
    plate.mkdir(parents=True)
    assert discover_platemap(plate) is None
    (tmp_path / "plate" / "PlateMap_run1.parquet").write_bytes(b"")
    assert discover_platemap(plate) == tmp_path / "plate" / "PlateMap_run1.parquet"
    (plate / "platemap.tsv").write_text("well\tx\n")
    assert discover_platemap(plate) == plate / "platemap.tsv"  # the plate's own folder first
    (plate / "platemap_old.csv").write_text("well,x\n")
    assert discover_platemap(plate) is None  # two candidates: ambiguous, the user chooses
    (plate / "notes.csv").write_text("a\n")
    assert discover_platemap(tmp_path / "absent") is None


def test_reader_declines_foreign_paths_without_raising(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # not our metadata
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    odd = tmp_path / "odd_tiffs"
    odd.mkdir()
    (odd / "holiday.tif").write_bytes(b"II*\x00")
    for path in [
        "notes.txt",
        "table.csv",
        "weights.safetensors",
        "broken.safetensors",
        "odd_tiffs",
        "missing.zarr",
    ]:
        assert napari_get_reader(str(tmp_path / path)) is None, path
    assert napari_get_reader([str(tmp_path), str(tmp_path)]) is None
    # NF1's masks/ holds binary CellProfiler masks (..._MaskNuclei.tiff), neither a plate nor labels.
    assert napari_get_reader(str(NF1 / "masks")) is None
    assert napari_get_reader(str(NF1 / "images")) is not None


def test_store_crop_points_sit_on_the_crop_centres(tiny_store):
    from plate_concepts.plates import open_plate
    from plate_concepts.plates.mosaic import PlateMosaic
    from plate_concepts.viewer._embedding_views import crop_points_layer_data

    plate_path, store = tiny_store
    mosaic = PlateMosaic(open_plate(plate_path))
    points, kwargs, kind = crop_points_layer_data(store, mosaic)
    obs = store.obs
    assert kind == "points" and len(points) == len(store) == 3 * 2 * 2 * 3  # 2 x 3 crops per field
    row = obs.index[
        (obs["well"] == "C02") & (obs["field"] == 1) & (obs["crop_y"] == 32) & (obs["crop_x"] == 64)
    ][0]
    oy, ox = mosaic.field_origin("C02", 1)
    np.testing.assert_allclose(points[row], [oy + 32 + 16, ox + 64 + 16])
    assert kwargs["face_color"] == "treatment"  # the control spec's column
    assert list(kwargs["features"]["token_row"]) == list(range(len(store)))


# ---------------------------------------------------------------------- in napari
@pytest.mark.gui
def test_tiff_folder_opens_with_the_platemap_next_to_it(make_napari_viewer):
    from plate_concepts.viewer.state import get_state

    viewer = make_napari_viewer()
    layers = viewer.open(str(NF1 / "images"), plugin=PLUGIN)
    assert [layer.name for layer in layers] == [
        "nf1_plate2 DAPI", "nf1_plate2 GFP", "nf1_plate2 RFP", "nf1_plate2 wells", "nf1_plate2 rows and columns",
    ]  # fmt: skip
    plate = get_state(viewer).plate
    assert plate is not None and plate.platemap is not None
    assert plate.platemap.loc["D06", "genotype"] == "WT" and plate.label_names == [
        "cells",
        "cytoplasm",
        "nuclei",
    ]  # the masks beside the images
    grid = layers[3]
    assert grid.features.loc[grid.features["well"] == "D06", "genotype"].item() == "WT"
    # The status bar names the well under the cursor with its plate-map labels.
    mosaic = get_state(viewer).mosaic
    oy, ox = mosaic.field_origin("D06", 0)
    status = layers[0].get_status((oy + 5, ox + 5), world=True)
    assert "D06 field 1" in str(status) and "genotype: WT" in str(status)


@pytest.mark.gui
def test_sample_demo_plate_generates_once_and_aligns_labels(
    make_napari_viewer, monkeypatch, tmp_path
):
    from plate_concepts import demo
    from plate_concepts.viewer import sample

    monkeypatch.setenv("PLATE_CONCEPTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        sample, "DEMO_OPTIONS", {"n_wells": 6, "fields_per_well": 1, "field_size": 128, "seed": 3}
    )
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "demo_plate")
    names = [layer.name for layer in layers]
    plate_name = "demo plate (seed 3)"
    assert names == [
        f"{plate_name} {n}"
        for n in (*demo.CHANNELS, "cells", "nuclei", "wells", "rows and columns")
    ]
    folder = tmp_path / "cache" / demo.DemoParameters(6, 1, 128, 3).key
    assert (folder / demo.ZARR_NAME).is_dir()

    from plate_concepts.viewer.state import get_state

    mosaic = get_state(viewer).mosaic
    nuclei = layers[names.index(f"{plate_name} nuclei")]
    assert nuclei.data.shape == mosaic.shape
    # A cell's nucleus centroid (ground truth, field pixels) carries its id on the mosaic labels.
    truth = pd.read_parquet(folder / demo.GROUND_TRUTH_NAME)
    cell = truth[(truth["well"] == "B02") & ~truth["touches_border"]].iloc[0]
    oy, ox = mosaic.field_origin("B02", int(cell["field"]))
    labels = np.asarray(
        nuclei.data[
            int(oy + cell["centroid_y"]) - 2 : int(oy + cell["centroid_y"]) + 3,
            int(ox + cell["centroid_x"]) - 2 : int(ox + cell["centroid_x"]) + 3,
        ]
    )
    assert int(cell["cell_id"]) in labels

    def must_not_regenerate(*args, **kwargs):
        raise AssertionError("the cached demo plate was generated again")

    monkeypatch.setattr(demo, "write_demo_plate", must_not_regenerate)
    viewer.layers.clear()
    assert len(viewer.open_sample(PLUGIN, "demo_plate")) == len(names)


@pytest.mark.gui
def test_reader_opens_a_store_on_its_plate_and_a_dictionary(
    make_napari_viewer, tiny_store, tmp_path
):
    from plate_concepts.dictionary import ICFL, fit_dictionary
    from plate_concepts.viewer.state import get_state

    plate_path, store = tiny_store
    viewer = make_napari_viewer()
    state = get_state(viewer)
    layers = viewer.open(str(store.path), plugin=PLUGIN)
    assert [layer.name for layer in layers] == [
        "tiny DNA", "tiny Mito", "tiny wells", "tiny rows and columns", "tiny.store crops",
    ]  # fmt: skip
    assert (
        state.store is not None
        and state.store.path == store.path
        and len(state.store) == len(store)
    )
    assert state.plate is not None and state.plate.source == str(plate_path)
    points = layers[-1]
    assert len(points.data) == len(store)
    assert set(points.features["treatment"]) == {"DMSO", "drug"}
    colours = {tuple(c) for c in np.round(points.face_color, 3)}
    assert len(colours) == 2  # one colour per treatment

    # Opened again with the plate in the viewer: only the crops are added, on the same mosaic.
    again = viewer.open(str(store.path), plugin=PLUGIN)
    assert (
        len(again) == 1 and again[0].name.startswith("tiny.store crops") and len(viewer.layers) == 6
    )
    np.testing.assert_array_equal(again[0].data, points.data)

    # A dictionary file: the dictionary, its store and the store's plate.
    out = tmp_path / "tiny.safetensors"
    fit_dictionary(store.path, out, "icfl", control="is_control", n_features=4, n_rounds=2, per_round=1,
                   steps=3, batch_size=16, device="cpu", checkpoint_every=0)  # fmt: skip
    fresh = make_napari_viewer()
    layers = fresh.open(str(out), plugin=PLUGIN)
    fresh_state = get_state(fresh)
    assert isinstance(fresh_state.dictionary, ICFL) and fresh_state.dictionary.n_features == 4
    assert (
        fresh_state.store is not None and fresh_state.store.path.resolve() == store.path.resolve()
    )
    assert layers[-1].name == "tiny.store crops" and fresh_state.plate is not None

    # A dictionary fitted on tokens in memory records no store: only the dictionary is opened.
    in_memory = ICFL(4, n_rounds=2, per_round=1, steps=3, batch_size=16, device="cpu")
    in_memory.fit(store.read(), store.obs["is_control"].to_numpy())
    saved = in_memory.save(tmp_path / "bare.safetensors")
    bare = make_napari_viewer()
    assert bare.open(str(saved), plugin=PLUGIN) == []
    assert get_state(bare).dictionary is not None and get_state(bare).store is None


@pytest.mark.gui
def test_store_without_a_readable_plate_opens_alone(make_napari_viewer, tiny_store):
    import shutil

    from napari.utils.notifications import notification_manager

    from plate_concepts.viewer.state import get_state

    plate_path, store = tiny_store
    shutil.rmtree(plate_path)
    viewer = make_napari_viewer()
    seen = len(notification_manager.records)
    layers = viewer.open(str(store.path), plugin=PLUGIN)
    assert layers == [] and len(viewer.layers) == 0
    messages = [record.message for record in notification_manager.records[seen:]]
    assert any("cannot be opened" in m and str(plate_path) in m for m in messages), messages
    assert get_state(viewer).store is not None and len(get_state(viewer).store) == len(store)
