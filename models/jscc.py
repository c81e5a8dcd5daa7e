"""Importance-aware variable-rate deep JSCC (LAM-MTSC, Sec. III-B).

The encoder maps each semantic token to up to `n_symbols` (C) complex channel symbols
and scores its importance. The channel SNR sets the rate: the share of the T * C
symbols that is sent falls linearly from 1 at `rate_snr_db[0]` to `min_rate` at
`rate_snr_db[1]` (a noisier channel gets more redundancy). That budget is split across
tokens in proportion to their softmax importance, each token sending between 1 and C
symbols; a token sends a prefix of its symbols, so the code learns to put what matters
most first (successive refinement). The receiver learns each token's symbol count as
side information (T * log2(C) bits). The hard prefix mask passes gradients to the
importance scores with a straight-through estimator, so importance is learned end to
end. Every token keeps at least one symbol: dropping whole image patches made the
reconstruction task nearly unlearnable in our runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class JSCCOutput:
    symbols: Tensor  # complex [B, T, C], unit average power over the sent symbols
    mask: Tensor  # float [B, T, C]: 1 where a symbol is sent (straight-through gradient)
    symbols_sent: Tensor  # float [B]: complex channel uses per example
    counts: Tensor  # float [B, T]: soft symbol counts; prefix_mask(counts) == mask


def rate_for_snr(snr_db: Tensor, min_rate: float, snr_lo: float, snr_hi: float) -> Tensor:
    """Share of symbols to send: 1 at snr_lo and below, min_rate at snr_hi and above."""
    t = ((snr_db - snr_lo) / (snr_hi - snr_lo)).clamp(0.0, 1.0)
    return 1.0 - t * (1.0 - min_rate)


def symbol_allocation(scores: Tensor, rate: Tensor, n_symbols: int) -> Tensor:
    """Per-token symbol counts (soft, before rounding): budget * softmax(importance),
    within [1, C]. scores: [B, T]; rate: [B]."""
    t = scores.shape[1]
    budget = (rate * t * n_symbols).unsqueeze(1)
    return (budget * torch.softmax(scores, dim=1)).clamp(1.0, float(n_symbols))


def sent_positions(counts: Tensor, n_symbols: int) -> Tensor:
    """bool [B, T, C]: token t sends its first round(counts[t]) symbols."""
    position = torch.arange(n_symbols, device=counts.device, dtype=counts.dtype)
    return position < torch.round(counts.detach()).unsqueeze(-1)


def prefix_mask(counts: Tensor, n_symbols: int) -> Tensor:
    """The sent positions as a float mask. Forward: the hard 0/1 mask; backward: the
    gradient of a soft (sigmoid) prefix, so importance is learned."""
    position = torch.arange(n_symbols, device=counts.device, dtype=counts.dtype)
    hard = sent_positions(counts, n_symbols).to(counts.dtype)
    soft = torch.sigmoid(counts.unsqueeze(-1) - position - 0.5)
    return hard + soft - soft.detach()


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
        # No bias: the softmax over tokens ignores a shift, so a bias gets no gradient.
        self.importance = nn.Linear(d_model, 1, bias=False)
        nn.init.zeros_(self.importance.weight)  # start from an even split of the budget

    def forward(self, tokens: Tensor, snr_db: Tensor) -> JSCCOutput:
        b, t, _ = tokens.shape
        c = self.n_symbols
        snr_feat = (snr_db / 10.0).reshape(b, 1, 1).expand(b, t, 1)
        z = self.to_symbols(torch.cat([tokens, snr_feat], dim=-1))
        z = torch.view_as_complex(z.reshape(b, t, c, 2).contiguous())

        rate = rate_for_snr(snr_db, self.min_rate, *self.rate_snr_db)
        counts = symbol_allocation(self.importance(tokens).squeeze(-1), rate, c)  # [B, T]
        mask = prefix_mask(counts, c)

        z = z * mask
        sent = torch.round(counts.detach()).sum(dim=1)  # counts lie in [1, C]
        # Unit average power over the symbols actually sent (per example).
        power = (z.abs() ** 2).sum(dim=(1, 2)) / sent
        z = z / torch.sqrt(power + 1e-12).reshape(b, 1, 1)
        return JSCCOutput(symbols=z, mask=mask, symbols_sent=sent, counts=counts)


class JSCCDecoder(nn.Module):
    def __init__(self, d_model: int, n_symbols: int):
        super().__init__()
        # Input per token: received symbols (2C reals), which of them were sent (C), SNR.
        self.from_symbols = nn.Sequential(
            nn.Linear(3 * n_symbols + 1, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )
        self.norm = nn.LayerNorm(d_model)  # the LAM decoder expects unit-scale memory

    def forward(self, received: Tensor, mask: Tensor, snr_db: Tensor) -> Tensor:
        b, t, c = received.shape
        x = torch.view_as_real(received * mask).reshape(b, t, 2 * c)  # unsent -> exact 0
        snr_feat = (snr_db / 10.0).reshape(b, 1, 1).expand(b, t, 1)
        return self.norm(self.from_symbols(torch.cat([x, mask, snr_feat], dim=-1)))
