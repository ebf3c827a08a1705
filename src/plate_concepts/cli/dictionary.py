"""Dictionary commands: ``fit``, ``evaluate``."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit an ICFL or TopK dictionary on an embedding store")
    p.add_argument("store")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--method", choices=["icfl", "topk"], default="icfl")
    p.add_argument("--control", help="controls as COLUMN=VALUE[,VALUE] (default: the store's is_control)")
    p.add_argument("--whiten", choices=["pca", "pca-batch", "none"], default="pca")
    p.add_argument("--batch-column", help="with --whiten pca-batch: the obs column naming the batch")
    p.add_argument("--shrinkage", default="none",
                   help="control covariance: none (exact, default), auto (Ledoit-Wolf; for fewer "
                        "controls than dimensions) or a number in [0, 1]")
    p.add_argument("--features", type=int, default=8192, help="dictionary size M (default 8192)")
    p.add_argument("--rounds", type=int, help="ICFL: pursuit rounds J (default 20)")
    p.add_argument("--per-round", type=int, help="ICFL: features per round L (default 5)")
    p.add_argument("--k", type=int, help="TopK: active features per token (default 32)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=fit)

    p = sub.add_parser("evaluate", help="reconstruction, sparsity and selectivity of a dictionary on a store")
    p.add_argument("store")
    p.add_argument("dictionary")
    p.add_argument("--label", action="append", help="label column for selectivity (repeatable)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=evaluate)


def fit(args: argparse.Namespace) -> int:
    import signal
    import threading

    from plate_concepts.dictionary.trainer import fit_dictionary

    if args.method == "icfl" and args.k is not None:
        raise ValueError("--k is a TopK option; ICFL's sparsity is --rounds x --per-round")
    if args.method == "topk" and (args.rounds is not None or args.per_round is not None):
        raise ValueError("--rounds/--per-round are ICFL options; TopK's sparsity is --k")
    # Ctrl-C asks the trainer to stop after the current step and write a resumable checkpoint,
    # rather than interrupting it mid-write.
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    bar = tqdm(total=args.steps, desc=f"fit {args.method}", unit="step", disable=args.quiet)

    def progress(event) -> None:
        bar.n = event.step
        bar.set_postfix(loss=f"{event.loss:.4g}", fvu=f"{event.fvu:.3f}", l0=f"{event.l0:.1f}",
                        dead=f"{100 * event.dead_fraction:.1f}%", refresh=False)
        bar.refresh()

    try:
        result = fit_dictionary(
            args.store, args.out, args.method, control=args.control or "is_control", whiten=args.whiten,
            batch_column=args.batch_column, shrinkage=_shrinkage(args.shrinkage), n_features=args.features, k=args.k, n_rounds=args.rounds,
            per_round=args.per_round, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            device=args.device, seed=args.seed, autocast_bf16=args.bf16, resume=args.resume,
            progress=progress, cancel=cancel,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    if result.cancelled:
        print(f"interrupted: a checkpoint is saved; continue with the same command and --resume "
              f"(the partial dictionary was written to {args.out})", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


def _shrinkage(text: str) -> float | str | None:
    if text in ("none", "auto"):
        return None if text == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--shrinkage must be none, auto or a number in [0, 1], got {text!r}") from None


def evaluate(args: argparse.Namespace) -> int:
    from plate_concepts.analysis.evaluation import evaluate_dictionary
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.store import EmbeddingStore

    estimator = ICFL.load(args.dictionary, device=args.device)
    store = EmbeddingStore.open(args.store)
    result = evaluate_dictionary(estimator, store, args.label or [], batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.dictionary} on {args.store} ({result['n_tokens']} tokens):")
    print(f"  FVU {result['fvu']:.4f}   cosine {result['cosine']:.4f}   L0 {result['l0']:.1f}   "
          f"dead {result['n_dead']}/{result['n_features']} ({100 * result['dead_fraction']:.1f}%)")
    for column, summary in result["selectivity"].items():
        print(f"  {column}: features with average selectivity > 0.5: {summary['n_avg_above_0.5']}, "
              f"> 0.2: {summary['n_avg_above_0.2']}")
        for value, best in summary["best_max_selectivity"].items():
            print(f"    {value:<24} best max selectivity {best:.3f}")
    return 0
