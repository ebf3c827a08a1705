"""The streaming trainer: fit a dictionary on pre-processed tokens, on one device or under DDP.

Data flow per step: a batch of raw tokens (numpy, from an in-memory array or streamed from an
:class:`~plate_concepts.embeddings.store.EmbeddingStore`) -> device -> control whitening on the
device (:meth:`ControlWhitening.transform_torch`) -> ``model.training_loss`` -> backward ->
``before_optimizer_step`` -> Adam -> ``after_optimizer_step``.

Reproducibility and resuming: the batch stream is a pure function of ``(seed, epoch, rank,
world_size)`` — each epoch is shuffled with a seed derived from ``(seed, epoch)`` — so a stream
position is just ``(epoch, batches consumed in that epoch)``. A checkpoint stores that position,
the model's tensors and buffers (``tokens_since_fired`` included), Adam's state, the redraw
generator's state and the step; resuming re-creates the stream, skips the batches already
consumed and continues, giving the same dictionary as an uninterrupted run (bitwise on the CPU).

Distributed: when ``torch.distributed`` is initialised (e.g. under ``torchrun``) every rank
streams its own shard, gradients are averaged with one all-reduce per step (no DDP wrapper: the
models' encoders have no gradient path and the hooks are deterministic, so identical averaged
gradients keep the replicas identical), dead-feature counters are combined across ranks, and
rank 0 writes checkpoints and the output file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from plate_concepts._io import atomic_path
from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.whitening import ControlWhitening

if TYPE_CHECKING:
    from plate_concepts.plates.platemap import ControlSpec

#: ICFL's default Adam learning rate is ``ICFL_LR_TURN / sqrt(dim)``, at most ``ICFL_LR_MAX``.
#: Why: Adam moves every coordinate by about ``lr`` per step, so a unit-norm decoder row
#: (coordinates ~1/sqrt(dim)) turns by about ``lr * sqrt(dim)`` per step; 0.04 converges within a
#: few hundred steps and stays stable (rows are renormalised after every step). That is 1.25e-3
#: at d = 1024. The publication's 5e-5 is tuned for 300k steps over 40M tokens; at the thousands
#: of steps of an interactive fit the dictionary barely moves with it.
ICFL_LR_TURN = 0.04
ICFL_LR_MAX = 1e-2
#: Dead features: not active in the last this-many training tokens (unless configured).
DEFAULT_DEAD_WINDOW_TOKENS = 1_000_000
CHECKPOINT_KEY = "plate_concepts_checkpoint"
CHECKPOINT_FORMAT = "plate-concepts-checkpoint"
CHECKPOINT_VERSION = 1
#: Rows per read when collecting control tokens from a store to fit the whitening.
_CONTROL_READ_ROWS = 65536

Cancel = Callable[[], bool] | Any  # a threading.Event (anything with is_set()) or a callable
Callback = Callable[["TrainingEvent"], None]


# ---------------------------------------------------------------------- configuration and results
@dataclass
class TrainingConfig:
    """How to train.

    Parameters
    ----------
    steps
        Optimiser steps in total (a resumed run continues up to this number).
    batch_size
        Tokens per step and per rank (reduced to the tokens available when the data is smaller).
    lr
        Adam learning rate; None picks the method's default: ICFL ``0.04 / sqrt(dim)`` (at most
        1e-2; see :data:`ICFL_LR_TURN`), TopK
        Gao et al.'s ``TopKModule.lr_for(n_features)`` (2e-4 at 16k features, scaled by
        1/sqrt(M)).
    warmup_steps
        Linear learning-rate warm-up from ~0; None = 5% of the steps, at most 1000.
    seed
        Seeds the data order and the feature redraws (the model has its own ``seed``).
    device
        "auto" (CUDA, then Apple MPS, then CPU), or any torch device name.
    autocast_bf16
        Run the loss under bfloat16 autocast (CUDA only; ignored with a warning elsewhere).
    checkpoint_every, checkpoint_path
        Write a checkpoint every this many steps (0: only when cancelled and at the end) to this
        path (None: no checkpoints).
    dead_window_tokens
        Window for the dead-feature fraction; None = the model's own ``dead_window_tokens`` if
        it has one, else min(1M, a quarter of the training tokens).
    log_every
        Steps between progress events (one more is always sent at the end).
    max_control_tokens
        At most this many control tokens (a seeded random subset) fit the whitening, so fitting
        it on a huge store needs bounded memory (the fit holds ~20 bytes per value: 1 GB for
        50k tokens at d = 1024); 50k tokens, 30 per dimension at d = 1664, estimate the control
        covariance well.
    """

    steps: int = 2000
    batch_size: int = 4096
    lr: float | None = None
    warmup_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    autocast_bf16: bool = False
    checkpoint_every: int = 0
    checkpoint_path: str | os.PathLike | None = None
    dead_window_tokens: int | None = None
    log_every: int = 50
    max_control_tokens: int = 50_000

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("log_every", self.log_every, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("max_control_tokens", self.max_control_tokens, 2)
        _check_int("seed", self.seed, 0)
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, 0)
        if self.dead_window_tokens is not None:
            _check_int("dead_window_tokens", self.dead_window_tokens, 1)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive number or None, got {self.lr!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint_path"] = None if self.checkpoint_path is None else os.fspath(self.checkpoint_path)
        return out


@dataclass(frozen=True)
class TrainingEvent:
    """Progress: statistics averaged over the steps since the previous event (and ranks)."""

    step: int
    total_steps: int
    loss: float
    fvu: float
    cosine: float
    l0: float
    dead_fraction: float
    tokens_per_s: float
    elapsed_s: float


@dataclass
class TrainingResult:
    """What :func:`train` returns. ``model`` (on the training device, eval mode) is usable even
    when ``cancelled``; the statistics are those of the last progress window."""

    model: DictionaryModule
    whitening: ControlWhitening
    steps: int
    total_steps: int
    tokens_seen: int
    cancelled: bool
    loss: float | None
    fvu: float | None
    cosine: float | None
    l0: float | None
    dead_fraction: float | None
    wall_time_s: float
    device: str
    lr: float
    batch_size: int
    world_size: int
    seed: int
    events: list[TrainingEvent] = field(default_factory=list)
    checkpoint_path: Path | None = None

    def info(self) -> dict[str, Any]:
        """The ``training`` entry of a dictionary file's metadata."""
        return {
            "steps": self.steps,
            "total_steps": self.total_steps,
            "tokens_seen": self.tokens_seen,
            "cancelled": self.cancelled,
            "final": {
                "loss": self.loss,
                "fvu": self.fvu,
                "cosine": self.cosine,
                "l0": self.l0,
                "dead_fraction": self.dead_fraction,
            },
            "wall_time_s": self.wall_time_s,
            "device": self.device,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }


def default_lr(model: DictionaryModule) -> float:
    """The method's default Adam learning rate (see :class:`TrainingConfig`)."""
    if model.method == "topk":
        from plate_concepts.dictionary.topk import TopKModule

        return TopKModule.lr_for(model.n_features)
    return min(ICFL_LR_MAX, ICFL_LR_TURN / math.sqrt(model.dim))


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA (this process's ``LOCAL_RANK`` GPU under torchrun), else Apple MPS, else
    CPU; any other name is checked to be available."""
    if isinstance(name, torch.device):
        device = name
    elif str(name).lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(str(name).lower())
        except RuntimeError as err:
            raise ValueError(
                f"unknown device {name!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
            ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} requested but Apple MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


# ---------------------------------------------------------------------- data sources
def is_store(data: Any) -> bool:
    """Duck typing for an EmbeddingStore (anything with ``iter_batches`` and ``obs``)."""
    return hasattr(data, "iter_batches") and hasattr(data, "obs")


def _epoch_seed(seed: int, epoch: int) -> int:
    """Independent, reproducible shuffle seed of one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class _ArraySource:
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
            row = int(np.flatnonzero(~np.isfinite(np.asarray(_to_numpy(x))).all(axis=1))[0])
            raise ValueError(f"tokens row {row} holds NaN or inf values")
        self.x = x
        self.n_tokens, self.dim = int(x.shape[0]), int(x.shape[1])
        self.batch_index: np.ndarray | None = None  # per token, for "pca-batch"
        self.description = {"type": "array", "n_tokens": self.n_tokens, "dim": self.dim}

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, rank: int, world: int
    ) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | None]]:
        order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(self.n_tokens)
        # Equal shards on every rank (so ranks step together); full batches only.
        shard = order[rank::world][: self.n_tokens // world]
        for start in range(0, len(shard) - batch_size + 1, batch_size):
            rows = shard[start : start + batch_size]
            batch = _take_rows(self.x, rows)
            yield batch, (None if self.batch_index is None else self.batch_index[rows])


class _StoreSource:
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
            batch_size, shuffle=True, seed=_epoch_seed(seed, epoch), drop_last=True,
            shard=(rank, world), epochs=1, return_index=True,
        )
        for x, rows in batches:
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                row = int(rows[np.argmax(bad)])
                raise ValueError(f"embedding store {self.store.path}: token row {row} holds NaN or inf")
            yield x, (None if self.batch_index is None else self.batch_index[rows])


def _take_rows(x: np.ndarray | torch.Tensor, rows: np.ndarray) -> np.ndarray | torch.Tensor:
    """x[rows] for a numpy array or a torch tensor on any device."""
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows).to(x.device)]
    return x[rows]


def _make_source(data: Any) -> _ArraySource | _StoreSource:
    return _StoreSource(data) if is_store(data) else _ArraySource(data)


class _BatchStream:
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


# ---------------------------------------------------------------------- controls and whitening
def control_mask(data: Any, is_control: Any = None) -> np.ndarray:
    """Bool mask of control tokens: ``is_control`` given, or a store's ``obs['is_control']``."""
    n = len(data) if is_store(data) else int(data.shape[0])
    if is_control is None:
        if not is_store(data):
            raise ValueError(
                "is_control is required: one bool per token marking the unperturbed controls the "
                "whitening is fitted on (pass numpy.ones(n, bool) to use every token)"
            )
        obs = data.obs
        if "is_control" not in obs.columns:
            raise ValueError(
                f"embedding store {data.path} has no 'is_control' column in obs; pass is_control= "
                f"(a bool per token) or choose a control column (columns: {list(obs.columns)})"
            )
        is_control = obs["is_control"].to_numpy()
    if isinstance(is_control, torch.Tensor):
        is_control = is_control.detach().cpu().numpy()
    mask = np.asarray(is_control)
    if mask.shape != (n,):
        raise ValueError(f"is_control must have one flag per token, shape ({n},), got {mask.shape}")
    if mask.dtype != bool:
        if mask.dtype.kind not in "iuf" or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"is_control must be boolean (or 0/1), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(
            f"no control tokens: is_control selects 0 of {n} tokens; the whitening is fitted on controls"
        )
    return mask


def batch_labels(data: Any, batches: Any) -> np.ndarray | None:
    """Per-token batch labels: an array, or for a store the name of an obs column."""
    if batches is None:
        return None
    if isinstance(batches, str):
        if not is_store(data):
            raise ValueError(f"batches={batches!r} names an obs column, which needs an embedding store")
        obs = data.obs
        if batches not in obs.columns:
            raise ValueError(
                f"embedding store {data.path} has no obs column {batches!r} (columns: {list(obs.columns)})"
            )
        return obs[batches].astype(str).to_numpy()
    labels = np.asarray(batches.detach().cpu().numpy() if isinstance(batches, torch.Tensor) else batches)
    n = len(data) if is_store(data) else int(data.shape[0])
    if labels.shape != (n,):
        raise ValueError(f"batches must hold one label per token, shape ({n},), got {labels.shape}")
    return labels.astype(str)


def fit_whitening(
    whitening: ControlWhitening,
    data: Any,
    is_control: Any = None,
    batches: Any = None,
    *,
    max_tokens: int = 50_000,
    seed: int = 0,
) -> ControlWhitening:
    """Fit ``whitening`` on the control tokens of ``data`` (array or store).

    At most ``max_tokens`` controls are used (a seeded random subset); from a store they are
    read chunk by chunk, so memory stays bounded by ``max_tokens`` x dim.
    """
    mask = control_mask(data, is_control)
    labels = batch_labels(data, batches)
    rows = np.flatnonzero(mask)
    if len(rows) > max_tokens:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_tokens, replace=False))
    if is_store(data):
        controls = np.empty((len(rows), data.dim), dtype=np.float32)
        filled = 0
        order = np.empty(len(rows), dtype=np.int64)
        chunks = data.iter_batches(_CONTROL_READ_ROWS, shuffle=False, rows=rows, epochs=1, return_index=True)
        for x, index in chunks:
            controls[filled : filled + len(x)] = x
            order[filled : filled + len(x)] = index
            filled += len(x)
        rows = order[:filled]
        controls = controls[:filled]
    else:
        controls = _take_rows(data if isinstance(data, torch.Tensor) else np.asarray(data), rows)
    control_labels = None if labels is None else labels[rows]
    whitening.fit(controls, np.ones(len(rows), dtype=bool), control_labels)
    return whitening


def _is_fitted(whitening: ControlWhitening) -> bool:
    return hasattr(whitening, "whitening_")


# ---------------------------------------------------------------------- distributed helpers
class _Distributed:
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

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: str | os.PathLike,
    model: DictionaryModule,
    whitening: ControlWhitening,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
) -> Path:
    """Write a resumable training state (safetensors tensors + JSON header), atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors[f"model.{name}"] = tensor.detach().cpu().contiguous()
    for name, tensor in whitening.state_tensors().items():
        tensors[f"whitening.{name}"] = tensor.detach().cpu().contiguous()
    scalars: dict[str, Any] = {}
    for index, parameter in enumerate(_parameters(model)):
        for key, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    tensors["rng.generator"] = generator.get_state()
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "method": model.method,
        "hyperparameters": model.hyperparameters(),
        "whitening": whitening.metadata(),
        "optimizer_scalars": scalars,
        **state,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CHECKPOINT_KEY: json.dumps(header)})
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # SafetensorError for a truncated/foreign file
        raise ValueError(f"{path} is not a readable checkpoint (truncated or another format): {err}") from err
    if CHECKPOINT_KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not a plate-concepts training checkpoint")
    meta = json.loads(header[CHECKPOINT_KEY])
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: unsupported checkpoint format {meta.get('format')!r} "
            f"version {meta.get('format_version')!r}"
        )
    return tensors, meta


def _restore(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: DictionaryModule,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    if meta["method"] != model.method or meta["hyperparameters"] != model.hyperparameters():
        raise ValueError(
            f"checkpoint {path} is for a {meta['method']!r} model with {meta['hyperparameters']}, "
            f"not this {model.method!r} model with {model.hyperparameters()}"
        )
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("optimizer_scalars", {}).items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    state_dict = optimizer.state_dict()
    state_dict["state"] = optimizer_state
    optimizer.load_state_dict(state_dict)
    generator.set_state(tensors["rng.generator"])


# ---------------------------------------------------------------------- training
def _parameters(model: DictionaryModule) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _cancel_requested(cancel: Cancel | None) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set() if is_set is not None else cancel())


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def iter_train(
    model: DictionaryModule,
    whitening: ControlWhitening,
    data: Any,
    config: TrainingConfig | None = None,
    *,
    is_control: Any = None,
    batches: Any = None,
    cancel: Cancel | None = None,
    resume_from: str | os.PathLike | None = None,
) -> Generator[TrainingEvent, None, TrainingResult]:
    """Train step by step, yielding a :class:`TrainingEvent` every ``log_every`` steps and at
    the end; the generator's return value (``StopIteration.value``, napari's ``returned``) is
    the :class:`TrainingResult`. See :func:`train` for the arguments."""
    config = config or TrainingConfig()
    started = time.perf_counter()
    device = resolve_device(config.device)
    comm = _Distributed(device)
    source = _make_source(data)
    use_bf16 = config.autocast_bf16 and device.type == "cuda"
    if config.autocast_bf16 and not use_bf16:
        warnings.warn(f"autocast_bf16 needs CUDA; training in float32 on {device}", RuntimeWarning, stacklevel=2)

    checkpoint = read_checkpoint(resume_from) if resume_from is not None else None
    whitening = _prepared_whitening(whitening, data, source, config, is_control, batches, checkpoint)
    if whitening.output_dim != model.dim:
        raise ValueError(
            f"the whitening outputs {whitening.output_dim} dimensions but the model has dim={model.dim}; "
            f"build the model with dim=whitening.output_dim"
        )

    batch_size = min(config.batch_size, source.n_tokens // comm.world)
    if batch_size < 1:
        raise ValueError(f"{source.n_tokens} tokens cannot be split over {comm.world} ranks")
    if batch_size < config.batch_size and comm.rank == 0:
        warnings.warn(
            f"batch_size {config.batch_size} exceeds the {source.n_tokens // comm.world} tokens per rank; "
            f"using {batch_size}", RuntimeWarning, stacklevel=2,
        )
    lr = config.lr if config.lr is not None else default_lr(model)
    warmup = config.warmup_steps if config.warmup_steps is not None else min(1000, config.steps // 20)
    tokens_per_step = batch_size * comm.world
    dead_window = config.dead_window_tokens or getattr(model, "dead_window_tokens", None) or min(
        DEFAULT_DEAD_WINDOW_TOKENS, max(tokens_per_step, config.steps * tokens_per_step // 4)
    )

    model.to(device)
    model.train()
    parameters = _parameters(model)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(config.seed)  # feature redraws (same on all ranks)

    def preprocess(batch: Any, index: np.ndarray | None) -> torch.Tensor:
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        b = None if index is None else torch.from_numpy(index)
        return whitening.transform_torch(x.to(device, non_blocking=True), b)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    final_stats: dict[str, float | None] = dict.fromkeys(("loss", "fvu", "cosine", "l0", "dead_fraction"))
    if checkpoint is not None:
        tensors, meta = checkpoint
        _check_same_stream(Path(resume_from), meta, config.seed, batch_size, comm.world)  # type: ignore[arg-type]
        _restore(Path(resume_from), tensors, meta, model, optimizer, generator)  # type: ignore[arg-type]
        step, tokens_seen, elapsed_before = meta["step"], meta["tokens_seen"], meta["elapsed_s"]
        final_stats.update(meta.get("final", {}))
        epoch, consumed = meta["positions"][comm.rank]
    else:
        epoch, consumed = 0, 0
        with torch.no_grad():  # data-dependent init from the first batch of rank 0's stream
            first, first_index = next(_BatchStream(source, config.seed, batch_size, comm.rank, comm.world))
            model.init_from_data(preprocess(first, first_index))
        comm.broadcast_module(model)
    stream = _BatchStream(source, config.seed, batch_size, comm.rank, comm.world, epoch, consumed)

    checkpoint_path = None if config.checkpoint_path is None else Path(config.checkpoint_path)

    def write_checkpoint() -> None:
        positions = comm.gather_positions(stream.position)  # collective: every rank calls it
        if checkpoint_path is None or comm.rank != 0:
            return
        save_checkpoint(checkpoint_path, model, whitening, optimizer, generator, {
            "step": step,
            "total_steps": config.steps,
            "tokens_seen": tokens_seen,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "positions": positions,
            "world_size": comm.world,
            "batch_size": batch_size,
            "config": config.to_json(),
            "data": source.description,
            "final": final_stats,
        })

    events: list[TrainingEvent] = []
    window = np.zeros(4)  # running sums of loss, fvu, cosine, l0 since the last event
    window_steps = 0
    session_tokens = 0
    loop_started = time.perf_counter()

    def make_event() -> TrainingEvent:
        nonlocal window, window_steps
        sums = comm.mean_floats([*window.tolist(), float(window_steps)])
        count = max(sums[4], 1.0)
        dead = float(model.dead_mask(dead_window).float().mean())
        if window_steps:
            means = [value / count for value in sums[:4]]
            final_stats.update(loss=means[0], fvu=means[1], cosine=means[2], l0=means[3])
        final_stats["dead_fraction"] = dead
        now = time.perf_counter()
        event = TrainingEvent(
            step=step, total_steps=config.steps,
            loss=_nan_if_none(final_stats["loss"]), fvu=_nan_if_none(final_stats["fvu"]),
            cosine=_nan_if_none(final_stats["cosine"]), l0=_nan_if_none(final_stats["l0"]),
            dead_fraction=dead,
            tokens_per_s=session_tokens / max(now - loop_started, 1e-9),
            elapsed_s=elapsed_before + now - started,
        )
        window, window_steps = np.zeros(4), 0
        events.append(event)
        return event

    cancelled = False
    last_event_step = -1
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    while step < config.steps:
        if comm.any(_cancel_requested(cancel)):
            cancelled = True
            break
        batch, index = next(stream)
        x = preprocess(batch, index)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        before = model.tokens_since_fired.clone() if comm.active else None
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _codes, stats = model.training_loss(x)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss became {loss_value} at step {step + 1}; lower the learning rate "
                f"(lr={lr}) or check the tokens"
            )
        loss.backward()
        comm.average_gradients(parameters)
        if before is not None:
            comm.sync_fired(model.tokens_since_fired, before, len(x))
        model.before_optimizer_step()
        optimizer.step()
        step += 1
        model.after_optimizer_step(step, generator)
        _reset_redrawn(model, optimizer)
        tokens_seen += tokens_per_step
        session_tokens += tokens_per_step
        window += (loss_value, stats["fvu"], stats["cosine"], stats["l0"])
        window_steps += 1
        if step % config.log_every == 0 or step == config.steps:
            yield make_event()
            last_event_step = step
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            write_checkpoint()

    if last_event_step != step:
        yield make_event()
    write_checkpoint()
    model.eval()
    return TrainingResult(
        model=model, whitening=whitening, steps=step, total_steps=config.steps, tokens_seen=tokens_seen,
        cancelled=cancelled, wall_time_s=elapsed_before + time.perf_counter() - started, device=str(device),
        lr=lr, batch_size=batch_size, world_size=comm.world, seed=config.seed, events=events,
        checkpoint_path=checkpoint_path, **final_stats,  # type: ignore[arg-type]
    )


def _prepared_whitening(
    whitening: ControlWhitening,
    data: Any,
    source: _ArraySource | _StoreSource,
    config: TrainingConfig,
    is_control: Any,
    batches: Any,
    checkpoint: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
) -> ControlWhitening:
    """The checkpoint's whitening when resuming, else ``whitening`` (fitted on the controls if
    needed); for "pca-batch", also each token's batch row in ``source.batch_index``."""
    if checkpoint is not None:
        tensors, meta = checkpoint
        for key in ("n_tokens", "dim"):
            if meta["data"][key] != source.description[key]:
                raise ValueError(
                    f"the checkpoint was made on data with {key}={meta['data'][key]}, "
                    f"this data has {source.description[key]}"
                )
        prefix = "whitening."
        whitening = ControlWhitening.from_state(
            {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["whitening"]
        )
    elif not _is_fitted(whitening):
        fit_whitening(whitening, data, is_control, batches, max_tokens=config.max_control_tokens, seed=config.seed)
    if whitening.method == "pca-batch":
        labels = batch_labels(data, batches)
        if labels is None:
            raise ValueError("whitening method 'pca-batch' needs batches= (labels, or an obs column of the store)")
        source.batch_index = whitening.batch_indices(labels)
    return whitening


def _check_same_stream(path: Path, meta: dict[str, Any], seed: int, batch_size: int, world: int) -> None:
    """A resumed run must re-create the checkpoint's batch stream: same seed, batch, ranks."""
    then = {"seed": meta["config"]["seed"], "batch_size": meta["batch_size"], "ranks": len(meta["positions"])}
    now = {"seed": seed, "batch_size": batch_size, "ranks": world}
    if then != now:
        raise ValueError(
            f"checkpoint {path} was written with {then}; resume it with the same settings "
            f"(this run has {now}) to continue the same data stream"
        )


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


@torch.no_grad()
def _reset_redrawn(model: DictionaryModule, optimizer: torch.optim.Optimizer) -> None:
    """Zero Adam's moments of redrawn features (ICFL's ``last_resampled``): a new direction must
    not inherit the momentum of the one it replaces."""
    redrawn = getattr(model, "last_resampled", None)
    if redrawn is None or len(redrawn) == 0:
        return
    state = optimizer.state.get(model.decoder, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][redrawn.to(state[key].device)] = 0


def train(
    model: DictionaryModule,
    whitening: ControlWhitening,
    data: Any,
    config: TrainingConfig | None = None,
    *,
    is_control: Any = None,
    batches: Any = None,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainingResult:
    """Fit ``model`` on ``data`` and return a :class:`TrainingResult`.

    Parameters
    ----------
    model
        A fresh :class:`DictionaryModule` whose ``dim`` is ``whitening.output_dim``.
    whitening
        The pre-processing; fitted here on the control tokens if it is not fitted yet.
    data
        Raw tokens: an (n, dim) numpy array / torch tensor, or an EmbeddingStore (streamed).
    config
        :class:`TrainingConfig` (defaults if None).
    is_control
        Bool per token (for a store, default ``obs['is_control']``); needed only to fit the
        whitening.
    batches
        Batch label per token (for a store also an obs column name); for ``"pca-batch"``.
    callback
        Called with each :class:`TrainingEvent`.
    cancel
        A ``threading.Event`` or a callable polled before every step; when it fires, training
        stops, a checkpoint is written (if configured) and the result has ``cancelled=True``.
    resume_from
        A checkpoint to continue from (same data, model hyper-parameters and number of ranks).
    """
    generator = iter_train(
        model, whitening, data, config, is_control=is_control, batches=batches,
        cancel=cancel, resume_from=resume_from,
    )
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)


# ---------------------------------------------------------------------- the one-call pipeline
def build_model(method: str, n_features: int, dim: int, **options: Any) -> DictionaryModule:
    """A fresh model of ``method`` ("icfl" or "topk"); ``options`` are its hyper-parameters
    (None values are left at the class defaults)."""
    from plate_concepts.dictionary.io import dictionary_classes

    classes = dictionary_classes()
    if method not in classes:
        raise ValueError(f"unknown dictionary method {method!r}; expected one of {sorted(classes)}")
    options = {key: value for key, value in options.items() if value is not None}
    try:
        return classes[method](n_features, dim, **options)
    except TypeError as err:
        raise ValueError(f"invalid options {sorted(options)} for method {method!r}: {err}") from err


def store_control_mask(store: Any, control: str | ControlSpec) -> np.ndarray:
    """Controls from a spec: an obs column of booleans (``"is_control"``), ``"column=value"``
    or ``"column=value1,value2"`` (a :class:`~plate_concepts.plates.platemap.ControlSpec`:
    values compared as text, so 1, 1.0 and "1" match), or ``"all"`` (every token)."""
    from plate_concepts.plates.platemap import ControlSpec, control_mask as spec_mask

    obs = store.obs
    if isinstance(control, str) and control == "all":
        return np.ones(len(store), dtype=bool)
    if isinstance(control, ControlSpec) or "=" in control:
        spec = control if isinstance(control, ControlSpec) else ControlSpec.parse(control)
        try:
            return spec_mask(obs, spec)
        except ValueError as err:
            raise ValueError(f"control spec {str(spec)!r} on store {store.path}: {err}") from err
    if control not in obs.columns:
        raise ValueError(
            f"control spec {control!r}: store {store.path} has no obs column {control!r}; use a "
            f"boolean column, 'column=value' or 'all' (columns: {list(obs.columns)})"
        )
    return control_mask(store, obs[control].to_numpy())


def fit_dictionary(
    store_path: str | os.PathLike,
    out_path: str | os.PathLike,
    method: str = "icfl",
    *,
    control: str | ControlSpec = "is_control",
    whiten: str = "pca",
    batch_column: str | None = None,
    eps: float = 1e-6,
    shrinkage: float | str | None = None,
    n_features: int = 8192,
    k: int | None = None,
    n_rounds: int | None = None,
    per_round: int | None = None,
    steps: int = 2000,
    batch_size: int = 4096,
    lr: float | None = None,
    warmup_steps: int | None = None,
    device: str = "auto",
    seed: int = 0,
    autocast_bf16: bool = False,
    log_every: int = 50,
    checkpoint_every: int = 500,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    progress: Callback | None = None,
    cancel: Cancel | None = None,
) -> TrainingResult:
    """Fit a dictionary on an embedding store and write it to ``out_path`` (``.safetensors``).

    The single entry point of the command line. Works as is under ``torchrun``: when the
    ``WORLD_SIZE``/``RANK`` variables are set and no process group exists, one is created (NCCL
    on CUDA, else gloo); each rank streams its shard and rank 0 writes the checkpoint and the
    output. ``control`` is a spec for :func:`store_control_mask`; ``k`` is TopK's and
    ``n_rounds``/``per_round`` ICFL's (None = the model's default). Checkpoints go to
    ``checkpoint_path`` (default ``<out>.ckpt.safetensors``) every ``checkpoint_every`` steps;
    ``resume=True`` continues from it (or from the checkpoint path given as ``resume``).
    ``progress`` gets the :class:`TrainingEvent` stream (on rank 0 only).
    """
    from plate_concepts.dictionary.io import save_dictionary
    from plate_concepts.embeddings.store import EmbeddingStore

    out_path = Path(out_path)
    resolved = resolve_device(device)
    created_group = _init_distributed_from_env(resolved)
    try:
        store = EmbeddingStore.open(store_path)
        if method == "icfl" and k is not None:
            raise ValueError("k is a TopK option; ICFL's sparsity is n_rounds x per_round")
        if method == "topk" and (n_rounds is not None or per_round is not None):
            raise ValueError("n_rounds/per_round are ICFL options; TopK's sparsity is k")
        is_control = store_control_mask(store, control)
        whitening = ControlWhitening(method=whiten, eps=eps, shrinkage=shrinkage)
        config = TrainingConfig(
            steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed,
            device=str(resolved), autocast_bf16=autocast_bf16, log_every=log_every,
            checkpoint_every=checkpoint_every,
            checkpoint_path=checkpoint_path or default_checkpoint_path(out_path),
        )
        resume_from: Path | None = None
        if resume:
            resume_from = Path(config.checkpoint_path if resume is True else resume)  # type: ignore[arg-type]
            if not resume_from.is_file():
                raise FileNotFoundError(f"cannot resume: checkpoint {resume_from} does not exist")
            _, meta = read_checkpoint(resume_from)
            dim = meta["hyperparameters"]["dim"]
        else:
            fit_whitening(
                whitening, store, is_control, batch_column, max_tokens=config.max_control_tokens, seed=seed
            )
            dim = whitening.output_dim
        options: dict[str, Any] = {"seed": seed}
        options.update({"k": k} if method == "topk" else {"n_rounds": n_rounds, "per_round": per_round})
        model = build_model(method, n_features, dim, **options)
        is_rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        result = train(
            model, whitening, store, config, is_control=is_control, batches=batch_column,
            callback=progress if is_rank0 else None, cancel=cancel, resume_from=resume_from,
        )
        if is_rank0:
            save_dictionary(out_path, result.model, result.whitening, {
                "training": result.info(),
                "store": {"path": os.fspath(Path(store.path).resolve()), "n_tokens": len(store), "dim": store.dim},
                "control": {"spec": str(control), "n_controls": int(is_control.sum()), "batch_column": batch_column},
            })
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return result
    finally:
        if created_group:
            dist.destroy_process_group()


def default_checkpoint_path(out_path: str | os.PathLike) -> Path:
    """``dict.safetensors`` -> ``dict.ckpt.safetensors`` beside it."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".safetensors") + ".ckpt.safetensors")


def _init_distributed_from_env(device: torch.device) -> bool:
    """Start a process group when launched by torchrun (WORLD_SIZE > 1) and none exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
