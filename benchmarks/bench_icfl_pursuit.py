"""Throughput of the ICFL pursuit: plain (scores recomputed each round) vs Gram (scores updated
through the cached Gram matrix). Run: ``python benchmarks/bench_icfl_pursuit.py [--quick]``.

The Gram matrix is built once per dictionary update, so its build time is reported separately
and excluded from the pursuit throughput (it is amortised over the batches encoded with one
dictionary; in training it is paid once per step, see the "incl. Gram build" line).
"""

from __future__ import annotations

import argparse
import time

import torch

from plate_concepts.dictionary.icfl import ICFLModule


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, float, object]:
    """Best wall time and best process CPU time (all threads) of ``repeats`` calls, and the last
    result. CPU time is steadier than wall time on a shared machine."""
    result = fn() if warmup else None
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best_wall, best_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=20, help="J")
    parser.add_argument("--per-round", type=int, default=5, help="L")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed calls (after a warm-up on 64 tokens)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (d=256, M=2048, batch 1024)"
    )
    args = parser.parse_args()
    if args.quick:
        args.dim, args.features, args.batch = 256, 2048, 1024
    if args.threads:
        torch.set_num_threads(args.threads)

    module = ICFLModule(args.features, args.dim, n_rounds=args.rounds, per_round=args.per_round)
    module.to(args.device)
    generator = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=generator), dim=1)
    x = x.to(args.device)
    print(
        f"device={args.device} threads={torch.get_num_threads()} d={args.dim} M={args.features} "
        f"batch={args.batch} J={args.rounds} L={args.per_round}"
    )

    def build_gram() -> torch.Tensor:
        module._gram_cache = None
        return module._gram_blocks()

    # Warm up both paths on a few tokens (allocator, thread pool), then time the full batch.
    module.pursuit_plain(x[:64])
    module.pursuit_gram(x[:64])
    gram_wall, gram_cpu, _ = timed(build_gram, args.repeats, warmup=False)
    fast_wall, fast_cpu, fast_codes = timed(
        lambda: module.pursuit_gram(x), args.repeats, warmup=False
    )
    plain_wall, plain_cpu, plain_codes = timed(
        lambda: module.pursuit_plain(x), args.repeats, warmup=False
    )

    same = (fast_codes.indices == plain_codes.indices).all(dim=1).float().mean()
    print(f"{'':20s} {'wall s':>8s} {'tokens/s':>10s} {'CPU s':>8s}")
    rows = [
        ("Gram matrix build", gram_wall, gram_cpu),
        ("plain pursuit", plain_wall, plain_cpu),
        ("Gram pursuit", fast_wall, fast_cpu),
        ("  incl. Gram build", fast_wall + gram_wall, fast_cpu + gram_cpu),
    ]
    for name, wall, cpu in rows:
        rate = "" if name.startswith("Gram matrix") else f"{args.batch / wall:10.0f}"
        print(f"{name:20s} {wall:8.3f} {rate:>10s} {cpu:8.3f}")
    print(
        f"speed-up Gram/plain: {plain_wall / fast_wall:.1f}x wall, {plain_cpu / fast_cpu:.1f}x CPU "
        f"(incl. Gram build {plain_wall / (fast_wall + gram_wall):.1f}x wall)"
    )
    print(f"tokens with identical codes: {float(same):.4f}")


if __name__ == "__main__":
    main()
