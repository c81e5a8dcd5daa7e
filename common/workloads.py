"""The workload registry: each workload's package under models/, by name.

A workload's package holds two modules the rest of the project looks for:

- `config`: its config section (`SECTIONS`: top-level key -> dataclass), `SPLIT`
  (whether it has a U-shaped split), `STRATEGIES` (the strategies that can aggregate
  what it shares) and `check(cfg)`, its range checks. It imports nothing heavy, so a
  config is checked before torch is loaded.
- `workload`: its side of the seam (models/seam.py: build, shared_state,
  load_shared_state, load_data, train_local, evaluate, prepare, and the names of its
  metrics).

The config loader reads the first, the engine the second (models.get_workload). A new
workload is a new package and one line here. The modules are imported by name when they
are needed, so the foundation depends on no workload when it is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

WORKLOADS: dict[str, str] = {
    "mtsc": "models.mtsc",  # LAM-based multi-task semantic communication
    "tosc": "models.tosc",  # distilled lightweight task-oriented students
    "taco": "models.taco",  # TACO: VQ context + GradCAM task latents, LSF, task switching
    "diffusion": "models.diffusion",  # segmentation map -> conditional DDPM, CAM-masked edges
}


def workload_module(name: str, part: str) -> ModuleType:
    """Module `part` ("config" or "workload") of workload `name`."""
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r} unknown; available: {sorted(WORKLOADS)}")
    return importlib.import_module(f"{WORKLOADS[name]}.{part}")
