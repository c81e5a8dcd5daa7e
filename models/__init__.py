"""Models: the shared layers and one package per workload.

    seam.py          the workload seam (typed Protocols): what every workload offers
    client_state.py  what a client keeps between rounds, and where on its disk
    shared_state.py  loading the server's shared state into named parameters
    channel.py       wireless channels (AWGN, Rayleigh, Rician; MMSE equalisation)
    jscc.py          importance-aware variable-rate JSCC (LAM-MTSC)
    split_wire.py    what crosses a U-shaped split: packing and wire codecs
    mtsc/            LAM-based multi-task semantic communication (federated split LoRA)
    tosc/            lightweight students distilled from a teacher (IB + KD)
    taco/            TACO: VQ context + GradCAM task latents, local semantic feedback
    diffusion/       segmentation map -> conditional DDPM -> attention-masked edges

Each workload package holds `config.py` (its config section) and `workload.py` (its
side of the seam, models/seam.py) and the models, losses and training steps behind
them. Workloads are registered in common/workloads.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from common.workloads import workload_module

if TYPE_CHECKING:
    from models.seam import SplitWorkload, Workload


def get_workload(name: str) -> Workload:
    """Workload `name`'s side of the seam (its `workload` module)."""
    return cast("Workload", workload_module(name, "workload"))


def get_split_workload(name: str) -> SplitWorkload:
    """Workload `name`, which must have a U-shaped split."""
    from models.seam import SplitWorkload

    workload = workload_module(name, "workload")
    if not isinstance(workload, SplitWorkload):
        raise ValueError(f"workload {name!r} has no U-shaped split (split.mode needs a "
                         "workload that implements models.seam.SplitWorkload)")
    return workload
