"""The training loop: fit a dictionary on pre-processed tokens, on one device or under DDP.

Data flow per step: a batch of raw tokens (:mod:`~plate_concepts.dictionary.data`) -> device ->
control whitening on the device (:meth:`ControlWhitening.transform_torch`) ->
``model.training_loss`` -> backward -> (ranks average gradients,
:mod:`~plate_concepts.dictionary.distributed`) -> ``before_optimizer_step`` -> Adam ->
``after_optimizer_step``.

Checkpoints (:mod:`~plate_concepts.dictionary.checkpoints`) are written after at most
``checkpoint_minutes`` of training, every ``checkpoint_every`` steps if asked, and when the run
is cancelled; resuming from one gives the same dictionary as an uninterrupted run (bitwise on the
CPU). Most users fit through an estimator (:meth:`ICFL.fit_iter
<plate_concepts.dictionary.estimators.DictionaryEstimator.fit_iter>`), which calls this.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plate_concepts._device import resolve_device
from plate_concepts._progress import cancel_requested
from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.checkpoints import (
    check_same_data,
    check_same_stream,
    checkpoint_whitening,
    read_checkpoint,
    restore,
    save_checkpoint,
    trainable,
)
from plate_concepts.dictionary.controls import batch_values, fit_whitening, is_fitted
from plate_concepts.dictionary.data import BatchStream, make_source
from plate_concepts.dictionary.distributed import Distributed
from plate_concepts.dictionary.settings import FitSettings
from plate_concepts.dictionary.whitening import ControlWhitening

#: Dead features: not active in the last this-many training tokens (unless the model says).
DEFAULT_DEAD_WINDOW_TOKENS = 1_000_000

Cancel = Callable[[], bool] | Any  # a threading.Event (anything with is_set()) or a callable
Callback = Callable[["TrainingEvent"], None]
#: What the trainer reads: the training fields of any method's settings.
TrainingConfig = FitSettings


# ---------------------------------------------------------------------- what a fit reports
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


@dataclass(frozen=True)
class FitMessage:
    """Something the user should know about the fit, in one line (a capped size, a
    rank-deficient whitening, ...). ``category`` is the warning it is for Python users; None:
    information only (the whitening chosen), shown by the command line and the panel."""

    text: str
    category: type[Warning] | None = UserWarning


class FitDiverged(ValueError, FloatingPointError):
    """The training loss or the parameters became inf or NaN (a learning rate too high, or
    bad tokens)."""


def _diverged(model: Any, step: int, lr: float, what: str) -> FitDiverged:
    return FitDiverged(
        f"the fit diverged at step {step + 1} ({what}): the learning rate {lr:g} is too high "
        f"for these tokens; choose a smaller one (--lr), or leave it out for the method's "
        f"default ({model.default_lr():.3g})"
    )


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


# ---------------------------------------------------------------------- the loop
def iter_train(
    model: DictionaryModule,
    whitening: ControlWhitening,
    data: Any,
    config: FitSettings | None = None,
    *,
    is_control: Any = None,
    batches: Any = None,
    cancel: Cancel | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    keep_checkpoint: bool = False,
) -> Generator[TrainingEvent | FitMessage, None, TrainingResult]:
    """Train step by step, yielding a :class:`TrainingEvent` every ``log_every`` steps and at
    the end (and a :class:`FitMessage` when something needs saying); the generator's return
    value (``StopIteration.value``, napari's ``returned``) is the :class:`TrainingResult`.
    See :func:`train` for the arguments."""
    started = time.perf_counter()
    source = make_source(data)
    config = (config or FitSettings()).resolved(source.n_tokens)
    device = resolve_device(config.device)
    comm = Distributed(device)
    use_bf16 = config.autocast_bf16 and device.type == "cuda"
    if config.autocast_bf16 and not use_bf16:
        yield FitMessage(f"bf16 autocast needs CUDA; training in float32 on {device}", RuntimeWarning)

    checkpoint = read_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        check_same_data(Path(resume_from), checkpoint[1], source.description)  # type: ignore[arg-type]
        whitening = checkpoint_whitening(*checkpoint)
    elif not is_fitted(whitening):
        fit_whitening(whitening, data, is_control, batches, max_tokens=config.max_control_tokens,
                      seed=config.seed, cancel=cancel)
    if whitening.method == "pca-batch":
        raw = batch_values(data, batches)
        if raw is None:
            raise ValueError(
                "whitening per batch ('pca-batch') needs the batch of every token: pass batches= "
                "(labels, or a column of the store)"
            )
        source.batch_index = whitening.batch_indices(raw)
    if whitening.output_dim != model.dim:
        raise ValueError(
            f"the whitening outputs {whitening.output_dim} dimensions but the model has dim={model.dim}; "
            f"build the model with dim=whitening.output_dim"
        )

    batch_size = min(config.batch_size, source.n_tokens // comm.world)
    if batch_size < 1:
        raise ValueError(f"{source.n_tokens} tokens cannot be split over {comm.world} ranks")
    if batch_size < config.batch_size and comm.rank == 0:
        yield FitMessage(
            f"batch size {config.batch_size} exceeds the {source.n_tokens // comm.world} tokens per rank; "
            f"using {batch_size}", RuntimeWarning,
        )
    lr = config.lr if config.lr is not None else model.default_lr()
    warmup = config.warmup_steps if config.warmup_steps is not None else min(1000, config.steps // 20)
    tokens_per_step = batch_size * comm.world
    dead_window = getattr(model, "dead_window_tokens", None) or min(
        DEFAULT_DEAD_WINDOW_TOKENS, max(tokens_per_step, config.steps * tokens_per_step // 4)
    )

    model.to(device)
    model.train()
    parameters = trainable(model)
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
        check_same_stream(Path(resume_from), meta, config.seed, batch_size, comm.world)  # type: ignore[arg-type]
        restore(Path(resume_from), tensors, meta, model, optimizer, generator)  # type: ignore[arg-type]
        step, tokens_seen, elapsed_before = meta["step"], meta["tokens_seen"], meta["elapsed_s"]
        final_stats.update(meta.get("final", {}))
        epoch, consumed = meta["positions"][comm.rank]
    else:
        epoch, consumed = 0, 0
        with torch.no_grad():  # data-dependent init from the first batch of rank 0's stream
            first, first_index = next(BatchStream(source, config.seed, batch_size, comm.rank, comm.world))
            model.init_from_data(preprocess(first, first_index))
        comm.broadcast_module(model)
    stream = BatchStream(source, config.seed, batch_size, comm.rank, comm.world, epoch, consumed)

    checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
    checkpoint_interval = 60.0 * config.checkpoint_minutes
    last_checkpoint = time.perf_counter()

    def write_checkpoint() -> None:
        nonlocal last_checkpoint
        positions = comm.gather_positions(stream.position)  # collective: every rank calls it
        last_checkpoint = time.perf_counter()
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
            "config": _to_json(config),
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
        time_due = checkpoint_path is not None and checkpoint_interval > 0 and (
            time.perf_counter() - last_checkpoint >= checkpoint_interval
        )
        cancel_now, checkpoint_now = comm.any(cancel_requested(cancel), time_due)
        if cancel_now:
            cancelled = True
            break
        if checkpoint_now and step > 0:
            write_checkpoint()
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
            raise _diverged(model, step, lr, f"the training loss became {loss_value}")
        loss.backward()
        comm.average_gradients(parameters)
        if before is not None:
            comm.sync_fired(model.tokens_since_fired, before, len(x))
        model.before_optimizer_step()
        optimizer.step()
        step += 1
        try:
            model.after_optimizer_step(step, generator)
        except FloatingPointError as err:
            raise _diverged(model, step - 1, lr, str(err)) from None
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
    if cancelled or keep_checkpoint:
        write_checkpoint()
    model.eval()
    return TrainingResult(
        model=model, whitening=whitening, steps=step, total_steps=config.steps, tokens_seen=tokens_seen,
        cancelled=cancelled, wall_time_s=elapsed_before + time.perf_counter() - started, device=str(device),
        lr=lr, batch_size=batch_size, world_size=comm.world, seed=config.seed, events=events,
        checkpoint_path=checkpoint_path, **final_stats,  # type: ignore[arg-type]
    )


def train(
    model: DictionaryModule,
    whitening: ControlWhitening,
    data: Any,
    config: FitSettings | None = None,
    *,
    is_control: Any = None,
    batches: Any = None,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    keep_checkpoint: bool = False,
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
        The training fields of a :class:`~plate_concepts.dictionary.settings.FitSettings`
        (``TrainingConfig``); None sizes are chosen from the data's size.
    is_control
        Bool per token, or a control spec of a store (default ``obs['is_control']``); needed only
        to fit the whitening.
    batches
        Raw batch label per token (for a store also an obs column name); for ``"pca-batch"``.
    callback
        Called with each :class:`TrainingEvent` (messages are issued as warnings).
    cancel
        A ``threading.Event`` or a callable polled before every step; when it fires, training
        stops, a checkpoint is written (if ``checkpoint_path``) and the result has
        ``cancelled=True``.
    checkpoint_path
        Where checkpoints go (None: no checkpoints). A finished run writes a final one only with
        ``keep_checkpoint``.
    resume_from
        A checkpoint to continue from (same data, model hyper-parameters and number of ranks).
    """
    generator = iter_train(
        model, whitening, data, config, is_control=is_control, batches=batches, cancel=cancel,
        checkpoint_path=checkpoint_path, resume_from=resume_from, keep_checkpoint=keep_checkpoint,
    )
    return run_to_end(generator, callback)


def run_to_end(generator: Generator[Any, None, Any], callback: Callback | None = None) -> Any:
    """Drive a fit generator to its return value: events to ``callback``, messages as warnings."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if isinstance(event, FitMessage):
            if event.category is not None:
                warnings.warn(event.text, event.category, stacklevel=3)
        elif callback is not None:
            callback(event)


def _to_json(config: FitSettings) -> dict[str, Any]:
    return asdict(config)


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
