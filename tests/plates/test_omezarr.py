"""OME-Zarr HCS plates: round trips (NGFF 0.4, 0.5), checks by other tools, laziness, bad input."""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr.format import FormatV04
from tqdm import tqdm

from plate_concepts.plates.geometry import PlateFormat
from plate_concepts.plates.model import Plate
from plate_concepts.plates.omezarr import (
    is_ome_zarr_plate,
    read_ome_zarr_plate,
    write_ome_zarr_plate,
)

with warnings.catch_warnings():  # ome_zarr.writer builds a deprecated Scaler at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import write_multiscale, write_plate_metadata, write_well_metadata

VERSIONS = ["0.4", "0.5"]
SHAPE = (2, 262, 270)  # smaller side >= 256: the automatic pyramid has two levels


def make_plate(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> Plate:
    """Two wells x two fields of random uint16 pixels, nuclei labels, a plate map with an
    unimaged well."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for well in ["B07", "C03"]:
        for field in range(2):
            pixels = rng.integers(0, 4000, size=shape, dtype=np.uint16)
            images[(well, field)] = [da.from_array(pixels, chunks=(1, 100, 100))]
            nuclei = rng.integers(0, 60, size=shape[1:], dtype=np.int32)
            labels[(well, field)] = {"nuclei": [da.from_array(nuclei)]}
    platemap = pd.DataFrame(
        {
            "treatment": ["DMSO", "drug", "empty"],
            "dose_um": [0.0, 1.5, np.nan],
            "replicate": [1, 2, 3],
        },
        index=pd.Index(["B07", "C03", "D01"], name="well"),
    )
    return Plate(
        name="tiny plate",
        channels=["DNA", "Mito"],
        images=images,
        reader="test",
        labels=labels,
        platemap=platemap,
        pixel_size_um=0.65,
        channel_colors=["#0000FF", "#FF00FF"],
    )


@pytest.fixture(scope="module")
def plate() -> Plate:
    return make_plate()


@pytest.fixture(scope="module", params=VERSIONS)
def written(request, plate, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(f"ngff{request.param}") / "plate.ome.zarr"
    return request.param, write_ome_zarr_plate(plate, path, ngff_version=request.param)


def test_round_trip_keeps_pixels_metadata_labels_and_platemap(plate, written):
    version, path = written
    assert is_ome_zarr_plate(path)
    back = read_ome_zarr_plate(path)
    assert back.reader == f"ome-zarr-{version}"
    assert back.name == "tiny plate"
    assert back.channels == ["DNA", "Mito"]
    assert back.channel_colors == ["#0000FF", "#FF00FF"]
    assert back.pixel_size_um == pytest.approx(0.65)
    assert back.plate_format == PlateFormat(6, 8)  # B07 needs the 48-well plate
    assert back.wells == ["B07", "C03"]
    assert back.fields_per_well == {"B07": 2, "C03": 2}
    for key, levels in plate.images.items():
        np.testing.assert_array_equal(back.images[key][0].compute(), levels[0].compute())
        np.testing.assert_array_equal(
            back.labels[key]["nuclei"][0].compute(), plate.labels[key]["nuclei"][0].compute()
        )
    pd.testing.assert_frame_equal(back.platemap, plate.platemap)


def test_pyramid_levels_are_2x2_means_and_label_strides(plate, written):
    _, path = written
    back = read_ome_zarr_plate(path)
    assert back.n_levels == 2
    assert [level.shape for level in back.images[("C03", 1)]] == [(2, 262, 270), (2, 131, 135)]
    full = plate.image("C03", 1).compute().astype(float)
    expected = np.rint(full.reshape(2, 131, 2, 135, 2).mean(axis=(2, 4)))
    np.testing.assert_array_equal(back.image("C03", 1, level=1).compute(), expected)
    nuclei = plate.labels[("C03", 1)]["nuclei"][0].compute()
    # ids are kept, not averaged: level 1 is every second pixel
    np.testing.assert_array_equal(
        back.field_labels("C03", 1, level=1)["nuclei"].compute(), nuclei[::2, ::2]
    )


def test_written_plate_validates_with_ome_zarr_models(written):
    version, path = written
    if version == "0.4":
        from ome_zarr_models.v04 import HCS
    else:
        from ome_zarr_models.v05 import HCS
    hcs = HCS.from_zarr(zarr.open_group(str(path), mode="r"))
    plate_meta = hcs.attributes.plate if version == "0.4" else hcs.ome_attributes.plate
    assert sorted(well.path for well in plate_meta.wells) == ["B/7", "C/3"]
    assert plate_meta.field_count == 2
    assert len(list(hcs.well_groups)) == 2


def test_written_plate_opens_with_ome_zarr_py_reader(plate, written):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate as PlateSpec
    from ome_zarr.reader import Reader

    _, path = written
    node = next(iter(Reader(parse_url(str(path)))()))
    assert any(isinstance(spec, PlateSpec) for spec in node.specs)
    # napari-ome-zarr shows the plate as one grid of each well's first field
    grid = node.data[0]
    assert grid.shape == (2, 6 * 262, 8 * 270)
    row, column = 1, 6  # B07
    tile = grid[:, row * 262 : (row + 1) * 262, column * 270 : (column + 1) * 270].compute()
    np.testing.assert_array_equal(tile, plate.image("B07", 0).compute())


def test_reading_is_lazy_until_compute(written):
    _, path = written
    copy = path.parent / f"corrupt-{path.name}"
    shutil.copytree(path, copy)
    chunks = [p for p in (copy / "B/7/0/s0").rglob("*") if p.is_file() and p.name[0].isdigit()]
    assert chunks  # v2: s0/0/0/0, v3: s0/c/0/0/0
    for chunk in chunks:
        chunk.write_bytes(b"not a compressed chunk")
    back = read_ome_zarr_plate(copy)  # opening reads metadata only
    assert all(isinstance(level, da.Array) for levels in back.images.values() for level in levels)
    np.asarray(back.image("C03", 0).compute())  # untouched fields read fine
    with pytest.raises((RuntimeError, ValueError)):  # the codec rejects the garbage chunk
        back.image("B07", 0).compute()


def test_foreign_plate_with_tczyx_axes_is_reduced_to_cyx(tmp_path):
    """A plate written by another tool: 5D images, no omero, a non-standard 2 x 5 layout."""
    path = tmp_path / "foreign.zarr"
    fmt = FormatV04()
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_plate_metadata(
        root, rows=["A", "B"], columns=["1", "2", "3", "4", "5"], wells=["B/5"], fmt=fmt
    )
    well = root.require_group("B/5")
    write_well_metadata(well, [{"path": "0"}], fmt=fmt)
    data = np.arange(2 * 3 * 5 * 8 * 9, dtype=np.uint16).reshape(2, 3, 5, 8, 9)  # t, c, z, y, x
    write_multiscale([data], well.require_group("0"), fmt=fmt, axes="tczyx")
    assert is_ome_zarr_plate(path)
    back = read_ome_zarr_plate(path)
    assert back.reader == "ome-zarr-0.4"
    assert back.wells == ["B05"]
    assert back.channels == ["ch0", "ch1", "ch2"]
    assert back.pixel_size_um is None and back.channel_colors is None
    assert back.plate_format == PlateFormat(4, 6)  # 2 x 5 is not standard: the smallest holding B05
    np.testing.assert_array_equal(back.image("B05").compute(), data[0, :, 2])  # t = 0, middle z
    assert back.platemap is None


def test_not_a_plate_gives_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    plain_group = tmp_path / "plain.zarr"
    zarr.open_group(str(plain_group), mode="w").attrs["something"] = 1
    for path in (empty, plain_group):
        assert not is_ome_zarr_plate(path)
        with pytest.raises(ValueError, match=f"{path}.*not an OME-Zarr plate"):
            read_ome_zarr_plate(path)
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        read_ome_zarr_plate(tmp_path / "missing.zarr")
    assert not is_ome_zarr_plate(tmp_path / "missing.zarr")


def test_fields_of_different_shapes_name_the_well(tmp_path):
    path = write_ome_zarr_plate(
        make_plate(shape=(2, 40, 48)), tmp_path / "p.ome.zarr", ngff_version="0.4"
    )
    field = zarr.open_group(
        str(path / "C" / "3" / "1"), mode="w", zarr_format=2
    )  # replace the field
    write_multiscale([np.zeros((2, 30, 48), np.uint16)], field, fmt=FormatV04(), axes="cyx")
    with pytest.raises(ValueError, match="well C03 field 1"):
        read_ome_zarr_plate(path)


def test_interrupted_write_leaves_nothing(tmp_path):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if done == 2:
            raise KeyboardInterrupt("stopped by the user")

    with pytest.raises(KeyboardInterrupt):
        write_ome_zarr_plate(
            make_plate(shape=(2, 40, 48)), tmp_path / "p.ome.zarr", progress=progress
        )
    assert calls == [(1, 4), (2, 4)]
    assert list(tmp_path.iterdir()) == []  # neither the plate nor its temporary folder


def test_existing_destination_needs_overwrite(tmp_path):
    path = write_ome_zarr_plate(make_plate(shape=(2, 40, 48), seed=1), tmp_path / "p.ome.zarr")
    with pytest.raises(FileExistsError, match="p.ome.zarr"):
        write_ome_zarr_plate(make_plate(shape=(2, 40, 48), seed=2), path)
    replacement = make_plate(shape=(2, 40, 48), seed=2)
    with tqdm(file=io.StringIO()) as bar:
        write_ome_zarr_plate(replacement, path, overwrite=True, n_levels=3, progress=bar)
    assert (bar.n, bar.total) == (4, 4)  # one tick per field
    back = read_ome_zarr_plate(path)
    assert [level.shape for level in back.images[("B07", 0)]] == [
        (2, 40, 48),
        (2, 20, 24),
        (2, 10, 12),
    ]
    np.testing.assert_array_equal(
        back.image("B07", 0).compute(), replacement.image("B07", 0).compute()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["p.ome.zarr"]


def test_bad_write_arguments(tmp_path):
    small = make_plate(shape=(2, 40, 48))
    with pytest.raises(ValueError, match="ngff_version"):
        write_ome_zarr_plate(small, tmp_path / "a.zarr", ngff_version="0.3")
    with pytest.raises(ValueError, match="n_levels=9"):
        write_ome_zarr_plate(small, tmp_path / "b.zarr", n_levels=9)
    small.channel_colors = ["#0000FF", "not a colour"]
    with pytest.raises(ValueError, match="'Mito'"):
        write_ome_zarr_plate(small, tmp_path / "c.zarr")
    assert list(tmp_path.iterdir()) == []
