"""Channel statistics: the configured SNR is what the receiver sees; fading keeps E|h|^2 = 1."""

import math

import pytest
import torch

from common.config import ChannelConfig
from models.channel import WirelessChannel, awgn_channel, fading_channel, fading_coefficients
from models.jscc import JSCCDecoder, JSCCEncoder, rate_for_snr


def unit_power_symbols(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return x / x.abs().pow(2).mean().sqrt()


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 20.0])
def test_awgn_empirical_snr_matches_configured(snr_db):
    x = unit_power_symbols((64, 4096))
    g = torch.Generator().manual_seed(1)
    y = awgn_channel(x, torch.full((64,), snr_db), g)
    noise = y - x
    measured = 10 * math.log10(x.abs().pow(2).mean() / noise.abs().pow(2).mean())
    assert abs(measured - snr_db) < 0.1
    # Noise is circular: real and imaginary parts carry half the power each.
    assert noise.real.var().item() == pytest.approx(noise.imag.var().item(), rel=0.05)


def test_per_example_snr_is_respected():
    x = unit_power_symbols((2, 100_000))
    y = awgn_channel(x, torch.tensor([0.0, 20.0]), torch.Generator().manual_seed(2))
    p = (y - x).abs().pow(2).mean(dim=1)
    assert p[0].item() == pytest.approx(1.0, rel=0.03)
    assert p[1].item() == pytest.approx(0.01, rel=0.03)


@pytest.mark.parametrize("kind, k", [("rayleigh", 0.0), ("rician", 0.0), ("rician", 4.0),
                                     ("rician", 20.0)])
def test_fading_has_unit_mean_power(kind, k):
    h = fading_coefficients(200_000, kind, k, torch.Generator().manual_seed(3))
    assert h.abs().pow(2).mean().item() == pytest.approx(1.0, abs=0.015)


def test_rician_k_factor_sets_los_share():
    # |h|^2 has variance (1 + 2K) / (K + 1)^2 for unit power: K = 0 is Rayleigh (var 1),
    # large K approaches a pure line of sight (var -> 0).
    for k in (0.0, 4.0, 20.0):
        h = fading_coefficients(200_000, "rician", k, torch.Generator().manual_seed(4))
        expected = (1 + 2 * k) / (k + 1) ** 2
        assert h.abs().pow(2).var().item() == pytest.approx(expected, rel=0.05)


def test_fading_with_mmse_recovers_symbols_at_high_snr():
    x = unit_power_symbols((512, 64))
    g = torch.Generator().manual_seed(5)
    for kind in ("rayleigh", "rician"):
        hi = fading_channel(x, torch.full((512,), 30.0), kind, 4.0, g)
        lo = fading_channel(x, torch.full((512,), 0.0), kind, 4.0, g)
        err_hi = (hi - x).abs().pow(2).mean().item()
        err_lo = (lo - x).abs().pow(2).mean().item()
        assert err_hi < 0.05 < err_lo


def test_snr_range_is_sampled_per_example():
    ch = WirelessChannel(ChannelConfig(kind="awgn", snr_range_db=[0.0, 20.0]))
    snr = ch.sample_snr_db(10_000, generator=torch.Generator().manual_seed(6))
    assert 0.0 <= snr.min() and snr.max() <= 20.0
    assert snr.mean().item() == pytest.approx(10.0, abs=0.3)
    fixed = WirelessChannel(ChannelConfig(kind="awgn", snr_db=7.0)).sample_snr_db(4)
    assert torch.equal(fixed, torch.full((4,), 7.0))


def test_jscc_rate_falls_with_snr_and_power_is_unit():
    torch.manual_seed(0)
    enc = JSCCEncoder(d_model=32, n_symbols=8, min_rate=0.25, rate_snr_db=(0.0, 20.0))
    tokens = torch.randn(4, 16, 32)
    snr = torch.tensor([-5.0, 0.0, 10.0, 20.0])
    out = enc(tokens, snr)
    # Importance starts even: every token sends round(rate * C) symbols, as a prefix.
    assert out.symbols_sent.tolist() == [128.0, 128.0, 16 * 5.0, 16 * 2.0]
    hard = out.mask.detach()
    assert torch.equal(hard[3, 0], torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0]))
    power = (out.symbols.abs() ** 2).sum(dim=(1, 2)) / out.symbols_sent
    assert torch.allclose(power, torch.ones(4), atol=1e-5)
    # Unsent symbols carry exactly zero energy.
    assert out.symbols[hard == 0].abs().max().item() == 0.0
    assert rate_for_snr(torch.tensor([30.0]), 0.25, 0.0, 20.0).item() == 0.25


def test_jscc_gives_important_tokens_more_symbols_within_budget():
    from models.jscc import symbol_allocation

    scores = torch.tensor([[0.5, 0.0, 0.0, -0.5]])
    counts = symbol_allocation(scores, torch.tensor([0.5]), 8)  # budget 16 of 32
    assert counts[0, 0] > counts[0, 1] == counts[0, 2] > counts[0, 3]
    assert counts.min() >= 1.0 and counts.max() <= 8.0
    assert counts.sum().item() == pytest.approx(16.0)  # no clipping needed here
    clipped = symbol_allocation(torch.tensor([[3.0, 0.0, 0.0, -3.0]]), torch.tensor([0.5]), 8)
    assert clipped.tolist() == [[8.0, 1.0, 1.0, 1.0]]  # within [1, C]: the budget bends


def test_jscc_importance_gets_gradient_through_the_hard_mask():
    torch.manual_seed(0)
    enc = JSCCEncoder(d_model=16, n_symbols=4, min_rate=0.5, rate_snr_db=(0.0, 20.0))
    dec = JSCCDecoder(d_model=16, n_symbols=4)
    tokens = torch.randn(2, 8, 16)
    snr = torch.full((2,), 20.0)
    out = enc(tokens, snr)
    dec(out.symbols, out.mask, snr).pow(2).sum().backward()
    assert enc.importance.weight.grad is not None
    assert enc.importance.weight.grad.abs().sum() > 0
