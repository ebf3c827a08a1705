"""Least-recently-used caches for the explorer: by item count, and by the memory of the arrays
they hold (pre-processed patch tokens, label images, crop pixels)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from plate_concepts.analysis.activations import CellOperator
from plate_concepts.dictionary.codes import SparseCodes


def nbytes(value: Any) -> int:
    """Memory held by a cached value: its arrays (and SparseCodes' tensors), summed."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, CellOperator):
        matrix = value.matrix
        return (
            value.ids.nbytes
            + value.area.nbytes
            + sum(a.nbytes for a in (matrix.data, matrix.indices, matrix.indptr))
        )
    if isinstance(value, SparseCodes):
        return sum(t.element_size() * t.nelement() for t in (value.indices, value.values))
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


class LRU:
    """A small thread-safe least-recently-used cache holding at most ``size`` items and, when
    ``max_bytes`` is given, at most that much array memory."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = max(0, int(size))
        self.max_bytes = None if max_bytes is None else max(0, int(max_bytes))
        self.nbytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def peek(self, key: Hashable) -> Any:
        """The cached value of ``key`` (marked as just used), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would stay within the memory budget."""
        return self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()  # outside the lock: a slow computation does not block other keys
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        with self._lock:
            if not self.size or (self.max_bytes is not None and size > self.max_bytes):
                return
            if key in self._items:
                self.nbytes -= nbytes(self._items.pop(key))
            self._items[key] = value
            self.nbytes += size
            while len(self._items) > self.size or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                self.nbytes -= nbytes(self._items.popitem(last=False)[1])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0
