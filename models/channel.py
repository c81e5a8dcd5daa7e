"""Wireless channels for complex baseband symbols, from Sionna's PHY (`sionna.phy`,
PyTorch): AWGN, Rayleigh block fading, and the 3GPP TR 38.901 tapped-delay-line models
TDL-A to TDL-E on an OFDM resource grid (D and E carry a line-of-sight path), the
receiver equalising with perfect or least-squares-estimated channel state.

This module is the thin adapter that maps our tensors and SNR convention onto Sionna's:

- Symbols are complex [batch, ...] at unit average power per example, so the
  per-example SNR (Es/N0, dB) is Sionna's noise variance per complex symbol:
  no = 10^(-SNR / 10). Fading keeps E|h|^2 = 1.
- Rayleigh block fading draws one coefficient per example (one coherence interval);
  the TDL models put an example's symbols on the data resource elements of an OFDM grid
  (`channel.fft_size` subcarriers, 14-symbol slots with pilots on symbols 2 and 11, as
  many slots as the example needs) and the channel varies over it with the delay
  spread and the Doppler of `channel.speed_mps`.
- The receiver equalises with Sionna's LMMSE equaliser, which returns the unbiased
  estimate and its effective noise no_eff; we hand on the MMSE estimate
  x_hat / (1 + no_eff), which stays bounded in a deep fade as the learned decoders
  after the channel expect (for one antenna it is conj(h) y / (|h|^2 + no)).
- Sionna draws every random number from one generator per device
  (`sionna.phy.config.torch_rng`). Split training needs both parties to draw the same
  noise from a generator keyed by (seed, partition, round, step), and a seeded
  evaluation the same draws every time, so for the length of a call Sionna draws from
  the caller's generator, or from torch's default one when none is given (`seeded`
  blocks then repeat).

Sionna is imported on the first transmission (a config check never loads it), in a way
that leaves torch's random state as the caller had it (`import_sionna`).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor, nn

from common.config import ChannelConfig

SLOT_SYMBOLS = 14  # OFDM symbols per slot (5G NR, normal cyclic prefix)
PILOT_SYMBOLS = (2, 11)  # the slot's pilot OFDM symbols (two DMRS positions)


def noise_variance(snr_db: Tensor) -> Tensor:
    """Noise power per complex symbol for unit signal power: no = 10^(-SNR/10)."""
    return torch.pow(10.0, -snr_db / 10.0)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    return torch.default_generator


@functools.lru_cache(maxsize=1)
def import_sionna() -> None:
    """Import the Sionna modules we use, once, without touching the caller's random
    state: importing `sionna.phy` reseeds torch's default generator from entropy
    (its config seeds its own generators at random), which would make every seeded run
    that first transmits after seeding draw differently each time."""
    with torch.random.fork_rng():
        import sionna.phy  # noqa: F401
        import sionna.phy.channel  # noqa: F401
        import sionna.phy.channel.tr38901  # noqa: F401
        import sionna.phy.fec.crc  # noqa: F401
        import sionna.phy.fec.ldpc  # noqa: F401
        import sionna.phy.mapping  # noqa: F401
        import sionna.phy.mimo  # noqa: F401
        import sionna.phy.ofdm  # noqa: F401


@contextlib.contextmanager
def _draws_from(generator: torch.Generator | None, device: torch.device):
    """Sionna's draws come from `generator` (torch's default one if None) in the block."""
    import_sionna()
    from sionna.phy import config

    gen = generator if generator is not None else _default_generator(device)
    before = config.__dict__.get("torch_rng")
    config.torch_rng = lambda device=None: gen  # shadows the method on this instance
    try:
        yield
    finally:
        if before is None:
            del config.torch_rng
        else:
            config.torch_rng = before


@functools.lru_cache(maxsize=8)
def _awgn(device: str):
    from sionna.phy.channel import AWGN

    return AWGN(device=device)


@functools.lru_cache(maxsize=8)
def _flat_fading(device: str):
    from sionna.phy.channel import GenerateFlatFadingChannel

    return GenerateFlatFadingChannel(num_tx_ant=1, num_rx_ant=1, device=device)


@functools.lru_cache(maxsize=16)
def _ofdm_link(cfg: tuple, slots: int, device: str):
    """The TDL model on a grid of `slots` slots, its mapper, channel, LS estimator and
    LMMSE equaliser (one transmitter, one stream, one antenna each side)."""
    from sionna.phy.channel import OFDMChannel
    from sionna.phy.channel.tr38901 import TDL
    from sionna.phy.mimo import StreamManagement
    from sionna.phy.ofdm import (
        LMMSEEqualizer,
        LSChannelEstimator,
        ResourceGrid,
        ResourceGridMapper,
    )

    model, delay_spread_ns, carrier_ghz, speed_mps, scs_khz, fft_size = cfg
    # The grid draws its pilot symbols when it is made: a fixed sequence, known to both
    # ends and the same in every process, however many links it made before.
    with _draws_from(torch.Generator(device).manual_seed(0), torch.device(device)):
        grid = ResourceGrid(num_ofdm_symbols=SLOT_SYMBOLS * slots, fft_size=fft_size,
                            subcarrier_spacing=scs_khz * 1e3, pilot_pattern="kronecker",
                            pilot_ofdm_symbol_indices=[s * SLOT_SYMBOLS + p for s in range(slots)
                                                       for p in PILOT_SYMBOLS], device=device)
    tdl = TDL(model[-1].upper(), delay_spread_ns * 1e-9, carrier_ghz * 1e9,
              min_speed=speed_mps, max_speed=speed_mps, device=device)
    return (grid, ResourceGridMapper(grid, device=device),
            OFDMChannel(tdl, grid, normalize_channel=True, return_channel=True, device=device),
            LSChannelEstimator(grid, interpolation_type="lin_time_avg", device=device),
            LMMSEEqualizer(grid, StreamManagement([[1]], 1), device=device))


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
        """The receiver's MMSE estimate of `symbols` [B, ...] after the channel at
        `snr_db` [B]: what a learned decoder after the channel reads."""
        if self.cfg.model in ("none", "awgn"):
            return self.equalise(symbols, snr_db, generator)[0]
        x_hat, no_eff = self.equalise(symbols, snr_db, generator)
        return x_hat / (1 + no_eff)

    def equalise(self, symbols: Tensor, snr_db: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The unbiased estimate of `symbols` [B, ...] and its noise variance per symbol
        (no_eff), what a soft demapper needs (models/digital_phy.py)."""
        model = self.cfg.model
        no = noise_variance(snr_db.float())
        if model == "none":  # error-free: a tiny noise variance keeps LLRs finite
            return symbols, torch.full(symbols.shape, 1e-10, device=symbols.device)
        import_sionna()  # before any block is built (the TDL grid's imports run first)
        if model == "awgn":
            with _draws_from(generator, symbols.device):
                y = _awgn(str(symbols.device))(symbols, no)
            return y, no.reshape(-1, *[1] * (symbols.dim() - 1)).expand(symbols.shape)
        flat = symbols.reshape(symbols.shape[0], -1)
        if model == "rayleigh":
            x_hat, no_eff = self._rayleigh(flat, no, generator)
        else:
            x_hat, no_eff = self._tdl(flat, no, generator)
        return x_hat.reshape(symbols.shape), no_eff.reshape(symbols.shape)

    def _rayleigh(self, x: Tensor, no: Tensor,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        from sionna.phy.mimo import lmmse_equalizer

        device = str(x.device)
        with _draws_from(generator, x.device):
            h = _flat_fading(device)(x.shape[0])  # [B, 1, 1]: one coefficient per example
            y = _awgn(device)(h[:, :, 0] * x, no[:, None])  # [B, N]
        n = x.shape[1]
        x_hat, no_eff = lmmse_equalizer(y[..., None], h[:, None].expand(-1, n, 1, 1),
                                        no[:, None, None, None].expand(-1, n, 1, 1).to(y.dtype))
        return x_hat[..., 0], no_eff[..., 0]

    def _tdl(self, x: Tensor, no: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        c = self.cfg
        key = (c.model, c.delay_spread_ns, c.carrier_ghz, c.speed_mps,
               c.subcarrier_spacing_khz, c.fft_size)
        per_slot = (SLOT_SYMBOLS - len(PILOT_SYMBOLS)) * c.fft_size
        slots = max(1, math.ceil(x.shape[1] / per_slot))
        grid, mapper, channel, estimator, equaliser = _ofdm_link(key, slots, str(x.device))
        b, n = x.shape
        data = torch.cat([x, x.new_zeros(b, int(grid.num_data_symbols) - n)], dim=1)
        with _draws_from(generator, x.device):
            y, h = channel(mapper(data[:, None, None]), no)
        if c.csi == "perfect":
            h_hat, err_var = h, torch.zeros((), device=x.device)
        else:
            h_hat, err_var = estimator(y, no)
        x_hat, no_eff = equaliser(y, h_hat, err_var, no)
        return x_hat[:, 0, 0, :n], no_eff[:, 0, 0, :n]


def analog_transmission(x: Tensor, channel: WirelessChannel, snr_db: Tensor,
                        generator: torch.Generator | None = None) -> Tensor:
    """Send a real feature tensor [B, ...] uncoded through `channel`: pairs of reals
    become complex symbols at unit average power per example, and the receiver
    rescales with the transmitted power (a few bytes of side information). The split
    uses it for the server's output on the downlink."""
    if channel.cfg.model == "none":
        return x
    b, n = x.shape[0], x[0].numel()
    flat = x.reshape(b, n)
    if n % 2:
        flat = torch.cat([flat, flat.new_zeros(b, 1)], dim=1)
    z = torch.view_as_complex(flat.reshape(b, -1, 2).contiguous())
    scale = torch.sqrt((z.abs() ** 2).mean(dim=1, keepdim=True) + 1e-12)
    y = channel(z / scale, snr_db, generator) * scale
    return torch.view_as_real(y).reshape(b, -1)[:, :n].reshape(x.shape)
