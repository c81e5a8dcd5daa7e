"""Models: the shared layers and one room per workload.

    channel.py   wireless channels (AWGN, Rayleigh, Rician; MMSE equalisation)
    jscc.py      importance-aware variable-rate JSCC (LAM-MTSC)
    split.py     what crosses a U-shaped split: packing and wire codecs
    mtsc/        LAM-based multi-task semantic communication (federated split LoRA)
    tosc/        lightweight students distilled from a teacher (IB + KD)
    taco/        TACO: VQ context + GradCAM task latents, local semantic feedback
    diffusion/   segmentation map -> conditional DDPM -> attention-masked edges

Each room holds `config.py` (its config section), `workload.py` (the seam of
DESIGN.md: build, shared_state, load_shared_state, load_data, train_local, evaluate,
and its metric names) and the modules behind them. Rooms are registered in
common/workloads.py.
"""

from __future__ import annotations

from types import ModuleType

from common.workloads import room


def get_workload(name: str) -> ModuleType:
    """The seam of workload `name` (its room's `workload` module)."""
    return room(name, "workload")
