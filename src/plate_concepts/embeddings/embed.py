"""Embed plates: fields -> crops -> embedder -> one embedding store, resumable and cancellable.

Per field (read one at a time; the next field is read in a background thread while the current
crops are embedded): scale intensities, cut the crop grid, optionally drop crops with too little
nuclear foreground, and queue the crops. Queued crops are embedded in batches of ``batch_size``
on the device; every ``group_size`` embedded crops are appended to the store in one commit, so an
interruption loses at most one group. The per-plate and per-field work lives in
:mod:`~plate_concepts.embeddings.embed_work`; this module owns the store: what may be written
to it, the commits and the provenance.

Several plates go into one store (:func:`embed_plates`), one after the other; each has its
record under ``provenance["plates"][name]`` and its own obs parts. Until every plate asked for is
finished, the store is incomplete (``EmbeddingStore.check_complete``).

Resuming: running again on the same store skips every crop whose key (plate, well, field,
crop_y, crop_x) is already stored, and reuses each plate's recorded intensity levels, so the
finished store matches an uninterrupted run. Settings that would make tokens incomparable
(model, crop size, channels, tiling, normalisation, patch tokens), or labels that would mix
(another plate map or control spec), must match what the store recorded, else a ``ValueError``
says what differs.

On Dask (``workers`` or ``scheduler``) the fields are embedded by the workers of a cluster,
part by part, and this process commits the parts in the order of an in-process run
(:mod:`~plate_concepts.embeddings.embed_dask`); everything else here is the same.

Obs columns: ``plate, well, field, crop_y, crop_x, crop_size``, the well's plate-map columns
(all but the well/position columns; a column named like a store column gets a ``platemap_``
prefix), ``is_control`` when a control spec is given and ``foreground_fraction`` when
``min_foreground`` is set.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from plate_concepts._io import atomic_path
from plate_concepts._progress import ProgressLike, progress_ticker
from plate_concepts.embeddings.embed_dask import DaskEmbedding, parts_folder
from plate_concepts.embeddings.embed_work import (
    RESERVED_COLUMNS,
    CropBatcher,
    FieldReader,
    PlateJob,
    channel_view,
    label_changes,
    metadata_digest,
    prepare_plate,
)
from plate_concepts.embeddings.embedders import (
    Embedder,
    describe_embedder,
    load_embedder,
    output_shape,
)
from plate_concepts.embeddings.objects import DEFAULT_OBJECT_SIZE, prepare_objects, stored_objects
from plate_concepts.embeddings.store import EmbeddingStore, check_replaceable
from plate_concepts.embeddings.tiling import IntensityNormalizer
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import ControlSpec

__all__ = ["RESERVED_COLUMNS", "embed_plate", "embed_plates", "staging_path"]

CancelLike = threading.Event | Callable[[], bool]
#: Provenance keys whose difference makes two plates' tokens incomparable.
_STORE_SETTINGS = ("model", "crop_size", "channels", "patch_grid", "objects")


def embed_plate(
    plate: Plate,
    store_path: str | PathLike,
    embedder: Embedder | str,
    *,
    overwrite: bool = False,
    progress: ProgressLike | None = None,
    cancel: CancelLike | None = None,
    **settings: Any,
) -> EmbeddingStore:
    """Embed every crop of ``plate`` into the store at ``store_path``: created, resumed (the
    plate is in it), or the plate added (the store holds others). ``settings`` are those of
    :func:`embed_plates` (``crop_size``, ``batch_size``, ``control``...)."""
    return _embed(
        [plate], store_path, embedder, "add", False, overwrite, progress, cancel, settings
    )


def embed_plates(
    plates: Sequence[Plate],
    store_path: str | PathLike,
    embedder: Embedder | str,
    *,
    append: bool = False,
    replace_plate: bool = False,
    overwrite: bool = False,
    crop_size: int = 256,
    stride: int | None = None,
    batch_size: int = 32,
    drop_edge: bool = False,
    min_foreground: float | None = None,
    nuclear: str | int | None = None,
    channels: list[str] | None = None,
    normalizer: IntensityNormalizer | None = None,
    patch_tokens: bool = False,
    objects: str | None = None,
    object_size: int | None = None,
    mask: bool = False,
    model_input: int | None = None,
    control: ControlSpec | str | None = None,
    device: str | torch.device = "auto",
    token_dtype: str = "float32",
    group_size: int = 1024,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: ProgressLike | None = None,
    cancel: CancelLike | None = None,
) -> EmbeddingStore:
    """Embed every crop of ``plates`` into one store at ``store_path``, plate after plate.

    What happens to an existing store:

    - by default it is resumed: the plates must be those it was made from (or was asked to
      embed when it was interrupted); a store holding other plates is refused.
    - ``append``: the plates are added to it (same model, crop size and channels, else
      refused naming what differs); a plate it holds already is refused, unless
      ``replace_plate``: its rows are then deleted and it is embedded again.
    - ``overwrite``: a new store is built beside it (``staging_path``) and replaces it only when
      every plate is embedded; a cancelled run leaves it untouched (run again with
      ``overwrite`` to continue). Only an embedding store is ever replaced.

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
        Channel names to embed, in this order (default: the store's, else all of the plate's).
    normalizer
        Intensity scaling; default ``IntensityNormalizer()`` (0.1-99.9 percentiles per plate),
        fitted on each plate when not fitted yet.
    patch_tokens
        Also store each crop's patch-token grid (float16).
    objects, object_size, mask
        One token per object of the label image ``objects`` (``"cells"``, ``"nuclei"``...)
        instead of the crop grid: a crop of ``object_size`` px (default 96) centred on each
        object, with ``mask`` the pixels outside the object set to 0
        (:mod:`~plate_concepts.embeddings.objects`). Progress then counts fields.
    model_input
        With ``objects``: resize each object's crop to this many pixels a side before the model
        (None: as cut). Recorded in the store; a resume or append with another value is refused.
    control
        Which wells are controls (``ControlSpec`` or ``"column=value[,value]"``): sets ``is_control``.
    device
        ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda:1"``...
    group_size
        Embedded crops per store append (one commit); also bounds the crops lost by a crash.
        On Dask: about the crops of one task (whole fields of one plate).
    workers, scheduler
        Embed on ``dask.distributed``: a new local cluster of ``workers`` worker processes
        (``workers=0`` or neither given: in this process), or the existing cluster at
        ``scheduler`` (``tcp://host:8786``), whose workers must read the plates and write beside
        the store at the same paths. Each worker builds the model once and keeps it on its
        device (``device="auto"``: one GPU per worker); the store, its rows and their order are
        those of an in-process run (:mod:`~plate_concepts.embeddings.embed_dask`).
    progress
        ``callable(done, total)``, a tqdm-like object (``update(n)``) or True (a tqdm bar);
        done counts crop positions settled (stored before, embedded, or skipped as background).
    cancel
        ``threading.Event`` or ``callable() -> bool``, checked after every batch: the crops
        embedded so far are appended, then the function returns; run it again to resume.
    """
    policy = "append" if append else "resume"
    settings = {
        "crop_size": crop_size, "stride": stride, "batch_size": batch_size, "drop_edge": drop_edge,
        "min_foreground": min_foreground, "nuclear": nuclear, "channels": channels,
        "normalizer": normalizer, "patch_tokens": patch_tokens, "control": control,
        "device": device, "token_dtype": token_dtype, "group_size": group_size,
        "objects": objects, "object_size": object_size, "mask": mask, "model_input": model_input,
        "workers": workers, "scheduler": scheduler,
    }  # fmt: skip
    return _embed(
        plates, store_path, embedder, policy, replace_plate, overwrite, progress, cancel, settings
    )


def staging_path(store_path: str | PathLike) -> Path:
    """Where ``overwrite`` builds the store that replaces the one at ``store_path``."""
    path = Path(store_path)
    return path.with_name(f".{path.name}.overwrite")


def _embed(
    plates: Sequence[Plate],
    store_path: str | PathLike,
    embedder: Embedder | str,
    policy: str,
    replace_plate: bool,
    overwrite: bool,
    progress: ProgressLike | None,
    cancel: CancelLike | None,
    settings: dict[str, Any],
) -> EmbeddingStore:
    defaults = {"crop_size": 256, "stride": None, "batch_size": 32, "drop_edge": False,
                "min_foreground": None, "nuclear": None, "channels": None, "normalizer": None,
                "patch_tokens": False, "control": None, "device": "auto", "token_dtype": "float32",
                "group_size": 1024, "objects": None, "object_size": None, "mask": False,
                "model_input": None, "workers": None, "scheduler": None}  # fmt: skip
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise TypeError(f"unknown embedding setting(s) {unknown}; expected {sorted(defaults)}")
    s = {**defaults, **settings}
    plates = _checked_plates(plates)
    batch_size = _positive(s["batch_size"], "batch_size")
    group_size = _positive(s["group_size"], "group_size")
    if s["min_foreground"] is not None and not 0 <= s["min_foreground"] <= 1:
        raise ValueError(f"min_foreground must be a fraction in [0, 1], got {s['min_foreground']}")
    control = ControlSpec.parse(s["control"]) if isinstance(s["control"], str) else s["control"]
    on_dask = _on_dask(s["workers"], s["scheduler"])
    stop = _as_cancel(cancel)
    path = Path(store_path)
    target = _target(path, overwrite)
    existing = EmbeddingStore.open(target) if EmbeddingStore.is_store(target) else None

    # Every plate embeds the same channels, by name, in the store's (or the first plate's) order.
    channels = s["channels"] or (existing.provenance.get("channels") if existing else None)
    tiling = {
        key: s[key] for key in ("crop_size", "stride", "drop_edge", "min_foreground", "nuclear")
    }
    channels = channels or list(plates[0].channels)
    objects = s["objects"]
    if s["model_input"] is not None and objects is None:
        raise ValueError("model_input resizes object crops: it goes with objects (a label image)")
    if objects is not None:  # one token per object instead of the crop grid
        s["crop_size"] = s["object_size"] or DEFAULT_OBJECT_SIZE
        jobs = [prepare_objects(plate, objects=objects, object_size=s["crop_size"], mask=s["mask"],
                                channels=channels, control=control, model_input=s["model_input"])
                for plate in plates]
    else:
        jobs = [prepare_plate(plate, channels=channels, control=control, **tiling) for plate in plates]
    if existing is not None:
        _check_policy(existing, [job.plate.name for job in jobs], policy, replace_plate)
    spec = embedder if isinstance(embedder, str) else None  # on Dask, workers build it too
    if isinstance(embedder, str):
        embedder = load_embedder(embedder)
    # On Dask the workers embed; this process only learns the output shape and the weights.
    embedder = embedder.to("cpu" if on_dask else s["device"])
    # The model sees crops of model_input px when set (the object crops are resized to it).
    shape = output_shape(embedder, len(jobs[0].channel_index), s["model_input"] or s["crop_size"])
    provenance = _store_provenance(embedder, s["crop_size"], shape, jobs[0])
    if objects is not None:
        recorded = {"label_image": objects, "mask": bool(s["mask"])}
        if s["model_input"] is not None:  # only when set: older stores resume as they were
            recorded["model_input"] = int(s["model_input"])
        provenance |= {"objects": recorded,
                       "token": f"mean of the patch tokens of a crop centred on each object of {objects!r}"}
    store = existing
    if store is None:
        store = EmbeddingStore.create(
            target, shape[2], dtype=s["token_dtype"], provenance={**provenance, "plates": {}},
            patch_grid=shape[:2] if s["patch_tokens"] else None, overwrite=target.exists(),
        )  # fmt: skip
    else:
        _check_store(store, provenance, shape[2], s["patch_tokens"])
        if replace_plate:
            _remove_plates(store, [job.plate.name for job in jobs])

    # Refuse a resume that changes a plate's settings or labels before any work starts.
    records = store.provenance.get("plates", {})
    for job in jobs:
        if job.plate.name in records:
            _resume_plate(store, job, records[job.plate.name], s["normalizer"])
        if objects is not None:
            job.set_done(stored_objects(store, job.plate.name))
        else:
            job.set_done({key[1:] for key in store.completed_keys(job.plate.name)})
    unfinished = [j.plate.name for j in jobs if not records.get(j.plate.name, {}).get("complete")]
    earlier = [] if policy == "resume" else store.provenance.get("pending_plates") or []
    store.update_provenance(pending_plates=list(dict.fromkeys([*earlier, *unfinished])))

    total = sum(job.total for job in jobs)
    todo = [
        job for job in jobs
        if not (records.get(job.plate.name, {}).get("complete") and (job.remaining == 0 or objects))
    ]  # fmt: skip

    def begin(job: PlateJob) -> None:
        if job.plate.name not in records:
            job.normalizer = _fitted(s["normalizer"], job)
        _record_plate(store, job, complete=False)

    def end(job: PlateJob) -> None:
        store.compact_obs(job.plate.name)
        _record_plate(store, job, complete=True)

    with progress_ticker(progress, total, "embedding", "crop" if objects is None else "field") as tick:
        settled = total - sum(job.remaining for job in jobs)
        tick(settled)
        if on_dask:
            work = {**s, "shape": shape, "batch_size": batch_size, "group_size": group_size, "spec": spec}
            run = DaskEmbedding(store, todo, embedder, work, begin, end, tick, settled, stop)
            run.run(s["workers"] or None, s["scheduler"])
        else:
            _embed_in_process(store, todo, embedder, shape, s, begin, end, tick, settled, stop)
    unfinished = set(store.incomplete_plates())
    if not unfinished:  # every part of an earlier Dask run is in the store
        shutil.rmtree(parts_folder(target), ignore_errors=True)
    if target != path and not any(job.plate.name in unfinished for job in jobs):
        with atomic_path(path, overwrite=True) as tmp:  # the finished store replaces the old one
            target.rename(tmp)
        return EmbeddingStore.open(path)
    return store


def _embed_in_process(
    store: EmbeddingStore,
    jobs: list[PlateJob],
    embedder: Embedder,
    shape: tuple[int, int, int],
    s: dict[str, Any],
    begin: Callable[[PlateJob], None],
    end: Callable[[PlateJob], None],
    tick: Callable[[int], None],
    settled: int,
    stop: Callable[[], bool],
) -> None:
    """Read, embed and commit the plates' fields here, group after group."""
    objects = s["objects"] is not None

    def commit(tokens: np.ndarray, patches: np.ndarray | None, rows: list[dict[str, Any]]) -> None:
        nonlocal settled
        store.append(tokens, pd.DataFrame(rows), patch_tokens=patches)
        if not objects:  # objects: progress counts fields read
            settled += len(rows)
            tick(settled)

    batcher = CropBatcher(
        embedder, shape, s["batch_size"], s["group_size"], s["patch_tokens"], commit, stop
    )
    for job in jobs:
        begin(job)
        reader = job.reader() if objects else FieldReader(job)
        for field_crops in reader.iterate(lambda: batcher.cancelled or stop()):
            settled += 1 if objects else field_crops.skipped
            if objects:
                tick(settled)
            batcher.add(field_crops.crops, field_crops.rows)
            if batcher.cancelled:
                break
        batcher.finish()
        if batcher.cancelled or stop():
            return
        end(job)


# ---------------------------------------------------------------------- what may be written
def _target(path: Path, overwrite: bool) -> Path:
    """The folder to embed into: ``path``, or with ``overwrite`` of an existing store its
    staging folder (resumed when a cancelled overwrite left one)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"{path} is a file; an embedding store is a folder: choose another path"
        )
    if path.is_dir() and any(path.iterdir()) and not EmbeddingStore.is_store(path):
        raise FileExistsError(
            f"{path} exists and is not an embedding store; it was left alone: choose another path"
        )
    if not overwrite or not EmbeddingStore.is_store(path):
        return path
    check_replaceable(path, overwrite=True)
    staging = staging_path(path)
    if staging.exists() and not EmbeddingStore.is_store(staging):
        raise FileExistsError(
            f"{staging} (where --overwrite builds the new store) exists and is not an embedding "
            "store; move it away first"
        )
    return staging


def _check_policy(
    store: EmbeddingStore, names: list[str], policy: str, replace_plate: bool
) -> None:
    """Refuse plates the store may not take: a resume must name its own plates; an append
    must not repeat one unless it replaces it."""
    records = store.provenance.get("plates", {})
    known = dict.fromkeys(
        [*store.plates, *records, *(store.provenance.get("pending_plates") or [])]
    )
    if policy == "resume":
        new = [name for name in names if name not in known]
        if new and known:
            raise ValueError(
                f"embedding store {store.path} holds plate(s) {list(known)}, not {new}; pass "
                "--append (append=True) to add them to it, or choose another store"
            )
    elif policy == "append" and not replace_plate:
        tokens = store.tokens_per_plate()
        already = [name for name in names if name in known]
        if already:
            shown = ", ".join(f"{name} ({tokens.get(name, 0)} tokens)" for name in already)
            raise ValueError(
                f"embedding store {store.path} already holds plate(s) {shown}; pass "
                "--replace-plate (replace_plate=True) to delete and embed them again, or leave "
                "out --append to resume an interrupted run"
            )


def _remove_plates(store: EmbeddingStore, names: list[str]) -> None:
    with_rows = [name for name in names if name in store.plates]
    if with_rows:
        store.remove_plates(with_rows)
    records = store.provenance.get("plates", {})
    if any(name in records for name in names):  # recorded, never committed a row
        store.update_provenance(plates={k: v for k, v in records.items() if k not in names})


def _store_provenance(
    embedder: Embedder, crop_size: int, shape: tuple[int, int, int], job: PlateJob
) -> dict[str, Any]:
    return {
        "model": embedder.name,
        "embedder": describe_embedder(embedder),
        "token": "mean of the crop's patch tokens",
        "crop_size": int(crop_size),
        "channels": [job.plate.channels[i] for i in job.channel_index],
        "patch_grid": list(shape[:2]),
    }


def _check_store(
    store: EmbeddingStore, provenance: dict[str, Any], dim: int, patch_tokens: bool
) -> None:
    recorded = store.provenance
    mismatches = [
        f"{key}: store {recorded.get(key)!r}, now {provenance.get(key)!r}"
        for key in _STORE_SETTINGS
        if recorded.get(key) != provenance.get(key)
    ]
    if store.dim != dim:
        mismatches.append(f"token dimension: store {store.dim}, now {dim}")
    if (store.patch_grid is not None) != bool(patch_tokens):
        has = "has" if store.patch_grid else "has no"
        mismatches.append(
            f"patch tokens: store {has} patch tokens, now patch_tokens={patch_tokens}"
        )
    if mismatches:
        raise ValueError(
            f"embedding store {store.path} was made with other settings, so its tokens would not "
            f"be comparable ({'; '.join(mismatches)}); embed into a new store, or replace this "
            "one with --overwrite (overwrite=True)"
        )


# ---------------------------------------------------------------------- per-plate records
def _resume_plate(
    store: EmbeddingStore,
    job: PlateJob,
    record: dict[str, Any],
    normalizer: IntensityNormalizer | None,
) -> None:
    """Set the plate's recorded scaling, after checking that nothing that shapes its tokens or
    labels changed since it was recorded."""
    changed = [
        f"{key}: store {record.get(key)!r}, now {value!r}"
        for key, value in job.tiling.items()
        if record.get(key) != value
    ]
    stored = IntensityNormalizer.from_record(record["normalization"])
    if normalizer is not None and not stored.same_settings(normalizer):
        changed.append(
            f"normalization: store {record['normalization']}, now {normalizer.describe()}"
        )
    control = None if job.control is None else str(job.control)
    if record.get("control") != control:
        changed.append(f"control spec: store {record.get('control')!r}, now {control!r}")
    changed += _label_changes(store, job, record)
    if changed:
        raise ValueError(
            f"plate {job.plate.name!r} is already in embedding store {store.path} with other "
            f"settings or labels ({'; '.join(changed)}); resume with the same settings, plate map "
            "and --control, or embed it again with --append --replace-plate"
        )
    job.normalizer = stored


def _fitted(normalizer: IntensityNormalizer | None, job: PlateJob) -> IntensityNormalizer:
    """The given (or default) scaling, fitted on the plate's embedded channels when it is not."""
    normalizer = normalizer or IntensityNormalizer()
    if normalizer.is_fitted:
        return normalizer
    # Fit a copy: the caller's normaliser may be shared between plates.
    fitted = IntensityNormalizer.from_record(normalizer.describe())
    return fitted.fit(channel_view(job.plate, job.channel_index))


def _label_changes(store: EmbeddingStore, job: PlateJob, record: dict[str, Any]) -> list[str]:
    """How the plate map now differs from the labels the plate's stored tokens carry."""
    name = job.plate.name
    changes = []
    if name in store.plates:
        changes = label_changes(store.read_obs(plate=name), job.well_metadata)
    recorded = (record.get("platemap") or {}).get("sha256")
    if not changes and recorded is not None and recorded != metadata_digest(job.well_metadata):
        changes.append("the plate map differs for wells not embedded yet")
    return changes


def _record_plate(store: EmbeddingStore, job: PlateJob, complete: bool) -> None:
    provenance = store.provenance
    plates = provenance.get("plates", {})
    plates[job.plate.name] = job.record(complete)
    pending = [
        p for p in provenance.get("pending_plates") or [] if not (complete and p == job.plate.name)
    ]
    store.update_provenance(plates=plates, pending_plates=pending)


# ---------------------------------------------------------------------- helpers
def _checked_plates(plates: Sequence[Plate]) -> list[Plate]:
    if isinstance(plates, Plate):
        plates = [plates]
    plates = list(plates)
    if not plates:
        raise ValueError("no plate to embed")
    for plate in plates:
        if not isinstance(plate, Plate):
            raise TypeError(
                f"plates must be Plates (see plate_concepts.plates.open_plate), got {type(plate).__name__}"
            )
    names = [plate.name for plate in plates]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        sources = [plate.source for plate in plates if plate.name in twice]
        raise ValueError(
            f"several plates are named {twice} ({sources}); a store tells plates apart by name: "
            "give each plate its own name"
        )
    return plates


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


def _on_dask(workers: Any, scheduler: str | None) -> bool:
    """Whether to embed on Dask; refuses a contradictory or malformed request."""
    whole = isinstance(workers, (int, np.integer)) and not isinstance(workers, bool)
    if workers is not None and (not whole or workers < 0):
        raise ValueError(
            f"workers must be 0 (embed in this process) or a number of Dask workers, got {workers!r}"
        )
    if scheduler is not None and workers is not None:
        raise ValueError(
            "give workers (a new local Dask cluster) or scheduler (an existing one), not both"
        )
    if scheduler is not None and not str(scheduler).strip():
        raise ValueError("scheduler must be the address of a Dask scheduler, e.g. tcp://host:8786")
    return scheduler is not None or bool(workers)


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
