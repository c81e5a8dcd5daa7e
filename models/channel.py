"""Wireless channels for complex baseband symbols: AWGN, Rayleigh and Rician block fading.

Symbols are complex tensors [batch, ...] normalised by the transmitter to unit average
power, so the per-example SNR fixes the noise variance: sigma^2 = 10^(-SNR_dB / 10).
Fading is flat and block-wise (one coefficient h per example, as over one coherence
interval) with E|h|^2 = 1, and the receiver equalises with perfect CSI (MMSE), the
usual assumption of deep JSCC papers. Written by hand because no maintained library
offers differentiable torch channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from common.config import ChannelConfig


def noise_variance(snr_db: Tensor) -> Tensor:
    """Noise power for unit signal power: sigma^2 = 10^(-SNR/10)."""
    return torch.pow(10.0, -snr_db / 10.0)


def complex_gaussian(shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """CN(0, 1) samples: real and imaginary parts each N(0, 1/2)."""
    re = torch.randn(shape, generator=generator, device=device)
    im = torch.randn(shape, generator=generator, device=device)
    return torch.complex(re, im) / math.sqrt(2.0)


def _per_example(value: Tensor, like: Tensor) -> Tensor:
    """Reshape a [batch] tensor so it broadcasts over the symbol dims of `like`."""
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def awgn_channel(symbols: Tensor, snr_db: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
    """y = x + n, n ~ CN(0, sigma^2)."""
    sigma2 = _per_example(noise_variance(snr_db), symbols)
    noise = complex_gaussian(tuple(symbols.shape), generator, symbols.device)
    return symbols + torch.sqrt(sigma2) * noise


def fading_coefficients(batch: int, kind: str, rician_k: float = 0.0,
                        generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> Tensor:
    """One h per example with E|h|^2 = 1.

    Rayleigh: h ~ CN(0, 1). Rician with K-factor K (linear, LOS / scattered power):
    h = sqrt(K/(K+1)) e^{j phi} + sqrt(1/(K+1)) CN(0, 1), phi uniform.
    """
    scattered = complex_gaussian((batch,), generator, device)
    if kind == "rayleigh":
        return scattered
    if kind != "rician":
        raise ValueError(f"fading kind {kind!r} unknown; use 'rayleigh' or 'rician'")
    phi = 2 * math.pi * torch.rand((batch,), generator=generator, device=device)
    los = torch.polar(torch.ones_like(phi), phi)
    return math.sqrt(rician_k / (rician_k + 1)) * los + math.sqrt(1 / (rician_k + 1)) * scattered


def fading_channel(symbols: Tensor, snr_db: Tensor, kind: str, rician_k: float = 0.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """y = h x + n, then MMSE equalisation x_hat = conj(h) y / (|h|^2 + sigma^2)."""
    h = fading_coefficients(symbols.shape[0], kind, rician_k, generator, symbols.device)
    h = _per_example(h, symbols)
    sigma2 = _per_example(noise_variance(snr_db), symbols)
    y = awgn_channel(h * symbols, snr_db, generator)
    return torch.conj(h) * y / (h.abs() ** 2 + sigma2)


class WirelessChannel(nn.Module):
    """The configured channel; draws a per-example SNR when a range is configured."""

    def __init__(self, cfg: ChannelConfig):
        super().__init__()
        self.cfg = cfg

    def sample_snr_db(self, batch: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Tensor:
        lo_hi = self.cfg.snr_range_db
        if lo_hi is None:
            return torch.full((batch,), float(self.cfg.snr_db), device=device)
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand((batch,), generator=generator, device=device)

    def forward(self, symbols: Tensor, snr_db: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        kind = self.cfg.kind
        if kind == "none":
            return symbols
        if kind == "awgn":
            return awgn_channel(symbols, snr_db, generator)
        return fading_channel(symbols, snr_db, kind, self.cfg.rician_k, generator)


def analog_transmission(x: Tensor, channel: WirelessChannel, snr_db: Tensor,
                        generator: torch.Generator | None = None) -> Tensor:
    """Send a real feature tensor [B, ...] uncoded through `channel`: pairs of reals
    become complex symbols at unit average power per example, and the receiver
    rescales with the transmitted power (a few bytes of side information). The split
    uses it for the server's output on the downlink."""
    if channel.cfg.kind == "none":
        return x
    b, n = x.shape[0], x[0].numel()
    flat = x.reshape(b, n)
    if n % 2:
        flat = torch.cat([flat, flat.new_zeros(b, 1)], dim=1)
    z = torch.view_as_complex(flat.reshape(b, -1, 2).contiguous())
    scale = torch.sqrt((z.abs() ** 2).mean(dim=1, keepdim=True) + 1e-12)
    y = channel(z / scale, snr_db, generator) * scale
    return torch.view_as_real(y).reshape(b, -1)[:, :n].reshape(x.shape)
