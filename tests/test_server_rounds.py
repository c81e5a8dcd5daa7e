"""The ServerApp's round loop against real ClientApps, in process (no Ray): a client
that sends NaN is rejected with a logged reason and the rounds go on with the others."""

import json
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, RecordDict

from common.config import config_from_dict
from fl_client.client_app import app as client_app
from fl_client.trust import node_config_of
from fl_server.rounds import run_federated


class LoopbackGrid:
    """Delivers each message to a ClientApp in this process, one Context per node.

    Its nodes are configured as the simulation engine configures its virtual nodes
    (one operator runs the server and the nodes): the node-only keys of the experiment
    they are sent (paths, device) become their node config, unless a test set them."""

    def __init__(self, num_nodes, tamper=None):
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": i, "num-partitions": num_nodes})
            for i, node in enumerate(range(101, 101 + num_nodes))
        }
        self.tamper = tamper or {}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            context = self.contexts[msg.metadata.dst_node_id]
            if "config" in msg.content.config_records:
                cfg = config_from_dict(json.loads(msg.content["config"]["experiment"]))
                for key, value in node_config_of(cfg).items():
                    context.node_config.setdefault(key, value)
            reply = client_app(msg, context)
            fix = self.tamper.get(msg.metadata.dst_node_id)
            replies.append(fix(reply) if fix and msg.metadata.message_type == "train" else reply)
        return replies


def poison_with_nan(reply):
    arrays = reply.content["arrays"]
    bad = {k: np.full(v.numpy().shape, np.nan, dtype=np.float32) for k, v in arrays.items()}
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    return reply


def test_nan_client_is_rejected_and_rounds_go_on(tiny_cfg, flower_message_context, tmp_path,
                                                 caplog):
    grid = LoopbackGrid(3, tamper={102: poison_with_nan})
    with caplog.at_level(logging.WARNING):
        results = run_federated(grid, tiny_cfg, tmp_path / "run")
    rounds = results["rounds"]
    assert len(rounds) == tiny_cfg.rounds
    for r in rounds:
        assert r["clients_accepted"] == 2 and r["clients_rejected"] == 1
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["accuracy"])
    assert any("102" in rec.getMessage() and "NaN" in rec.getMessage() for rec in caplog.records)
    adapters = np.load(tmp_path / "run" / "global_adapters.npz")
    assert all(np.isfinite(adapters[k]).all() for k in adapters.files)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"


def test_a_crash_keeps_the_rounds_already_measured(tiny_cfg, flower_message_context, tmp_path):
    grid = LoopbackGrid(2)
    calls = {"n": 0}
    real = grid.send_and_receive

    def failing(messages, *, timeout=None):
        calls["n"] += 1
        if calls["n"] == 3:  # round 2's training: the server side breaks
            raise RuntimeError("link lost")
        return real(messages, timeout=timeout)

    grid.send_and_receive = failing
    try:
        run_federated(grid, tiny_cfg, tmp_path / "run")
    except RuntimeError:
        pass
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "failed" and "link lost" in saved["error"]
    assert [r["round"] for r in saved["rounds"]] == [1]


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(flower_message_context):
    """Replies arrive in another order from run to run; sorted by content first, the
    float sums of FedAvg come out bit-identical for every arrival order."""
    import itertools

    from flwr.app import ConfigRecord, Message, MetricRecord

    from fl_server.exchange import canonical_order
    from strategies import build_strategy

    rng = np.random.default_rng(0)
    scales = (1e-3, 1.0, 1e3, 7.0)  # mixed magnitudes: float sums that depend on order
    updates = [ArrayRecord({"m.lora_A.weight": Array(
        (s * rng.standard_normal((4, 64))).astype(np.float32))}) for s in scales]
    replies = []
    for node, update in zip(range(11, 15), updates):
        sent = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(RecordDict({"arrays": update, "metrics": MetricRecord(
            {"num-examples": 3 + node, "train_loss": 0.1 * node})}), reply_to=sent))

    def aggregate(order):
        strategy = build_strategy("fedavg_lora")
        strategy.configure_train(1, updates[0], ConfigRecord(), LoopbackGrid(4))
        arrays, metrics = strategy.aggregate_train(1, order)
        return arrays["m.lora_A.weight"].numpy(), metrics["train_loss"]

    orders = list(itertools.permutations(replies))
    first, first_loss = aggregate(canonical_order(orders[0]))
    for order in orders[1:]:
        got, loss = aggregate(canonical_order(order))
        np.testing.assert_array_equal(got, first)
        assert loss == first_loss
    # Unsorted, some arrival orders do give other last bits: the sort is what helps.
    assert any(not np.array_equal(aggregate(list(o))[0], first) for o in orders)
