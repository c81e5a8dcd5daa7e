"""The digital physical layer is physics, not plumbing: uncoded QPSK / 16-QAM bit
error rates over AWGN match their closed forms, the 5G LDPC code loses fewer blocks as
the SNR rises and fewer than sending uncoded at the same Eb/N0, the CRC turns every
failed block into a known erasure, and a transport block of any length round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import ChannelConfig
from models import digital_phy as phy
from models.channel import WirelessChannel

AWGN = WirelessChannel(ChannelConfig(model="awgn"))


def _q(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def _ber_closed_form(m: int, ebno_db: float) -> float:
    """Gray-mapped QPSK: Q(sqrt(2 Eb/N0)); square 16-QAM: (3Q(a) + 2Q(3a) - Q(5a)) / 4
    with a = sqrt(4/5 Eb/N0) (Cho and Yoon, IEEE Trans. Commun. 2002)."""
    ebno = 10 ** (ebno_db / 10)
    if m == 2:
        return _q(math.sqrt(2 * ebno))
    a = math.sqrt(0.8 * ebno)
    return (3 * _q(a) + 2 * _q(3 * a) - _q(5 * a)) / 4


def _uncoded_ber(m: int, ebno_db: float, n_bits: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (1, n_bits), generator=g)
    x = phy.qam_map(bits, m)
    snr_db = ebno_db + 10 * math.log10(m)  # Es/N0 = m Eb/N0 without a code
    y, no = AWGN.equalise(x, torch.tensor([snr_db]), g)
    decided = (phy.qam_llr(y, no, m) > 0).to(torch.int64)  # LLR = ln P(1)/P(0)
    return (decided != bits).float().mean().item()


@pytest.mark.parametrize("m, ebno_points", [(2, (0.0, 3.0, 6.0)), (4, (2.0, 5.0, 8.0))])
def test_uncoded_qam_ber_matches_the_closed_form(m, ebno_points):
    for i, ebno_db in enumerate(ebno_points):
        expected = _ber_closed_form(m, ebno_db)
        # >= 2000 expected errors: the estimate's 3-sigma spread is under 7 %
        n_bits = int(math.ceil(2000 / expected / m)) * m
        measured = _uncoded_ber(m, ebno_db, n_bits, seed=i)
        assert measured == pytest.approx(expected, rel=0.10), (m, ebno_db, n_bits)


def test_qam_has_unit_energy():
    bits = torch.randint(0, 2, (1, 6 * 4096), generator=torch.Generator().manual_seed(0))
    for m in (2, 4, 6):
        x = phy.qam_map(bits[:, : m * 4096], m)
        assert (x.abs() ** 2).mean().item() == pytest.approx(1.0, rel=0.05)


def _block_error_rates(mcs: phy.Mcs, ebno_db: float, blocks: int, k: int, seed: int):
    """(coded BLER, uncoded BLER) of `blocks` k-bit blocks at the same Eb/N0 (Eb per
    information bit), the uncoded blocks on the same QAM."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (blocks, k), generator=g)
    snr_coded = ebno_db + 10 * math.log10(mcs.bits_per_channel_use)
    out, ok, _ = phy.transmit(bits, mcs, AWGN, snr_coded, g)
    assert torch.equal(out[ok], bits[ok].to(torch.uint8)), "a block passed its CRC with errors"
    m = mcs.bits_per_symbol
    x = phy.qam_map(bits, m)
    snr_uncoded = torch.full((blocks,), ebno_db + 10 * math.log10(m))
    y, no = AWGN.equalise(x, snr_uncoded, g)
    decided = (phy.qam_llr(y, no, m) > 0).to(torch.int64)
    uncoded_lost = (decided != bits).any(dim=1).float().mean().item()
    return 1 - ok.float().mean().item(), uncoded_lost


def test_ldpc_block_errors_fall_with_snr_and_beat_uncoded():
    mcs = phy.MCS_TABLE[2]  # QPSK, rate 1/2
    rates = [_block_error_rates(mcs, ebno, blocks=60, k=512, seed=i)
             for i, ebno in enumerate((0.0, 1.5, 3.0))]
    coded = [c for c, _ in rates]
    assert coded[0] > 0.5 and coded[-1] < 0.1, coded  # the waterfall
    assert coded[0] >= coded[1] >= coded[2], coded
    # uncoded 512-bit blocks at <= 3 dB Eb/N0 almost always fail
    assert all(c <= u for c, u in rates) and rates[-1][0] < rates[-1][1] - 0.5, rates


def test_failed_crc_is_a_known_erasure():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (40, 300), generator=g)
    out, ok, _ = phy.transmit(bits, phy.MCS_TABLE[-1], AWGN, -5.0, g)
    assert not ok.any()  # 64-QAM rate 5/6 at -5 dB: nothing gets through, and it is known
    out, ok, _ = phy.transmit(bits, phy.MCS_TABLE[0], AWGN, 10.0, g)
    assert ok.all() and torch.equal(out, bits.to(torch.uint8))


@pytest.mark.parametrize("length", [1, 5, 100, phy.MAX_CB_PAYLOAD + 1, 9000])
def test_a_transport_block_of_any_length_round_trips(length):
    bits = torch.randint(0, 2, (2, length), generator=torch.Generator().manual_seed(length))
    clean = WirelessChannel(ChannelConfig(model="none"))
    for mcs in (phy.MCS_TABLE[0], phy.MCS_TABLE[-1]):
        out, ok, uses = phy.transmit(bits, mcs, clean, 0.0)
        assert ok.all() and torch.equal(out, bits.to(torch.uint8))
        assert uses == phy.channel_uses(length, mcs)
        assert phy.capacity_bits(uses, mcs) >= length


def test_capacity_and_channel_uses_agree():
    for mcs in phy.MCS_TABLE:
        for symbols in (0, 50, 1000, 12345):
            cap = phy.capacity_bits(symbols, mcs)
            assert phy.channel_uses(cap, mcs) <= symbols
            assert phy.channel_uses(cap + 1, mcs) > symbols
            # the code's overhead: never more payload than the rate allows
            assert cap <= symbols * mcs.bits_per_channel_use


def test_link_adaptation_and_its_errors():
    for length in (None, 40):
        rows = [phy.mcs_for_snr(s, length).index for s in range(-10, 25)]
        assert rows == sorted(rows) and rows[0] == 0 and rows[-1] == len(phy.MCS_TABLE) - 1
    # a short block takes a more robust row at the same SNR
    assert phy.mcs_for_snr(17.5, 40).index < phy.mcs_for_snr(17.5).index
    assert phy.select_mcs("auto", 7.0) == phy.mcs_for_snr(7.0)
    assert phy.select_mcs(3, -10.0) == phy.MCS_TABLE[3]
    with pytest.raises(ValueError, match="'auto' or a row index 0..7"):
        phy.select_mcs(8, 0.0)


def test_bytes_and_bits():
    data = bytes(range(256))
    assert phy.bits_to_bytes(phy.bytes_to_bits(data)) == data
    assert phy.bytes_to_bits(b"\x80").tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
