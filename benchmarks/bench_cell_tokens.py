"""Crop tokens or one token per cell? The publication's comparison (``compare``) on two stores of
the same demo plate, and, for the per-cell store, selectivity against the demo's per-cell ground
truth.

For each store, every run of the grid (ICFL and TopK, whitened and not, matched sparsity) is
fitted and evaluated as ``plate-concepts compare`` does, for the well labels ``perturbation`` and
``cell_type``; its dictionary is saved in ``--out-dir``. For a store of object tokens (``embed
--objects cells``), each cell's token is then scored against the ground truth
(``ground_truth.parquet`` of the demo folder, joined on well, field and cell id): ``phenotype`` is
the cell's perturbation if the cell shows it (``affected``), ``unaffected`` for the other cells of
perturbed wells and ``DMSO`` for the controls; the table gives the best feature's max selectivity
for each perturbation against all other cells, and for each cell type.

Usage::

    python benchmarks/bench_cell_tokens.py DEMO_FOLDER STORE [STORE ...] --out-dir DIR
        [--features 256] [--sparsity 8] [--steps 600] [--batch-size 1024] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from plate_concepts.analysis.compare import compare, grid
from plate_concepts.analysis.selectivity import selectivity
from plate_concepts.dictionary.estimators import ICFL
from plate_concepts.embeddings.store import EmbeddingStore


def cell_truth(store: EmbeddingStore, ground_truth: pd.DataFrame) -> pd.DataFrame:
    """The ground truth of every object token's cell, in store order."""
    obs = store.read_obs(columns=["well", "field", "object_label"])
    truth = ground_truth.rename(columns={"cell_id": "object_label"})
    joined = obs.merge(truth, on=["well", "field", "object_label"], how="left", validate="one_to_one")
    if joined["affected"].isna().any():
        raise ValueError(f"{int(joined['affected'].isna().sum())} tokens have no ground-truth cell")
    joined["phenotype"] = np.where(
        joined["perturbation"] == "DMSO", "DMSO",
        np.where(joined["affected"].astype(bool), joined["perturbation"], "unaffected"),
    )
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_folder")
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--sparsity", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ground_truth = pd.read_parquet(Path(args.demo_folder) / "ground_truth.parquet")

    for path in args.stores:
        store = EmbeddingStore.open(path)
        name = Path(path).name
        print(f"\n## {name}: {len(store):,} tokens, d = {store.dim}", flush=True)
        saved = {}
        for run in grid():
            file = out / f"{name}-{run.method}-{run.whiten}.safetensors"
            started = time.perf_counter()
            if not file.exists():
                result = compare(store, ["perturbation", "cell_type"], [run], n_features=args.features,
                                 sparsity=args.sparsity, steps=args.steps, batch_size=args.batch_size,
                                 seed=args.seed, device=args.device)
                result.runs[0].estimator.save(file)
                print(result.format(), flush=True)
            print(f"{run.method} {run.whiten}: {time.perf_counter() - started:.0f} s", flush=True)
            saved[(run.method, run.whiten)] = file
        if "object_label" not in store.obs_columns:
            continue
        truth = cell_truth(store, ground_truth)
        tokens = store.read()
        rows = {}
        for (method, whiten), file in saved.items():
            estimator = ICFL.load(file)
            codes = estimator.transform(tokens)
            by_phenotype = selectivity(codes, truth["phenotype"], label="phenotype")
            by_type = selectivity(codes, truth["cell_type"], label="cell_type")
            best = {**{v: float(b) for v, b in zip(by_phenotype.values, by_phenotype.maximum.max(axis=1), strict=True)
                       if v not in ("DMSO", "unaffected")},
                    **{v: float(b) for v, b in zip(by_type.values, by_type.maximum.max(axis=1), strict=True)}}
            rows[f"{estimator.title} {whiten}"] = best
        table = pd.DataFrame(rows)
        print("\nbest max selectivity against the per-cell ground truth (affected cells; cell types):")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        print("\n" + " | ".join(["concept", *table.columns]))
        for concept, values in table.iterrows():
            print(" | ".join([str(concept), *(f"{v:.2f}" for v in values)]))


if __name__ == "__main__":
    main()
