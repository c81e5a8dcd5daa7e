"""Input reconstruction from split training's uplink: can the server see the images?

    python -m privacy.inversion --run runs/<id> [--partition 0] [--public 2000] [--epochs 40]

In U-shaped split training of `mtsc` the server receives, for every example, the JSCC
symbols after the uplink channel (packed, through the wire codec) and their counts
(fl_client/split.py, `activation_record`). The attacker is the server with black-box
query access to the client's half (He et al., "Model Inversion Attacks against
Collaborative Inference", ACSAC 2019): it sends public images through the client's
uplink, trains an inversion decoder (activations -> image) on those pairs, and runs it
on what the client's private images produce. It is scored by PSNR on the client's
training images against a baseline that always answers the mean public image, with
and without channel noise and wire compression.

The client's half comes from a finished run (federated or split: the transmitter and
JSCC are the same modules); the public images are synthetic scenes that no client holds.
Writes `<run>/inversion-client-<p>/inversion.json` and `inversion.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from rich.console import Console
from torch import Tensor, nn

from common.config import ExperimentConfig
from common.data.scenes import HELD_OUT_START, SyntheticScenes
from common.device import resolve_device
from common.records import plt
from common.seeding import seeded
from models import get_workload
from models.channel import WirelessChannel
from models.jscc import sent_positions
from models.split import decode, encode, pack_symbols, unpack_symbols
from privacy.audit import AuditError, client_model, finished_run, private_state

# The conditions scored: (label, channel noise on, wire codec).
CONDITIONS = (("noiseless channel, float32", False, "none"),
              ("channel noise, float32", True, "none"),
              ("channel noise, float16", True, "float16"),
              ("channel noise, int8", True, "int8"))


def uplink_view(model, images: Tensor, cfg: ExperimentConfig, noisy: bool, codec: str,
                seed: int) -> Tensor:
    """What the server receives for `images` [B,3,S,S], as one feature row per example:
    the received symbols (zeros where nothing was sent) after the wire codec, and the
    soft symbol counts."""
    rows = []
    with torch.no_grad(), seeded(seed):
        model.eval()
        device = next(model.parameters()).device
        clean = WirelessChannel(dataclasses.replace(cfg.channel, kind="none"))
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
        feats_pub = uplink_view(model, public, cfg, noisy, codec, seed)
        feats_priv = uplink_view(model, private, cfg, noisy, codec, seed + 1)
        decoder = train_decoder(feats_pub, public, epochs, seed)
        with torch.no_grad():
            recon = decoder(feats_priv / decoder.scale)
        rows.append({"condition": name, "channel_noise": noisy, "codec": codec,
                     "psnr_db": psnr(recon, private), "mean_image_psnr_db": baseline,
                     "examples": recon[:8].clamp(0, 1)})
    return rows


def plot(rows: list[dict[str, Any]], private: Tensor, path: Path, title: str) -> None:
    n = min(8, len(private))
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(1.3 * n, 1.4 * (len(rows) + 1)),
                             squeeze=False)
    grids = [("client's image", private[:n])] + [
        (f"{r['condition']}\n{r['psnr_db']:.1f} dB", r["examples"][:n]) for r in rows]
    for i, (label, imgs) in enumerate(grids):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privacy.inversion",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the folder of a finished mtsc run")
    parser.add_argument("--partition", type=int, default=0, help="the client attacked")
    parser.add_argument("--public", type=int, default=2000, help="public scenes to train on")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--state-dir", default=None,
                        help="where the clients kept their private state (default: the run's)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    run = Path(args.run)
    try:
        cfg, global_state = finished_run(run, allow_split=True)
        if cfg.workload != "mtsc":
            raise AuditError(f"--run {run}: workload {cfg.workload!r}; the inversion attack "
                             "reads mtsc's uplink (its JSCC symbols)")
        if not 0 <= args.partition < cfg.num_clients:
            raise AuditError(f"--partition {args.partition}: use 0..{cfg.num_clients - 1}")
        saved = private_state(cfg, run, args.partition, args.state_dir)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = resolve_device(args.device or cfg.device)
    model = client_model(cfg, saved, global_state, args.partition, device)
    train, _ = get_workload("mtsc").load_data(cfg, args.partition, cfg.num_clients)
    private = train.tensors["image"]
    first = HELD_OUT_START // 2  # scenes no client, teacher or membership audit uses
    public = SyntheticScenes(cfg.data, np.arange(first, first + args.public)).tensors["image"]
    console.print(f"inversion decoders on {len(public)} public scenes, scored on partition "
                  f"{args.partition}'s {len(private)} training images")
    rows = invert(model, cfg, public, private, args.epochs)
    out = run / f"inversion-client-{args.partition}"
    out.mkdir(exist_ok=True)
    plot(rows, private, out / "inversion.png", f"{run.name}: inversion of the uplink, "
         f"partition {args.partition}")
    for r in rows:
        r.pop("examples")
    (out / "inversion.json").write_text(json.dumps(rows, indent=2))
    print("| condition | inversion PSNR (dB) | mean-image PSNR (dB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['condition']} | {r['psnr_db']:.2f} | {r['mean_image_psnr_db']:.2f} |")
    console.print(f"wrote {out / 'inversion.json'} and {out / 'inversion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
