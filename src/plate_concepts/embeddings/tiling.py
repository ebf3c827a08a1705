"""Cutting plate fields into square crops: where the crops go, which hold cells, and how their
intensities are scaled for a model.

Crop positions (:func:`tile_field`). Along each axis crops start at 0, ``stride``, 2 ``stride``,
... as long as they fit. When the regular crops do not reach the far border, one more crop is
added flush with it (shifted inwards, so it overlaps its neighbour): every pixel of the field is
covered and every crop has the full size, which a model trained on one crop size needs. With
``stride == crop_size`` and a field that is a multiple of the crop size, every pixel lies in
exactly one crop. ``drop_edge=True`` then drops every crop that touches the field's border, as
the publication did (the 36 non-edge 256-px crops of a 2048-px image): edge crops hold cells cut
by the field border and vignetted illumination.

Foreground (:func:`foreground_fraction`): the fraction of each crop covered by nuclei, from an
Otsu threshold of the nuclear channel on a downsampled field; crops below ``min_foreground``
can be skipped (empty background says nothing about a perturbation). Otsu always splits a field
in two, so a field without any cell still gets "foreground" from its noise; pass a fixed
``threshold`` when whole fields may be empty.

Intensities (:class:`IntensityNormalizer`): per channel, the ``low`` and ``high`` percentiles
map to 0 and 1, values are clipped to [0, 1] and returned as float32. ``scope="plate"`` takes
the percentiles once per plate from a random sample of fields (so intensity differences between
wells survive, which is often the biology); ``scope="field"`` takes them per field (removes
field-to-field illumination and staining drift, and with it any real difference in brightness).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from skimage.filters import threshold_otsu
from skimage.transform import downscale_local_mean

if TYPE_CHECKING:
    from plate_concepts.plates.model import Plate

NUCLEAR_CHANNEL_PATTERN = re.compile(r"dna|dapi|hoechst|nucle", re.IGNORECASE)
"""Channel names taken for the nuclear stain when none is named (DNA, OrigDNA, DAPI, Hoechst...)."""


# ---------------------------------------------------------------------- crop positions
@dataclass(frozen=True)
class CropGrid:
    """The square crops of one field: ``positions[i] = (crop_y, crop_x)``, top-left corners."""

    shape: tuple[int, int]
    crop_size: int
    stride: int
    drop_edge: bool
    positions: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for y, x in self.positions:
            yield int(y), int(x)

    def slices(self, index: int) -> tuple[slice, slice]:
        """(rows, columns) slices of crop ``index`` in the field."""
        y, x = (int(v) for v in self.positions[index])
        return slice(y, y + self.crop_size), slice(x, x + self.crop_size)

    def cut(self, image: np.ndarray, indices: Sequence[int] | None = None) -> np.ndarray:
        """The crops of a (..., Y, X) image as an (n, ..., crop, crop) array (a copy)."""
        if tuple(image.shape[-2:]) != self.shape:
            raise ValueError(f"image of shape {image.shape} does not match the grid's field {self.shape}")
        chosen = range(len(self)) if indices is None else indices
        size = self.crop_size
        out = np.empty((len(chosen), *image.shape[:-2], size, size), dtype=image.dtype)
        for k, i in enumerate(chosen):
            rows, cols = self.slices(int(i))
            out[k] = image[..., rows, cols]
        return out

    def coverage(self) -> np.ndarray:
        """How many crops cover each pixel of the field (a (Y, X) int array)."""
        counts = np.zeros(self.shape, dtype=np.int32)
        for i in range(len(self)):
            counts[self.slices(i)] += 1
        return counts


def axis_starts(length: int, crop_size: int, stride: int) -> list[int]:
    """Crop starts along one axis: 0, stride, ... while they fit, then one flush with the end
    if the regular crops stop short of it."""
    starts = list(range(0, length - crop_size + 1, stride))
    if starts[-1] + crop_size < length:
        starts.append(length - crop_size)
    return starts


def tile_field(
    shape: Sequence[int],
    crop_size: int = 256,
    drop_edge: bool = False,
    stride: int | None = None,
) -> CropGrid:
    """Crop positions covering a field of ``shape`` = (Y, X) (or (C, Y, X)); see the module
    docstring for the rule. ``stride`` defaults to ``crop_size`` (adjacent crops)."""
    if len(shape) < 2:
        raise ValueError(f"field shape {tuple(shape)} needs at least (y, x)")
    height, width = int(shape[-2]), int(shape[-1])
    crop_size = _positive(crop_size, "crop_size")
    stride = crop_size if stride is None else _positive(stride, "stride")
    if crop_size > height or crop_size > width:
        raise ValueError(
            f"crop size {crop_size} is larger than the field ({height} x {width} px); "
            "choose a crop size of at most the field's smaller side"
        )
    ys, xs = axis_starts(height, crop_size, stride), axis_starts(width, crop_size, stride)
    if drop_edge:
        ys = [y for y in ys if 0 < y and y + crop_size < height]
        xs = [x for x in xs if 0 < x and x + crop_size < width]
        if not ys or not xs:
            raise ValueError(
                f"drop_edge=True leaves no crop of {crop_size} px in a {height} x {width} px field "
                "(every crop touches the border); use a smaller crop size or drop_edge=False"
            )
    positions = np.array([(y, x) for y in ys for x in xs], dtype=np.int64).reshape(-1, 2)
    return CropGrid((height, width), crop_size, stride, bool(drop_edge), positions)


# ---------------------------------------------------------------------- foreground
def nuclear_channel(channels: Sequence[str], channel: str | int | None = None) -> int:
    """Index of the nuclear channel: ``channel`` as an index or a name (any case), or, when
    ``None``, the first channel whose name contains DNA, DAPI, Hoechst or 'nucle'."""
    if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
        if not 0 <= channel < len(channels):
            raise ValueError(f"channel index {channel} out of range for the channels {list(channels)}")
        return int(channel)
    if channel is not None:
        lowered = [str(c).lower() for c in channels]
        if str(channel).lower() not in lowered:
            raise ValueError(f"no channel named {channel!r}; the channels are {list(channels)}")
        return lowered.index(str(channel).lower())
    for index, name in enumerate(channels):
        if NUCLEAR_CHANNEL_PATTERN.search(str(name)):
            return index
    raise ValueError(
        f"no nuclear channel among {list(channels)} (looked for DNA, DAPI, Hoechst); "
        "name it with nuclear_channel=<name or index>"
    )


def foreground_mask(plane: np.ndarray, downsample: int = 4, threshold: float | None = None) -> np.ndarray:
    """Boolean foreground of a (Y, X) plane at 1/``downsample`` resolution: pixels above Otsu's
    threshold of the downsampled plane (or above a fixed ``threshold``)."""
    small = downscale_local_mean(np.asarray(plane, dtype=np.float32), (downsample, downsample))
    if threshold is None:
        if small.min() == small.max():  # a constant plane has no foreground
            return np.zeros(small.shape, dtype=bool)
        threshold = float(threshold_otsu(small))
    return small > threshold


def foreground_fraction(
    plane: np.ndarray,
    grid: CropGrid,
    downsample: int = 4,
    threshold: float | None = None,
) -> np.ndarray:
    """Fraction of each crop of ``grid`` that is foreground in a (Y, X) nuclear-channel plane."""
    if tuple(plane.shape) != grid.shape:
        raise ValueError(f"plane of shape {plane.shape} does not match the grid's field {grid.shape}")
    downsample = _positive(downsample, "downsample")
    mask = foreground_mask(plane, downsample, threshold)
    # Summed-area table: the foreground count of any rectangle in four look-ups.
    table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    fractions = np.empty(len(grid), dtype=np.float64)
    for i, (y, x) in enumerate(grid):
        y0, x0 = y // downsample, x // downsample
        y1 = max(min(math.ceil((y + grid.crop_size) / downsample), mask.shape[0]), y0 + 1)
        x1 = max(min(math.ceil((x + grid.crop_size) / downsample), mask.shape[1]), x0 + 1)
        count = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        fractions[i] = count / ((y1 - y0) * (x1 - x0))
    return fractions


# ---------------------------------------------------------------------- intensities
@dataclass
class IntensityNormalizer:
    """Per-channel percentile scaling to [0, 1] float32 (see the module docstring).

    Parameters
    ----------
    low, high
        Percentiles (0-100) mapped to 0 and 1.
    scope
        ``"plate"``: percentiles of a sample of the plate's fields, fitted by :meth:`fit`;
        ``"field"``: percentiles of each field, computed when it is normalised.
    sample_fields
        Fields drawn (without replacement, seeded) for a plate fit.
    pixels_per_field
        Pixels per channel drawn from each sampled field (all if the field is smaller).
    seed
        Seed of the field and pixel draws.
    levels
        The fitted (C, 2) low/high intensities of a plate fit; ``None`` until fitted.
    """

    low: float = 0.1
    high: float = 99.9
    scope: Literal["plate", "field"] = "plate"
    sample_fields: int = 8
    pixels_per_field: int = 2**18
    seed: int = 0
    levels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(
                f"percentiles must satisfy 0 <= low < high <= 100, got low={self.low}, high={self.high}"
            )
        if self.scope not in ("plate", "field"):
            raise ValueError(f"scope must be 'plate' or 'field', got {self.scope!r}")
        _positive(self.sample_fields, "sample_fields")
        _positive(self.pixels_per_field, "pixels_per_field")
        if self.levels is not None:
            self.levels = np.asarray(self.levels, dtype=np.float64)
            if self.levels.ndim != 2 or self.levels.shape[1] != 2:
                raise ValueError(f"levels must have shape (channels, 2), got {self.levels.shape}")

    @property
    def is_fitted(self) -> bool:
        return self.scope == "field" or self.levels is not None

    def fit(self, plate: Plate) -> IntensityNormalizer:
        """Fit plate-scope levels on a seeded sample of fields, read one field at a time.
        (A no-op for ``scope="field"``.)"""
        if self.scope == "field":
            return self
        rng = np.random.default_rng(self.seed)
        keys = sorted(plate.images)
        chosen = rng.choice(len(keys), size=min(self.sample_fields, len(keys)), replace=False)
        samples = []
        for index in sorted(chosen):
            well, field_index = keys[index]
            image = np.asarray(plate.image(well, field_index).compute())
            pixels = image.reshape(image.shape[0], -1)
            if pixels.shape[1] > self.pixels_per_field:
                pixels = pixels[:, rng.choice(pixels.shape[1], self.pixels_per_field, replace=False)]
            samples.append(pixels.astype(np.float32))
        self.levels = self._percentiles(np.concatenate(samples, axis=1))
        return self

    def _percentiles(self, pixels: np.ndarray) -> np.ndarray:
        """(C, 2) low/high percentiles of (C, n) pixels."""
        return np.percentile(pixels, [self.low, self.high], axis=1).T.astype(np.float64)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """A (C, Y, X) (or (C, ...)) image scaled to [0, 1] float32."""
        image = np.asarray(image)
        if self.scope == "field":
            levels = self._percentiles(image.reshape(image.shape[0], -1))
        elif self.levels is None:
            raise RuntimeError("this plate-scope IntensityNormalizer is not fitted; call .fit(plate) first")
        else:
            levels = self.levels
        if len(levels) != image.shape[0]:
            raise ValueError(
                f"the normaliser has levels for {len(levels)} channels, the image has {image.shape[0]}"
            )
        low = levels[:, 0].reshape(-1, *([1] * (image.ndim - 1))).astype(np.float32)
        span = (levels[:, 1] - levels[:, 0]).reshape(low.shape).astype(np.float32)
        # A constant channel (span 0) maps to 0 rather than dividing by zero.
        scale = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)
        out = (image.astype(np.float32) - low) * scale
        return np.clip(out, 0.0, 1.0, out=out)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record (for provenance); :meth:`from_record` rebuilds the normaliser."""
        return {
            "method": "percentile",
            "low": self.low,
            "high": self.high,
            "scope": self.scope,
            "sample_fields": self.sample_fields,
            "pixels_per_field": self.pixels_per_field,
            "seed": self.seed,
            "levels": None if self.levels is None else self.levels.tolist(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> IntensityNormalizer:
        if record.get("method") != "percentile":
            raise ValueError(f"not a percentile normalisation record: {record!r}")
        fields = ("low", "high", "scope", "sample_fields", "pixels_per_field", "seed", "levels")
        return cls(**{name: record[name] for name in fields if name in record})

    def same_settings(self, other: IntensityNormalizer) -> bool:
        """True when both were configured alike (levels aside)."""
        mine, theirs = self.describe(), other.describe()
        return all(mine[k] == theirs[k] for k in mine if k != "levels")


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
