"""The index bits over a noisy digital link (the paper assumes an error-free link and
names channel noise as future work).

The context and task indices of a payload (ceil(log2 K) bits each) are coded
(uncoded, or Hamming(7,4) with single-error correction), mapped to BPSK or Gray QPSK
at unit symbol energy, sent through the project's channel (models/channel.py: AWGN, or
Rayleigh block fading with one coefficient per image and MMSE equalisation) and
decided hard. p and the mask (2-9 bytes) are taken as side information on a reliable
control channel: they fix how many indices follow, and a flipped mask bit would
desynchronise every later field rather than show what index errors do. The SNR is per
channel symbol (Es/N0), so Hamming(7,4) spends 7/4 times the symbols for its gain.
Written by hand: no library in the stack codes or modulates bits for torch.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import ChannelConfig
from models.channel import WirelessChannel
from models.taco.codec import bits_per_index
from models.taco.payload import Payload

# Systematic Hamming(7,4): codeword = [d1 d2 d3 d4 p1 p2 p3].
_G = np.array([[1, 0, 0, 0, 1, 1, 0],
               [0, 1, 0, 0, 1, 0, 1],
               [0, 0, 1, 0, 0, 1, 1],
               [0, 0, 0, 1, 1, 1, 1]], dtype=np.uint8)
_H = np.array([[1, 1, 0, 1, 1, 0, 0],
               [1, 0, 1, 1, 0, 1, 0],
               [0, 1, 1, 1, 0, 0, 1]], dtype=np.uint8)
# Syndrome (as an integer) -> the bit it points at; column j of H is the syndrome of bit j.
_SYNDROME_BIT = {int("".join(map(str, _H[:, j])), 2): j for j in range(7)}


def hamming74_encode(bits: np.ndarray) -> np.ndarray:
    blocks = np.concatenate([bits, np.zeros((-len(bits)) % 4, np.uint8)]).reshape(-1, 4)
    return (blocks @ _G % 2).astype(np.uint8).reshape(-1)


def hamming74_decode(coded: np.ndarray, n_bits: int) -> np.ndarray:
    words = coded.reshape(-1, 7).copy()
    syndromes = words @ _H.T % 2
    for row, s in enumerate(syndromes):
        value = int(s[0]) * 4 + int(s[1]) * 2 + int(s[2])
        if value:
            words[row, _SYNDROME_BIT[value]] ^= 1
    return words[:, :4].reshape(-1)[:n_bits]


def modulate(bits: np.ndarray, modulation: str) -> torch.Tensor:
    """Unit-energy symbols [n]: BPSK 1 - 2b; QPSK (Gray) two bits per symbol."""
    s = 1.0 - 2.0 * torch.from_numpy(bits.astype(np.float32))
    if modulation == "bpsk":
        return torch.complex(s, torch.zeros_like(s))
    if modulation == "qpsk":
        if len(s) % 2:
            s = torch.cat([s, torch.ones(1)])
        return torch.complex(s[0::2], s[1::2]) / np.sqrt(2.0)
    raise ValueError(f"modulation {modulation!r} unknown: use 'bpsk' or 'qpsk'")


def demodulate(y: torch.Tensor, modulation: str, n_bits: int) -> np.ndarray:
    if modulation == "bpsk":
        bits = (y.real < 0).to(torch.uint8)
    else:
        bits = torch.stack([(y.real < 0), (y.imag < 0)], dim=1).reshape(-1).to(torch.uint8)
    return bits.numpy()[:n_bits]


def send_bits(bits: np.ndarray, modulation: str, code: str, channel: str, snr_db: float,
              generator: torch.Generator) -> tuple[np.ndarray, int]:
    """The received bits and the channel symbols spent."""
    coded = hamming74_encode(bits) if code == "hamming74" else bits
    symbols = modulate(coded, modulation)
    link = WirelessChannel(ChannelConfig(model=channel, snr_db=snr_db))
    y = link(symbols[None], torch.tensor([snr_db]), generator)[0]
    received = demodulate(y, modulation, len(coded))
    if code == "hamming74":
        received = hamming74_decode(received, len(bits))
    return received, len(symbols)


def _to_bits(indices: torch.Tensor, k: int) -> np.ndarray:
    v = indices.numpy()[:, None]
    return ((v >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)


def _from_bits(bits: np.ndarray, k: int, codebook_size: int) -> torch.Tensor:
    weights = 1 << np.arange(k - 1, -1, -1)
    values = bits.reshape(-1, k).astype(np.int64) @ weights
    return torch.from_numpy(values % codebook_size)  # K < 2^k: a corrupted value wraps


def payload_over_link(payload: Payload, codebook_size: int, modulation: str, code: str,
                      channel: str, snr_db: float, generator: torch.Generator
                      ) -> tuple[Payload, int, int, int]:
    """The payload as received, its index bit errors, index bits and channel symbols."""
    k = bits_per_index(codebook_size)
    context = payload.context_indices if payload.context_indices is not None else torch.zeros(0, dtype=torch.int64)
    indices = torch.cat([context, payload.task_indices])
    bits = _to_bits(indices, k)
    if len(bits) == 0:
        return payload, 0, 0, 0
    received, symbols = send_bits(bits, modulation, code, channel, snr_db, generator)
    values = _from_bits(received, k, codebook_size)
    n_ctx = len(context)
    noisy = Payload(payload.rate, payload.mask, values[n_ctx:],
                    values[:n_ctx] if payload.context_indices is not None else None)
    return noisy, int((received != bits).sum()), len(bits), symbols
