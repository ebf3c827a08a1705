"""The demo plate: determinism, ground truth that matches the pixels, layout, files, cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from plate_concepts import demo
from plate_concepts.demo import (
    CELL_TYPES,
    CHANNELS,
    CONTROL,
    PERTURBATIONS,
    DemoPlate,
    cached_demo_plate,
    demo_cache_dir,
    make_demo_plate,
    make_demo_platemap,
    write_demo_plate,
)
from plate_concepts.plates.geometry import parse_well
from plate_concepts.plates.omezarr import read_ome_zarr_plate

DNA, ER, MITO = CHANNELS.index("DNA"), CHANNELS.index("ER"), CHANNELS.index("Mito")
PLATEMAP_COLUMNS = ["cell_type", "perturbation", "penetrance", "batch", "is_control"]


@pytest.fixture(scope="module")
def small() -> DemoPlate:
    """48 wells x 1 field of 256 px: 16 controls, 2 wells per perturbation per (type, batch)."""
    return make_demo_plate(n_wells=48, fields_per_well=1, field_size=256, seed=0)


def wells_of(demo_plate: DemoPlate, **where: object) -> list[str]:
    platemap = demo_plate.platemap
    keep = np.ones(len(platemap), dtype=bool)
    for column, value in where.items():
        keep &= (platemap[column] == value).to_numpy()
    return list(platemap.index[keep])


_computed: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def field_arrays(demo_plate: DemoPlate, well: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, cells, nuclei) of field 0, computed once per plate object and well."""
    key = (id(demo_plate), well)
    if key not in _computed:
        labels = demo_plate.plate.field_labels(well, 0)
        _computed[key] = (
            demo_plate.plate.image(well, 0).compute(),
            labels["cells"].compute(),
            labels["nuclei"].compute(),
        )
    return _computed[key]


def cells_of(demo_plate: DemoPlate, well: str, inner_only: bool = True) -> pd.DataFrame:
    truth = demo_plate.ground_truth
    cells = truth[(truth.well == well) & (truth.field == 0)]
    return cells[~cells.touches_border] if inner_only else cells


# ------------------------------------------------------------------------------ plate map


def test_platemap_has_controls_perturbations_types_and_penetrance(small):
    platemap = small.platemap
    assert list(platemap.columns) == PLATEMAP_COLUMNS
    assert platemap.index.name == "well" and len(platemap) == 48
    assert platemap.is_control.sum() >= 16
    assert (platemap.is_control == (platemap.perturbation == CONTROL)).all()
    assert set(platemap.perturbation) == {CONTROL, *PERTURBATIONS}
    assert set(platemap.cell_type) == set(CELL_TYPES)
    perturbed = platemap[~platemap.is_control]
    assert ((perturbed.penetrance > 0) & (perturbed.penetrance < 1)).all()
    assert (platemap.penetrance[platemap.is_control] == 0).all()


def test_platemap_is_balanced_and_controls_are_spread():
    platemap = make_demo_platemap(96, seed=0)
    assert platemap.is_control.sum() == 16
    # Every perturbation in several wells of every (cell type, batch) block: not confounded.
    counts = platemap.groupby(["perturbation", "cell_type", "batch"]).size()
    assert len(counts) == 5 * 2 * 2 and counts.min() >= 4
    rows_columns = np.array([parse_well(w) for w in platemap.index[platemap.is_control]])
    interior = (rows_columns[:, 0] > 0) & (rows_columns[:, 0] < 7)
    interior &= (rows_columns[:, 1] > 0) & (rows_columns[:, 1] < 11)
    assert interior.any(), "controls must not sit on the edge wells only"
    assert len(set(rows_columns[:, 0])) >= 5 and len(set(rows_columns[:, 1])) >= 6


@pytest.mark.parametrize("n_wells", [6, 7, 24, 384])
def test_platemap_adapts_to_plate_size(n_wells):
    platemap = make_demo_platemap(n_wells, seed=3)
    assert len(platemap) == n_wells
    assert platemap.is_control.sum() == min(max(16, n_wells // 6), -(-n_wells // 3))
    assert set(PERTURBATIONS) <= set(platemap.perturbation)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_wells": 5}, "n_wells"),
        ({"n_wells": 385}, "n_wells"),
        ({"fields_per_well": 0}, "fields_per_well"),
        ({"field_size": 64}, "field_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_demo_plate(**{"n_wells": 6, "fields_per_well": 1, "field_size": 128, **arguments})


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_pixels_and_tables_different_seed_differs():
    arguments = {"n_wells": 12, "fields_per_well": 1, "field_size": 192}
    ticks: list[tuple[int, int]] = []
    first = make_demo_plate(**arguments, seed=0, progress=lambda *tick: ticks.append(tick))
    assert ticks[0] == (1, 12) and ticks[-1] == (12, 12)
    again = make_demo_plate(**arguments, seed=0)
    pd.testing.assert_frame_equal(again.platemap, first.platemap)
    pd.testing.assert_frame_equal(again.ground_truth, first.ground_truth)
    # Rendered in opposite orders: a field depends only on (seed, well, field).
    in_order = [field_arrays(first, well) for well in ["A01", "C04"]]
    reversed_order = [field_arrays(again, well) for well in ["C04", "A01"]][::-1]
    for arrays, same in zip(in_order, reversed_order, strict=True):
        for a, b in zip(arrays, same, strict=True):
            np.testing.assert_array_equal(a, b)
    other = make_demo_plate(**arguments, seed=1)
    assert not np.array_equal(field_arrays(other, "A01")[0], field_arrays(first, "A01")[0])
    assert not other.ground_truth[["centroid_y", "centroid_x"]].equals(
        first.ground_truth[["centroid_y", "centroid_x"]]
    )


def test_images_are_five_uint16_channels_with_offset(small):
    image, cells, nuclei = field_arrays(small, "A01")
    assert image.shape == (5, 256, 256) and image.dtype == np.uint16
    assert cells.dtype == nuclei.dtype == np.int32
    background = image[:, cells == 0]
    assert (np.median(background, axis=1) > 90).all()  # camera offset ~100
    # Nuclei are bright in DNA, cytoplasm is not.
    assert image[DNA][nuclei > 0].mean() > 3 * image[DNA][(cells > 0) & (nuclei == 0)].mean()


# ----------------------------------------------------------------------- ground truth


def test_label_ids_match_the_table(small):
    for well in ["A01", "B02", "F08"]:
        _, cells, nuclei = field_arrays(small, well)
        table = cells_of(small, well, inner_only=False)
        ids = set(table.cell_id)
        assert set(np.unique(nuclei)) - {0} == ids == set(np.unique(cells)) - {0}
        assert ((nuclei == 0) | (nuclei == cells)).all()  # a nucleus lies in its own cell
        areas = np.bincount(cells.ravel())[table.cell_id]
        np.testing.assert_array_equal(areas, table.cell_area)


def test_control_wells_have_no_affected_cells(small):
    truth = small.ground_truth
    assert not truth.affected[truth.perturbation == CONTROL].any()
    perturbed = truth[truth.perturbation != CONTROL]
    fraction = perturbed.groupby("well").affected.mean()
    assert 0.3 < fraction.mean() < 0.9  # penetrance 0.5..0.8, incomplete


def test_nuclear_enlargement_enlarges_nuclei_in_the_label_images(small):
    for cell_type in CELL_TYPES:
        control_areas, affected_areas = [], []
        for well in wells_of(small, cell_type=cell_type, perturbation=CONTROL):
            nuclei = field_arrays(small, well)[2]
            inner = set(cells_of(small, well).cell_id)
            control_areas += [r.area for r in regionprops(nuclei) if r.label in inner]
        for well in wells_of(small, cell_type=cell_type, perturbation="nuclear-enlargement"):
            nuclei = field_arrays(small, well)[2]
            cells = cells_of(small, well)
            affected = set(cells.cell_id[cells.affected])
            affected_areas += [r.area for r in regionprops(nuclei) if r.label in affected]
        assert len(affected_areas) >= 5
        assert np.median(affected_areas) > 1.7 * np.median(control_areas)  # 2.25 planted


def test_multinucleated_cells_have_several_nuclei(small):
    n_affected = 0
    for well in wells_of(small, perturbation="multinucleation"):
        _, cells, nuclei = field_arrays(small, well)
        for cell in cells_of(small, well).itertuples():
            own_nuclei = (nuclei == cell.cell_id) & (cells == cell.cell_id)
            components = label(own_nuclei, connectivity=1).max()
            assert (components >= 2) == cell.affected, (well, cell.cell_id)
            assert components == cell.n_nuclei
            n_affected += cell.affected
    assert n_affected >= 10


def test_mito_fragmentation_breaks_tubules_into_puncta(small):
    """Connected components of the thresholded Mito channel are smaller and less elongated in
    affected cells than in unaffected cells of the same wells."""
    sizes: dict[bool, list[float]] = {True: [], False: []}
    lengths: dict[bool, list[float]] = {True: [], False: []}
    for well in wells_of(small, perturbation="mito-fragmentation"):
        image, cells, _ = field_arrays(small, well)
        mito = image[MITO].astype(float)
        bright = mito > threshold_otsu(mito[cells > 0])
        components = label(bright * cells)  # never merge across cells
        affected = cells_of(small, well, inner_only=False).set_index("cell_id").affected
        for region in regionprops(components, intensity_image=cells):
            is_affected = bool(affected[int(region.intensity_max)])
            sizes[is_affected].append(region.area)
            lengths[is_affected].append(region.axis_major_length)
    assert min(len(sizes[True]), len(sizes[False])) >= 20
    assert np.mean(sizes[True]) < 0.5 * np.mean(sizes[False])
    assert np.mean(lengths[True]) < 0.7 * np.mean(lengths[False])


def test_er_stress_brightens_er_in_affected_cells(small):
    for well in wells_of(small, perturbation="er-stress"):
        image, cells, nuclei = field_arrays(small, well)
        cytoplasm = np.where(nuclei > 0, 0, cells)
        mean_er = np.bincount(cytoplasm.ravel(), weights=image[ER].ravel()) / np.maximum(
            np.bincount(cytoplasm.ravel()), 1
        )
        table = cells_of(small, well, inner_only=False)
        if table.affected.all() or not table.affected.any():
            continue
        affected = mean_er[table.cell_id[table.affected]].mean()
        unaffected = mean_er[table.cell_id[~table.affected]].mean()
        assert affected > 1.5 * unaffected, well


def test_cell_types_differ_in_size_and_shape(small):
    area, eccentricity = {}, {}
    for cell_type in CELL_TYPES:
        regions = []
        for well in wells_of(small, cell_type=cell_type, perturbation=CONTROL):
            inner = set(cells_of(small, well).cell_id)
            regions += [r for r in regionprops(field_arrays(small, well)[1]) if r.label in inner]
        area[cell_type] = np.median([r.area for r in regions])
        eccentricity[cell_type] = np.median([r.eccentricity for r in regions])
    assert area["fibroblast-like"] > 1.4 * area["epithelial-like"]
    assert eccentricity["fibroblast-like"] > eccentricity["epithelial-like"] + 0.2


def test_batches_differ_in_intensity_for_the_same_condition(small):
    means = {}
    for batch in demo.BATCHES:
        wells = wells_of(small, batch=batch, cell_type="epithelial-like", perturbation=CONTROL)
        means[batch] = np.mean([field_arrays(small, w)[0].mean(axis=(1, 2)) for w in wells], axis=0)
    ratio = means["batch2"] / means["batch1"]
    assert ratio[DNA] > 1.15 and ratio[ER] < 0.95  # gains 1.3 and 0.8 planted


# ------------------------------------------------------------------------- files, cache


def test_write_then_read_back(tmp_path):
    out = write_demo_plate(tmp_path / "demo", n_wells=6, fields_per_well=2, field_size=128, seed=4)
    assert out == tmp_path / "demo"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [demo.ZARR_NAME, demo.PLATEMAP_NAME, demo.GROUND_TRUTH_NAME, demo.README_NAME,
         demo.MARKER_NAME]
    )
    assert demo.is_demo_folder(out) and not demo.is_demo_folder(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    plate = read_ome_zarr_plate(out / demo.ZARR_NAME)
    assert plate.channels == list(CHANNELS)
    assert plate.label_names == ["cells", "nuclei"]
    assert len(plate.wells) == 6 and plate.fields("B03") == [0, 1]
    assert list(plate.platemap.columns) == PLATEMAP_COLUMNS
    in_memory = make_demo_plate(n_wells=6, fields_per_well=2, field_size=128, seed=4)
    np.testing.assert_array_equal(
        plate.image("B03", 1).compute(), in_memory.plate.image("B03", 1).compute()
    )
    np.testing.assert_array_equal(
        plate.field_labels("B03", 1)["nuclei"].compute(),
        in_memory.plate.field_labels("B03", 1)["nuclei"].compute(),
    )
    truth = pd.read_parquet(out / demo.GROUND_TRUTH_NAME)
    pd.testing.assert_frame_equal(truth, in_memory.ground_truth)
    platemap = pd.read_csv(out / demo.PLATEMAP_NAME, index_col="well")
    assert list(platemap.index) == list(in_memory.platemap.index)
    assert "multinucleation" in (out / demo.README_NAME).read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        write_demo_plate(out, n_wells=6, fields_per_well=1, field_size=128)


def test_cached_demo_plate_is_reused(tmp_path, monkeypatch):
    arguments = {"n_wells": 6, "fields_per_well": 1, "field_size": 128, "seed": 0}
    first = cached_demo_plate(tmp_path, **arguments)
    assert first.parent == tmp_path and (first / demo.ZARR_NAME).is_dir()
    stamp = (first / demo.ZARR_NAME / "zarr.json").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached plate was generated again")

    monkeypatch.setattr(demo, "write_demo_plate", must_not_run)
    assert cached_demo_plate(tmp_path, **arguments) == first
    assert (first / demo.ZARR_NAME / "zarr.json").stat().st_mtime_ns == stamp
    # Other parameters are another plate.
    with pytest.raises(AssertionError, match="generated again"):
        cached_demo_plate(tmp_path, **{**arguments, "seed": 1})


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert demo_cache_dir() == tmp_path / "env"
    assert demo_cache_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(demo.CACHE_ENV_VAR)
    assert "napari-plate-concepts" in str(demo_cache_dir())
