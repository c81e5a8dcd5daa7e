"""Channels (Sionna's PHY through models/channel.py): the configured SNR is the noise the
receiver sees, fading keeps E|h|^2 = 1, the equalised symbols come back at high SNR and
gradients reach the transmitter, the caller's generator makes every draw repeatable,
LS estimation costs against perfect CSI, and the JSCC's rates and power."""

import math

import pytest
import torch

from common.config import ChannelConfig, ConfigError, load_config
from models.channel import WirelessChannel, noise_variance
from models.jscc import JSCCDecoder, JSCCEncoder, rate_for_snr

FADING = ("rayleigh", "tdl-a", "tdl-b", "tdl-c", "tdl-d", "tdl-e")


def unit_power_symbols(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return x / x.abs().pow(2).mean().sqrt()


def channel(model, **kw):
    return WirelessChannel(ChannelConfig(model=model, **kw))


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 20.0])
def test_awgn_empirical_snr_matches_configured(snr_db):
    x = unit_power_symbols((64, 4096))
    y = channel("awgn")(x, torch.full((64,), snr_db), torch.Generator().manual_seed(1))
    noise = y - x
    measured = 10 * math.log10(x.abs().pow(2).mean() / noise.abs().pow(2).mean())
    assert abs(measured - snr_db) < 0.1
    # Noise is circular: real and imaginary parts carry half the power each.
    assert noise.real.var().item() == pytest.approx(noise.imag.var().item(), rel=0.05)
    assert noise.abs().pow(2).mean().item() == pytest.approx(
        noise_variance(torch.tensor(snr_db)).item(), rel=0.02)


def test_per_example_snr_is_respected():
    x = unit_power_symbols((2, 100_000))
    y = channel("awgn")(x, torch.tensor([0.0, 20.0]), torch.Generator().manual_seed(2))
    p = (y - x).abs().pow(2).mean(dim=1)
    assert p[0].item() == pytest.approx(1.0, rel=0.03)
    assert p[1].item() == pytest.approx(0.01, rel=0.03)


@pytest.mark.parametrize("model", FADING)
def test_fading_keeps_unit_power_and_equalised_symbols_return_at_high_snr(model):
    x = unit_power_symbols((256, 700))  # 700 symbols: a TDL example spans two slots
    g = torch.Generator().manual_seed(5)
    ch = channel(model, speed_mps=3.0)
    hi = ch(x, torch.full((256,), 40.0), g)
    lo = ch(x, torch.full((256,), 0.0), g)
    err_hi = (hi - x).abs().pow(2).mean().item()
    err_lo = (lo - x).abs().pow(2).mean().item()
    assert err_hi < 0.02 < 0.1 < err_lo
    # The MMSE estimate shrinks towards 0 where the channel is weak, never blows up.
    assert lo.abs().max().item() < 50


@pytest.mark.parametrize("model", FADING)
def test_fading_has_unit_mean_power(model):
    # The equalised output hides h, so this reads the coefficients the adapter's Sionna
    # blocks draw: one per example (Rayleigh), one per resource element (TDL).
    from models import channel as adapter

    if model == "rayleigh":
        h = adapter._flat_fading("cpu")(200_000)
    else:
        key = (model, 100.0, 3.5, 0.0, 30.0, 64)
        _, mapper, ofdm, _, _ = adapter._ofdm_link(key, 1, "cpu")
        grid = mapper(torch.ones(2000, 1, 1, 12 * 64, dtype=torch.complex64))
        _, h = ofdm(grid, torch.full((2000,), 1e-6))
    assert h.abs().pow(2).mean().item() == pytest.approx(1.0, abs=0.03)


def test_tdl_d_and_e_have_a_line_of_sight_so_they_fade_less_than_rayleigh():
    x = unit_power_symbols((512, 64))
    g = torch.Generator().manual_seed(9)
    errors = {m: (channel(m)(x, torch.full((512,), 10.0), g) - x).abs().pow(2).mean().item()
              for m in ("rayleigh", "tdl-a", "tdl-d", "tdl-e")}
    assert errors["tdl-d"] < errors["rayleigh"] and errors["tdl-e"] < errors["rayleigh"]


def test_ls_estimated_csi_costs_against_perfect_csi_and_fades_away_with_snr():
    x = unit_power_symbols((256, 384))
    g = torch.Generator().manual_seed(7)
    err = {}
    for csi in ("perfect", "ls"):
        for snr in (5.0, 30.0):
            y = channel("tdl-a", csi=csi)(x, torch.full((256,), snr), g)
            err[csi, snr] = (y - x).abs().pow(2).mean().item()
    assert err["ls", 5.0] > err["perfect", 5.0] * 1.05
    assert err["ls", 30.0] < 0.1 and err["ls", 30.0] < err["ls", 5.0]


@pytest.mark.parametrize("model", ("awgn", "rayleigh", "tdl-d"))
def test_gradients_reach_the_transmitter_through_the_channel(model):
    torch.manual_seed(0)
    enc = torch.nn.Linear(8, 32)
    z = enc(torch.randn(16, 8))
    symbols = torch.view_as_complex(z.reshape(16, 16, 2))
    symbols = symbols / symbols.abs().pow(2).mean(dim=1, keepdim=True).sqrt()
    y = channel(model)(symbols, torch.full((16,), 10.0), torch.Generator().manual_seed(3))
    torch.view_as_real(y).pow(2).sum().backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model", ("awgn", "rayleigh", "tdl-c"))
def test_the_same_generator_seed_gives_the_same_channel_and_another_seed_another(model):
    x = unit_power_symbols((8, 200))
    snr = torch.full((8,), 5.0)
    a = channel(model)(x, snr, torch.Generator().manual_seed(11))
    # Another symbol count in between makes another OFDM grid (with its pilots): it must
    # not take draws from the next call's generator.
    channel(model)(unit_power_symbols((8, 900)), snr, torch.Generator().manual_seed(11))
    b = channel(model)(x, snr, torch.Generator().manual_seed(11))
    c = channel(model)(x, snr, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Without a generator the draws follow torch's own seed (as `seeded` blocks do).
    torch.manual_seed(4)
    d = channel(model)(x, snr)
    torch.manual_seed(4)
    assert torch.equal(d, channel(model)(x, snr))


def test_a_wrong_channel_name_or_value_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'channel.model'.*'tdl-a'.*'tdl-e'"):
        load_config("configs/quickstart.yaml", ["channel.model=rician"])
    with pytest.raises(ConfigError, match="channel.rician_k.*tdl-d or tdl-e"):
        load_config("configs/quickstart.yaml", ["channel.rician_k=4"])
    with pytest.raises(ConfigError, match="'channel.subcarrier_spacing_khz'.*15, 30, 60"):
        load_config("configs/quickstart.yaml", ["channel.subcarrier_spacing_khz=20"])
    with pytest.raises(ConfigError, match="'split.downlink.csi'.*'perfect'.*'ls'"):
        load_config("configs/quickstart.yaml", ["split.downlink.csi=mmse"])


def test_snr_range_is_sampled_per_example():
    ch = WirelessChannel(ChannelConfig(model="awgn", snr_range_db=[0.0, 20.0]))
    snr = ch.sample_snr_db(10_000, generator=torch.Generator().manual_seed(6))
    assert 0.0 <= snr.min() and snr.max() <= 20.0
    assert snr.mean().item() == pytest.approx(10.0, abs=0.3)
    fixed = WirelessChannel(ChannelConfig(model="awgn", snr_db=7.0)).sample_snr_db(4)
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


def test_importing_sionna_leaves_a_seeded_callers_draws_alone():
    """Importing sionna.phy reseeds torch's default generator from entropy; the first
    transmission of a fresh process (which imports it) must draw what every later one
    under the same seed draws, and the same in every process."""
    import subprocess
    import sys

    code = ("import torch; from common.config import ChannelConfig; "
            "from models.channel import WirelessChannel; "
            "ch = WirelessChannel(ChannelConfig(model='awgn')); "
            "x = torch.ones(1, 4, dtype=torch.complex64); out = []\n"
            "for _ in range(2):\n"
            "    torch.manual_seed(0); out.append(ch(x, torch.tensor([0.0])))\n"
            "assert torch.equal(out[0], out[1]), out\n"
            "print(out[0].real.sum().item())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()[-1] for _ in range(2)]
    assert runs[0] == runs[1]
