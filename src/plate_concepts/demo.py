"""A synthetic Cell Painting-like plate whose ground truth is known.

The demo plate lets us prove that a dictionary finds *real* concepts: every well has a known
cell type, perturbation, penetrance and batch, and every cell is flagged as showing its well's
perturbation or not. Five channels are rendered as in Cell Painting:

========  ===============================================================================
DNA       nuclei: ellipses with chromatin texture, chromocentres, darker nucleoli
ER        a reticular network (zero crossings of band-passed noise) around the nucleus
RNA       bright nucleoli plus a granular, perinuclear cytoplasmic signal
AGP       cortical actin / plasma membrane at cell edges, stress fibres, a Golgi patch
Mito      a tubular network of short curved filaments in the cytoplasm
========  ===============================================================================

Cells are irregular (harmonically perturbed) ellipses that compete for pixels, so neighbours
meet along Voronoi-like borders; nuclei always win over cytoplasm. Images are blurred by a
Gaussian PSF, given out-of-focus haze, vignetting, shot noise (Poisson statistics, in its normal
approximation), Gaussian read noise and a camera offset, and stored as uint16.

Plate map (one row per well): two cell types in alternating columns ("epithelial-like": small,
round, packed; "fibroblast-like": large, elongated, aligned), two batches (first and second half
of the rows, different per-channel gain and offset), DMSO controls and four perturbations with
local, visible effects on an incomplete fraction (``penetrance``) of the cells of a well:

- ``nuclear-enlargement``: nuclei 1.5 x larger along each axis (2.25 x the area);
- ``mito-fragmentation``: punctate instead of tubular mitochondria;
- ``er-stress``: brighter (x 2.2), swollen ER reaching further from the nucleus;
- ``multinucleation``: two or three separate nuclei per cell, cells 1.25 x larger.

Conditions are assigned at random within each (batch, cell type) block, so labels are not
confounded with position, batch or cell type. Plates of 6..384 wells are supported: the wells
are the first ``n_wells`` (row by row) of the smallest standard plate that holds them; there are
max(16, n_wells // 6) DMSO wells, but never more than a third of the plate (so 16 from 48 wells
on, fewer below: 8 of 24, 2 of 6).

Pixels are generated on demand, one field at a time: each field's image and label images are
dask arrays backed by one delayed call, and a field depends only on (seed, well, field) and its
well's plate-map row, never on the order in which fields are computed.

Default plate: 96 wells x 2 fields of 512 x 512 px (0.65 µm/px), about 7,000 cells; 2 x 2 crops
of 256 px per field, 768 crops. EfficientNet-Lite0 on 2 CPU cores embeds 20-60 crops/s per channel,
so the 768 x 5 channel-crops take 64-192 s (about 1.6 min at 40 crops/s); 4 fields per well
would double that (2-6 min) and the generation time and disk size (about 1 GB) too. Generating and
writing the default plate takes a few minutes on 2 CPU cores; it is about 0.5 GB on disk.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries

from plate_concepts._io import atomic_path, replaceable_output
from plate_concepts._progress import ProgressLike, progress_ticker
from plate_concepts.plates.geometry import PlateFormat, parse_well
from plate_concepts.plates.model import FieldKey, Plate

__all__ = [
    "BATCHES",
    "CELL_TYPES",
    "CHANNELS",
    "CONTROL",
    "DEMO_VERSION",
    "PERTURBATIONS",
    "DemoParameters",
    "DemoPlate",
    "cached_demo_plate",
    "demo_cache_dir",
    "demo_plate_folder",
    "is_demo_folder",
    "make_demo_plate",
    "make_demo_platemap",
    "write_demo_plate",
]

DEMO_VERSION = 1
"""Version of the rendering; bump it whenever pixels or tables change (it keys the cache)."""

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
CHANNEL_COLORS = ("#0000FF", "#00FF00", "#FFFF00", "#FF0000", "#FF00FF")
CONTROL = "DMSO"
PERTURBATIONS = ("nuclear-enlargement", "mito-fragmentation", "er-stress", "multinucleation")
CELL_TYPES = ("epithelial-like", "fibroblast-like")
BATCHES = ("batch1", "batch2")
PIXEL_SIZE_UM = 0.65

ZARR_NAME = "demo_plate.zarr"
PLATEMAP_NAME = "platemap.csv"
GROUND_TRUTH_NAME = "ground_truth.parquet"
README_NAME = "README.md"
MARKER_NAME = "plate_concepts_demo.json"
_WRITER = "plate_concepts.demo.write_demo_plate"
"""Marks a folder written by :func:`write_demo_plate` (only such a folder is ever replaced)."""
CACHE_ENV_VAR = "PLATE_CONCEPTS_CACHE"

MIN_WELLS, MAX_WELLS = 6, 384
MIN_FIELD_SIZE = 128
PENETRANCE_RANGE = (0.5, 0.8)

# Batch effect: multiplicative gain on the signal and additive camera offset, per channel.
_BATCH_GAIN = {"batch1": (1.0, 1.0, 1.0, 1.0, 1.0), "batch2": (1.3, 0.8, 1.2, 0.75, 1.25)}
_BATCH_OFFSET = {"batch1": (0.0,) * 5, "batch2": (40.0, 15.0, 30.0, 10.0, 25.0)}
# Peak signal of each channel (camera counts above the offset, before gains).
_CHANNEL_SCALE = np.array([2600.0, 1000.0, 900.0, 1100.0, 1300.0], dtype=np.float32)
_CAMERA_OFFSET = 100.0
_READ_NOISE = 4.0
_COUNTS_PER_PHOTON = 2.0
_PSF_SIGMA = 1.0

# Independent random streams (SeedSequence entropy: seed, stream, then the stream's keys).
_PLATEMAP_STREAM, _WELL_STREAM, _LAYOUT_STREAM, _PIXEL_STREAM = 1, 2, 3, 4



@dataclass(frozen=True)
class _CellTypeModel:
    """Shape and texture of one cell type (lengths in pixels)."""

    cell_axes: tuple[float, float]  # semi-axes (major, minor) of the cell ellipse
    nucleus_axes: tuple[float, float]
    coverage: float  # summed cell-ellipse area / field area: sets the cell count
    spacing: float  # minimum distance between cell centres
    irregularity: float  # amplitude of the cell outline's harmonics
    orientation_spread: float  # std of cell angles around the field's direction (radians)
    aligned: bool  # False: orientations uniform at random
    stress_fibres: float  # AGP stress-fibre strength


_CELL_TYPE_MODELS = {
    "epithelial-like": _CellTypeModel(
        cell_axes=(27.0, 23.0), nucleus_axes=(12.0, 10.5), coverage=0.75, spacing=34.0,
        irregularity=0.07, orientation_spread=math.pi, aligned=False, stress_fibres=0.15,
    ),
    "fibroblast-like": _CellTypeModel(
        cell_axes=(60.0, 20.0), nucleus_axes=(14.0, 8.5), coverage=0.6, spacing=32.0,
        irregularity=0.13, orientation_spread=0.35, aligned=True, stress_fibres=0.9,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class DemoParameters:
    """Everything that determines a demo plate's pixels and tables."""

    n_wells: int = 96
    fields_per_well: int = 2
    field_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_wells", "fields_per_well", "field_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if not MIN_WELLS <= self.n_wells <= MAX_WELLS:
            raise ValueError(
                f"n_wells must be between {MIN_WELLS} and {MAX_WELLS}, got {self.n_wells}"
            )
        if self.fields_per_well < 1:
            raise ValueError(f"fields_per_well must be >= 1, got {self.fields_per_well}")
        if self.field_size < MIN_FIELD_SIZE:
            raise ValueError(
                f"field_size must be >= {MIN_FIELD_SIZE} px (cells are up to ~120 px long), "
                f"got {self.field_size}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def key(self) -> str:
        """A name that identifies these parameters and the rendering version (cache key)."""
        return (
            f"demo-v{DEMO_VERSION}-{self.n_wells}w-{self.fields_per_well}f-"
            f"{self.field_size}px-seed{self.seed}"
        )


@dataclass
class DemoPlate:
    """A demo plate: lazy images and labels, its plate map and the per-cell ground truth.

    ``plate.images[(well, field)]`` are single-chunk dask arrays that render the field when
    computed (the last few rendered fields are kept, so reading a field crop by crop renders it
    once); ``ground_truth`` has one row per labelled cell (``cell_id`` = its id in both the
    ``nuclei`` and the ``cells`` label image of its field).
    """

    plate: Plate
    platemap: pd.DataFrame
    ground_truth: pd.DataFrame
    parameters: DemoParameters


# -------------------------------------------------------------------------------------- plate map


def _plate_format(n_wells: int) -> PlateFormat:
    """The smallest standard plate with at least ``n_wells`` wells."""
    standard = (6, 12, 24, 48, 96, 384)
    return PlateFormat.from_n_wells(next(n for n in standard if n >= n_wells))


def _plate_wells(n_wells: int) -> list[str]:
    """The first ``n_wells`` wells, row by row, of the smallest standard plate holding them."""
    return _plate_format(n_wells).wells()[:n_wells]


def _n_controls(n_wells: int) -> int:
    return min(max(16, n_wells // 6), math.ceil(n_wells / 3))


def _largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def make_demo_platemap(n_wells: int = 96, seed: int = 0) -> pd.DataFrame:
    """The plate map of a demo plate: one row per well, indexed by well name (``B07``).

    Columns: ``cell_type``, ``perturbation``, ``penetrance`` (fraction of affected cells,
    0 for controls, 0.5..0.8 otherwise), ``batch``, ``is_control``. Cell types alternate by
    column, batches split the wells (row by row) in halves, and within each (batch, cell type)
    block the controls and the perturbations (as evenly as the block allows) are placed at
    random.
    """
    parameters = DemoParameters(n_wells=n_wells, seed=seed)
    rng = np.random.default_rng([parameters.seed, _PLATEMAP_STREAM])
    wells = _plate_wells(parameters.n_wells)
    half = math.ceil(len(wells) / 2)
    cell_type = {w: CELL_TYPES[parse_well(w)[1] % 2] for w in wells}
    batch = {w: BATCHES[0] if i < half else BATCHES[1] for i, w in enumerate(wells)}
    blocks: dict[tuple[str, str], list[str]] = {}
    for w in wells:
        blocks.setdefault((batch[w], cell_type[w]), []).append(w)
    block_keys = sorted(blocks)
    control_quota = _largest_remainder(
        _n_controls(len(wells)), [len(blocks[k]) for k in block_keys]
    )
    perturbation: dict[str, str] = {}
    next_perturbation = 0  # one cycle over all blocks keeps the plate-wide counts balanced
    for key, n_ctrl in zip(block_keys, control_quota, strict=True):
        block = blocks[key]
        conditions = [CONTROL] * n_ctrl
        for _ in range(len(block) - n_ctrl):
            conditions.append(PERTURBATIONS[next_perturbation % len(PERTURBATIONS)])
            next_perturbation += 1
        for w, condition in zip(block, rng.permutation(conditions), strict=True):
            perturbation[w] = str(condition)
    is_control = np.array([perturbation[w] == CONTROL for w in wells])
    penetrance = np.where(
        is_control, 0.0, np.round(rng.uniform(*PENETRANCE_RANGE, size=len(wells)), 2)
    )
    return pd.DataFrame(
        {
            "cell_type": [cell_type[w] for w in wells],
            "perturbation": [perturbation[w] for w in wells],
            "penetrance": penetrance,
            "batch": [batch[w] for w in wells],
            "is_control": is_control,
        },
        index=pd.Index(wells, name="well"),
    )


# ----------------------------------------------------------------------------------- cell layout


@dataclass
class _Layout:
    """Cells of one field: per-cell arrays (n,) or (n, k), and nuclei (m,) with their cell."""

    centre: np.ndarray  # (n, 2) y, x
    angle: np.ndarray  # (n,) radians, major axis from the x axis towards y
    axes: np.ndarray  # (n, 2) semi-axes (major, minor)
    harmonic_amplitude: np.ndarray  # (n, k)
    harmonic_phase: np.ndarray  # (n, k)
    affected: np.ndarray  # (n,) bool
    nucleus_cell: np.ndarray  # (m,) index of the cell each nucleus belongs to
    nucleus_centre: np.ndarray  # (m, 2)
    nucleus_axes: np.ndarray  # (m, 2)
    nucleus_angle: np.ndarray  # (m,)
    nucleus_harmonics: np.ndarray  # (m, 2) amplitudes of the 2nd and 3rd harmonics

    @property
    def n_cells(self) -> int:
        return len(self.centre)

    def subset(self, keep: np.ndarray) -> _Layout:
        """Only the cells ``keep`` (sorted indices), renumbered 0..len(keep)-1."""
        new_index = np.full(self.n_cells, -1)
        new_index[keep] = np.arange(len(keep))
        kept_nuclei = np.isin(self.nucleus_cell, keep)
        return _Layout(
            centre=self.centre[keep],
            angle=self.angle[keep],
            axes=self.axes[keep],
            harmonic_amplitude=self.harmonic_amplitude[keep],
            harmonic_phase=self.harmonic_phase[keep],
            affected=self.affected[keep],
            nucleus_cell=new_index[self.nucleus_cell[kept_nuclei]],
            nucleus_centre=self.nucleus_centre[kept_nuclei],
            nucleus_axes=self.nucleus_axes[kept_nuclei],
            nucleus_angle=self.nucleus_angle[kept_nuclei],
            nucleus_harmonics=self.nucleus_harmonics[kept_nuclei],
        )


def _cell_centres(
    rng: np.random.Generator, size: int, n_target: int, spacing: float
) -> np.ndarray:
    """Up to ``n_target`` random points in the field at least ``spacing`` apart (dart throwing)."""
    candidates = rng.uniform(0, size - 1, size=(6 * n_target, 2))
    accepted = np.empty((n_target, 2))
    n = 0
    for point in candidates:
        if n and np.min(np.sum((accepted[:n] - point) ** 2, axis=1)) < spacing**2:
            continue
        accepted[n] = point
        n += 1
        if n == n_target:
            break
    return accepted[:n]


def _layout_field(
    rng: np.random.Generator, size: int, cell_type: str, perturbation: str, penetrance: float
) -> _Layout:
    model = _CELL_TYPE_MODELS[cell_type]
    n_target = round(model.coverage * size * size / (math.pi * np.prod(model.cell_axes)))
    centre = _cell_centres(rng, size, max(n_target, 1), model.spacing)
    n = len(centre)
    if model.aligned:  # fibroblasts grow in aligned streams
        angle = rng.uniform(0, math.pi) + rng.normal(0, model.orientation_spread, n)
    else:
        angle = rng.uniform(0, 2 * math.pi, n)
    # A common size factor per cell, and a little independent variation per axis.
    axes = np.array(model.cell_axes) * rng.lognormal(0, 0.12, (n, 1))
    axes *= rng.lognormal(0, 0.06, (n, 2))
    n_harmonics = 5  # orders 1..5; order 1 makes a cell lopsided (a leading edge)
    harmonic_amplitude = model.irregularity * rng.uniform(0.3, 1.0, (n, n_harmonics))
    harmonic_amplitude /= np.arange(1, n_harmonics + 1) ** 0.5
    harmonic_phase = rng.uniform(0, 2 * math.pi, (n, n_harmonics))
    affected = rng.random(n) < penetrance
    nucleus_axes_1 = np.array(model.nucleus_axes) * rng.lognormal(0, 0.1, (n, 1))
    nucleus_axes_1 *= rng.lognormal(0, 0.05, (n, 2))
    nucleus_offset = rng.normal(0, 0.12, (n, 2)) * axes[:, [1]]  # slightly off-centre

    if perturbation == "nuclear-enlargement":
        nucleus_axes_1[affected] *= 1.5
    n_nuclei = np.ones(n, dtype=int)
    if perturbation == "multinucleation":
        n_nuclei[affected] = rng.integers(2, 4, size=int(affected.sum()))
        axes[affected] *= 1.25

    nucleus_cell = np.repeat(np.arange(n), n_nuclei)
    slot = np.concatenate([np.arange(k) for k in n_nuclei]) if n else np.zeros(0, int)
    per_nucleus_axes = nucleus_axes_1[nucleus_cell].copy()
    k = n_nuclei[nucleus_cell]
    per_nucleus_axes[k > 1] *= 0.75
    nucleus_harmonics = rng.uniform(0, 0.05, (len(nucleus_cell), 2))
    # Several nuclei sit on a circle whose radius keeps their bounding circles (major semi-axis
    # times the outline's largest stretch) 3 px apart: they never touch.
    bounding = per_nucleus_axes[:, 0] * (1 + nucleus_harmonics.sum(axis=1))
    chord = 2 * bounding + 3.0
    radius = np.where(k > 1, chord / (2 * np.sin(np.pi / np.maximum(k, 2))), 0.0)
    turn = rng.uniform(0, 2 * math.pi, n)[nucleus_cell] + 2 * math.pi * slot / k
    offset = radius[:, None] * np.stack([np.sin(turn), np.cos(turn)], axis=1)
    nucleus_centre = centre[nucleus_cell] + nucleus_offset[nucleus_cell] + offset
    cell_angle = angle[nucleus_cell]
    nucleus_angle = cell_angle + rng.normal(0, 0.25, len(nucleus_cell))
    return _Layout(
        centre=centre,
        angle=angle,
        axes=axes,
        harmonic_amplitude=harmonic_amplitude,
        harmonic_phase=harmonic_phase,
        affected=affected,
        nucleus_cell=nucleus_cell,
        nucleus_centre=nucleus_centre,
        nucleus_axes=per_nucleus_axes,
        nucleus_angle=nucleus_angle,
        nucleus_harmonics=nucleus_harmonics,
    )


# -------------------------------------------------------------------------------------- geometry


@dataclass
class _Geometry:
    """Label images and the per-pixel coordinates the channels are painted from."""

    cells: np.ndarray  # (y, x) int32: cell id = layout index + 1, 0 = background
    nuclei: np.ndarray  # (y, x) int32: the id of the cell whose nucleus covers the pixel
    radial: np.ndarray  # (y, x) 0 at the cell centre .. 1 at its outline (cytoplasm only)
    nuclear_radial: np.ndarray  # (y, x) 0 at a nucleus centre .. 1 at its edge (inf outside)
    across: np.ndarray  # (y, x) distance from the cell's major axis, px


def _ellipse_frame(
    yy: np.ndarray, xx: np.ndarray, centre: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) an ellipse's major axis."""
    dy, dx = yy - centre[0], xx - centre[1]
    cos, sin = math.cos(angle), math.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _irregular_radius(
    u: np.ndarray, v: np.ndarray, axes: np.ndarray, harmonics: np.ndarray
) -> np.ndarray:
    """Normalised radius of an ellipse whose outline is 1 + sum_k Re(c_k e^(i k phi)): < 1 inside.

    ``harmonics`` are the complex coefficients c_1, c_2, ...; the powers of e^(i phi) come from
    repeated multiplication (Horner), which is much cheaper than arctan2 and cosines.
    """
    p, q = u / axes[0], v / axes[1]
    radius = np.hypot(p, q)
    direction = (p + 1j * q) / np.maximum(radius, 1e-6)
    series = np.zeros_like(direction)
    for coefficient in harmonics[::-1]:
        series = (series + coefficient) * direction
    return radius / (1 + series.real)


def _render_geometry(layout: _Layout, size: int) -> _Geometry:
    """Each pixel goes to the cell with the smallest normalised radius; nuclei always win."""
    score = np.full((size, size), np.inf, dtype=np.float32)
    owner = np.zeros((size, size), dtype=np.int32)
    radial = np.zeros((size, size), dtype=np.float32)
    nuclear_radial = np.full((size, size), np.inf, dtype=np.float32)
    across = np.zeros((size, size), dtype=np.float32)
    cell_harmonics = layout.harmonic_amplitude * np.exp(1j * layout.harmonic_phase)
    nucleus_harmonics = np.concatenate(
        [np.zeros((len(layout.nucleus_cell), 1)), layout.nucleus_harmonics], axis=1
    ) * np.exp(1j * np.arange(3) * np.arange(len(layout.nucleus_cell))[:, None])
    nuclei_of = [np.flatnonzero(layout.nucleus_cell == i) for i in range(layout.n_cells)]
    for i in range(layout.n_cells):
        a, b = layout.axes[i]
        cos, sin = abs(math.cos(layout.angle[i])), abs(math.sin(layout.angle[i]))
        stretch = 1 + layout.harmonic_amplitude[i].sum()
        half_y = math.hypot(a * sin, b * cos) * stretch + 2  # bounding box of the rotated shape
        half_x = math.hypot(a * cos, b * sin) * stretch + 2
        cy, cx = layout.centre[i]
        y0, y1 = max(int(cy - half_y), 0), min(int(cy + half_y) + 2, size)
        x0, x1 = max(int(cx - half_x), 0), min(int(cx + half_x) + 2, size)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :]
        u, v = _ellipse_frame(yy, xx, layout.centre[i], layout.angle[i])
        cell_radial = _irregular_radius(u, v, layout.axes[i], cell_harmonics[i])
        nucleus_radial = np.full(cell_radial.shape, np.inf, dtype=np.float32)
        for j in nuclei_of[i]:
            nu, nv = _ellipse_frame(yy, xx, layout.nucleus_centre[j], layout.nucleus_angle[j])
            nucleus_radial = np.minimum(
                nucleus_radial,
                _irregular_radius(nu, nv, layout.nucleus_axes[j], nucleus_harmonics[j]),
            )
        in_nucleus = nucleus_radial < 1
        cell_score = np.where(in_nucleus, nucleus_radial - 1, cell_radial)
        box = np.s_[y0:y1, x0:x1]
        wins = (cell_score < 1) & (cell_score < score[box])
        score[box][wins] = cell_score[wins]
        owner[box][wins] = i + 1
        radial[box][wins] = np.minimum(cell_radial[wins], 1)
        nuclear_radial[box][wins] = nucleus_radial[wins]
        across[box][wins] = v[wins]
    nuclei = np.where(nuclear_radial < 1, owner, 0).astype(np.int32)
    return _Geometry(owner, nuclei, radial, nuclear_radial, across)


def _field_geometry(layout: _Layout, size: int) -> tuple[_Layout, _Geometry]:
    """Render the labels, dropping cells left without any nucleus pixel in the field."""
    geometry = _render_geometry(layout, size)
    has_nucleus = np.bincount(geometry.nuclei.ravel(), minlength=layout.n_cells + 1)[1:] > 0
    if not has_nucleus.all():
        layout = layout.subset(np.flatnonzero(has_nucleus))
        geometry = _render_geometry(layout, size)
    return layout, geometry


# -------------------------------------------------------------------------------------- channels


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    white = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(white, sigma, truncate=3.0)
    return noise / max(float(noise.std()), 1e-6)


def _sample_pixels(
    rng: np.random.Generator, labels: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Random pixels (flat indices, with replacement) of each label: ``counts[i]`` of label i + 1.

    Returns the flat indices and, for each, the label index i (0-based). Labels without
    pixels get none.
    """
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    order = np.argsort(flat[where], kind="stable")
    where = where[order]
    per_label = np.bincount(flat[where] - 1, minlength=len(counts))[: len(counts)]
    start = np.concatenate([[0], np.cumsum(per_label)[:-1]])
    counts = np.where(per_label > 0, counts, 0)
    which = np.repeat(np.arange(len(counts)), counts)
    offsets = np.floor(rng.random(len(which)) * per_label[which]).astype(np.int64)
    return where[start[which] + offsets], which


def _splat(
    size: int, points_y: np.ndarray, points_x: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Add point weights onto a (size, size) canvas (points outside are dropped)."""
    iy, ix = np.rint(points_y).astype(np.int64), np.rint(points_x).astype(np.int64)
    inside = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
    flat = iy[inside] * size + ix[inside]
    canvas = np.bincount(flat, weights=weights[inside], minlength=size * size)
    return canvas.reshape(size, size).astype(np.float32)


def _render_channels(
    rng: np.random.Generator,
    layout: _Layout,
    geometry: _Geometry,
    cell_type: str,
    perturbation: str,
) -> np.ndarray:
    """Noise-free signal (5, y, x) float32 in units of each channel's peak (about 0..1)."""
    model = _CELL_TYPE_MODELS[cell_type]
    size = geometry.cells.shape[0]
    shape = (size, size)
    n = layout.n_cells
    owner = geometry.cells
    in_cell = owner > 0
    in_nucleus = geometry.nuclei > 0
    cytoplasm = in_cell & ~in_nucleus
    cell_index = np.maximum(owner - 1, 0)  # lookup into per-cell arrays (masked by in_cell)

    def per_cell(values: np.ndarray) -> np.ndarray:
        return np.where(in_cell, values[cell_index], 0).astype(np.float32)

    affected = layout.affected
    brightness = rng.lognormal(0, 0.15, (n, 5)).astype(np.float32)  # cell-to-cell variation
    dna_content = np.where(rng.random(n) < 0.12, 1.6, 1.0)  # some cells in G2: twice the DNA
    distance_to_nucleus = ndimage.distance_transform_edt(~in_nucleus).astype(np.float32)

    # DNA: domed nuclei with chromatin texture, bright chromocentres and darker nucleoli.
    nucleolus_area = np.where(in_nucleus & (geometry.nuclear_radial < 0.55), owner, 0)
    n_nucleoli = rng.integers(1, 5, n) * np.bincount(layout.nucleus_cell, minlength=n)
    where, _ = _sample_pixels(rng, nucleolus_area, n_nucleoli)
    nucleoli = _splat(size, *np.unravel_index(where, shape), rng.uniform(0.6, 1.0, len(where)))
    nucleoli = ndimage.gaussian_filter(nucleoli, 1.6) * (2 * math.pi * 1.6**2)
    nucleoli = np.minimum(nucleoli, 1.5)
    where, _ = _sample_pixels(rng, geometry.nuclei, np.full(n, 6))
    chromocentres = _splat(size, *np.unravel_index(where, shape), rng.uniform(0.3, 0.8, len(where)))
    chromocentres = ndimage.gaussian_filter(chromocentres, 1.0) * (2 * math.pi)
    dome = np.sqrt(np.clip(1 - np.minimum(geometry.nuclear_radial, 1) ** 2, 0, 1)) ** 0.5
    chromatin = 1 + 0.25 * _smooth_noise(rng, shape, 1.0) + 0.2 * _smooth_noise(rng, shape, 3.0)
    dna = in_nucleus * (0.55 * dome * chromatin + 0.5 * chromocentres)
    dna *= 1 - 0.55 * np.minimum(nucleoli, 1)
    dna *= per_cell(brightness[:, 0] * dna_content)

    # ER: a network of thin tubules (near-zero values of band-passed noise) thinning out away
    # from the nucleus; under ER stress brighter, swollen (wider tubules) and reaching further.
    stressed = affected & (perturbation == "er-stress")
    band = _smooth_noise(rng, shape, 1.3) - 0.8 * _smooth_noise(rng, shape, 2.6)
    band /= band.std()
    tubule_width = per_cell(np.where(stressed, 0.75, 0.35))
    reticulum = np.exp(-((band / np.maximum(tubule_width, 1e-3)) ** 2))
    reach = per_cell(np.where(stressed, 2.0, 1.0) * layout.axes[:, 1] * 0.55)
    perinuclear = np.exp(-distance_to_nucleus / np.maximum(reach, 1))
    envelope = np.exp(-(((geometry.nuclear_radial - 1) / 0.08) ** 2)) * in_nucleus
    er = cytoplasm * (0.2 + 0.8 * reticulum) * (0.25 + 0.75 * perinuclear) + 0.5 * envelope
    er *= per_cell(brightness[:, 1] * np.where(stressed, 2.2, 1.0))

    # RNA: nucleoli, a weak nucleoplasm and granular perinuclear cytoplasm.
    granules = np.clip(1 + 0.35 * _smooth_noise(rng, shape, 2.0), 0, None)
    rna_cytoplasm = cytoplasm * granules * (0.12 + 0.3 * np.exp(-distance_to_nucleus / 12))
    rna = (1.1 * nucleoli + 0.15 * in_nucleus + rna_cytoplasm) * per_cell(brightness[:, 2])

    # AGP: cortical actin / membrane at cell edges, stress fibres along the major axis, Golgi.
    membrane = find_boundaries(owner, connectivity=1, mode="inner").astype(np.float32)
    membrane = ndimage.gaussian_filter(membrane, 0.7) * 2.0
    fibre_period = per_cell(rng.uniform(3.5, 5.0, n))
    fibre_phase = per_cell(rng.uniform(0, 2 * math.pi, n))
    # Stress fibres: parallel lines along the major axis, wavy and broken up by smooth noise.
    wobble = 1.2 * _smooth_noise(rng, shape, 8.0)
    stripes = np.cos(
        2 * math.pi * geometry.across / np.maximum(fibre_period, 1) + fibre_phase + wobble
    )
    fibres = (0.5 + 0.5 * stripes) ** 8 * np.clip(_smooth_noise(rng, shape, 5.0) + 0.3, 0, None)
    golgi_angle = rng.uniform(0, 2 * math.pi, n)
    first_nucleus = np.searchsorted(layout.nucleus_cell, np.arange(n))
    golgi_distance = layout.nucleus_axes[first_nucleus, 0] + 4
    golgi_centre = layout.nucleus_centre[first_nucleus] + golgi_distance[:, None] * np.stack(
        [np.sin(golgi_angle), np.cos(golgi_angle)], 1
    )
    golgi_cell = np.repeat(np.arange(n), 6)
    golgi_y = golgi_centre[golgi_cell, 0] + rng.normal(0, 2.0, 6 * n)
    golgi_x = golgi_centre[golgi_cell, 1] + rng.normal(0, 2.0, 6 * n)
    golgi_iy = np.clip(np.rint(golgi_y).astype(np.int64), 0, size - 1)
    golgi_ix = np.clip(np.rint(golgi_x).astype(np.int64), 0, size - 1)
    in_own_cytoplasm = cytoplasm[golgi_iy, golgi_ix] & (owner[golgi_iy, golgi_ix] == golgi_cell + 1)
    golgi = _splat(size, golgi_y, golgi_x, in_own_cytoplasm.astype(np.float64))
    golgi = ndimage.gaussian_filter(golgi, 1.5) * 4.0
    agp = (
        membrane * 0.8
        + cytoplasm * (0.12 + model.stress_fibres * 0.6 * fibres)
        + 0.6 * np.minimum(golgi, 1.2)
    )
    agp = in_cell * agp * per_cell(brightness[:, 3])

    mito = _render_mito(rng, layout, geometry, cytoplasm, distance_to_nucleus, perturbation)
    mito *= per_cell(brightness[:, 4])

    return np.stack([dna, er, rna, agp, mito]).astype(np.float32)


def _render_mito(
    rng: np.random.Generator,
    layout: _Layout,
    geometry: _Geometry,
    cytoplasm: np.ndarray,
    distance_to_nucleus: np.ndarray,
    perturbation: str,
) -> np.ndarray:
    """Short curved tubules (random walks) in the cytoplasm; fragmented cells get puncta."""
    size = geometry.cells.shape[0]
    n = layout.n_cells
    fragmented = layout.affected & (perturbation == "mito-fragmentation")
    cytoplasm_labels = np.where(cytoplasm, geometry.cells, 0)
    area = np.bincount(cytoplasm_labels.ravel(), minlength=n + 1)[1 : n + 1]
    n_objects = np.round(area / np.where(fragmented, 22.0, 45.0)).astype(np.int64)
    where, cell = _sample_pixels(rng, cytoplasm_labels, 2 * n_objects)
    # Mitochondria crowd around the nucleus: keep a sample with a probability falling with distance.
    keep = rng.random(len(where)) < np.exp(-distance_to_nucleus.ravel()[where] / 25)
    where, cell = where[keep], cell[keep]
    m = len(where)
    max_steps = 16
    punctate = fragmented[cell]
    n_steps = np.where(punctate, rng.integers(0, 2, m), rng.integers(5, max_steps + 1, m))
    step = np.where(punctate, 0.7, 1.0)
    heading = rng.uniform(0, 2 * math.pi, m)[:, None] + np.cumsum(
        rng.normal(0, 0.3, (m, max_steps)), axis=1
    )
    start_y, start_x = np.unravel_index(where, (size, size))
    walk_y = start_y[:, None] + np.cumsum(step[:, None] * np.sin(heading), axis=1)
    walk_x = start_x[:, None] + np.cumsum(step[:, None] * np.cos(heading), axis=1)
    points_y = np.concatenate([start_y[:, None], walk_y], axis=1)
    points_x = np.concatenate([start_x[:, None], walk_x], axis=1)
    on_walk = np.arange(max_steps + 1)[None, :] <= n_steps[:, None]
    weight = np.where(punctate, 1.6, 1.0) * rng.uniform(0.7, 1.3, m)
    weights = np.where(on_walk, weight[:, None], 0.0)
    # A tubule stops at its cell's border and never enters a nucleus.
    iy = np.clip(np.rint(points_y).astype(np.int64), 0, size - 1)
    ix = np.clip(np.rint(points_x).astype(np.int64), 0, size - 1)
    weights = weights * (cytoplasm_labels[iy, ix] == (cell + 1)[:, None])
    canvas = _splat(size, points_y.ravel(), points_x.ravel(), weights.ravel())
    return ndimage.gaussian_filter(canvas, 0.8) * 2.2


def _camera(
    rng: np.random.Generator, signal: np.ndarray, batch: str, well_gain: np.ndarray
) -> np.ndarray:
    """Blur, haze, vignetting, batch gain/offset, shot and read noise -> uint16 counts.

    Shot noise uses the normal approximation of the Poisson distribution (variance = mean, in
    photons), accurate at the >= 10 photons every pixel receives here and 4 x faster.
    """
    size = signal.shape[-1]
    blurred = ndimage.gaussian_filter(signal, (0, _PSF_SIGMA, _PSF_SIGMA))
    haze = ndimage.gaussian_filter(signal, (0, 6, 6), truncate=2.0)  # out-of-focus light
    centred = (np.arange(size, dtype=np.float32) - size / 2) ** 2
    vignette = 1 - 0.2 * (centred[:, None] + centred[None, :]) / np.float32(size**2 / 2)
    gain = np.asarray(_BATCH_GAIN[batch], np.float32) * well_gain
    scale = (_CHANNEL_SCALE * gain / _COUNTS_PER_PHOTON)[:, None, None]
    photons = (blurred + 0.25 * haze + 0.03) * scale * vignette
    np.maximum(photons, 0, out=photons)
    photons += np.sqrt(photons) * rng.standard_normal(photons.shape, dtype=np.float32)
    offset = _CAMERA_OFFSET + np.asarray(_BATCH_OFFSET[batch], np.float32)
    pixels = photons * np.float32(_COUNTS_PER_PHOTON) + offset[:, None, None]
    pixels += _READ_NOISE * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(pixels), 0, np.iinfo(np.uint16).max).astype(np.uint16)


# ------------------------------------------------------------------------------------- rendering


@dataclass
class _RenderedField:
    image: np.ndarray  # (5, y, x) uint16
    cells: np.ndarray
    nuclei: np.ndarray


def _cell_table(
    key: FieldKey, layout: _Layout, geometry: _Geometry, well_row: pd.Series
) -> pd.DataFrame:
    """Ground truth of one field, measured on its label images."""
    n = layout.n_cells
    size = geometry.cells.shape[0]
    flat_cells = geometry.cells.ravel()
    cell_area = np.bincount(flat_cells, minlength=n + 1)[1:]
    nucleus_area = np.bincount(geometry.nuclei.ravel(), minlength=n + 1)[1:]
    yy, xx = np.indices((size, size))
    centroid_y = np.bincount(flat_cells, weights=yy.ravel(), minlength=n + 1)[1:] / cell_area
    centroid_x = np.bincount(flat_cells, weights=xx.ravel(), minlength=n + 1)[1:] / cell_area
    # Separate nuclei of a cell are separate connected components of its id.
    components = connected_components(geometry.nuclei, background=0, connectivity=1)
    _, first_pixel = np.unique(components.ravel(), return_index=True)
    component_cell = geometry.nuclei.ravel()[first_pixel]
    n_nuclei = np.bincount(component_cell[component_cell > 0], minlength=n + 1)[1:]
    edge = np.concatenate(
        [geometry.cells[0], geometry.cells[-1], geometry.cells[:, 0], geometry.cells[:, -1]]
    )
    touches_border = np.isin(np.arange(1, n + 1), edge)
    perturbation = str(well_row["perturbation"])
    return pd.DataFrame(
        {
            "well": key[0],
            "field": key[1],
            "cell_id": np.arange(1, n + 1, dtype=np.int32),
            "cell_type": str(well_row["cell_type"]),
            "perturbation": perturbation,
            "affected": layout.affected & (perturbation != CONTROL),
            "centroid_y": centroid_y,
            "centroid_x": centroid_x,
            "nucleus_area": nucleus_area,
            "cell_area": cell_area,
            "n_nuclei": n_nuclei,
            "touches_border": touches_border,
        }
    )


class _FieldRenderer:
    """Renders fields on demand; keeps the last few (image and labels are separate dask arrays,
    computed one after the other by writers) and every field's ground-truth table."""

    cache_size = 3

    def __init__(self, parameters: DemoParameters, platemap: pd.DataFrame) -> None:
        self.parameters = parameters
        self.platemap = platemap
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[FieldKey, threading.Lock] = {}
        self._cache: OrderedDict[FieldKey, _RenderedField] = OrderedDict()
        self._tables: dict[FieldKey, pd.DataFrame] = {}

    # Locks and caches stay behind when the renderer travels to another process (dask workers).
    def __getstate__(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "platemap": self.platemap}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    def _rng(self, stream: int, well: str, field: int | None = None) -> np.random.Generator:
        row, column = parse_well(well)
        keys = [self.parameters.seed, stream, row, column]
        return np.random.default_rng(keys if field is None else [*keys, field])

    def _layout_and_geometry(self, key: FieldKey) -> tuple[_Layout, _Geometry, pd.Series]:
        well, field = key
        row = self.platemap.loc[well]
        layout = _layout_field(
            self._rng(_LAYOUT_STREAM, well, field),
            self.parameters.field_size,
            str(row["cell_type"]),
            str(row["perturbation"]),
            float(row["penetrance"]),
        )
        layout, geometry = _field_geometry(layout, self.parameters.field_size)
        return layout, geometry, row

    def field(self, key: FieldKey) -> _RenderedField:
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one render per field even if several threads ask at once
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            layout, geometry, row = self._layout_and_geometry(key)
            well_gain = self._rng(_WELL_STREAM, key[0]).lognormal(0, 0.04, 5).astype(np.float32)
            rng = self._rng(_PIXEL_STREAM, *key)
            signal = _render_channels(
                rng, layout, geometry, str(row["cell_type"]), str(row["perturbation"])
            )
            image = _camera(rng, signal, str(row["batch"]), well_gain)
            rendered = _RenderedField(image, geometry.cells, geometry.nuclei)
            table = _cell_table(key, layout, geometry, row)
            with self._lock:
                self._tables[key] = table
                self._cache[key] = rendered
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return rendered

    def image(self, key: FieldKey) -> np.ndarray:
        return self.field(key).image

    def label(self, key: FieldKey, name: str) -> np.ndarray:
        return getattr(self.field(key), name)

    def table(self, key: FieldKey) -> pd.DataFrame:
        """The ground truth of a field; renders only its labels if the field was not rendered."""
        with self._lock:
            if key in self._tables:
                return self._tables[key]
        layout, geometry, row = self._layout_and_geometry(key)
        table = _cell_table(key, layout, geometry, row)
        with self._lock:
            self._tables[key] = table
        return table


def _field_keys(parameters: DemoParameters, platemap: pd.DataFrame) -> list[FieldKey]:
    return [(w, f) for w in platemap.index for f in range(parameters.fields_per_well)]


def _lazy_plate(renderer: _FieldRenderer) -> Plate:
    """A Plate whose images and labels are dask arrays, one delayed render per field."""
    parameters = renderer.parameters
    size = parameters.field_size
    images: dict[FieldKey, list[da.Array]] = {}
    labels: dict[FieldKey, dict[str, list[da.Array]]] = {}
    for key in _field_keys(parameters, renderer.platemap):
        name = f"{parameters.key}-{key[0]}-{key[1]}"
        image = dask.delayed(renderer.image, pure=True)(key, dask_key_name=f"render-{name}")
        images[key] = [
            da.from_delayed(image, (len(CHANNELS), size, size), np.uint16, name=f"image-{name}")
        ]
        labels[key] = {}
        for label_name in ("cells", "nuclei"):
            value = dask.delayed(renderer.label, pure=True)(
                key, label_name, dask_key_name=f"render-{label_name}-{name}"
            )
            labels[key][label_name] = [
                da.from_delayed(value, (size, size), np.int32, name=f"{label_name}-{name}")
            ]
    return Plate(
        name=f"demo plate (seed {parameters.seed})",
        channels=list(CHANNELS),
        images=images,
        reader="demo",
        source=parameters.key,
        plate_format=_plate_format(parameters.n_wells),
        labels=labels,
        platemap=renderer.platemap.copy(),
        pixel_size_um=PIXEL_SIZE_UM,
        channel_colors=list(CHANNEL_COLORS),
    )


def _ground_truth(
    renderer: _FieldRenderer, progress: ProgressLike | None = None
) -> pd.DataFrame:
    keys = _field_keys(renderer.parameters, renderer.platemap)
    tables = []
    with progress_ticker(progress, len(keys), "demo plate ground truth", "field") as tick:
        for done, key in enumerate(keys, start=1):
            tables.append(renderer.table(key))
            tick(done)
    return pd.concat(tables, ignore_index=True)


# ------------------------------------------------------------------------------------ public API


def make_demo_plate(
    n_wells: int = 96,
    fields_per_well: int = 2,
    field_size: int = 512,
    seed: int = 0,
    progress: ProgressLike | None = None,
) -> DemoPlate:
    """Build the demo plate: lazy pixels, its plate map and the per-cell ground truth.

    Only the label images are rendered here (for the ground-truth table, one field at a time);
    a field's pixels are rendered when its dask array is computed. Same arguments, same pixels
    and tables.

    Parameters
    ----------
    n_wells
        6..384: the first ``n_wells`` wells, row by row, of the smallest standard plate.
    fields_per_well, field_size
        Fields (images) per well and their side in pixels (>= 128).
    seed
        Seeds the plate map, the cells and the noise.
    progress
        Progress of the ground-truth pass, per field: True (tqdm), a tqdm-like object or a
        callable ``progress(fields_done, fields_total)``.
    """
    parameters = DemoParameters(n_wells, fields_per_well, field_size, seed)
    renderer = _FieldRenderer(parameters, make_demo_platemap(n_wells, seed))
    return DemoPlate(
        plate=_lazy_plate(renderer),
        platemap=renderer.platemap.copy(),
        ground_truth=_ground_truth(renderer, progress),
        parameters=parameters,
    )


def write_demo_plate(
    out_dir: str | os.PathLike,
    n_wells: int = 96,
    fields_per_well: int = 2,
    field_size: int = 512,
    seed: int = 0,
    overwrite: bool = False,
    progress: ProgressLike | None = None,
) -> Path:
    """Write the demo plate into the folder ``out_dir`` and return that folder.

    The folder holds ``demo_plate.zarr`` (OME-Zarr HCS, NGFF 0.5, with ``nuclei`` and ``cells``
    label images and the plate map), ``platemap.csv``, ``ground_truth.parquet`` (one row per
    cell) and ``README.md``. Fields are rendered and written one at a time (``progress`` is
    called per field), into a hidden sibling folder renamed onto ``out_dir`` when complete.

    A marker file (``plate_concepts_demo.json``) says the folder is a demo plate this package
    wrote: ``overwrite`` replaces such a folder (or an empty one), never anything else.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists and ``overwrite`` is False, or it is not a demo plate folder.
    """
    from plate_concepts.plates.omezarr import write_ome_zarr_plate

    parameters = DemoParameters(n_wells, fields_per_well, field_size, seed)
    destination = replaceable_output(out_dir, "demo-folder", overwrite=overwrite)
    renderer = _FieldRenderer(parameters, make_demo_platemap(n_wells, seed))
    plate = _lazy_plate(renderer)
    with atomic_path(destination, overwrite=overwrite, kind="demo-folder") as tmp:
        tmp.mkdir()
        (tmp / MARKER_NAME).write_text(json.dumps(_marker(parameters), indent=2))
        # The threaded scheduler keeps the renderer's cache shared by image and label arrays.
        with dask.config.set(scheduler="threads"):
            write_ome_zarr_plate(plate, tmp / ZARR_NAME, ngff_version="0.5", progress=progress)
        ground_truth = _ground_truth(renderer)  # tables were recorded while writing
        renderer.platemap.to_csv(tmp / PLATEMAP_NAME)
        ground_truth.to_parquet(tmp / GROUND_TRUTH_NAME, index=False)
        (tmp / README_NAME).write_text(_readme(parameters, renderer.platemap, ground_truth))
    return destination


def demo_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where demo plates are cached: ``cache_dir`` if given, else ``$PLATE_CONCEPTS_CACHE``,
    else the user cache folder (platformdirs) or ``~/.cache/napari-plate-concepts``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "napari-plate-concepts"
    return Path(user_cache_dir("napari-plate-concepts", appauthor=False))


def demo_plate_folder(
    cache_dir: str | os.PathLike | None = None,
    n_wells: int = 96,
    fields_per_well: int = 2,
    field_size: int = 512,
    seed: int = 0,
) -> Path:
    """Where :func:`cached_demo_plate` keeps the demo plate of these parameters (it may not be
    written yet): ``<demo_cache_dir>/demo-v1-96w-2f-512px-seed0`` for the defaults."""
    parameters = DemoParameters(n_wells, fields_per_well, field_size, seed)
    return demo_cache_dir(cache_dir) / parameters.key


def cached_demo_plate(
    cache_dir: str | os.PathLike | None = None,
    n_wells: int = 96,
    fields_per_well: int = 2,
    field_size: int = 512,
    seed: int = 0,
    progress: ProgressLike | None = None,
) -> Path:
    """The folder of a demo plate written on first use and reused afterwards.

    It lies under :func:`demo_cache_dir`, named after the parameters and :data:`DEMO_VERSION`
    (``demo-v1-96w-2f-512px-seed0``); the plate itself is ``<folder>/demo_plate.zarr``.
    """
    folder = demo_plate_folder(cache_dir, n_wells, fields_per_well, field_size, seed)
    if _is_complete(folder):
        return folder
    try:
        # A folder that is there but incomplete was tampered with: rebuild it.
        write_demo_plate(
            folder, n_wells, fields_per_well, field_size, seed,
            overwrite=folder.exists(), progress=progress,
        )  # fmt: skip
    except OSError:
        if not _is_complete(folder):  # not another process that finished first
            raise
    return folder


def is_demo_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`write_demo_plate` (its marker file, or the
    README that versions before the marker wrote)."""
    path = Path(path)
    marker = path / MARKER_NAME
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("written_by") == _WRITER
        except (ValueError, AttributeError, OSError):
            return False
    readme = path / README_NAME
    try:
        return readme.is_file() and f"Written by `{_WRITER}`" in readme.read_text()
    except (OSError, UnicodeDecodeError):
        return False


def _marker(parameters: DemoParameters) -> dict[str, Any]:
    return {
        "written_by": _WRITER,
        "demo_version": DEMO_VERSION,
        "parameters": {
            "n_wells": parameters.n_wells,
            "fields_per_well": parameters.fields_per_well,
            "field_size": parameters.field_size,
            "seed": parameters.seed,
        },
    }


def _is_complete(folder: Path) -> bool:
    names = (ZARR_NAME, PLATEMAP_NAME, GROUND_TRUTH_NAME, README_NAME)
    return all((folder / name).exists() for name in names)


def _readme(parameters: DemoParameters, platemap: pd.DataFrame, ground_truth: pd.DataFrame) -> str:
    counts = platemap.groupby(["perturbation", "cell_type"]).size().unstack(fill_value=0)
    crops_per_side = parameters.field_size // 256
    n_fields = len(platemap) * parameters.fields_per_well
    gains = "\n".join(
        f"| {b} | {', '.join(f'{g:g}' for g in _BATCH_GAIN[b])} | "
        f"{', '.join(f'{o:g}' for o in _BATCH_OFFSET[b])} |"
        for b in BATCHES
    )
    return f"""# Demo plate (synthetic Cell Painting-like, known ground truth)

Written by `{_WRITER}` (demo version {DEMO_VERSION}).

- {parameters.n_wells} wells, {parameters.fields_per_well} fields per well, \
{parameters.field_size} x {parameters.field_size} px per field ({PIXEL_SIZE_UM} µm/px), \
seed {parameters.seed}
- {len(ground_truth)} cells in {n_fields} fields; {n_fields * crops_per_side**2} crops of \
256 x 256 px

## Files
- `{ZARR_NAME}`: OME-Zarr HCS (NGFF 0.5), channels {", ".join(CHANNELS)} (uint16, camera offset
  {_CAMERA_OFFSET:g}), label images `nuclei` and `cells` per field (the same id for a cell and its
  nucleus/nuclei), the plate map in the `plate_concepts` attributes.
- `{PLATEMAP_NAME}`: one row per well: cell_type, perturbation, penetrance, batch, is_control.
- `{MARKER_NAME}`: marks this folder as a demo plate written by plate-concepts (`--overwrite`
  replaces only such a folder).
- `{GROUND_TRUTH_NAME}`: one row per cell: well, field, cell_id, cell_type, perturbation,
  affected, centroid_y, centroid_x, nucleus_area, cell_area (px, measured on the label images),
  n_nuclei (separate nuclei in the field), touches_border.

## Design
- Cell types alternate by column: epithelial-like (small, round, packed), fibroblast-like
  (large, elongated, aligned, stress fibres).
- Perturbations act on an incomplete fraction of a well's cells (`penetrance`, 0.5-0.8;
  `affected` in the ground truth): nuclear-enlargement (nuclei 1.5 x per axis),
  mito-fragmentation (puncta instead of tubules), er-stress (ER 2.2 x brighter, swollen, reaching
  further), multinucleation (2-3 nuclei, cells 1.25 x larger). {CONTROL} wells are controls.
- Batches split the wells (row by row) in halves; per-channel signal gain and camera offset:

| batch | gain ({", ".join(CHANNELS)}) | offset |
|---|---|---|
{gains}

- Conditions are placed at random within each (batch, cell type) block. Wells per condition:

```
{counts.to_string()}
```
"""
