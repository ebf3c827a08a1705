"""Training checkpoints: a resumable state in one safetensors file, and where it lives.

A checkpoint stores the model's tensors and buffers (``tokens_since_fired`` included), the
whitening, Adam's state, the redraw generator's state, the step and every rank's stream position;
resuming from it gives the same dictionary as an uninterrupted run (bitwise on the CPU).

Where (one rule for every fit): beside the output file, ``dict.safetensors`` ->
``dict.ckpt.safetensors``; a fit without an output file (the Dictionary panel) keeps it in the
temporary folder, named after the store and the method. A cancelled fit's partial dictionary,
when asked for, goes beside the output too: ``dict.partial.safetensors``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from plate_concepts.dictionary.io import write_safetensors
from plate_concepts.dictionary.whitening import ControlWhitening

if TYPE_CHECKING:
    from plate_concepts.dictionary.base import DictionaryModule

CHECKPOINT_KEY = "plate_concepts_checkpoint"
CHECKPOINT_FORMAT = "plate-concepts-checkpoint"
CHECKPOINT_VERSION = 1
_SUFFIX = ".safetensors"


def default_checkpoint_path(
    out_path: str | os.PathLike | None = None,
    *,
    store_path: str | os.PathLike | None = None,
    method: str | None = None,
) -> Path:
    """Where a fit keeps its checkpoint: beside ``out_path``, or (no output file) in the
    temporary folder under the store's name and the method, never next to the user's data."""
    if out_path is not None:
        return _beside(Path(out_path), ".ckpt")
    if store_path is None or method is None:
        raise ValueError("a checkpoint path needs the output file, or the store and the method")
    folder = Path(tempfile.gettempdir()) / "plate-concepts"
    return folder / f"{Path(store_path).name}-{method}.ckpt{_SUFFIX}"


def partial_path(out_path: str | os.PathLike) -> Path:
    """Where a cancelled fit writes its partial dictionary (when asked): beside the output."""
    return _beside(Path(out_path), ".partial")


def _beside(out_path: Path, tag: str) -> Path:
    return out_path.with_name(out_path.name.removesuffix(_SUFFIX) + tag + _SUFFIX)


def save_checkpoint(
    path: str | os.PathLike,
    model: DictionaryModule,
    whitening: ControlWhitening,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
) -> Path:
    """Write a resumable training state (safetensors tensors + JSON header), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors[f"model.{name}"] = tensor.detach().cpu().contiguous()
    for name, tensor in whitening.state_tensors().items():
        tensors[f"whitening.{name}"] = tensor.detach().cpu().contiguous()
    scalars: dict[str, Any] = {}
    for index, parameter in enumerate(trainable(model)):
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
    return write_safetensors(tensors, path, {CHECKPOINT_KEY: json.dumps(header)})


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file")
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


def checkpoint_whitening(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ControlWhitening:
    """The fitted whitening a checkpoint holds."""
    prefix = "whitening."
    return ControlWhitening.from_state(
        {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["whitening"]
    )


def check_same_data(path: Path, meta: dict[str, Any], description: dict[str, Any]) -> None:
    """A checkpoint resumes only on the data it was made on (same number of tokens and dim)."""
    for key in ("n_tokens", "dim"):
        if meta["data"][key] != description[key]:
            raise ValueError(
                f"the checkpoint {path} was made on data with {key}={meta['data'][key]}, "
                f"this data has {description[key]}"
            )


def check_same_stream(path: Path, meta: dict[str, Any], seed: int, batch_size: int, world: int) -> None:
    """A resumed run must re-create the checkpoint's batch stream: same seed, batch, ranks."""
    then = {"seed": meta["config"]["seed"], "batch_size": meta["batch_size"], "ranks": len(meta["positions"])}
    now = {"seed": seed, "batch_size": batch_size, "ranks": world}
    if then != now:
        raise ValueError(
            f"checkpoint {path} was written with {then}; resume it with the same settings "
            f"(this run has {now}) to continue the same data stream"
        )


def restore(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: DictionaryModule,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Load a checkpoint's model, optimiser and generator state into fresh ones."""
    then, now = meta["hyperparameters"], model.hyperparameters()
    if meta["method"] != model.method or then != now:
        differing = [f"{k} {then.get(k)} there, {now.get(k)} now" for k in sorted({*then, *now})
                     if then.get(k) != now.get(k)]  # only what differs: the rest says nothing
        raise ValueError(
            f"checkpoint {path} is for a {meta['method']!r} model, not this {model.method!r} model"
            if meta["method"] != model.method
            else f"checkpoint {path} is of a fit with other settings ({'; '.join(differing)}): "
            "resume it with its settings, or start over without resuming (--overwrite)"
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


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters Adam updates, in a fixed order (the checkpoint's optimiser indices)."""
    return [p for p in model.parameters() if p.requires_grad]
