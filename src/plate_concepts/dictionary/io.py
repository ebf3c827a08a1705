"""Dictionary files: one ``.safetensors`` file per dictionary, loaded without unpickling.

The file holds the model's tensors (``decoder``, ``bias``; TopK also ``encoder``,
``encoder_bias``) and the pre-processing (``control_mean``, ``whitening``, optionally
``batch_mean``, ``batch_scale``), all float32 and contiguous. Everything else — method,
hyper-parameters, whitening metadata, training statistics, the store it was fitted on, the
control spec, the package version — is one JSON document stored under the key
``plate_concepts`` of the safetensors header metadata (which only holds strings).

A hyper-parameter added later is filled in, for a file that predates it, with the value the file
was fitted with (``legacy_hyperparameters`` of the model class): an ICFL file without an
``offset`` loads with the learned bias it was fitted with.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import plate_concepts
from plate_concepts._io import atomic_path
from plate_concepts.dictionary.base import DictionaryModule

if TYPE_CHECKING:
    from plate_concepts.dictionary.whitening import ControlWhitening

METADATA_KEY = "plate_concepts"
FORMAT_NAME = "plate-concepts-dictionary"
FORMAT_VERSION = 1
# Keys of the metadata written by save_dictionary itself; ``info`` may not override them.
_RESERVED_KEYS = frozenset(
    {"format", "format_version", "package_version", "method", "n_features", "dim", "input_dim",
     "hyperparameters", "whitening", "tensors", "saved_at"}
)


def dictionary_classes() -> dict[str, type[DictionaryModule]]:
    """Method name -> model class, from the method registry (imported lazily so this module
    loads without the models)."""
    from plate_concepts.dictionary.estimators import METHODS

    return {name: estimator.module_class for name, estimator in METHODS.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temporary sibling, then rename), with the permissions
    of any other output under the user's umask (safetensors itself creates files as 0600)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.touch()  # created like every other file the user's process writes
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
    return path


def save_dictionary(
    path: str | os.PathLike,
    model: DictionaryModule,
    whitening: ControlWhitening,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its pre-processing ``whitening`` to one ``.safetensors`` file.

    ``info`` adds JSON-serialisable entries to the metadata, e.g. ``training`` (steps, tokens
    seen, final fvu/cosine/l0/dead fraction, wall time, device), ``store`` (path, n_tokens) and
    ``control`` (how control tokens were chosen). The file is written to a temporary sibling and
    renamed into place, so a crash never leaves a half-written dictionary.
    """
    path = Path(path)
    info = dict(info or {})
    clash = _RESERVED_KEYS.intersection(info)
    if clash:
        raise ValueError(f"info may not set the reserved metadata keys {sorted(clash)}")

    tensors: dict[str, torch.Tensor] = {}
    for source, named in (("model", model.state_tensors()), ("whitening", whitening.state_tensors())):
        for name, tensor in named.items():
            if name in tensors:
                raise ValueError(f"tensor name {name!r} of the {source} is already used by the model")
            tensors[name] = _as_float32(tensor)

    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": plate_concepts.__version__,
        "method": model.method,
        "n_features": model.n_features,
        "dim": model.dim,
        "input_dim": _input_dim(whitening, tensors),
        "hyperparameters": model.hyperparameters(),
        "whitening": whitening.metadata(),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
    }
    return write_safetensors(tensors, path, {METADATA_KEY: json.dumps(metadata, default=_json_default)})


def read_dictionary_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a dictionary file, without reading its tensors."""
    path = Path(path)
    with _open(path) as handle:
        return _parse_metadata(path, handle.metadata())


def load_dictionary(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[DictionaryModule, ControlWhitening, dict[str, Any]]:
    """Read a dictionary file: ``(model, whitening, metadata)``; the model is in eval mode on
    ``device``. Never unpickles: tensors come from safetensors, everything else from JSON."""
    from plate_concepts.dictionary.whitening import ControlWhitening

    path = Path(path)
    with _open(path) as handle:
        metadata = _parse_metadata(path, handle.metadata())
        try:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error type for damaged data
            raise ValueError(f"{path}: could not read the tensors (file damaged?): {err}") from err

    method = metadata.get("method")
    classes = dictionary_classes()
    if method not in classes:
        raise ValueError(f"{path}: unknown dictionary method {method!r}; known: {sorted(classes)}")
    hyperparameters = metadata.get("hyperparameters")
    if not isinstance(hyperparameters, dict):
        raise ValueError(f"{path}: the metadata has no 'hyperparameters' object")
    # A file that predates a hyper-parameter gets the value it was fitted with, not today's default.
    hyperparameters = {**classes[method].legacy_hyperparameters, **hyperparameters}
    try:
        model = classes[method](**hyperparameters)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot build a {method!r} model from {hyperparameters}: {err}") from err

    expected = {name: tuple(t.shape) for name, t in model.state_tensors().items()}
    _check_tensors(path, f"{method} model", expected, tensors)
    _missing_keys, unexpected = model.load_state_dict(
        {name: tensors[name] for name in expected}, strict=False
    )
    if unexpected:  # state_tensors() names must be state_dict() names
        raise RuntimeError(f"{type(model).__name__}.state_tensors() names {unexpected} are not in its state_dict")

    whitening_metadata = metadata.get("whitening")
    if not isinstance(whitening_metadata, dict):
        raise ValueError(f"{path}: the metadata has no 'whitening' object")
    whitening_tensors = {name: t for name, t in tensors.items() if name not in expected}
    try:
        whitening = ControlWhitening.from_state(whitening_tensors, whitening_metadata)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid pre-processing (whitening) data: {err}") from err
    if whitening.output_dim != model.dim:
        raise ValueError(
            f"{path}: the whitening outputs {whitening.output_dim} dimensions but the "
            f"{method} model expects {model.dim}"
        )
    model.eval()
    return model.to(device), whitening, metadata


def _open(path: Path):  # no return type: safetensors' handle type is private
    if not path.exists():
        raise FileNotFoundError(f"dictionary file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a dictionary file; give the .safetensors file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError / OSError for a truncated or foreign file
        raise ValueError(
            f"{path} is not a readable safetensors dictionary file (truncated, damaged or another "
            f"format): {err}"
        ) from err


def _parse_metadata(path: Path, header: dict[str, str] | None) -> dict[str, Any]:
    if not header or METADATA_KEY not in header:
        raise ValueError(
            f"{path} is a safetensors file but not a plate-concepts dictionary "
            f"(no {METADATA_KEY!r} entry in its metadata)"
        )
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON: {err}") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: the metadata does not describe a {FORMAT_NAME} file")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {version!r} is not supported by plate_concepts "
            f"{plate_concepts.__version__} (reads up to {FORMAT_VERSION}); upgrade the package"
        )
    return metadata


def _check_tensors(
    path: Path, owner: str, expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor]
) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{path}: tensors {missing} of the {owner} are missing")
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(found[name].shape)}, but the metadata "
                f"({owner}) implies {shape}"
            )


def _input_dim(whitening: ControlWhitening, tensors: dict[str, torch.Tensor]) -> int | None:
    mean = tensors.get("control_mean")
    if mean is not None:
        return int(mean.shape[-1])
    return getattr(whitening, "input_dim", None)


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and paths in metadata become plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable")
