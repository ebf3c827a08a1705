"""The plate mosaic: geometry, pixels and coordinates line up at every level."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from plate_concepts.plates.mosaic import PlateMosaic


@pytest.fixture
def fields_plate(plate_of):
    """``fields_plate({well: n_fields}, shape, n_wells)``: random pixels, a nucleus (id 7) at
    rows 10-19, columns 10-29 of every field."""

    def build(fields_per_well: dict[str, int], shape=(2, 60, 80), n_wells: int = 96):
        rng = np.random.default_rng(0)
        images, labels = {}, {}
        for well, n_fields in fields_per_well.items():
            for field in range(n_fields):
                images[(well, field)] = rng.integers(1, 1000, size=shape, dtype=np.uint16)
                label = np.zeros(shape[1:], dtype=np.uint32)
                label[10:20, 10:30] = 7
                labels[(well, field)] = {"nuclei": label}
        return plate_of(images, labels=labels, name="p", n_wells=n_wells, chunks=(1, 32, 32))

    return build


def test_field_pixels_sit_at_their_origin_and_map_back(fields_plate):
    plate = fields_plate({"B03": 3, "H12": 1, "A01": 2})
    mosaic = PlateMosaic(plate)
    level0 = mosaic.levels[0]
    assert level0.shape == (2, *mosaic.shape)
    for well in plate.wells:
        for field in plate.fields(well):
            oy, ox = mosaic.field_origin(well, field)
            expected = plate.image(well, field).compute()
            np.testing.assert_array_equal(level0[:, oy : oy + 60, ox : ox + 80].compute(), expected)
            # a pixel inside the field maps back to the same well, field and pixel
            hit = mosaic.locate(oy + 17.5, ox + 41.2)
            assert (hit.well, hit.field, hit.y, hit.x) == (well, field, 17, 41)
            assert mosaic.well_at(oy + 17, ox + 41) == well
            y0, x0, y1, x1 = mosaic.well_box(well)
            assert y0 <= oy < oy + 60 <= y1 and x0 <= ox < ox + 80 <= x1
            # The field grid's box: the well's box less the gap after it, holding every tile.
            gy0, gx0, gy1, gx1 = mosaic.field_grid_box(well)
            assert (gy0, gx0) == (y0, x0) and gy1 < y1 and gx1 < x1
            assert gy0 <= oy and oy + mosaic.tile_shape[0] <= gy1
            assert gx0 <= ox and ox + mosaic.tile_shape[1] <= gx1
    # 3 fields: a 2 x 2 grid of tiles, its edges on every level's pixel grid.
    assert mosaic.field_grid == (2, 2)
    assert mosaic.field_grid_shape == (2 * mosaic.tile_shape[0], 2 * mosaic.tile_shape[1])
    assert all(side % 2 ** (mosaic.n_levels - 1) == 0 for side in mosaic.field_grid_box("H12"))


def test_gaps_and_absent_wells_are_black_and_unmapped(fields_plate):
    plate = fields_plate({"B03": 1})
    mosaic = PlateMosaic(plate)
    oy, ox = mosaic.field_origin("B03", 0)
    assert mosaic.locate(oy + 60, ox) is None  # the gap below the field
    assert mosaic.locate(oy, ox + 80) is None  # a tile slot without a field
    assert mosaic.well_at(*mosaic.field_origin("C05", 0)) is None
    y0, x0, y1, x1 = mosaic.well_box("C05")
    assert not mosaic.levels[0][:, y0:y1, x0:x1].any().compute()
    assert mosaic.locate(-1, 5) is None and mosaic.locate(mosaic.shape[0], 0) is None


def test_levels_are_exact_halvings_aligned_with_level0(fields_plate):
    plate = fields_plate({"A01": 4, "P24": 4}, shape=(1, 300, 260), n_wells=384)
    mosaic = PlateMosaic(plate, min_size=1024)
    assert mosaic.n_levels >= 3
    for level, image in enumerate(mosaic.levels):
        assert image.shape[1:] == (mosaic.shape[0] // 2**level, mosaic.shape[1] // 2**level)
    level = mosaic.n_levels - 1
    factor = 2**level
    oy, ox = mosaic.field_origin("P24", 3)
    coarse = mosaic.levels[level][0, oy // factor : oy // factor + 300 // factor,
                                  ox // factor : ox // factor + 260 // factor].compute()
    full = plate.image("P24", 3).compute()[0].astype(float)
    expected = full[: 300 // factor * factor, : 260 // factor * factor]
    expected = expected.reshape(300 // factor, factor, 260 // factor, factor).mean(axis=(1, 3))
    np.testing.assert_allclose(coarse, expected.astype(np.uint16), atol=1)


def test_label_mosaic_keeps_ids(fields_plate):
    plate = fields_plate({"B03": 2})
    mosaic = PlateMosaic(plate)
    labels = mosaic.label_levels("nuclei")
    oy, ox = mosaic.field_origin("B03", 1)
    assert labels[0][oy + 15, ox + 20].compute() == 7
    assert set(np.unique(labels[-1].compute())) <= {0, 7}


def test_mosaic_is_lazy(fields_plate):
    plate = fields_plate({"A01": 1})
    mosaic = PlateMosaic(plate)
    assert isinstance(mosaic.levels[0], da.Array)
    with pytest.raises(KeyError):
        plate.image("A02")
