"""U-shaped split training over Flower messages.

The correctness contract: N split steps through the simulation runtime (Ray) give the
same client and server parameters as N steps of end-to-end training of the whole model
in one process on the same batches and channel draws. Then: compression still learns,
and a client that stops answering does not hang the server.
"""

import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from test_server_rounds import LoopbackGrid

from common.config import load_config
from fl_client.client_app import make_app
from fl_client.node import PRIVATE_STATE, partition
from fl_server.rounds import run_federated
from models.jscc import sent_positions
from models.mtsc import workload as mtsc
from models.mtsc.split import end_to_end_steps
from models.split_wire import (
    CODECS,
    decode,
    encode,
    pack_symbols,
    record_bytes,
    unpack_symbols,
)
from simulation.run import simulate


def split_cfg(tmp_path, *overrides):
    return load_config("configs/quickstart.yaml", [
        "num_clients=1", "min_train_clients=1", "rounds=1", "fraction_evaluate=0",
        "data.num_samples=120", "train.batch_size=16", "train.weight_decay=0.01",
        "channel.model=tdl-d", "channel.snr_range_db=[0, 20]",
        "split.mode=sequential", "split.steps_per_round=4",
        "split.downlink={model: awgn, snr_db: 10}", f"output_dir={tmp_path}",
        *overrides,
    ])


@pytest.mark.engine
def test_split_steps_over_flower_messages_equal_end_to_end_training(tmp_path, one_torch_thread):
    cfg = split_cfg(tmp_path)
    saved = tmp_path / "client_state.npz"

    def keep_client_state(msg, context, call_next):
        # A client mod, inside the node: the test reads the node's private state.
        reply = call_next(msg, context)
        if "arrays" in reply.content.array_records and msg.metadata.message_type.startswith("train"):
            np.savez(saved, **{k: v.numpy() for k, v in context.state[PRIVATE_STATE].items()})
        return reply

    results = simulate(cfg, tmp_path / "run", client_app=make_app(mods=[keep_client_state]))
    assert results["status"] == "completed" and results["rounds"][0]["split_steps"] == 4

    reference = end_to_end_steps(cfg, 0, 1, rnd=1, steps=4)[0]
    ref = {n: p.detach().numpy() for n, p in reference.named_parameters()}
    client = np.load(saved)
    server = np.load(tmp_path / "run" / "server_half.npz")
    assert set(client.files) == set(mtsc.client_parameters(reference))
    assert {f"receiver.{n}" for n in server.files} == {
        n for n, p in reference.named_parameters() if n.startswith("receiver.") and p.requires_grad}
    compared = 0
    for name in client.files:
        np.testing.assert_allclose(client[name], ref[name], rtol=0, atol=1e-5, err_msg=name)
        compared += 1
    for name in server.files:
        np.testing.assert_allclose(server[name], ref[f"receiver.{name}"], rtol=0, atol=1e-5,
                                   err_msg=name)
        compared += 1
    initial = {n: p.detach().numpy() for n, p in mtsc.build(cfg).named_parameters()}
    moved = [n for n in client.files if not np.allclose(client[n], initial[n], atol=1e-6)]
    assert len(moved) > 0.5 * len(client.files), "the steps barely trained anything"
    assert compared > 50


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip_within_their_precision(codec):
    x = torch.randn(64, 19, 32, generator=torch.Generator().manual_seed(0)) * 3
    record = ArrayRecord(encode("t", x, codec))
    err = (decode(record, "t") - x).abs().max().item()
    bound = {"none": 0.0, "float16": 1e-2, "bfloat16": 1e-1, "int8": x.abs().max().item() / 254}
    # int8's half step, exact in real numbers; float32 rounding may add a few ulps
    assert err <= bound[codec] * (1 + 1e-5) + 1e-7
    per_value = record_bytes(record) / x.numel()
    assert per_value == pytest.approx({"none": 4, "float16": 2, "bfloat16": 2, "int8": 1}[codec],
                                      rel=1e-2)  # + a small npy header


def test_packed_symbols_unpack_to_the_sent_positions_and_pass_gradients():
    counts = torch.tensor([[1.2, 3.6, 2.5], [4.0, 1.0, 2.49]], requires_grad=True)
    received = torch.randn(2, 3, 4, dtype=torch.cfloat)
    sent = sent_positions(counts, 4)
    assert sent.sum().item() == 1 + 4 + 2 + 4 + 1 + 2  # round half to even: 2.5 -> 2
    values = pack_symbols(received, sent).requires_grad_(True)
    full = unpack_symbols(values, sent)
    assert torch.equal(full, torch.where(sent, received, 0))
    full.abs().sum().backward()
    assert values.grad.shape == values.shape and bool((values.grad != 0).all())


def test_split_training_learns_with_int8_activations_and_gradients(tmp_path, flower_message_context):
    cfg = split_cfg(tmp_path, "num_clients=2", "min_train_clients=2", "rounds=3",
                    "data.num_samples=240", "split.mode=parallel", "split.compression=int8",
                    "split.steps_per_round=6", "fraction_evaluate=1.0")
    results = run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    rounds = results["rounds"]
    assert [r["clients_accepted"] for r in rounds] == [2, 2, 2]
    assert rounds[-1]["train_loss"] < 0.8 * rounds[0]["train_loss"]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    # int8 symbols, fp32 counts and SNR: well under half of the fp32 bytes per step.
    fp32 = run_federated(LoopbackGrid(2), split_cfg(
        tmp_path, "num_clients=2", "min_train_clients=2", "data.num_samples=240",
        "split.mode=parallel", "split.steps_per_round=1", "fraction_evaluate=0"),
        tmp_path / "fp32")["rounds"][0]
    assert rounds[0]["bytes_down_per_step"] < 0.45 * fp32["bytes_down_per_step"]


@pytest.mark.engine
def test_a_silent_client_is_dropped_and_the_round_finishes(tmp_path, caplog):
    cfg = split_cfg(tmp_path, "num_clients=3", "min_train_clients=2", "data.num_samples=240",
                    "split.mode=parallel", "split.steps_per_round=3",
                    "split.client_timeout_s=2")

    def stall_partition_1(msg, context, call_next):
        if partition(context)[0] == 1 and msg.metadata.message_type == "train.split_output":
            time.sleep(5)  # longer than split.client_timeout_s
        return call_next(msg, context)

    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="fedsemcom"):
        results = simulate(cfg, tmp_path / "run", client_app=make_app(mods=[stall_partition_1]))
    row = results["rounds"][0]
    assert results["status"] == "completed"
    assert row["clients_dropped"] == 1 and row["clients_accepted"] == 2
    assert any("partition 1" in r.getMessage() and "no answer" in r.getMessage()
               for r in caplog.records)
    assert time.time() - t0 < 120
