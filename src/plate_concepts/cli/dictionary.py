"""Dictionary commands: ``fit``, ``evaluate``.

``fit``'s options are built from the methods' settings (:mod:`plate_concepts.dictionary.settings`),
so their help and defaults are those of the library and the Dictionary panel.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from plate_concepts.cli._common import print_json, progress_bar

FIT_HELP = """\
Writes OUT only when the fit finishes, and never replaces an existing file unless --overwrite is
given and that file is a dictionary. While fitting, a checkpoint OUT.ckpt.safetensors is kept
beside OUT (removed at the end unless --keep-checkpoint). Ctrl-C stops after the current step:
the checkpoint (and, with --save-partial, the partial dictionary OUT.partial.safetensors) is
written beside OUT, and the same command with --resume continues it."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit an ICFL or TopK dictionary on an embedding store",
                       description=FIT_HELP)
    p.defer(_fit_options)
    p.set_defaults(run=fit)

    p = sub.add_parser("evaluate", help="reconstruction, sparsity and selectivity of a dictionary on a store")
    p.add_argument("store", help="the embedding store (folder) to evaluate on")
    p.add_argument("dictionary", help="the dictionary file (.safetensors)")
    p.add_argument("--label", action="append",
                   help="a label column for selectivity (repeatable; default: none)")
    p.add_argument("--codes", metavar="PASS",
                   help="an activation pass of this dictionary over this store (plate-concepts "
                        "encode): report from it without encoding again (default: encode here)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="tokens per block when encoding here (default: the store's chunk rows, as encode)")
    p.add_argument("--device", default="cpu", help="torch device: auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--allow-incomplete", action="store_true", help=ALLOW_INCOMPLETE_HELP)
    p.set_defaults(run=evaluate)


def _fit_options(p: argparse.ArgumentParser) -> None:
    from plate_concepts.dictionary.estimators import METHODS

    p.add_argument("store", help="the embedding store (folder) to fit on")
    p.add_argument("out", help="the dictionary file to write (.safetensors)")
    p.add_argument("--method", choices=sorted(METHODS), default="icfl",
                   help="ICFL (iterative codebook feature learning) or a TopK sparse autoencoder "
                        "(default: icfl)")
    p.add_argument("--control", default="is_control",
                   help="the control tokens the whitening is fitted on: COLUMN=VALUE[,VALUE] (e.g. "
                        "treatment=DMSO), a column of booleans, or 'all' (default: the store's "
                        "is_control column, from the control spec given to embed)")
    p.add_argument("--batch-column",
                   help="with --whiten pca-batch: the obs column naming each token's batch")
    add_setting_options(p, METHODS.values())
    out = p.add_argument_group("output")
    out.add_argument("--overwrite", action="store_true",
                     help="replace OUT if it is a dictionary file (never any other file), and start "
                          "over from an existing checkpoint")
    out.add_argument("--resume", action="store_true",
                     help="continue the interrupted fit whose checkpoint lies beside OUT")
    out.add_argument("--save-partial", action="store_true",
                     help="when interrupted, also write the dictionary so far beside OUT "
                          "(OUT.partial.safetensors)")
    out.add_argument("--keep-checkpoint", action="store_true",
                     help="keep the checkpoint of a finished fit (to continue it with more --steps)")
    out.add_argument("--force", action="store_true",
                     help="allow more features than the store has tokens")
    p.add_argument("--allow-incomplete", action="store_true", help=ALLOW_INCOMPLETE_HELP)
    out.add_argument("--quiet", action="store_true", help="no progress bar")


ALLOW_INCOMPLETE_HELP = ("use a store whose embedding was interrupted, with a warning (default: "
                         "refuse it: finish the embedding first)")


def add_setting_options(parser: argparse.ArgumentParser, estimators: Any) -> None:
    """One option per setting of the methods (shared settings once), grouped as the settings
    are, each with its help text and default; options not given stay unset (the settings'
    defaults apply)."""
    from plate_concepts.dictionary.settings import (
        GROUPS,
        setting_fields,
        setting_help,
        setting_info,
    )

    groups = {name: parser.add_argument_group(f"{name} settings") for name in GROUPS}
    seen: set[str] = set()
    for estimator in estimators:
        for f in setting_fields(estimator.settings_class):
            if f.name in seen:
                continue
            seen.add(f.name)
            info = setting_info(f)
            flag = info.flag or "--" + f.name.replace("_", "-")
            options: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": setting_help(f).replace("%", "%%")}
            if f.type == "bool" or isinstance(f.default, bool):
                options["action"] = "store_true" if not f.default else argparse.BooleanOptionalAction
            else:
                options["type"] = _parser_of(f)
                options["metavar"] = f.name.upper() if not info.choices else None
                if info.choices:
                    options["choices"] = list(info.choices)
            groups[info.group].add_argument(flag, **options)


def _parser_of(f: dataclasses.Field):  # -> Callable[[str], Any]
    from plate_concepts.dictionary.settings import parse_value

    def parse(text: str) -> Any:
        try:
            return parse_value(f, text)
        except ValueError as err:  # "argument --batch-size: must be >= 1", not the field's name
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{f.name} ")) from None

    parse.__name__ = f.name
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def fit(args: argparse.Namespace) -> int:
    import signal
    import threading

    from tqdm import tqdm

    from plate_concepts.dictionary.checkpoints import default_checkpoint_path, partial_path
    from plate_concepts.dictionary.estimators import METHODS
    from plate_concepts.dictionary.fitting import fit_dictionary
    from plate_concepts.dictionary.trainer import FitMessage, TrainingEvent
    from plate_concepts.embeddings.store import EmbeddingStore

    EmbeddingStore.open(args.store).check_complete(args.allow_incomplete)
    names = {f.name for cls in METHODS.values() for f in dataclasses.fields(cls.settings_class)}
    settings = {name: getattr(args, name) for name in names if hasattr(args, name)}
    # Ctrl-C asks the fit to stop after the current step (or chunk of controls) and write a
    # resumable checkpoint, rather than interrupting it mid-write.
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    bar = progress_bar(desc=f"fit {args.method}", unit="step", quiet=args.quiet)

    def progress(event: TrainingEvent | FitMessage) -> None:
        if isinstance(event, FitMessage):
            if event.category is None:  # information (the whitening chosen): with the output
                tqdm.write(event.text, file=sys.stdout)
            else:
                tqdm.write(f"plate-concepts fit: note: {event.text}", file=sys.stderr)
            return
        bar.set_postfix(loss=f"{event.loss:.4g}", fvu=f"{event.fvu:.3f}", l0=f"{event.l0:.1f}",
                        dead=f"{100 * event.dead_fraction:.1f}%", refresh=False)
        bar(event.step, event.total_steps)

    try:
        estimator = fit_dictionary(
            args.store, args.out, args.method, control=args.control, batch_column=args.batch_column,
            overwrite=args.overwrite, resume=args.resume, save_partial=args.save_partial,
            keep_checkpoint=args.keep_checkpoint, force=args.force, progress=progress, cancel=cancel,
            **settings,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    training = estimator.training_
    if training["cancelled"]:
        partial = partial_path(args.out)
        saved = f"; the dictionary so far is in {partial}" if args.save_partial and partial.is_file() else ""
        print(f"plate-concepts fit: interrupted at step {training['steps']} of {training['total_steps']}: "
              f"{args.out} was not written{saved}; the checkpoint {default_checkpoint_path(args.out)} "
              "continues it with the same command and --resume", file=sys.stderr)
        return 130
    print(f"wrote {args.out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from plate_concepts.analysis.evaluation import evaluate_dictionary
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.store import EmbeddingStore

    estimator = ICFL.load(args.dictionary, device=args.device)
    store = EmbeddingStore.open(args.store)
    store.check_complete(args.allow_incomplete)
    activation_pass = None
    if args.codes:
        from plate_concepts.analysis.activation_pass import ActivationPass
        from plate_concepts.analysis.evaluation import check_pass_matches

        activation_pass = ActivationPass.open(args.codes)
        check_pass_matches(activation_pass, store, dictionary=args.dictionary)
    result = evaluate_dictionary(estimator, store, args.label or [], batch_size=args.batch_size,
                                 activation_pass=activation_pass)
    if args.json:
        print_json(result)
        return 0
    print(f"{args.dictionary} on {args.store} ({result['n_tokens']} tokens):")
    fitted = result["dictionary"]
    if fitted["cancelled"]:
        print(f"  partial dictionary: its fit was cancelled at step {fitted['steps']} of "
              f"{fitted['total_steps']}")
    print(f"  FVU {result['fvu']:.4f}   cosine {result['cosine']:.4f}   L0 {result['l0']:.1f}   "
          f"dead {result['n_dead']}/{result['n_features']} ({100 * result['dead_fraction']:.1f}%)")
    for column, summary in result["selectivity"].items():
        print(f"  {column}: features with average selectivity > 0.5: {summary['n_avg_above_0.5']}, "
              f"> 0.2: {summary['n_avg_above_0.2']}")
        width = max((len(value) for value in summary["best_max_selectivity"]), default=0)
        for value, best in summary["best_max_selectivity"].items():
            print(f"    {value:<{width}}  best max selectivity {best:.3f} (feature {summary['best_feature'][value]})")
    return 0
