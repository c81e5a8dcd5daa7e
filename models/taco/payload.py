"""TACO's payload as bits, and the Flower message that carries it.

One image's payload is p, the mask M, the context indices z_c that the receiver needs
and the task indices z_i (TACO Sec. III-A-4, Eqs. 6-8). It is serialised bit by bit:

    7 bits   p, in percent
    1 bit    whether context indices follow (a task-switch reply has none)
    1 bit    mask coding: 0 bitmap, 1 run-length
    mask     bitmap: one bit per latent position (raster order); run-length: the first
             bit, the number of runs R, then R - 1 run lengths, each ceil(log2(N+1))
             bits (the last run is implied); whichever is shorter
    context  ceil(log2 K) bits per context index whose 4x4 block of latent positions is
             not fully covered by M (LSF: the receiver never uses those)
    task     ceil(log2 K) bits per position of M, raster order
    padding  zero bits up to a whole byte

The receiver knows the grid and K (the shared codec); nothing else travels. The bytes
sit in a ConfigRecord of a real Flower Message, and bytes per image are measured from
that message's content. The bit packing is hand-written (NumPy packbits) because no
library in the stack writes fields of arbitrary width.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from torch import Tensor

from models.taco.codec import DOWNSAMPLE, bits_per_index

RATE_BITS = 7
RECORD, FIELD = "taco", "payload"
MESSAGE_TYPE = "query.taco_payload"


@dataclass
class Payload:
    rate: int  # p in percent
    mask: Tensor  # bool [H, W]: M
    task_indices: Tensor  # int64 [M.sum()]: z_i at M's positions, raster order
    context_indices: Tensor | None  # int64 [uncovered context positions], or None


def covered_context(mask: Tensor) -> Tensor:
    """Context positions [H/4, W/4] whose 4x4 block of latent positions M covers fully."""
    h, w = mask.shape
    blocks = mask.reshape(h // DOWNSAMPLE, DOWNSAMPLE, w // DOWNSAMPLE, DOWNSAMPLE)
    return blocks.all(dim=3).all(dim=1)


def _run_lengths(bits: np.ndarray) -> list[int]:
    change = np.flatnonzero(np.diff(bits.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [bits.size]])
    return np.diff(edges).tolist()


def mask_bits(mask: Tensor) -> tuple[int, int]:
    """(bitmap bits, run-length bits) of a mask."""
    flat = mask.reshape(-1).numpy()
    width = math.ceil(math.log2(flat.size + 1))
    runs = _run_lengths(flat)
    return flat.size, 1 + width + (len(runs) - 1) * width


def payload_bits(mask: Tensor, codebook_size: int, with_context: bool) -> int:
    """The bit accounting of a payload, from its mask alone (no serialisation)."""
    k = bits_per_index(codebook_size)
    context = int((~covered_context(mask)).sum()) if with_context else 0
    return RATE_BITS + 2 + min(mask_bits(mask)) + k * (context + int(mask.sum()))


def _field(value: int, width: int) -> list[int]:
    return [(value >> (width - 1 - i)) & 1 for i in range(width)]


def serialise(payload: Payload, codebook_size: int) -> bytes:
    k = bits_per_index(codebook_size)
    flat = payload.mask.reshape(-1).numpy().astype(np.uint8)
    width = math.ceil(math.log2(flat.size + 1))
    bitmap_n, rle_n = mask_bits(payload.mask)
    bits = _field(payload.rate, RATE_BITS) + [int(payload.context_indices is not None)]
    if rle_n < bitmap_n:
        runs = _run_lengths(flat)
        bits += [1, int(flat[0])] + _field(len(runs), width)
        for run in runs[:-1]:
            bits += _field(run, width)
    else:
        bits += [0] + flat.tolist()
    if payload.context_indices is not None:
        for i in payload.context_indices.tolist():
            bits += _field(i, k)
    for i in payload.task_indices.tolist():
        bits += _field(i, k)
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()


class _Reader:
    def __init__(self, data: bytes):
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self.pos = 0

    def take(self, width: int) -> int:
        if self.pos + width > self.bits.size:
            raise ValueError(f"payload ends after {self.bits.size} bits; a field of "
                             f"{width} bits at bit {self.pos} is missing")
        value = 0
        for b in self.bits[self.pos:self.pos + width]:
            value = (value << 1) | int(b)
        self.pos += width
        return value


def deserialise(data: bytes, grid: tuple[int, int], codebook_size: int) -> Payload:
    """The payload of `data` for a latent grid [H, W] and a codebook of K entries."""
    k = bits_per_index(codebook_size)
    n = grid[0] * grid[1]
    width = math.ceil(math.log2(n + 1))
    r = _Reader(data)
    rate, with_context, rle = r.take(RATE_BITS), r.take(1), r.take(1)
    if rle:
        value, runs = r.take(1), r.take(width)
        lengths = [r.take(width) for _ in range(runs - 1)]
        lengths.append(n - sum(lengths))
        flat = np.concatenate([np.full(length, (value + i) % 2, dtype=bool)
                               for i, length in enumerate(lengths)])
    else:
        flat = np.array([r.take(1) for _ in range(n)], dtype=bool)
    mask = torch.from_numpy(flat.reshape(grid))
    context = None
    if with_context:
        count = int((~covered_context(mask)).sum())
        context = torch.tensor([r.take(k) for _ in range(count)], dtype=torch.int64)
    task = torch.tensor([r.take(k) for _ in range(int(mask.sum()))], dtype=torch.int64)
    return Payload(rate, mask, task, context)


# ----------------------------------------------------------------------------- the message


@contextlib.contextmanager
def message_identity():
    """flwr 1.41 stamps a Message with the running app's run and node ids and refuses
    to build one outside an app; the report and direct calls run the link outside one,
    so they get a local identity (0) for the duration. Inside an app nothing changes."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {a: getattr(TaskIdentity, a) for a in ("_run_id", "_node_id", "_task_id")}
    for attr, value in saved.items():
        if value is None:
            setattr(TaskIdentity, attr, 0)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(TaskIdentity, attr, value)


def payload_message(data: bytes) -> Message:
    """The transmitter's Flower Message: the payload bytes and nothing else."""
    with message_identity():
        return Message(RecordDict({RECORD: ConfigRecord({FIELD: data})}), dst_node_id=0,
                       message_type=MESSAGE_TYPE)


def message_payload(message: Message) -> bytes:
    """What the receiver reads: the payload bytes of the message's content."""
    data = message.content.config_records[RECORD][FIELD]
    if not isinstance(data, bytes):
        raise TypeError(f"the TACO payload must be bytes, got {type(data).__name__}")
    return data


def message_bytes(message: Message) -> int:
    """Bytes per image, measured from the message that carries the payload."""
    return len(message_payload(message))
