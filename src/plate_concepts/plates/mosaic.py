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
        #: (height, width) of a well's grid of field tiles, without the gap after the well.
        self.field_grid_shape = (
            self.tile_shape[0] * self.field_grid[0],
            self.tile_shape[1] * self.field_grid[1],
        )
        self.well_shape = (
            _round_up(self.field_grid_shape[0] + self.well_gap, step),
            _round_up(self.field_grid_shape[1] + self.well_gap, step),
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

    def field_grid_box(self, well: str) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of the area a well's field tiles cover, level-0 pixels (its box
        without the gap after it). Edges are multiples of 2**(n_levels-1): exact at every level."""
        y0, x0, _, _ = self.well_box(well)
        return y0, x0, y0 + self.field_grid_shape[0], x0 + self.field_grid_shape[1]

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
        y, x = math.floor(y), math.floor(x)
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
        """One lazy (C, H, W) level with one chunk per field tile (and thin chunks for the gaps
        after each well's tiles): the graph has one task per chunk, which fills its tile from the
        field's image or with zeros. (Padding and concatenating dask arrays field by field made
        a 384-well plate's graph take seconds to build.)"""
        factor = 2**level
        tile = (self.tile_shape[0] // factor, self.tile_shape[1] // factor)
        well_shape = (self.well_shape[0] // factor, self.well_shape[1] // factor)
        fmt = self.plate.plate_format
        axes = [  # per axis: chunk sizes, and for each chunk (well index, grid index or None)
            _axis_chunks(fmt.n_rows, self.field_grid[0], tile[0], well_shape[0]),  # type: ignore[union-attr]
            _axis_chunks(fmt.n_columns, self.field_grid[1], tile[1], well_shape[1]),  # type: ignore[union-attr]
        ]
        present = set(self.plate.wells)
        grid_columns = self.field_grid[1]

        def fill(block_info: dict | None = None) -> np.ndarray:
            info = block_info[None]
            _, row_chunk, col_chunk = info["chunk-location"]
            shape = info["chunk-shape"]
            out = np.zeros(shape, dtype=dtype)
            (well_row, grid_row), (well_col, grid_col) = axes[0][1][row_chunk], axes[1][1][col_chunk]
            well = well_name(well_row, well_col)
            if grid_row is None or grid_col is None or well not in present:
                return out
            image = get_field(well, grid_row * grid_columns + grid_col, level)
            if image is not None:
                pixels = np.asarray(image)[:, : shape[1], : shape[2]]
                out[:, : pixels.shape[1], : pixels.shape[2]] = pixels
            return out

        return da.map_blocks(
            fill, dtype=dtype, chunks=((n_channels,), axes[0][0], axes[1][0]), meta=np.empty((0, 0, 0), dtype)
        )


def _axis_chunks(n_wells: int, grid: int, tile: int, well_size: int) -> tuple[tuple[int, ...], list]:
    """Chunk sizes along one mosaic axis (each well: ``grid`` tiles, then its gap) and, per
    chunk, (well index, grid index), the grid index None for a gap."""
    chunks, where = [], []
    for well_index in range(n_wells):
        for grid_index in range(grid):
            chunks.append(tile)
            where.append((well_index, grid_index))
        chunks.append(well_size - tile * grid)
        where.append((well_index, None))
    return tuple(chunks), where


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
