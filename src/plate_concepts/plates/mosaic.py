"""The plate mosaic: one lazy, multiscale image of the whole plate, and its coordinates.

Fields are tiled in a near-square grid inside each well, wells sit on the plate's row/column
grid with a gap between them, and absent wells stay black. Every field occupies a tile of the
same padded size, chosen divisible by 2**(n_levels-1), so level l is exactly level 0 scaled by
1/2**l and a (well, field, pixel) position maps to the same place at every level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np

from plate_concepts.plates.geometry import parse_well, well_name
from plate_concepts.plates.model import Plate


@dataclass(frozen=True)
class MosaicHit:
    """A mosaic pixel resolved to the field it shows (``y``, ``x`` in full-resolution field pixels)."""

    well: str
    field: int
    y: int
    x: int


class PlateMosaic:
    """Lazy multiscale mosaic of a plate; coordinates are level-0 (full-resolution) pixels.

    Parameters
    ----------
    plate : the plate to tile.
    well_gap : pixels (level 0) between neighbouring wells; default a tenth of a field.
    field_gap : pixels between fields inside a well; default 1/50 of a field.
    min_size : levels are added until the mosaic's longer side is at most this (>= 1 level).
    """

    def __init__(
        self,
        plate: Plate,
        well_gap: int | None = None,
        field_gap: int | None = None,
        min_size: int = 2048,
    ) -> None:
        self.plate = plate
        field_y, field_x = plate.image_shape
        self.well_gap = max(1, field_x // 10) if well_gap is None else int(well_gap)
        self.field_gap = max(1, field_x // 50) if field_gap is None else int(field_gap)
        n_fields = max(plate.fields_per_well.values())
        self.field_grid = (math.ceil(n_fields / math.ceil(math.sqrt(n_fields))), math.ceil(math.sqrt(n_fields)))

        rows, cols = plate.plate_format.n_rows, plate.plate_format.n_columns  # type: ignore[union-attr]
        # Choose the number of levels on the unpadded size, then pad tiles to a multiple of 2**(L-1).
        approx = max(rows * (field_y * self.field_grid[0] + self.well_gap),
                     cols * (field_x * self.field_grid[1] + self.well_gap))
        self.n_levels = max(1, math.ceil(math.log2(max(approx / min_size, 1))) + 1)
        step = 2 ** (self.n_levels - 1)
        self.tile_shape = (
            _round_up(field_y + self.field_gap, step),
            _round_up(field_x + self.field_gap, step),
        )
        self.well_shape = (
            _round_up(self.tile_shape[0] * self.field_grid[0] + self.well_gap, step),
            _round_up(self.tile_shape[1] * self.field_grid[1] + self.well_gap, step),
        )
        self.shape = (rows * self.well_shape[0], cols * self.well_shape[1])
        self._levels: list[da.Array] | None = None
        self._label_levels: dict[str, list[da.Array]] = {}

    # ----- coordinates (level 0) -------------------------------------------------------------
    def well_box(self, well: str) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a well's area (fields and the gap after them), level-0 pixels."""
        row, col = parse_well(well)
        y0, x0 = row * self.well_shape[0], col * self.well_shape[1]
        return y0, x0, y0 + self.well_shape[0], x0 + self.well_shape[1]

    def field_origin(self, well: str, field: int) -> tuple[int, int]:
        """Level-0 mosaic position of pixel (0, 0) of a field."""
        y0, x0, _, _ = self.well_box(well)
        grid_row, grid_col = divmod(int(field), self.field_grid[1])
        return y0 + grid_row * self.tile_shape[0], x0 + grid_col * self.tile_shape[1]

    def to_mosaic(self, well: str, field: int, y: float, x: float) -> tuple[float, float]:
        """Field pixel -> level-0 mosaic pixel."""
        oy, ox = self.field_origin(well, field)
        return oy + y, ox + x

    def locate(self, y: float, x: float) -> MosaicHit | None:
        """Level-0 mosaic pixel -> the (well, field, field pixel) shown there, or None on a gap,
        an empty grid slot, an absent well or outside the plate."""
        y, x = int(math.floor(y)), int(math.floor(x))
        if not (0 <= y < self.shape[0] and 0 <= x < self.shape[1]):
            return None
        row, wy = divmod(y, self.well_shape[0])
        col, wx = divmod(x, self.well_shape[1])
        grid_row, fy = divmod(wy, self.tile_shape[0])
        grid_col, fx = divmod(wx, self.tile_shape[1])
        if grid_row >= self.field_grid[0] or grid_col >= self.field_grid[1]:
            return None
        well = well_name(row, col)
        field = grid_row * self.field_grid[1] + grid_col
        field_y, field_x = self.plate.image_shape
        if fy >= field_y or fx >= field_x or field not in self.plate.fields(well):
            return None
        return MosaicHit(well, field, fy, fx)

    def well_at(self, y: float, x: float) -> str | None:
        """The well whose area holds a level-0 mosaic pixel (gaps included), or None."""
        if not (0 <= y < self.shape[0] and 0 <= x < self.shape[1]):
            return None
        well = well_name(int(y // self.well_shape[0]), int(x // self.well_shape[1]))
        return well if well in self.plate.wells else None

    # ----- pixels -------------------------------------------------------------------------------
    @property
    def levels(self) -> list[da.Array]:
        """Multiscale mosaic, each (C, H, W), level l downsampled by 2**l; built lazily once."""
        if self._levels is None:
            self._levels = [self._assemble(self._field_level, level, self.plate.dtype, len(self.plate.channels))
                            for level in range(self.n_levels)]
        return self._levels

    def label_levels(self, name: str) -> list[da.Array]:
        """Multiscale mosaic (H, W) of one label image; label ids are kept (nearest neighbour),
        fields without that label image are 0."""
        if name not in self._label_levels:
            def field_labels(well: str, field: int, level: int) -> da.Array | None:
                levels = self.plate.labels.get((well, field), {}).get(name)
                return None if levels is None else _downsample(levels, level, labels=True)[None]
            dtype = next(lv[name][0].dtype for lv in self.plate.labels.values() if name in lv)
            self._label_levels[name] = [self._assemble(field_labels, level, dtype, 1)[0]
                                        for level in range(self.n_levels)]
        return self._label_levels[name]

    def _field_level(self, well: str, field: int, level: int) -> da.Array | None:
        if field not in self.plate.fields(well):
            return None
        return _downsample(self.plate.images[(well, field)], level, labels=False)

    def _assemble(self, get_field, level: int, dtype: np.dtype, n_channels: int) -> da.Array:
        factor = 2**level
        tile = (self.tile_shape[0] // factor, self.tile_shape[1] // factor)
        well_shape = (self.well_shape[0] // factor, self.well_shape[1] // factor)
        fmt = self.plate.plate_format
        present = set(self.plate.wells)
        plate_rows = []
        for row in range(fmt.n_rows):  # type: ignore[union-attr]
            row_blocks = []
            for col in range(fmt.n_columns):  # type: ignore[union-attr]
                well = well_name(row, col)
                if well not in present:
                    row_blocks.append(da.zeros((n_channels, *well_shape), dtype=dtype, chunks=(n_channels, *tile)))
                    continue
                grid_rows = []
                for grid_row in range(self.field_grid[0]):
                    grid_cols = []
                    for grid_col in range(self.field_grid[1]):
                        image = get_field(well, grid_row * self.field_grid[1] + grid_col, level)
                        grid_cols.append(_pad_to(image, tile, n_channels, dtype))
                    grid_rows.append(da.concatenate(grid_cols, axis=2))
                well_image = da.concatenate(grid_rows, axis=1)
                row_blocks.append(_pad_to(well_image, well_shape, n_channels, dtype))
            plate_rows.append(da.concatenate(row_blocks, axis=2))
        return da.concatenate(plate_rows, axis=1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _downsample(levels: list[da.Array], level: int, labels: bool) -> da.Array:
    """Level ``level`` (factor 2**level) of a field: the stored pyramid level when it has the
    expected size, else computed lazily from full resolution (mean for images, stride for labels)."""
    factor = 2**level
    full = levels[0]
    expected = tuple(s // factor for s in full.shape[-2:])
    if level < len(levels) and all(a >= b for a, b in zip(levels[level].shape[-2:], expected)):
        return levels[level][..., : expected[0], : expected[1]]
    if labels:
        return full[..., ::factor, ::factor][..., : expected[0], : expected[1]]
    axes = {full.ndim - 2: factor, full.ndim - 1: factor}
    return da.coarsen(np.mean, full, axes, trim_excess=True).astype(full.dtype)


def _pad_to(image: da.Array | None, shape: tuple[int, int], n_channels: int, dtype: np.dtype) -> da.Array:
    if image is None:
        return da.zeros((n_channels, *shape), dtype=dtype, chunks=(n_channels, *shape))
    pad_y, pad_x = shape[0] - image.shape[-2], shape[1] - image.shape[-1]
    if pad_y < 0 or pad_x < 0:
        image = image[..., : shape[0], : shape[1]]
        pad_y, pad_x = max(pad_y, 0), max(pad_x, 0)
    if pad_y == 0 and pad_x == 0:
        return image
    return da.pad(image, ((0, 0), (0, pad_y), (0, pad_x)), mode="constant", constant_values=0)
