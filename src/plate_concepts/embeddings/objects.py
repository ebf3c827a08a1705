"""One token per cell: a crop centred on each segmented object of a plate's label images.

Image-based profiling works per cell; a tile of a field holds several cells, parts of others and
background. With ``objects="cells"`` (or ``"nuclei"``, or any label image the plate has) each
object of that label image gets its own crop of ``object_size`` px, centred on the object's
centroid and moved inside the field where the object lies near its border (every crop has the
full size, which a model trained on one size needs). ``mask=True`` sets every pixel outside the
object to 0 (after intensity scaling), so the token describes the object alone and not its
neighbours. ``model_input`` resizes every crop (bilinear) to that many pixels a side before the
model: an ImageNet CNN sees objects at about 224 px, so a 96-px cell crop shown at 192 px gives
it finer structure to work with (measured on the demo plate in the user guide); the crop, its
index and the activation maps stay in field pixels (the patch grid is the model input's, spread
over the crop).

The obs index of an object token: its crop (``crop_y``, ``crop_x``, ``crop_size``, as for tiles,
so activation maps and crop galleries work unchanged) and its object: ``object_label`` (its id in
the label image), ``object_y``, ``object_x`` (centroid, px), ``object_area`` (px) and
``field_objects`` (how many objects its field has: the cell density). A resumed run skips the
objects (well, field, label id) already stored.

Progress counts fields (the number of objects is known only once a field's label image is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from plate_concepts.embeddings.embed_work import (
    FieldCrops,
    FieldReader,
    PlateJob,
    channel_indices,
    well_metadata,
)
from plate_concepts.embeddings.obs_index import OBJECT_COLUMNS  # noqa: F401 - documented here
from plate_concepts.embeddings.tiling import IntensityNormalizer
from plate_concepts.plates.geometry import parse_well
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import ControlSpec

DEFAULT_OBJECT_SIZE = 96


def object_table(labels: np.ndarray) -> pd.DataFrame:
    """Every object of a (Y, X) label image: ``label``, ``centroid_y``, ``centroid_x`` (px) and
    ``area`` (px), sorted by label (one pass over the pixels, no per-object loop)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label image must be 2-D (y, x), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a label image must hold integer ids, got dtype {labels.dtype}")
    flat = labels.ravel().astype(np.int64)
    if flat.min(initial=0) < 0:
        raise ValueError("a label image must not hold negative ids")
    ids, inverse, area = np.unique(flat, return_inverse=True, return_counts=True)
    rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
    sum_y = np.bincount(inverse, weights=rows, minlength=len(ids))
    sum_x = np.bincount(inverse, weights=cols, minlength=len(ids))
    keep = ids > 0
    return pd.DataFrame({
        "label": ids[keep], "centroid_y": sum_y[keep] / area[keep], "centroid_x": sum_x[keep] / area[keep],
        "area": area[keep],
    })


def object_crops(table: pd.DataFrame, shape: tuple[int, int], size: int) -> np.ndarray:
    """(n, 2) top-left corners of ``size``-px crops centred on the objects of ``table``, moved
    inside a field of ``shape`` where they would reach past its border."""
    height, width = int(shape[0]), int(shape[1])
    if size > min(height, width):
        raise ValueError(
            f"object crops of {size} px do not fit in fields of {height} x {width} px; choose a "
            "smaller --object-size"
        )
    half = size / 2
    y = np.clip(np.round(table["centroid_y"].to_numpy() + 0.5 - half), 0, height - size)
    x = np.clip(np.round(table["centroid_x"].to_numpy() + 0.5 - half), 0, width - size)
    return np.stack([y, x], axis=1).astype(np.int64).reshape(-1, 2)


@dataclass
class ObjectJob(PlateJob):
    """A plate to embed object by object (see the module docstring): ``pending`` holds, per
    field, the label ids already stored (the rest are to do)."""

    objects: str = "cells"
    object_size: int = DEFAULT_OBJECT_SIZE
    mask: bool = False
    model_input: int | None = None  # the side crops are resized to for the model; None: as cut
    done: dict[tuple[str, int], set[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.plate.images)  # fields: the unit of progress

    @property
    def remaining(self) -> int:
        return len(self.pending)

    def set_done(self, done_keys: set[tuple[str, int, int, int]]) -> None:
        """``done_keys``: (well, field, object label, objects in its field) of the objects
        stored already; a field is done when all its objects are."""
        stored: dict[tuple[str, int], set[int]] = {}
        counts: dict[tuple[str, int], int] = {}
        for well, field_index, label, in_field in done_keys:
            stored.setdefault((well, int(field_index)), set()).add(int(label))
            counts[(well, int(field_index))] = int(in_field)
        fields = sorted(self.plate.images, key=lambda key: (parse_well(key[0]), key[1]))
        self.done = {key: stored.get(key, set()) for key in fields}
        self.pending = {key: [] for key in fields if len(self.done[key]) < counts.get(key, 1)}

    def reader(self) -> ObjectReader:
        return ObjectReader(self)


def prepare_objects(
    plate: Plate,
    *,
    objects: str,
    object_size: int,
    mask: bool,
    channels: list[str] | None,
    control: ControlSpec | None,
    model_input: int | None = None,
) -> ObjectJob:
    """Everything about a plate's object crops but the intensity scaling and what is stored."""
    names = plate.label_names
    if objects not in names:
        raise ValueError(
            f"plate {plate.name!r} has no label image {objects!r} to take objects from "
            f"(it has: {', '.join(names) or 'no label images'}); embed without --objects to tile it"
        )
    _check_pixels("object_size", object_size)
    if model_input is not None:
        _check_pixels("model_input", model_input)
    shape = plate.image_shape
    if object_size > min(shape):
        raise ValueError(
            f"object crops of {object_size} px do not fit in the {shape[0]} x {shape[1]} px fields of "
            f"plate {plate.name!r}; choose a smaller object size"
        )
    tiling = {"objects": objects, "crop_size": int(object_size), "mask": bool(mask)}
    if model_input is not None:  # recorded only when set: stores made before it resume as they were
        tiling["model_input"] = int(model_input)
    return ObjectJob(
        plate=plate, grid=None, channel_index=channel_indices(plate, channels), nuclear_index=None,  # type: ignore[arg-type]
        normalizer=IntensityNormalizer(), well_metadata=well_metadata(plate, control), tiling=tiling,
        control=control, min_foreground=None, objects=objects, object_size=int(object_size), mask=bool(mask),
        model_input=None if model_input is None else int(model_input),
    )


def _check_pixels(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")


class ObjectReader(FieldReader):
    """Read, scale and cut one field's objects at a time; the next field is read in a thread."""

    job: ObjectJob

    def keys(self) -> list[tuple[str, int]]:
        return list(self.job.pending)  # a field's objects are known once it is read

    def read(self, key: tuple[str, int]) -> FieldCrops:
        job, (well, field_index) = self.job, key
        labels = job.plate.field_labels(well, field_index)[job.objects]
        labels = np.asarray(labels.compute(scheduler="threads"))  # read here, as FieldReader does
        table = object_table(labels)
        in_field = len(table)
        table = table[~table["label"].isin(job.done.get(key, set()))].reset_index(drop=True)
        if table.empty:
            return FieldCrops(well, field_index, np.empty((0, len(job.channel_index), 1, 1), np.float32), [], 0)
        image = np.asarray(job.plate.image(well, field_index).compute(scheduler="threads"))
        scaled = job.normalizer(image[job.channel_index])
        corners = object_crops(table, scaled.shape[-2:], job.object_size)
        size = job.object_size
        crops = np.empty((len(table), scaled.shape[0], size, size), dtype=np.float32)
        for i, (y, x) in enumerate(corners):
            crops[i] = scaled[:, y : y + size, x : x + size]
            if job.mask:
                crops[i] *= labels[y : y + size, x : x + size] == table["label"].iat[i]
        crops = resized(crops, job.model_input)
        metadata = job.well_metadata.get(well, {})
        rows = [
            {"plate": job.plate.name, "well": well, "field": field_index, "crop_y": int(y), "crop_x": int(x),
             "crop_size": size, "object_label": int(obj.label), "object_y": float(obj.centroid_y),
             "object_x": float(obj.centroid_x), "object_area": int(obj.area), "field_objects": in_field,
             **metadata}
            for (y, x), obj in zip(corners, table.itertuples(index=False), strict=True)
        ]
        return FieldCrops(well, field_index, crops, rows, skipped=0)


def resized(crops: np.ndarray, side: int | None) -> np.ndarray:
    """(n, C, s, s) crops resized to (n, C, side, side), bilinear (antialiased when shrinking);
    unchanged when ``side`` is None or already their size."""
    if side is None or side == crops.shape[-1]:
        return crops
    out = torch.nn.functional.interpolate(
        torch.from_numpy(crops), size=(side, side), mode="bilinear", align_corners=False,
        antialias=side < crops.shape[-1],
    )
    return out.numpy()


def stored_objects(store: Any, plate: str) -> set[tuple[str, int, int, int]]:
    """(well, field, object label, objects in its field) of the plate's object tokens in ``store``."""
    if plate not in store.plates or "object_label" not in store.obs_columns:
        return set()
    columns = ["well", "field", "object_label", "field_objects"]
    obs = store.read_obs(columns=columns, plate=plate)
    return set(zip(obs["well"].astype(str), *(obs[c].astype(int) for c in columns[1:]), strict=True))

