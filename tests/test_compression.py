"""A transmitter sized to each client's budget (models/mtsc/compression.py): the budget
picks a plan that fits, compressed clients send the adapters of the layers they hold,
svd_lora merges each module exactly over its holders, and a federation of mixed sizes
trains through the real ClientApp without shape errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.config import ConfigError, load_config
from fl_client.client_app import app
from fl_server.loop import initial_arrays
from models.client_state import client_experiment
from models.mtsc import workload as mtsc
from models.mtsc.compression import (
    Plan,
    choose_plan,
    deployed_transmitter,
    forward_flops,
    ladder_costs,
    weight_bytes,
)
from models.mtsc.config import parse_budget
from models.mtsc.model import build_compressed
from strategies import FedAvgLoRA, SVDLoRA
from strategies.svd_lora import merge_lora_products

BASE = ["model.layers=4", "strategy.name=svd_lora", "strategy.svd_rank=8", "num_clients=3",
        "data.num_samples=240", "data.partitioner=iid", "train.local_epochs=1",
        "train.batch_size=16", "train.lr=0.005"]


def cfg_of(*overrides):
    return load_config("configs/quickstart.yaml", [*BASE, *overrides])


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def test_a_budget_maps_to_the_first_rung_that_fits():
    assert parse_budget(0.5).kind == "compute" and parse_budget("0.5").amount == 0.5
    assert parse_budget("300kB").amount == 300_000 and parse_budget("1.5MiB").amount == 1.5 * 2**20
    for bad in (0, 1.5, "-1", "lots", "3 parsecs"):
        with pytest.raises(ValueError, match="expected a share of the full compute"):
            parse_budget(bad)
    rungs = [Plan(s, 4, 8, 16, s < 1) for s in (1.0, 0.75, 0.5, 0.25)]
    costs = list(zip(rungs, [800, 400, 300, 200], [100.0, 70.0, 40.0, 20.0]))
    assert choose_plan(parse_budget(1.0), costs) is rungs[0]
    assert choose_plan(parse_budget(0.7), costs) is rungs[1]
    assert choose_plan(parse_budget(0.69), costs) is rungs[2]
    assert choose_plan(parse_budget("300B"), costs) is rungs[2]
    with pytest.raises(ValueError, match="even the smallest plan"):
        choose_plan(parse_budget("100B"), costs)
    with pytest.raises(ConfigError, match="svd_lora"):
        load_config("configs/quickstart.yaml", ["model.client_budgets=[1.0,0.5]"])
    with pytest.raises(ConfigError, match="model.client_budgets"):
        cfg_of("model.client_budgets=[1.0,plenty]")


def test_a_compressed_transmitter_fits_its_budget_and_keeps_the_shared_first_layers():
    cfg = cfg_of("model.client_budgets=[1.0,0.5,'250kB']")
    full = mtsc.build(client_experiment(cfg, 0), "cpu", 8)
    costs = ladder_costs(cfg, 8, build_compressed)
    full_flops = forward_flops(full.transmitter, cfg)
    assert costs[0][2] == full_flops
    for pid, (kind, amount) in ((1, ("compute", 0.5)), (2, ("memory", 250_000))):
        model = mtsc.build(client_experiment(cfg, pid), "cpu", 8)
        plan = model.compression
        assert plan.layers < cfg.model.layers and plan.lora_rank < 8 and plan.int8
        if kind == "compute":
            assert forward_flops(model.transmitter, cfg) <= amount * full_flops
        else:
            assert weight_bytes(deployed_transmitter(model.transmitter, True)) <= amount
        # The kept layers are the shared model's first ones; the others are not held.
        kept = model.transmitter.lam_encoder.layers
        assert len(kept) == plan.layers
        for mine, shared in zip(kept, full.transmitter.lam_encoder.layers):
            w, w_full = mine.fc1.weight, shared.fc1.weight
            assert torch.equal(w, w_full)
        shared_keys = set(mtsc.shared_state(model))
        assert shared_keys < set(mtsc.shared_state(full))
        assert shared_keys.isdisjoint(model.dropped_adapters)
        assert shared_keys | set(model.dropped_adapters) == set(mtsc.shared_state(full))
        assert not any(f"layers.{plan.layers}." in k for k in shared_keys if k.startswith("enc"))


def test_no_budget_and_a_full_budget_build_the_model_as_before():
    cfg = cfg_of()
    assert client_experiment(cfg, 1) is cfg
    plain = mtsc.build(cfg, "cpu", 8).state_dict()
    budget_one = mtsc.build(client_experiment(cfg_of("model.client_budgets=[1.0]"), 0),
                            "cpu", 8).state_dict()
    assert plain.keys() == budget_one.keys()
    assert all(torch.equal(plain[k], budget_one[k]) for k in plain)


def test_the_int8_transmitter_sends_what_the_fp32_one_does_within_quantisation_error():
    cfg = cfg_of("model.client_budgets=[0.5]")
    model = mtsc.build(client_experiment(cfg, 0), "cpu", 8).eval()
    train, _ = mtsc.load_data(client_experiment(cfg, 0), 0, 3)
    batch = {k: torch.stack([train[i][k] for i in range(8)]) for k in ("image", "question")}
    snr = torch.full((8,), 10.0)
    with torch.no_grad():
        fp32 = model.transmitter(batch["image"], batch["question"], snr).symbols
        int8 = deployed_transmitter(model.transmitter, True)(batch["image"], batch["question"],
                                                             snr).symbols
    rel = (int8 - fp32).abs().norm() / fp32.abs().norm()
    assert 0 < rel < 0.1, rel


def _reply(node, arrays, n):
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})})
    return Message(content, reply_to=request)


def test_svd_lora_merges_each_module_exactly_over_the_clients_that_hold_it(
        flower_message_context):
    rng = np.random.default_rng(3)
    modules = [f"encoder.layers.{i}.self_attn.q_proj" for i in range(3)]

    def adapters(rank, held):
        out = {}
        for m in modules[:held]:
            out[f"{m}.lora_A.weight"] = rng.standard_normal((rank, 12)).astype(np.float32)
            out[f"{m}.lora_B.weight"] = rng.standard_normal((10, rank)).astype(np.float32)
        return out

    sent = adapters(8, 3)
    clients = [(adapters(8, 3), 30), (adapters(4, 2), 10), (adapters(2, 1), 20)]
    strategy = SVDLoRA(target_rank=8, lora_alpha=16.0, min_available_nodes=1)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                  ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = [_reply(i + 1, a, n) for i, (a, n) in enumerate(clients)]
    merged, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients_accepted"] == 3 and list(merged) == list(sent)
    for depth, module in enumerate(modules):
        holders = clients[:len(clients) - depth]  # module i: the clients holding > i layers
        w = np.array([n for _, n in holders], dtype=float)
        a, b = merge_lora_products([h[f"{module}.lora_A.weight"] for h, _ in holders],
                                   [h[f"{module}.lora_B.weight"] for h, _ in holders],
                                   w / w.sum(), 16.0, 8)
        np.testing.assert_array_equal(merged[f"{module}.lora_A.weight"].numpy(), a)
        np.testing.assert_array_equal(merged[f"{module}.lora_B.weight"].numpy(), b)
    # A module nobody holds keeps the value sent; a half module is still refused.
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                  ConfigRecord(), FakeGrid([1, 2, 3])))
    half = adapters(2, 1)
    half.pop(f"{modules[0]}.lora_B.weight")
    only, _ = strategy.aggregate_train(1, [_reply(1, adapters(2, 1), 5),
                                           _reply(2, half, 5)])
    for key in sent:
        if not key.startswith(modules[0]):
            np.testing.assert_array_equal(only[key].numpy(), sent[key])
    # FedIT averages factors of one shape: it still drops a reply that lacks modules.
    fedit = FedAvgLoRA(min_available_nodes=1)
    list(fedit.configure_train(1, ArrayRecord({k: Array(v) for k, v in sent.items()}),
                               ConfigRecord(), FakeGrid([1, 2, 3])))
    _, m = fedit.aggregate_train(1, [_reply(1, adapters(8, 3), 5),
                                     _reply(2, adapters(8, 2), 5)])
    assert m["clients_rejected"] == 1


def _federate(cfg, rounds):
    """`rounds` of svd_lora through the ClientApp (message in, reply out, as Flower's
    runtime calls it); each client's evaluation metrics after each round."""
    n = cfg.num_clients
    strategy = SVDLoRA(target_rank=cfg.strategy.svd_rank, lora_alpha=cfg.lora.alpha,
                       min_available_nodes=1)
    contexts = [Context(run_id=1, node_id=10 + p, state=RecordDict(), run_config={},
                        node_config={"partition-id": p, "num-partitions": n}) for p in range(n)]
    arrays = initial_arrays(cfg, "ab")
    history = []
    for rnd in range(1, rounds + 1):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(range(n))))

        def call(kind, context, rnd=rnd, arrays=arrays):
            config = ConfigRecord({"experiment": cfg.to_json(), "lora-train": "ab",
                                   "server-round": rnd})
            msg = Message(RecordDict({"arrays": arrays, "config": config}),
                          dst_node_id=context.node_id, message_type=kind)
            reply = app(msg, context)
            assert not reply.has_error(), reply.error
            return reply

        replies = [call("train", c) for c in contexts]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        history.append([dict(call("evaluate", c).content["metrics"]) for c in contexts])
    return history


def test_compressed_clients_aggregate_without_shape_errors_and_learn(
        flower_message_context):
    rounds = 3
    mixed = _federate(cfg_of("model.client_budgets=[1.0,0.5,'250kB']"), rounds)
    alone = _federate(cfg_of(), rounds)
    other_seed = _federate(cfg_of("seed=1"), rounds)
    # Every client learns, the compressed ones with their int8 transmitters included.
    for pid in range(3):
        assert mixed[-1][pid]["loss"] < 0.9 * mixed[0][pid]["loss"], (pid, mixed)
    # A coarse guard: the full-size client (partition 0) does not collapse beside its
    # compressed peers at this tiny size. It is not the paper's criterion (within one
    # seed's noise): reports/compression.py measures that at a larger size, and there
    # the full-size client does lose more than that (docs/compression.md).
    noise = abs(alone[-1][0]["accuracy"] - other_seed[-1][0]["accuracy"])
    assert mixed[-1][0]["accuracy"] >= alone[-1][0]["accuracy"] - max(noise, 1 / 8), (
        mixed[-1][0], alone[-1][0], other_seed[-1][0])
    assert mixed[-1][0]["loss"] < 1.1 * alone[-1][0]["loss"]
