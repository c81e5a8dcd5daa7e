"""The index bits over a noisy digital link (the paper assumes an error-free link and
names channel noise as future work).

The context indices and the task indices of a payload (ceil(log2 K) bits each) travel
as two transport blocks through models/digital_phy.py: 5G NR LDPC with a CRC24A per
code block and QAM with soft demapping (Sionna), at one row of its MCS table (fixed, or
chosen per SNR and block length by its link adaptation, for the shorter block), over
the project's channel (models/channel.py: AWGN, Rayleigh block fading, TDL-A .. TDL-E).
p and the mask (2-9 bytes) are taken as side information on a reliable control
channel: they fix how many indices follow, and a flipped mask bit would desynchronise
every later field rather than show what the link does to the indices. The SNR is per
complex channel symbol (Es/N0); a block costs the channel uses of its codeword, and a
lower code rate spends more of them.

A failed CRC is an erasure the receiver knows about, never garbage in the image:

- task block lost: the receiver decodes the context alone, as the payload of p = 0
  (`context_only`: an empty mask, no task indices, every context index; the ones whose
  4x4 block the sent mask covered fully never left the transmitter and hold the
  receiver's filler 0, as they do in `Receiver.context_latents`);
- context block lost: there is no image to decode; the receiver shows a fallback
  image (`fallback_image`: the mean of images it holds, or mid grey) and the task
  model runs on that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from common.config import ChannelConfig
from models.channel import WirelessChannel
from models.digital_phy import Mcs, select_mcs, transmit
from models.taco.codec import bits_per_index
from models.taco.payload import Payload, covered_context
from models.taco.pipeline import Receiver


class LinkResult(NamedTuple):
    payload: Payload | None  # as the receiver holds it; None when the context was lost
    context_lost: bool  # the context block failed its CRC
    task_lost: bool  # the task block failed its CRC
    bit_errors: int  # index bit errors in the blocks that passed (LDPC + CRC: ~0)
    bits: int  # index bits sent (both blocks)
    channel_uses: int  # complex channel symbols (both blocks)
    mcs: Mcs


def _to_bits(indices: Tensor, k: int) -> Tensor:
    """[1, len * k] MSB-first bits of the indices."""
    shifts = torch.arange(k - 1, -1, -1)
    return ((indices[:, None] >> shifts) & 1).reshape(1, -1).to(torch.uint8)


def _from_bits(bits: Tensor, k: int) -> Tensor:
    weights = 1 << torch.arange(k - 1, -1, -1)
    return (bits.reshape(-1, k).to(torch.int64) * weights).sum(dim=1)


def _send(indices: Tensor, k: int, codebook_size: int, mcs: Mcs, link: WirelessChannel,
          snr_db: float, generator: torch.Generator | None) -> tuple[Tensor, bool, int, int]:
    """One transport block: the received indices, whether it passed its CRC, its bit
    errors and its channel uses."""
    bits = _to_bits(indices, k)
    received, ok, uses = transmit(bits, mcs, link, snr_db, generator)
    # K < 2^k: an error the CRC missed (about 2^-24 of corrupted blocks) could name no entry.
    values = _from_bits(received, k) % codebook_size
    return values, bool(ok[0]), int((received != bits).sum()), uses


def payload_over_link(payload: Payload, codebook_size: int, mcs: str | int, channel: str,
                      snr_db: float, generator: torch.Generator | None = None) -> LinkResult:
    """Send the payload's context and task indices as two transport blocks at the MCS
    `mcs` ("auto" or a row of models.digital_phy.MCS_TABLE) over `channel` at
    `snr_db`; what the receiver holds afterwards (see the module docstring)."""
    k = bits_per_index(codebook_size)
    link = WirelessChannel(ChannelConfig(model=channel, snr_db=snr_db))
    empty = torch.zeros(0, dtype=torch.int64)
    context = payload.context_indices if payload.context_indices is not None else empty
    # one MCS for both blocks, chosen for the shorter one (short LDPC blocks need more SNR)
    lengths = [k * len(x) for x in (context, payload.task_indices) if len(x)]
    row = select_mcs(mcs, snr_db, min(lengths) if lengths else None)
    ctx, ctx_ok, ctx_err, ctx_uses = _send(context, k, codebook_size, row, link, snr_db, generator)
    task, task_ok, task_err, task_uses = _send(payload.task_indices, k, codebook_size, row,
                                               link, snr_db, generator)
    errors = (ctx_err if ctx_ok else 0) + (task_err if task_ok else 0)
    bits = k * (len(context) + len(payload.task_indices))
    uses = ctx_uses + task_uses
    if not ctx_ok:
        return LinkResult(None, True, not task_ok, errors, bits, uses, row)
    received_context = ctx if payload.context_indices is not None else None
    if task_ok:
        received = Payload(payload.rate, payload.mask, task, received_context)
    else:
        received = context_only(payload.mask, received_context)
    return LinkResult(received, False, not task_ok, errors, bits, uses, row)


def context_only(mask: Tensor, context_indices: Tensor | None) -> Payload:
    """The p = 0 payload a receiver decodes when the task block of a payload with this
    mask is lost: no task indices, and every context index, the filler 0 where the
    mask's fully covered blocks kept one from being sent."""
    empty_mask = torch.zeros_like(mask)
    if context_indices is None:  # a task-switch reply: nothing arrives
        return Payload(0, empty_mask, torch.zeros(0, dtype=torch.int64), None)
    covered = covered_context(mask)
    z_c = torch.zeros(covered.shape, dtype=torch.int64)
    z_c[~covered] = context_indices
    return Payload(0, empty_mask, torch.zeros(0, dtype=torch.int64), z_c.reshape(-1))


def fallback_image(images: Tensor | None, image_size: int) -> Tensor:
    """What the receiver shows when the context is lost [1, 3, S, S]: the mean of
    `images` [N, 3, S, S] it holds (the report: the client's training images), or
    mid grey (0.5) when it holds none."""
    if images is None or len(images) == 0:
        return torch.full((1, 3, image_size, image_size), 0.5)
    return images.float().mean(dim=0, keepdim=True)


def received_image(receiver: Receiver, result: LinkResult, fallback: Tensor) -> Tensor:
    """x_hat [1, 3, S, S] of a first payload after the link: the decoded image, or
    `fallback` when the context block was lost."""
    if result.payload is None:
        return fallback
    return receiver.receive(result.payload)
