"""Models and workloads. A workload is a module offering the seam of DESIGN.md:
build, shared_state, load_shared_state, train_local, evaluate; optionally
prepare(cfg), which the server runs once before round 1 (tosc trains its teacher)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

WORKLOADS = {"mtsc": "models.mtsc", "tosc": "models.tosc"}


def get_workload(name: str) -> ModuleType:
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r} unknown; available: {sorted(WORKLOADS)}")
    return importlib.import_module(WORKLOADS[name])


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} but no CUDA device is visible; use device=auto or cpu"
        )
    return torch.device(device)
