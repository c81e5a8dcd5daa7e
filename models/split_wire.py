"""What crosses the cut of a U-shaped split, and how it is encoded on the wire.

Uplink: the channel symbols the JSCC actually sent, as they arrive after the uplink
channel, packed without the positions it did not send (so the bytes follow the
JSCC's SNR-dependent rate), the JSCC's soft per-token symbol counts (both sides
derive the same prefix mask from them, and their gradient carries the importance
scores' straight-through gradient back) and the per-example SNR. Downlink: the server
half's output after an optional second channel. Gradients travel back the same way.

Every tensor is an entry of a Flower ArrayRecord, optionally compressed: float16,
bfloat16 (numpy has no bfloat16, so its 16-bit patterns travel as int16) or int8 with
a per-tensor scale. Counts and SNR always travel in float32: rounding the counts could
change which symbols count as sent.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

CODECS = ("none", "float16", "bfloat16", "int8")
# The last key of `step_generator`: which draw it seeds. A training step's draws take
# (seed, partition, round, step, key): its channels UPLINK and DOWNLINK, the noise of the
# gradient-noise defence GRADIENT_NOISE; evaluation's channels and the label-DP labels
# take (seed, partition, key) and are the same in every round.
UPLINK, DOWNLINK, EVAL_UPLINK, EVAL_DOWNLINK, GRADIENT_NOISE, LABEL_DP = 0, 1, 2, 3, 4, 5


def step_generator(*keys: int) -> torch.Generator:
    """A generator seeded from (experiment seed, partition, round, step, link, ...):
    each party draws the same noise whether the step runs split or in one process."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def encode(name: str, x: Tensor, codec: str = "none") -> dict[str, Array]:
    """One tensor as ArrayRecord entries (`name`, and `name.scale` for int8)."""
    if codec not in CODECS:
        raise ValueError(f"compression {codec!r} unknown; use one of {CODECS}")
    x = x.detach().to("cpu", torch.float32).contiguous()
    if codec == "none":
        return {name: Array(x.numpy())}
    if codec == "float16":
        return {name: Array(x.half().numpy())}
    if codec == "bfloat16":
        return {name: Array(x.bfloat16().view(torch.int16).numpy())}
    peak = float(x.abs().max()) if x.numel() else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return {name: Array(q.numpy()), f"{name}.scale": Array(np.array([scale], np.float32))}


def decode(record: ArrayRecord, name: str) -> Tensor:
    """The float32 tensor behind `encode(name, ...)`; the codec is read off the dtype."""
    if name not in record:
        raise KeyError(f"message lacks the tensor {name!r}; it has {sorted(record)}")
    arr = record[name].numpy()
    if arr.dtype == np.float32:
        return torch.from_numpy(arr.copy())
    if arr.dtype == np.float16:
        return torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.int16:
        return torch.from_numpy(arr.copy()).view(torch.bfloat16).float()
    if arr.dtype == np.int8:
        scale = float(record[f"{name}.scale"].numpy()[0])
        return torch.from_numpy(arr.astype(np.float32)) * scale
    raise TypeError(f"tensor {name!r} has dtype {arr.dtype}; expected a split codec's")


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the tensors in a record (what the codecs shrink)."""
    return sum(len(arr.data) for arr in record.values())


def pack_symbols(received: Tensor, sent: Tensor) -> Tensor:
    """Complex [B, T, C] -> real [N, 2]: only the N positions that were sent."""
    return torch.view_as_real(received)[sent]


def unpack_symbols(values: Tensor, sent: Tensor) -> Tensor:
    """Real [N, 2] -> complex [B, T, C] with zeros where nothing was sent
    (differentiable in `values`)."""
    full = values.new_zeros((*sent.shape, 2)).index_put((sent,), values)
    return torch.view_as_complex(full)


def batch_plan(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """The example indices of each step: shuffled epochs, cut into batches, repeated
    until `steps` batches (a short last batch per epoch, as DataLoader gives)."""
    gen = torch.Generator().manual_seed(seed)
    plan: list[Tensor] = []
    while len(plan) < steps:
        plan += list(torch.randperm(n, generator=gen).split(batch_size))
    return plan[:steps]
