"""The activation pass command: ``encode``."""

from __future__ import annotations

import argparse
import sys

from plate_concepts.cli._common import progress_bar


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="the activation pass: encode every token of a store with a dictionary, on Dask, "
        "and compute the per-feature statistics the explorer and reports read (resumable)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("store", help="embedding store folder")
    p.add_argument("dictionary", help="dictionary file (.safetensors)")
    p.add_argument("out", help="output pass folder (codes, per-feature, per-plate and per-well statistics)")
    p.add_argument("--label", action="append", metavar="COLUMN",
                   help="label column to count for selectivity and profiles (repeatable; default: "
                        "every obs column with 2 to 384 whole-number or text values)")
    p.add_argument("--batch-column", help="obs column of batches, for dictionaries whitened per batch "
                   "(default: the one recorded in the dictionary)")
    p.add_argument("--control-column", default="is_control", help="boolean obs column of control tokens")
    p.add_argument("--top", type=int, default=32, help="top tokens kept per feature, over the store and per plate")
    p.add_argument("--rows-per-task", type=int, help="tokens per task (default: the store's chunk rows)")
    p.add_argument("--workers", type=int,
                   help="Dask workers of a local cluster (default: one per GPU, else one per CPU "
                        "core; 0 runs in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use an existing Dask cluster (tcp://host:8786) whose workers see the same paths")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where each worker encodes ('auto': a GPU per worker when there are GPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete pass at OUT (only an activation pass; the old one stays "
                        "until the new one is complete)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="use a store whose embedding was interrupted, with a warning (default: refuse it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=encode)


def encode(args: argparse.Namespace) -> int:
    from plate_concepts.analysis.activation_pass import plan_pass, run_pass
    from plate_concepts.embeddings.store import EmbeddingStore

    store = EmbeddingStore.open(args.store)
    store.check_complete(args.allow_incomplete)
    spec = plan_pass(
        store, args.dictionary, args.out, labels=args.label, control_column=args.control_column,
        batch_column=args.batch_column, top_n=args.top, rows_per_task=args.rows_per_task,
        device=args.device,
    )
    with progress_bar(spec.n_tokens, "encode", "token", args.quiet) as bar:
        try:
            result = run_pass(spec, workers=args.workers, scheduler=args.scheduler,
                              overwrite=args.overwrite, progress=bar)
        except KeyboardInterrupt:
            print(f"plate-concepts encode: interrupted; the finished tasks are kept in {args.out}: "
                  "run the same command again to resume", file=sys.stderr)
            return 130
    print(f"wrote {args.out}: {result.n_tokens} tokens of {len(result.plates)} plate(s), "
          f"{result.n_features} features, labels {', '.join(result.label_columns) or '(none)'}; "
          f"FVU {result.fvu:.4f}, L0 {result.l0:.1f}")
    return 0
