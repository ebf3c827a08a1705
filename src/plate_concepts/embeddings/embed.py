"""Embed a plate: fields -> crops -> embedder -> embedding store, resumable and cancellable.

Per field (read one at a time with ``dask.compute``; the next field is read in a background
thread while the current crops are embedded): scale intensities, cut the crop grid, optionally
drop crops with too little nuclear foreground, and queue the crops. Queued crops are embedded in
batches of ``batch_size`` on the device; every ``group_size`` embedded crops are appended to the
store in one commit, so an interruption loses at most one group.

Resuming: calling :func:`embed_plate` again on the same store skips every crop whose key
(plate, well, field, crop_y, crop_x) is already stored, and reuses the plate's recorded
intensity levels, so the finished store matches an uninterrupted run. Settings that would make
tokens incomparable (model, crop size, channels, tiling, normalisation, patch tokens) must match
the store's provenance, else a ``ValueError`` says which differs. Several plates can share one
store; each has its record under ``provenance["plates"][plate.name]``.

Obs columns: ``plate, well, field, crop_y, crop_x, crop_size``, the well's plate-map columns
(all but the well/position columns; a column named like a store column gets a ``platemap_``
prefix), ``is_control`` when a control spec is given and ``foreground_fraction`` when
``min_foreground`` is set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from plate_concepts._progress import ProgressLike, progress_ticker
from plate_concepts.embeddings.embedders import (
    Embedder,
    crop_tokens,
    describe_embedder,
    load_embedder,
    output_shape,
)
from plate_concepts.embeddings.store import INDEX_COLUMNS, EmbeddingStore
from plate_concepts.embeddings.tiling import (
    CropGrid,
    IntensityNormalizer,
    foreground_fraction,
    nuclear_channel,
    tile_field,
)
from plate_concepts.plates.geometry import parse_well
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import (
    ROW_COLUMN_PAIRS,
    WELL_COLUMN_NAMES,
    ControlSpec,
    as_text,
    control_mask,
)

CancelLike = threading.Event | Callable[[], bool]
RESERVED_COLUMNS = (*INDEX_COLUMNS, "is_control", "foreground_fraction")
_POSITION_COLUMNS = {n.lower() for n in WELL_COLUMN_NAMES} | {n.lower() for p in ROW_COLUMN_PAIRS for n in p}


def embed_plate(
    plate: Plate,
    store_path: str | PathLike,
    embedder: Embedder | str,
    *,
    crop_size: int = 256,
    stride: int | None = None,
    batch_size: int = 32,
    drop_edge: bool = False,
    min_foreground: float | None = None,
    nuclear: str | int | None = None,
    channels: list[str] | None = None,
    normalizer: IntensityNormalizer | None = None,
    patch_tokens: bool = False,
    control: ControlSpec | str | None = None,
    device: str | torch.device = "auto",
    token_dtype: str = "float32",
    group_size: int = 1024,
    overwrite: bool = False,
    progress: ProgressLike | None = None,
    cancel: CancelLike | None = None,
) -> EmbeddingStore:
    """Embed every crop of ``plate`` into the store at ``store_path`` (created, or resumed).

    Parameters
    ----------
    embedder
        An :class:`Embedder` or a spec for :func:`load_embedder` (``"efficientnet-lite0"``...).
    crop_size, stride, drop_edge
        The crop grid of every field (:func:`tile_field`).
    min_foreground
        Skip crops whose nuclear foreground fraction is below this (None: keep all); the nuclear
        channel is ``nuclear`` (name or index) or found by name (DNA/DAPI/Hoechst).
    channels
        Channel names to embed, in this order (default: all of the plate's).
    normalizer
        Intensity scaling; default ``IntensityNormalizer()`` (0.1-99.9 percentiles per plate),
        fitted on the plate when not fitted yet.
    patch_tokens
        Also store each crop's patch-token grid (float16).
    control
        Which wells are controls (``ControlSpec`` or ``"column=value[,value]"``): sets ``is_control``.
    device
        ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda:1"``...
    group_size
        Embedded crops per store append (one commit); also bounds the crops lost by a crash.
    overwrite
        Replace an existing store instead of resuming it.
    progress
        ``callable(done, total)``, a tqdm-like object (``update(n)``) or True (a tqdm bar);
        done counts crop positions settled (stored before, embedded, or skipped as background).
    cancel
        ``threading.Event`` or ``callable() -> bool``, checked after every batch: the crops
        embedded so far are appended, then the function returns; run it again to resume.
    """
    if not isinstance(plate, Plate):
        raise TypeError(
            f"plate must be a Plate (see plate_concepts.plates.open_plate), got {type(plate).__name__}"
        )
    batch_size = _positive(batch_size, "batch_size")
    group_size = _positive(group_size, "group_size")
    if min_foreground is not None and not 0 <= min_foreground <= 1:
        raise ValueError(f"min_foreground must be a fraction in [0, 1], got {min_foreground}")
    if isinstance(control, str):
        control = ControlSpec.parse(control)
    if isinstance(embedder, str):
        embedder = load_embedder(embedder)

    channel_index = _channel_indices(plate, channels)
    channel_names = [plate.channels[i] for i in channel_index]
    grid = tile_field(plate.image_shape, crop_size, drop_edge=drop_edge, stride=stride)
    nuclear_index = nuclear_channel(plate.channels, nuclear) if min_foreground is not None else None
    well_metadata = _well_metadata(plate, control)

    embedder = embedder.to(device)
    gh, gw, dim = output_shape(embedder, len(channel_index), crop_size)
    tiling = {
        "crop_size": int(crop_size),
        "stride": grid.stride,
        "drop_edge": bool(drop_edge),
        "min_foreground": min_foreground,
        "nuclear_channel": None if nuclear_index is None else plate.channels[nuclear_index],
    }
    store = _open_or_create(
        Path(store_path),
        embedder,
        dim,
        crop_size,
        (gh, gw),
        patch_tokens,
        channel_names,
        token_dtype,
        overwrite,
    )
    normalizer = _plate_normalizer(store, plate, normalizer, tiling, channel_index)
    _record_plate(store, plate, normalizer, tiling, control, complete=False)

    done_keys = {key[1:] for key in store.completed_keys() if key[0] == plate.name}  # (well, field, y, x)
    fields = sorted(plate.images, key=lambda key: (parse_well(key[0]), key[1]))
    pending = {
        key: [i for i, (y, x) in enumerate(grid) if (key[0], key[1], y, x) not in done_keys] for key in fields
    }
    total = len(grid) * len(fields)
    runner = _Runner(
        store, embedder, (gh, gw, dim), batch_size, group_size, patch_tokens, _as_cancel(cancel)
    )
    with progress_ticker(progress, total, "embedding", "crop") as tick:
        runner.tick = tick
        runner.settled = total - sum(len(todo) for todo in pending.values())
        tick(runner.settled)
        todo_fields = [key for key in fields if pending[key]]
        reader = _FieldReader(plate, grid, normalizer, channel_index, nuclear_index)
        with closing(reader.iterate(todo_fields, pending, lambda: runner.cancelled)) as field_stream:
            for field_crops in field_stream:
                keep = np.arange(len(field_crops.indices))
                if min_foreground is not None:
                    keep = np.flatnonzero(field_crops.foreground >= min_foreground)
                    runner.settled += len(field_crops.indices) - len(keep)
                rows = _obs_rows(plate.name, field_crops, keep, grid, well_metadata)
                runner.add(field_crops.crops[keep], rows)
                if runner.cancelled:
                    break
        runner.finish()
    if not runner.cancelled:
        _record_plate(store, plate, normalizer, tiling, control, complete=True)
    return store


# ---------------------------------------------------------------------- reading fields
@dataclass
class _FieldCrops:
    well: str
    field: int
    indices: list[int]
    crops: np.ndarray  # (n, C, s, s) float32 in [0, 1]
    foreground: np.ndarray | None


def _obs_rows(
    plate_name: str,
    field_crops: _FieldCrops,
    keep: np.ndarray,
    grid: CropGrid,
    well_metadata: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One obs row per kept crop of a field."""
    labels = well_metadata.get(field_crops.well, {})
    rows = []
    for k in keep:
        y, x = (int(v) for v in grid.positions[field_crops.indices[k]])
        row = {
            "plate": plate_name,
            "well": field_crops.well,
            "field": field_crops.field,
            "crop_y": y,
            "crop_x": x,
            "crop_size": grid.crop_size,
            **labels,
        }
        if field_crops.foreground is not None:
            row["foreground_fraction"] = float(field_crops.foreground[k])
        rows.append(row)
    return rows


class _FieldReader:
    """Read, scale and cut one field at a time; the next field is prepared in a thread."""

    def __init__(
        self,
        plate: Plate,
        grid: CropGrid,
        normalizer: IntensityNormalizer,
        channel_index: list[int],
        nuclear_index: int | None,
    ) -> None:
        self.plate, self.grid, self.normalizer = plate, grid, normalizer
        self.channel_index, self.nuclear_index = channel_index, nuclear_index

    def read(self, key: tuple[str, int], indices: list[int]) -> _FieldCrops:
        well, field = key
        image = np.asarray(self.plate.image(well, field).compute())
        foreground = None
        if self.nuclear_index is not None:
            foreground = foreground_fraction(image[self.nuclear_index], self.grid)[indices]
        scaled = self.normalizer(image[self.channel_index])
        return _FieldCrops(well, field, indices, self.grid.cut(scaled, indices), foreground)

    def iterate(
        self,
        keys: list[tuple[str, int]],
        pending: dict[tuple[str, int], list[int]],
        stop: Callable[[], bool],
    ) -> Iterator[_FieldCrops]:
        if not keys:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plate-reader") as pool:
            future = pool.submit(self.read, keys[0], pending[keys[0]])
            for position in range(len(keys)):
                current = future.result()
                if position + 1 < len(keys) and not stop():
                    following = keys[position + 1]
                    future = pool.submit(self.read, following, pending[following])
                yield current
                if stop():
                    return


# ---------------------------------------------------------------------- embedding and appending
class _Runner:
    """Queue crops, embed full batches, append every ``group_size`` results."""

    def __init__(
        self,
        store: EmbeddingStore,
        embedder: Embedder,
        shape: tuple[int, int, int],
        batch_size: int,
        group_size: int,
        patch_tokens: bool,
        cancel: Callable[[], bool],
    ) -> None:
        self.store, self.embedder, self.shape = store, embedder, shape
        self.batch_size, self.group_size, self.patch_tokens = batch_size, group_size, patch_tokens
        self.cancel = cancel
        self.cancelled = False
        self.queue: list[tuple[np.ndarray, list[dict[str, Any]]]] = []
        self.queued = 0
        self.tokens: list[np.ndarray] = []
        self.patches: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []
        self.settled = 0
        self.tick: Callable[[int], None] = lambda done: None

    def add(self, crops: np.ndarray, rows: list[dict[str, Any]]) -> None:
        if len(rows):
            self.queue.append((crops, rows))
            self.queued += len(rows)
        while self.queued >= self.batch_size and not self.cancelled:
            self._embed_batch(self.batch_size)

    def finish(self) -> None:
        while self.queued and not self.cancelled:
            self._embed_batch(min(self.batch_size, self.queued))
        self._append()

    def _take(self, n: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        crops, rows = [], []
        while n:
            head_crops, head_rows = self.queue[0]
            k = min(n, len(head_rows))
            crops.append(head_crops[:k])
            rows.extend(head_rows[:k])
            if k == len(head_rows):
                self.queue.pop(0)
            else:
                self.queue[0] = (head_crops[k:], head_rows[k:])
            n -= k
        self.queued -= len(rows)
        return np.concatenate(crops), rows

    def _embed_batch(self, n: int) -> None:
        crops, rows = self._take(n)
        batch = torch.from_numpy(crops)
        patches = self.embedder(batch)
        expected = (len(rows), *self.shape)
        if tuple(patches.shape) != expected:
            raise ValueError(
                f"embedder {self.embedder.name!r} returned {tuple(patches.shape)} for {len(rows)} "
                f"crops; expected {expected} (as on its first call)"
            )
        self.tokens.append(crop_tokens(patches.float()).cpu().numpy())
        if self.patch_tokens:
            self.patches.append(patches.to(torch.float16).cpu().numpy())
        self.rows.extend(rows)
        if len(self.rows) >= self.group_size:
            self._append()
        if self.cancel():
            self.cancelled = True
            self._append()

    def _append(self) -> None:
        if not self.rows:
            return
        self.store.append(
            np.concatenate(self.tokens),
            pd.DataFrame(self.rows),
            patch_tokens=np.concatenate(self.patches) if self.patch_tokens else None,
        )
        self.settled += len(self.rows)
        self.tokens, self.patches, self.rows = [], [], []
        self.tick(self.settled)


# ---------------------------------------------------------------------- store and provenance
def _open_or_create(
    path: Path,
    embedder: Embedder,
    dim: int,
    crop_size: int,
    grid: tuple[int, int],
    patch_tokens: bool,
    channel_names: list[str],
    token_dtype: str,
    overwrite: bool,
) -> EmbeddingStore:
    provenance = {
        "model": embedder.name,
        "embedder": describe_embedder(embedder),
        "token": "mean of the crop's patch tokens",
        "crop_size": int(crop_size),
        "channels": channel_names,
        "patch_grid": list(grid),
        "plates": {},
    }
    if overwrite or not EmbeddingStore.is_store(path):
        return EmbeddingStore.create(
            path,
            dim,
            dtype=token_dtype,
            patch_grid=grid if patch_tokens else None,
            provenance=provenance,
            overwrite=overwrite,
        )
    store = EmbeddingStore.open(path)
    recorded = store.provenance
    mismatches = []
    for key in ("model", "crop_size", "channels", "patch_grid"):
        if recorded.get(key) != provenance[key]:
            mismatches.append(f"{key}: store {recorded.get(key)!r}, now {provenance[key]!r}")
    if store.dim != dim:
        mismatches.append(f"token dimension: store {store.dim}, now {dim}")
    if (store.patch_grid is not None) != bool(patch_tokens):
        has = "has" if store.patch_grid else "has no"
        mismatches.append(f"patch tokens: store {has} patch tokens, now patch_tokens={patch_tokens}")
    if mismatches:
        raise ValueError(
            f"embedding store {path} was made with other settings, so its tokens would not be "
            f"comparable ({'; '.join(mismatches)}); use a new store or overwrite=True"
        )
    return store


def _plate_normalizer(
    store: EmbeddingStore,
    plate: Plate,
    normalizer: IntensityNormalizer | None,
    tiling: dict[str, Any],
    channel_index: list[int],
) -> IntensityNormalizer:
    """The plate's recorded normaliser when resuming (after checking the settings), else the
    given (or default) one, fitted on the plate's selected channels."""
    record = store.provenance.get("plates", {}).get(plate.name)
    if record is not None:
        changed = [
            f"{key}: store {record.get(key)!r}, now {value!r}"
            for key, value in tiling.items()
            if record.get(key) != value
        ]
        stored = IntensityNormalizer.from_record(record["normalization"])
        if normalizer is not None and not stored.same_settings(normalizer):
            changed.append(f"normalization: store {record['normalization']}, now {normalizer.describe()}")
        if changed:
            raise ValueError(
                f"plate {plate.name!r} is already in embedding store {store.path} with other settings "
                f"({'; '.join(changed)}); use the same settings to resume, or a new store"
            )
        return stored
    if normalizer is None:
        normalizer = IntensityNormalizer()
    if not normalizer.is_fitted:
        # Fit a copy: the caller's normaliser may be shared between plates.
        normalizer = IntensityNormalizer.from_record(normalizer.describe())
        normalizer.fit(_channel_view(plate, channel_index))
    return normalizer


def _record_plate(
    store: EmbeddingStore,
    plate: Plate,
    normalizer: IntensityNormalizer,
    tiling: dict[str, Any],
    control: ControlSpec | None,
    complete: bool,
) -> None:
    plates = store.provenance.get("plates", {})
    plates[plate.name] = {
        "source": plate.source,
        "reader": plate.reader,
        "channels": list(plate.channels),
        "normalization": normalizer.describe(),
        **tiling,
        "control": None if control is None else str(control),
        "complete": complete,
    }
    store.update_provenance(plates=plates)


# ---------------------------------------------------------------------- helpers
def _channel_indices(plate: Plate, channels: list[str] | None) -> list[int]:
    if channels is None:
        return list(range(len(plate.channels)))
    lowered = [c.lower() for c in plate.channels]
    missing = [c for c in channels if c.lower() not in lowered]
    if missing or not channels:
        raise ValueError(
            f"channels {missing or channels} are not among the plate's channels {plate.channels}"
        )
    return [lowered.index(c.lower()) for c in channels]


def _channel_view(plate: Plate, channel_index: list[int]) -> Plate:
    """The plate restricted to some channels (lazy; for fitting the normaliser)."""
    if channel_index == list(range(len(plate.channels))):
        return plate
    images = {key: [level[channel_index] for level in levels] for key, levels in plate.images.items()}
    return Plate(
        name=plate.name,
        channels=[plate.channels[i] for i in channel_index],
        images=images,
        reader=plate.reader,
        source=plate.source,
        plate_format=plate.plate_format,
    )


def _well_metadata(plate: Plate, control: ControlSpec | None) -> dict[str, dict[str, Any]]:
    """Per well: its plate-map columns (position columns left out, clashes prefixed) and
    ``is_control`` when a control spec is given."""
    platemap = plate.platemap
    if platemap is None:
        if control is not None:
            raise ValueError(
                f"a control spec ({control}) needs a plate map, but plate {plate.name!r} has none"
            )
        return {}
    columns = {}
    for name in platemap.columns:
        if str(name).lower() in _POSITION_COLUMNS:
            continue
        column = platemap[name]
        if column.dtype == object:  # mixed types do not fit a parquet column: store text
            column = column.map(lambda v: as_text(v) if not _missing(v) else None)
        target = f"platemap_{name}" if str(name) in RESERVED_COLUMNS else str(name)
        columns[target] = column
    metadata: dict[str, dict[str, Any]] = {}
    for well in plate.wells:
        in_map = well in platemap.index
        metadata[well] = {name: _plain(values.loc[well]) for name, values in columns.items()} if in_map else {}
    if control is not None:
        controls = set(platemap.index[control_mask(platemap, control)])
        for well, values in metadata.items():
            values["is_control"] = well in controls
    return metadata


def _missing(value: Any) -> bool:
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _as_cancel(cancel: CancelLike | None) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return cancel.is_set  # type: ignore[union-attr]
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(
        f"cancel must be a threading.Event or a callable returning bool, got {type(cancel).__name__}"
    )


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
