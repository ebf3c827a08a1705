"""Reading a screen: ``profiles`` (perturbation profiles and confound flags), ``report`` (the
HTML report) and ``names`` (naming, tagging and annotating features)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from plate_concepts.cli._common import CommandError, print_json, progress_bar
from plate_concepts.cli.dictionary import ALLOW_INCOMPLETE_HELP

CODES_HELP = ("an activation pass of this dictionary over this store (plate-concepts encode) to "
              "read instead of encoding here (default: encode here, in this process)")
BATCH_HELP = "obs column of batches: flags features that follow it (must be a label of --codes)"
MIN_SCORE_HELP = ("variance fraction (epsilon squared) a nuisance must explain to flag a feature "
                  "(default: 0.14, a large effect)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profiles",
        help="perturbation profiles: per value of a label, each feature's z-score against the "
        "controls of its plate, replicate agreement, mAP; and the features flagged as confounds",
    )
    p.add_argument("store", help="embedding store folder")
    p.add_argument("dictionary", help="dictionary file (.safetensors)")
    p.add_argument("--label", required=True, metavar="COLUMN", help="label column to profile (e.g. perturbation)")
    p.add_argument("--batch", metavar="COLUMN", help=BATCH_HELP)
    p.add_argument("--codes", metavar="PASS", help=CODES_HELP)
    p.add_argument("--top", type=_positive_int, default=20, help="features shown per value, by z")
    p.add_argument("--min-score", type=float, help=MIN_SCORE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--allow-incomplete", action="store_true", help=ALLOW_INCOMPLETE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=profiles)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML file: the dictionary, perturbation profiles with top crops "
        "and per-well maps, confound flags and named features",
    )
    p.add_argument("store", help="embedding store folder")
    p.add_argument("dictionary", help="dictionary file (.safetensors)")
    p.add_argument("out", help="the HTML file to write")
    p.add_argument("--label", action="append", metavar="COLUMN",
                   help="label column to profile (repeatable; default: every label column of the pass)")
    p.add_argument("--batch", metavar="COLUMN", help=BATCH_HELP)
    p.add_argument("--codes", metavar="PASS", help=CODES_HELP)
    p.add_argument("--plate", metavar="PLATE",
                   help="the plate's images for the top crops (default: the plate the store records)")
    p.add_argument("--min-score", type=float, help=MIN_SCORE_HELP)
    p.add_argument("--detail", type=int, default=24, metavar="N",
                   help="label values shown in detail (best features, top crops, per-well maps), best mAP first")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a report")
    p.add_argument("--allow-incomplete", action="store_true", help=ALLOW_INCOMPLETE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=report)

    p = sub.add_parser(
        "names",
        help="name, tag and annotate features (kept beside the dictionary in DICT.names.json); "
        "without changes, list or search them",
    )
    p.add_argument("dictionary", help="dictionary file (.safetensors)")
    p.add_argument("feature", nargs="?", type=int, help="the feature to change or show")
    p.add_argument("--name", help="the feature's name ('' removes it)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="add a tag (repeatable)")
    p.add_argument("--untag", action="append", default=[], metavar="TAG", help="remove a tag (repeatable)")
    p.add_argument("--note", help="the feature's note ('' removes it)")
    p.add_argument("--clear", action="store_true", help="remove the feature's name, tags and note")
    p.add_argument("--search", metavar="TEXT", help="list the features whose name, tags or note contain TEXT")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=names)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def store_columns(args: argparse.Namespace, labels: Sequence[str]) -> tuple[Any, list[str], str | None]:
    """(store, its ``labels`` and --batch columns as the store spells them): checked before any
    pass runs."""
    from plate_concepts.embeddings.store import EmbeddingStore

    store = EmbeddingStore.open(args.store)
    batch = store.resolve_column(args.batch, "batch column") if args.batch else None
    return store, [store.resolve_column(c, "label column") for c in labels], batch


def load_pass(args: argparse.Namespace, store: Any, required: Sequence[str]) -> Any:
    """The activation pass: --codes opened and checked (it must count the ``required`` label
    columns), or a pass run here over the store's label columns and ``required``."""
    from plate_concepts.analysis.activation_pass import (
        ActivationPass,
        label_columns_of,
        plan_pass,
        run_pass,
    )
    from plate_concepts.analysis.evaluation import check_pass_matches

    if args.codes:
        activation_pass = ActivationPass.open(args.codes)
        check_pass_matches(activation_pass, store, required, dictionary=args.dictionary)
        return activation_pass
    store.check_complete(args.allow_incomplete)
    labels = label_columns_of(store, exclude=("is_control",))
    spec = plan_pass(store, args.dictionary, None, labels=[*labels, *(c for c in required if c not in labels)])
    with progress_bar(spec.n_tokens, "encode", "token", args.quiet) as bar:
        return run_pass(spec, progress=bar)


def profiles(args: argparse.Namespace) -> int:
    from plate_concepts.analysis.confounds import confound_scores
    from plate_concepts.analysis.feature_notes import FeatureNotes
    from plate_concepts.analysis.perturbations import most_selective_text, perturbation_profiles

    store, (label,), batch = store_columns(args, [args.label])
    if batch == label:  # the label would not be compared: its own features would be "batch"
        raise CommandError(f"--batch {args.batch} is the profiled --label {args.label}: give the column of "
                           "batches (plates, runs, staining days), not of perturbations")
    activation_pass = load_pass(args, store, [label, *([batch] if batch else [])])
    result = perturbation_profiles(activation_pass, label)
    floor = {} if args.min_score is None else {"min_score": args.min_score}
    confounds = confound_scores(activation_pass, None, batch, **floor)  # against every label of the pass
    if args.json:
        print_json(result.to_json(args.top, confounds.flags), indent=1)
        return 0
    notes = FeatureNotes.load(args.dictionary, activation_pass.n_features)
    used, plates = len(result.wells.plates_with_controls), len(activation_pass.plates)
    print(f"{label}: {len(result.values)} value(s) profiled against the control wells "
          f"({', '.join(map(str, result.control_values)) or 'controls'}) of "
          f"{used if used == plates else f'{used} of {plates}'} plate(s)")
    if not result.values:
        print(f"  no value of {label} is found outside the control wells: nothing to profile")
    order = sorted(result.values, key=lambda v: str(v))
    for value in order:
        profile = result.values[value]
        mean_ap = "n/a" if profile.map != profile.map else f"{profile.map:.3f} (p {profile.map_p_value:.2g})"
        print(f"\n{value}: {profile.n_wells} well(s), mAP {mean_ap}")
        print(f"  {'feature':>7}  {'z':>8}  {'max sel':>7}  {'repl>2':>6}  {'mean':>9}  flag  name")
        for row in profile.top(args.top).itertuples():
            flag = confounds.flags.get(int(row.feature))
            print(f"  {row.feature:>7}  {row.z:>8.2f}  {row.max_selectivity:>7.3f}  {row.replicate_fraction:>6.2f}  "
                  f"{row.mean:>9.4g}  {(flag.by if flag else ''):<4}  {notes.name(int(row.feature))}")
        print(f"  {most_selective_text(profile)}")
    if confounds.flags:
        print(f"\nflagged as confounds ({len(confounds.flags)}):")
        for feature, flag in confounds.flags.items():
            print(f"  feature {feature}: {flag.why()}")
    else:
        print("\nno feature is flagged as a confound")
    return 0


def report(args: argparse.Namespace) -> int:
    from plate_concepts._io import replaceable_output
    from plate_concepts.analysis.report import ReportSettings, size_text, write_report

    replaceable_output(args.out, "report", overwrite=args.overwrite, sources=[args.dictionary])
    store, labels, batch = store_columns(args, args.label or [])
    if batch is not None and batch in labels:  # it would be left out of the profiles, silently
        raise CommandError(f"--batch {args.batch} is also a --label: give the column of batches (plates, runs, "
                           "staining days), not of perturbations")
    activation_pass = load_pass(args, store, [*labels, *([batch] if batch else [])])
    with progress_bar(None, "report", "step", args.quiet) as bar:
        path = write_report(args.out, activation_pass, args.dictionary, labels=labels, batch=batch,
                            store=store, plate=args.plate, overwrite=args.overwrite, progress=bar,
                            settings=ReportSettings(values_per_label=max(args.detail, 0),
                                                    min_confound_score=args.min_score))
    print(f"wrote {path} ({size_text(path)})")
    return 0


def names(args: argparse.Namespace) -> int:
    from plate_concepts.analysis.feature_notes import FeatureNotes

    if args.feature is not None and args.search is not None:
        raise CommandError("give a FEATURE to change or show, or --search TEXT to find features, not both")
    notes = FeatureNotes.load(args.dictionary)
    changes = args.name is not None or args.note is not None or args.tag or args.untag or args.clear
    if changes:
        if args.feature is None:
            raise CommandError("name which feature? give its number: plate-concepts names DICT FEATURE --name ...")
        if args.clear:
            notes.clear(args.feature)
        notes.set(args.feature, name=args.name, note=args.note)
        if args.tag:
            notes.tag(args.feature, *args.tag)
        if args.untag:
            notes.untag(args.feature, *args.untag)
        notes.save()
    if args.feature is not None:
        shown = {args.feature: notes.get(args.feature)}
    elif args.search is not None:
        shown = {f: notes.get(f) for f in notes.search(args.search)}
    else:
        shown = notes.named
    if args.json:
        print(json.dumps({str(f): {"name": n.name, "tags": n.tags, "note": n.note} for f, n in shown.items()}, indent=1))
        return 0
    if not shown:
        print("no named features" if args.search is None else f"no feature matches {args.search!r}")
    for feature, note in shown.items():
        tags = f" [{', '.join(note.tags)}]" if note.tags else ""
        print(f"{feature}: {note.name or '(no name)'}{tags}{' - ' + note.note if note.note else ''}")
    return 0
