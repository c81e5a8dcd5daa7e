"""Loading a server's shared state into a client's named parameters: one routine for
every workload whose shared tensors keep their parameter names (tosc students, the taco
codec, the diffusion UNet's LoRA adapters)."""

from __future__ import annotations

import numpy as np
import torch


def copy_into(params: dict[str, torch.nn.Parameter], arrays: dict[str, np.ndarray],
              owner: str) -> None:
    """Copy each array into the parameter of its name; an unknown key or a shape that
    differs is refused, naming `owner` (what the parameters belong to)."""
    unexpected = sorted(set(arrays) - set(params))
    if unexpected:
        raise KeyError(f"shared state has keys this {owner} does not: {unexpected[:3]}")
    with torch.no_grad():
        for key, value in arrays.items():
            value = torch.as_tensor(np.asarray(value), dtype=torch.float32)
            if value.shape != params[key].shape:
                raise ValueError(f"{key}: got shape {tuple(value.shape)}, the {owner} has "
                                 f"{tuple(params[key].shape)}")
            params[key].copy_(value)
