"""Feature activations read back on tokens, patches, fields, wells and cells (method.md,
"Activation maps").

Pure functions over a fitted dictionary estimator (:class:`~plate_concepts.dictionary.ICFL` or
:class:`~plate_concepts.dictionary.TopKSAE`), sparse codes and plain arrays; the
:class:`~plate_concepts.analysis.explorer.FeatureExplorer` caches and combines them.

Geometry of the maps (our choice, where the publication is silent):

- A crop's token grid (gh, gw) covers its crop_size x crop_size pixels evenly; token (i, j) is
  centred at pixel ((i + 0.5) * crop_size / gh, ...) of the crop (pixel-edge coordinates).
- An output pixel of :func:`field_activation_map` takes the value of the token grid sampled at
  the pixel's centre, by bilinear interpolation between token centres (``order=1``, flat beyond
  the outermost token centres, as ``skimage.transform.resize(order=1, mode="edge")``) or from the
  nearest token (``order=0``). Bilinear is the default: it is what the publication's overlays
  look like, and it never invents values outside the range of neighbouring tokens.
- A downsampled output of shape (H, W) spans the whole field: its pixel (r, c) covers field
  pixels [r * Y/H, (r+1) * Y/H) x [c * X/W, (c+1) * X/W). To show it over the full-resolution
  field in napari use :func:`layer_transform` (scale Y/H, X/W and a half-pixel shift).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from plate_concepts.analysis.metrics import codes_matrix
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.plates.geometry import parse_well

ProgressLike = Callable[[int, int], Any]
CropMap = tuple[int, int, int, np.ndarray]
"""(crop_y, crop_x, crop_size, map (gh, gw)) of one crop."""


# ---------------------------------------------------------------------- tokens and wells
@dataclass
class WellAggregates:
    """Codes aggregated per well: ``mean_activation`` (mean code, inactive = 0) and
    ``fraction_active`` (fraction of the well's tokens where the feature is non-zero), both
    (n_wells, n_features) float32; ``n_tokens`` (n_wells,) tokens per well."""

    wells: list[str]
    mean_activation: np.ndarray
    fraction_active: np.ndarray
    n_tokens: np.ndarray

    def index(self, well: str) -> int:
        try:
            return self.wells.index(well)
        except ValueError:
            raise KeyError(
                f"well {well!r} has no tokens (wells with tokens: {', '.join(self.wells[:12])}"
                f"{', ...' if len(self.wells) > 12 else ''})"
            ) from None


def _well_order(names: Sequence[str]) -> list[str]:
    """Wells row by row ('B02' before 'B10' before 'C01'); plain sort when not all are wells."""
    try:
        return sorted(names, key=parse_well)
    except (ValueError, TypeError):
        return sorted(names, key=str)


def well_aggregates(codes: SparseCodes | sparse.sparray, wells: Any) -> WellAggregates:
    """Mean activation and fraction of active tokens of every feature in every well.

    ``codes``: SparseCodes or their :func:`codes_matrix`. Computed from the active
    (token, feature) entries with ``np.bincount`` over (well, feature) keys; no tokens x features
    dense matrix is built (memory: n_wells x n_features).
    """
    matrix = codes if sparse.issparse(codes) else codes_matrix(codes)
    n, m = matrix.shape
    wells = np.asarray(wells, dtype=object)
    if wells.shape != (n,):
        raise ValueError(
            f"wells must hold one well name per token, shape ({n},), got {wells.shape}"
        )
    if n == 0:
        raise ValueError("no tokens to aggregate")
    order = _well_order([str(w) for w in pd.unique(wells)])
    position = {w: i for i, w in enumerate(order)}
    well_of_token = np.fromiter((position[str(w)] for w in wells), dtype=np.int64, count=n)
    n_wells = len(order)

    coo = sparse.coo_array(matrix)
    keys = well_of_token[coo.row] * m + coo.col
    sums = np.bincount(keys, weights=coo.data.astype(np.float64), minlength=n_wells * m).reshape(
        n_wells, m
    )
    active = np.bincount(keys, minlength=n_wells * m).reshape(n_wells, m)
    n_tokens = np.bincount(well_of_token, minlength=n_wells)
    return WellAggregates(
        wells=order,
        mean_activation=(sums / n_tokens[:, None]).astype(np.float32),
        fraction_active=(active / n_tokens[:, None]).astype(np.float32),
        n_tokens=n_tokens,
    )


def crop_feature_values(codes: SparseCodes, feature: int) -> np.ndarray:
    """(n,) float32 code of ``feature`` on every token (0 where it is inactive)."""
    feature = check_feature(feature, codes.n_features)
    hit = codes.indices == feature
    return (codes.values * hit).sum(dim=1).detach().cpu().numpy().astype(np.float32)


def top_tokens(codes: SparseCodes, feature: int, n: int = 16) -> np.ndarray:
    """Row indices of the (at most) ``n`` tokens with the largest ``feature`` code, largest
    first; only tokens where the feature is active (non-zero) are returned."""
    values = crop_feature_values(codes, feature)
    return _top_rows(values, n)


def _top_rows(values: np.ndarray, n: int) -> np.ndarray:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    active = np.flatnonzero(values != 0)
    order = np.argsort(-values[active], kind="stable")[:n]  # ties: lower row first
    return active[order]


def check_feature(feature: Any, n_features: int) -> int:
    """``feature`` as an int in [0, n_features), or a clear error."""
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)):
        raise TypeError(f"feature must be an integer index, got {feature!r}")
    if not 0 <= int(feature) < n_features:
        raise IndexError(
            f"feature {feature} is out of range: the dictionary has {n_features} features"
        )
    return int(feature)


# ---------------------------------------------------------------------- patch maps
def preprocess_patches(estimator: Any, patch_tokens: Any, batches: Any = None) -> np.ndarray:
    """Raw patch tokens (..., gh, gw, d) -> pre-processed (..., gh, gw, d') float32, with the
    dictionary's saved transform (control centring, whitening, unit norm).

    ``batches`` (``"pca-batch"`` dictionaries only): one label for all patches, or one per grid
    (the leading dimensions).
    """
    patches = np.asarray(patch_tokens, dtype=np.float32)
    if patches.ndim < 3:
        raise ValueError(f"patch tokens must have shape (..., gh, gw, dim), got {patches.shape}")
    lead, per_grid = patches.shape[:-3], patches.shape[-3] * patches.shape[-2]
    flat = patches.reshape(-1, patches.shape[-1])
    labels = None
    if batches is not None:
        labels = np.asarray(batches, dtype=object)  # raw: the whitening normalises them
        if labels.ndim == 0:
            labels = np.full(len(flat), labels.item(), dtype=object)
        elif labels.shape == lead:
            labels = np.repeat(labels.ravel(), per_grid)
        else:
            raise ValueError(
                f"batches must be one label or one per grid {lead}, got shape {labels.shape}"
            )
    pre = estimator.preprocess(flat, labels) if labels is not None else estimator.preprocess(flat)
    return pre.reshape(*patches.shape[:-1], pre.shape[-1])


def feature_direction(estimator: Any, feature: int) -> np.ndarray:
    """The feature's direction (decoder row, pre-processed space) as a float32 unit vector."""
    decoder = estimator.model_.decoder  # (n_features, dim); avoids copying all of components_
    feature = check_feature(feature, decoder.shape[0])
    row = decoder[feature].detach().cpu().numpy().astype(np.float32)
    norm = float(np.linalg.norm(row))
    return row / norm if norm > 0 else row


def cosine_map(preprocessed: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pre-processed token (..., d) with ``direction`` (d,)."""
    norms = np.linalg.norm(preprocessed, axis=-1)
    dots = preprocessed @ (direction / max(float(np.linalg.norm(direction)), 1e-12))
    return np.where(norms > 1e-8, dots / np.maximum(norms, 1e-8), 0.0).astype(np.float32)


def encode_patches(estimator: Any, preprocessed: np.ndarray) -> SparseCodes:
    """Codes of pre-processed patch tokens (..., d), flattened to (n_patches, k)."""
    return estimator.encode(preprocessed.reshape(-1, preprocessed.shape[-1]))


def patch_feature_map(
    estimator: Any,
    patch_tokens: Any,
    feature: int,
    mode: Literal["cosine", "code"] = "cosine",
    *,
    batches: Any = None,
) -> np.ndarray:
    """(..., gh, gw) float32 map of one feature over raw patch tokens (..., gh, gw, d).

    ``"cosine"``: cosine similarity of each pre-processed patch token with the feature's
    direction (the publication's heatmaps; in [-1, 1]). ``"code"``: encode each pre-processed
    patch token with the dictionary and read the feature's code (0 where inactive).
    """
    if mode not in ("cosine", "code"):
        raise ValueError(f"mode must be 'cosine' or 'code', got {mode!r}")
    check_feature(feature, estimator.model_.n_features)
    pre = preprocess_patches(estimator, patch_tokens, batches)
    if mode == "cosine":
        return cosine_map(pre, feature_direction(estimator, feature))
    codes = encode_patches(estimator, pre)
    return crop_feature_values(codes, feature).reshape(pre.shape[:-1])


# ---------------------------------------------------------------------- field maps
def _sampling_matrix(centres: np.ndarray, n_tokens: int, order: int) -> np.ndarray:
    """(len(centres), n_tokens) weights sampling a token axis at ``centres`` (token units,
    token i centred at i): linear between neighbours, flat beyond the ends (order 1), or the
    nearest token (order 0)."""
    out = np.zeros((len(centres), n_tokens), dtype=np.float64)
    rows = np.arange(len(centres))
    if order == 0:
        out[rows, np.clip(np.floor(centres + 0.5), 0, n_tokens - 1).astype(np.int64)] = 1.0
        return out
    position = np.clip(centres, 0, n_tokens - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_tokens - 1)
    frac = position - low
    np.add.at(out, (rows, low), 1 - frac)
    np.add.at(out, (rows, high), frac)
    return out


@functools.lru_cache(maxsize=8192)
def _crop_window(
    field_shape: tuple[int, int], out_shape: tuple[int, int], crop: tuple[int, int, int]
) -> tuple[slice, slice] | None:
    """The rows and columns of an ``out_shape`` map of the field whose pixel centre lies in
    the crop (crop_y, crop_x, crop_size); None when there are none."""
    crop_y, crop_x, size = crop
    r0, r1 = np.searchsorted(_centres(field_shape[0], out_shape[0]), [crop_y, crop_y + size])
    c0, c1 = np.searchsorted(_centres(field_shape[1], out_shape[1]), [crop_x, crop_x + size])
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(int(r0), int(r1)), slice(int(c0), int(c1))


def _centres(field_size: int, out_size: int) -> np.ndarray:
    """Centres, in field pixels, of the pixels of an ``out_size`` map of a field axis."""
    return (np.arange(out_size) + 0.5) * field_size / out_size


@functools.lru_cache(maxsize=8192)
def _crop_sampling(
    field_shape: tuple[int, int],
    out_shape: tuple[int, int],
    crop: tuple[int, int, int],
    grid_shape: tuple[int, int],
    order: int,
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """A crop's window (:func:`_crop_window`) and the weights sampling its token grid there:
    ``along_y @ grid @ along_x.T`` is the crop's map on the window. Cached: the same crop
    geometry recurs in every field and feature (callers must not modify the arrays)."""
    window = _crop_window(field_shape, out_shape, crop)
    if window is None:
        return None
    crop_y, crop_x, size = crop
    gh, gw = grid_shape
    # Token coordinates (token i centred at i) of the window's pixel centres.
    ty = (_centres(field_shape[0], out_shape[0])[window[0]] - crop_y) * gh / size - 0.5
    tx = (_centres(field_shape[1], out_shape[1])[window[1]] - crop_x) * gw / size - 0.5
    along_y, along_x = _sampling_matrix(ty, gh, order), _sampling_matrix(tx, gw, order)
    along_y.flags.writeable = along_x.flags.writeable = False
    return window, along_y, along_x


@functools.lru_cache(maxsize=64)
def _crop_owners(
    field_shape: tuple[int, int],
    out_shape: tuple[int, int],
    crops: tuple[tuple[int, int, int], ...],
) -> np.ndarray:
    """(H, W) index of the crop each pixel of an ``out_shape`` map takes its value from with
    ``reduce="central"``: the crop whose centre is nearest (Chebyshev distance in crop sizes;
    ties: the earlier crop), -1 where no crop lies. Read-only, cached per field geometry."""
    owners = np.full(out_shape, -1, dtype=np.int32)
    best = np.full(out_shape, np.inf)
    for k, (crop_y, crop_x, size) in enumerate(crops):
        window = _crop_window(field_shape, out_shape, (crop_y, crop_x, size))
        if window is None:
            continue
        dy = np.abs(_centres(field_shape[0], out_shape[0])[window[0]] - crop_y - size / 2)
        dx = np.abs(_centres(field_shape[1], out_shape[1])[window[1]] - crop_x - size / 2)
        distance = np.maximum(dy[:, None], dx[None, :]) / size
        closer = distance < best[window]
        best[window] = np.where(closer, distance, best[window])
        owners[window] = np.where(closer, k, owners[window])
    owners.flags.writeable = False
    return owners


def field_activation_map(
    crop_maps: Sequence[CropMap],
    field_shape: tuple[int, int],
    out_shape: tuple[int, int] | None = None,
    reduce: Literal["max", "mean", "central"] = "max",
    *,
    order: int = 1,
) -> np.ndarray:
    """Place every crop's token map on its crop's pixels: an (H, W) float32 field map, NaN where
    no crop covers.

    ``crop_maps``: (crop_y, crop_x, crop_size, map (gh, gw)) per crop, positions in full
    resolution field pixels. ``out_shape`` (default ``field_shape``) may be smaller, e.g.
    (Y // f, X // f); see the module docstring for the geometry and :func:`layer_transform`.
    ``reduce``: how overlapping crops combine: "max" or "mean" (NaN values ignored), or
    "central" (each pixel from the crop whose centre is nearest: away from crop borders, and
    linear in the token values, see :func:`cell_operator`). ``order``: 1 bilinear, 0 nearest
    token.
    """
    if reduce not in ("max", "mean", "central"):
        raise ValueError(f"reduce must be 'max', 'mean' or 'central', got {reduce!r}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order!r}")
    field_y, field_x = (int(s) for s in field_shape)
    out_h, out_w = (field_y, field_x) if out_shape is None else (int(s) for s in out_shape)
    if min(field_y, field_x, out_h, out_w) < 1:
        raise ValueError(f"field_shape {field_shape} and out_shape {out_shape} must be positive")

    best = np.full((out_h, out_w), -np.inf, dtype=np.float64) if reduce == "max" else None
    total = np.zeros((out_h, out_w), dtype=np.float64)
    count = np.zeros((out_h, out_w), dtype=np.int64)
    owners = (
        _crop_owners(
            (field_y, field_x),
            (out_h, out_w),
            tuple((int(y), int(x), int(size)) for y, x, size, _ in crop_maps),
        )
        if reduce == "central"
        else None
    )
    for k, (crop_y, crop_x, size, grid) in enumerate(crop_maps):
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 2 or min(grid.shape) < 1:
            raise ValueError(
                f"crop map {k} must be a 2-D token grid (gh, gw), got shape {grid.shape}"
            )
        if size < 1:
            raise ValueError(f"crop {k} has crop_size {size}; expected a positive size")
        sampling = _crop_sampling(
            (field_y, field_x),
            (out_h, out_w),
            (int(crop_y), int(crop_x), int(size)),
            grid.shape,
            order,
        )
        if sampling is None:
            continue
        window, along_y, along_x = sampling
        patch = along_y @ grid @ along_x.T
        valid = np.isfinite(patch)
        if owners is not None:
            valid &= owners[window] == k
        if reduce == "max":
            best[window] = np.maximum(best[window], np.where(valid, patch, -np.inf))
        else:
            total[window] += np.where(valid, patch, 0.0)
        count[window] += valid
    if reduce == "max":
        out = np.where(count > 0, best, np.nan)
    else:  # "central" counts one crop per pixel: its value
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out.astype(np.float32)


def layer_transform(
    field_shape: tuple[int, int],
    out_shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) that place an (H, W) map of a (Y, X) field over the full-resolution
    field drawn at ``origin`` (napari convention: data pixel i is centred at translate + i *
    scale)."""
    scale = (field_shape[0] / out_shape[0], field_shape[1] / out_shape[1])
    translate = (origin[0] + (scale[0] - 1) / 2, origin[1] + (scale[1] - 1) / 2)
    return scale, translate


# ---------------------------------------------------------------------- cells
def cell_activations(activation_map: Any, labels: Any) -> pd.DataFrame:
    """Mean of a pixel map inside every labelled object.

    ``activation_map`` (Y, X) float and ``labels`` (Y, X) integer label image of the same shape.
    Label 0 (background) and NaN pixels are left out. Columns: label, mean_activation (NaN
    when every pixel of the object is NaN), area (pixels of the object). One row per label
    present, in increasing label order.
    """
    values = np.asarray(activation_map, dtype=np.float64)
    labels = np.asarray(labels)
    if values.shape != labels.shape or values.ndim != 2:
        raise ValueError(
            f"activation map {values.shape} and label image {labels.shape} must be the same (Y, X) shape"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"label image must hold integers, got dtype {labels.dtype}")
    ids, slots = _object_slots(labels)
    flat = slots.ravel()
    foreground = flat >= 0
    inverse, pixels = flat[foreground], values.ravel()[foreground]
    finite = np.isfinite(pixels)
    area = np.bincount(inverse, minlength=len(ids))
    n_valid = np.bincount(inverse, weights=finite, minlength=len(ids))
    sums = np.bincount(inverse, weights=np.where(finite, pixels, 0.0), minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(n_valid > 0, sums / np.maximum(n_valid, 1), np.nan)
    return pd.DataFrame(
        {"label": ids.astype(np.int64), "mean_activation": means, "area": area.astype(np.int64)}
    )


@dataclass(frozen=True)
class CellOperator:
    """The mean of one field's full-resolution activation map inside each labelled object, as a
    linear map of the field's token values (see :func:`cell_operator`)."""

    ids: np.ndarray  # (n_objects,) label ids, increasing
    area: np.ndarray  # (n_objects,) pixels of each object
    matrix: sparse.csr_array  # (n_objects, n_crops * gh * gw)

    def means(self, grids: Any) -> np.ndarray:
        """(n_objects,) mean activation of each object for token grids (n_crops, gh, gw) in
        the crops' order; NaN for objects no crop covers."""
        values = np.asarray(grids, dtype=np.float64).reshape(-1)
        if values.shape[0] != self.matrix.shape[1]:
            raise ValueError(
                f"expected {self.matrix.shape[1]} token values (n_crops x gh x gw), got {values.shape[0]}"
            )
        out = self.matrix @ values
        out[np.diff(self.matrix.indptr) == 0] = np.nan
        return out

    def table(self, grids: Any) -> pd.DataFrame:
        """The same columns as :func:`cell_activations`: label, mean_activation, area."""
        return pd.DataFrame(
            {"label": self.ids, "mean_activation": self.means(grids), "area": self.area}
        )


def cell_operator(
    crops: Sequence[tuple[int, int, int]],
    grid_shape: tuple[int, int],
    labels: Any,
    *,
    order: int = 1,
) -> CellOperator:
    """The linear map from token grids to per-object means of the full-resolution map.

    ``crops``: (crop_y, crop_x, crop_size) of the field's crops, ``grid_shape`` their token grid
    (gh, gw), ``labels`` the field's (Y, X) label image. ``CellOperator.means(grids)`` then
    equals ``cell_activations(field_activation_map(crop maps, labels.shape, "central",
    order=order), labels)["mean_activation"]`` for finite token values (any ``reduce`` when no
    two crops overlap), without making the map: a fraction of a millisecond for any field
    size. Built once per field, separably (rows, then columns of each crop's window).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 2-D integer image, got {labels.dtype} {labels.shape}")
    gh, gw = (int(n) for n in grid_shape)
    crops = tuple((int(y), int(x), int(size)) for y, x, size in crops)
    owners = _crop_owners(labels.shape, labels.shape, crops)
    ids, slots = _object_slots(labels)  # slots: the object index of every pixel, -1 background
    rows, columns, weights = [], [], []
    for k, crop in enumerate(crops):
        sampling = _crop_sampling(labels.shape, labels.shape, crop, (gh, gw), order)
        if sampling is None:
            continue
        window, along_y, along_x = sampling
        # The pixels this crop gives their value to; the others count for nothing here.
        mine = np.where(owners[window] == k, slots[window], -1) + 1  # 0: not this crop's
        # Compact the window's objects by counting (their slots are small integers).
        present = np.flatnonzero(np.bincount(mine.ravel(), minlength=len(ids) + 1))
        lookup = np.zeros(len(ids) + 1, dtype=np.intp)
        lookup[present] = np.arange(len(present))
        local, inverse = present - 1, lookup[mine]
        height = inverse.shape[0]
        # Columns first: each object's weight per (window row, token column).
        keys = (inverse * height + np.arange(height)[:, None]).ravel()
        by_row = np.stack(
            [
                np.bincount(keys, weights=np.broadcast_to(along_x[:, j], inverse.shape).ravel(),
                            minlength=len(local) * height)
                for j in range(gw)
            ],
            axis=-1,
        ).reshape(len(local), height, gw)  # fmt: skip
        # Then rows: weight of token (i, j) summed over the object's pixels.
        per_token = np.einsum("ri,orj->oij", along_y, by_row).reshape(len(local), gh * gw)
        keep = local >= 0
        rows.append(np.repeat(local[keep], gh * gw))
        columns.append(np.tile(k * gh * gw + np.arange(gh * gw), int(keep.sum())))
        weights.append(per_token[keep].ravel())
    covered = owners >= 0
    foreground = slots.ravel() >= 0
    area = np.bincount(slots.ravel()[foreground], minlength=len(ids))
    n_valid = np.bincount(
        slots.ravel()[foreground], weights=covered.ravel()[foreground], minlength=len(ids)
    )
    n_tokens = len(crops) * gh * gw
    if rows:
        object_rows = np.concatenate(rows)
        data = np.concatenate(weights) / n_valid[object_rows]
        matrix = sparse.csr_array(
            (data, (object_rows, np.concatenate(columns))), shape=(len(ids), n_tokens)
        )
        matrix.eliminate_zeros()
    else:
        matrix = sparse.csr_array((len(ids), n_tokens))
    return CellOperator(ids.astype(np.int64), area.astype(np.int64), matrix)


def _object_slots(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, slots): the objects' label ids, increasing, and an image of each pixel's index in
    ``ids`` (-1 for background). Compact ids are counted directly, any others sorted."""
    flat = labels.ravel()
    if flat.size and flat.min() < 0:
        raise ValueError(f"label image holds negative label {int(flat.min())}; labels must be >= 0")
    if flat.size and flat.max() <= 4 * flat.size:
        flat = flat.astype(np.intp, copy=False)
        ids = np.flatnonzero(np.bincount(flat))
        ids = ids[ids > 0]
        lookup = np.full(int(flat.max()) + 1, -1, dtype=np.intp)
        lookup[ids] = np.arange(len(ids))
        return ids, lookup[flat].reshape(labels.shape)
    values, inverse = np.unique(flat, return_inverse=True)
    ids = values[values > 0]
    return ids, (inverse - int(values[0] == 0)).reshape(labels.shape)
