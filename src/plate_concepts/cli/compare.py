"""``compare``: the publication's comparison (methods x whitenings at matched sparsity) on a store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from plate_concepts.cli._common import CommandError, print_json, progress_bar
from plate_concepts.cli.dictionary import _positive_int

COMPARE_HELP = """\
Fits every method with every whitening at matched sparsity (ICFL J x L = TopK k = S; J is the
largest divisor of S not above sqrt(S), so S = 8 gives J = 2, L = 4), evaluates each on the
store and prints the publication's table: FVU, cosine, L0, dead features and, per label, the
number of features with average selectivity above 0.5 and 0.2 and the mean best max selectivity
over its values (values whose tokens are all controls left out), then the best max selectivity
per label value. --out writes the same as a figure (PNG). Ctrl-C stops after the current step
and prints the runs that finished. Nothing is written but the figure: keep a run by fitting it
with `plate-concepts fit` (the same settings give the same dictionary)."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="fit and evaluate ICFL and TopK, whitened and not, at matched sparsity",
                       description=COMPARE_HELP)
    p.defer(_compare_options)
    p.set_defaults(run=run_compare)


def _compare_options(p: argparse.ArgumentParser) -> None:
    from plate_concepts.analysis.compare import DEFAULT_METHODS, DEFAULT_SPARSITY, DEFAULT_WHITENS
    from plate_concepts.dictionary.estimators import METHODS
    from plate_concepts.dictionary.whitening import METHODS as WHITEN_METHODS

    p.add_argument("store", help="the embedding store (folder) to fit and evaluate on")
    p.add_argument("--label", action="append", required=True,
                   help="a label column to measure selectivity for (repeatable)")
    p.add_argument("--control", default="is_control",
                   help="the control tokens the whitening is fitted on: COLUMN=VALUE[,VALUE], a column "
                        "of booleans, or 'all' (default: the store's is_control column)")
    p.add_argument("--batch-column", help="with pca-batch among --whiten: the obs column of the batches")
    p.add_argument("--methods", type=_choices(sorted(METHODS)), default=list(DEFAULT_METHODS),
                   help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--whiten", type=_choices(list(WHITEN_METHODS)), default=list(DEFAULT_WHITENS),
                   help=f"comma-separated whitenings (default: {','.join(DEFAULT_WHITENS)})")
    p.add_argument("--shrinkage", default="auto",
                   help="the control covariance of the whitened runs: auto, ledoit-wolf, oas, none or "
                        "a weight in [0, 1] (as for fit)")
    p.add_argument("--features", type=_positive_int, dest="n_features",
                   help="dictionary size M of every run (default: from the store's size, as fit)")
    p.add_argument("--sparsity", type=_positive_int, default=DEFAULT_SPARSITY,
                   help="features per token S: ICFL J x L = TopK k = S")
    p.add_argument("--steps", type=_positive_int, help="optimiser steps per run (default: from the store's size)")
    p.add_argument("--batch-size", type=_positive_int, help="tokens per step (default: from the store's size)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", metavar="FIG.png", help="also write the comparison as a figure (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a PNG image")
    p.add_argument("--json", action="store_true",
                   help='print {"runs": [{"method", "whiten", "fvu", "cosine", "l0", "dead_fraction", '
                        '"selectivity": {COLUMN: ... as evaluate --json}}]} instead of the tables')
    p.add_argument("--allow-incomplete", action="store_true",
                   help="use a store whose embedding was interrupted, with a warning")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _choices(allowed: list[str]):  # -> Callable[[str], list[str]]
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def run_compare(args: argparse.Namespace) -> int:
    import signal
    import threading

    from plate_concepts._io import replaceable_output
    from plate_concepts.analysis.compare import CompareProgress, compare, grid, sparsity_split
    from plate_concepts.dictionary.settings import parse_shrinkage
    from plate_concepts.embeddings.store import EmbeddingStore

    store = EmbeddingStore.open(args.store)
    store.check_complete(args.allow_incomplete)
    if args.out:
        replaceable_output(args.out, "figure", overwrite=args.overwrite)  # before hours of fitting
    if "pca-batch" in args.whiten and not args.batch_column:
        raise CommandError("--whiten pca-batch needs --batch-column (the obs column of the batches)")
    runs = grid(args.methods, args.whiten, parse_shrinkage(args.shrinkage))
    rounds, per_round = sparsity_split(args.sparsity)
    if not args.json:
        print(f"{len(runs)} runs at S = {args.sparsity} (ICFL J = {rounds}, L = {per_round}; TopK k = "
              f"{args.sparsity}) on {store.path} ({len(store):,} tokens)", flush=True)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    bar = progress_bar(desc="compare", unit="step", quiet=args.quiet)

    def progress(event: CompareProgress) -> None:
        bar.set_description(f"run {event.run}/{event.n_runs} {event.spec.method} {event.spec.whiten} "
                            f"{event.stage}", refresh=False)
        bar(event.done, event.total)

    try:
        comparison = compare(
            store, args.label, runs, control=args.control, batch_column=args.batch_column,
            n_features=args.n_features, sparsity=args.sparsity, steps=args.steps, batch_size=args.batch_size,
            seed=args.seed, device=args.device, progress=progress, cancel=cancel,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    _report(args, comparison)
    if comparison.cancelled:
        print(f"plate-concepts compare: interrupted after {len(comparison.runs)} of {len(runs)} runs",
              file=sys.stderr)
        return 130
    return 0


def _report(args: argparse.Namespace, comparison: Any) -> None:
    if args.json:
        print_json(comparison.to_json())
    else:
        for run in comparison.runs:
            whitening = next((note for note in run.notes if note.startswith("whitening:")), None)
            if whitening:
                print(f"{run.spec.method} {run.spec.whiten}: {whitening}")
        print(comparison.format())
    if args.out and comparison.runs:
        written = comparison.figure(args.out, overwrite=args.overwrite)
        if not args.json:
            print(f"wrote {written}")
