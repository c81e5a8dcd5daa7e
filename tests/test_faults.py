"""Client faults in the server loop (in process, no Ray): a node that stops answering
is logged by id and the round goes on with the others; it rejoins a later round.
Fewer answers than min_train_clients leave the global adapters unchanged."""

import logging

import numpy as np
from flwr.app import Array, ArrayRecord
from test_server_rounds import LoopbackGrid

from fl_server.rounds import run_federated


class FlakyGrid(LoopbackGrid):
    """Node `down` does not answer (as if killed) in rounds `down_rounds`."""

    def __init__(self, num_nodes, down, down_rounds):
        super().__init__(num_nodes)
        self.down, self.down_rounds, self.round = down, set(down_rounds), 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.round += 1
        if self.round in self.down_rounds:
            messages = [m for m in messages if m.metadata.dst_node_id != self.down]
        return super().send_and_receive(messages, timeout=timeout)


def test_a_silent_node_is_logged_and_rejoins_later(tiny_cfg, flower_message_context,
                                                    tmp_path, caplog):
    tiny_cfg.rounds = 3
    grid = FlakyGrid(3, down=102, down_rounds=[2])
    with caplog.at_level(logging.WARNING):
        results = run_federated(grid, tiny_cfg, tmp_path / "run")
    rows = results["rounds"]
    assert [r["clients_accepted"] for r in rows] == [3, 2, 3]
    assert [r["clients_missing"] for r in rows] == [0, 1, 0]
    logged = [r.getMessage() for r in caplog.records if "no reply from node" in r.getMessage()]
    assert logged and all("102" in m and "round 2" in m for m in logged)
    assert results["status"] == "completed"


def test_too_few_answers_keep_the_global_adapters(tiny_cfg, flower_message_context, tmp_path,
                                                  caplog):
    tiny_cfg.rounds, tiny_cfg.min_train_clients = 2, 3
    with caplog.at_level(logging.WARNING):
        results = run_federated(FlakyGrid(3, down=101, down_rounds=[1, 2]), tiny_cfg,
                                tmp_path / "run")
    assert "train_loss" not in results["rounds"][0]  # nothing aggregated
    assert any("fewer than min_train_clients=3" in r.getMessage() for r in caplog.records)
    from fl_server.loop import initial_arrays
    init = initial_arrays(tiny_cfg, "ab")
    with np.load(tmp_path / "run" / "global_adapters.npz") as saved:
        for k in init:
            np.testing.assert_array_equal(saved[k], init[k].numpy())


def _edit(fn):
    def tamper(reply):
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in fn(arrays).items()})
        return reply
    return tamper


def _first(arrays, fn):
    k = next(iter(arrays))
    return {**arrays, k: fn(arrays[k])}


def test_bad_updates_never_reach_the_aggregate(tiny_cfg, flower_message_context, tmp_path,
                                               caplog):
    honest = {}

    def keep(arrays):
        honest.update(arrays)
        return arrays

    tiny_cfg.num_clients, tiny_cfg.rounds, tiny_cfg.fraction_evaluate = 5, 1, 0.0
    tiny_cfg.min_train_clients = 1
    tiny_cfg.strategy.max_update_bytes = 60_000  # honest replies take 49,152 bytes
    grid = LoopbackGrid(5, tamper={
        101: _edit(keep),
        102: _edit(lambda a: _first(a, lambda v: np.where(v > 0, np.inf, v))),
        103: _edit(lambda a: _first(a, lambda v: v[:, :-1])),
        104: _edit(lambda a: {**a, "lam.encoder.layers.0.fc1.weight": np.zeros((2, 2), "f4")}),
        105: _edit(lambda a: {k: v.astype(np.float64) for k, v in a.items()}),
    })
    with caplog.at_level(logging.WARNING):
        results = run_federated(grid, tiny_cfg, tmp_path / "run")
    row = results["rounds"][0]
    assert row["clients_accepted"] == 1 and row["clients_rejected"] == 4
    logged = [r.getMessage() for r in caplog.records]
    for node, reason in ((102, "contains NaN or Inf"), (103, "has shape"),
                         (104, "1 unexpected"), (105, "more than the limit of 60000")):
        assert any(f"Dropping the reply of node {node}: " in m and reason in m for m in logged)
    with np.load(tmp_path / "run" / "global_adapters.npz") as saved:
        for k, v in honest.items():  # the aggregate is the one valid update
            np.testing.assert_array_equal(saved[k], v)


def test_a_node_the_superlink_reports_unavailable_is_named(flower_message_context, caplog):
    """The SuperLink answers for a node that missed its heartbeats, from its own id."""
    from flwr.app import Error, Message, RecordDict

    from fl_server.rounds import _log_missing

    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8, 9)]
    ok = Message(RecordDict(), reply_to=sent[0])
    unavailable = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=sent[1])
    unavailable.metadata.__dict__["_src_node_id"] = 1  # written by the SuperLink
    sent_to = {ok.metadata.reply_to_message_id: 7, "id-of-8": 8, "id-of-9": 9}
    unavailable.metadata.__dict__["_reply_to_message_id"] = "id-of-8"
    with caplog.at_level(logging.WARNING):
        own, missing = _log_missing(2, "train", sent, sent_to, [ok, unavailable], 30.0)
    assert missing == [8, 9]
    assert own == [ok]  # the SuperLink's answer never reaches the strategy (nor "node 1")
    logged = [r.getMessage() for r in caplog.records]
    assert any("node 8 is unavailable: Error: Node Unavailable" in m for m in logged)
    assert any("no reply from node(s) 8, 9" in m for m in logged)
