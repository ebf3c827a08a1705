"""Where training tokens come from: an in-memory array or an embedding store, as a reproducible,
resumable stream of batches.

The batch stream is a pure function of ``(seed, epoch, rank, world_size)``: each epoch is
shuffled with a seed derived from ``(seed, epoch)``, so a stream position is just ``(epoch,
batches consumed in that epoch)`` and a resumed run re-creates it exactly.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def is_store(data: Any) -> bool:
    """Duck typing for an EmbeddingStore (anything with ``iter_batches`` and ``obs``)."""
    return hasattr(data, "iter_batches") and hasattr(data, "obs")


def n_tokens_of(data: Any) -> int:
    """Number of tokens of a store or an (n, dim) array."""
    return len(data) if is_store(data) else int(data.shape[0])


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent, reproducible shuffle seed of one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def take_rows(x: np.ndarray | torch.Tensor, rows: np.ndarray) -> np.ndarray | torch.Tensor:
    """x[rows] for a numpy array or a torch tensor on any device."""
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows).to(x.device)]
    return x[rows]


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ArraySource:
    """Raw tokens held in memory (numpy array or torch tensor, possibly on the GPU)."""

    def __init__(self, x: np.ndarray | torch.Tensor) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if not x.is_floating_point():
                x = x.float()
            finite = bool(torch.isfinite(x).all()) if x.numel() else True
        else:
            x = np.asarray(x)
            if x.dtype.kind not in "fiu":
                raise ValueError(f"tokens must be numeric, got dtype {x.dtype}")
            if x.dtype.kind != "f":  # floats stay as given: batches become float32 on the device
                x = x.astype(np.float32)
            finite = bool(np.isfinite(x).all())
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"tokens must be a non-empty 2-D array (n_tokens, dim), got shape {tuple(x.shape)}")
        if not finite:
            row = int(np.flatnonzero(~np.isfinite(to_numpy(x)).all(axis=1))[0])
            raise ValueError(f"tokens row {row} holds NaN or inf values")
        self.x = x
        self.n_tokens, self.dim = int(x.shape[0]), int(x.shape[1])
        self.batch_index: np.ndarray | None = None  # per token, for "pca-batch"
        self.description = {"type": "array", "n_tokens": self.n_tokens, "dim": self.dim}

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, rank: int, world: int
    ) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | None]]:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(self.n_tokens)
        # Equal shards on every rank (so ranks step together); full batches only.
        shard = order[rank::world][: self.n_tokens // world]
        for start in range(0, len(shard) - batch_size + 1, batch_size):
            rows = shard[start : start + batch_size]
            batch = take_rows(self.x, rows)
            yield batch, (None if self.batch_index is None else self.batch_index[rows])


class StoreSource:
    """Raw tokens streamed from an embedding store with bounded memory."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.n_tokens, self.dim = len(store), int(store.dim)
        if self.n_tokens == 0:
            raise ValueError(f"embedding store {store.path} holds no tokens")
        self.batch_index: np.ndarray | None = None
        self.description = {
            "type": "store", "path": os.fspath(store.path), "n_tokens": self.n_tokens, "dim": self.dim,
        }

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, rank: int, world: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        batches = self.store.iter_batches(
            batch_size, shuffle=True, seed=epoch_seed(seed, epoch), drop_last=True,
            shard=(rank, world), epochs=1, return_index=True,
        )
        for x, rows in batches:
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                row = int(rows[np.argmax(bad)])
                raise ValueError(f"embedding store {self.store.path}: token row {row} holds NaN or inf")
            yield x, (None if self.batch_index is None else self.batch_index[rows])


def make_source(data: Any) -> ArraySource | StoreSource:
    return StoreSource(data) if is_store(data) else ArraySource(data)


class BatchStream:
    """Endless stream of (raw batch, batch index) whose position is (epoch, batches consumed)."""

    def __init__(self, source: Any, seed: int, batch_size: int, rank: int, world: int,
                 epoch: int = 0, batch: int = 0) -> None:
        self.source, self.seed, self.batch_size, self.rank, self.world = source, seed, batch_size, rank, world
        self.epoch, self.batch = epoch, batch
        self._iterator: Iterator[Any] | None = None

    def __next__(self) -> tuple[Any, np.ndarray | None]:
        while True:
            if self._iterator is None:
                batches = self.source.epoch_batches(self.seed, self.epoch, self.batch_size, self.rank, self.world)
                self._iterator = itertools.islice(batches, self.batch, None)  # skip consumed batches
            item = next(self._iterator, None)
            if item is not None:
                self.batch += 1
                return item
            if self.batch == 0:
                raise ValueError(
                    f"the data gives no full batch of {self.batch_size} tokens on rank {self.rank} of "
                    f"{self.world} ({self.source.n_tokens} tokens in all); lower batch_size"
                )
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.batch
