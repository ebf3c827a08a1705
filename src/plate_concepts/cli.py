"""Command line: the same pipeline as the napari panels, without a screen.

``plate-concepts <command> --help`` documents each command. Commands never import Qt or napari,
except ``view``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = func
        return func

    return register


# ----- plates --------------------------------------------------------------------------------
@command("info")
def _info(args: argparse.Namespace) -> int:
    from plate_concepts.plates import open_plate
    from plate_concepts.plates.platemap import label_columns

    plate = open_plate(args.path, platemap=args.platemap, pattern=args.pattern)
    summary = {
        "format": plate.reader,
        "name": plate.name,
        "plate_format": plate.plate_format.n_wells,  # type: ignore[union-attr]
        "n_wells": len(plate.wells),
        "wells": plate.wells,
        "fields_per_well": plate.fields_per_well,
        "channels": plate.channels,
        "image_shape": list(plate.image_shape),
        "dtype": str(plate.dtype),
        "levels": plate.n_levels,
        "label_images": plate.label_names,
        "labels": label_columns(plate.platemap) if plate.platemap is not None else [],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    fields = sorted(set(summary["fields_per_well"].values()))
    print(f"{args.path}: {summary['format']} plate '{plate.name}' ({summary['plate_format']}-well format)")
    print(f"  wells:    {summary['n_wells']} ({', '.join(plate.wells[:12])}{' ...' if len(plate.wells) > 12 else ''})")
    print(f"  fields:   {'/'.join(map(str, fields))} per well")
    print(f"  channels: {', '.join(plate.channels)}")
    print(f"  images:   {summary['image_shape'][0]} x {summary['image_shape'][1]} {summary['dtype']}, {summary['levels']} level(s)")
    if summary["label_images"]:
        print(f"  label images: {', '.join(summary['label_images'])}")
    if plate.platemap is not None:
        print(f"  plate-map labels: {', '.join(summary['labels']) or '(none)'}")
    return 0


@command("convert")
def _convert(args: argparse.Namespace) -> int:
    from plate_concepts.plates import open_plate
    from plate_concepts.plates.omezarr import write_ome_zarr_plate

    plate = open_plate(args.src, platemap=args.platemap, pattern=args.pattern)
    n_fields = sum(plate.fields_per_well.values())
    with tqdm(total=n_fields, desc="fields", unit="field", disable=args.quiet) as bar:
        out = write_ome_zarr_plate(
            plate, args.out, ngff_version=args.ngff, overwrite=args.overwrite, progress=lambda *_: bar.update(1)
        )
    print(f"wrote {out}: {len(plate.wells)} wells, {n_fields} fields, NGFF {args.ngff}")
    return 0


# ----- embeddings ----------------------------------------------------------------------------
@command("import-profiles")
def _import_profiles(args: argparse.Namespace) -> int:
    from plate_concepts.embeddings.profiles import import_profiles

    store = import_profiles(args.table, args.store, features=args.features, overwrite=args.overwrite)
    print(f"wrote {args.store}: {len(store)} tokens of dimension {store.dim}")
    return 0


@command("view")
def _view(args: argparse.Namespace) -> int:
    import napari

    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.app import show_plate

    plate = open_plate(args.path, platemap=args.platemap, pattern=args.pattern)
    viewer = napari.Viewer(title=f"napari-plate-concepts: {plate.name}")
    viewer.window.resize(1600, 1000)
    show_plate(viewer, plate)
    return _run_or_screenshot(viewer, args.screenshot)


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from plate_concepts.demo import write_demo_plate

    n_fields = args.wells * args.fields
    with tqdm(total=n_fields, desc="demo fields", unit="field", disable=args.quiet) as bar:
        out = write_demo_plate(
            args.out_dir, n_wells=args.wells, fields_per_well=args.fields, field_size=args.field_size,
            seed=args.seed, overwrite=args.overwrite, progress=lambda *_: bar.update(1),
        )
    print(f"wrote the demo plate to {out}: demo_plate.zarr, platemap.csv, ground_truth.parquet")
    return 0


@command("embed")
def _embed(args: argparse.Namespace) -> int:
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.plates import open_plate

    plate = open_plate(args.plate, platemap=args.platemap, pattern=args.pattern)
    with tqdm(desc="crops", unit="crop", disable=args.quiet) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        store = embed_plate(
            plate, args.store, args.model, crop_size=args.crop, batch_size=args.batch_size,
            drop_edge=args.drop_edge, patch_tokens=args.patch_tokens, control=args.control,
            device=args.device, progress=progress,
        )
    print(f"{args.store}: {len(store)} tokens of dimension {store.dim}")
    return 0


@command("fit")
def _fit(args: argparse.Namespace) -> int:
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


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
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


@command("demo-run")
def _demo_run(args: argparse.Namespace) -> int:
    """The main job: the whole pipeline on the demo plate, then the result in napari."""
    from plate_concepts.demo_pipeline import DemoSettings, format_report, run_demo_pipeline

    bars: list[tqdm] = []

    def progress_factory(unit: str):
        bar = tqdm(desc=f"  {unit}", unit=unit[:-1] if unit.endswith("s") else unit, leave=False)
        bars.append(bar)

        def update(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        return update

    settings = DemoSettings(n_wells=args.wells, device=args.device)
    try:
        run = run_demo_pipeline(args.workdir, settings, progress_factory=progress_factory)
    finally:
        for bar in bars:
            bar.close()
    print(format_report(run.report))
    print(f"(report saved to {Path(args.workdir) / 'concept_report.json'})")
    if args.no_viewer:
        return 0
    # What selecting a feature reads (labels, top crops, patch tokens), so the viewer answers
    # from memory.
    with tqdm(desc="  reading fields for the viewer", unit="item", leave=False) as bar:

        def preload_progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)  # update, not refresh: tqdm's rate limit applies

        summary = run.explorer.preload(progress=preload_progress)
    print(f"ready to browse: {summary.describe()}")
    import napari

    from plate_concepts.viewer.demo_view import show_demo_run

    viewer = napari.Viewer(title="napari-plate-concepts: demo plate")
    viewer.window.resize(1600, 1000)
    show_demo_run(viewer, run, concept=args.concept)
    return _run_or_screenshot(viewer, args.screenshot)


def _run_or_screenshot(viewer, screenshot: str | None) -> int:
    """Hand the viewer to the user, or (headless runs) save a screenshot of it and close it."""
    import napari

    if not screenshot:
        napari.run()
        return 0
    from qtpy.QtWidgets import QApplication

    for _ in range(20):  # let the canvas take its final size and workers draw their layers
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(screenshot, canvas_only=False, flash=False)
    print(f"saved a screenshot of the viewer to {screenshot}")
    viewer.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from plate_concepts import __version__

    parser = argparse.ArgumentParser(
        prog="plate-concepts",
        description="Find biological concepts in microscopy foundation-model embeddings of plates.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a plate (OME-Zarr, TIFF folder or LoadData CSV)")
    p.add_argument("path")
    p.add_argument("--platemap", help="per-well metadata table (CSV or parquet)")
    p.add_argument("--pattern", help="TIFF folders: preset (phenix, imagexpress, nf1) or regex with named groups")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("convert", help="write any readable plate as an OME-Zarr HCS plate")
    p.add_argument("src")
    p.add_argument("out", help="output .zarr folder")
    p.add_argument("--platemap")
    p.add_argument("--pattern")
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("import-profiles", help="a pycytominer/JUMP-style profile table into an embedding store")
    p.add_argument("table", help="parquet or CSV with Metadata_* columns and numeric feature columns")
    p.add_argument("store", help="output embedding store folder")
    p.add_argument("--features", help="regex selecting the feature columns (default: numeric non-Metadata columns)")
    p.add_argument("--overwrite", action="store_true")
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

    p = sub.add_parser("evaluate", help="reconstruction, sparsity and selectivity of a dictionary on a store")
    p.add_argument("store")
    p.add_argument("dictionary")
    p.add_argument("--label", action="append", help="label column for selectivity (repeatable)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="write the synthetic demo plate (OME-Zarr, plate map, ground truth)")
    p.add_argument("out_dir")
    p.add_argument("--wells", type=int, default=96, help="number of wells (6..384; default 96)")
    p.add_argument("--fields", type=int, default=2, help="fields per well (default 2)")
    p.add_argument("--field-size", type=int, default=512, help="field side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("embed", help="embed a plate's crops into an embedding store (resumable)")
    p.add_argument("plate")
    p.add_argument("store")
    p.add_argument("--platemap")
    p.add_argument("--pattern")
    p.add_argument("--model", default="efficientnet-lite0",
                   help="efficientnet-lite0[:concat|:mean], torchscript:PATH or module:package.module:callable")
    p.add_argument("--crop", type=int, default=256, help="crop size in pixels (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--drop-edge", action="store_true", help="drop crops touching the field border")
    p.add_argument("--patch-tokens", action="store_true", help="also store patch-token grids (float16)")
    p.add_argument("--control", help="controls as COLUMN=VALUE[,VALUE] (sets is_control)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("demo-run", help="the main job: demo plate -> embeddings -> ICFL -> concept report -> napari")
    p.add_argument("workdir", nargs="?", default="out/demo", help="where the store, dictionary and report go")
    p.add_argument("--wells", type=int, default=96)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--concept", default="nuclear-enlargement", help="planted concept whose best feature is shown")
    p.add_argument("--no-viewer", action="store_true", help="print the report only")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of napari and exit (headless runs)")

    p = sub.add_parser("view", help="open a plate in napari with the plugin's panels")
    p.add_argument("path")
    p.add_argument("--platemap")
    p.add_argument("--pattern")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot and exit (headless runs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"plate-concepts {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"plate-concepts {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
