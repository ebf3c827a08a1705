"""Embedding on Dask: tokens/s in this process, on 1 and on 2 local Dask workers.

Writes a synthetic OME-Zarr plate (``--wells`` wells x ``--fields`` fields of 3 x 512 x 512
uint16, seeded noise with bright blobs; read from disk by the workers as a real plate is), then
embeds it with ``--model`` (default EfficientNet-Lite0, the package's default model) into a new
store three times: in this process, with ``--workers 1`` and with ``--workers 2``. Each run
reports

- ``tokens/s``: tokens over the whole call (a Dask run includes starting its cluster and each
  worker building the model),
- ``steady tokens/s``: tokens embedded after the first part finished, over the time since
  (the cluster and the models are up),

and the ratio of 2 to 1 workers. A local cluster gives each of its N workers cores / N torch
threads, so with few cores the ratio measures how well two processes share them compared with
one process using them all. Every store is checked to hold the same rows as the in-process one.

Usage: ``python benchmarks/bench_embed_dask.py [--wells 16] [--fields 2] [--crop 128]
[--model efficientnet-lite0] [--group-size 64] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd


def synthetic_plate(folder: Path, wells: int, fields: int) -> Path:
    """An OME-Zarr plate of ``wells`` wells (row by row in a 96-well layout) x ``fields`` fields."""
    from plate_concepts.plates.model import Plate
    from plate_concepts.plates.omezarr_write import write_ome_zarr_plate

    rng = np.random.default_rng(0)
    names = [f"{'ABCDEFGH'[i // 12]}{i % 12 + 1:02d}" for i in range(wells)]
    images = {}
    for well in names:
        for field in range(fields):
            image = rng.integers(100, 400, (3, 512, 512)).astype(np.uint16)
            for y, x in rng.integers(0, 480, (40, 2)):
                image[:, y : y + 24, x : x + 24] += rng.integers(500, 3000, (3, 1, 1)).astype(np.uint16)
            images[(well, field)] = [da.from_array(image, chunks=(1, 512, 512))]
    plate = Plate(name="bench", channels=["DNA", "ER", "Mito"], images=images, reader="bench")
    return write_ome_zarr_plate(plate, folder / "bench.ome.zarr", n_levels=1)


def embed(
    plate_path: Path, store: Path, model: str, crop: int, group: int, workers: int | None
) -> dict[str, float]:
    from plate_concepts.embeddings.embed import embed_plates
    from plate_concepts.plates import open_plate

    ticks: list[tuple[float, int]] = []
    started = time.perf_counter()
    result = embed_plates(
        [open_plate(plate_path)], store, model, crop_size=crop, batch_size=32, group_size=group,
        device="cpu", workers=workers, progress=lambda done, total: ticks.append((time.perf_counter(), done)),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    first = next((t, done) for t, done in ticks if done > 0)
    last = ticks[-1]
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    return {"tokens": len(result), "seconds": seconds, "tokens_per_s": len(result) / seconds,
            "steady_tokens_per_s": steady}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wells", type=int, default=16)
    parser.add_argument("--fields", type=int, default=2)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--group-size", type=int, default=64,
                        help="crops per part (a Dask task); the package's default is 1024, for "
                        "screens: this small plate needs smaller parts to give both workers work")
    parser.add_argument("--keep", help="build the plate and stores in this folder and keep them")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-embed-dask-"))
    folder.mkdir(parents=True, exist_ok=True)
    plate = folder / "bench.ome.zarr"
    if not plate.exists():
        synthetic_plate(folder, args.wells, args.fields)

    rows = {}
    for label, workers in (("in process", None), ("1 worker", 1), ("2 workers", 2)):
        store = folder / f"store-{label.replace(' ', '-')}"
        shutil.rmtree(store, ignore_errors=True)
        rows[label] = embed(plate, store, args.model, args.crop, args.group_size, workers)
    from plate_concepts.embeddings.store import EmbeddingStore

    reference = EmbeddingStore.open(folder / "store-in-process")
    for label in ("1 worker", "2 workers"):
        other = EmbeddingStore.open(folder / f"store-{label.replace(' ', '-')}")
        pd.testing.assert_frame_equal(other.obs, reference.obs)
        difference = float(np.abs(other.read() - reference.read()).max())
        rows[label]["max_difference"] = difference

    crops = rows["in process"]["tokens"]
    print(f"\nembed {crops} crops of {args.crop} px (3 channels), model {args.model}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"{'':<12}{'seconds':>9}{'tokens/s':>10}{'steady tokens/s':>17}{'max |token diff|':>18}")
    for label, row in rows.items():
        diff = row.get("max_difference")
        print(f"{label:<12}{row['seconds']:>9.1f}{row['tokens_per_s']:>10.1f}"
              f"{row['steady_tokens_per_s']:>17.1f}{'-' if diff is None else f'{diff:.1e}':>18}")  # fmt: skip
    one, two = rows["1 worker"], rows["2 workers"]
    print(f"2 workers / 1 worker: tokens/s {two['tokens_per_s'] / one['tokens_per_s']:.2f}, "
          f"steady {two['steady_tokens_per_s'] / one['steady_tokens_per_s']:.2f}")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
