"""Plate formats and well-name spellings."""

from __future__ import annotations

import pytest

from plate_concepts.plates.geometry import (
    PlateFormat,
    canonical_well,
    parse_well,
    row_index,
    row_letters,
    well_name,
)


@pytest.mark.parametrize(
    ("n_wells", "rows", "columns"),
    [(6, 2, 3), (12, 3, 4), (24, 4, 6), (48, 6, 8), (96, 8, 12), (384, 16, 24), (1536, 32, 48)],
)
def test_standard_formats(n_wells, rows, columns):
    fmt = PlateFormat.from_n_wells(n_wells)
    assert (fmt.n_rows, fmt.n_columns, fmt.n_wells) == (rows, columns, n_wells)
    wells = fmt.wells()
    assert len(wells) == n_wells == len(set(wells))
    assert wells[-1] == well_name(rows - 1, columns - 1)


@pytest.mark.parametrize("spelling", ["B7", "B07", "b007", "r02c07", "R2C7", " B07 "])
def test_spellings_map_to_one_well(spelling):
    assert parse_well(spelling) == (1, 6)
    assert canonical_well(spelling) == "B07"


def test_every_well_of_a_1536_plate_round_trips_in_every_style():
    fmt = PlateFormat.from_n_wells(1536)
    for row in range(fmt.n_rows):
        for col in range(fmt.n_columns):
            for style in ("padded", "short", "rc"):
                assert parse_well(well_name(row, col, style)) == (row, col)
    assert well_name(31, 47) == "AF48"
    assert row_letters(26) == "AA" and row_index("af") == 31


def test_smallest_containing_format():
    assert PlateFormat.smallest_containing(["A1", "B3"]).n_wells == 6
    assert PlateFormat.smallest_containing(["H12"]).n_wells == 96
    assert PlateFormat.smallest_containing(["I01"]).n_wells == 384
    assert PlateFormat.smallest_containing(["AF48"]).n_wells == 1536


@pytest.mark.parametrize("bad", ["", "7B", "B", "B0", "r0c1", "well", "ZZ1", "B7x"])
def test_bad_well_names_are_named_in_the_error(bad):
    with pytest.raises(ValueError, match="well|row"):
        parse_well(bad)


def test_unknown_format_lists_the_standard_ones():
    with pytest.raises(ValueError, match="100 wells.*96"):
        PlateFormat.from_n_wells(100)
