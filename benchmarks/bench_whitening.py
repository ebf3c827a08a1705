"""Which control covariance should whitening use? Best max selectivity per label value of an ICFL
dictionary for each covariance estimate, on embedding stores with few and many controls.

For each store and each option (``none`` = exact, as published; ``ledoit-wolf``; ``oas``; a
fixed weight; ``auto`` = the default, exact with >= 10 control tokens per dimension, else
Ledoit-Wolf) one ICFL dictionary is fitted with every other setting equal (same M, J, L, steps,
batch and seed), through :func:`plate_concepts.analysis.compare.compare`; the table gives the
estimate each option chose, the dimensions kept, FVU and, per label value (controls left out),
the best feature's max selectivity, then the mean over the values.

Usage::

    python benchmarks/bench_whitening.py STORE --label COL [--label COL] [--control SPEC]
        [--options none,ledoit-wolf,oas,0.1,auto] [--features 256] [--sparsity 8] [--steps 600]
        [--batch-size 1024] [--device cpu]

e.g. the demo store (``plate-concepts embed`` of the 96-well demo plate, EfficientNet-Lite0
``concat:blocks``, 128-px crops, ``--control perturbation=DMSO``) with ``--label perturbation
--label cell_type``; the NF1 plate of ``../shared/data/real`` with ``--label genotype``. An option
that picks the same estimate as one already run (``auto``) is not fitted again.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from plate_concepts.analysis.compare import RunSpec, compare
from plate_concepts.dictionary.controls import control_mask
from plate_concepts.dictionary.settings import parse_shrinkage
from plate_concepts.dictionary.whitening import AUTO_SHRINKAGE, PLENTIFUL_CONTROLS
from plate_concepts.embeddings.store import EmbeddingStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--label", action="append", required=True)
    parser.add_argument("--control", default="is_control")
    parser.add_argument("--options", default="none,ledoit-wolf,oas,0.1,auto")
    parser.add_argument("--method", default="icfl", choices=["icfl", "topk"])
    parser.add_argument("--features", type=int, default=None)
    parser.add_argument("--sparsity", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    store = EmbeddingStore.open(args.store)
    n_controls = int(control_mask(store, args.control).sum())
    auto = "none" if n_controls >= PLENTIFUL_CONTROLS * store.dim else AUTO_SHRINKAGE
    print(f"{store.path}: {len(store):,} tokens, d = {store.dim:,}, {n_controls:,} control tokens "
          f"({n_controls / store.dim:.2f} per dimension: auto = {auto})")
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    rows = {}
    for option in options:
        if option == "auto" and auto in rows:
            rows["auto"] = rows[auto]
            continue
        started = time.perf_counter()
        result = compare(
            store, args.label, [RunSpec(args.method, "pca", parse_shrinkage(option))], control=args.control,
            n_features=args.features, sparsity=args.sparsity, steps=args.steps, batch_size=args.batch_size,
            seed=args.seed, device=args.device,
        )
        run = result.runs[0]
        whitening = run.estimator.whitening_
        rows[option] = {
            "covariance": whitening.covariance_, "weight": whitening.shrinkage_, "kept": whitening.output_dim,
            "fvu": run.evaluation["fvu"], "seconds": time.perf_counter() - started,
            "best": {label: {value: best for value, best in run.evaluation["selectivity"][label]
                             ["best_max_selectivity"].items() if value not in result.control_values[label]}
                     for label in result.labels},
        }
        line = next((n for n in run.notes if n.startswith("whitening:")), "")
        print(f"  {option}: {line} ({rows[option]['seconds']:.0f} s)", flush=True)

    values = [(label, value) for label in args.label for value in rows[options[0]]["best"][label]]
    print()
    header = ["option", "covariance", "weight", "kept", "FVU"] + [f"{v}" for _, v in values] + \
        [f"mean {label}" for label in args.label]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for option in options:
        row = rows[option]
        cells = [option, row["covariance"], f"{row['weight']:.3f}", f"{row['kept']:,}", f"{row['fvu']:.3f}"]
        cells += [f"{row['best'][label][value]:.3f}" for label, value in values]
        cells += [f"{np.mean(list(row['best'][label].values())):.3f}" for label in args.label]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
