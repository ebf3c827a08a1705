"""The one device rule of the package: which torch device "auto" (or a name) means here."""

from __future__ import annotations

import os

import torch

DEVICE_HELP = "'auto' (CUDA, then Apple MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA (this process's ``LOCAL_RANK`` GPU under torchrun), else Apple MPS, else
    CPU; any other name is checked to be available."""
    if isinstance(name, torch.device):
        device = name
    elif str(name).lower() == "auto":
        if torch.cuda.is_available():
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", rank % torch.cuda.device_count())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(str(name).lower())
        except RuntimeError as err:
            raise ValueError(f"unknown device {name!r}; expected {DEVICE_HELP}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"device {name!r} requested but Apple MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; expected {DEVICE_HELP}")
    return device


def available_devices() -> list[str]:
    """"auto" and the torch devices present on this machine (cpu always)."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        if torch.cuda.device_count() > 1:
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        devices.append("mps")
    return devices


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
