"""Changes to an embedding store's committed layout: merging obs parts, deleting plates, and
giving a version-1 store the per-plate index of version 2."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from plate_concepts._io import atomic_path
from plate_concepts.embeddings.obs_index import (
    INDEX_COLUMNS,
    MAX_STORE_VALUES,
    merge_labels,
    merge_summaries,
    summarise,
)
from plate_concepts.embeddings.store_files import (
    FORMAT_VERSION,
    STORE_FILE,
    StoreDamagedError,
    arrow_table,
    new_summary_file,
    next_part_number,
    plate_entry,
    read_part,
    write_json,
    write_meta,
    write_parquet,
)

if TYPE_CHECKING:
    from plate_concepts.embeddings.store import EmbeddingStore


def compact_obs(store: EmbeddingStore, plate: str | None = None) -> None:
    """See :meth:`EmbeddingStore.compact_obs`."""
    store._check_unchanged_on_disk()
    meta = upgraded_meta(store)
    groups: list[list[int]] = []  # runs of consecutive parts of one plate
    for i, part in enumerate(meta["parts"]):
        previous = meta["parts"][i - 1] if i else None
        if (
            previous is not None
            and previous["plates"] == part["plates"]
            and len(part["plates"]) == 1
        ):
            groups[-1].append(i)
        else:
            groups.append([i])

    def merged(group: list[int]) -> bool:
        return len(group) > 1 and (plate is None or meta["parts"][group[0]]["plates"] == [plate])

    if not any(merged(group) for group in groups):
        return
    store._remove_orphans(meta)
    number = next_part_number(meta)
    parts = []
    for group in groups:
        first, last = meta["parts"][group[0]], meta["parts"][group[-1]]
        if not merged(group):
            parts.extend(meta["parts"][i] for i in group)
            continue
        frames = [read_part(store.path, meta["parts"][i]) for i in group]
        part_file = f"obs/part-{number:05d}.parquet"
        with atomic_path(store.path / part_file) as tmp:
            write_parquet(arrow_table(pd.concat(frames, ignore_index=True)), tmp)
        parts.append(
            {
                "file": part_file,
                "start": first["start"],
                "stop": last["stop"],
                "plates": first["plates"],
            }
        )
        number += 1
    meta["parts"] = parts
    write_meta(store.path / STORE_FILE, meta)
    store._set_meta(meta)
    store._remove_orphans(meta)


def remove_plates(store: EmbeddingStore, plates: Sequence[str]) -> None:
    """See :meth:`EmbeddingStore.remove_plates`."""
    from plate_concepts.embeddings.store import EmbeddingStore

    unknown = [p for p in plates if p not in store.plates]
    if unknown:
        raise KeyError(
            f"plate(s) {unknown} have no tokens in {store.path} (plates: {store.plates})"
        )
    store._check_unchanged_on_disk()
    removed = set(plates)
    uns = store.provenance
    if isinstance(uns.get("plates"), dict):
        uns["plates"] = {k: v for k, v in uns["plates"].items() if k not in removed}
    block = max(store.chunk_rows, 4096)
    with atomic_path(store.path, overwrite=True) as tmp:
        kept_store = EmbeddingStore.create(
            tmp, store.dim, dtype=store.dtype.name, patch_grid=store.patch_grid,
            chunk_rows=store.chunk_rows, chunk_rows_patch=store.chunk_rows_patch, provenance=uns,
        )  # fmt: skip
        for obs in store.iter_obs():
            keep = ~obs["plate"].astype(str).isin(removed).to_numpy()
            rows, kept = obs.index.to_numpy()[keep], obs[keep]
            for a in range(0, len(rows), block):
                piece = rows[a : a + block]
                patches = store.read_patches(piece, np.float16) if store.patch_grid else None
                kept_store.append(store.read(piece, store.dtype), kept.iloc[a : a + block], patches)
    store._reload()


def add_to_summary(
    store_path: Path, meta: dict[str, Any], plate: str, added: dict[str, Any]
) -> str | None:
    """Merge the summary of new rows of ``plate`` into the plate's summary, written to a new
    file named in ``meta``; returns the file it replaces."""
    entry = meta["plates"].get(plate)
    before, replaced = None, None
    if entry is not None:
        replaced = entry["summary"]
        before = json.loads((store_path / replaced).read_text())
    else:
        entry = {"id": max((e["id"] for e in meta["plates"].values()), default=-1) + 1}
    summary = merge_summaries(before, added)
    file = new_summary_file(meta, entry["id"])
    write_json(store_path / file, summary)
    meta["plates"][plate] = {**entry, **plate_entry(summary), "summary": file}
    return replaced


def store_labels(store: EmbeddingStore, meta: dict[str, Any]) -> dict[str, Any]:
    """The whole store's label value counts (see :meth:`EmbeddingStore.describe`)."""
    if meta["version"] < 2:
        return store._legacy_index()["labels"]
    if not meta.get("labels"):
        return {}
    try:
        return json.loads((store.path / meta["labels"]).read_text())
    except FileNotFoundError:
        raise StoreDamagedError(
            f"embedding store {store.path} is damaged: its label counts {store.path / meta['labels']} "
            f"listed in {STORE_FILE} are missing"
        ) from None


def legacy_index(store: EmbeddingStore) -> dict[str, Any]:
    """A version-1 store's per-plate index (obs columns, the plates of each part, per-plate
    summaries), computed by reading its obs once."""
    columns = list(INDEX_COLUMNS)
    part_plates, summaries = [], {}
    for part in store._meta["parts"]:
        obs = read_part(store.path, part)
        columns += [c for c in obs.columns if c not in columns]
        names = obs["plate"].astype(str)
        part_plates.append(list(dict.fromkeys(names)))
        for name, rows in obs.groupby(names, sort=False).groups.items():
            summaries[name] = merge_summaries(summaries.get(name), summarise(obs.loc[rows]))
    plates = {name: plate_entry(summary) for name, summary in summaries.items()}
    labels: dict[str, Any] = {}
    for summary in summaries.values():
        labels = merge_labels(labels, summary["labels"], MAX_STORE_VALUES)
    return {"columns": columns, "part_plates": part_plates, "plates": plates, "summaries": summaries,
            "labels": labels}  # fmt: skip


def upgraded_meta(store: EmbeddingStore) -> dict[str, Any]:
    """A copy of the record to write next; a version-1 store gets its per-plate index (summary
    files written now, committed with the caller's ``store.json``)."""
    meta = copy.deepcopy(store._meta)
    if meta["version"] >= 2:
        return meta
    index = store._legacy_index()
    meta["version"] = FORMAT_VERSION
    meta["columns"] = list(index["columns"])
    for part, names in zip(meta["parts"], index["part_plates"], strict=True):
        part["plates"] = list(names)
    meta["plates"] = {}
    for k, (name, summary) in enumerate(index["summaries"].items()):
        file = new_summary_file(meta, k)
        write_json(store.path / file, summary)
        meta["plates"][name] = {"id": k, **plate_entry(summary), "summary": file}
    meta["labels"] = new_summary_file(meta, None)
    write_json(store.path / meta["labels"], index["labels"])
    return meta
