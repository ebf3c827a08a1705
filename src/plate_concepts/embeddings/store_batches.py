"""Streaming an embedding store's tokens in shuffled batches with bounded memory."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from plate_concepts.embeddings.store_files import naming_damaged_chunk, positive_int

if TYPE_CHECKING:
    from plate_concepts.embeddings.store import EmbeddingStore


def iter_batches(
    store: EmbeddingStore,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    buffer_chunks: int = 8,
    rows: np.ndarray | None = None,
    drop_last: bool = False,
    shard: tuple[int, int] = (0, 1),
    epochs: int | None = 1,
    return_index: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """See :meth:`EmbeddingStore.iter_batches`."""
    batch_size = positive_int(batch_size, "batch_size")
    buffer_chunks = positive_int(buffer_chunks, "buffer_chunks")
    rank, world_size = (int(s) for s in shard)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}"
        )
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
    selected = None if rows is None else np.unique(store._row_indices(rows))
    n_chunks = math.ceil(len(store) / store.chunk_rows)
    chunk_ids = np.arange(n_chunks) if selected is None else np.unique(selected // store.chunk_rows)
    if len(chunk_ids) == 0:
        raise ValueError(
            f"nothing to iterate in {store.path}: "
            + ("the store is empty" if selected is None else "rows selects no token")
        )
    if len(chunk_ids) < world_size:
        raise ValueError(
            f"only {len(chunk_ids)} chunk(s) hold the selected rows, fewer than the {world_size} shards; "
            "use a store with smaller chunk_rows or fewer ranks"
        )
    dim = store.dim

    def batches() -> Iterator[Any]:
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(chunk_ids) if shuffle else chunk_ids
            chunks = _stream_chunks(store, order[rank::world_size], selected)
            pool_x = np.empty((0, dim), dtype=np.float32)
            pool_i = np.empty(0, dtype=np.int64)
            while loaded := [chunk for _, chunk in zip(range(buffer_chunks), chunks, strict=False)]:
                pool_x = np.concatenate([pool_x] + [x for x, _ in loaded])
                pool_i = np.concatenate([pool_i] + [i for _, i in loaded])
                del loaded
                if shuffle:
                    perm = rng.permutation(len(pool_i))
                    pool_x, pool_i = pool_x[perm], pool_i[perm]
                n_full = len(pool_i) // batch_size * batch_size
                for start in range(0, n_full, batch_size):
                    x, i = pool_x[start : start + batch_size], pool_i[start : start + batch_size]
                    yield (x, i) if return_index else x
                # Copy the leftover so the pool just cut into batches can be freed.
                pool_x, pool_i = pool_x[n_full:].copy(), pool_i[n_full:].copy()
            if len(pool_i) and not drop_last:
                yield (pool_x, pool_i) if return_index else pool_x
            epoch += 1

    return batches()


def _stream_chunks(
    store: EmbeddingStore, chunk_ids: np.ndarray, selected: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 rows, row indices) of each chunk in turn, reading one chunk ahead in a thread."""
    array = store._array("tokens")
    n, chunk_rows = len(store), store.chunk_rows

    def load(chunk: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)
        store._require_chunks("tokens", start, start)
        with naming_damaged_chunk(store.path, "tokens", array, [chunk]):
            if selected is None:
                return np.asarray(array[start:stop], dtype=np.float32), np.arange(
                    start, stop, dtype=np.int64
                )
            lo, hi = np.searchsorted(selected, [start, stop])
            index = selected[lo:hi]
            block = array[index[0] : index[-1] + 1]
        return np.asarray(block[index - index[0]], dtype=np.float32), index

    if len(chunk_ids) == 0:
        return
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        pending = prefetch.submit(load, int(chunk_ids[0]))
        for k in range(len(chunk_ids)):
            result = pending.result()
            if k + 1 < len(chunk_ids):
                pending = prefetch.submit(load, int(chunk_ids[k + 1]))
            yield result
