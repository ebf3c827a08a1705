"""The one way the package runs tasks on ``dask.distributed`` (the activation pass, embedding):
which cluster, how many workers, which device a task uses, waiting for tasks with a cancel.

A run gets its cluster from :func:`dask_cluster`: the one at a scheduler address (a user's
cluster, whose workers must see the same paths) or a new ``LocalCluster`` sized to the machine
(one worker process per GPU, else per CPU core; one task at a time per worker, the worker's
torch threads sharing the cores). ``distributed`` is imported only here and only when used.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: How long a client tries to reach a user's scheduler before saying it cannot.
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class DaskCluster:
    """A connected client and what a run needs to know of its cluster."""

    client: Any  # distributed.Client
    n_workers: int
    #: Torch threads per task on a local cluster (its cores shared by the workers); None on a
    #: user's cluster, whose workers were sized by whoever started them.
    threads: int | None

    @property
    def is_local(self) -> bool:
        return self.threads is not None


def default_workers() -> int:
    """One worker per GPU, else one per CPU core."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


@contextmanager
def dask_cluster(workers: int | None, scheduler: str | None) -> Iterator[DaskCluster]:
    """A client of the cluster at ``scheduler`` or, without one, of a new ``LocalCluster`` of
    ``workers`` worker processes (default :func:`default_workers`), closed on exit.

    Raises
    ------
    ValueError
        A scheduler address that is malformed or cannot be reached (naming it), or a number of
        workers below 1.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler is None:
        n_workers = default_workers() if workers is None else int(workers)
        if n_workers < 1:
            raise ValueError(f"workers must be a positive number of Dask workers, got {workers!r}")
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        # Dask gives its workers MALLOC_TRIM_THRESHOLD_=65536, which also stops glibc from
        # reusing large freed blocks: every convolution buffer is then mapped afresh, and a
        # worker embedded 2-4x slower than this process (measured). Our tasks set their threads.
        try:
            with (
                dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
                warnings.catch_warnings(),
            ):
                # Another cluster (a second pass, the viewer's) holds port 8787: ours takes any.
                warnings.filterwarnings("ignore", message="Port 8787 is already in use")
                local = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None, silence_logs=logging.ERROR)  # fmt: skip
        except RuntimeError as error:
            # The usual cause from Python: each worker process imports the calling script again,
            # which, unguarded, starts a cluster of its own; Dask only says "Nanny failed to start".
            raise RuntimeError(
                f"could not start {n_workers} local Dask worker process(es) ({error}). From a Python "
                "script, run the code that starts a pass or an embedding on Dask under "
                "`if __name__ == \"__main__\":` (each worker process imports the script again)"
            ) from error
        with local, Client(local) as client:
            yield DaskCluster(client, n_workers, threads)
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"cannot reach the Dask scheduler at {scheduler!r} ({error}); give the address of a "
            "running scheduler (tcp://HOST:PORT), or leave out --scheduler to start a local cluster"
        ) from None
    try:
        yield DaskCluster(client, max(1, len(client.scheduler_info().get("workers", {}))), None)
    finally:
        client.close()


def task_device(requested: str) -> str:
    """The torch device of a task: ``requested``, or for "auto" on a Dask worker with GPUs one
    GPU per worker, by the worker's number (a local cluster names its workers 0, 1, ...)."""
    import torch

    from plate_concepts._device import resolve_device

    if requested != "auto":
        return str(resolve_device(requested))
    if torch.cuda.is_available():
        try:
            from distributed import get_worker

            name = get_worker().name
            index = int(name) if str(name).isdigit() else 0
        except ValueError:  # not on a worker
            index = 0
        return f"cuda:{index % torch.cuda.device_count()}"
    return str(resolve_device("auto"))


def finished_batches(pending: Any, cancel: Callable[[], bool]) -> Iterator[list[Any]]:
    """Batches of finished futures from ``pending`` (a ``distributed.as_completed``, to which
    the caller may add futures between batches), until none is left or ``cancel()`` is true:
    the caller then finds ``pending`` not empty, and cancels."""
    while not pending.is_empty():
        batch = pending.next_batch(block=False)
        if batch:
            yield batch
        elif cancel():
            return
        else:
            time.sleep(0.05)
