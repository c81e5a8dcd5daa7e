"""The separate source-channel coding baseline: bit-exact images over a noiseless
channel, the largest quality that fits, and every failure known and counted."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ChannelConfig
from models import digital_phy as phy
from models import separate as sep
from models.channel import WirelessChannel

NOISELESS = WirelessChannel(ChannelConfig(model="none"))
AWGN = WirelessChannel(ChannelConfig(model="awgn"))


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth colour gradients with a little texture: what a codec compresses well."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, size)
    base = torch.stack([x[None, :].expand(size, -1), x[:, None].expand(-1, size),
                        (x[None, :] * x[:, None])])
    return (base[None] * torch.rand(n, 3, 1, 1, generator=g)
            + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("codec", list(sep.CODECS))
def test_noiseless_channel_gives_the_codec_output_bit_exact(codec):
    images = _images()
    budget = 600  # symbols: at 64-QAM 5/6 about 380 bytes, room for AVIF's container
    got = sep.transmit_images(images, [budget] * 4, NOISELESS, 30.0, codec, "auto",
                              torch.zeros(3, 32, 32))
    assert not got.lost.any() and not got.unsent.any()
    for i in range(4):
        pixels = sep.to_uint8(images[i])
        q = int(got.quality[i])
        # what the codec's own decoder gives for the file it wrote, byte for byte
        full = io.BytesIO()
        Image.fromarray(pixels).save(full, sep.CODECS[codec], quality=q)
        expected = np.asarray(Image.open(io.BytesIO(full.getvalue())).convert("RGB"))
        assert np.array_equal(sep.to_uint8(got.images[i]), expected)
        # and it is the largest quality that fits the block
        room = phy.capacity_bits(budget, got.mcs[i]) // 8 - sep.HEADER_BYTES
        versions = sep.all_qualities(pixels, codec)
        assert len(versions[q - 1]) <= room
        assert all(len(versions[k - 1]) > room for k in range(q + 1, 101))


def test_jpeg_header_is_rebuilt_from_the_quality():
    pixels = sep.to_uint8(_images(1)[0])
    for q in (1, 50, 95):
        scan = sep.encode(pixels, "jpeg", q)
        full = io.BytesIO()
        Image.fromarray(pixels).save(full, "JPEG", quality=q)
        assert full.getvalue().endswith(scan) and len(scan) < len(full.getvalue()) - 500
        assert np.array_equal(sep.decode(scan, "jpeg", q, 32, 32),
                              np.asarray(Image.open(full).convert("RGB")))


def test_a_budget_too_small_for_any_quality_is_unsent_and_falls_back():
    images, fallback = _images(2), torch.full((3, 32, 32), 0.5)
    got = sep.transmit_images(images, [8, 8], AWGN, 20.0, "jpeg", "auto", fallback)
    assert got.unsent.all() and not got.lost.any() and (got.quality == 0).all()
    assert torch.equal(got.images, fallback.expand(2, -1, -1, -1))


def test_a_failed_block_is_lost_and_falls_back():
    images, fallback = _images(3), torch.full((3, 32, 32), 0.5)
    g = torch.Generator().manual_seed(0)
    got = sep.transmit_images(images, [400] * 3, AWGN, -8.0, "webp", len(phy.MCS_TABLE) - 1,
                              fallback, g)
    assert got.lost.all() and not got.unsent.any()
    assert torch.equal(got.images, fallback.expand(3, -1, -1, -1))


def test_a_better_channel_buys_a_higher_quality():
    images = _images()
    g = torch.Generator().manual_seed(0)
    low = sep.transmit_images(images, [300] * 4, AWGN, 5.0, "jpeg", "auto", images.mean(0), g)
    high = sep.transmit_images(images, [300] * 4, AWGN, 20.0, "jpeg", "auto", images.mean(0), g)
    assert not low.lost.any() and not high.lost.any()
    assert (high.quality > low.quality).all()
    assert ((high.images - images) ** 2).mean() < ((low.images - images) ** 2).mean()


def test_a_short_block_takes_the_short_block_row():
    images = _images(2)
    got = sep.transmit_images(images, [30, 600], AWGN, 17.5, "jpeg", "auto", images.mean(0))
    # 30 channel uses carry < 256 bits: 64-QAM r=5/6 needs 20.5 dB for a block that short
    assert got.mcs[0] == phy.mcs_for_snr(17.5, 40) and got.mcs[1] == phy.mcs_for_snr(17.5)
    assert got.mcs[0].index < got.mcs[1].index


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="jpeg, webp, avif"):
        sep.transmit_images(_images(1), [100], AWGN, 10.0, "bpg", "auto", torch.zeros(3, 32, 32))
