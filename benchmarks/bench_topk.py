"""Training-step throughput of the TopK sparse autoencoder.

Measures, in one run:
1. tokens/s of a full training step of :class:`TopKModule` (forward, backward, hooks, Adam step);
2. the same with a dense decode (``codes.dense() @ decoder``) and, for reference, a plain dense
   autograd implementation (autograd through ``torch.topk``, dense decode), with the speed-ups;
3. the arithmetic rate of the step against what ``torch.mm`` reaches for the encoder's shape
   (batch x dim) @ (dim x n_features) on this machine.

Usage: ``python benchmarks/bench_topk.py [--quick] [--device cuda] [--dead-fraction 0.5]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.topk import TopKModule


class DenseDecodeTopK(TopKModule):
    """Same model, decoding with an (n, n_features) dense code matrix."""

    def _sparse_decode(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return SparseCodes(indices, values, self.n_features).dense() @ self.decoder


class NaiveDenseTopK(TopKModule):
    """The straightforward implementation: autograd through ReLU/top-k and dense decodes."""

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCodes, dict[str, float]]:
        dead = self.dead_mask(self.dead_window_tokens)
        pre = torch.relu((x - self.bias) @ self.encoder.T + self.encoder_bias)
        values, indices = torch.topk(pre, self.k, dim=1)
        x_hat = torch.zeros_like(pre).scatter(1, indices, values) @ self.decoder + self.bias
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        aux = torch.zeros((), device=x.device)
        if dead.any():
            residual = (x - x_hat).detach()
            aux_values, aux_indices = torch.topk(
                pre.masked_fill(~dead, float("-inf")), min(self.k_aux, int(dead.sum())), dim=1
            )
            residual_hat = torch.zeros_like(pre).scatter(1, aux_indices, aux_values) @ self.decoder
            aux = (residual_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(
                2
            ).sum()
        codes = SparseCodes(indices, values.detach(), self.n_features)
        self._mark_fired(codes)
        return (
            loss + self.aux_weight * aux,
            codes,
            {"fvu": float(loss.detach()), "aux_loss": float(aux.detach())},
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _training_step_seconds(
    cls: type[TopKModule], args: argparse.Namespace, x: torch.Tensor, dead: torch.Tensor
) -> tuple[float, dict[str, float]]:
    module = cls(args.n_features, args.dim, k=args.k, seed=0).to(x.device)
    module.init_from_data(x[:1024])
    optimizer = torch.optim.Adam(
        module.parameters(),
        lr=TopKModule.lr_for(args.n_features),
        fused=True if args.fused_adam else None,
    )
    state = {"step": 0, "stats": {}}

    def step() -> None:
        # Keep the chosen features dead at every step so that AuxK runs in a steady state.
        module.tokens_since_fired[dead] = module.dead_window_tokens
        loss, _, state["stats"] = module.training_loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        module.before_optimizer_step()
        optimizer.step()
        module.after_optimizer_step(state["step"])
        state["step"] += 1

    seconds = _seconds_per_call(step, x.device, args.warmup, args.repeats)
    if args.profile and cls is TopKModule:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if x.device.type == "cuda" else []
        )
        with profile(activities=activities) as prof:
            step()
            _sync(x.device)
        sort = "cuda_time_total" if x.device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    return seconds, state["stats"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--n-features", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (d=128, M=1024, batch 512)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dead-fraction", type=float, default=0.0, help="fraction of features kept dead (AuxK on)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip-naive", action="store_true", help="skip the dense-autograd reference"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--fused-adam", action="store_true", help="Adam(fused=True) instead of the default"
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of one step"
    )
    args = parser.parse_args()
    if args.quick:
        args.dim, args.n_features, args.batch = 128, 1024, 512
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    n, d, m, k = args.batch, args.dim, args.n_features, args.k
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator)
    x = (x / x.norm(dim=1, keepdim=True)).to(device)  # pre-processed tokens are unit norm
    dead = torch.rand(m, generator=generator).to(device) < args.dead_fraction
    n_dead = int(dead.sum())
    k_aux = min(max(d // 2, 1), m)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={device} ({device_name}, "
        f"{torch.get_num_threads()} threads) torch={torch.__version__} tf32={args.tf32} "
        f"fused_adam={args.fused_adam}\n"
        f"batch={n} dim={d} n_features={m} k={k} dead={n_dead} (k_aux={k_aux})"
    )

    # Reference: torch.mm for the encoder's shape, (batch x dim) @ (dim x n_features).
    a, b = torch.randn(n, d, device=device), torch.randn(d, m, device=device)
    mm_seconds = _seconds_per_call(lambda: torch.mm(a, b), device, 3, 10)
    mm_gflops = 2 * n * d * m / mm_seconds / 1e9
    print(f"torch.mm {n}x{d} @ {d}x{m}: {mm_seconds * 1e3:.1f} ms, {mm_gflops:.0f} GFLOP/s")

    variants = [("sparse (TopKModule)", TopKModule), ("dense decode", DenseDecodeTopK)]
    if not args.skip_naive:
        variants.append(("dense autograd", NaiveDenseTopK))
    results = {}
    for name, cls in variants:
        seconds, stats = _training_step_seconds(cls, args, x, dead)
        results[name] = seconds
        print(
            f"{name:>20}: {seconds * 1e3:8.1f} ms/step  {n / seconds:12,.0f} tokens/s  "
            f"fvu={stats['fvu']:.3f}"
        )

    sparse = results["sparse (TopKModule)"]
    for name, seconds in results.items():
        if seconds is not sparse:
            print(
                f"speed-up of sparse over {name}: {seconds / sparse:.2f}x "
                "(target >= 2x over dense decode)"
            )

    # Arithmetic actually done by the sparse step: the dense encoder product, then O(n k d) work
    # for the decode, its backward (value and row gradients) and the encoder's sparse backward.
    slots = n * (k + (min(k_aux, n_dead) if n_dead else 0))
    actual_flops = 2 * n * d * m + 10 * slots * d
    # What a dense implementation must compute for the encoder: forward + two backward products.
    dense_equivalent_flops = 3 * 2 * n * d * m
    actual_rate = actual_flops / sparse / 1e9
    equivalent_rate = dense_equivalent_flops / sparse / 1e9
    print(
        f"step arithmetic: {actual_rate:.0f} GFLOP/s actually done = "
        f"{actual_rate / mm_gflops:.2f} of torch.mm "
        f"(target >= 0.5); encoder-matmul time share: {mm_seconds / sparse:.2f}\n"
        f"dense-equivalent rate (3 x 2ndM per step): {equivalent_rate:.0f} GFLOP/s = "
        f"{equivalent_rate / mm_gflops:.2f} of torch.mm"
    )


if __name__ == "__main__":
    main()
