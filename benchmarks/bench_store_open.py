"""Opening an embedding store of N and 8N tokens: time and memory stay flat.

Builds two synthetic screens (d = 384, float16 tokens, 384-well plates of ~10k tokens each,
one obs part and one summary per plate, as ``embed`` leaves them after each plate) by writing
their parts directly: every token chunk is a hard link to one chunk file, so 8 M tokens take a
few MB of disk, not 6 GB. Then, in a fresh process per store, it measures

- ``open``: :meth:`EmbeddingStore.open`, ``len``, the plate list and tokens per plate,
- ``info``: :meth:`EmbeddingStore.describe` (what ``plate-concepts info`` prints),
- ``plate``: one plate's obs and tokens (``read_obs(plate=)``, ``read_plate``),

each with its wall time and the process's peak resident-memory growth over the imports, and
prints the 8N / N ratios. Target: open + info under 2 s and 300 MB at 10 M tokens.

Usage: ``python benchmarks/bench_store_open.py [--tokens 1000000] [--factor 8] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

DIM = 384
WELLS_PER_PLATE = 384
TOKENS_PER_WELL = 26  # ~10k tokens a plate: 9 fields of 3 x 3 crops, some dropped


def build_store(path: Path, n_tokens: int) -> None:
    """A synthetic screen of ``n_tokens`` tokens, written part by part."""
    from plate_concepts.embeddings.obs_index import MAX_STORE_VALUES, merge_labels, summarise
    from plate_concepts.embeddings.store import EmbeddingStore
    from plate_concepts.embeddings.store_files import (
        STORE_FILE,
        arrow_table,
        new_summary_file,
        plate_entry,
        write_json,
        write_meta,
        write_parquet,
    )
    from plate_concepts.plates.geometry import PlateFormat

    store = EmbeddingStore.create(path, dim=DIM, dtype="float16", provenance={"model": "synthetic"})
    chunk_rows = store.chunk_rows
    tokens = zarr.open_array(path / "tokens", mode="r+").with_config({"write_empty_chunks": True})
    tokens.resize((n_tokens, DIM))
    rng = np.random.default_rng(0)
    tokens[:chunk_rows] = rng.standard_normal((chunk_rows, DIM)).astype(np.float16)
    first = path / "tokens" / "c" / "0" / "0"
    for chunk in range(1, -(-n_tokens // chunk_rows)):
        (path / "tokens" / "c" / str(chunk)).mkdir()
        os.link(first, path / "tokens" / "c" / str(chunk) / "0")

    wells = PlateFormat.from_n_wells(WELLS_PER_PLATE).wells()
    per_plate = WELLS_PER_PLATE * TOKENS_PER_WELL
    meta = json.loads((path / STORE_FILE).read_text())
    start, plate, labels = 0, 0, {}
    while start < n_tokens:
        n = min(per_plate, n_tokens - start)
        name = f"SCREEN-{plate:05d}"
        well = np.repeat(wells, TOKENS_PER_WELL)[:n]
        k = np.arange(n)
        obs = pd.DataFrame(
            {
                "plate": name, "well": well, "field": (k // 3) % 9, "crop_y": (k % 3) * 256,
                "crop_x": 0, "crop_size": 256, "is_control": np.isin(well, wells[:24]),
                "compound": [f"cpd-{(plate * 397 + i) % 5000}" for i in k // TOKENS_PER_WELL],
                "cell_line": np.where(k % 2 == 0, "A549", "U2OS"),
            }
        )  # fmt: skip
        part = f"obs/part-{plate:05d}.parquet"
        write_parquet(arrow_table(obs), path / part)
        summary_file = new_summary_file(meta, plate)
        summary = summarise(obs)
        write_json(path / summary_file, summary)
        meta["parts"].append({"file": part, "start": start, "stop": start + n, "plates": [name]})
        meta["plates"][name] = {"id": plate, **plate_entry(summary), "summary": summary_file}
        labels = merge_labels(labels, summary["labels"], MAX_STORE_VALUES)
        start, plate = start + n, plate + 1
    meta["labels"] = new_summary_file(meta, None)
    write_json(path / meta["labels"], labels)
    meta["columns"] = list(obs.columns)
    meta["n_tokens"] = n_tokens
    write_meta(path / STORE_FILE, meta)


def measure(path: str) -> dict[str, float]:
    """Run in a fresh process: times and peak-memory growth of opening and reading."""
    from plate_concepts.embeddings.store import EmbeddingStore  # imports are the baseline

    def peak_rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak to the current size
    base = rss()
    figures: dict[str, float] = {}
    t0 = time.perf_counter()
    store = EmbeddingStore.open(path)
    n, plates, per_plate = len(store), store.plates, store.tokens_per_plate()
    figures["open_s"] = time.perf_counter() - t0
    figures["open_mb"] = (peak_rss() - base) / 2**20
    t0 = time.perf_counter()
    info = store.describe()
    figures["info_s"] = time.perf_counter() - t0
    figures["info_mb"] = (peak_rss() - base) / 2**20
    t0 = time.perf_counter()
    middle = plates[len(plates) // 2]
    obs, tokens = store.read_obs(plate=middle), store.read_plate(middle)
    figures["plate_s"] = time.perf_counter() - t0
    figures["plate_mb"] = (peak_rss() - base) / 2**20
    assert n == sum(per_plate.values()) == info["n_tokens"] and len(obs) == len(tokens)
    figures["n_tokens"], figures["n_plates"] = n, len(plates)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="N (default 1,000,000)")
    parser.add_argument(
        "--factor", type=int, default=8, help="the larger store is factor x N (default 8)"
    )
    parser.add_argument("--keep", help="build the stores in this folder and keep them")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return

    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-store-open-"))
    results = {}
    for n in (args.tokens, args.factor * args.tokens):
        path = folder / f"screen-{n}"
        if not path.exists():
            t0 = time.perf_counter()
            build_store(path, n)
            print(f"built {path} ({n:,} tokens) in {time.perf_counter() - t0:.1f} s", flush=True)
        run = subprocess.run(
            [sys.executable, __file__, "--measure", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[n] = json.loads(run.stdout.strip().splitlines()[-1])
    small, large = results[args.tokens], results[args.factor * args.tokens]
    print(f"\n{'':<26}{'N':>14}{f'{args.factor}N':>14}{'ratio':>8}")
    for key, label in [
        ("n_tokens", "tokens"), ("n_plates", "plates"),
        ("open_s", "open (s)"), ("open_mb", "open peak memory (MB)"),
        ("info_s", "info (s)"), ("info_mb", "info peak memory (MB)"),
        ("plate_s", "one plate's rows (s)"), ("plate_mb", "... peak memory (MB)"),
    ]:  # fmt: skip
        a, b = small[key], large[key]
        ratio = b / a if a else float("nan")
        cell = ",.0f" if key.startswith("n_") else ",.3f"
        print(f"{label:<26}{a:>14{cell}}{b:>14{cell}}{ratio:>8.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
