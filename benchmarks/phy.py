"""What Sionna's PHY costs: a training step with the Sionna channel against the same
step with the previous release's hand-written channel, and 5G LDPC decoding time per
information bit (with each MCS row's block error rate at its table threshold).

    python benchmarks/phy.py [--steps 20]

Measured numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import ChannelConfig, load_config  # noqa: E402
from models import digital_phy as phy  # noqa: E402
from models.channel import WirelessChannel, noise_variance  # noqa: E402


class PreviousChannel(WirelessChannel):
    """The hand-written channel Sionna replaced, kept here only as the cost reference:
    AWGN, and Rayleigh block fading (one CN(0, 1) coefficient per example) with the MMSE
    estimate conj(h) y / (|h|^2 + no)."""

    def __init__(self, model: str):
        super().__init__(ChannelConfig(model=model, snr_range_db=[0, 20]))
        self.model = model

    def forward(self, x: Tensor, snr_db: Tensor, generator=None) -> Tensor:
        no = noise_variance(snr_db.float()).reshape(-1, *[1] * (x.dim() - 1))
        noise = torch.complex(torch.randn_like(x.real), torch.randn_like(x.real))
        noise = noise * torch.sqrt(no / 2)
        if self.model == "awgn":
            return x + noise
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        h = torch.complex(torch.randn(shape), torch.randn(shape)) / math.sqrt(2)
        return torch.conj(h) * (h * x + noise) / (h.abs() ** 2 + no)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _step_seconds(model, batch: dict, steps: int) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        h, _ = model(batch)
        loss = sum(model.task_decoders.losses(h, batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    return statistics.median(_seconds(step) for _ in range(steps))


def training_step(steps: int = 20, batch_size: int = 32) -> list[dict]:
    """Median seconds of one mtsc quickstart training step (forward, backward, Adam) on
    one batch, channel by channel: Sionna's against the previous hand-written one."""
    from common.data import load_partition
    from models.mtsc.model import build

    cfg = load_config(ROOT / "configs/quickstart.yaml", ["device=cpu"])
    train, _ = load_partition(cfg.data, 0, cfg.num_clients)
    items = [train[i] for i in range(batch_size)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    model = build(cfg, "cpu").train()
    rows = []
    for name in ("awgn", "rayleigh", "tdl-a"):
        model.channel = WirelessChannel(ChannelConfig(model=name, snr_range_db=[0, 20]))
        sionna_s = _step_seconds(model, batch, steps)
        row = {"channel": name, "batch": batch_size, "sionna_s_per_step": sionna_s}
        if name != "tdl-a":  # the previous release had no OFDM / TDL channel
            model.channel = PreviousChannel(name)
            row["previous_s_per_step"] = _step_seconds(model, batch, steps)
            row["ratio"] = sionna_s / row["previous_s_per_step"]
        rows.append(row)
    return rows


def ldpc_decoding(blocks: int = 100, payload_bits: int = 1000) -> list[dict]:
    """Per MCS row: microseconds per information bit of the receiver's LDPC decoding
    (20 iterations) and of the whole link (CRC, code, QAM, AWGN, demapping), and the
    block error rate at the row's table threshold."""
    channel = WirelessChannel(ChannelConfig(model="awgn"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for mcs in phy.MCS_TABLE:
        bits = torch.randint(0, 2, (blocks, payload_bits), generator=g)
        phy.transmit(bits[:2], mcs, channel, mcs.min_snr_db, g)  # build and warm the blocks
        t0 = time.perf_counter()
        _, ok, symbols = phy.transmit(bits, mcs, channel, mcs.min_snr_db, g)
        link_s = time.perf_counter() - t0
        # the decoder alone, on the LLRs of a transmission at the threshold
        m = mcs.bits_per_symbol
        crc, _, enc, dec = phy._coder(payload_bits + phy.CRC_BITS, symbols * m, m, "cpu")
        x = phy.qam_map(enc(crc(bits.float())), m)
        y, no = channel.equalise(x, torch.full((blocks,), mcs.min_snr_db), g)
        llr = phy.qam_llr(y, no, m)
        decode_s = statistics.median(_seconds(lambda: dec(llr)) for _ in range(3))
        rows.append({"mcs": mcs.name, "threshold_snr_db": mcs.min_snr_db,
                     "bler_at_threshold": 1 - ok.float().mean().item(),
                     "decode_us_per_info_bit": 1e6 * decode_s / (blocks * payload_bits),
                     "link_us_per_info_bit": 1e6 * link_s / (blocks * payload_bits),
                     "blocks": blocks, "payload_bits": payload_bits})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(training_step(args.steps), indent=2))
    print(json.dumps(ldpc_decoding(), indent=2))


if __name__ == "__main__":
    main()
