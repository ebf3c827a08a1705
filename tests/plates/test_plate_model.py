"""The Plate model's checks, and crash-safe writing."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from plate_concepts._io import atomic_path
from plate_concepts.plates.geometry import PlateFormat
from plate_concepts.plates.model import Plate


def _field(shape=(2, 16, 16), dtype=np.uint16):
    return [da.zeros(shape, dtype=dtype)]


def test_wells_are_canonical_and_sorted_by_position():
    plate = Plate("p", ["a", "b"], {("B7", 1): _field(), ("b07", 0): _field(), ("A12", 0): _field()}, reader="t")
    assert plate.wells == ["A12", "B07"]
    assert plate.fields("B7") == [0, 1] and plate.fields_per_well == {"A12": 1, "B07": 2}
    assert plate.plate_format == PlateFormat(8, 12)
    assert plate.image_shape == (16, 16) and plate.dtype == np.uint16


def test_fields_of_different_shape_are_refused_naming_the_odd_one():
    with pytest.raises(ValueError, match=r"C03 field 0 .*\(2, 16, 20\)"):
        Plate("p", ["a", "b"], {("B02", 0): _field(), ("C03", 0): _field((2, 16, 20))}, reader="t")
    # The odd field is named even when it comes first: the majority sets the plate's shape.
    fields = {("A01", 0): _field((2, 16, 20)), **{("B02", f): _field() for f in range(3)}}
    with pytest.raises(ValueError, match=r"1 field\(s\) .* differ from the other 3: A01 field 0 .*"
                                         r"\(2, 16, 20\) uint16, the others \(2, 16, 16\)"):
        Plate("p", ["a", "b"], fields, reader="t")


def test_channel_count_must_match_the_names():
    with pytest.raises(ValueError, match="3 channels but the plate names 2"):
        Plate("p", ["a", "b"], {("B02", 0): _field((3, 16, 16))}, reader="t")


def test_well_outside_the_declared_format_is_refused():
    with pytest.raises(ValueError, match="H12 lies outside the 24-well"):
        Plate("p", ["a", "b"], {("H12", 0): _field()}, reader="t", plate_format=PlateFormat.from_n_wells(24))


def test_missing_field_is_a_clear_key_error():
    plate = Plate("p", ["a", "b"], {("B02", 0): _field()}, reader="t")
    with pytest.raises(KeyError, match="no field 3 in well B02"):
        plate.image("B2", 3)


def test_atomic_path_keeps_the_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_path_replaces_folders_and_refuses_overwrite_when_asked(tmp_path):
    target = tmp_path / "out.zarr"
    for content in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
    assert (target / "x").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    with pytest.raises(FileExistsError, match="out.zarr"), atomic_path(target, overwrite=False):
        pass
