"""Embedding on Dask: fields distributed to workers, each writing its own part, the store
committing the parts in order.

:func:`~plate_concepts.embeddings.embed.embed_plates` with ``workers`` or ``scheduler`` runs
here; everything else (which plates, the store's checks, provenance, each plate's intensity
scaling) is decided by :mod:`~plate_concepts.embeddings.embed` exactly as for an in-process run.

The unit of work is a *part*: consecutive fields of one plate holding about ``group_size``
crops still to embed (the group an in-process run commits at once; for one token per object,
fields holding about that many objects, estimated from the plate's first label image). A task
(:func:`embed_part`, run on a worker) reads its fields, embeds their crops with the model that
the worker builds once and keeps on its device, and writes its tokens, patch tokens and index
rows as one folder in the staging folder beside the store (:func:`parts_folder`), written
whole or not at all (``plate_concepts._io.atomic_path``). This process appends finished parts
to the store in plate and field order — the rows of an in-process run, in the same order —
each in one commit, then deletes the part. Parts that finish out of order wait on disk; at
most a few per worker are running or waiting at any time, so neither memory nor the staging
folder grows with the screen.

Resuming (after a crash, Ctrl-C or a killed worker): a part already committed is deleted, a
finished part not yet committed is committed without embedding again, and only fields in no
part are embedded. A part records what its fields lacked in the store when it was planned and
a digest of the store's and the plate's settings; one that no longer matches is deleted and
embedded again. A task re-run after its worker died writes the same part again (nothing is
counted twice).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from plate_concepts._dask import dask_cluster, finished_batches, task_device
from plate_concepts._io import atomic_path
from plate_concepts.embeddings.embed_work import CropBatcher, FieldReader, PlateJob
from plate_concepts.embeddings.embedders import (
    Embedder,
    TorchScriptEmbedder,
    load_embedder,
)
from plate_concepts.embeddings.objects import ObjectJob, object_table
from plate_concepts.embeddings.store_files import arrow_table
from plate_concepts.plates.model import FieldKey

PART_FILE = "part.json"
PART_FORMAT = "plate-concepts-embedding-part"
#: Parts running or waiting to be committed, per worker: enough to keep every worker busy
#: while the next part in order finishes, few enough to bound the staging folder.
PARTS_PER_WORKER = 4


def parts_folder(store_path: str | Path) -> Path:
    """Where the parts of a Dask run into the store at ``store_path`` wait to be committed."""
    path = Path(store_path).resolve()  # an absolute path: the workers' cwd may differ
    return path.with_name(f".{path.name}.parts")


@dataclass(frozen=True)
class PartSettings:
    """What every task of a run needs besides its fields (plain data, cheap to send)."""

    embedder: str | None  # the spec each worker builds the model from; None: the model is sent
    fingerprint: str | None  # digest of the model's weights, which a worker's build must match
    device: str
    threads: int | None
    batch_size: int
    shape: tuple[int, int, int]
    patch_tokens: bool


# ---------------------------------------------------------------------- on a worker
def embed_part(
    settings: PartSettings,
    job: PlateJob,
    folder: str,
    manifest: dict[str, Any],
    model: Embedder | None = None,
) -> dict[str, Any]:
    """One task: embed the fields of ``job`` (a plate restricted to the part's fields, see
    :func:`task_job`) and write them as the part ``folder``; returns its manifest
    (``manifest`` with ``n_rows`` and ``settled``, the progress units it settles). A part that
    is already written for the same fields is returned as it is."""
    written = read_manifest(Path(folder))
    if written is not None and _same_part(written, manifest):
        return written
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = task_device(settings.device)
    if model is None:
        model = _worker_model(settings.embedder, device, settings.fingerprint)  # type: ignore[arg-type]
    else:
        model = model.to(device)
    objects = isinstance(job, ObjectJob)
    reader = job.reader() if objects else FieldReader(job)
    parts: list[tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]] = []
    batcher = CropBatcher(model, settings.shape, settings.batch_size, sys.maxsize,
                          settings.patch_tokens, lambda *part: parts.append(part), lambda: False)  # fmt: skip
    settled = 0
    for crops in reader.iterate(lambda: False):
        settled += 1 if objects else crops.skipped + len(crops.rows)
        batcher.add(crops.crops, crops.rows)
    batcher.finish()  # one commit: the whole part
    tokens, patches, rows = parts[0] if parts else (None, None, [])
    result = {**manifest, "n_rows": len(rows), "settled": settled}
    _write_part(Path(folder), tokens, patches, rows, result)
    return result


@functools.lru_cache(maxsize=2)
def _worker_model(spec: str, device: str, fingerprint: str | None) -> Embedder:
    """The model of ``spec``, built once per worker process and kept on its device."""
    model = load_embedder(spec)
    found = model_fingerprint(model)
    if found != fingerprint:
        raise ValueError(
            f"the model {spec!r} built on a Dask worker differs from the one this run started "
            f"with (weights digest {found} instead of {fingerprint}): its weights are not fixed "
            "(a random initialisation?) or the worker reads other files; give the model fixed "
            "weights, or embed in process (without --workers/--scheduler)"
        )
    return model.to(device)


def model_fingerprint(model: Embedder) -> str | None:
    """A digest of the weights of the torch modules an embedder holds (None: it holds none)."""
    modules = [value for value in vars(model).values() if isinstance(value, torch.nn.Module)]
    if not modules:
        return None
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _write_part(
    folder: Path,
    tokens: np.ndarray | None,
    patches: np.ndarray | None,
    rows: list[dict[str, Any]],
    manifest: dict[str, Any],
) -> None:
    from safetensors.numpy import save_file

    with atomic_path(folder) as tmp:
        tmp.mkdir()
        if rows:
            arrays = {"tokens": np.ascontiguousarray(tokens)}
            if patches is not None:
                arrays["patch_tokens"] = np.ascontiguousarray(patches)
            save_file(arrays, str(tmp / "tokens.safetensors"))
            pq.write_table(arrow_table(pd.DataFrame(rows)), tmp / "obs.parquet")
        (tmp / PART_FILE).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------- parts on disk
def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a finished part, or None (no part, or not one of ours)."""
    try:
        manifest = json.loads((folder / PART_FILE).read_text())
    except (OSError, ValueError):
        return None
    return (
        manifest if isinstance(manifest, dict) and manifest.get("format") == PART_FORMAT else None
    )


def read_part(folder: Path) -> tuple[np.ndarray, np.ndarray | None, pd.DataFrame]:
    """Tokens, patch tokens (or None) and index rows of a finished, non-empty part."""
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / "tokens.safetensors"))
    obs = pq.read_table(folder / "obs.parquet").to_pandas()
    return arrays["tokens"], arrays.get("patch_tokens"), obs


def _same_part(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("format", "plate", "digest", "fields")
    return all(a.get(key) == b.get(key) for key in keys)


def _check_picklable(embedder: Embedder) -> None:
    """What cannot be pickled cannot be sent to a worker: say so before any work starts."""
    import pickle

    import cloudpickle

    try:
        cloudpickle.dumps(embedder)
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as error:
        raise ValueError(
            f"the embedder {embedder.name!r} cannot be sent to Dask workers ({error}); give its "
            "spec (torchscript:PATH, module:package.module:callable) instead"
        ) from None


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- planning a plate
def task_job(job: PlateJob, keys: Sequence[FieldKey]) -> PlateJob:
    """``job`` restricted to the fields ``keys`` (their full-resolution images and label images
    only): what one task is sent."""
    plate = job.plate
    images = {key: plate.images[key][:1] for key in keys}
    labels = {
        key: {name: levels[:1] for name, levels in plate.labels[key].items()}
        for key in keys
        if key in plate.labels
    }
    sub = dataclasses.replace(plate, images=images, labels=labels, platemap=None)
    fields: dict[str, Any] = {"plate": sub, "pending": {key: job.pending[key] for key in keys}}
    if isinstance(job, ObjectJob):
        fields["done"] = {key: job.done.get(key, set()) for key in keys}
    return dataclasses.replace(job, **fields)


def _field_state(job: PlateJob, key: FieldKey) -> list[int]:
    """What the field lacked in the store when a part was planned: the crops still to embed, or
    for objects the labels already stored (a part is valid while this is unchanged)."""
    if isinstance(job, ObjectJob):
        return sorted(job.done.get(key, set()))
    return list(job.pending[key])


@dataclass
class _Part:
    keys: list[FieldKey]
    folder: Path
    manifest: dict[str, Any]  # what it covers; with n_rows and settled once finished
    finished: bool = False


@dataclass
class _PlatePlan:
    job: PlateJob
    parts: list[_Part]
    submitted: int = 0  # parts sent to workers or found finished
    committed: int = 0


def plan_plate(job: PlateJob, staging: Path, digest: str, group_size: int) -> _PlatePlan:
    """The plate's parts in field order: finished parts found in ``staging`` that still match
    the store (the others deleted), and new parts for the fields in none."""
    keys = job.reader().keys() if isinstance(job, ObjectJob) else FieldReader(job).keys()
    position = {key: i for i, key in enumerate(keys)}
    prefix = _plate_id(job.plate.name)
    found: dict[FieldKey, _Part] = {}
    for folder in sorted(staging.glob(f"{prefix}-*")):
        manifest = read_manifest(folder)
        part_keys = [] if manifest is None else [(str(w), int(f)) for w, f, _ in manifest["fields"]]
        at = [position.get(key) for key in part_keys]
        valid = (
            manifest is not None and manifest.get("digest") == digest and part_keys
            and None not in at and at == list(range(at[0], at[0] + len(at)))  # type: ignore[operator]
            and manifest["fields"] == [[w, f, _field_state(job, (w, f))] for w, f in part_keys]
            and part_keys[0] not in found
        )  # fmt: skip
        if valid:
            found[part_keys[0]] = _Part(part_keys, folder, manifest, finished=True)  # type: ignore[arg-type]
        else:  # committed already, or made for what the store no longer lacks
            _remove(folder)
    per_part = _keys_per_part(job, keys, group_size)
    parts: list[_Part] = []
    group: list[FieldKey] = []
    crops = 0
    i = 0
    while i < len(keys):
        key = keys[i]
        if key in found:
            parts += _new_parts(job, group, staging, digest) + [found[key]]
            group, crops = [], 0
            i += len(found[key].keys)
            continue
        group.append(key)
        crops += per_part(key)
        if crops >= group_size:
            parts += _new_parts(job, group, staging, digest)
            group, crops = [], 0
        i += 1
    parts += _new_parts(job, group, staging, digest)
    return _PlatePlan(job, parts)


def _keys_per_part(
    job: PlateJob, keys: list[FieldKey], group_size: int
) -> Callable[[FieldKey], int]:
    """How many crops a field adds to a part: its crops still to embed, or for objects the
    objects of the plate's first field to do (one label image read here)."""
    if not isinstance(job, ObjectJob):
        return lambda key: len(job.pending[key])
    if not keys:
        return lambda key: 1
    well, field_index = keys[0]
    labels = job.plate.field_labels(well, field_index)[job.objects].compute(scheduler="threads")
    per_field = max(1, len(object_table(np.asarray(labels))))
    return lambda key: per_field


def _new_parts(job: PlateJob, keys: list[FieldKey], staging: Path, digest: str) -> list[_Part]:
    if not keys:
        return []
    well, field_index = keys[0]
    folder = staging / f"{_plate_id(job.plate.name)}-{well}-{field_index:05d}"
    manifest = {
        "format": PART_FORMAT, "plate": job.plate.name, "digest": digest,
        "fields": [[w, f, _field_state(job, (w, f))] for w, f in keys],
    }  # fmt: skip
    return [_Part(list(keys), folder, manifest)]


def _plate_id(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:12]


def plate_digest(store: Any, job: PlateJob) -> str:
    """A digest of everything that shapes the plate's tokens and rows: the store's model,
    crops, channels and patch tokens, and the plate's record (scaling, tiling, labels)."""
    provenance = store.provenance
    record = {key: value for key, value in job.record(False).items() if key not in ("complete", "format")}
    shared = {
        key: provenance.get(key)
        for key in ("embedder", "crop_size", "channels", "patch_grid", "objects")
    }
    payload = {
        "store": shared,
        "dim": store.dim,
        "patch_tokens": store.patch_grid is not None,
        "plate": record,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


# ---------------------------------------------------------------------- the run
@dataclass
class DaskEmbedding:
    """One run on a cluster: opens plates as their parts are needed, sends parts to workers
    (at most ``PARTS_PER_WORKER`` per worker running or waiting), commits them in order."""

    store: Any
    jobs: list[PlateJob]
    embedder: Embedder
    settings: dict[str, Any]  # batch_size, group_size, patch_tokens, shape, device, spec
    begin: Callable[[PlateJob], None]  # fits and records the plate before its parts are planned
    end: Callable[[PlateJob], None]  # compacts and records the plate once its parts are in
    tick: Callable[[int], None]
    settled: int
    stop: Callable[[], bool]
    plans: list[_PlatePlan] = field(default_factory=list)
    _opened: int = 0

    def run(self, workers: int | None, scheduler: str | None) -> None:
        from distributed import as_completed

        staging = parts_folder(self.store.path)
        staging.mkdir(exist_ok=True)
        with dask_cluster(workers, scheduler) as cluster:
            client = cluster.client
            part_settings, model = self._part_settings(cluster.threads)
            model_ref = None if model is None else client.scatter(model, broadcast=True, hash=False)
            window = PARTS_PER_WORKER * cluster.n_workers
            running: dict[str, tuple[Any, _Part]] = {}
            pending = as_completed()
            token = hashlib.sha1(str(Path(self.store.path).resolve()).encode()).hexdigest()[:10]

            def fill() -> None:
                """Send parts until the window is full; a part found finished on disk is
                committed in its turn, so the window holds only parts still to wait for."""
                while not self.stop() and self._waiting() < window:
                    next_part = self._next_part(staging)
                    if next_part is None:
                        return
                    plan, part = next_part
                    if part.finished:
                        self._count(part)
                        self._commit_ready()
                        continue
                    key = f"plate-concepts-embed-{token}-{part.folder.name}"
                    future = client.submit(
                        embed_part, part_settings, task_job(plan.job, part.keys),
                        str(part.folder), part.manifest, model_ref, key=key, pure=False,
                    )  # fmt: skip
                    running[future.key] = (future, part)
                    pending.add(future)

            fill()
            for batch in finished_batches(pending, self.stop):
                for future in batch:
                    _, part = running.pop(future.key)
                    part.manifest = future.result()  # a task's error is raised here
                    part.finished = True
                    self._count(part)
                self._commit_ready()
                fill()
            if running:  # cancelled: finished parts stay on disk for the next run
                client.cancel([future for future, _ in running.values()])
            self._commit_ready()

    def _part_settings(self, threads: int | None) -> tuple[PartSettings, Embedder | None]:
        """The tasks' settings, and the model to send them: None when the workers build it
        from its spec (the embedder was given as one, or is a TorchScript file, which cannot
        be pickled), checked against the weights this process loaded."""
        s, embedder = self.settings, self.embedder
        spec = s.get("spec")
        if spec is None and isinstance(embedder, TorchScriptEmbedder):
            spec = embedder.name if embedder.name.startswith("torchscript:") else None
        if spec is None:
            _check_picklable(embedder)
        settings = PartSettings(
            embedder=spec, fingerprint=None if spec is None else model_fingerprint(embedder),
            device=str(s["device"]), threads=threads, batch_size=s["batch_size"],
            shape=tuple(s["shape"]), patch_tokens=bool(s["patch_tokens"]),
        )  # fmt: skip
        return settings, embedder if spec is None else None

    def _next_part(self, staging: Path) -> tuple[_PlatePlan, _Part] | None:
        """The next part to send or take from disk, opening the next plate when needed."""
        while True:
            for plan in self.plans:
                if plan.submitted < len(plan.parts):
                    plan.submitted += 1
                    return plan, plan.parts[plan.submitted - 1]
            if self._opened == len(self.jobs):
                return None
            job = self.jobs[self._opened]
            self._opened += 1
            self.begin(job)
            digest = plate_digest(self.store, job)
            self.plans.append(plan_plate(job, staging, digest, self.settings["group_size"]))
            self._commit_ready()  # a plate with nothing left to embed is finished now

    def _waiting(self) -> int:
        return sum(plan.submitted - plan.committed for plan in self.plans)

    def _count(self, part: _Part) -> None:
        self.settled += int(part.manifest["settled"])
        self.tick(self.settled)

    def _commit_ready(self) -> None:
        """Append the finished parts that are next in order; finish plates whose parts are in."""
        while self.plans:
            plan = self.plans[0]
            while plan.committed < plan.submitted and plan.parts[plan.committed].finished:
                part = plan.parts[plan.committed]
                if part.manifest["n_rows"]:
                    tokens, patches, obs = read_part(part.folder)
                    self.store.append(tokens, obs, patch_tokens=patches)
                _remove(part.folder)  # committed: a crash before this is seen on resume
                plan.committed += 1
            if plan.committed < len(plan.parts):
                return
            self.end(plan.job)
            self.plans.pop(0)
