"""Data-parallel training without a DDP wrapper: the few collectives the trainer needs.

When ``torch.distributed`` is initialised (e.g. under ``torchrun``) every rank streams its own
shard, gradients are averaged with one all-reduce per step (the models' encoders have no
gradient path and the hooks are deterministic, so identical averaged gradients keep the replicas
identical), dead-feature counters are combined across ranks, and rank 0 writes checkpoints and
the output file. In a single process every collective is a no-op.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Start a process group when launched by torchrun (WORLD_SIZE > 1) and none exists;
    True if this call created it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Distributed:
    """Collectives used by the trainer; all no-ops in a single process."""

    def __init__(self, device: torch.device) -> None:
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if active else 0
        self.world = dist.get_world_size() if active else 1
        nccl = active and dist.get_backend() == "nccl"
        self.device = device if nccl else torch.device("cpu")  # where small control tensors live

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast_module(self, module: torch.nn.Module) -> None:
        if self.active:
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                _inplace_collective(tensor.data, lambda t: dist.broadcast(t, src=0), self.device)

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Average gradients over ranks with one flat all-reduce (a missing grad counts as 0)."""
        if not self.active:
            return
        has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=self.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        for p, flag in zip(parameters, has_grad.tolist(), strict=True):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        with_grad = [p for p in parameters if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
        _inplace_collective(flat, lambda t: dist.all_reduce(t), self.device)
        flat /= self.world
        for p, part in zip(with_grad, flat.split([p.numel() for p in with_grad]), strict=True):
            p.grad.copy_(part.view_as(p.grad))

    def sync_fired(self, counter: torch.Tensor, before: torch.Tensor, n_local: int) -> None:
        """Make ``tokens_since_fired`` global: 0 where a feature fired on any rank this step,
        else the previous count plus all ranks' tokens."""
        if not self.active:
            return
        fired = (counter < before + n_local).to(torch.int32)
        _inplace_collective(fired, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX), self.device)
        total = self.sum_int(n_local)
        counter.copy_(torch.where(fired.bool(), torch.zeros_like(counter), before + total))

    def sum_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def any(self, *flags: bool) -> list[bool]:
        """Each flag or-ed over the ranks (one all-reduce for all of them)."""
        if not self.active:
            return list(flags)
        t = torch.tensor([int(flag) for flag in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mean_floats(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather_positions(self, position: tuple[int, int]) -> list[list[int]]:
        if not self.active:
            return [list(position)]
        mine = torch.tensor(position, dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return [t.tolist() for t in every]


def _inplace_collective(tensor: torch.Tensor, op: Callable[[torch.Tensor], Any], device: torch.device) -> None:
    """Run a collective on ``tensor`` in place, staging it on the backend's device if needed."""
    if tensor.device == device:
        op(tensor)
    else:
        staged = tensor.to(device)
        op(staged)
        tensor.copy_(staged)
