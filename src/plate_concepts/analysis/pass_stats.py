"""Mergeable per-feature statistics of an activation pass (the map and reduce of
:mod:`plate_concepts.analysis.activation_pass`).

One row chunk of an embedding store gives a :class:`ChunkStats`: global sums (feature usage,
reconstruction error, the top tokens of every feature) and, per plate, sums over groups of
tokens — wells, the values of each label column, the plate's controls. Every part merges with
the same part of another chunk by addition (counts, sums, sums of squares), by Chan's update
(the reconstruction's variance) or by keeping the best (top tokens), so merging chunk results in
chunk order gives the same numbers whoever computed each chunk. A chunk's result is saved as one
safetensors file (arrays) with its keys in the JSON header; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import safe_open
from safetensors.numpy import save_file

from plate_concepts._io import atomic_path
from plate_concepts.analysis.metrics import ReconstructionMetrics, codes_matrix
from plate_concepts.dictionary.codes import SparseCodes

_HEADER_KEY = "plate_concepts_pass"
#: Names of a plate's groupings (see :class:`PlateStats`).
WELL, CONTROLS, LABEL, FIELD, FOREGROUND = "well", "controls", "label:", "field", "foreground"
CONTROL_LABEL = "controls-label:"


def json_label(value: Any) -> Any:
    """A label value as a JSON scalar (numpy scalars unwrapped); None for a missing label."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1.0 and 1 are the same label
    if isinstance(value, (str, int, bool, float)):
        return value
    return str(value)


@dataclass
class GroupSums:
    """Per group of tokens (keys) and feature: tokens in the group (``counts``), tokens where the
    feature is active (``active``), the sum of its codes (``sums``) and, optionally, of their
    squares (``sumsq``)."""

    keys: list[Any]
    counts: np.ndarray  # (G,) int64
    active: np.ndarray  # (G, M) int64
    sums: np.ndarray  # (G, M) float64
    sumsq: np.ndarray | None = None  # (G, M) float64

    @classmethod
    def of(
        cls,
        group: np.ndarray,
        keys: list[Any],
        pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
        n_features: int,
        squares: bool,
    ) -> GroupSums:
        """Sums of the active (row, feature, value) ``pairs`` over ``group`` (one group index
        per token, -1 = in no group)."""
        rows, features, values = pairs
        G, M = len(keys), n_features
        inside = group >= 0
        counts = np.bincount(group[inside], minlength=G).astype(np.int64)
        pair_group = group[rows]
        keep = pair_group >= 0
        flat = pair_group[keep] * M + features[keep]
        kept = values[keep]
        active = np.bincount(flat, minlength=G * M).reshape(G, M).astype(np.int64)
        sums = np.bincount(flat, weights=kept, minlength=G * M).reshape(G, M)
        sumsq = (
            np.bincount(flat, weights=kept * kept, minlength=G * M).reshape(G, M)
            if squares
            else None
        )
        return cls(list(keys), counts, active, sums, sumsq)

    def merge(self, other: GroupSums) -> GroupSums:
        """The sums over both (keys in order of first appearance)."""
        position = {key: i for i, key in enumerate(self.keys)}
        keys = list(self.keys) + [key for key in other.keys if key not in position]
        position = {key: i for i, key in enumerate(keys)}
        where = np.array([position[key] for key in other.keys], dtype=np.int64)

        def combined(mine: np.ndarray | None, theirs: np.ndarray | None) -> np.ndarray | None:
            if mine is None or theirs is None:
                return None
            out = np.zeros((len(keys), *mine.shape[1:]), dtype=mine.dtype)
            out[: len(mine)] = mine
            np.add.at(out, where, theirs)
            return out

        return GroupSums(
            keys,
            combined(self.counts, other.counts),
            combined(self.active, other.active),
            combined(self.sums, other.sums),
            combined(self.sumsq, other.sumsq),
        )

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.counts": self.counts, f"{prefix}.active": self.active, f"{prefix}.sums": self.sums}
        if self.sumsq is not None:
            out[f"{prefix}.sumsq"] = self.sumsq
        return out

    def regroup(self, key_of: Any) -> GroupSums:
        """Sums over coarser groups: ``key_of(key)`` names each group's new group."""
        new_keys: list[Any] = []
        position: dict[Any, int] = {}
        where = np.empty(len(self.keys), dtype=np.int64)
        for i, key in enumerate(self.keys):
            new = key_of(key)
            if new not in position:
                position[new] = len(new_keys)
                new_keys.append(new)
            where[i] = position[new]

        def summed(values: np.ndarray | None) -> np.ndarray | None:
            if values is None:
                return None
            out = np.zeros((len(new_keys), *values.shape[1:]), dtype=values.dtype)
            np.add.at(out, where, values)
            return out

        return GroupSums(new_keys, summed(self.counts), summed(self.active), summed(self.sums), summed(self.sumsq))

    @classmethod
    def from_arrays(cls, keys: list[Any], arrays: dict[str, np.ndarray], prefix: str) -> GroupSums:
        keys = [tuple(key) if isinstance(key, list) else key for key in keys]  # JSON has no tuples
        return cls(
            keys,
            arrays[f"{prefix}.counts"],
            arrays[f"{prefix}.active"],
            arrays[f"{prefix}.sums"],
            arrays.get(f"{prefix}.sumsq"),
        )


@dataclass
class TopTokens:
    """The ``n`` tokens where each feature is largest: ``rows`` (M, n) store rows (-1 = none)
    and ``values`` (M, n) their codes (-inf = none), best first, ties to the lower row."""

    rows: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, n_features: int, n: int) -> TopTokens:
        return cls(np.full((n_features, n), -1, np.int64), np.full((n_features, n), -np.inf, np.float32))

    @classmethod
    def of(cls, pairs: tuple[np.ndarray, np.ndarray, np.ndarray], first_row: int, n_features: int, n: int) -> TopTokens:
        rows, features, values = pairs
        order = np.lexsort((rows, -values, features))  # by feature, then largest, then lower row
        features, rows, values = features[order], rows[order], values[order]
        start = np.searchsorted(features, features, side="left")
        rank = np.arange(len(features)) - start
        keep = rank < n
        out = cls.empty(n_features, n)
        out.rows[features[keep], rank[keep]] = rows[keep] + first_row
        out.values[features[keep], rank[keep]] = values[keep]
        return out

    def merge(self, other: TopTokens) -> TopTokens:
        n = self.rows.shape[1]
        rows = np.concatenate([self.rows, other.rows], axis=1)
        values = np.concatenate([self.values, other.values], axis=1)
        # Lower row first among equal values: sort by row, then stably by value.
        by_row = np.argsort(np.where(rows < 0, np.iinfo(np.int64).max, rows), axis=1, kind="stable")
        rows, values = np.take_along_axis(rows, by_row, 1), np.take_along_axis(values, by_row, 1)
        best = np.argsort(-values, axis=1, kind="stable")[:, :n]
        return TopTokens(np.take_along_axis(rows, best, 1), np.take_along_axis(values, best, 1))


@dataclass
class PlateStats:
    """One plate's sums over groups of its tokens, and its top tokens.

    ``groups`` holds: ``"well"`` (keyed by well), ``"controls"`` (the control tokens, keyed by
    well), ``"label:<column>"`` for each label column (keyed by (well, value), so both per-well
    and per-value sums follow; with squares), ``"controls-label:<column>"`` (the control tokens
    per value), and when the obs have them ``"field"`` (keyed by
    field) and ``"foreground"`` (keyed by the decile of the crop's foreground fraction), with
    squares (the confound flags' variance fractions).
    """

    n_tokens: int
    groups: dict[str, GroupSums]
    top: TopTokens
    n_excluded: dict[str, int] = field(default_factory=dict)  # tokens without a label, per column

    @property
    def wells(self) -> GroupSums:
        return self.groups[WELL]

    @property
    def controls(self) -> GroupSums:
        """The control tokens, per well."""
        return self.groups[CONTROLS]

    @property
    def label_columns(self) -> list[str]:
        return [name.removeprefix(LABEL) for name in self.groups if name.startswith(LABEL)]

    def label_wells(self, column: str) -> GroupSums:
        """Sums per (well, value) of a label column."""
        return self.groups[LABEL + column]

    def label_values(self, column: str) -> GroupSums:
        """Sums per value of a label column over the plate's wells."""
        return self.label_wells(column).regroup(lambda key: key[1])

    def merge(self, other: PlateStats) -> PlateStats:
        groups = dict(self.groups)
        for name, sums in other.groups.items():
            groups[name] = groups[name].merge(sums) if name in groups else sums
        return PlateStats(
            self.n_tokens + other.n_tokens,
            groups,
            self.top.merge(other.top),
            {c: self.n_excluded.get(c, 0) + other.n_excluded.get(c, 0) for c in {*self.n_excluded, *other.n_excluded}},
        )

    def to_arrays(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON record of the keys, arrays named under ``prefix``) for a safetensors file."""
        arrays = {f"{prefix}.top.rows": self.top.rows, f"{prefix}.top.values": self.top.values}
        for j, sums in enumerate(self.groups.values()):
            arrays.update(sums.arrays(f"{prefix}.group{j}"))
        record = {
            "n_tokens": self.n_tokens,
            "groups": {name: sums.keys for name, sums in self.groups.items()},
            "n_excluded": self.n_excluded,
        }
        return record, arrays

    @classmethod
    def from_arrays(cls, record: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> PlateStats:
        groups = {
            name: GroupSums.from_arrays(keys, arrays, f"{prefix}.group{j}")
            for j, (name, keys) in enumerate(record["groups"].items())
        }
        top = TopTokens(arrays[f"{prefix}.top.rows"], arrays[f"{prefix}.top.values"])
        return cls(record["n_tokens"], groups, top, record["n_excluded"])

    def save(self, path: str | Path, name: str) -> Path:
        record, arrays = self.to_arrays("plate")
        return write_arrays(path, {"name": name, **record}, arrays)

    @classmethod
    def load(cls, path: str | Path) -> tuple[str, PlateStats]:
        header, arrays = read_arrays(path)
        return header["name"], cls.from_arrays(header, arrays, "plate")


@dataclass
class Reconstruction:
    """The sums behind FVU and mean cosine (see :class:`ReconstructionMetrics`), mergeable."""

    n_tokens: int
    mean: np.ndarray  # (d,) float64
    sq_dev: float
    sq_err: float
    cos_sum: float

    @classmethod
    def of(cls, x: Any, x_hat: Any) -> Reconstruction:
        metrics = ReconstructionMetrics()
        metrics.update(x, x_hat)
        return cls(metrics.n_tokens, np.asarray(metrics._mean, np.float64), metrics._sq_dev,
                   metrics._sq_err, metrics._cos_sum)

    def merge(self, other: Reconstruction) -> Reconstruction:
        n = self.n_tokens + other.n_tokens
        delta = other.mean - self.mean
        return Reconstruction(
            n,
            self.mean + delta * (other.n_tokens / n),
            self.sq_dev + other.sq_dev + float(delta @ delta) * self.n_tokens * other.n_tokens / n,
            self.sq_err + other.sq_err,
            self.cos_sum + other.cos_sum,
        )

    @property
    def fvu(self) -> float:
        return math.nan if self.sq_dev == 0 else self.sq_err / self.sq_dev

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.n_tokens


@dataclass
class ChunkStats:
    """Everything the pass keeps of some store rows (one chunk, or several merged)."""

    n_features: int
    n_tokens: int
    active: np.ndarray  # (M,) int64 tokens where each feature is active
    sums: np.ndarray  # (M,) float64 sum of codes
    reconstruction: Reconstruction
    top: TopTokens
    plates: dict[str, PlateStats]

    @classmethod
    def of(
        cls,
        codes: SparseCodes,
        x: Any,
        x_hat: Any,
        obs: pd.DataFrame,
        first_row: int,
        label_columns: Sequence[str],
        control_column: str | None,
        top_n: int,
    ) -> ChunkStats:
        """Statistics of consecutive store rows from ``first_row``: their codes, pre-processed
        tokens ``x`` and reconstructions, and their obs rows (plate, well, labels, controls)."""
        M = codes.n_features
        coo = codes_matrix(codes).tocoo()
        pairs = (coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float64))
        plates_of = obs["plate"].astype(str).to_numpy()
        controls = (
            obs[control_column].eq(True).to_numpy()
            if control_column is not None and control_column in obs.columns
            else np.zeros(len(obs), bool)
        )
        plates: dict[str, PlateStats] = {}
        for plate in pd.unique(plates_of):
            on_plate = plates_of == plate
            plate_pairs = tuple(p[on_plate[pairs[0]]] for p in pairs)
            wells, well_keys = _groups(obs["well"].to_numpy(), on_plate)
            groups = {
                WELL: GroupSums.of(wells, well_keys, plate_pairs, M, squares=False),
                CONTROLS: GroupSums.of(
                    np.where(controls, wells, -1), well_keys, plate_pairs, M, squares=True
                ),
            }
            excluded = {}
            for column in label_columns:
                values, value_keys = _groups(obs[column].to_numpy(), on_plate)
                pair = np.where(values >= 0, wells * len(value_keys) + values, -1)
                group, keys = _groups(pair, pair >= 0)
                keys = [(well_keys[k // len(value_keys)], value_keys[k % len(value_keys)]) for k in keys]
                groups[LABEL + column] = GroupSums.of(group, keys, plate_pairs, M, squares=True)
                groups[CONTROL_LABEL + column] = GroupSums.of(
                    np.where(controls, values, -1), value_keys, plate_pairs, M, squares=False
                )
                excluded[column] = int(on_plate.sum() - (values >= 0).sum())
            if FIELD in obs.columns:
                group, keys = _groups(obs[FIELD].to_numpy(), on_plate)
                groups[FIELD] = GroupSums.of(group, keys, plate_pairs, M, squares=True)
            if "foreground_fraction" in obs.columns:
                decile = np.clip(np.floor(obs["foreground_fraction"].to_numpy(float) * 10), 0, 9)
                group, keys = _groups(decile, on_plate)
                groups[FOREGROUND] = GroupSums.of(group, keys, plate_pairs, M, squares=True)
            plates[str(plate)] = PlateStats(
                int(on_plate.sum()), groups, TopTokens.of(plate_pairs, first_row, M, top_n), excluded
            )
        return cls(
            M,
            len(codes),
            np.bincount(pairs[1], minlength=M).astype(np.int64),
            np.bincount(pairs[1], weights=pairs[2], minlength=M),
            Reconstruction.of(x, x_hat),
            TopTokens.of(pairs, first_row, M, top_n),
            plates,
        )

    def merge(self, other: ChunkStats) -> ChunkStats:
        plates = dict(self.plates)
        for name, stats in other.plates.items():
            plates[name] = plates[name].merge(stats) if name in plates else stats
        return ChunkStats(
            self.n_features,
            self.n_tokens + other.n_tokens,
            self.active + other.active,
            self.sums + other.sums,
            self.reconstruction.merge(other.reconstruction),
            self.top.merge(other.top),
            plates,
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write to one safetensors file (atomically: a half-written chunk never counts)."""
        arrays: dict[str, np.ndarray] = {
            "active": self.active, "sums": self.sums, "top.rows": self.top.rows,
            "top.values": self.top.values, "reconstruction.mean": self.reconstruction.mean,
        }
        plates = []
        for i, (name, stats) in enumerate(self.plates.items()):
            record, plate_arrays = stats.to_arrays(f"plate{i}")
            plates.append({"name": name, **record})
            arrays.update(plate_arrays)
        reconstruction = self.reconstruction
        header = {
            "n_features": self.n_features, "n_tokens": self.n_tokens, "plates": plates,
            "reconstruction": {
                "n_tokens": reconstruction.n_tokens, "sq_dev": reconstruction.sq_dev,
                "sq_err": reconstruction.sq_err, "cos_sum": reconstruction.cos_sum,
            },
        }
        return write_arrays(path, header, arrays)

    @classmethod
    def load(cls, path: str | Path) -> ChunkStats:
        header, arrays = read_arrays(path)
        plates = {
            record["name"]: PlateStats.from_arrays(record, arrays, f"plate{i}")
            for i, record in enumerate(header["plates"])
        }
        return cls(
            *_saved_core(header, arrays),
            plates,
        )

    @staticmethod
    def plate_names(path: str | Path) -> list[str]:
        """The plates a saved chunk covers, from its header alone (no arrays read)."""
        return [record["name"] for record in read_header(path)["plates"]]


def _groups(values: np.ndarray, on_plate: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Group index per token (-1 off the plate or for a missing label) and the group keys in
    order of first appearance."""
    codes, uniques = pd.factorize(pd.Series(values[on_plate], dtype=object), use_na_sentinel=True)
    keys: list[Any] = []
    position: dict[Any, int] = {}
    remap = np.empty(len(uniques) + 1, dtype=np.int64)  # last entry: the NA sentinel -1
    remap[-1] = -1
    for i, unique in enumerate(uniques):
        label = json_label(unique)  # 1 and 1.0 become one key
        if label is None:
            remap[i] = -1
            continue
        if label not in position:
            position[label] = len(keys)
            keys.append(label)
        remap[i] = position[label]
    group = np.full(len(values), -1, dtype=np.int64)
    group[on_plate] = remap[codes]
    return group, keys


def write_arrays(path: str | Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """One safetensors file of ``arrays`` with ``header`` as JSON, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={_HEADER_KEY: json.dumps(header)})
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a file written by :func:`write_arrays` (no arrays read)."""
    return read_arrays(path, header_only=True)[0]


def read_arrays(path: str | Path, header_only: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = json.loads((handle.metadata() or {})[_HEADER_KEY])
            arrays = {} if header_only else {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable activation-pass file: {err}") from err
    return header, arrays


def merge_all(parts: Iterable[ChunkStats]) -> ChunkStats:
    """Merge chunk results in the given order."""
    merged: ChunkStats | None = None
    for part in parts:
        merged = part if merged is None else merged.merge(part)
    if merged is None:
        raise ValueError("no chunk results to merge")
    return merged


@dataclass
class Totals:
    """A whole pass: the store-wide sums, the labels' counts summed over plates (for
    selectivity), and each plate's number of tokens and active counts per feature."""

    n_features: int
    n_tokens: int
    active: np.ndarray  # (M,)
    sums: np.ndarray  # (M,)
    reconstruction: Reconstruction
    top: TopTokens
    labels: dict[str, GroupSums]  # without squares
    n_excluded: dict[str, int]
    controls: GroupSums
    plates: list[str]
    plate_tokens: np.ndarray  # (P,)
    plate_active: np.ndarray  # (P, M)
    control_counts: dict[str, dict[Any, int]] = field(default_factory=dict)  # per column and value

    def save(self, path: str | Path) -> Path:
        arrays = {
            "active": self.active, "sums": self.sums, "top.rows": self.top.rows,
            "top.values": self.top.values, "reconstruction.mean": self.reconstruction.mean,
            "plate_tokens": self.plate_tokens, "plate_active": self.plate_active,
            **self.controls.arrays("controls"),
        }
        for j, sums in enumerate(self.labels.values()):
            arrays.update(sums.arrays(f"label{j}"))
        rec = self.reconstruction
        header = {
            "n_features": self.n_features, "n_tokens": self.n_tokens, "plates": self.plates,
            "labels": {column: sums.keys for column, sums in self.labels.items()},
            "n_excluded": self.n_excluded,
            "reconstruction": {"n_tokens": rec.n_tokens, "sq_dev": rec.sq_dev, "sq_err": rec.sq_err,
                               "cos_sum": rec.cos_sum},
            "control_counts": {c: list(map(list, counts.items())) for c, counts in self.control_counts.items()},
        }
        return write_arrays(path, header, arrays)

    @classmethod
    def load(cls, path: str | Path) -> Totals:
        header, arrays = read_arrays(path)
        return cls(
            *_saved_core(header, arrays),
            {column: GroupSums.from_arrays(keys, arrays, f"label{j}")
             for j, (column, keys) in enumerate(header["labels"].items())},
            header["n_excluded"],
            GroupSums.from_arrays([CONTROLS], arrays, "controls"),
            header["plates"], arrays["plate_tokens"], arrays["plate_active"],
            {c: {(tuple(v) if isinstance(v, list) else v): n for v, n in pairs}
             for c, pairs in header.get("control_counts", {}).items()},
        )


def _saved_core(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Any, ...]:
    """What every statistics file starts with: sizes, activity counts, sums, reconstruction
    and top tokens (the first fields of :class:`ChunkStats` and :class:`Totals`)."""
    rec = header["reconstruction"]
    reconstruction = Reconstruction(
        rec["n_tokens"], arrays["reconstruction.mean"], rec["sq_dev"], rec["sq_err"], rec["cos_sum"]
    )
    return (header["n_features"], header["n_tokens"], arrays["active"], arrays["sums"], reconstruction,
            TopTokens(arrays["top.rows"], arrays["top.values"]))
