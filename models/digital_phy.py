"""A digital physical layer from Sionna's PHY: transport blocks with a CRC per code
block, 5G NR LDPC (belief propagation), QAM with soft (LLR) demapping, and a small
modulation-and-coding-scheme table chosen per SNR as 5G's link adaptation does.

    bits [B, L] -> code blocks of at most MAX_CB_PAYLOAD bits -> CRC24A each
    -> LDPC5GEncoder(k, n) -> Mapper("qam", m) -> channel (models/channel.py)
    -> LMMSE-equalised symbols and their effective noise -> Demapper("app") LLRs
    -> LDPC5GDecoder (20 iterations) -> CRC check -> bits, and per row whether every
       code block passed

A failed CRC is an erasure the receiver knows about; what a workload does with one is
its own choice (TACO: models/taco/digital_link.py; the separate baseline:
models/separate.py). Sionna has the code, the CRC and the mapping; what is ours is only
the segmentation into code blocks and the MCS table (Sionna's 5G tables live in its
PUSCH/PDSCH blocks, which need the full NR resource grid; ours keeps the rates and
constellations and measures where each works).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.channel import WirelessChannel, import_sionna

CRC = "CRC24A"
CRC_BITS = 24
MAX_CB_PAYLOAD = 3840 - CRC_BITS  # info bits per code block: base graph 2's largest k
LDPC_ITERATIONS = 20
MAX_EFFECTIVE_RATE = 948 / 1024  # TS 38.212 5.4.2.1


@dataclass(frozen=True)
class Mcs:
    """One row of the MCS table: a QAM order and an LDPC code rate."""

    index: int
    bits_per_symbol: int  # 2: QPSK, 4: 16-QAM, 6: 64-QAM
    code_rate: float
    # The lowest AWGN Es/N0 (dB, on a 0.5 dB grid) at which a transport block is lost
    # at most 10 % of the time, for a block of 1000 payload bits (200 blocks per point;
    # `make bench` prints the BLER there) and for a short one of 40 (400 blocks): short
    # LDPC codes need 1-3 dB more. The link adaptation picks the fastest row whose
    # threshold for the block's length the SNR meets.
    min_snr_db: float
    short_min_snr_db: float

    @property
    def name(self) -> str:
        qam = {2: "QPSK", 4: "16-QAM", 6: "64-QAM"}[self.bits_per_symbol]
        return f"{qam} r={self.code_rate:.2f}"

    @property
    def bits_per_channel_use(self) -> float:
        return self.bits_per_symbol * self.code_rate


MCS_TABLE = (
    Mcs(0, 2, 0.20, -3.5, -2.5),
    Mcs(1, 2, 1 / 3, -1.0, 0.0),
    Mcs(2, 2, 1 / 2, 1.5, 2.5),
    Mcs(3, 2, 2 / 3, 3.5, 4.5),
    Mcs(4, 4, 1 / 2, 6.5, 8.0),
    Mcs(5, 4, 2 / 3, 9.5, 10.5),
    Mcs(6, 6, 2 / 3, 14.5, 15.5),
    Mcs(7, 6, 5 / 6, 17.5, 20.5),
)
SHORT_BLOCK_BITS = 256  # payloads below this take the short-block thresholds


def mcs_for_snr(snr_db: float, payload_bits: int | None = None) -> Mcs:
    """The fastest row whose threshold for a block of `payload_bits` (None: a long
    block) `snr_db` meets; below every threshold the most robust row (its blocks will
    mostly fail: that is the cliff)."""
    short = payload_bits is not None and payload_bits < SHORT_BLOCK_BITS
    fits = [m for m in MCS_TABLE if (m.short_min_snr_db if short else m.min_snr_db) <= snr_db]
    return fits[-1] if fits else MCS_TABLE[0]


def select_mcs(mcs: str | int, snr_db: float, payload_bits: int | None = None) -> Mcs:
    """`mcs` from config: "auto" (per SNR and block length) or a row index of MCS_TABLE."""
    if mcs == "auto":
        return mcs_for_snr(snr_db, payload_bits)
    if isinstance(mcs, int) and 0 <= mcs < len(MCS_TABLE):
        return MCS_TABLE[mcs]
    raise ValueError(f"mcs {mcs!r} unknown: use 'auto' or a row index 0..{len(MCS_TABLE) - 1} "
                     "of models.digital_phy.MCS_TABLE")


def _blocks(payload_bits: int) -> tuple[int, int]:
    """(code blocks, payload bits per block) for a transport block of `payload_bits`."""
    c = max(1, math.ceil(payload_bits / MAX_CB_PAYLOAD))
    return c, math.ceil(payload_bits / c)


def _codeword_bits(k: int, mcs: Mcs) -> int:
    """n for k info bits at the row's rate (or just above it: never under 5G's lowest
    1/5), a whole number of QAM symbols; just below the rate where rounding down would
    pass 948/1024, 5G's highest effective rate (a short block at r=5/6)."""
    m = mcs.bits_per_symbol
    n = math.floor(k / mcs.code_rate / m) * m
    return n if k / n <= MAX_EFFECTIVE_RATE else math.ceil(k / mcs.code_rate / m) * m


def channel_uses(payload_bits: int, mcs: Mcs) -> int:
    """Complex channel symbols that carry a transport block of `payload_bits`."""
    if payload_bits <= 0:
        return 0
    c, kp = _blocks(payload_bits)
    return c * _codeword_bits(kp + CRC_BITS, mcs) // mcs.bits_per_symbol


def capacity_bits(symbols: int, mcs: Mcs) -> int:
    """The largest transport block (payload bits) that fits in `symbols` channel uses."""
    lo, hi = 0, int(symbols * mcs.bits_per_channel_use) + 1
    while lo < hi:  # channel_uses is monotone in the payload
        mid = (lo + hi + 1) // 2
        if channel_uses(mid, mcs) <= symbols:
            lo = mid
        else:
            hi = mid - 1
    return lo


@functools.lru_cache(maxsize=64)
def _coder(k: int, n: int, m: int, device: str):
    import_sionna()
    from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
    from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder

    crc = CRCEncoder(CRC, device=device)
    enc = LDPC5GEncoder(k, n, num_bits_per_symbol=m, device=device)
    return (crc, CRCDecoder(crc, device=device), enc,
            LDPC5GDecoder(enc, num_iter=LDPC_ITERATIONS, hard_out=True, device=device))


@functools.lru_cache(maxsize=8)
def _mapper(m: int, device: str):
    import_sionna()
    from sionna.phy.mapping import Mapper

    return Mapper("qam", m, device=device)


@functools.lru_cache(maxsize=8)
def _demapper(m: int, device: str):
    import_sionna()
    from sionna.phy.mapping import Demapper

    return Demapper("app", "qam", m, device=device)


def qam_map(bits: Tensor, bits_per_symbol: int) -> Tensor:
    """Gray-mapped unit-energy QAM symbols for bits [..., L] (L a multiple of m)."""
    return _mapper(bits_per_symbol, str(bits.device))(bits.float())


def qam_llr(y: Tensor, no: Tensor, bits_per_symbol: int) -> Tensor:
    """Bit LLRs ln(P(b=1)/P(b=0)) [..., L * m] of equalised symbols y with noise `no`."""
    return _demapper(bits_per_symbol, str(y.device))(y, no)


def transmit(bits: Tensor, mcs: Mcs, channel: WirelessChannel, snr_db: float,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int]:
    """Send each row of `bits` [B, L] (0/1) as one transport block over `channel` at
    `snr_db`. Returns the decoded bits [B, L] (uint8), whether every code block of the
    row passed its CRC [B], and the channel uses per row."""
    b, length = bits.shape
    device = bits.device
    if length == 0:
        return bits.to(torch.uint8), torch.ones(b, dtype=torch.bool, device=device), 0
    c, kp = _blocks(length)
    k = kp + CRC_BITS
    m = mcs.bits_per_symbol
    n = _codeword_bits(k, mcs)
    crc, crc_check, enc, dec = _coder(k, n, m, str(device))
    padded = torch.zeros(b, c * kp, device=device)
    padded[:, :length] = bits.float()
    codewords = enc(crc(padded.reshape(b * c, kp)))  # [B*C, n]
    x = qam_map(codewords, m).reshape(b, -1)  # [B, C*n/m]: one row's blocks back to back
    snr = torch.full((b,), float(snr_db), device=device)
    y, no_eff = channel.equalise(x, snr, generator)
    llr = qam_llr(y.reshape(b * c, -1), no_eff.reshape(b * c, -1).real.float(), m)
    decoded, ok = crc_check(dec(llr))  # [B*C, kp], [B*C, 1]
    out = decoded.reshape(b, c * kp)[:, :length].round().to(torch.uint8)
    return out, ok.reshape(b, c).all(dim=1), x.shape[1]


def bytes_to_bits(data: bytes) -> Tensor:
    """MSB-first bits of `data` as a uint8 tensor."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((raw[:, None] >> shifts) & 1).reshape(-1)


def bits_to_bytes(bits: Tensor) -> bytes:
    """Inverse of bytes_to_bits (the length a multiple of 8)."""
    weights = (1 << torch.arange(7, -1, -1)).to(torch.int64)
    return bytes((bits.reshape(-1, 8).to(torch.int64) * weights).sum(dim=1).tolist())
