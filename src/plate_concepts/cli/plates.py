"""Plate commands: ``info``, ``convert``, ``view``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plate_concepts.cli._common import (
    CommandError,
    ensure_display,
    print_json,
    progress_bar,
    run_or_screenshot,
)

PLATE_HELP = (
    "the plate: an OME-Zarr HCS plate, a folder of TIFF exports (or the plate folder holding "
    "it, e.g. with images/ and masks/ inside) or a CellProfiler LoadData CSV"
)
PLATEMAP_HELP = (
    "per-well metadata table (CSV, TSV or parquet; default: a platemap*.csv|tsv|parquet "
    "lying next to the images, if there is exactly one)"
)
PATTERN_HELP = (
    "TIFF folders: a preset (phenix, imagexpress, nf1) or a regex with named groups well (or "
    "row and column), field and channel (default: the preset matching the most files)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="describe a plate (OME-Zarr, TIFF folder or LoadData CSV) or an embedding store"
    )
    p.add_argument(
        "path",
        help=PLATE_HELP + ", or an embedding store (its tokens, plates, wells, controls and "
        "label values per plate)",
    )
    p.add_argument("--platemap", help=PLATEMAP_HELP)
    p.add_argument("--pattern", help=PATTERN_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--check", action="store_true",
        help="OME-Zarr plates: also list the chunk files of the full-resolution images that are "
             "missing (by the zarr spec they read as the fill value: blank, or lost in a copy)",
    )  # fmt: skip
    p.add_argument("--strict", action="store_true",
                   help="with --check: exit with status 1 when chunks are missing")
    p.set_defaults(run=info)

    p = sub.add_parser("convert", help="write any readable plate as an OME-Zarr HCS plate")
    p.add_argument("src", help=PLATE_HELP)
    p.add_argument("out", help="output OME-Zarr plate folder (conventionally NAME.ome.zarr)")
    p.add_argument("--platemap", help=PLATEMAP_HELP + "; stored in the plate")
    p.add_argument("--pattern", help=PATTERN_HELP)
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5",
                   help="OME-Zarr version: 0.5 (zarr v3) or 0.4 (zarr v2, read by more tools)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an OME-Zarr plate (never another folder, nor the "
                        "source)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=convert)

    p = sub.add_parser(
        "view",
        help="open a plate, an embedding store, a dictionary or an activation pass in napari with "
             "the plugin's panels",
    )  # fmt: skip
    p.add_argument(
        "path",
        help="a plate (as for info), an embedding store (its crops drawn on its plate), a "
             "dictionary file (its features browsable on the store and plate it was fitted on) or "
             "an activation pass folder (plate-concepts encode: its dictionary browsed from it, "
             "reading only the shown plate's codes)",
    )  # fmt: skip
    p.add_argument("--platemap", help=PLATEMAP_HELP)
    p.add_argument("--pattern", help=PATTERN_HELP)
    p.add_argument("--store", help="dictionaries: the embedding store to browse the features on "
                                   "(default: the one recorded in the dictionary)")
    p.add_argument("--plate", help="stores and dictionaries: the plate the store was embedded "
                                   "from (default: the one recorded in the store)")
    p.add_argument("--feature", type=int, help="dictionaries: the feature to show first "
                                               "(default: the most selective one)")
    p.add_argument("--codes", metavar="PASS",
                   help="dictionaries: an activation pass of it over the store (plate-concepts "
                        "encode) to browse the features from instead of encoding the store")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a screenshot of the viewer and exit; without a display this runs "
                        "under a virtual one (xvfb-run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=view)


def info(args: argparse.Namespace) -> int:
    from plate_concepts.cli.embeddings import store_info
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.plates import open_plate

    if EmbeddingStore.is_store(args.path):  # a store is described by the embeddings commands
        return store_info(args)

    plate = open_plate(args.path, platemap=args.platemap or "auto", pattern=args.pattern)
    summary = plate_summary(plate)
    missing = None
    if args.check:
        missing = _missing_chunks(plate)
        summary["missing_chunks"] = missing
    if args.json:
        print_json(summary)
    else:
        _print_summary(summary, plate.wells)
    return 1 if args.strict and missing and missing["files"] else 0


def plate_summary(plate: Any) -> dict[str, Any]:
    """What ``info`` reports on a plate, as JSON-ready values."""
    from plate_concepts.plates.platemap import label_columns, read_platemap

    summary: dict[str, Any] = {
        "format": plate.reader,
        "name": plate.name,
        "source": plate.source,
        "plate_format": plate.plate_format.n_wells,
        "n_wells": len(plate.wells),
        "wells": plate.wells,
        "fields_per_well": plate.fields_per_well,
        "channels": plate.channels,
        "image_shape": list(plate.image_shape),
        "dtype": str(plate.dtype),
        "levels": plate.n_levels,
        "label_images": plate.label_names,
        "labels": label_columns(plate.platemap) if plate.platemap is not None else [],
        "platemap": None,
    }
    if plate.platemap is not None:
        # The whole map (not only the imaged wells) says what the plate's layout holds.
        table = read_platemap(plate.platemap_source) if plate.platemap_source else plate.platemap
        summary["platemap"] = {
            "path": plate.platemap_source,
            "n_wells": len(table),
            "labels": label_columns(table),
        }
    return summary


def _print_summary(summary: dict[str, Any], wells: list[str]) -> None:
    fields = sorted(set(summary["fields_per_well"].values()))
    shown = ", ".join(wells[:12]) + (" ..." if len(wells) > 12 else "")
    height, width = summary["image_shape"]
    print(f"{summary['source']}: {summary['format']} plate '{summary['name']}' "
          f"({summary['plate_format']}-well format)")  # fmt: skip
    print(f"  wells:    {summary['n_wells']} imaged ({shown})")
    print(f"  fields:   {'/'.join(map(str, fields))} per well")
    print(f"  channels: {', '.join(summary['channels'])}")
    print(f"  images:   {height} x {width} {summary['dtype']}, {summary['levels']} level(s)")
    if summary["label_images"]:
        print(f"  label images: {', '.join(summary['label_images'])}")
    platemap = summary["platemap"]
    if platemap is None:
        print("  plate map: none (pass --platemap, or put a platemap*.csv next to the images)")
    else:
        where = platemap["path"] or "stored in the plate"
        print(f"  plate map: {where} ({platemap['n_wells']} wells)")
        print(f"  plate-map labels: {', '.join(platemap['labels']) or '(none)'}; varying over "
              f"the imaged wells: {', '.join(summary['labels']) or '(none)'}")  # fmt: skip
    missing = summary.get("missing_chunks")
    if missing is not None:
        if not missing["files"]:
            print(f"  check: {missing['detail']}")
        else:
            print(f"  check: {len(missing['files'])} of {missing['n_chunks']} full-resolution "
                  f"chunk files are missing ({missing['detail']}); they read as the fill value "
                  "(0): blank regions the writer skipped, or files lost in a copy:")  # fmt: skip
            for line in missing["files"][:20]:
                print(f"    {line}")
            if len(missing["files"]) > 20:
                print(f"    ... and {len(missing['files']) - 20} more (--json lists them all)")


def _missing_chunks(plate: Any) -> dict[str, Any]:
    """The ``--check`` report: missing level-0 chunk files (OME-Zarr plates)."""
    from plate_concepts.plates.omezarr import missing_image_chunks

    if not plate.reader.startswith("ome-zarr"):
        n_planes = sum(levels[0].shape[0] for levels in plate.images.values())
        return {"files": [], "n_chunks": 0, "fields": [],
                "detail": f"the files of all {n_planes} image planes are there and their "
                          "headers readable (checked when the plate was opened)"}  # fmt: skip
    report = missing_image_chunks(plate.source)
    fields = [f"{entry.well} field {entry.field}" for entry in report.missing]
    detail = (
        f"in {len(fields)} field(s): {', '.join(fields[:10])}{' ...' if len(fields) > 10 else ''}"
        if fields
        else f"all {report.n_chunks} full-resolution chunk files are there"
    )
    return {"files": report.files, "n_chunks": report.n_chunks, "fields": fields, "detail": detail}


def convert(args: argparse.Namespace) -> int:
    from plate_concepts.plates import open_plate
    from plate_concepts.plates.omezarr import write_ome_zarr_plate

    plate = open_plate(args.src, platemap=args.platemap or "auto", pattern=args.pattern)
    n_fields = sum(plate.fields_per_well.values())
    with progress_bar(n_fields, "converting", "field", args.quiet) as bar:
        out = write_ome_zarr_plate(
            plate, args.out, ngff_version=args.ngff, overwrite=args.overwrite, progress=bar
        )
    joined = f", plate map {plate.platemap_source}" if plate.platemap_source else ""
    print(f"wrote {out}: {len(plate.wells)} wells, {n_fields} fields, NGFF {args.ngff}{joined}")
    return 0


def view(args: argparse.Namespace) -> int:
    """Open a plate, a store (with its plate), a dictionary (with its store and plate) or an
    activation pass (with its dictionary, store and plate)."""
    from plate_concepts._io import output_kind
    from plate_concepts.viewer.reader import is_activation_pass

    kind = "activation-pass" if is_activation_pass(Path(args.path)) else output_kind(args.path)
    if kind not in ("embedding-store", "dictionary", "activation-pass") and (
        args.store or args.feature is not None
    ):
        raise CommandError("--store and --feature go with a dictionary file or an activation pass")
    if args.codes and kind != "dictionary":
        raise CommandError("--codes goes with a dictionary file (an activation pass opens alone)")
    if kind == "dictionary":
        from plate_concepts.dictionary import read_dictionary_metadata

        _check_feature(args.feature, read_dictionary_metadata(args.path)["n_features"], args.path)
    ensure_display(args)  # before anything slow: without a display this may run again
    estimator = store = explorer = activation_pass = dictionary_path = None
    if kind == "activation-pass":
        activation_pass, estimator, store = _pass_dictionary_and_store(args.path, args.store)
        dictionary_path = activation_pass.spec.dictionary
        _check_feature(args.feature, activation_pass.n_features, dictionary_path)
    elif kind == "dictionary":
        estimator, store = _dictionary_and_store(args)
        dictionary_path = args.path
        if args.codes:
            activation_pass = _codes_for(args.codes, args.path, store)
    elif kind == "embedding-store":
        from plate_concepts.embeddings.store import EmbeddingStore

        store = EmbeddingStore.open(args.path)
    plate = _plate_for(args, store)
    if estimator is not None:
        explorer = _prepared_explorer(store, estimator, plate, args.quiet, activation_pass)

    import napari

    from plate_concepts.viewer.app import show_results

    viewer = napari.Viewer(title=f"napari-plate-concepts: {Path(args.path).name}")
    viewer.window.resize(1600, 1000)
    feature = show_results(viewer, plate, store=store, explorer=explorer, feature=args.feature,
                           dictionary_path=dictionary_path)
    if feature is not None:
        print(f"showing feature {feature} of {args.path}")
    return run_or_screenshot(viewer, args.screenshot)


def _check_feature(feature: int | None, n_features: int, dictionary: Any) -> None:
    if feature is not None and not 0 <= feature < n_features:
        raise CommandError(
            f"--feature {feature} is not a feature of {dictionary} (it has {n_features}: 0..{n_features - 1})"
        )


def _dictionary_and_store(args: argparse.Namespace) -> tuple[Any, Any]:
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.viewer.reader import fitted_store_path

    estimator = ICFL.load(args.path)  # an ICFL or a TopKSAE, as the file says
    recorded = fitted_store_path(estimator)
    store_path = Path(args.store) if args.store else recorded
    if store_path is None:
        raise CommandError(
            f"{args.path} does not record the embedding store it was fitted on: pass --store"
        )
    if not EmbeddingStore.is_store(store_path):
        origin = "given" if args.store else "recorded in the dictionary"
        raise CommandError(
            f"the embedding store {store_path} ({origin}) is not there or not a store: pass "
            "--store with the store to browse the features on"
        )
    return estimator, EmbeddingStore.open(store_path)


def _pass_dictionary_and_store(path: str, store_path: str | None) -> tuple[Any, Any, Any]:
    """(activation pass, its dictionary, its store) of a pass folder; ``store_path`` must be
    the store it was made on."""
    from plate_concepts.analysis.activation_pass import ActivationPass
    from plate_concepts.analysis.evaluation import check_pass_matches
    from plate_concepts.dictionary.estimators import ICFL
    from plate_concepts.embeddings.store import EmbeddingStore

    activation_pass = ActivationPass.open(path)
    spec = activation_pass.spec
    if spec.dictionary is None or not Path(spec.dictionary).is_file():
        raise CommandError(f"the activation pass {path} was made with dictionary {spec.dictionary}, "
                           "which is not there")  # fmt: skip
    store_path = store_path or spec.store
    if not EmbeddingStore.is_store(store_path):
        raise CommandError(f"the embedding store {store_path} of activation pass {path} is not there")
    store = EmbeddingStore.open(store_path)
    try:
        check_pass_matches(activation_pass, store)
    except ValueError as err:
        raise CommandError(str(err)) from err
    return activation_pass, ICFL.load(spec.dictionary), store


def _codes_for(codes: str, dictionary: str, store: Any) -> Any:
    """The activation pass ``codes``, checked to be of ``dictionary`` over ``store``."""
    from plate_concepts.analysis.activation_pass import ActivationPass
    from plate_concepts.analysis.evaluation import check_pass_matches

    activation_pass = ActivationPass.open(codes)
    try:
        check_pass_matches(activation_pass, store, dictionary=dictionary)
    except ValueError as err:
        raise CommandError(str(err)) from err
    return activation_pass


def _plate_for(args: argparse.Namespace, store: Any) -> Any:
    from plate_concepts.plates import open_plate

    if store is None:
        return open_plate(args.path, platemap=args.platemap or "auto", pattern=args.pattern)
    if args.plate:
        return open_plate(args.plate, platemap=args.platemap or "auto", pattern=args.pattern)
    from plate_concepts.embeddings.source_plates import open_store_plate, store_plate_sources

    plate = open_store_plate(store)
    if plate is None:
        recorded = {name: r.get("source", "") for name, r in store_plate_sources(store).items()}
        raise CommandError(
            f"the plate that embedding store {store.path} was made from cannot be opened "
            f"(recorded: {recorded or 'none'}): pass --plate"
        )
    return plate


def _prepared_explorer(store: Any, estimator: Any, plate: Any, quiet: bool, activation_pass: Any = None) -> Any:
    """Encode the store (or read the plate's codes from ``activation_pass``) and read ahead
    what selecting a feature shows, with progress bars."""
    from plate_concepts.analysis.explorer import FeatureExplorer

    if activation_pass is not None:
        explorer = FeatureExplorer(store, estimator, plate=plate, activation_pass=activation_pass,
                                   batch_column=activation_pass.spec.batch_column)  # fmt: skip
    else:
        explorer = FeatureExplorer(store, estimator, plate=plate)
    with progress_bar(len(store), "encoding tokens", "token", quiet or activation_pass is not None) as bar:
        explorer.prepare(progress=bar)
    with progress_bar(None, "reading fields for the viewer", "item", quiet) as bar:
        summary = explorer.preload(progress=bar)
    if not quiet:
        print(f"ready to browse: {summary.describe()}")
    return explorer
