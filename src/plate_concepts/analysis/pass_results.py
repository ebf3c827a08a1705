"""A pass's files and how they are read: its record (``pass.json``, with the :class:`PassSpec`
that made it), the store and dictionary it belongs to, and :class:`ActivationPass`, the
results that the explorer, ``evaluate``, profiles and reports read. Running a pass is
:mod:`plate_concepts.analysis.activation_pass`."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from plate_concepts._io import atomic_path
from plate_concepts.analysis.activations import WellAggregates
from plate_concepts.analysis.pass_stats import GroupSums, PlateStats, Totals
from plate_concepts.analysis.selectivity import SelectivityResult
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.plates.geometry import PlateFormat, parse_well

PASS_FILE = "pass.json"
FORMAT_NAME = "plate-concepts-activation-pass"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PassSpec:
    """What one pass computes; every task gets a copy (plain data, cheap to send)."""

    store: str
    dictionary: str | None  # None: the estimator is passed in (in-process use)
    out: str | None  # None: statistics only, nothing written (in-process use)
    n_tokens: int
    rows_per_task: int
    label_columns: tuple[str, ...]
    control_column: str | None
    batch_column: str | None
    top_n: int
    code_slots: int
    device: str
    threads: int | None
    dictionary_sha256: str | None = None  # the file's content: a file fitted again is another
    store_plates: str | None = None  # store_plates_digest: which store, its row files and plates

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.rows_per_task)

    def rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.rows_per_task
        return start, min(start + self.rows_per_task, self.n_tokens)

    def chunk_file(self, chunk: int) -> Path:
        return Path(self.out) / "chunks" / f"chunk-{chunk:06d}.safetensors"  # type: ignore[arg-type]

    def identity(self) -> dict[str, Any]:
        """What a resumed pass must share with the interrupted one."""
        record = asdict(self)
        for key in ("out", "device", "threads"):
            record.pop(key)
        record["label_columns"] = list(self.label_columns)
        return record


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in blocks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def store_plates_digest(store: Any) -> str:
    """A digest of what a store's rows are (:meth:`EmbeddingStore.rows_identity`): a pass's
    codes are by row, so a store made again, or whose plates were replaced or reordered, is
    another store."""
    return hashlib.sha256(json.dumps(store.rows_identity()).encode()).hexdigest()


def plate_file(index: int) -> str:
    return f"plate-{index:05d}.safetensors"


def _moved_with(recorded: str | None, made_in: str | None, folder: Path) -> str | None:
    """A file or store the pass recorded, found again when it moved together with the pass (a
    project folder moved or copied: the same place relative to the pass folder). Its content is
    still checked (dictionary SHA-256, store digest) before any number is read."""
    if recorded is None or made_in is None or Path(recorded).exists():
        return recorded
    moved = (folder.resolve() / os.path.relpath(recorded, made_in)).resolve()
    return os.fspath(moved) if moved.exists() else recorded


def write_pass_record(folder: Path, record: dict[str, Any]) -> None:
    with atomic_path(folder / PASS_FILE) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **record}, indent=1))


def read_pass_record(folder: Path) -> dict[str, Any] | None:
    """The pass record of ``folder``, or None when it is not an activation pass."""
    path = folder / PASS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({err}); the activation pass cannot be read") from err
    if record.get("format") != FORMAT_NAME:
        return None
    if record.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: activation-pass format version {record.get('version')} is newer than this plate_concepts reads")
    return record


class ActivationPass:
    """A pass's results: store-wide feature statistics at once, each plate's when asked (its
    file alone is read), codes of any rows from the codes arrays.

    Open a finished pass with :meth:`open`; :func:`run_pass` returns one.
    """

    def __init__(
        self,
        spec: PassSpec,
        totals: Totals,
        folder: Path | None,
        plates: dict[str, PlateStats] | None = None,
    ) -> None:
        self.spec = spec
        self.totals = totals
        self.folder = folder
        self._plates: dict[str, PlateStats] = dict(plates or {})
        self._plate_index = {name: i for i, name in enumerate(totals.plates)}

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationPass:
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"activation pass {folder} does not exist")
        record = read_pass_record(folder)
        if record is None:
            raise ValueError(f"{folder} is not an activation pass (it has no {PASS_FILE} of this format)")
        if not record["complete"]:
            raise ValueError(
                f"activation pass {folder} is unfinished; run `plate-concepts encode` again with the "
                "same arguments to complete it"
            )
        spec_record = dict(record["spec"])
        spec_record["label_columns"] = tuple(spec_record["label_columns"])
        for key in ("dictionary", "store"):
            spec_record[key] = _moved_with(spec_record[key], record.get("made_in"), folder)
        spec = PassSpec(**spec_record, out=os.fspath(folder), device="cpu", threads=None)
        return cls(spec, Totals.load(folder / "global.safetensors"), folder)

    @functools.cached_property
    def _recorded_formats(self) -> dict[str, Any]:
        from plate_concepts.embeddings.store import EmbeddingStore

        if not self.spec.store or not EmbeddingStore.is_store(self.spec.store):
            return {}
        plates = EmbeddingStore.open(self.spec.store).provenance.get("plates") or {}
        return {name: record.get("format") for name, record in plates.items() if isinstance(record, dict)}

    def plate_format(self, plate: str) -> PlateFormat:
        """The plate's format (rows x columns) as its store recorded it at embedding; for
        stores embedded before it was recorded (or when the store is gone), the smallest
        standard plate holding the pass's wells of that plate."""
        recorded = self._recorded_formats.get(plate)
        if isinstance(recorded, list) and len(recorded) == 2:
            return PlateFormat(*(int(n) for n in recorded))
        wells = self.plate(plate).wells
        return PlateFormat.smallest_containing(
            [parse_well(str(w)) for w, n in zip(wells.keys, wells.counts, strict=True) if n > 0]
        )

    # ------------------------------------------------------------------ store-wide
    @property
    def n_tokens(self) -> int:
        return self.totals.n_tokens

    @property
    def n_features(self) -> int:
        return self.totals.n_features

    @property
    def plates(self) -> list[str]:
        return list(self.totals.plates)

    @property
    def label_columns(self) -> list[str]:
        return list(self.spec.label_columns)

    @property
    def frequency(self) -> np.ndarray:
        """(M,) fraction of tokens where each feature is active."""
        return self.totals.active / self.n_tokens

    @property
    def mean_activation(self) -> np.ndarray:
        """(M,) mean code of each feature over all tokens (inactive = 0)."""
        return self.totals.sums / self.n_tokens

    @property
    def l0(self) -> float:
        return float(self.totals.active.sum() / self.n_tokens)

    @property
    def fvu(self) -> float:
        return self.totals.reconstruction.fvu

    @property
    def cosine(self) -> float:
        return self.totals.reconstruction.cosine

    def plate_frequency(self) -> pd.DataFrame:
        """(plates x features) fraction of each plate's tokens where each feature is active."""
        return pd.DataFrame(
            self.totals.plate_active / np.maximum(self.totals.plate_tokens, 1)[:, None],
            index=pd.Index(self.plates, name="plate"),
        )

    def selectivity(self, column: str) -> SelectivityResult:
        """Selectivity of every feature for the values of a label column of the pass."""
        from plate_concepts.analysis.selectivity import SelectivityAccumulator

        sums = self._label(column)
        return SelectivityAccumulator.from_counts(
            column, sums.keys, sums.counts, sums.active, self.totals.n_excluded.get(column, 0)
        ).result()

    def label_sums(self, column: str) -> GroupSums:
        """Per value of a label column, over the whole store: tokens, active counts, code sums."""
        return self._label(column)

    def _label(self, column: str) -> GroupSums:
        if column not in self.totals.labels:
            raise ValueError(
                f"the activation pass has no statistics for label column {column!r} "
                f"(it has: {', '.join(self.totals.labels) or 'none'}); run it with --label {column}"
            )
        return self.totals.labels[column]

    def top_tokens(self, feature: int, n: int | None = None, plate: str | None = None) -> list[tuple[int, float]]:
        """(store row, code) of the tokens where ``feature`` is largest, best first: over the
        store, or on one plate; at most the pass's ``top_n``."""
        top = self.totals.top if plate is None else self.plate(plate).top
        rows, values = top.rows[feature], top.values[feature]
        keep = rows >= 0
        pairs = list(zip(rows[keep].tolist(), values[keep].astype(float).tolist(), strict=True))
        return pairs if n is None else pairs[:n]

    def evaluation(self, labels: Sequence[str] = (), dead_threshold: float = 1e-5) -> dict[str, Any]:
        """What ``plate-concepts evaluate`` reports, from the pass alone."""
        dead = self.frequency < dead_threshold
        out: dict[str, Any] = {
            "fvu": self.fvu, "cosine": self.cosine, "l0": self.l0,
            "dead_fraction": float(np.mean(dead)), "n_dead": int(dead.sum()),
            "n_features": self.n_features, "n_tokens": self.n_tokens, "selectivity": {},
        }
        for column in labels:
            result = self.selectivity(column)
            summary = result.summary()
            best = result.maximum.argmax(axis=1)
            out["selectivity"][column] = {
                "best_max_selectivity": {str(k): float(v) for k, v in summary["best_max_selectivity"].items()},
                "best_feature": {str(v): int(f) for v, f in zip(result.values, best, strict=True)},
                "n_avg_above_0.5": int(summary["n_avg_above_0.5"]),
                "n_avg_above_0.2": int(summary["n_avg_above_0.2"]),
            }
        return out

    # ------------------------------------------------------------------ per plate
    def plate(self, name: str) -> PlateStats:
        """One plate's statistics (read from its own file, then kept)."""
        if name not in self._plate_index:
            raise KeyError(f"plate {name!r} has no tokens in this pass (plates: {', '.join(self.plates[:10])})")
        if name not in self._plates:
            if self.folder is None:
                raise RuntimeError(f"plate {name!r} statistics are not in memory")
            _, stats = PlateStats.load(self.folder / "plates" / plate_file(self._plate_index[name]))
            if len(self._plates) >= 8:
                self._plates.pop(next(iter(self._plates)))
            self._plates[name] = stats
        return self._plates[name]

    def well_aggregates(self, plate: str) -> WellAggregates:
        """Per-well mean activation and fraction active on one plate, wells row by row."""
        from plate_concepts.analysis.activations import _well_order

        wells = self.plate(plate).wells
        order = _well_order([str(w) for w in wells.keys])
        where = [wells.keys.index(w) for w in order]
        counts = wells.counts[where]
        return WellAggregates(
            wells=order,
            mean_activation=(wells.sums[where] / counts[:, None]).astype(np.float32),
            fraction_active=(wells.active[where] / counts[:, None]).astype(np.float32),
            n_tokens=counts,
        )

    def codes(self, rows: np.ndarray | slice) -> SparseCodes:
        """Codes of store rows, read from the pass's codes arrays."""
        import torch

        if self.folder is None:
            raise RuntimeError("this pass was computed in memory and kept no codes")
        group = zarr.open_group(self.folder / "codes", mode="r")
        if isinstance(rows, slice):
            indices, values = group["indices"][rows], group["values"][rows]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            indices = group["indices"].get_orthogonal_selection((rows, slice(None)))
            values = group["values"].get_orthogonal_selection((rows, slice(None)))
        return SparseCodes(
            torch.from_numpy(np.asarray(indices, np.int64)), torch.from_numpy(np.asarray(values)), self.n_features
        )
