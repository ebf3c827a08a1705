"""Builders the tests share: small in-memory plates, their OME-Zarr copies and embedding
stores, a tiny TorchScript embedder, a planted-feature "world" (plate, mosaic, store, prepared
explorer) and a napari viewer with the Features panel.

Fixtures hand them out (``plate_of``, ``tiny_plate``, ``tiny_zarr``, ``tiny_embedder``,
``tiny_store``, ``feature_world``, ``features_viewer``); each documents what is planted in it,
so a test reads its expectations from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from plate_concepts.plates.geometry import PlateFormat
from plate_concepts.plates.model import Plate

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


# ---------------------------------------------------------------------- threads
@pytest.fixture
def one_thread():
    """One torch thread (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    busy 2-core machine, two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- any plate
def plate_of(
    images: Mapping[tuple[str, int], Any],
    *,
    labels: Mapping[tuple[str, int], Mapping[str, Any]] | None = None,
    platemap: pd.DataFrame | None = None,
    name: str = "tiny",
    channels: list[str] | None = None,
    n_wells: int | None = None,
    chunks: Any = None,
) -> Plate:
    """A plate of in-memory fields: ``images[(well, field)]`` is a (C, y, x) array (one
    pyramid level, dask ``chunks`` if given), ``labels[(well, field)][name]`` a (y, x) array.
    Channels default to ``c0, c1, ...``; ``n_wells`` fixes the plate format."""
    first = next(iter(images.values()))
    return Plate(
        name=name,
        channels=channels or [f"c{i}" for i in range(first.shape[0])],
        images={
            key: [da.from_array(np.asarray(pixels), chunks=chunks or -1)]
            for key, pixels in images.items()
        },
        labels={
            key: {label: [da.from_array(np.asarray(array))] for label, array in named.items()}
            for key, named in (labels or {}).items()
        },
        reader="test",
        platemap=platemap,
        plate_format=None if n_wells is None else PlateFormat.from_n_wells(n_wells),
    )


@pytest.fixture(name="plate_of", scope="session")
def plate_of_fixture():
    """:func:`plate_of`, for tests that build their own plates."""
    return plate_of


# ---------------------------------------------------------------------- the tiny plate
TINY_WELLS = ("B02", "B03", "C02")
TINY_FIELD = (2, 64, 96)  # channels, y, x


def make_tiny_plate() -> Plate:
    """Wells B02, B03 and C02 of a 12-well plate, two fields each of 2 x 64 x 96 px (DNA, Mito).

    Every pixel of field f of the n-th well is 1000 * n + 100 * f plus noise in [0, 50), so a
    misplaced field is caught; each field has one nucleus (label id 7, rows 10-19, columns
    30-39). Plate map: treatment DMSO / drug / DMSO, dose 0 / 1.5 / 0, batch b1 / b1 / b2, and
    a well without images (D01, DMSO).
    """
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for number, well in enumerate(TINY_WELLS, start=1):
        for field in range(2):
            noise = rng.integers(0, 50, size=TINY_FIELD)
            images[(well, field)] = (1000 * number + 100 * field + noise).astype(np.uint16)
            nuclei = np.zeros(TINY_FIELD[1:], dtype=np.int32)
            nuclei[10:20, 30:40] = 7
            labels[(well, field)] = {"nuclei": nuclei}
    platemap = pd.DataFrame(
        {
            "treatment": ["DMSO", "drug", "DMSO", "DMSO"],
            "dose": [0, 1.5, 0, 0],
            "batch": ["b1", "b1", "b2", "b2"],
        },
        index=pd.Index([*TINY_WELLS, "D01"], name="well"),
    )
    return plate_of(images, labels=labels, platemap=platemap, channels=["DNA", "Mito"])


@pytest.fixture
def tiny_plate() -> Plate:
    """:func:`make_tiny_plate`."""
    return make_tiny_plate()


@pytest.fixture
def tiny_zarr(tmp_path) -> Path:
    """The tiny plate written as an OME-Zarr plate."""
    from plate_concepts.plates.omezarr import write_ome_zarr_plate

    return write_ome_zarr_plate(make_tiny_plate(), tmp_path / "tiny.ome.zarr")


class TinyEmbedder(torch.nn.Module):
    """16 x 16 average pooling -> (B, gh, gw, 3C) patch tokens: cheap and deterministic."""

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(crops, 16)
        return torch.cat([pooled, pooled * pooled, pooled.sqrt()], dim=1).permute(0, 2, 3, 1)


@pytest.fixture
def tiny_embedder(tmp_path) -> Path:
    """A TorchScript file of :class:`TinyEmbedder` (6-dimensional tokens from 2 channels)."""
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyEmbedder()), str(path))
    return path


@pytest.fixture
def tiny_store(tiny_zarr, tiny_embedder, tmp_path):
    """(OME-Zarr plate path, its embedding store): 32 px crops (2 x 3 per field, 36 in all)
    by the tiny embedder, DMSO wells as controls."""
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.embeddings.embedders import load_embedder
    from plate_concepts.plates import open_plate

    store = embed_plate(
        open_plate(tiny_zarr), tmp_path / "tiny.store", load_embedder(f"torchscript:{tiny_embedder}"),
        crop_size=32, control="treatment=DMSO", device="cpu",
    )  # fmt: skip
    return tiny_zarr, store


# ---------------------------------------------------------------------- a planted feature
FEATURE_FIELD = 64  # px per side of a field
FEATURE_CROP = 16  # px per crop: 4 x 4 crops per field
FEATURE_GRID = 4  # patch tokens per crop side: 4 px per patch
FEATURE_DIM = 16
FEATURE_WELLS = ["A01", "A02", "A03", "B01", "B02", "B03"]
TREATED = {"A02", "B02"}  # drug wells: cell 1 (top-left quarter) lights up along direction()


def quarter_cells(field: int) -> np.ndarray:
    """Four square cells, one per quarter of the field (ids 1..4; field 1 numbers them from 5)."""
    labels = np.zeros((FEATURE_FIELD, FEATURE_FIELD), dtype=np.uint16)
    half = FEATURE_FIELD // 2
    for index, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        labels[y + 4 : y + half - 4, x + 4 : x + half - 4] = index + 1 + 4 * field
    return labels


def direction() -> np.ndarray:
    """The planted direction: the 4th axis of the token space."""
    v = np.zeros(FEATURE_DIM, dtype=np.float32)
    v[3] = 1.0
    return v


def make_feature_plate(wells: list[str] = FEATURE_WELLS, n_fields: int = 2, seed: int = 0) -> Plate:
    """Plate "tiny": 64 px fields of two channels (DNA, Mito) with :func:`quarter_cells` as
    ``cells`` (bright in channel 0) and the same cells shrunk by 2 px as ``nuclei``; plate map
    treatment (drug in :data:`TREATED`, else DMSO) and batch (b1 in row A, b2 in row B)."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for well in wells:
        for field in range(n_fields):
            image = rng.integers(100, 200, size=(2, FEATURE_FIELD, FEATURE_FIELD)).astype(np.uint16)
            cells = quarter_cells(field)
            image[0][cells > 0] += 800  # a bright cell body in channel 0
            images[(well, field)] = image
            nuclei = np.where(ndimage.binary_erosion(cells > 0, iterations=2), cells, 0)
            labels[(well, field)] = {"cells": cells, "nuclei": nuclei}
    platemap = pd.DataFrame(
        {
            "treatment": ["drug" if w in TREATED else "DMSO" for w in wells],
            "batch": ["b1" if w.startswith("A") else "b2" for w in wells],
        },
        index=pd.Index(wells, name="well"),
    )
    return plate_of(
        images, labels=labels, platemap=platemap, channels=["DNA", "Mito"],
        chunks=(1, FEATURE_FIELD, FEATURE_FIELD),
    )  # fmt: skip


def make_feature_store(path, plate: Plate, seed: int = 0):
    """Crop tokens = mean of their patch tokens (noise); in treated wells the patches inside
    cell 1 of each field get +4 :func:`direction`. Controls: the DMSO wells."""
    from plate_concepts.embeddings.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    rows, patches = [], []
    step = FEATURE_CROP // FEATURE_GRID
    for well in plate.wells:
        for field in plate.fields(well):
            cells = quarter_cells(field)
            for cy in range(0, FEATURE_FIELD, FEATURE_CROP):
                for cx in range(0, FEATURE_FIELD, FEATURE_CROP):
                    grid = rng.normal(size=(FEATURE_GRID, FEATURE_GRID, FEATURE_DIM))
                    grid = grid.astype(np.float32)
                    if well in TREATED:
                        centres = cells[
                            cy + step // 2 : cy + FEATURE_CROP : step,
                            cx + step // 2 : cx + FEATURE_CROP : step,
                        ]
                        grid[centres == 1 + 4 * field] += 4 * direction()
                    patches.append(grid)
                    rows.append(
                        {
                            "plate": plate.name, "well": well, "field": field,
                            "crop_y": cy, "crop_x": cx, "crop_size": FEATURE_CROP,
                            "is_control": well not in TREATED,
                            "treatment": "drug" if well in TREATED else "DMSO",
                            "batch": "b1" if well.startswith("A") else "b2",
                        }
                    )  # fmt: skip
    patches = np.stack(patches)
    store = EmbeddingStore.create(path, dim=FEATURE_DIM, patch_grid=(FEATURE_GRID, FEATURE_GRID))
    store.append(patches.mean(axis=(1, 2)), pd.DataFrame(rows), patch_tokens=patches)
    return store


def make_feature_dictionary(store, n_features: int = 16, steps: int = 20):
    """A small ICFL dictionary fitted on the store (seeded)."""
    from plate_concepts.dictionary.estimators import ICFL

    torch.manual_seed(0)
    return ICFL(
        n_features=n_features, n_rounds=2, per_round=2, steps=steps, batch_size=64,
        device="cpu", log_every=5,
    ).fit(store)  # fmt: skip


@pytest.fixture(scope="module")
def feature_world(tmp_path_factory):
    """(plate, mosaic, store, prepared explorer) of :func:`make_feature_plate`, one per test
    module (tests fill the explorer's caches). The mosaic's gaps keep tiles divisible by 4, so
    maps can be 2x or 4x coarser and still line up."""
    from plate_concepts.analysis.explorer import FeatureExplorer
    from plate_concepts.plates.mosaic import PlateMosaic

    torch.set_num_threads(1)
    plate = make_feature_plate()
    store = make_feature_store(tmp_path_factory.mktemp("world") / "tiny.store", plate)
    explorer = FeatureExplorer(store, make_feature_dictionary(store), plate=plate).prepare()
    return plate, PlateMosaic(plate, well_gap=8, field_gap=4), store, explorer


# ---------------------------------------------------------------------- viewers
@pytest.fixture
def features_viewer(make_napari_viewer):
    """``show(plate, store, explorer, **viewer_options)`` -> (viewer, state, panel, mosaic): a
    napari viewer showing the plate, with the store, the explorer's dictionary and the explorer
    in its state and the Features panel docked."""

    def show(plate: Plate, store: Any, explorer: Any, **viewer_options: Any):
        from plate_concepts.viewer.app import show_plate
        from plate_concepts.viewer.features_panel import FeaturesPanel
        from plate_concepts.viewer.state import get_state

        viewer = make_napari_viewer(**viewer_options)
        mosaic = show_plate(viewer, plate)
        state = get_state(viewer)
        state.set_store(store)
        state.set_dictionary(explorer.estimator)
        panel = FeaturesPanel(viewer)
        viewer.window.add_dock_widget(panel, name="Features")
        state.set_explorer(explorer)
        return viewer, state, panel, mosaic

    return show
