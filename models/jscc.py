"""Importance-aware variable-rate deep JSCC (LAM-MTSC, Sec. III-B).

The encoder maps each semantic token to `n_symbols` complex channel symbols and scores
its importance. The channel SNR sets the rate: the share of tokens sent falls linearly
from 1 at `rate_snr_db[0]` to `min_rate` at `rate_snr_db[1]` (a noisier channel gets
more redundancy). The most important tokens are sent; the receiver learns which by a
T-bit mask sent as side information. The hard top-k mask passes gradients to the
importance scores with a straight-through estimator, so importance is learned end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class JSCCOutput:
    symbols: Tensor  # complex [B, T, C], unit average power over the sent symbols
    mask: Tensor  # float [B, T]: 1 where the token is sent (straight-through gradient)
    symbols_sent: Tensor  # float [B]: complex channel uses per example


def rate_for_snr(snr_db: Tensor, min_rate: float, snr_lo: float, snr_hi: float) -> Tensor:
    """Share of tokens to send: 1 at snr_lo and below, min_rate at snr_hi and above."""
    t = ((snr_db - snr_lo) / (snr_hi - snr_lo)).clamp(0.0, 1.0)
    return 1.0 - t * (1.0 - min_rate)


class JSCCEncoder(nn.Module):
    def __init__(self, d_model: int, n_symbols: int, min_rate: float,
                 rate_snr_db: tuple[float, float]):
        super().__init__()
        self.n_symbols = n_symbols
        self.min_rate = min_rate
        self.rate_snr_db = tuple(rate_snr_db)
        # +1 input: the SNR in dB / 10, so the code adapts to the channel (CSI at the TX).
        self.to_symbols = nn.Sequential(
            nn.Linear(d_model + 1, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, 2 * n_symbols)
        )
        self.importance = nn.Linear(d_model, 1)

    def forward(self, tokens: Tensor, snr_db: Tensor) -> JSCCOutput:
        b, t, _ = tokens.shape
        snr_feat = (snr_db / 10.0).reshape(b, 1, 1).expand(b, t, 1)
        z = self.to_symbols(torch.cat([tokens, snr_feat], dim=-1))
        z = torch.view_as_complex(z.reshape(b, t, self.n_symbols, 2).contiguous())

        scores = self.importance(tokens).squeeze(-1)  # [B, T]
        rate = rate_for_snr(snr_db, self.min_rate, *self.rate_snr_db)
        keep = torch.ceil(rate * t).clamp(1, t)  # tokens sent per example
        order = scores.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each token
        hard = (order < keep.unsqueeze(1)).to(tokens.dtype)
        soft = torch.sigmoid(scores)
        mask = hard + soft - soft.detach()  # forward: hard mask; backward: d/dscores

        z = z * mask.unsqueeze(-1)
        # Unit average power over the symbols actually sent (per example).
        power = (z.abs() ** 2).sum(dim=(1, 2)) / (keep * self.n_symbols)
        z = z / torch.sqrt(power + 1e-12).reshape(b, 1, 1)
        return JSCCOutput(symbols=z, mask=mask, symbols_sent=keep * self.n_symbols)


class JSCCDecoder(nn.Module):
    def __init__(self, d_model: int, n_symbols: int):
        super().__init__()
        self.from_symbols = nn.Sequential(
            nn.Linear(2 * n_symbols + 1, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )
        # Tokens that were not sent are replaced by a learned placeholder.
        self.missing = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.missing, std=1.0 / math.sqrt(d_model))
        self.norm = nn.LayerNorm(d_model)  # the LAM decoder expects unit-scale memory

    def forward(self, received: Tensor, mask: Tensor, snr_db: Tensor) -> Tensor:
        b, t, c = received.shape
        x = torch.view_as_real(received).reshape(b, t, 2 * c)
        snr_feat = (snr_db / 10.0).reshape(b, 1, 1).expand(b, t, 1)
        h = self.from_symbols(torch.cat([x, snr_feat], dim=-1))
        m = mask.unsqueeze(-1)
        return self.norm(m * h + (1 - m) * self.missing)
