"""Demo commands: ``demo`` (write the demo plate) and ``demo-run`` (the main job)."""

from __future__ import annotations

import argparse
from pathlib import Path

from plate_concepts.cli._common import (
    CommandError,
    CommandProgress,
    ensure_display,
    progress_bar,
    run_or_screenshot,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="write the synthetic demo plate (OME-Zarr, plate map, ground truth)")
    p.add_argument("out_dir", help="the folder to write (demo_plate.zarr, platemap.csv, "
                                   "ground_truth.parquet, README.md inside)")
    p.add_argument("--wells", type=int, default=96, help="number of wells (6 to 384)")
    p.add_argument("--fields", type=int, default=2, help="fields per well")
    p.add_argument("--field-size", type=int, default=512, help="field side in pixels (>= 128)")
    p.add_argument("--seed", type=int, default=0, help="seeds the plate map, cells and noise")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is a demo plate folder written by plate-concepts "
                        "(never another folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=demo)

    p = sub.add_parser("demo-run", help="the main job: demo plate -> embeddings -> ICFL -> concept report -> napari")
    p.add_argument("workdir", nargs="?", default="out/demo",
                   help="where the store, dictionary and report go (each step is cached there)")
    p.add_argument("--wells", type=int, default=96, help="wells of the demo plate (6 to 384)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to embed and fit (auto: a GPU if there is one)")
    p.add_argument("--concept", default="nuclear-enlargement",
                   help="planted concept whose best feature is shown")
    p.add_argument("--no-viewer", action="store_true", help="print the report only")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a screenshot of napari and exit; without a display this runs "
                        "under a virtual one (xvfb-run)")
    p.set_defaults(run=demo_run)


def demo(args: argparse.Namespace) -> int:
    from plate_concepts.demo import write_demo_plate

    n_fields = args.wells * args.fields
    with progress_bar(n_fields, "demo fields", "field", args.quiet) as bar:
        out = write_demo_plate(
            args.out_dir, n_wells=args.wells, fields_per_well=args.fields, field_size=args.field_size,
            seed=args.seed, overwrite=args.overwrite, progress=bar,
        )
    print(f"wrote the demo plate to {out}: demo_plate.zarr, platemap.csv, ground_truth.parquet")
    return 0


def demo_run(args: argparse.Namespace) -> int:
    """The main job: the whole pipeline on the demo plate, then the result in napari."""
    from plate_concepts.demo import CACHE_ENV_VAR, demo_plate_folder
    from plate_concepts.demo_pipeline import (
        REPORT_NAME,
        DemoSettings,
        format_report,
        run_demo_pipeline,
    )

    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise CommandError(f"{args.workdir} is a file; demo-run's work folder is a folder: choose "
                           "another path (or leave it out for out/demo)")
    if not args.no_viewer:
        ensure_display(args)  # before the long run: without a display this may run again
    print(f"demo plate: {demo_plate_folder(n_wells=args.wells)} (written on first use, then "
          f"reused; set {CACHE_ENV_VAR} to keep it elsewhere)")  # fmt: skip
    bars: list[CommandProgress] = []

    def progress_factory(unit: str) -> CommandProgress:
        # Steps run one after the other: a new step's bar ends the previous one.
        for bar in bars:
            bar.close()
        bars.append(progress_bar(None, f"  {unit}", unit.removesuffix("s")))
        return bars[-1]

    settings = DemoSettings(n_wells=args.wells, device=args.device)
    try:
        run = run_demo_pipeline(args.workdir, settings, progress_factory=progress_factory)
    finally:
        for bar in bars:
            bar.close()
    print(format_report(run.report))
    print(f"(report saved to {Path(args.workdir) / REPORT_NAME})")
    if args.no_viewer:
        return 0
    # What selecting a feature reads (labels, top crops, patch tokens), so the viewer answers
    # from memory.
    with progress_bar(None, "  reading fields for the viewer", "item") as bar:
        summary = run.explorer.preload(progress=bar)
    print(f"ready to browse: {summary.describe()}")
    import napari

    from plate_concepts.viewer.demo_view import show_demo_run

    viewer = napari.Viewer(title="napari-plate-concepts: demo plate")
    viewer.window.resize(1600, 1000)
    show_demo_run(viewer, run, concept=args.concept)
    return run_or_screenshot(viewer, args.screenshot)
