"""Demo commands: ``demo`` (write the demo plate) and ``demo-run`` (the main job)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from plate_concepts.cli._common import run_or_screenshot


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="write the synthetic demo plate (OME-Zarr, plate map, ground truth)")
    p.add_argument("out_dir")
    p.add_argument("--wells", type=int, default=96, help="number of wells (6..384; default 96)")
    p.add_argument("--fields", type=int, default=2, help="fields per well (default 2)")
    p.add_argument("--field-size", type=int, default=512, help="field side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=demo)

    p = sub.add_parser("demo-run", help="the main job: demo plate -> embeddings -> ICFL -> concept report -> napari")
    p.add_argument("workdir", nargs="?", default="out/demo", help="where the store, dictionary and report go")
    p.add_argument("--wells", type=int, default=96)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--concept", default="nuclear-enlargement", help="planted concept whose best feature is shown")
    p.add_argument("--no-viewer", action="store_true", help="print the report only")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of napari and exit (headless runs)")
    p.set_defaults(run=demo_run)


def demo(args: argparse.Namespace) -> int:
    from plate_concepts.demo import write_demo_plate

    n_fields = args.wells * args.fields
    with tqdm(total=n_fields, desc="demo fields", unit="field", disable=args.quiet) as bar:
        out = write_demo_plate(
            args.out_dir, n_wells=args.wells, fields_per_well=args.fields, field_size=args.field_size,
            seed=args.seed, overwrite=args.overwrite, progress=lambda *_: bar.update(1),
        )
    print(f"wrote the demo plate to {out}: demo_plate.zarr, platemap.csv, ground_truth.parquet")
    return 0


def demo_run(args: argparse.Namespace) -> int:
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
    return run_or_screenshot(viewer, args.screenshot)
