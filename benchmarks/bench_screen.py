"""A screen at N and 8N tokens: the activation pass on Dask, and the explorer opened from it.

Builds synthetic screens (d = 384, float16, 384-well plates of ~10k tokens; the same builder as
``bench_store_open.py``: hard-linked token chunks, so 8 M tokens take a few MB of disk), fits a
small ICFL dictionary on a sample, then measures

- the encode pass over N tokens with 1 and with 2 local Dask workers: tokens/s and the ratio,
- the pass over 8N tokens with 2 workers: tokens/s,
- the peak resident memory of each worker process at N and at 8N (ratio near 1: a task holds
  one row chunk whatever the store's size),
- opening the explorer from each pass on one plate (time, peak memory of this process) and a
  feature click there (per-well values, top crops on the plate, activation per label value),
- with ``--gpu``, the pass over 8N tokens on every CUDA device (one worker each): tokens/s per GPU.

Usage: ``python benchmarks/bench_screen.py [--tokens 1000000] [--factor 8] [--gpu] [--keep DIR]``
(``--quick``: 100k and 400k tokens). Each pass runs in its own cluster; the machine's cores are
shared by the workers (threads per worker = cores / workers).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_store_open import DIM, build_store


def fit_dictionary(store_path: Path, out: Path) -> Path:
    """A small ICFL dictionary (M = 1024, J x L = 4 x 2) fitted on 20k random tokens."""
    from plate_concepts.dictionary import ICFL

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((20_000, DIM)).astype(np.float32)
    estimator = ICFL(n_features=1024, n_rounds=4, per_round=2, steps=50, batch_size=2048,
                     device="cpu", seed=0, whiten="none")
    estimator.fit(tokens, is_control=np.ones(len(tokens), bool))
    return estimator.save(out)


def worker_peak_mb(client) -> list[float]:
    """Peak resident memory (MB) of every worker process."""
    return sorted(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024).values())


def run_pass(store_path: Path, dictionary: Path, out: Path, workers: int, device: str = "cpu") -> dict[str, float]:
    """The pass on a local cluster of ``workers`` processes (the plugin's own cluster set-up;
    with ``device="auto"`` and GPUs, one GPU per worker)."""
    from plate_concepts._dask import dask_cluster
    from plate_concepts.analysis.activation_pass import plan_pass
    from plate_concepts.analysis.activation_pass import run_pass as run
    from plate_concepts.embeddings.store import EmbeddingStore

    store = EmbeddingStore.open(store_path)
    with dask_cluster(workers, None) as cluster:
        spec = plan_pass(store, dictionary, out, labels=["cell_line"], device=device,
                         threads=cluster.threads)
        address = cluster.client.scheduler.address
        started = time.perf_counter()
        run(spec, scheduler=address)
        seconds = time.perf_counter() - started
        peaks = worker_peak_mb(cluster.client)
    return {"tokens_per_s": len(store) / seconds, "seconds": seconds, "worker_peak_mb": max(peaks)}


def open_explorer(pass_path: Path) -> dict[str, float]:
    """Open the explorer from a pass on the middle plate, then click a feature: its row of the
    feature table, the plate's per-well values and its top crops on the plate."""
    from plate_concepts.analysis.explorer import FeatureExplorer

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    explorer = FeatureExplorer.from_pass(pass_path)
    explorer.set_plate(explorer.store.plates[len(explorer.store.plates) // 2])
    explorer.prepare()
    table = explorer.feature_table()
    opened = time.perf_counter() - started
    clicks = []
    for feature in np.argsort(-table["frequency"].to_numpy())[:20]:
        started = time.perf_counter()
        wells = explorer.well_values(int(feature))
        top = explorer.top_crops(int(feature), 12, on_plate=True)
        explorer.label_value_activation(int(feature))
        clicks.append(time.perf_counter() - started)
        assert len(wells) == 384 and top
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"open_s": opened, "click_s": float(np.median(clicks)), "peak_growth_mb": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="100k and 4 x 100k tokens")
    parser.add_argument("--gpu", action="store_true", help="also the pass over 8N tokens on the GPUs")
    parser.add_argument("--keep", help="build the screens and passes in this folder and keep them")
    args = parser.parse_args()
    gpus = 0
    if args.gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            parser.error("--gpu: torch sees no CUDA device here")
    if args.quick:
        args.tokens, args.factor = 100_000, 4
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-screen-"))
    folder.mkdir(parents=True, exist_ok=True)
    sizes = (args.tokens, args.factor * args.tokens)
    for n in sizes:
        if not (folder / f"screen-{n}").exists():
            build_store(folder / f"screen-{n}", n)
    dictionary = folder / "dictionary.safetensors"
    if not dictionary.exists():
        fit_dictionary(folder / f"screen-{sizes[0]}", dictionary)

    rows = {}
    rows["N, 1 worker"] = run_pass(folder / f"screen-{sizes[0]}", dictionary, folder / "pass-N-1", 1)
    rows["N, 2 workers"] = run_pass(folder / f"screen-{sizes[0]}", dictionary, folder / "pass-N-2", 2)
    rows[f"{args.factor}N, 2 workers"] = run_pass(
        folder / f"screen-{sizes[1]}", dictionary, folder / "pass-8N-2", 2
    )
    print(f"\nactivation pass (d = {DIM}, M = 1024, J x L = 4 x 2; {os.cpu_count()} cores)")
    print(f"{'':<18}{'tokens':>12}{'tokens/s':>12}{'seconds':>10}{'peak MB/worker':>16}")
    for (label, row), n in zip(rows.items(), (sizes[0], sizes[0], sizes[1]), strict=True):
        print(f"{label:<18}{n:>12,}{row['tokens_per_s']:>12,.0f}{row['seconds']:>10.1f}{row['worker_peak_mb']:>16.0f}")
    one, two, big = rows.values()
    print(f"2 workers / 1 worker tokens/s: {two['tokens_per_s'] / one['tokens_per_s']:.2f}")
    print(f"peak memory per worker, {args.factor}N / N: {big['worker_peak_mb'] / two['worker_peak_mb']:.2f}")
    if gpus:
        gpu = run_pass(folder / f"screen-{sizes[1]}", dictionary, folder / "pass-8N-gpu", gpus, "auto")
        print(f"{args.factor}N on {gpus} GPU(s), one worker each: {gpu['tokens_per_s']:,.0f} tokens/s, "
              f"{gpu['tokens_per_s'] / gpus:,.0f} per GPU ({gpu['seconds']:.1f} s)")

    print("\nexplorer from the pass")
    for label, path in (("N", folder / "pass-N-2"), (f"{args.factor}N", folder / "pass-8N-2")):
        figures = open_explorer(path)
        print(f"{label:<4} open {figures['open_s']:.3f} s, feature click on one plate "
              f"{1000 * figures['click_s']:.1f} ms (median of 20), memory growth "
              f"{figures['peak_growth_mb']:.0f} MB")
    if not args.keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
