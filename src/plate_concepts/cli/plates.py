"""Plate commands: ``info``, ``convert``, ``view``."""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from plate_concepts.cli._common import run_or_screenshot


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a plate (OME-Zarr, TIFF folder or LoadData CSV)")
    p.add_argument("path")
    p.add_argument("--platemap", help="per-well metadata table (CSV or parquet)")
    p.add_argument("--pattern", help="TIFF folders: preset (phenix, imagexpress, nf1) or regex with named groups")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=info)

    p = sub.add_parser("convert", help="write any readable plate as an OME-Zarr HCS plate")
    p.add_argument("src")
    p.add_argument("out", help="output .zarr folder")
    p.add_argument("--platemap")
    p.add_argument("--pattern")
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=convert)

    p = sub.add_parser("view", help="open a plate in napari with the plugin's panels")
    p.add_argument("path")
    p.add_argument("--platemap")
    p.add_argument("--pattern")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot and exit (headless runs)")
    p.set_defaults(run=view)


def info(args: argparse.Namespace) -> int:
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


def convert(args: argparse.Namespace) -> int:
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


def view(args: argparse.Namespace) -> int:
    import napari

    from plate_concepts.plates import open_plate
    from plate_concepts.viewer.app import show_plate

    plate = open_plate(args.path, platemap=args.platemap, pattern=args.pattern)
    viewer = napari.Viewer(title=f"napari-plate-concepts: {plate.name}")
    viewer.window.resize(1600, 1000)
    show_plate(viewer, plate)
    return run_or_screenshot(viewer, args.screenshot)
