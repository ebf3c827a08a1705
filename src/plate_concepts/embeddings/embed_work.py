"""The work of embedding one plate, apart from the store it goes to: what to embed
(:class:`PlateJob`: crop grid, channels, intensity scaling, per-well labels, the crops still to
do), reading and cutting its fields (:class:`FieldReader`) and embedding crops in batches
(:class:`CropBatcher`, which hands finished groups of tokens to a ``commit`` callable).

Nothing here writes to a store: :mod:`plate_concepts.embeddings.embed` commits the groups, so the
per-field work can run elsewhere (a worker) while one process commits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from plate_concepts.embeddings.embedders import Embedder, crop_tokens
from plate_concepts.embeddings.obs_index import INDEX_COLUMNS, OBJECT_COLUMNS
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

RESERVED_COLUMNS = (*INDEX_COLUMNS, *OBJECT_COLUMNS, "is_control", "foreground_fraction")
_POSITION_COLUMNS = {n.lower() for n in WELL_COLUMN_NAMES} | {
    n.lower() for p in ROW_COLUMN_PAIRS for n in p
}
Commit = Callable[[np.ndarray, np.ndarray | None, list[dict[str, Any]]], None]


@dataclass
class PlateJob:
    """One plate to embed: its crop grid, channels, scaling, labels and remaining crops."""

    plate: Plate
    grid: CropGrid
    channel_index: list[int]
    nuclear_index: int | None
    normalizer: IntensityNormalizer
    well_metadata: dict[str, dict[str, Any]]
    tiling: dict[str, Any]
    control: ControlSpec | None
    min_foreground: float | None
    #: Per field (well, field): indices into the grid of the crops not stored yet.
    pending: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.grid) * len(self.plate.images)

    @property
    def remaining(self) -> int:
        return sum(len(todo) for todo in self.pending.values())

    def set_done(self, done_keys: set[tuple[str, int, int, int]]) -> None:
        """Leave out the crops whose (well, field, crop_y, crop_x) are stored already."""
        fields = sorted(self.plate.images, key=lambda key: (parse_well(key[0]), key[1]))
        self.pending = {
            key: [
                i for i, (y, x) in enumerate(self.grid) if (key[0], key[1], y, x) not in done_keys
            ]
            for key in fields
        }

    def record(self, complete: bool) -> dict[str, Any]:
        """The plate's provenance record (what a resumed run must match)."""
        plate = self.plate
        return {
            "source": plate.source,
            "reader": plate.reader,
            # rows x columns: edge wells are the plate's, not those of the imaged part of it
            "format": [plate.plate_format.n_rows, plate.plate_format.n_columns],
            "channels": list(plate.channels),
            "normalization": self.normalizer.describe(),
            **self.tiling,
            "control": None if self.control is None else str(self.control),
            "platemap": {
                "source": getattr(plate, "platemap_source", None),
                "columns": label_names(self.well_metadata),
                "sha256": metadata_digest(self.well_metadata),
            },
            "complete": complete,
        }


def prepare_plate(
    plate: Plate,
    *,
    crop_size: int,
    stride: int | None,
    drop_edge: bool,
    min_foreground: float | None,
    nuclear: str | int | None,
    channels: list[str] | None,
    control: ControlSpec | None,
) -> PlateJob:
    """Everything about a plate's crops but the intensity scaling (set by the caller, which
    may reuse a recorded one) and the crops already stored."""
    channel_index = channel_indices(plate, channels)
    grid = tile_field(plate.image_shape, crop_size, drop_edge=drop_edge, stride=stride)
    nuclear_index = nuclear_channel(plate.channels, nuclear) if min_foreground is not None else None
    tiling = {
        "crop_size": int(crop_size),
        "stride": grid.stride,
        "drop_edge": bool(drop_edge),
        "min_foreground": min_foreground,
        "nuclear_channel": None if nuclear_index is None else plate.channels[nuclear_index],
    }
    return PlateJob(
        plate=plate, grid=grid, channel_index=channel_index, nuclear_index=nuclear_index,
        normalizer=IntensityNormalizer(), well_metadata=well_metadata(plate, control),
        tiling=tiling, control=control, min_foreground=min_foreground,
    )  # fmt: skip


# ---------------------------------------------------------------------- fields
@dataclass
class FieldCrops:
    """The crops of one field still to embed, cut and scaled, with their obs rows."""

    well: str
    field: int
    crops: np.ndarray  # (n, C, s, s) float32 in [0, 1]
    rows: list[dict[str, Any]]
    skipped: int  # crops left out for too little foreground


class FieldReader:
    """Read, scale and cut one field at a time; the next field is prepared in a thread."""

    def __init__(self, job: PlateJob) -> None:
        self.job = job

    def read(self, key: tuple[str, int]) -> FieldCrops:
        """The crops of field ``key`` that are still pending (the per-field unit of work)."""
        job, (well, field_index) = self.job, key
        indices = job.pending[key]
        # Read here (threads), never through a Dask cluster: on a worker that would move pixels.
        image = np.asarray(job.plate.image(well, field_index).compute(scheduler="threads"))
        keep = np.arange(len(indices))
        foreground = None
        if job.nuclear_index is not None:
            foreground = foreground_fraction(image[job.nuclear_index], job.grid)[indices]
            keep = np.flatnonzero(foreground >= job.min_foreground)
        scaled = job.normalizer(image[job.channel_index])
        chosen = [indices[k] for k in keep]
        labels = job.well_metadata.get(well, {})
        rows = []
        for k, index in zip(keep, chosen, strict=True):
            y, x = (int(v) for v in job.grid.positions[index])
            row = {"plate": job.plate.name, "well": well, "field": field_index, "crop_y": y,
                   "crop_x": x, "crop_size": job.grid.crop_size, **labels}  # fmt: skip
            if foreground is not None:
                row["foreground_fraction"] = float(foreground[k])
            rows.append(row)
        crops = job.grid.cut(scaled, chosen)
        return FieldCrops(well, field_index, crops, rows, len(indices) - len(chosen))

    def keys(self) -> list[tuple[str, int]]:
        """The fields to read, in order."""
        return [key for key, todo in self.job.pending.items() if todo]

    def iterate(self, stop: Callable[[], bool]) -> Iterator[FieldCrops]:
        keys = self.keys()
        if not keys:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plate-reader") as pool:
            future = pool.submit(self.read, keys[0])
            for position in range(len(keys)):
                current = future.result()
                if position + 1 < len(keys) and not stop():
                    future = pool.submit(self.read, keys[position + 1])
                yield current
                if stop():
                    return


# ---------------------------------------------------------------------- embedding
class CropBatcher:
    """Queue crops, embed full batches on the device, hand every ``group_size`` embedded crops
    (tokens, patch grids or None, obs rows) to ``commit``."""

    def __init__(
        self,
        embedder: Embedder,
        shape: tuple[int, int, int],
        batch_size: int,
        group_size: int,
        patch_tokens: bool,
        commit: Commit,
        cancel: Callable[[], bool],
    ) -> None:
        self.embedder, self.shape, self.commit, self.cancel = embedder, shape, commit, cancel
        self.batch_size, self.group_size, self.patch_tokens = batch_size, group_size, patch_tokens
        self.cancelled = False
        self.queue: list[tuple[np.ndarray, list[dict[str, Any]]]] = []
        self.queued = 0
        self.tokens: list[np.ndarray] = []
        self.patches: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []

    def add(self, crops: np.ndarray, rows: list[dict[str, Any]]) -> None:
        if len(rows):
            self.queue.append((crops, rows))
            self.queued += len(rows)
        while self.queued >= self.batch_size and not self.cancelled:
            self._embed_batch(self.batch_size)

    def finish(self) -> None:
        """Embed what is queued (unless cancelled) and commit what is embedded."""
        while self.queued and not self.cancelled:
            self._embed_batch(min(self.batch_size, self.queued))
        self._commit()

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
        patches = self.embedder(torch.from_numpy(crops))
        expected = (len(rows), *self.shape)
        if tuple(patches.shape) != expected:
            raise ValueError(
                f"the embedder {self.embedder.name!r} returned an output of shape "
                f"{tuple(patches.shape)} for {len(rows)} crops of plate {rows[0]['plate']!r} "
                f"(first crop: well {rows[0]['well']}, field {rows[0]['field']}); it returned "
                f"{expected} per batch before: a model must give every crop the same shape"
            )
        self.tokens.append(crop_tokens(patches.float()).cpu().numpy())
        if self.patch_tokens:
            self.patches.append(patches.to(torch.float16).cpu().numpy())
        self.rows.extend(rows)
        if len(self.rows) >= self.group_size:
            self._commit()
        if self.cancel():
            self.cancelled = True
            self._commit()

    def _commit(self) -> None:
        if not self.rows:
            return
        patches = np.concatenate(self.patches) if self.patch_tokens else None
        self.commit(np.concatenate(self.tokens), patches, self.rows)
        self.tokens, self.patches, self.rows = [], [], []


# ---------------------------------------------------------------------- labels
def well_metadata(plate: Plate, control: ControlSpec | None) -> dict[str, dict[str, Any]]:
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
        metadata[well] = (
            {name: _plain(values.loc[well]) for name, values in columns.items()} if in_map else {}
        )
    if control is not None:
        controls = set(platemap.index[control_mask(platemap, control)])
        for well, values in metadata.items():
            values["is_control"] = well in controls
    return metadata


def label_names(metadata: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({name for values in metadata.values() for name in values})


def metadata_digest(metadata: dict[str, dict[str, Any]]) -> str:
    """A fingerprint of the per-well labels (values as text), to tell a changed plate map."""
    text = {
        well: {k: as_text(v) for k, v in sorted(values.items())}
        for well, values in sorted(metadata.items())
    }
    return hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()


def label_changes(stored: pd.DataFrame, metadata: dict[str, dict[str, Any]]) -> list[str]:
    """How the labels of the wells already embedded (``stored``: the plate's obs rows) differ
    from ``metadata``: one phrase per difference, at most a few."""
    ignore = {*INDEX_COLUMNS, *OBJECT_COLUMNS, "foreground_fraction", "obs_name"}
    old_columns = {c for c in stored.columns if c not in ignore and stored[c].notna().any()}
    changes = []
    new_columns = set(label_names(metadata))
    if old_columns != new_columns:
        added, removed = sorted(new_columns - old_columns), sorted(old_columns - new_columns)
        changes.append(
            "plate-map columns "
            + "; ".join(
                part
                for part in (
                    f"added {added}" if added else "",
                    f"gone {removed}" if removed else "",
                )
                if part
            )
        )
    firsts = stored.drop_duplicates("well").set_index("well")
    for well, old in firsts.iterrows():
        new = metadata.get(str(well), {})
        for column in sorted(old_columns & new_columns):
            before, now = as_text(old[column]), as_text(new.get(column))
            if before != now:
                changes.append(f"well {well} {column}: {before!r} in the store, {now!r} now")
                if len(changes) >= 4:
                    return changes
    return changes


# ---------------------------------------------------------------------- helpers
def channel_indices(plate: Plate, channels: list[str] | None) -> list[int]:
    if channels is None:
        return list(range(len(plate.channels)))
    lowered = [c.lower() for c in plate.channels]
    missing = [c for c in channels if c.lower() not in lowered]
    if missing or not channels:
        raise ValueError(
            f"channels {missing or channels} are not among the channels of plate "
            f"{plate.name!r}: {plate.channels}"
        )
    repeated = sorted({c for c in channels if [d.lower() for d in channels].count(c.lower()) > 1})
    if repeated:  # the model would see the same stain twice, and the store say so nowhere
        raise ValueError(f"channels {repeated} are given more than once: name each channel once")
    return [lowered.index(c.lower()) for c in channels]


def channel_view(plate: Plate, channel_index: list[int]) -> Plate:
    """The plate restricted to some channels (lazy; for fitting the normaliser)."""
    if channel_index == list(range(len(plate.channels))):
        return plate
    images = {
        key: [level[channel_index] for level in levels] for key, levels in plate.images.items()
    }
    return Plate(
        name=plate.name,
        channels=[plate.channels[i] for i in channel_index],
        images=images,
        reader=plate.reader,
        source=plate.source,
        plate_format=plate.plate_format,
    )


def _missing(value: Any) -> bool:
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
