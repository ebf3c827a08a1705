"""Embedding-store commands: ``embed``, ``import-profiles``, and what ``info`` says of a store."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from plate_concepts.cli._common import CommandError, print_json, progress_bar

LIST_HELP = "(or @LIST.txt: a text file naming one per line; # starts a comment)"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed the crops of one or more plates into one embedding store (resumable)",
        description="Embed every crop of each PLATE into STORE, plate after plate, in this process "
        "or on Dask workers (--workers N, --scheduler ADDRESS). Run the same command again to "
        "resume an interrupted run; --append adds plates to a store.",
    )
    p.add_argument(
        "plates",
        nargs="+",
        metavar="PLATE",
        help="a plate: OME-Zarr HCS, a folder of TIFF exports or a LoadData CSV " + LIST_HELP,
    )
    p.add_argument("store", help="the embedding store folder (created, resumed or appended to)")
    p.add_argument(
        "--platemap",
        action="append",
        help="per-well metadata table: one for every plate, or one per plate in the "
        "order of the plates (default: the platemap*.csv|tsv|parquet next to each "
        "plate's images, if there is exactly one)",
    )
    p.add_argument(
        "--pattern",
        help="TIFF folders: a preset (phenix, imagexpress, nf1) or a regex "
        "with named groups (default: the preset matching most files)",
    )
    p.add_argument(
        "--model",
        default="efficientnet-lite0",
        help="efficientnet-lite0[:concat|:mean][:blocks], torchscript:PATH or "
        "module:package.module:callable",
    )
    p.add_argument("--crop", type=int, default=256, help="crop size in pixels")
    p.add_argument(
        "--stride", type=int, help="step between crops in pixels (default: the crop size)"
    )
    p.add_argument(
        "--drop-edge",
        action="store_true",
        help="leave out crops that would reach past the field's border (default: the last "
        "row and column of crops are moved inside the field)",
    )
    p.add_argument(
        "--min-foreground",
        type=float,
        help="leave out crops whose nuclear foreground fraction is below this (default: "
        "keep every crop)",
    )
    p.add_argument(
        "--channels",
        help="channels to embed, comma-separated, in this order (default: "
        "the store's, else every channel of the first plate)",
    )
    p.add_argument(
        "--control",
        help="controls as COLUMN=VALUE[,VALUE] of the plate map; sets the "
        "is_control column (default: no control column)",
    )
    p.add_argument(
        "--patch-tokens",
        action="store_true",
        help="also store each crop's patch-token grid (float16; needed for per-cell maps)",
    )
    p.add_argument(
        "--objects",
        metavar="LABEL_IMAGE",
        help="one token per segmented object instead of the crop grid: a crop centred on each "
        "object of this label image of the plate (cells, nuclei, ...); the object's label id, "
        "centroid and area go into the index (default: tile the fields)",
    )
    p.add_argument(
        "--object-size",
        type=int,
        metavar="PX",
        help="with --objects: the side of each object's crop in pixels (default: 96)",
    )
    p.add_argument(
        "--mask",
        action="store_true",
        help="with --objects: set the pixels outside the object to 0, so its token describes "
        "the object alone (default: the crop as it is, neighbours included)",
    )
    p.add_argument(
        "--model-input",
        type=int,
        metavar="PX",
        help="with --objects: resize each object's crop to PX x PX (bilinear) before the model; "
        "an ImageNet CNN sees objects at about 224 px, so a 96-px cell crop at 192 px gives finer "
        "tokens, at about 4x the embedding time (default: the crop as it is)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="how tokens are stored (float16 halves the disk space)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="crops per model call")
    p.add_argument(
        "--device", default="auto",
        help="auto (CUDA, MPS, else CPU; with --workers/--scheduler one GPU per worker), cpu, "
        "cuda, cuda:N or mps",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, metavar="N",
        help="embed on a local Dask cluster of N worker processes (one per GPU or CPU core is a "
        "good choice): each builds the model once, embeds whole fields and writes its own parts, "
        "which this process commits in order; the store is the one an in-process run makes "
        "(default: embed in this process; 0: in this process too)",
    )  # fmt: skip
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="embed on an existing Dask cluster (tcp://HOST:8786) whose workers read the plates "
        "and write beside STORE at the same paths (default: no cluster)",
    )  # fmt: skip
    p.add_argument(
        "--append",
        action="store_true",
        help="add the plates to an existing store (same model, crop and channels)",
    )
    p.add_argument(
        "--replace-plate",
        action="store_true",
        help="with --append: a plate the store holds already is deleted from it and embedded again",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace STORE if it is an embedding store (never another folder): the new "
        "store is built beside it and replaces it once finished",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=embed)

    p = sub.add_parser(
        "import-profiles",
        help="pycytominer/JUMP-style profile tables (one per plate) into one embedding store",
    )
    p.add_argument(
        "tables",
        nargs="+",
        metavar="TABLE",
        help="a parquet or CSV table with Metadata_* columns and numeric feature "
        "columns " + LIST_HELP,
    )
    p.add_argument("store", help="the embedding store folder to write")
    p.add_argument(
        "--features",
        help="regex selecting the feature columns (default: every numeric "
        "column without the Metadata_ prefix)",
    )
    p.add_argument(
        "--features-join",
        choices=["exact", "inner"],
        default="exact",
        help="exact: every table must have the same features; inner: keep those all "
        "tables have (the others are listed)",
    )
    p.add_argument(
        "--drop-na",
        choices=["columns", "rows"],
        help="drop the feature columns, or the rows, holding NaN or inf (default: such "
        "a value is an error)",
    )
    p.add_argument(
        "--plate",
        help="the plate's name when a single table has no Metadata_Plate "
        "(default: the table's file name)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="how the features are stored",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace STORE if it is an embedding store (never another folder)",
    )
    p.set_defaults(run=import_profiles)


# ---------------------------------------------------------------------- embed
def embed(args: argparse.Namespace) -> int:
    from plate_concepts.embeddings.embed import embed_plates, staging_path
    from plate_concepts.plates import open_plate

    if (args.object_size is not None or args.mask or args.model_input is not None) and not args.objects:
        raise CommandError(
            "--object-size, --mask and --model-input go with --objects (the label image of the objects)"
        )
    if args.workers is not None and args.scheduler is not None:
        raise CommandError(
            "--workers starts a local Dask cluster and --scheduler uses an existing one: give one"
        )
    if args.replace_plate and not args.append:
        raise CommandError(
            "--replace-plate goes with --append (it replaces a plate the store holds)"
        )
    paths = expand_lists(args.plates)
    maps = _platemaps(args.platemap, len(paths))
    plates = [
        open_plate(path, platemap=m, pattern=args.pattern)
        for path, m in zip(paths, maps, strict=True)
    ]
    cancel = threading.Event()
    # Ctrl-C stops after the current batch, once what is embedded is stored (resumable).
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        unit = "field" if args.objects else "crop"  # objects are counted once a field is read
        with progress_bar(desc=f"{unit}s", unit=unit, quiet=args.quiet) as bar:
            store = embed_plates(
                plates, args.store, args.model, append=args.append, replace_plate=args.replace_plate,
                overwrite=args.overwrite, crop_size=args.crop, stride=args.stride,
                batch_size=args.batch_size, drop_edge=args.drop_edge,
                min_foreground=args.min_foreground, channels=_channels(args.channels),
                patch_tokens=args.patch_tokens, control=args.control, device=args.device,
                token_dtype=args.dtype, progress=bar, cancel=cancel,
                objects=args.objects, object_size=args.object_size, mask=args.mask,
                model_input=args.model_input, workers=args.workers, scheduler=args.scheduler,
            )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    tokens = store.tokens_per_plate()
    for plate in plates:
        print(f"{plate.name}: {tokens.get(plate.name, 0)} tokens")
    unfinished = [plate.name for plate in plates if plate.name in store.incomplete_plates()]
    if unfinished:
        where = (
            f"the new store is in {staging_path(args.store)} and {args.store} is unchanged; "
            if args.overwrite and Path(store.path) != Path(args.store)
            else ""
        )
        print(
            f"plate-concepts embed: interrupted: {len(store)} tokens are stored; {where}run the "
            "same command again to finish (it resumes where it stopped)",
            file=sys.stderr,
        )
        return 130
    print(
        f"{args.store}: {len(store)} tokens of dimension {store.dim} from {len(store.plates)} plate(s)"
    )
    if not store.is_complete:  # left so by an earlier run
        print(f"plate-concepts embed: note: the embedding of {', '.join(store.incomplete_plates())} "
              "(an earlier run) was interrupted; the store is incomplete until it is finished",
              file=sys.stderr)  # fmt: skip
    return 0


def _platemaps(given: list[str] | None, n_plates: int) -> list[str]:
    if not given:
        return ["auto"] * n_plates
    if len(given) == 1:
        return given * n_plates
    if len(given) != n_plates:
        raise CommandError(
            f"{len(given)} --platemap for {n_plates} plates: give one for every plate, or one per "
            "plate in the order of the plates"
        )
    return list(given)


def _channels(text: str | None) -> list[str] | None:
    if text is None:
        return None
    channels = [c.strip() for c in text.split(",") if c.strip()]
    if not channels:
        raise CommandError(f"--channels {text!r} names no channel; expected e.g. DNA,ER,Mito")
    return channels


def expand_lists(items: list[str]) -> list[str]:
    """Command-line paths with each ``@LIST.txt`` replaced by the paths it lists (one per line;
    blank lines and ``#`` comments skipped; relative paths are relative to the list's folder)."""
    expanded = []
    for item in items:
        if not item.startswith("@"):
            expanded.append(item)
            continue
        listing = Path(item[1:])
        if not listing.is_file():
            raise CommandError(f"list file {listing} does not exist (named by {item})")
        lines = [line.split("#", 1)[0].strip() for line in listing.read_text().splitlines()]
        named = [line for line in lines if line]
        if not named:
            raise CommandError(f"list file {listing} names nothing")
        expanded += [
            str(p if (p := Path(line)).is_absolute() else listing.parent / p) for line in named
        ]
    return expanded


# ---------------------------------------------------------------------- import-profiles
def import_profiles(args: argparse.Namespace) -> int:
    from plate_concepts.embeddings.profiles import import_profiles

    store = import_profiles(
        expand_lists(args.tables), args.store, features=args.features, overwrite=args.overwrite,
        plate=args.plate, dtype=args.dtype, features_join=args.features_join, drop_na=args.drop_na,
    )  # fmt: skip
    provenance = store.provenance
    dropped = provenance.get("dropped_features") or {}
    lacking = [f"{name} ({why})" for name, why in dropped.items() if why.startswith("missing")]
    holding = [name for name, why in dropped.items() if not why.startswith("missing")]
    for names, what in ((lacking, "that some tables lack"), (holding, "holding NaN or inf")):
        if names:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            print(f"dropped {len(names)} feature column(s) {what}: {shown}")
    rows = provenance.get("dropped_rows") or {}
    if rows:
        per_table = ", ".join(f"{Path(t).name}: {n}" for t, n in rows.items())
        print(f"dropped {sum(rows.values())} row(s) holding NaN or inf ({per_table})")
    print(
        f"wrote {args.store}: {len(store)} tokens of dimension {store.dim} from "
        f"{len(store.plates)} plate(s)"
    )
    return 0


# ---------------------------------------------------------------------- info
def store_info(args: argparse.Namespace) -> int:
    """``plate-concepts info STORE``: what the store holds (``--json`` for a record), from its
    metadata only; ``--check`` also looks for missing chunk files of its arrays."""
    from plate_concepts.embeddings.store import EmbeddingStore

    store = EmbeddingStore.open(args.path)
    summary = store.describe()
    missing = None
    if getattr(args, "check", False):
        missing = {name: ids for name, ids in store.missing_chunks().items() if ids}
        summary["missing_chunks"] = missing
    if getattr(args, "json", False):
        print_json(summary)
    else:
        _print_store(summary)
    return 1 if getattr(args, "strict", False) and missing else 0


def _print_store(summary: dict[str, Any]) -> None:
    plates = summary["plates"]
    print(
        f"{summary['path']}: embedding store of {summary['n_tokens']:,} tokens, dimension "
        f"{summary['dim']} ({summary['dtype']}), {len(plates)} plate(s)"
    )
    if summary["model"]:
        print(f"  model:    {summary['model']}, {summary['crop_size']}-px crops, channels "
              f"{', '.join(summary['channels'] or [])}")  # fmt: skip
    if summary["patch_grid"]:
        print(f"  patch tokens: {summary['patch_grid'][0]} x {summary['patch_grid'][1]} per crop")
    print(f"  {'plate':<24}{'tokens':>12}{'wells':>8}{'controls':>10}")
    for plate in plates[:50]:
        controls = summary["controls_per_plate"][plate]
        print(f"  {plate:<24}{summary['tokens_per_plate'][plate]:>12,}{summary['wells_per_plate'][plate]:>8}"
              f"{'-' if controls is None else f'{controls:,}':>10}")  # fmt: skip
    if len(plates) > 50:
        print(f"  ... and {len(plates) - 50} more plates (--json lists them all)")
    for column, label in summary["labels"].items():
        if label["n_values"] is None:
            print(f"  label {column}: too many values to list")
            continue
        shown = ", ".join(f"{value} ({n:,})" for value, n in list(label["values"].items())[:8])
        more = f" ... ({label['n_values']} values)" if label["n_values"] > 8 else ""
        print(f"  label {column}: {shown}{more}")
    if not summary["complete"]:
        print(f"  INCOMPLETE: the embedding of {', '.join(summary['incomplete_plates'])} was "
              "interrupted; run the same embed command again to finish it")  # fmt: skip
    if summary.get("missing_chunks"):
        for name, ids in summary["missing_chunks"].items():
            print(f"  MISSING: {len(ids)} chunk file(s) of {name} (chunks {ids[:10]}"
                  f"{' ...' if len(ids) > 10 else ''})")  # fmt: skip
    elif "missing_chunks" in summary:
        print("  every chunk file is there")
