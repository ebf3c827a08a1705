"""Embedding-store commands: ``embed``, ``import-profiles``."""

from __future__ import annotations

import argparse

from tqdm import tqdm


def add_commands(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(run=embed)

    p = sub.add_parser("import-profiles", help="a pycytominer/JUMP-style profile table into an embedding store")
    p.add_argument("table", help="parquet or CSV with Metadata_* columns and numeric feature columns")
    p.add_argument("store", help="output embedding store folder")
    p.add_argument("--features", help="regex selecting the feature columns (default: numeric non-Metadata columns)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=import_profiles)


def embed(args: argparse.Namespace) -> int:
    from plate_concepts.embeddings.embed import embed_plate
    from plate_concepts.plates import open_plate

    plate = open_plate(args.plate, platemap=args.platemap or "auto", pattern=args.pattern)
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


def import_profiles(args: argparse.Namespace) -> int:
    from plate_concepts.embeddings.profiles import import_profiles

    store = import_profiles(args.table, args.store, features=args.features, overwrite=args.overwrite)
    print(f"wrote {args.store}: {len(store)} tokens of dimension {store.dim}")
    return 0
