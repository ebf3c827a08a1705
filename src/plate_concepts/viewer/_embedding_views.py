"""Qt-free helpers of the embeddings panel and the store reader: token counts, crop-centre
points on the plate mosaic, the plate a store was made from, devices and embedder specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The plates of a store moved to the core (reports use them too); imported here for the viewer.
from plate_concepts.embeddings.source_plates import (  # noqa: F401
    attach_discovered_platemap,
    open_source_plate,
    open_store_plate,
    resolve_source,
    store_plate_sources,
)
from plate_concepts.embeddings.store import INDEX_COLUMNS, EmbeddingStore
from plate_concepts.plates.geometry import parse_well
from plate_concepts.plates.mosaic import PlateMosaic
from plate_concepts.plates.platemap import ControlSpec, as_text

LayerData = tuple[Any, dict, str]

NOT_LABELS = (*INDEX_COLUMNS, "foreground_fraction")
"""Obs columns that are positions or measurements, never labels to count or colour by."""

MAX_CATEGORIES = 24
"""A column with more distinct values than this is not offered as a label (an identifier or a
continuous measurement)."""

EMBEDDER_CHOICES = {
    "EfficientNet-Lite0 (built in)": "efficientnet-lite0",
    "TorchScript file": "torchscript",
    "Python module:callable": "module",
}
"""Embedder choices shown in the panel -> spec kind of :func:`load_embedder`."""


# ---------------------------------------------------------------------- labels and counts
def obs_label_columns(obs: pd.DataFrame) -> list[str]:
    """Obs columns usable as labels: not an index/measurement column, 1..MAX_CATEGORIES values."""
    columns = []
    for name in obs.columns:
        if name in NOT_LABELS:
            continue
        n_values = obs[name].astype(str).nunique(dropna=True)
        if 1 <= n_values <= MAX_CATEGORIES:
            columns.append(str(name))
    return columns


def tokens_per_well(obs: pd.DataFrame, labels: list[str] | None = None) -> pd.DataFrame:
    """One row per well (plate order): its label values and token count (column ``tokens``)."""
    if obs.empty:
        return pd.DataFrame(columns=["well", *(labels or []), "tokens"])
    labels = obs_label_columns(obs) if labels is None else labels
    groups = obs.groupby("well", sort=False)
    table = groups.size().rename("tokens").to_frame()
    for name in labels:
        table.insert(len(table.columns) - 1, name, groups[name].first().map(as_text))
    table = table.reset_index()
    return table.sort_values("well", key=lambda s: s.map(parse_well)).reset_index(drop=True)


def tokens_per_label(obs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Token and well counts per value of one obs column, largest first."""
    if column not in obs.columns:
        raise ValueError(f"the store has no column {column!r}; its columns are {list(obs.columns)}")
    values = obs[column].map(as_text)
    table = (
        pd.DataFrame(
            {
                "tokens": values.value_counts(),
                "wells": obs.assign(_v=values).groupby("_v")["well"].nunique(),
            }
        )
        .fillna(0)
        .astype(int)
    )
    table.index.name = column
    return table.sort_values(["tokens", "wells"], ascending=False).reset_index()


def store_summary(store: EmbeddingStore) -> str:
    """One paragraph on a store: tokens, dimension, model, crop size, plates, patch tokens."""
    provenance = store.provenance
    obs = store.obs
    plates = sorted(obs["plate"].unique()) if len(obs) else sorted(provenance.get("plates", {}))
    incomplete = [
        name
        for name, record in provenance.get("plates", {}).items()
        if not record.get("complete", True)
    ]
    lines = [
        f"{store.path.name}: {len(store)} tokens of dimension {store.dim} ({store.dtype.name})",
        f"model {provenance.get('model', '?')}, crops of {provenance.get('crop_size', '?')} px",
        f"plates: {', '.join(map(str, plates)) or '(none)'}"
        + (f" (incomplete, resumable: {', '.join(incomplete)})" if incomplete else ""),
        "patch tokens: "
        + (f"yes, {grid[0]} x {grid[1]} per crop" if (grid := store.patch_grid) else "no"),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- crops on the mosaic
def crop_centres(obs: pd.DataFrame, mosaic: PlateMosaic) -> np.ndarray:
    """(n, 2) level-0 mosaic coordinates (y, x) of the centres of the crops in ``obs``."""
    centres = np.empty((len(obs), 2), dtype=float)
    half = obs["crop_size"].to_numpy(dtype=float) / 2
    keys = zip(obs["well"], obs["field"].astype(int), strict=True)
    for i, ((well, field), y, x) in enumerate(zip(keys, obs["crop_y"], obs["crop_x"], strict=True)):
        oy, ox = mosaic.field_origin(well, field)
        centres[i] = (oy + y + half[i], ox + x + half[i])
    return centres


def color_column(obs: pd.DataFrame, control: str | None = None) -> str:
    """The obs column to colour crops by: the control-spec column when there is one (the main
    biological label), else the first label column other than ``is_control``, else ``well``."""
    labels = obs_label_columns(obs)
    if control:
        try:
            column = ControlSpec.parse(control).column
        except ValueError:
            column = None
        if column in labels:
            return column
    others = [c for c in labels if c != "is_control" and obs[c].astype(str).nunique() > 1]
    if others:
        return others[0]
    return "is_control" if "is_control" in labels else "well"


def crop_points_layer_data(store: EmbeddingStore, mosaic: PlateMosaic) -> LayerData:
    """A points layer at the centre of every crop of the store from the mosaic's plate, coloured
    by a label column; the crops' obs rows are the points' features (``token_row`` = store row)."""
    plate = mosaic.plate
    obs = store.obs
    rows = (
        np.flatnonzero((obs["plate"] == plate.name).to_numpy()) if len(obs) else np.array([], int)
    )
    selected = obs.iloc[rows]
    known = selected["well"].isin(plate.wells).to_numpy()
    rows, selected = rows[known], selected[known]
    record = store.provenance.get("plates", {}).get(plate.name, {})
    column = color_column(selected, record.get("control")) if len(selected) else "well"
    features = selected.reset_index(drop=True).copy()
    for name in features.columns:
        if name not in NOT_LABELS:
            features[name] = features[name].map(as_text)
    features.insert(0, "token_row", rows)
    crop_size = float(
        store.provenance.get("crop_size") or (selected["crop_size"].max() if len(selected) else 64)
    )
    return (
        crop_centres(selected, mosaic),
        {
            "name": f"{store.path.name} crops",
            "features": features,
            "face_color": column,
            "border_width": 0,
            "size": max(4.0, crop_size / 3),
            "opacity": 0.8,
            "metadata": {
                "plate_concepts": {
                    "role": "crop-points",
                    "store": str(store.path),
                    "color_by": column,
                }
            },
        },
        "points",
    )


# ---------------------------------------------------------------------- running the embedder
def available_devices() -> list[str]:
    """Devices present on this machine, CPU first: cpu, cuda (if any), mps (Apple GPUs)."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def embedder_spec(
    choice: str, model_file: str | Path | None = None, module: str | None = None
) -> str:
    """The :func:`load_embedder` spec for a panel choice (a key of :data:`EMBEDDER_CHOICES`)."""
    kind = EMBEDDER_CHOICES.get(choice, choice)
    if kind == "efficientnet-lite0":
        return kind
    if kind == "torchscript":
        path = Path(model_file) if model_file else None
        if path is None or not str(model_file).strip() or not path.is_file():
            raise ValueError(
                f"choose the TorchScript model file (.pt); {model_file!r} is not a file"
            )
        return f"torchscript:{path}"
    if kind == "module":
        target = (module or "").strip()
        if ":" not in target:
            raise ValueError(f"give the model as 'package.module:callable', got {target!r}")
        return f"module:{target}"
    raise ValueError(
        f"unknown embedder choice {choice!r}; expected one of {list(EMBEDDER_CHOICES)}"
    )
