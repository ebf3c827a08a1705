"""Memory and speed of fitting a dictionary on an embedding store.

For each store size (``--factors``: multiples of the batch size) it writes a store of random
tokens chunk by chunk, then fits ICFL and TopK on it with :func:`train` and reports

- the peak resident-memory growth of the process during the fit (Linux: the peak is reset
  before each fit through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, a lifetime peak),
- the peak memory traced by ``tracemalloc`` (numpy and Python allocations; torch's own
  allocator is not traced), both against the store's size on disk,
separately for fitting the whitening (bounded by ``max_control_tokens`` x d, plus the obs table)
and for training (streamed batches: the same whatever the store's size), and
- tokens/s of training (streaming, whitening on the device, training steps) and of the
  training steps alone (one pre-processed batch on the device, reused).

Usage: ``python benchmarks/bench_fit_memory.py [--quick] [--device cuda] [--factors 10 40]``
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import torch

from plate_concepts._device import resolve_device
from plate_concepts.dictionary import (
    ControlWhitening,
    ICFLModule,
    TopKModule,
    TrainingConfig,
    train,
)
from plate_concepts.dictionary.controls import fit_whitening
from plate_concepts.embeddings.store import EmbeddingStore

MIB = 2**20


def rss_bytes() -> int:
    """Current resident set size."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def write_store(
    path: Path, n_tokens: int, dim: int, rows_per_append: int, chunk_rows: int | None, seed: int = 0
) -> EmbeddingStore:
    """Random correlated tokens (a fifth of them controls), appended in pieces."""
    rng = np.random.default_rng(seed)
    mixing = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    store = EmbeddingStore.create(path, dim=dim, chunk_rows=chunk_rows, overwrite=True)
    for start in range(0, n_tokens, rows_per_append):
        n = min(rows_per_append, n_tokens - start)
        tokens = rng.standard_normal((n, dim), dtype=np.float32) @ mixing
        obs = pd.DataFrame({
            "plate": "P1", "well": "B02", "field": 1, "crop_y": np.arange(start, start + n), "crop_x": 0,
            "crop_size": 256, "is_control": rng.random(n) < 0.2,
        })
        store.append(tokens, obs)
    return EmbeddingStore.open(path)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def new_model(method: str, n_features: int, dim: int, k: int) -> torch.nn.Module:
    if method == "icfl":
        return ICFLModule(n_features, dim)  # publication's J = 20 rounds of L = 5
    return TopKModule(n_features, dim, k=k)


class MemoryWatch:
    """Peak RSS growth and tracemalloc peak of a block of code."""

    def __enter__(self) -> Self:
        self.exact_peak = reset_peak_rss()
        self.rss_before = rss_bytes()
        tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _, self.traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.rss_growth = peak_rss_bytes() - self.rss_before


def measure_fit(method: str, store: EmbeddingStore, args: argparse.Namespace, steps: int) -> dict[str, object]:
    """Fit the whitening on the store's controls, then train; memory of each phase."""
    whitening = ControlWhitening("pca")
    with MemoryWatch() as whitening_memory:
        fit_whitening(whitening, store)
    model = new_model(method, args.n_features, whitening.output_dim, args.k)
    config = TrainingConfig(steps=steps, batch_size=args.batch_size, device=args.device, log_every=steps)
    started = time.perf_counter()
    with MemoryWatch() as training_memory:
        result = train(model, whitening, store, config)
    seconds = time.perf_counter() - started
    return {
        "whitening_memory": whitening_memory,
        "training_memory": training_memory,
        "training_tokens_per_s": result.tokens_seen / seconds,
        "loop_tokens_per_s": result.events[-1].tokens_per_s,
        "whitening": result.whitening,
    }


def measure_steps(method: str, dim: int, args: argparse.Namespace, whitening: ControlWhitening) -> float:
    """tokens/s of training steps alone on one pre-processed batch kept on the device."""
    device = resolve_device(args.device)
    model = new_model(method, args.n_features, dim, args.k).to(device)
    x = whitening.transform_torch(torch.randn(args.batch_size, dim, device=device) @ torch.randn(dim, dim, device=device))
    model.init_from_data(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = model.training_loss(x)
        loss.backward()
        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step(i, generator)

    for i in range(2):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for i in range(args.step_repeats):
        step(i + 3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return args.step_repeats * args.batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (d=128, batch 512, M=512, chunks of 256 rows)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--n-features", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="TopK's k")
    parser.add_argument("--steps", type=int, default=30, help="fit steps per method (covers the store ~3 times at factor 10)")
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument("--factors", type=int, nargs="+", default=None, help="store sizes in batches (default 10)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="store chunk rows (default: the store's 4-8 MiB chunks)")
    parser.add_argument("--methods", nargs="+", default=["icfl", "topk"], choices=["icfl", "topk"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.batch_size, args.n_features, args.steps = 128, 512, 512, 10
        args.chunk_rows = args.chunk_rows or 256
        args.factors = args.factors or [10, 40]
    args.factors = args.factors or [10]
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, d={args.dim}, batch {args.batch_size}, "
          f"M={args.n_features}, TopK k={args.k}, ICFL J=20 L=5, {args.steps} steps per fit")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        whitening = None
        for number, factor in enumerate(args.factors):
            n_tokens = factor * args.batch_size
            store = write_store(Path(tmp) / f"store{factor}", n_tokens, args.dim, args.batch_size, args.chunk_rows)
            size = folder_bytes(store.path)
            print(f"\nstore: {n_tokens} tokens = {factor} batches, {size / MIB:.1f} MiB on disk, "
                  f"chunks of {store.chunk_rows} rows")
            for method in args.methods:
                if number == 0:  # one-time costs (lazy imports, allocator pools) out of the figures
                    measure_fit(method, store, args, steps=2)
                m = measure_fit(method, store, args, args.steps)
                whitening = m["whitening"]
                for phase in ("whitening", "training"):
                    memory = m[f"{phase}_memory"]
                    peak_kind = "peak" if memory.exact_peak else "lifetime peak (ru_maxrss)"
                    print(
                        f"  {method:5s} {phase:9s}: RSS {peak_kind} growth {memory.rss_growth / MIB:7.1f} MiB "
                        f"({memory.rss_growth / size:5.2f} x store), traced peak {memory.traced_peak / MIB:7.1f} MiB "
                        f"({memory.traced_peak / size:5.2f} x store)"
                    )
                print(f"  {method:5s} training : {m['training_tokens_per_s']:9.0f} tokens/s "
                      f"(training loop alone {m['loop_tokens_per_s']:9.0f})")
        print("\ntraining steps alone (one pre-processed batch on the device):")
        for method in args.methods:
            print(f"  {method:5s} {measure_steps(method, args.dim, args, whitening):9.0f} tokens/s")


if __name__ == "__main__":
    main()
