"""Spatial queries on one plate of a store: each field's crops, activation maps, per-cell
values, label images and crop pixels, with what they read kept in a memory-budgeted cache.

Choices (ours):

- A store without patch tokens still gets field maps: each crop is filled with its crop
  token's code for the feature (in both modes).
- Where crops overlap (the tiling's border crops), a map pixel takes the value of the crop
  whose centre is nearest (``reduce="central"``): away from crop borders, and linear in the
  token values, so each object's mean is a precomputed sparse map of them (``cell_operator``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from plate_concepts._progress import Cancelled, CancelLike, cancel_requested
from plate_concepts.analysis.activations import (
    CellOperator,
    ProgressLike,
    cell_activations,
    cell_operator,
    check_feature,
    cosine_map,
    crop_feature_values,
    encode_patches,
    feature_direction,
    field_activation_map,
    preprocess_patches,
)
from plate_concepts.analysis.lru import LRU
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.plates.geometry import canonical_well
from plate_concepts.plates.model import Plate

#: Label images tried, in order, for per-cell values.
CELL_LABEL_NAMES = ("cells", "cell", "cytoplasm", "nuclei", "nucleus")
#: Top-activating crops a viewer shows per feature, and their thumbnail size (px).
TOP_CROPS = 12
THUMBNAIL_SIZE = 64
#: Fields whose top crops are read in one computation.
CROP_READ_FIELDS = 8
#: Fields whose patch tokens :meth:`PlateFields.preload` reads and pre-processes at once.
PRELOAD_FIELDS = 16


class PreloadSummary(NamedTuple):
    """What :meth:`PlateFields.preload` put in memory."""

    fields: int
    fields_with_patches: int  # 0 when the store has no patch tokens
    fields_with_labels: int
    crops: int
    nbytes: int
    patch_tokens: bool

    def describe(self) -> str:
        text = f"{self.nbytes / 2**20:,.0f} MB in memory: labels of {self.fields_with_labels} fields, {self.crops} crops"
        if not self.patch_tokens:
            return text
        if self.fields_with_patches < self.fields:
            text += (
                f", patch tokens of {self.fields_with_patches} of {self.fields} fields (the others "
                "are read when shown)"
            )
        else:
            text += f", patch tokens of all {self.fields} fields"
        return text


class PlateFields:
    """One plate's tokens and fields: their obs rows, their codes, and everything shown per
    field, cached within ``cache`` (a byte-budgeted :class:`LRU`) between features.

    ``codes`` are the codes of the plate's tokens in store-row order (``obs.index``).
    """

    def __init__(
        self,
        store: Any,
        estimator: Any,
        plate_name: str,
        obs: pd.DataFrame,
        codes: SparseCodes,
        plate: Plate | None,
        batch_column: str | None,
        cache: LRU,
    ) -> None:
        self.store = store
        self.estimator = estimator
        self.plate_name = plate_name
        self.obs = obs
        self.rows = obs.index.to_numpy(np.int64)
        self.codes = codes
        self.plate = plate
        self.batch_column = batch_column
        self.cache = cache
        self._maps = LRU(4)
        from plate_concepts.analysis.metrics import codes_matrix

        self.by_feature = sparse.csc_array(codes_matrix(codes))
        self.by_feature.sort_indices()
        positions = obs.reset_index(drop=True).groupby(["well", "field"]).indices
        self.field_index = {
            (str(well), int(field)): self.rows[np.asarray(group)] for (well, field), group in positions.items()
        }

    @property
    def n_features(self) -> int:
        return self.by_feature.shape[1]

    def token_values(self, feature: int, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 code of ``feature`` on the plate's tokens (or on store ``rows`` of it)."""
        start, stop = self.by_feature.indptr[feature : feature + 2]
        values = np.zeros(len(self.rows), dtype=np.float32)
        values[self.by_feature.indices[start:stop]] = self.by_feature.data[start:stop]
        return values if rows is None else values[np.searchsorted(self.rows, rows)]

    def top_rows(self, feature: int, n: int) -> list[tuple[int, float]]:
        """(store row, code) of the ``n`` tokens of the plate where ``feature`` is largest
        (ties: lower row first)."""
        start, stop = self.by_feature.indptr[feature : feature + 2]
        positions, values = self.by_feature.indices[start:stop], self.by_feature.data[start:stop]
        order = np.argsort(-values, kind="stable")[:n]
        return [(int(self.rows[positions[i]]), float(values[i])) for i in order]

    def well_fields(self, well: str) -> list[int]:
        """The fields of ``well`` that have crops in the store, in order."""
        well = canonical_well(well)
        return sorted(field for name, field in self.field_index if name == well)

    def field_rows(self, well: str, field: int) -> np.ndarray:
        """Store rows of the crops of one field of the explorer's plate."""
        key = (canonical_well(well), int(field))
        rows = self.field_index.get(key)
        if rows is None:
            raise KeyError(
                f"plate {self.plate_name!r} has no crops of well {key[0]} field {key[1]} in {self.store.path}"
            )
        return rows

    def field_shape(self, well: str, field: int) -> tuple[int, int]:
        """(Y, X) of a field: the plate's image shape, or without a plate the extent of its crops."""
        if self.plate is not None:
            return tuple(self.plate.image_shape)  # type: ignore[return-value]
        crops = self.obs.loc[self.field_rows(well, field)]
        return (
            int((crops["crop_y"] + crops["crop_size"]).max()),
            int((crops["crop_x"] + crops["crop_size"]).max()),
        )

    def field_map(
        self,
        feature: int,
        well: str,
        field: int,
        mode: Literal["cosine", "code"] = "cosine",
        downsample: int = 1,
    ) -> np.ndarray:
        """(Y // downsample, X // downsample) float32 map of ``feature`` over one field, NaN where
        no crop lies; where crops overlap, the crop whose centre is nearest.

        From the store's patch tokens: ``"cosine"`` (cosine with the feature direction) or
        ``"code"`` (the feature's code of each patch token). A store without patch tokens gives
        each crop its crop token's code (both modes). Show it with
        :func:`~plate_concepts.analysis.activations.layer_transform`.
        """
        feature = check_feature(feature, self.n_features)
        if mode not in ("cosine", "code"):
            raise ValueError(f"mode must be 'cosine' or 'code', got {mode!r}")
        if isinstance(downsample, bool) or int(downsample) < 1:
            raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
        well, field, downsample = canonical_well(well), int(field), int(downsample)
        rows = self.field_rows(well, field)

        def build() -> np.ndarray:
            shape = self.field_shape(well, field)
            out_shape = (max(1, shape[0] // downsample), max(1, shape[1] // downsample))
            crop_maps = [
                (*crop, grid)
                for crop, grid in zip(
                    self._field_crops(rows),
                    self._field_grids(feature, well, field, mode),
                    strict=True,
                )
            ]
            return field_activation_map(crop_maps, shape, out_shape, reduce="central")

        key_mode = "crop" if self.store.patch_grid is None else mode
        return self._maps.get(("field", feature, well, field, key_mode, downsample), build)

    def _field_crops(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
        """(crop_y, crop_x, crop_size) of store ``rows``."""
        crops = self.obs.loc[rows]
        return [
            (int(y), int(x), int(s))
            for y, x, s in zip(crops["crop_y"], crops["crop_x"], crops["crop_size"], strict=True)
        ]

    def _field_grids(self, feature: int, well: str, field: int, mode: str) -> np.ndarray:
        """(n_crops, gh, gw) values of ``feature`` on the token grids of one field's crops, in
        ``mode``; (n_crops, 1, 1) crop codes when the store has no patch tokens."""
        rows = self.field_rows(well, field)
        if self.store.patch_grid is None:
            return self.token_values(feature, rows).reshape(-1, 1, 1)
        if mode == "cosine":
            return cosine_map(
                self._field_patches(well, field), feature_direction(self.estimator, feature)
            )
        codes, grid = self._field_patch_codes(well, field)
        return crop_feature_values(codes, feature).reshape(len(rows), *grid)

    def _cell_operator(self, well: str, field: int, label_name: str) -> CellOperator:
        """Per-object means of a field's map as a linear map of its token values; cached with
        the field's data."""
        well, field = canonical_well(well), int(field)

        def build() -> CellOperator:
            grid = self.store.patch_grid or (1, 1)
            crops = self._field_crops(self.field_rows(well, field))
            return cell_operator(crops, grid, self.label_image(well, field, label_name))

        return self.cache.get(("cell_operator", well, field, label_name), build)

    def _field_patches(self, well: str, field: int) -> np.ndarray:
        """Pre-processed patch tokens (n_crops, gh, gw, d') of one field, cached for the next feature."""

        def build() -> np.ndarray:
            rows = self.field_rows(well, field)
            batches = (
                None if self.batch_column is None else self.obs.loc[rows, self.batch_column].to_numpy()
            )
            return preprocess_patches(self.estimator, self.store.read_patches(rows), batches)

        return self.cache.get(("patches", well, field), build)

    def _field_patch_codes(self, well: str, field: int) -> tuple[SparseCodes, tuple[int, int]]:
        def build() -> tuple[SparseCodes, tuple[int, int]]:
            patches = self._field_patches(well, field)
            return encode_patches(self.estimator, patches), patches.shape[1:3]

        return self.cache.get(("patch_codes", well, field), build)

    def cell_values(
        self,
        feature: int,
        well: str,
        field: int,
        label_name: str = "cells",
        mode: Literal["cosine", "code"] = "cosine",
    ) -> pd.DataFrame:
        """Mean of the full-resolution field map inside every object of the plate's label image
        ``label_name``: columns label, mean_activation, area (see
        :func:`~plate_concepts.analysis.activations.cell_activations`). In a store of one token
        per object of ``label_name`` (``embed --objects``), each object's value is its own
        token's code instead (in either mode)."""
        if self._objects_are(label_name):
            return self._object_values(feature, well, field)
        label_image = self.label_image(well, field, label_name)
        if label_image.shape == self.field_shape(well, field):
            grids = self._field_grids(feature, well, field, mode)
            if np.isfinite(grids).all():  # else the map, which leaves NaN pixels out
                return self._cell_operator(well, field, label_name).table(grids)
        activation = self.field_map(feature, well, field, mode=mode, downsample=1)
        if label_image.shape != activation.shape:
            raise ValueError(
                f"label image {label_name!r} of well {well} field {field} is {label_image.shape}, "
                f"the field is {activation.shape}"
            )
        return cell_activations(activation, label_image)

    def _objects_are(self, label_name: str) -> bool:
        """Whether the store holds one token per object of the label image ``label_name``."""
        objects = self.store.provenance.get("objects") or {}
        return objects.get("label_image") == label_name and "object_label" in self.obs.columns

    def _object_values(self, feature: int, well: str, field: int) -> pd.DataFrame:
        rows = self.field_rows(well, field)
        objects = self.obs.loc[rows]
        table = pd.DataFrame({
            "label": objects["object_label"].to_numpy(np.int64),
            "mean_activation": self.token_values(feature, rows).astype(np.float64),
            "area": objects["object_area"].to_numpy(np.int64),
        })
        return table.sort_values("label", ignore_index=True)

    def label_image(self, well: str, field: int, label_name: str) -> np.ndarray:
        """The full-resolution label image ``label_name`` of one field (the smallest integer
        dtype that holds its ids), cached for the next feature."""
        plate = self._require_plate("label images")
        well, field = canonical_well(well), int(field)

        def build() -> np.ndarray:
            labels = plate.field_labels(well, field)
            if label_name not in labels:
                raise KeyError(
                    f"well {well} field {field} of plate {plate.name!r} has no label image "
                    f"{label_name!r} (it has: {sorted(labels)})"
                )
            return _read_only(_compact_labels(np.asarray(labels[label_name])))

        return self.cache.get(("labels", well, field, label_name), build)

    def crop_pixels(self, rows: Sequence[int], size: int) -> list[np.ndarray]:
        """(C, h, w) raw pixels of the crops of store ``rows``, about ``size`` pixels on a side:
        read from the coarsest pyramid level that still has ``size`` pixels per crop, then
        strided; cached (thumbnails). Crops not cached yet are read together."""
        for row in rows:
            self._plate_record(row)
        size = int(size)
        cached = {int(row): self.cache.peek(("crop", int(row), size)) for row in rows}
        missing = [row for row, pixels in cached.items() if pixels is None]
        if missing:
            cached.update(zip(missing, self._read_crop_pixels(missing, size), strict=True))
        return [cached[int(row)] for row in rows]

    def _crop_level(self, crop_size: int, size: int) -> int:
        plate = self._require_plate("crop images")
        level = 0
        while level + 1 < plate.n_levels and crop_size // 2 ** (level + 1) >= size:
            level += 1
        return level

    def _crop_window(
        self, crop_y: int, crop_x: int, crop_size: int, size: int
    ) -> tuple[int, tuple[slice, slice, slice]]:
        """(pyramid level, slices) that read a crop about ``size`` pixels on a side: the
        coarsest level that still has ``size`` pixels per crop, then every n-th pixel."""
        level = self._crop_level(crop_size, size)
        f = 2**level
        stride = max(1, crop_size // f // size)
        rows = slice(crop_y // f, (crop_y + crop_size) // f, stride)
        columns = slice(crop_x // f, (crop_x + crop_size) // f, stride)
        return level, (slice(None), rows, columns)

    def _read_crop_pixels(self, rows: list[int], size: int) -> list[np.ndarray]:
        """Read the crops of ``rows``, cache each and return them in order: per field and
        level the bounding box of its crops (chunks no crop touches stay unread), a few
        fields per computation (memory stays a few fields' boxes)."""
        import dask

        plate = self._require_plate("crop images")
        records = self.obs.loc[rows]
        groups: dict[tuple[str, int, int], list[tuple[int, tuple[slice, slice, slice]]]] = {}
        for index, (well, field, y, x, crop_size) in enumerate(
            zip(records["well"], records["field"], records["crop_y"], records["crop_x"],
                records["crop_size"], strict=True)
        ):  # fmt: skip
            level, window = self._crop_window(int(y), int(x), int(crop_size), size)
            groups.setdefault((str(well), int(field), level), []).append((index, window))
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        keys = list(groups)
        for start in range(0, len(keys), CROP_READ_FIELDS):
            batch = keys[start : start + CROP_READ_FIELDS]
            boxes = [_bounding_box([w for _, w in groups[key]]) for key in batch]
            pixels = dask.compute(
                *[
                    plate.image(w, f, level)[:, y, x]
                    for (w, f, level), (y, x) in zip(batch, boxes, strict=True)
                ]
            )
            for key, (box_y, box_x), box in zip(batch, boxes, pixels, strict=True):
                for index, (_, ys, xs) in groups[key]:
                    crop = box[:, ys.start - box_y.start : ys.stop - box_y.start : ys.step,
                               xs.start - box_x.start : xs.stop - box_x.start : xs.step]  # fmt: skip
                    out[index] = _read_only(np.ascontiguousarray(crop))
                    self.cache.put(("crop", rows[index], size), out[index])
        return out

    def _crop_bytes(self, rows: list[int], size: int) -> int:
        """Memory the pixels of these crops take once read (as :meth:`crop_pixels` reads)."""
        plate = self._require_plate("crop images")
        records = self.obs.loc[rows]
        total = 0
        for y, x, crop_size in zip(
            records["crop_y"], records["crop_x"], records["crop_size"], strict=True
        ):
            _, (_, ys, xs) = self._crop_window(int(y), int(x), int(crop_size), size)
            total += len(range(ys.start, ys.stop, ys.step)) * len(range(xs.start, xs.stop, xs.step))
        return total * len(plate.channels) * np.dtype(plate.dtype).itemsize

    def in_memory(
        self,
        well: str,
        *,
        mode: Literal["cosine", "code"] = "cosine",
        label_name: str | None = None,
        crop_rows: Sequence[int] = (),
        thumbnail_size: int = THUMBNAIL_SIZE,
    ) -> bool:
        """Whether maps of ``well``'s fields (in ``mode``), their label images ``label_name``
        and the pixels of the crops of ``crop_rows`` are all cached: answering needs no disk
        read (after :meth:`preload`, within its budget)."""
        well = canonical_well(well)
        fields = self.well_fields(well)
        keys: list[Hashable] = [("crop", int(row), int(thumbnail_size)) for row in crop_rows]
        for field in fields:
            if self.store.patch_grid is not None:
                keys.append(("patches" if mode == "cosine" else "patch_codes", well, field))
            if label_name is not None:
                keys.append(("labels", well, field, label_name))
                keys.append(("cell_operator", well, field, label_name))
        return all(key in self.cache for key in keys)

    def preload(
        self,
        *,
        crop_rows: Sequence[int] = (),
        thumbnail_size: int = THUMBNAIL_SIZE,
        label_name: str | None = None,
        progress: ProgressLike | None = None,
        cancel: CancelLike | None = None,
    ) -> PreloadSummary:
        """Read, within the ``cache_bytes`` budget, what selecting a feature would otherwise
        read from disk (slow; run in a worker after :meth:`prepare`):

        1. the cell label image (``label_name``, default :func:`cell_label_name`) of every field;
        2. the pixels of the crops of ``crop_rows`` (e.g. every feature's most active crops),
           for thumbnails of ``thumbnail_size`` pixels;
        3. the pre-processed patch tokens of every field, in store order, while they fit.

        ``progress(done, total)`` counts fields; ``cancel`` raises
        :class:`~plate_concepts._progress.Cancelled` (what was read stays cached).
        """
        fields = sorted(self.field_index, key=lambda key: int(self.field_index[key][0]))
        has_images = self.plate is not None
        label_name = label_name or (cell_label_name(self.plate.label_names) if has_images else None)
        crop_rows = sorted({int(row) for row in crop_rows}) if has_images else []
        with_patches = self.store.patch_grid is not None
        total = (
            (len(fields) if label_name else 0)
            + len(crop_rows)
            + (len(fields) if with_patches else 0)
        )
        done = 0

        def step(count: int) -> None:
            nonlocal done
            if cancel_requested(cancel):
                raise Cancelled("preloading the feature explorer was cancelled")
            done += count
            if progress is not None:
                progress(done, total)

        # Each stage stops when the budget is spent rather than evict what it has read.
        step(0)
        labelled = 0
        if label_name:
            for well, field in fields:
                labels = self.plate.field_labels(well, field).get(label_name)
                if labels is not None:
                    if not self.cache.fits(labels.size * labels.dtype.itemsize):
                        break
                    self.label_image(well, field, label_name)
                    self._cell_operator(well, field, label_name)
                    labelled += 1
                step(1)
        n_crops = 0
        for start in range(0, len(crop_rows), 256):
            block = crop_rows[start : start + 256]
            if not self.cache.fits(self._crop_bytes(block, thumbnail_size)):
                break
            self._read_crop_pixels(block, int(thumbnail_size))
            n_crops += len(block)
            step(len(block))
        loaded = 0
        if with_patches:
            for start in range(0, len(fields), PRELOAD_FIELDS):
                block = fields[start : start + PRELOAD_FIELDS]
                rows = np.concatenate([self.field_index[key] for key in block])
                grid = self.store.patch_grid
                expected = (
                    len(rows) * grid[0] * grid[1] * self.estimator.model_.decoder.shape[1] * 4
                )
                if not self.cache.fits(expected):
                    break  # the budget is spent: later fields are read when shown
                batches = (
                    None if self.batch_column is None else self.obs.loc[rows, self.batch_column].to_numpy()
                )
                patches = preprocess_patches(self.estimator, self.store.read_patches(rows), batches)
                offset = 0
                for key in block:
                    n = len(self.field_index[key])
                    # A copy: a view would keep the whole block alive after eviction.
                    self.cache.put(("patches", *key), patches[offset : offset + n].copy())
                    offset += n
                loaded += len(block)
                step(len(block))
        if progress is not None and done < total:
            progress(total, total)  # a stage stopped at the budget: nothing more to read
        return PreloadSummary(
            fields=len(fields),
            fields_with_patches=loaded if with_patches else 0,
            fields_with_labels=labelled,
            crops=n_crops,
            nbytes=self.cache.nbytes,
            patch_tokens=with_patches,
        )

    def crop_image(self, row: int) -> np.ndarray:
        """(C, s, s) pixels of the crop of store row ``row``, read from the plate."""
        plate = self._require_plate("crop images")
        record = self._plate_record(row)
        y, x, size = int(record["crop_y"]), int(record["crop_x"]), int(record["crop_size"])
        image = plate.image(str(record["well"]), int(record["field"]))
        if y < 0 or x < 0 or y + size > image.shape[1] or x + size > image.shape[2]:
            raise ValueError(
                f"crop of row {row} ({y}, {x}, size {size}) does not fit in well {record['well']} "
                f"field {record['field']} of shape {image.shape[1:]}"
            )
        return np.asarray(image[:, y : y + size, x : x + size])

    def _plate_record(self, row: int) -> pd.Series:
        """The obs record of a store row of the explorer's plate (clear errors otherwise)."""
        self._require_plate("crop images")
        n = len(self.store)
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= int(row) < n:
            raise IndexError(f"row {row!r} is not a token row of {self.store.path} (0..{n - 1})")
        if int(row) not in self.obs.index:
            plate = self.store.read_obs([int(row)], ["plate"])["plate"].iloc[0]
            raise ValueError(
                f"row {row} belongs to plate {plate!r}, not to the explorer's plate {self.plate_name!r}"
            )
        return self.obs.loc[int(row)]

    def _require_plate(self, what: str) -> Plate:
        if self.plate is None:
            raise ValueError(
                f"{what} need plate {self.plate_name!r}'s images: give the FeatureExplorer its plate="
            )
        return self.plate


def cell_label_name(label_names: Sequence[str]) -> str | None:
    """The label image that outlines whole cells, if the plate has one (else its first)."""
    lowered = {name.lower(): name for name in label_names}
    for wanted in CELL_LABEL_NAMES:
        if wanted in lowered:
            return lowered[wanted]
    return next(
        (name for name in label_names if "cell" in name.lower()),
        label_names[0] if label_names else None,
    )


def _bounding_box(windows: list[tuple[slice, slice, slice]]) -> tuple[slice, slice]:
    """The rows and columns spanning every (channels, rows, columns) window."""
    return (
        slice(min(w[1].start for w in windows), max(w[1].stop for w in windows)),
        slice(min(w[2].start for w in windows), max(w[2].stop for w in windows)),
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    """``array``, marked read-only: cached arrays are shared by every later query."""
    array.flags.writeable = False
    return array


def _compact_labels(labels: np.ndarray) -> np.ndarray:
    """The same ids in the smallest unsigned dtype that holds them (half the memory of int32
    for the usual < 65,536 objects per field)."""
    if labels.dtype.kind not in "iu":
        raise TypeError(f"label images must hold integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        return labels
    top = int(labels.max(initial=0))
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return labels.astype(dtype, copy=False)
    return labels
