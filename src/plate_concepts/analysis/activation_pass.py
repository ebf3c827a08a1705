"""The activation pass: encode every token of an embedding store once, in row chunks, on Dask,
and reduce the per-feature statistics that the explorer, ``evaluate`` and reports read.

A pass folder::

    pass.json                     what was encoded with what, and whether it is complete
    codes/                        zarr v3: indices (N, K) int32 and values (N, K) float32, the
                                  sparse codes of every token (K = J*L for ICFL, k for TopK),
                                  chunked like the tasks
    chunks/chunk-000012.safetensors   one task's statistics (kept: a resumed pass skips them)
    global.safetensors            usage, reconstruction, top tokens, per-label-value counts
    plates/plate-00003.safetensors    one plate's per-well, per-label-value and control sums
                                  and its top tokens (read alone by per-plate views)

Each task is one row chunk (:func:`run_chunk`): read the tokens and their obs rows, pre-process
and encode them with the dictionary, write their codes, save their :class:`ChunkStats`. Memory
per task is bounded by the chunk whatever the store's size; a task whose statistics file exists
is done, so an interrupted pass resumes where it stopped and a task re-run after a worker died
replaces its own files (nothing is counted twice). The reduce merges the chunk files in chunk
order — the same numbers whether the tasks ran in this process or on any number of workers —
and writes each plate's file as soon as its last chunk is merged. Tasks run on a
``dask.distributed`` cluster: a ``LocalCluster`` sized to the machine by default (one worker
per GPU, else per CPU core) or an existing one by its scheduler address, whose workers must see
the store, the dictionary and the output at the same paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from plate_concepts._dask import dask_cluster, finished_batches, task_device
from plate_concepts._io import atomic_path
from plate_concepts._progress import Cancelled, CancelLike, cancel_requested
from plate_concepts.analysis.activations import ProgressLike
from plate_concepts.analysis.pass_results import (  # re-exported: where a pass is made
    ActivationPass,
    PassSpec,
    file_sha256,
    plate_file,
    read_pass_record,
    store_plates_digest,
    write_pass_record,
)
from plate_concepts.analysis.pass_stats import (
    CONTROL_LABEL,
    CONTROLS,
    ChunkStats,
    GroupSums,
    PlateStats,
    Totals,
)
from plate_concepts.dictionary.codes import SparseCodes

#: Top tokens kept per feature, over the store and per plate.
DEFAULT_TOP_N = 32


# ---------------------------------------------------------------------- one task
@functools.lru_cache(maxsize=2)
def _estimator(path: str, stamp: tuple[int, int], device: str) -> Any:
    from plate_concepts.dictionary.estimators import ICFL

    return ICFL.load(path, device=device)  # the file decides ICFL or TopKSAE


@functools.lru_cache(maxsize=2)
def _store(path: str, stamp: tuple[int, int]) -> Any:
    from plate_concepts.embeddings.store import EmbeddingStore

    return EmbeddingStore.open(path)


def forget_open_files() -> None:
    """Drop the cached store and dictionary handles, so a run re-checks the store's chunk
    files (one deleted since the last run of a long-lived process fails, never reads as zeros)."""
    _store.cache_clear()
    _estimator.cache_clear()


def _stamp(path: str | Path) -> tuple[int, int]:
    info = Path(path).stat()
    return info.st_mtime_ns, info.st_size


def compute_chunk(spec: PassSpec, chunk: int, estimator: Any = None) -> tuple[ChunkStats, Any]:
    """Statistics and codes of one row chunk (reads the store, runs the dictionary: the
    spec's file, or ``estimator`` when given)."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if estimator is None:
        device = task_device(spec.device)
        estimator = _estimator(spec.dictionary, _stamp(spec.dictionary), device)
    store = _store(spec.store, _stamp(Path(spec.store) / "store.json"))
    start, stop = spec.rows(chunk)
    # Each once: a label may be an index column too (profiling by well).
    wanted = ["plate", "well", "field", "foreground_fraction", *spec.label_columns,
              spec.control_column, spec.batch_column]
    columns = list(dict.fromkeys(c for c in wanted if c is not None))
    obs = _obs_rows(store, start, stop, columns)
    batches = None if spec.batch_column is None else obs[spec.batch_column].to_numpy()
    x = estimator.preprocess(store.read(slice(start, stop)), batches=batches)
    codes = estimator.encode(x)
    x_hat = estimator.decode(codes)
    stats = ChunkStats.of(
        codes, x, x_hat, obs, start, spec.label_columns, spec.control_column, spec.top_n
    )
    return stats, codes


def run_chunk(spec: PassSpec, chunk: int) -> int:
    """One task: compute a chunk, write its codes, then (the commit) its statistics file.
    Returns the chunk's number of tokens."""
    stats, codes = compute_chunk(spec, chunk)
    start, stop = spec.rows(chunk)
    group = zarr.open_group(Path(spec.out) / "codes", mode="r+")  # type: ignore[arg-type]
    width = group["indices"].shape[1]
    indices = np.zeros((stop - start, width), np.int32)
    values = np.zeros((stop - start, width), np.float32)
    k = codes.indices.shape[1]
    indices[:, :k] = codes.indices.cpu().numpy()
    values[:, :k] = codes.values.float().cpu().numpy()
    group["indices"][start:stop] = indices
    group["values"][start:stop] = values
    stats.save(spec.chunk_file(chunk))
    return stop - start


def _obs_rows(store: Any, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
    present = [c for c in columns if c in store.obs_columns]
    return store.read_obs(slice(start, stop), present).reset_index(drop=True)


# ---------------------------------------------------------------------- the reduce
class _Reducer:
    """Merges chunk statistics in chunk order; finishes each plate when its last chunk is in
    (written to its file, or kept in memory when the pass has no folder)."""

    def __init__(self, plan: dict[int, list[str]], plates_folder: Path | None) -> None:
        self.plate_order: list[str] = []
        self.last_chunk: dict[str, int] = {}
        for chunk, names in sorted(plan.items()):
            for name in names:
                if name not in self.last_chunk:
                    self.plate_order.append(name)
                self.last_chunk[name] = chunk
        self.folder = plates_folder
        self.total: ChunkStats | None = None
        self.open: dict[str, PlateStats] = {}
        self.finished: dict[str, PlateStats] = {}
        self.labels: dict[str, GroupSums] = {}
        self.n_excluded: dict[str, int] = {}
        self.controls: GroupSums | None = None
        self.plate_active: dict[str, np.ndarray] = {}
        self.plate_tokens: dict[str, int] = {}
        self.control_counts: dict[str, dict[Any, int]] = {}

    def add(self, chunk: int, stats: ChunkStats) -> None:
        for name, plate in stats.plates.items():
            self.open[name] = self.open[name].merge(plate) if name in self.open else plate
        stats.plates = {}
        self.total = stats if self.total is None else self.total.merge(stats)
        for name in [p for p in self.open if self.last_chunk[p] == chunk]:
            self._finish(name, self.open.pop(name))

    def _finish(self, name: str, plate: PlateStats) -> None:
        for column in plate.label_columns:
            sums = plate.label_values(column)
            flat = GroupSums(sums.keys, sums.counts, sums.active, sums.sums)
            self.labels[column] = self.labels[column].merge(flat) if column in self.labels else flat
            self.n_excluded[column] = self.n_excluded.get(column, 0) + plate.n_excluded.get(column, 0)
            counts = self.control_counts.setdefault(column, {})
            controls = plate.groups[CONTROL_LABEL + column]
            for value, count in zip(controls.keys, controls.counts.tolist(), strict=True):
                counts[value] = counts.get(value, 0) + count
        controls = plate.controls.regroup(lambda _: CONTROLS)
        flat = GroupSums(controls.keys, controls.counts, controls.active, controls.sums)
        self.controls = flat if self.controls is None else self.controls.merge(flat)
        self.plate_active[name] = plate.wells.active.sum(axis=0)
        self.plate_tokens[name] = plate.n_tokens
        if self.folder is None:
            self.finished[name] = plate
        else:
            plate.save(self.folder / plate_file(self.plate_order.index(name)), name)

    def totals(self) -> Totals:
        if self.total is None or self.open:
            raise RuntimeError("the pass is not complete: some chunks were not merged")
        total = self.total
        return Totals(
            total.n_features, total.n_tokens, total.active, total.sums, total.reconstruction,
            total.top, self.labels, self.n_excluded, self.controls, self.plate_order,  # type: ignore[arg-type]
            np.array([self.plate_tokens[p] for p in self.plate_order], dtype=np.int64),
            np.stack([self.plate_active[p] for p in self.plate_order]),
            self.control_counts,
        )


# ---------------------------------------------------------------------- running a pass
def check_token_dim(estimator: Any, store: Any, dictionary_path: str | os.PathLike | None = None) -> None:
    """A clear error, before any encoding, when a store's tokens are not the dimension the
    dictionary was fitted on (another model's or layer's embeddings)."""
    if estimator.n_features_in_ != store.dim:
        which = f"dictionary {dictionary_path}" if dictionary_path is not None else "the dictionary"
        raise ValueError(
            f"{which} expects {estimator.n_features_in_}-dimensional tokens but embedding store "
            f"{store.path} holds {store.dim}-dimensional ones (embedded with another model or layer?)"
        )


def plan_pass(
    store: Any,
    dictionary: str | os.PathLike | Any,
    out: str | os.PathLike | None,
    *,
    labels: Sequence[str] | None = None,
    control_column: str | None = "is_control",
    batch_column: str | None = None,
    top_n: int = DEFAULT_TOP_N,
    rows_per_task: int | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> PassSpec:
    """The :class:`PassSpec` of a pass over ``store`` (an EmbeddingStore) with a dictionary:
    its file, or a fitted estimator (then :func:`run_pass` must be given it, and runs in
    process). Label columns default to :func:`label_columns_of` the store, the batch column to
    the one the dictionary was whitened with, ``rows_per_task`` to the store's chunk rows."""
    from plate_concepts.dictionary.estimators import ICFL, recorded_batch_column

    path = None
    if isinstance(dictionary, (str, os.PathLike)):
        path = os.fspath(Path(dictionary).resolve())
        dictionary = ICFL.load(path)  # the file decides ICFL or TopKSAE
    check_token_dim(dictionary, store, path)
    if batch_column is None:
        batch_column = recorded_batch_column(dictionary)
    if dictionary.whitening_.method == "pca-batch" and batch_column is None:
        raise ValueError("this dictionary was whitened per batch: name the batch column (--batch-column)")
    # Columns as the user spells them (Metadata_cell_line for an imported cell_line, another case).
    if batch_column is not None:
        batch_column = store.resolve_column(batch_column, "batch column")
    if control_column is not None:
        try:
            control_column = store.resolve_column(control_column, "control column")
        except ValueError:
            control_column = None  # a store without controls: no control sums
    if labels is None:
        labels = label_columns_of(store, exclude=(control_column, batch_column))
    labels = list(dict.fromkeys(store.resolve_column(column, "label column") for column in labels))
    if isinstance(top_n, bool) or int(top_n) < 1:
        raise ValueError(f"top_n must be a positive integer, got {top_n!r}")
    rows = int(rows_per_task or store.chunk_rows)
    if rows < 1:
        raise ValueError(f"rows_per_task must be a positive integer, got {rows_per_task!r}")
    if len(store) == 0:
        raise ValueError(f"embedding store {store.path} holds no tokens")
    return PassSpec(
        store=os.fspath(Path(store.path).resolve()),
        dictionary=path,
        out=None if out is None else os.fspath(Path(out).resolve()),
        n_tokens=len(store), rows_per_task=rows, label_columns=tuple(labels),
        control_column=control_column, batch_column=batch_column, top_n=int(top_n),
        code_slots=int(dictionary.model_.code_slots), device=device, threads=threads,
        dictionary_sha256=None if path is None else file_sha256(path),
        store_plates=store_plates_digest(store),
    )


def run_pass(
    spec: PassSpec,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: ProgressLike | None = None,
    cancel: CancelLike | None = None,
    estimator: Any = None,
) -> ActivationPass:
    """Run the pass and return its result.

    ``workers=0`` runs every task in this process; otherwise the tasks go to the Dask cluster at
    ``scheduler`` or to a new ``LocalCluster`` of ``workers`` workers (default: one per GPU,
    else one per CPU core). With ``spec.out`` the pass is written there (resuming an
    interrupted pass of the same spec; a complete one is replaced only with ``overwrite``, and
    only once the new one is complete); without it nothing is written (in-process only, with
    the spec's dictionary file or a fitted ``estimator``).
    ``progress(done, total)`` counts tokens; ``cancel`` stops between tasks with
    :class:`~plate_concepts._progress.Cancelled` (finished tasks are kept).
    """
    forget_open_files()
    if spec.out is None:
        if workers not in (None, 0) or scheduler is not None:
            raise ValueError("a pass on Dask workers needs an output folder (out=) they can write to")
        return _run_in_memory(spec, progress, cancel, estimator)
    if spec.dictionary is None or estimator is not None:
        raise ValueError("a pass written to a folder reads its dictionary from a file: plan it with one")
    final = Path(spec.out)
    folder = _prepare_folder(spec, final, overwrite)
    work = PassSpec(**{**asdict(spec), "out": os.fspath(folder)})
    todo = [chunk for chunk in range(work.n_chunks) if not work.chunk_file(chunk).is_file()]
    done_tokens = sum(np.subtract(*work.rows(c)[::-1]) for c in range(work.n_chunks) if c not in set(todo))
    if progress is not None:
        progress(int(done_tokens), work.n_tokens)
    if todo:
        if workers == 0 and scheduler is None:
            for chunk in todo:
                if cancel_requested(cancel):
                    raise Cancelled(f"the activation pass was cancelled; {folder} resumes it")
                done_tokens += run_chunk(work, chunk)
                if progress is not None:
                    progress(int(done_tokens), work.n_tokens)
        else:
            _run_on_dask(work, todo, workers, scheduler, int(done_tokens), progress, cancel)
    _reduce_to_folder(work, folder)
    if folder != final:  # replacing a complete pass: swap only now that the new one is whole
        with atomic_path(final) as tmp:
            os.replace(folder, tmp)
    return ActivationPass.open(final)


def _run_in_memory(
    spec: PassSpec, progress: ProgressLike | None, cancel: CancelLike | None, estimator: Any
) -> ActivationPass:
    if spec.dictionary is None and estimator is None:
        raise ValueError("the pass needs a dictionary: plan it with a file or pass estimator=")
    parts: dict[int, ChunkStats] = {}
    for chunk in range(spec.n_chunks):
        if cancel_requested(cancel):
            raise Cancelled("the activation pass was cancelled")
        parts[chunk] = compute_chunk(spec, chunk, estimator)[0]
        if progress is not None:
            progress(spec.rows(chunk)[1], spec.n_tokens)
    reducer = _Reducer({c: list(p.plates) for c, p in parts.items()}, None)
    for chunk in range(spec.n_chunks):
        reducer.add(chunk, parts.pop(chunk))
    return ActivationPass(spec, reducer.totals(), None, reducer.finished)


def pass_of_codes(
    codes: SparseCodes,
    x: Any,
    x_hat: Any,
    obs: pd.DataFrame,
    *,
    labels: Sequence[str] = (),
    control_column: str | None = "is_control",
    top_n: int = DEFAULT_TOP_N,
    store: str | os.PathLike = "",
) -> ActivationPass:
    """An in-memory pass of codes that are already computed (one per row of ``obs``, with the
    pre-processed tokens ``x`` and their reconstructions ``x_hat``): the same statistics as
    :func:`run_pass`, without running a dictionary again."""
    if not len(codes) == len(obs) == len(x) == len(x_hat):
        raise ValueError(f"codes ({len(codes)}), x ({len(x)}), x_hat ({len(x_hat)}) and obs ({len(obs)}) must have one row per token")
    if control_column is not None and control_column not in obs.columns:
        control_column = None
    spec = PassSpec(
        store=os.fspath(store), dictionary=None, out=None, n_tokens=len(obs), rows_per_task=max(len(obs), 1),
        label_columns=tuple(labels), control_column=control_column, batch_column=None,
        top_n=int(top_n), code_slots=int(codes.indices.shape[1]), device="cpu", threads=None,
    )
    stats = ChunkStats.of(codes, x, x_hat, obs.reset_index(drop=True), 0, spec.label_columns, control_column, spec.top_n)
    reducer = _Reducer({0: list(stats.plates)}, None)
    reducer.add(0, stats)
    return ActivationPass(spec, reducer.totals(), None, reducer.finished)


def _run_on_dask(
    spec: PassSpec,
    todo: list[int],
    workers: int | None,
    scheduler: str | None,
    done_tokens: int,
    progress: ProgressLike | None,
    cancel: CancelLike | None,
) -> None:
    from distributed import as_completed

    with dask_cluster(workers, scheduler) as cluster:
        client = cluster.client
        if cluster.is_local:  # the machine's cores shared by the workers
            spec = PassSpec(**{**asdict(spec), "threads": spec.threads or cluster.threads})
        else:  # a user's cluster outlives runs: its workers may hold old handles
            client.run(forget_open_files)
        token = hashlib.sha1(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()[:10]
        futures = [
            client.submit(run_chunk, spec, chunk, key=f"plate-concepts-pass-{token}-chunk-{chunk}", pure=False)
            for chunk in todo
        ]
        finished = as_completed(futures)
        for batch in finished_batches(finished, lambda: cancel_requested(cancel)):
            for future in batch:
                done_tokens += future.result()  # a task's error is raised here
            if progress is not None:
                progress(done_tokens, spec.n_tokens)
        if not finished.is_empty():
            client.cancel(futures)
            raise Cancelled(f"the activation pass was cancelled; {spec.out} resumes it")


def _prepare_folder(spec: PassSpec, final: Path, overwrite: bool) -> Path:
    """The folder the pass works in: ``final`` (new or resumed), or a fixed sibling when a
    complete pass is being replaced. Creates the codes arrays and writes the plan."""
    record = read_pass_record(final) if final.exists() else None
    if final.exists() and record is None:
        raise FileExistsError(
            f"{final} exists and is not an activation pass; choose another output folder"
        )
    folder = final
    if record is not None and record["complete"]:
        if not overwrite:
            raise FileExistsError(
                f"{final} already holds a complete activation pass; pass --overwrite to replace it"
            )
        folder = final.with_name(f".{final.name}.next")  # resumable, unlike a random name
        record = read_pass_record(folder) if folder.exists() else None
    if record is not None and record["spec"] != spec.identity():
        if not overwrite:
            changed = sorted(k for k, v in spec.identity().items() if record["spec"].get(k) != v)
            raise ValueError(
                f"{folder} holds an unfinished pass with other settings ({', '.join(changed)} "
                "differ); run it with the same settings to resume, or pass --overwrite to restart"
            )
        shutil.rmtree(folder)  # our own unfinished pass, replaced on request
        record = None
    if record is None:
        (folder / "chunks").mkdir(parents=True, exist_ok=True)
        (folder / "plates").mkdir(exist_ok=True)
        width = spec.code_slots
        group = zarr.open_group(folder / "codes", mode="w", zarr_format=3)
        for name, dtype in (("indices", "int32"), ("values", "float32")):
            group.create_array(name, shape=(spec.n_tokens, width), chunks=(spec.rows_per_task, width),
                               dtype=dtype, fill_value=0)
        write_pass_record(folder, {"spec": spec.identity(), "complete": False, "made_in": spec.out})
    return folder


def _reduce_to_folder(spec: PassSpec, folder: Path) -> None:
    from plate_concepts.analysis.pass_stats import read_header

    files = {chunk: spec.chunk_file(chunk) for chunk in range(spec.n_chunks)}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise RuntimeError(f"the activation pass lacks {len(missing)} chunk result(s), e.g. {missing[0]}")
    plan = {chunk: [p["name"] for p in read_header(f)["plates"]] for chunk, f in files.items()}
    plates_folder = folder / "plates"
    for stale in plates_folder.glob("plate-*.safetensors"):
        stale.unlink()  # written by an earlier, interrupted reduce of this same pass
    reducer = _Reducer(plan, plates_folder)
    for chunk, file in files.items():
        reducer.add(chunk, ChunkStats.load(file))
    totals = reducer.totals()
    totals.save(folder / "global.safetensors")
    write_pass_record(folder, {
        "spec": spec.identity(), "complete": True, "made_in": spec.out, "plates": totals.plates,
        "n_tokens": totals.n_tokens, "n_features": totals.n_features,
    })


def label_columns_of(store: Any, exclude: Sequence[str | None] = (), max_values: int = 384) -> list[str]:
    """The obs columns that label tokens, from the store's value counts (no row is read): not
    the index, a control flag (the plate map's too) or a measurement (non-integral numbers), with 2 to
    ``max_values`` distinct values."""
    # The plate map's own control flag (renamed beside the store's is_control) marks controls: no label.
    skip = {c for c in exclude if c} | {"platemap_is_control"}
    columns = []
    for column, overview in store.describe(max_values=max_values)["labels"].items():
        n_values = overview["n_values"]
        if column in skip or n_values is None or not 2 <= n_values <= max_values:
            continue
        if not _is_measurement(overview["values"]):
            columns.append(column)
    return columns


def _is_measurement(values: dict[str, int]) -> bool:
    """True when every value reads as a number and some are not whole."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return False
    return any(not n.is_integer() for n in numbers)


