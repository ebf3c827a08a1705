"""Reading an embedding store's obs per plate, per row or per column: only the parts that hold
the rows asked for are opened."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from plate_concepts.embeddings.obs_index import KEY_COLUMNS
from plate_concepts.embeddings.store_files import empty_obs
from plate_concepts.plates.geometry import canonical_well

if TYPE_CHECKING:
    from plate_concepts.embeddings.store import EmbeddingStore

Key = tuple[str, str, int, int, int]


def plate_rows(store: EmbeddingStore, plate: str) -> np.ndarray:
    """See :meth:`EmbeddingStore.plate_rows`."""
    pieces = []
    for i, part in enumerate(store._meta["parts"]):
        plates = store._part_plates(i)
        if plate not in plates:
            continue
        if len(plates) == 1:
            pieces.append(np.arange(part["start"], part["stop"], dtype=np.int64))
        else:
            names = store._read_part(part, ["plate"])["plate"].astype(str).to_numpy()
            pieces.append(part["start"] + np.flatnonzero(names == plate))
    return np.concatenate(pieces) if pieces else np.empty(0, np.int64)


def read_obs_rows(
    store: EmbeddingStore, index: np.ndarray, columns: Sequence[str] | None
) -> pd.DataFrame:
    """Obs of the rows ``index`` (in that order, repeats allowed), indexed by store row."""
    unique, inverse = np.unique(index, return_inverse=True)
    parts = store._meta["parts"]
    starts = np.array([p["start"] for p in parts], dtype=np.int64)
    owners = np.searchsorted(starts, unique, side="right") - 1
    frames = []
    for owner in np.unique(owners):
        part, wanted = parts[owner], unique[owners == owner]
        frame = store._read_part(part, columns).iloc[wanted - part["start"]]
        frames.append(frame.set_axis(pd.Index(wanted, dtype=np.int64)))
    if not frames:
        return empty_obs(columns or store.obs_columns)
    table = pd.concat(frames) if len(frames) > 1 else frames[0]
    if not np.array_equal(index, unique):
        table = table.iloc[inverse]
    return table


def iter_obs(
    store: EmbeddingStore, columns: Sequence[str] | None, plate: str | None
) -> Iterator[pd.DataFrame]:
    """See :meth:`EmbeddingStore.iter_obs`."""
    for i, part in enumerate(store._meta["parts"]):
        plates = store._part_plates(i)
        if plate is not None and plate not in plates:
            continue
        mixed = plate is not None and len(plates) > 1
        read = columns if columns is None or not mixed else list(dict.fromkeys([*columns, "plate"]))
        frame = store._read_part(part, read)
        frame.index = pd.RangeIndex(part["start"], part["stop"])
        if mixed:
            frame = frame[frame["plate"].astype(str) == plate]
            frame = frame if columns is None else frame[list(columns)]
        yield frame


def completed_keys(store: EmbeddingStore, plate: str | None) -> set[Key]:
    """See :meth:`EmbeddingStore.completed_keys`."""
    if plate is not None and plate not in store.plates:
        return set()
    keys: set[Key] = set()
    for obs in store.iter_obs(KEY_COLUMNS, plate=plate):
        keys.update(
            zip(
                obs["plate"].astype(str),
                obs["well"].astype(str),
                *(obs[c].astype(np.int64).tolist() for c in KEY_COLUMNS[2:]),
                strict=True,
            )
        )
    return keys


def has_rows(store: EmbeddingStore, keys: pd.DataFrame | Iterable[tuple[Any, ...]]) -> np.ndarray:
    """See :meth:`EmbeddingStore.has_rows`."""
    if isinstance(keys, pd.DataFrame):
        missing = [c for c in KEY_COLUMNS if c not in keys.columns]
        if missing:
            raise ValueError(f"keys lack column(s) {missing}; expected {list(KEY_COLUMNS)}")
        rows = list(keys[list(KEY_COLUMNS)].itertuples(index=False, name=None))
    else:
        rows = list(keys)
    normalised = [(str(p), canonical_well(w), int(f), int(y), int(x)) for p, w, f, y, x in rows]
    done: set[Key] = set()
    for plate in {key[0] for key in normalised}:
        done |= completed_keys(store, plate)
    return np.asarray([key in done for key in normalised], dtype=bool)
