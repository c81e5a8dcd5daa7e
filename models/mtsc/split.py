"""The U-shaped split of LAM-MTSC (federated split fine-tuning): the client keeps the
transmitter (modality encoders, LAM encoder + LoRA, JSCC encoder) and the task decoders
with its labels; the server keeps the receiver (JSCC decoder, LAM decoder + LoRA).
The messages are fl_client/split_handlers.py and fl_server/split_loop.py; what crosses the cut and
its codecs are models/split_wire.py."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from common.data import load_partition
from common.seeding import round_seed
from models.channel import WirelessChannel, analog_transmission
from models.jscc import prefix_mask
from models.mtsc.model import Q_CLS, MTSCModel, Receiver, build, data_needs, set_trainable
from models.split_wire import DOWNLINK, UPLINK, batch_plan, step_generator

CLIENT_HALF = ("transmitter.", "task_decoders.")

# The row of the server half's output that feeds the classification head: what a
# label-leakage attacker on the server looks at (privacy/label_leakage.py).
LABEL_ROW = Q_CLS


def client_parameters(model: MTSCModel) -> dict[str, nn.Parameter]:
    """Everything the client trains in split mode (the LAM's base weights are frozen)."""
    return {n: p for n, p in model.named_parameters()
            if n.startswith(CLIENT_HALF) and ("lam_" not in n or "lora_" in n)}


def server_half(model: MTSCModel) -> Receiver:
    return model.receiver


def server_forward(receiver: Receiver, received: Tensor, counts: Tensor,
                   snr_db: Tensor) -> Tensor:
    """The server half on what arrived; the prefix mask is rebuilt from the counts, so
    the importance scores' gradient flows back through them."""
    return receiver(received, prefix_mask(counts, received.shape[-1]), snr_db)


def end_to_end_steps(cfg, partition_id: int, num_partitions: int, rnd: int, steps: int):
    """The split's reference: the same steps on the whole model in one process (one
    graph, one AdamW, one backward per step), on the batches and channel draws that the
    split client and server use. Returns (model, seconds per step)."""
    model = build(cfg)
    set_trainable(model, "ab")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    train_ds, _ = load_partition(cfg.data, partition_id, num_partitions, cfg.model.caption_len,
                                 needs=data_needs(cfg))
    plan = batch_plan(len(train_ds), cfg.train.batch_size, steps,
                      round_seed(cfg.seed, rnd, partition_id))
    downlink = WirelessChannel(cfg.split.downlink)
    batches = [default_collate([train_ds[int(i)] for i in idx]) for idx in plan]
    t0 = time.perf_counter()
    for k, batch in enumerate(batches):
        up = step_generator(cfg.seed, partition_id, rnd, k, UPLINK)
        down = step_generator(cfg.seed, partition_id, rnd, k, DOWNLINK)
        h, _ = model(batch, generator=up)
        h = analog_transmission(h, downlink, downlink.sample_snr_db(h.shape[0], "cpu", down), down)
        losses = model.task_decoders.losses(h, batch)
        loss = sum(cfg.train.loss_weights.get(t, 1.0) * v for t, v in losses.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, (time.perf_counter() - t0) / max(steps, 1)
