"""Browse a dictionary's features over an embedding store — one plate or a screen — fast enough
for a GUI.

:class:`FeatureExplorer` puts three things together:

- feature statistics (:class:`~plate_concepts.analysis.feature_stats.FeatureStatistics`), read
  from an activation pass: the feature table, selectivity, per-well values of any plate,
  activation per label value, where over the screen each feature is active;
- the explorer's plate (:class:`~plate_concepts.analysis.plate_fields.PlateFields`): its tokens'
  obs rows and codes, and the spatial queries shown per field (activation maps, per-cell
  values, label images, crop pixels);
- the per-field cache those queries share, within a memory budget.

It never holds every token's codes: only those of the plate being shown. The pass is one
written by ``plate-concepts encode`` (:meth:`FeatureExplorer.from_pass`, a screen opens in
seconds) or, for a small store, one :meth:`FeatureExplorer.prepare` runs in process through the
same code.

Selectivity is computed per crop token: each crop token is one "image token" in the
publication's sense, so P(f active | label) is the fraction of that label's crops where f is
non-zero. Label columns are those of the pass (obs columns other than the index, the control
flag and measurements, with 2 to ``max_label_values`` values).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from plate_concepts._progress import CancelLike
from plate_concepts.analysis.activation_pass import (
    ActivationPass,
    check_token_dim,
    plan_pass,
    run_pass,
)
from plate_concepts.analysis.activations import ProgressLike, check_feature
from plate_concepts.analysis.feature_stats import CONTROL_GROUP, FeatureStatistics
from plate_concepts.analysis.lru import LRU
from plate_concepts.analysis.plate_fields import (
    CELL_LABEL_NAMES,
    THUMBNAIL_SIZE,
    TOP_CROPS,
    PlateFields,
    PreloadSummary,
    cell_label_name,
)
from plate_concepts.analysis.selectivity import SelectivityResult
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.estimators import recorded_batch_column
from plate_concepts.embeddings.store import INDEX_COLUMNS, EmbeddingStore
from plate_concepts.plates.model import Plate

__all__ = [
    "CELL_LABEL_NAMES", "CONTROL_GROUP", "THUMBNAIL_SIZE", "TOP_CROPS", "FeatureExplorer",
    "PlateHeatmap", "PreloadSummary", "TopCrop", "cell_label_name",
]

#: Stores larger than this are browsed from a written activation pass (``plate-concepts
#: encode``), not from one computed in memory when the explorer opens.
MAX_IN_MEMORY_TOKENS = 2_000_000


class TopCrop(NamedTuple):
    """One of a feature's most active crops: its store row, place and code value."""

    row: int
    well: str
    field: int
    crop_y: int
    crop_x: int
    crop_size: int
    value: float


class PlateHeatmap(NamedTuple):
    """A per-well image and the napari ``scale``/``translate`` that lay it over mosaic level 0."""

    image: np.ndarray
    scale: tuple[float, float]
    translate: tuple[float, float]


class FeatureExplorer:
    """Feature statistics over an embedding store and fast queries on one of its plates.

    Parameters
    ----------
    store
        An :class:`EmbeddingStore` or its path.
    estimator
        A fitted :class:`~plate_concepts.dictionary.ICFL` / :class:`~plate_concepts.dictionary.TopKSAE`
        or the path of a dictionary file.
    plate
        The plate whose images are shown (needed for crop images, cell values and the exact
        field shape).
    label_column
        The label column the feature table describes by default (default: the first).
    plate_name
        Which of the store's plates wells refer to (default: ``plate.name``, the only plate, or
        the first plate of a screen).
    control_column
        Boolean obs column marking control tokens.
    batch_column
        Obs column of batch labels for ``"pca-batch"`` dictionaries (default: the one recorded in
        the dictionary file).
    activation_pass
        A pass of this dictionary over this store to read (see :meth:`from_pass`); without one,
        :meth:`prepare` computes one in memory (stores up to :data:`MAX_IN_MEMORY_TOKENS`).
    max_label_values
        Columns with more distinct values are not treated as label columns.
    dead_threshold
        A feature is dead when its frequency over the store is below this.
    cache_size
        Per-feature results kept.
    encode_batch_size
        Tokens encoded per block when :meth:`prepare` runs the pass (default: the store's chunks).
    cache_bytes
        Memory for per-field data kept between features: pre-processed patch tokens, label
        images and crop pixels (:meth:`preload` fills it up to this).
    """

    def __init__(
        self,
        store: EmbeddingStore | str | os.PathLike,
        estimator: Any,
        plate: Plate | None = None,
        label_column: str | None = None,
        *,
        plate_name: str | None = None,
        control_column: str = "is_control",
        batch_column: str | None = None,
        activation_pass: ActivationPass | None = None,
        max_label_values: int = 384,
        dead_threshold: float = 1e-5,
        cache_size: int = 64,
        encode_batch_size: int | None = None,
        cache_bytes: int = 1 << 30,
    ) -> None:
        if not isinstance(store, EmbeddingStore):
            store = EmbeddingStore.open(store)
        if isinstance(estimator, (str, os.PathLike)):
            from plate_concepts.dictionary.estimators import ICFL

            estimator = ICFL.load(estimator)  # the file decides ICFL or TopKSAE
        if not hasattr(estimator, "model_"):
            raise ValueError("the estimator is not fitted: fit it or load a dictionary file first")
        check_token_dim(estimator, store)
        if len(store) == 0:
            raise ValueError(f"embedding store {store.path} holds no tokens")
        self.store = store
        self.estimator = estimator
        self.plate = plate
        self.control_column = control_column
        self.max_label_values = int(max_label_values)
        self.dead_threshold = float(dead_threshold)
        self.encode_batch_size = encode_batch_size
        self.cache_size = int(cache_size)
        self.n_features = int(estimator.model_.n_features)
        self.plate_name = self._choose_plate(plate, plate_name)
        batch_column = batch_column or recorded_batch_column(estimator)
        if estimator.whitening_.method == "pca-batch" and batch_column is None:
            raise ValueError("this dictionary was whitened per batch ('pca-batch'): pass batch_column=")
        self.batch_column = None if batch_column is None else store.resolve_column(batch_column, "batch column")
        if activation_pass is not None:
            from plate_concepts.analysis.evaluation import check_pass_matches

            check_pass_matches(activation_pass, store)
            self.label_columns = activation_pass.label_columns
        else:
            from plate_concepts.analysis.activation_pass import label_columns_of

            if len(store) > MAX_IN_MEMORY_TOKENS:
                raise ValueError(
                    f"embedding store {store.path} holds {len(store):,} tokens: browse it from an "
                    "activation pass (plate-concepts encode STORE DICT PASS, then open the pass)"
                )
            self.label_columns = label_columns_of(
                store, exclude=(control_column, self.batch_column), max_values=self.max_label_values
            )
        if label_column is None:
            label_column = self.label_columns[0] if self.label_columns else None
        else:
            label_column = store.resolve_column(label_column, "label column")
        if label_column is not None and label_column not in self.label_columns:
            raise ValueError(
                f"label column {label_column!r} is not a label column of {store.path} "
                f"(label columns: {self.label_columns})"
            )
        self.label_column = label_column
        self._pass = activation_pass
        self._stats: FeatureStatistics | None = None
        self._fields: PlateFields | None = None
        self._cache = LRU(cache_size)
        self._maps = LRU(4)
        # Per-field data (pre-processed patch tokens, patch codes, label images, crop pixels)
        # within a memory budget: switching features re-reads none of what it holds.
        self._field_cache = LRU(1 << 30, max_bytes=cache_bytes)

    @classmethod
    def from_pass(
        cls, activation_pass: ActivationPass | str | os.PathLike, plate: Plate | None = None, **options: Any
    ) -> FeatureExplorer:
        """An explorer of a written activation pass (its store and dictionary are the ones it
        records); ready after :meth:`prepare`, which then only reads the plate's codes."""
        if not isinstance(activation_pass, ActivationPass):
            activation_pass = ActivationPass.open(activation_pass)
        spec = activation_pass.spec
        if spec.dictionary is None:
            raise ValueError(f"the activation pass {activation_pass.folder} records no dictionary file")
        options.setdefault("batch_column", spec.batch_column)
        return cls(spec.store, spec.dictionary, plate, activation_pass=activation_pass, **options)

    # ------------------------------------------------------------------ set-up
    def _choose_plate(self, plate: Plate | None, plate_name: str | None) -> str:
        plates = self.store.plates
        if plate_name is not None:
            if plate_name not in plates:
                raise ValueError(f"plate {plate_name!r} has no tokens in {self.store.path} (plates: {plates})")
            return plate_name
        if plate is not None:
            if plate.name in plates:
                return plate.name
            if len(plates) > 1:
                raise ValueError(
                    f"plate {plate.name!r} has no tokens in {self.store.path} (plates: {plates}); "
                    "pass plate_name= to say which plate it is"
                )
        return plates[0]

    @property
    def is_prepared(self) -> bool:
        return self._stats is not None and self._fields is not None

    def prepare(self, progress: ProgressLike | None = None, cancel: CancelLike | None = None) -> FeatureExplorer:
        """Get the feature statistics — run the activation pass in memory when the explorer has
        none (slow; run in a worker) — and read the explorer plate's codes.

        ``progress(done, total)`` counts encoded tokens; ``cancel`` (Event or callable) stops
        with :class:`~plate_concepts._progress.Cancelled` and leaves the explorer
        unprepared.
        """
        if self._pass is None:
            spec = plan_pass(
                self.store, self.estimator, None, labels=self.label_columns,
                control_column=self.control_column, batch_column=self.batch_column,
                rows_per_task=self.encode_batch_size,
            )
            self._pass = run_pass(spec, estimator=self.estimator, progress=progress, cancel=cancel)
        self._stats = FeatureStatistics(self._pass, self.dead_threshold, self.cache_size)
        self._cache.clear()
        self._maps.clear()
        self._fields = self._plate_fields(self.plate_name, self.plate)
        return self

    def _plate_fields(self, name: str, plate: Plate | None) -> PlateFields:
        rows = self.store.plate_rows(name)
        objects = [c for c in ("object_label", "object_area") if c in self.store.obs_columns]  # a cell's own token
        columns = [c for c in (*INDEX_COLUMNS, *objects, self.batch_column) if c is not None]
        obs = self.store.read_obs(rows, list(dict.fromkeys(columns)))
        if self._pass is not None and self._pass.folder is not None:
            codes = self._pass.codes(rows)
        else:  # a pass computed in memory keeps no codes: encode the plate's tokens
            batches = None if self.batch_column is None else obs[self.batch_column].to_numpy()
            codes = self.estimator.transform(self.store.read(rows), batches)
        return PlateFields(self.store, self.estimator, name, obs, codes, plate, self.batch_column,
                           self._field_cache)

    def set_plate(self, plate_name: str, plate: Plate | None = None) -> None:
        """Show another plate of the store: its wells, fields and top crops (``plate``: its
        images). Reads that plate's codes only."""
        if plate_name not in self.store.plates:
            raise ValueError(f"plate {plate_name!r} has no tokens in {self.store.path} (plates: {self.store.plates})")
        self._field_cache.clear()
        self._maps.clear()
        self.plate_name, self.plate = plate_name, plate
        if self._stats is not None:
            self._fields = self._plate_fields(plate_name, plate)

    @property
    def activation_pass(self) -> ActivationPass:
        return self._prepared_stats.activation_pass

    @property
    def _prepared_stats(self) -> FeatureStatistics:
        if self._stats is None:
            raise RuntimeError("the feature explorer is not prepared yet: call prepare() first")
        return self._stats

    @property
    def fields(self) -> PlateFields:
        """The explorer plate's tokens, fields and spatial queries (after :meth:`prepare`)."""
        if self._fields is None:
            raise RuntimeError("the feature explorer is not prepared yet: call prepare() first")
        return self._fields

    @property
    def plate_obs(self) -> pd.DataFrame:
        """Index of the explorer plate's tokens (indexed by store row)."""
        return self.fields.obs

    @property
    def plate_codes(self) -> SparseCodes:
        """Codes of the explorer plate's tokens, in store-row order (``plate_obs.index``)."""
        return self.fields.codes

    def plate_table(self) -> pd.DataFrame:
        """One row per plate of the store: tokens, wells and control tokens (no row is read)."""
        description = self.store.describe(max_values=0)
        plates = description["plates"]
        return pd.DataFrame({
            "plate": plates,
            "n_tokens": [description["tokens_per_plate"][p] for p in plates],
            "n_wells": [description["wells_per_plate"][p] for p in plates],
            "n_controls": [description["controls_per_plate"][p] for p in plates],
        })

    # ------------------------------------------------------------------ tables
    def _column(self, label_column: str | None) -> str:
        column = label_column or self.label_column
        if column is None:
            raise ValueError(f"embedding store {self.store.path} has no label column; pass one that has 2+ values")
        if column not in self.label_columns:
            raise KeyError(
                f"{column!r} is not a label column of {self.store.path} (label columns: {self.label_columns})"
            )
        return column

    def selectivity(self, label_column: str | None = None) -> SelectivityResult:
        """The selectivity of every feature for the values of a label column."""
        return self._prepared_stats.selectivity(self._column(label_column))

    def feature_table(self, label_column: str | None = None) -> pd.DataFrame:
        """One row per feature: feature, frequency, dead, mean_activation, best_value (the label
        value it is most selective for), max_selectivity and average_selectivity there; on a
        screen also n_plates and top_plate."""
        column = label_column or self.label_column
        if column is not None:
            column = self._column(column)
        return self._prepared_stats.feature_table(column)

    def top_plate(self, feature: int) -> str:
        """The plate where ``feature`` is active on the largest fraction of tokens."""
        return self._prepared_stats.top_plate(feature)

    # ------------------------------------------------------------------ per-feature queries
    def well_values(self, feature: int, kind: Literal["mean", "fraction"] = "mean") -> pd.Series:
        """Per-well mean activation (``"mean"``) or fraction of active tokens (``"fraction"``)
        of ``feature`` on the explorer's plate, indexed by well (row by row)."""
        return self._prepared_stats.well_values(self.plate_name, feature, kind)

    def plate_heatmap(
        self,
        feature: int,
        mosaic: Any,
        kind: Literal["mean", "fraction"] = "mean",
        level: int | None = None,
    ) -> PlateHeatmap:
        """A per-well image of ``feature`` aligned to a :class:`PlateMosaic`.

        Computed at mosaic level ``level`` (default the coarsest): each well's value fills the
        area of its field grid (the well gap stays NaN), absent wells are NaN. ``scale`` and
        ``translate`` place the image exactly over mosaic level 0 in napari.
        """
        feature = check_feature(feature, self.n_features)
        level = mosaic.n_levels - 1 if level is None else int(level)
        if not 0 <= level < mosaic.n_levels:
            raise ValueError(f"level must be in [0, {mosaic.n_levels}), got {level}")
        values = self.well_values(feature, kind)

        def build() -> PlateHeatmap:
            factor = 2**level
            image = np.full((mosaic.shape[0] // factor, mosaic.shape[1] // factor), np.nan, dtype=np.float32)
            for well, value in values.items():
                y0, x0, y1, x1 = mosaic.field_grid_box(well)  # exact at every level
                if y1 > mosaic.shape[0] or x1 > mosaic.shape[1]:
                    raise ValueError(f"well {well} lies outside the mosaic's plate format")
                image[y0 // factor : y1 // factor, x0 // factor : x1 // factor] = value
            half = (factor - 1) / 2  # napari: data pixel i is centred at translate + i * scale
            return PlateHeatmap(image, (float(factor), float(factor)), (half, half))

        geometry = (self.plate_name, mosaic.shape, mosaic.well_shape, mosaic.tile_shape, mosaic.field_grid)
        return self._maps.get(("heatmap", feature, kind, level, geometry), build)

    def top_crops(self, feature: int, n: int = 16, *, on_plate: bool = False) -> list[TopCrop]:
        """The (at most) ``n`` crops where ``feature`` is most active, largest first: on the
        explorer's plate (``on_plate``: those it can show; any ``n``), or over the store (at most
        the pass's ``top_n``)."""
        feature = check_feature(feature, self.n_features)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if on_plate or len(self.store.plates) == 1:
            top = self.fields.top_rows(feature, n)
            records = self.plate_obs.loc[[row for row, _ in top]]
        else:
            top = self._prepared_stats.top_rows(feature, n)
            records = self.store.read_obs([row for row, _ in top], list(INDEX_COLUMNS))
        columns = [records[c].to_numpy() for c in ("well", "field", "crop_y", "crop_x", "crop_size")]
        return [
            TopCrop(int(row), str(well), int(field), int(y), int(x), int(size), value)
            for (row, value), well, field, y, x, size in zip(top, *columns, strict=True)
        ]

    def label_value_activation(self, feature: int, label_column: str | None = None) -> pd.DataFrame:
        """Per value of a label column, over the store: n_tokens, n_control, mean_activation and
        fraction_active of ``feature``, plus a last row ``group == "control"`` over the control
        tokens (see :meth:`FeatureStatistics.label_value_activation`); ``"well"``: the wells of
        the explorer's plate."""
        column = "well" if label_column == "well" else self._column(label_column)
        return self._prepared_stats.label_value_activation(feature, column, self.plate_name)

    # ------------------------------------------------------------------ fields and cells
    def well_fields(self, well: str) -> list[int]:
        """The fields of ``well`` (of the explorer's plate) that have crops in the store, in order."""
        return self.fields.well_fields(well)

    def field_rows(self, well: str, field: int) -> np.ndarray:
        """Store rows of the crops of one field of the explorer's plate."""
        return self.fields.field_rows(well, field)

    def field_shape(self, well: str, field: int) -> tuple[int, int]:
        """(Y, X) of a field: the plate's image shape, or without a plate the extent of its crops."""
        return self.fields.field_shape(well, field)

    def field_map(
        self,
        feature: int,
        well: str,
        field: int,
        mode: Literal["cosine", "code"] = "cosine",
        downsample: int = 1,
    ) -> np.ndarray:
        """(Y // downsample, X // downsample) float32 map of ``feature`` over one field (see
        :meth:`PlateFields.field_map`)."""
        return self.fields.field_map(feature, well, field, mode, downsample)

    def cell_values(
        self,
        feature: int,
        well: str,
        field: int,
        label_name: str = "cells",
        mode: Literal["cosine", "code"] = "cosine",
    ) -> pd.DataFrame:
        """Mean activation of ``feature`` inside every object of a label image of one field:
        columns label, mean_activation, area."""
        return self.fields.cell_values(feature, well, field, label_name, mode)

    def label_image(self, well: str, field: int, label_name: str) -> np.ndarray:
        """The full-resolution label image ``label_name`` of one field, cached."""
        return self.fields.label_image(well, field, label_name)

    def crop_pixels(self, rows: Sequence[int], size: int) -> list[np.ndarray]:
        """(C, h, w) raw pixels of the crops of store ``rows``, about ``size`` pixels on a side."""
        return self.fields.crop_pixels(rows, size)

    def crop_image(self, row: int) -> np.ndarray:
        """(C, s, s) pixels of the crop of store row ``row``, read from the plate."""
        return self.fields.crop_image(row)

    def in_memory(
        self,
        well: str,
        *,
        mode: Literal["cosine", "code"] = "cosine",
        label_name: str | None = None,
        crop_rows: Sequence[int] = (),
        thumbnail_size: int = THUMBNAIL_SIZE,
    ) -> bool:
        """Whether showing ``well`` needs no disk read (see :meth:`PlateFields.in_memory`)."""
        return self.fields.in_memory(
            well, mode=mode, label_name=label_name, crop_rows=crop_rows, thumbnail_size=thumbnail_size
        )

    def preload(
        self,
        *,
        n_top_crops: int = TOP_CROPS,
        thumbnail_size: int = THUMBNAIL_SIZE,
        label_name: str | None = None,
        progress: ProgressLike | None = None,
        cancel: CancelLike | None = None,
    ) -> PreloadSummary:
        """Read, within the ``cache_bytes`` budget, what selecting a feature would otherwise read
        from disk: the plate's cell label images, the pixels of every live feature's
        ``n_top_crops`` most active crops on the plate, the plate's pre-processed patch tokens
        (slow; run in a worker after :meth:`prepare`)."""
        fields = self.fields
        live = np.flatnonzero(self._prepared_stats.frequency >= self.dead_threshold)
        crop_rows = [row for feature in live for row, _ in fields.top_rows(int(feature), n_top_crops)]
        return fields.preload(crop_rows=crop_rows if n_top_crops > 0 else (), thumbnail_size=thumbnail_size,
                              label_name=label_name, progress=progress, cancel=cancel)
