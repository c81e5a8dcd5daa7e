"""Input reconstruction from split training's uplink: can the server see the images?

In U-shaped split training of `mtsc` the server receives, for every example, the JSCC
symbols after the uplink channel (packed, through the wire codec) and their counts
(fl_client/split_handlers.py, `activation_record`). The attacker is the server with black-box
query access to the client's half (He et al., "Model Inversion Attacks against
Collaborative Inference", ACSAC 2019): it sends public images through the client's
uplink, trains an inversion decoder (activations -> image) on those pairs, and runs it
on what the client's private images produce. It is scored by PSNR on the client's
training images against a baseline that always answers the mean public image, with
and without channel noise and wire compression.

The attack on a finished run, with its report: reports/inversion.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import Tensor, nn

from common.config import ChannelConfig, ExperimentConfig
from common.seeding import seeded
from models.channel import WirelessChannel
from models.jscc import sent_positions
from models.split_wire import decode, encode, pack_symbols, unpack_symbols

# The conditions scored: (label, channel noise on, wire codec).
CONDITIONS = (("noiseless channel, float32", False, "none"),
              ("channel noise, float32", True, "none"),
              ("channel noise, float16", True, "float16"),
              ("channel noise, int8", True, "int8"))


def uplink_view(model, images: Tensor, channel_cfg: ChannelConfig, noisy: bool, codec: str,
                seed: int) -> Tensor:
    """What the server receives for `images` [B,3,S,S], as one feature row per example:
    the received symbols (zeros where nothing was sent) after the wire codec, and the
    soft symbol counts."""
    rows = []
    with torch.no_grad(), seeded(seed):
        model.eval()
        device = next(model.parameters()).device
        clean = WirelessChannel(dataclasses.replace(channel_cfg, model="none"))
        for start in range(0, len(images), 256):
            batch = {"image": images[start:start + 256].to(device)}
            snr = model.channel.sample_snr_db(len(batch["image"]), device)
            channel = model.channel
            if not noisy:
                model.channel = clean
            try:
                tx, received, _ = model.uplink(batch, snr)
            finally:
                model.channel = channel
            sent = sent_positions(tx.counts, received.shape[-1])
            wire = encode("symbols", pack_symbols(received, sent), codec)
            symbols = unpack_symbols(decode(ArrayRecord(wire), "symbols").to(device), sent)
            rows.append(torch.cat([torch.view_as_real(symbols).flatten(1), tx.counts], 1).cpu())
    return torch.cat(rows)


class InversionDecoder(nn.Module):
    """Activations -> image: an MLP to a coarse map, then transposed convolutions."""

    def __init__(self, features: int, image_size: int, hidden: int = 512):
        super().__init__()
        self.side = image_size // 4
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(),
                                 nn.Linear(hidden, 64 * self.side * self.side), nn.GELU())
        self.up = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.GELU(),
                                nn.ConvTranspose2d(32, 3, 4, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.net(x).view(-1, 64, self.side, self.side))


def train_decoder(features: Tensor, images: Tensor, epochs: int, seed: int) -> InversionDecoder:
    torch.manual_seed(seed)
    scale = features.abs().mean().clamp_min(1e-6)
    decoder = InversionDecoder(features.shape[1], images.shape[-1])
    decoder.scale = float(scale)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=gen).split(64):
            loss = nn.functional.mse_loss(decoder(features[idx] / scale), images[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return decoder


def psnr(x: Tensor, y: Tensor) -> float:
    """PSNR in dB of images in [0, 1], from the mean squared error over the set."""
    mse = float(((x.clamp(0, 1) - y) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def invert(model, cfg: ExperimentConfig, public: Tensor, private: Tensor, epochs: int,
           seed: int = 0, conditions=CONDITIONS) -> list[dict[str, Any]]:
    """Train one inversion decoder per condition on `public`; score it on `private`."""
    baseline = psnr(public.mean(0, keepdim=True).expand_as(private), private)
    rows = []
    for name, noisy, codec in conditions:
        feats_pub = uplink_view(model, public, cfg.channel, noisy, codec, seed)
        feats_priv = uplink_view(model, private, cfg.channel, noisy, codec, seed + 1)
        decoder = train_decoder(feats_pub, public, epochs, seed)
        with torch.no_grad():
            recon = decoder(feats_priv / decoder.scale)
        rows.append({"condition": name, "channel_noise": noisy, "codec": codec,
                     "psnr_db": psnr(recon, private), "mean_image_psnr_db": baseline,
                     "examples": recon[:8].clamp(0, 1)})
    return rows
