"""Browse a dictionary's features over an embedding store and its plate, fast enough for a GUI.

:class:`FeatureExplorer` does the slow work once, in :meth:`FeatureExplorer.prepare` (meant for
a worker thread): the codes of every token, feature frequencies, per-well aggregates and the
selectivity of every feature for every label column. After that every query
(:meth:`~FeatureExplorer.feature_table`, :meth:`~FeatureExplorer.well_values`,
:meth:`~FeatureExplorer.plate_heatmap`, :meth:`~FeatureExplorer.top_crops`,
:meth:`~FeatureExplorer.label_value_activation`) reads these arrays and answers in milliseconds;
per-feature results are kept in small LRU caches. Field maps (:meth:`~FeatureExplorer.field_map`)
read the patch tokens of one field and keep its pre-processed patches for the next feature.

Choices (ours):

- Selectivity is computed per crop token: each crop token is one "image token" in the
  publication's sense (the mean of one crop's patch tokens), so P(f active | label) is the
  fraction of that label's crops where f is non-zero. Label columns are the obs columns other
  than the index, the control flag and ``foreground_fraction``, holding 2 to
  ``max_label_values`` distinct values (whole numbers when numeric).
- Wells, heatmaps and field maps concern one plate of the store (``plate_name``: the given
  plate's name, or the store's only plate); frequencies and selectivity use every token.
- A store without patch tokens still gets field maps: each crop is filled with its crop
  token's code for the feature (in both modes).
- Where crops overlap (the tiling's border crops), a map pixel takes the value of the crop
  whose centre is nearest (``reduce="central"``): away from crop borders, and linear in the
  token values, so each object's mean is a precomputed sparse map of them (``cell_operator``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from plate_concepts.analysis.activations import (
    Cancelled,
    CancelLike,
    CellOperator,
    ProgressLike,
    WellAggregates,
    cancel_requested,
    cell_activations,
    cell_operator,
    check_feature,
    cosine_map,
    crop_feature_values,
    encode_patches,
    encode_store,
    feature_direction,
    field_activation_map,
    preprocess_patches,
    well_aggregates,
)
from plate_concepts.analysis.metrics import codes_matrix
from plate_concepts.analysis.selectivity import SelectivityResult, selectivity
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.estimators import recorded_batch_column
from plate_concepts.embeddings.store import INDEX_COLUMNS, EmbeddingStore
from plate_concepts.plates.geometry import canonical_well
from plate_concepts.plates.model import Plate

#: Label images tried, in order, for per-cell values.
CELL_LABEL_NAMES = ("cells", "cell", "cytoplasm", "nuclei", "nucleus")
#: Top-activating crops a viewer shows per feature, and their thumbnail size (px): what
#: :meth:`FeatureExplorer.preload` reads by default.
TOP_CROPS = 12
THUMBNAIL_SIZE = 64
#: Fields whose top crops are read in one computation.
CROP_READ_FIELDS = 8
#: Fields whose patch tokens :meth:`FeatureExplorer.preload` reads and pre-processes at once.
PRELOAD_FIELDS = 16
#: Name of the extra row of :meth:`FeatureExplorer.label_value_activation` for control tokens.
CONTROL_GROUP = "controls"
_NOT_LABELS = (*INDEX_COLUMNS, "is_control", "foreground_fraction")


class TopCrop(NamedTuple):
    """One of a feature's most active crops: its store row, place and code value."""

    row: int
    well: str
    field: int
    crop_y: int
    crop_x: int
    crop_size: int
    value: float


class PreloadSummary(NamedTuple):
    """What :meth:`FeatureExplorer.preload` put in memory."""

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


class PlateHeatmap(NamedTuple):
    """A per-well image and the napari ``scale``/``translate`` that lay it over mosaic level 0."""

    image: np.ndarray
    scale: tuple[float, float]
    translate: tuple[float, float]


def _nbytes(value: Any) -> int:
    """Memory held by a cached value: its arrays (and SparseCodes' tensors), summed."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, CellOperator):
        matrix = value.matrix
        return (
            value.ids.nbytes
            + value.area.nbytes
            + sum(a.nbytes for a in (matrix.data, matrix.indices, matrix.indptr))
        )
    if isinstance(value, SparseCodes):
        return sum(t.element_size() * t.nelement() for t in (value.indices, value.values))
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class _LRU:
    """A small thread-safe least-recently-used cache holding at most ``size`` items and, when
    ``max_bytes`` is given, at most that much array memory."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = max(0, int(size))
        self.max_bytes = None if max_bytes is None else max(0, int(max_bytes))
        self.nbytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def peek(self, key: Hashable) -> Any:
        """The cached value of ``key`` (marked as just used), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would stay within the memory budget."""
        return self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()  # outside the lock: a slow computation does not block other keys
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if not self.size or (self.max_bytes is not None and size > self.max_bytes):
                return
            if key in self._items:
                self.nbytes -= _nbytes(self._items.pop(key))
            self._items[key] = value
            self.nbytes += size
            while len(self._items) > self.size or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                self.nbytes -= _nbytes(self._items.popitem(last=False)[1])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


@dataclass
class _Prepared:
    """Everything :meth:`FeatureExplorer.prepare` computes."""

    codes: SparseCodes
    by_token: sparse.csr_array  # (n_tokens, n_features) = codes.dense(), zeros dropped
    by_feature: sparse.csc_array  # the same, by column
    frequency: np.ndarray
    mean_activation: np.ndarray
    wells: WellAggregates
    field_rows: dict[tuple[str, int], np.ndarray]
    selectivity: dict[str, SelectivityResult]
    on_plate: np.ndarray  # store rows of the explorer's plate
    on_plate_mask: np.ndarray  # (n_tokens,) bool: the same rows


class FeatureExplorer:
    """Precomputed feature statistics over an embedding store, and fast queries on them.

    Parameters
    ----------
    store
        An :class:`EmbeddingStore` or its path.
    estimator
        A fitted :class:`~plate_concepts.dictionary.ICFL` / :class:`~plate_concepts.dictionary.TopKSAE`
        or the path of a dictionary file.
    plate
        The plate the store was embedded from (needed for crop images, cell values and the
        exact field shape).
    label_column
        The obs column the feature table describes by default (default: the first label column).
    plate_name
        Which of the store's plates wells refer to (default: ``plate.name`` or the only plate).
    control_column
        Boolean obs column marking control tokens.
    batch_column
        Obs column of batch labels for ``"pca-batch"`` dictionaries (default: the one recorded in
        the dictionary file).
    max_label_values
        Columns with more distinct values are not treated as label columns.
    dead_threshold
        A feature is dead when its frequency over the store is below this.
    cache_size
        Per-feature results kept (field maps and heatmaps keep a few, they are large).
    encode_batch_size
        Tokens encoded per block in :meth:`prepare`.
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
        max_label_values: int = 384,
        dead_threshold: float = 1e-5,
        cache_size: int = 64,
        encode_batch_size: int = 4096,
        cache_bytes: int = 1 << 30,
    ) -> None:
        if not isinstance(store, EmbeddingStore):
            store = EmbeddingStore.open(store)
        if isinstance(estimator, (str, os.PathLike)):
            from plate_concepts.dictionary.estimators import ICFL

            estimator = ICFL.load(estimator)  # the file decides ICFL or TopKSAE
        if not hasattr(estimator, "model_"):
            raise ValueError("the estimator is not fitted: fit it or load a dictionary file first")
        if estimator.n_features_in_ != store.dim:
            raise ValueError(
                f"the dictionary expects {estimator.n_features_in_}-dimensional tokens but embedding store "
                f"{store.path} holds {store.dim}-dimensional ones"
            )
        if len(store) == 0:
            raise ValueError(f"embedding store {store.path} holds no tokens")
        self.store = store
        self.estimator = estimator
        self.plate = plate
        self.control_column = control_column
        self.max_label_values = int(max_label_values)
        self.dead_threshold = float(dead_threshold)
        self.encode_batch_size = int(encode_batch_size)
        self.obs = store.obs
        self.n_features = int(estimator.model_.n_features)
        self.plate_name = self._choose_plate(plate, plate_name)
        self.batch_column = batch_column or recorded_batch_column(estimator)
        if estimator.whitening_.method == "pca-batch" and self.batch_column is None:
            raise ValueError(
                "this dictionary was whitened per batch ('pca-batch'): pass batch_column="
            )
        if self.batch_column is not None and self.batch_column not in self.obs.columns:
            raise ValueError(
                f"batch_column {self.batch_column!r} is not an obs column of {store.path}"
            )
        self.label_columns = self._label_columns()
        if label_column is None:
            label_column = self.label_columns[0] if self.label_columns else None
        elif label_column not in self.obs.columns:
            raise ValueError(
                f"label column {label_column!r} is not an obs column of {store.path} "
                f"(label columns: {self.label_columns})"
            )
        self.label_column = label_column
        self._state: _Prepared | None = None
        self._small = _LRU(cache_size)
        self._large = _LRU(4)
        # Per-field data (pre-processed patch tokens, patch codes, label images, crop pixels)
        # within a memory budget: switching features re-reads none of what it holds.
        self._fields = _LRU(1 << 30, max_bytes=cache_bytes)

    # ------------------------------------------------------------------ set-up
    def _choose_plate(self, plate: Plate | None, plate_name: str | None) -> str:
        plates = sorted(self.obs["plate"].astype(str).unique())
        if plate_name is not None:
            if plate_name not in plates:
                raise ValueError(
                    f"plate {plate_name!r} has no tokens in {self.store.path} (plates: {plates})"
                )
            return plate_name
        if plate is not None and plate.name in plates:
            return plate.name
        if len(plates) == 1:
            return plates[0]
        raise ValueError(
            f"embedding store {self.store.path} holds plates {plates}; pass plate_name= (or the plate) "
            "to choose the one whose wells are shown"
        )

    def _label_columns(self) -> list[str]:
        columns = []
        for column in self.obs.columns:
            if column in _NOT_LABELS or column == self.control_column:
                continue
            values = self.obs[column].dropna()
            if values.dtype.kind == "f" and not np.all(
                values.to_numpy() == np.round(values.to_numpy())
            ):
                continue  # a measurement, not a label
            if 2 <= values.nunique() <= self.max_label_values:
                columns.append(column)
        return columns

    @property
    def is_prepared(self) -> bool:
        return self._state is not None

    def prepare(
        self, progress: ProgressLike | None = None, cancel: CancelLike | None = None
    ) -> FeatureExplorer:
        """Encode every token and compute the per-feature statistics (slow; run in a worker).

        ``progress(done, total)`` counts encoded tokens; ``cancel`` (Event or callable) stops
        the encoding with :class:`~plate_concepts.analysis.activations.Cancelled` and leaves
        the explorer unprepared.
        """
        n = len(self.store)
        codes = encode_store(
            self.estimator,
            self.store,
            batch_size=self.encode_batch_size,
            batches=self.batch_column,
            progress=progress,
            cancel=cancel,
        )
        by_token = codes_matrix(codes)  # = codes.dense(), stored entries = active pairs
        by_feature = by_token.tocsc()  # one feature's tokens in one slice
        by_feature.sort_indices()
        frequency = np.diff(by_feature.indptr) / n
        mean_activation = np.asarray(by_feature.sum(axis=0)).ravel() / n

        obs = self.obs
        on_plate = np.flatnonzero((obs["plate"].astype(str) == self.plate_name).to_numpy())
        wells = well_aggregates(by_token[on_plate], obs["well"].to_numpy()[on_plate])
        field_rows = {
            (str(well), int(field)): on_plate[np.asarray(group)]
            for (well, field), group in obs.iloc[on_plate]
            .reset_index(drop=True)
            .groupby(["well", "field"])
            .indices.items()
        }
        results = {}
        for column in self.label_columns:
            if cancel_requested(cancel):
                raise Cancelled("preparing the feature explorer was cancelled")
            results[column] = selectivity(by_token, obs[column], label=column)
        self._small.clear()
        self._large.clear()
        self._state = _Prepared(
            codes,
            by_token,
            by_feature,
            frequency,
            mean_activation,
            wells,
            field_rows,
            results,
            on_plate,
            np.isin(np.arange(n), on_plate),
        )
        return self

    @property
    def _prepared(self) -> _Prepared:
        if self._state is None:
            raise RuntimeError("the feature explorer is not prepared yet: call prepare() first")
        return self._state

    @property
    def codes(self) -> SparseCodes:
        """Codes of every store token (after :meth:`prepare`)."""
        return self._prepared.codes

    # ------------------------------------------------------------------ tables
    def selectivity(self, label_column: str | None = None) -> SelectivityResult:
        """The selectivity of every feature for the values of a label column."""
        column = self._column(label_column)
        state = self._prepared
        if column not in state.selectivity:  # an obs column beyond max_label_values: on demand
            return self._small.get(
                ("selectivity", column),
                lambda: selectivity(state.by_token, self.obs[column], label=column),
            )
        return state.selectivity[column]

    def _column(self, label_column: str | None) -> str:
        column = label_column or self.label_column
        if column is None:
            raise ValueError(
                f"embedding store {self.store.path} has no label column; pass one that has 2+ values"
            )
        if column not in self.obs.columns:
            raise KeyError(
                f"{column!r} is not an obs column of {self.store.path} (label columns: {self.label_columns})"
            )
        return column

    def feature_table(self, label_column: str | None = None) -> pd.DataFrame:
        """One row per feature: feature, frequency, dead, mean_activation, best_value (the label
        value it is most selective for), max_selectivity and average_selectivity there."""
        state = self._prepared
        column = label_column or self.label_column

        def build() -> pd.DataFrame:
            table = pd.DataFrame(
                {
                    "feature": np.arange(self.n_features),
                    "frequency": state.frequency,
                    "dead": state.frequency < self.dead_threshold,
                    "mean_activation": state.mean_activation,
                }
            )
            if column is None:
                table["best_value"] = None
                table["max_selectivity"] = np.nan
                table["average_selectivity"] = np.nan
                return table
            result = self.selectivity(column).feature_table()
            for name in ("best_value", "max_selectivity", "average_selectivity"):
                table[name] = result[name].to_numpy()
            return table

        return self._small.get(("table", column), build).copy()

    # ------------------------------------------------------------------ per-feature queries
    def feature_values(self, feature: int) -> np.ndarray:
        """(n_tokens,) float32 code of ``feature`` on every store token (0 where inactive)."""
        feature = check_feature(feature, self.n_features)
        state = self._prepared

        def column() -> np.ndarray:
            start, stop = state.by_feature.indptr[feature : feature + 2]
            out = np.zeros(state.by_feature.shape[0], dtype=np.float32)
            out[state.by_feature.indices[start:stop]] = state.by_feature.data[start:stop]
            return out

        return self._small.get(("values", feature), column)

    def well_values(self, feature: int, kind: Literal["mean", "fraction"] = "mean") -> pd.Series:
        """Per-well mean activation (``"mean"``) or fraction of active tokens (``"fraction"``)
        of ``feature``, indexed by well (row by row)."""
        feature = check_feature(feature, self.n_features)
        aggregates = self._prepared.wells
        table = _aggregate_table(aggregates, kind)
        return pd.Series(
            table[:, feature],
            index=pd.Index(aggregates.wells, name="well"),
            name=f"feature {feature} {kind}",
        )

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
            image = np.full(
                (mosaic.shape[0] // factor, mosaic.shape[1] // factor), np.nan, dtype=np.float32
            )
            for well, value in values.items():
                y0, x0, y1, x1 = mosaic.field_grid_box(well)  # exact at every level
                if y1 > mosaic.shape[0] or x1 > mosaic.shape[1]:
                    raise ValueError(f"well {well} lies outside the mosaic's plate format")
                image[y0 // factor : y1 // factor, x0 // factor : x1 // factor] = value
            half = (factor - 1) / 2  # napari: data pixel i is centred at translate + i * scale
            return PlateHeatmap(image, (float(factor), float(factor)), (half, half))

        geometry = (mosaic.shape, mosaic.well_shape, mosaic.tile_shape, mosaic.field_grid)
        return self._large.get(("heatmap", feature, kind, level, geometry), build)

    def top_crops(self, feature: int, n: int = 16, *, on_plate: bool = False) -> list[TopCrop]:
        """The (at most) ``n`` store crops where ``feature`` is most active, largest first;
        ``on_plate``: only crops of the explorer's plate (those it can show)."""
        top = self._top_token_rows(feature, n, on_plate)
        records = self.obs.iloc[[row for row, _ in top]]
        columns = [
            records[c].to_numpy() for c in ("well", "field", "crop_y", "crop_x", "crop_size")
        ]
        return [
            TopCrop(int(row), str(well), int(field), int(y), int(x), int(size), value)
            for (row, value), well, field, y, x, size in zip(top, *columns, strict=True)
        ]

    def _top_token_rows(self, feature: int, n: int, on_plate: bool) -> list[tuple[int, float]]:
        """(row, code) of the ``n`` tokens where ``feature`` is largest (ties: lower row first),
        from the feature's column of active tokens alone."""
        feature = check_feature(feature, self.n_features)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        state = self._prepared
        start, stop = state.by_feature.indptr[feature : feature + 2]
        rows = state.by_feature.indices[start:stop]  # increasing: the matrix is canonical
        values = state.by_feature.data[start:stop]
        if on_plate and len(state.on_plate) < len(self.obs):
            keep = state.on_plate_mask[rows]
            rows, values = rows[keep], values[keep]
        order = np.argsort(-values, kind="stable")[:n]
        return [(int(rows[i]), float(values[i])) for i in order]

    def label_value_activation(self, feature: int, label_column: str | None = None) -> pd.DataFrame:
        """Per value of a label column: n_tokens, n_control (how many of them are control
        tokens), mean_activation (mean code, inactive = 0) and fraction_active of ``feature``;
        plus a last row ``group == "control"`` (value ``"controls"``) over the control tokens,
        for plotting each value against controls."""
        column = self._column(label_column)
        values = self.feature_values(feature)

        def build() -> pd.DataFrame:
            codes, uniques = self._factorized(column)
            labelled = codes >= 0
            counts = np.bincount(codes[labelled], minlength=len(uniques))
            sums = np.bincount(codes[labelled], weights=values[labelled], minlength=len(uniques))
            active = np.bincount(
                codes[labelled], weights=values[labelled] != 0, minlength=len(uniques)
            )
            has_controls = self.control_column in self.obs.columns
            control = self._control_mask() if has_controls else np.zeros(len(codes), bool)
            columns = {
                "value": list(uniques),
                "group": ["label"] * len(uniques),
                "n_tokens": list(counts),
                "n_control": list(
                    np.bincount(codes[labelled & control], minlength=len(uniques))
                ),
                "mean_activation": list(sums / np.maximum(counts, 1)),
                "fraction_active": list(active / np.maximum(counts, 1)),
            }
            if has_controls:
                n_control = int(control.sum())
                shown = values[control]
                for name, value in (
                    ("value", CONTROL_GROUP),
                    ("group", "control"),
                    ("n_tokens", n_control),
                    ("n_control", n_control),
                    ("mean_activation", float(shown.mean()) if n_control else np.nan),
                    ("fraction_active", float((shown != 0).mean()) if n_control else np.nan),
                ):
                    columns[name].append(value)
            return pd.DataFrame(columns)

        return self._small.get(("label_values", int(feature), column), build).copy()

    def _control_mask(self) -> np.ndarray:
        return self._small.get(
            ("control",), lambda: self.obs[self.control_column].eq(True).to_numpy()
        )  # a missing flag counts as not a control

    def _factorized(self, column: str) -> tuple[np.ndarray, list[Any]]:
        def build() -> tuple[np.ndarray, list[Any]]:
            codes, uniques = pd.factorize(self.obs[column], sort=True, use_na_sentinel=True)
            return codes.astype(np.int64), list(uniques)

        return self._small.get(("factorized", column), build)

    # ------------------------------------------------------------------ fields and cells
    def well_fields(self, well: str) -> list[int]:
        """The fields of ``well`` (of the explorer's plate) that have crops in the store, in order."""
        well = canonical_well(well)
        return sorted(field for name, field in self._prepared.field_rows if name == well)

    def field_rows(self, well: str, field: int) -> np.ndarray:
        """Store rows of the crops of one field of the explorer's plate."""
        key = (canonical_well(well), int(field))
        rows = self._prepared.field_rows.get(key)
        if rows is None:
            raise KeyError(
                f"plate {self.plate_name!r} has no crops of well {key[0]} field {key[1]} in {self.store.path}"
            )
        return rows

    def field_shape(self, well: str, field: int) -> tuple[int, int]:
        """(Y, X) of a field: the plate's image shape, or without a plate the extent of its crops."""
        if self.plate is not None:
            return tuple(self.plate.image_shape)  # type: ignore[return-value]
        crops = self.obs.iloc[self.field_rows(well, field)]
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
        return self._large.get(("field", feature, well, field, key_mode, downsample), build)

    def _field_crops(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
        """(crop_y, crop_x, crop_size) of store ``rows``."""
        crops = self.obs.iloc[rows]
        return [
            (int(y), int(x), int(s))
            for y, x, s in zip(crops["crop_y"], crops["crop_x"], crops["crop_size"], strict=True)
        ]

    def _field_grids(self, feature: int, well: str, field: int, mode: str) -> np.ndarray:
        """(n_crops, gh, gw) values of ``feature`` on the token grids of one field's crops, in
        ``mode``; (n_crops, 1, 1) crop codes when the store has no patch tokens."""
        rows = self.field_rows(well, field)
        if self.store.patch_grid is None:
            return self.feature_values(feature)[rows].reshape(-1, 1, 1)
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

        return self._fields.get(("cell_operator", well, field, label_name), build)

    def _field_patches(self, well: str, field: int) -> np.ndarray:
        """Pre-processed patch tokens (n_crops, gh, gw, d') of one field, cached for the next feature."""

        def build() -> np.ndarray:
            rows = self.field_rows(well, field)
            batches = (
                None if self.batch_column is None else self.obs[self.batch_column].to_numpy()[rows]
            )
            return preprocess_patches(self.estimator, self.store.read_patches(rows), batches)

        return self._fields.get(("patches", well, field), build)

    def _field_patch_codes(self, well: str, field: int) -> tuple[SparseCodes, tuple[int, int]]:
        def build() -> tuple[SparseCodes, tuple[int, int]]:
            patches = self._field_patches(well, field)
            return encode_patches(self.estimator, patches), patches.shape[1:3]

        return self._fields.get(("patch_codes", well, field), build)

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
        :func:`~plate_concepts.analysis.activations.cell_activations`)."""
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

        return self._fields.get(("labels", well, field, label_name), build)

    def crop_pixels(self, rows: Sequence[int], size: int) -> list[np.ndarray]:
        """(C, h, w) raw pixels of the crops of store ``rows``, about ``size`` pixels on a side:
        read from the coarsest pyramid level that still has ``size`` pixels per crop, then
        strided; cached (thumbnails). Crops not cached yet are read together."""
        for row in rows:
            self._plate_record(row)
        size = int(size)
        cached = {int(row): self._fields.peek(("crop", int(row), size)) for row in rows}
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
        records = self.obs.iloc[rows]
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
                    self._fields.put(("crop", rows[index], size), out[index])
        return out

    def _crop_bytes(self, rows: list[int], size: int) -> int:
        """Memory the pixels of these crops take once read (as :meth:`crop_pixels` reads)."""
        plate = self._require_plate("crop images")
        records = self.obs.iloc[rows]
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
        return all(key in self._fields for key in keys)

    def preload(
        self,
        *,
        n_top_crops: int = TOP_CROPS,
        thumbnail_size: int = THUMBNAIL_SIZE,
        label_name: str | None = None,
        progress: ProgressLike | None = None,
        cancel: CancelLike | None = None,
    ) -> PreloadSummary:
        """Read, within the ``cache_bytes`` budget, what selecting a feature would otherwise
        read from disk (slow; run in a worker after :meth:`prepare`):

        1. the cell label image (``label_name``, default :func:`cell_label_name`) of every field;
        2. the pixels of every feature's ``n_top_crops`` most active crops, for thumbnails of
           ``thumbnail_size`` pixels;
        3. the pre-processed patch tokens of every field, in store order, while they fit.

        ``progress(done, total)`` counts fields; ``cancel`` raises
        :class:`~plate_concepts.analysis.activations.Cancelled` (what was read stays cached).
        """
        state = self._prepared
        fields = sorted(state.field_rows, key=lambda key: int(state.field_rows[key][0]))
        has_images = self.plate is not None
        label_name = label_name or (cell_label_name(self.plate.label_names) if has_images else None)
        crop_rows = (
            sorted(
                {
                    row
                    for feature in np.flatnonzero(state.frequency >= self.dead_threshold)
                    for row, _ in self._top_token_rows(int(feature), n_top_crops, on_plate=True)
                }
            )
            if has_images and n_top_crops > 0
            else []
        )
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
                    if not self._fields.fits(labels.size * labels.dtype.itemsize):
                        break
                    self.label_image(well, field, label_name)
                    self._cell_operator(well, field, label_name)
                    labelled += 1
                step(1)
        n_crops = 0
        for start in range(0, len(crop_rows), 256):
            block = crop_rows[start : start + 256]
            if not self._fields.fits(self._crop_bytes(block, thumbnail_size)):
                break
            self._read_crop_pixels(block, int(thumbnail_size))
            n_crops += len(block)
            step(len(block))
        loaded = 0
        if with_patches:
            for start in range(0, len(fields), PRELOAD_FIELDS):
                block = fields[start : start + PRELOAD_FIELDS]
                rows = np.concatenate([state.field_rows[key] for key in block])
                grid = self.store.patch_grid
                expected = (
                    len(rows) * grid[0] * grid[1] * self.estimator.model_.decoder.shape[1] * 4
                )
                if not self._fields.fits(expected):
                    break  # the budget is spent: later fields are read when shown
                batches = (
                    None
                    if self.batch_column is None
                    else self.obs[self.batch_column].to_numpy()[rows]
                )
                patches = preprocess_patches(self.estimator, self.store.read_patches(rows), batches)
                offset = 0
                for key in block:
                    n = len(state.field_rows[key])
                    # A copy: a view would keep the whole block alive after eviction.
                    self._fields.put(("patches", *key), patches[offset : offset + n].copy())
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
            nbytes=self._fields.nbytes,
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
        n = len(self.obs)
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= int(row) < n:
            raise IndexError(f"row {row!r} is not a token row of {self.store.path} (0..{n - 1})")
        record = self.obs.iloc[int(row)]
        if str(record["plate"]) != self.plate_name:
            raise ValueError(
                f"row {row} belongs to plate {record['plate']!r}, not to the explorer's plate {self.plate_name!r}"
            )
        return record

    def _require_plate(self, what: str) -> Plate:
        if self.plate is None:
            raise ValueError(
                f"{what} need the plate's images: create the FeatureExplorer with plate="
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


def _aggregate_table(aggregates: WellAggregates, kind: str) -> np.ndarray:
    if kind == "mean":
        return aggregates.mean_activation
    if kind == "fraction":
        return aggregates.fraction_active
    raise ValueError(f"kind must be 'mean' or 'fraction', got {kind!r}")
