"""The split client's live slot (fl_client/split_handlers.py): a process that serves a node's
consecutive messages keeps the model's parameters, both AdamW optimisers and the
autograd graph of the forward it sent, instead of rebuilding them from the node's
`context.state` and recomputing the forward. Both paths must give the parameters of
end-to-end training, and the slot must never serve another node's message.
"""

import numpy as np
import pytest
from test_server_rounds import LoopbackGrid
from test_split import split_cfg

from fl_client import split_handlers
from fl_client.node import PRIVATE_STATE
from fl_server.rounds import run_federated
from models.mtsc.model import MTSCModel
from models.mtsc.split import end_to_end_steps

STEPS = 4


@pytest.fixture
def uplink_calls(monkeypatch):
    """How many client-half forwards the run computes."""
    calls = {"n": 0}
    real = MTSCModel.uplink

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MTSCModel, "uplink", counted)
    return calls


class SlotLost(LoopbackGrid):
    """Every message finds the slot empty, as if another process had served the last."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            split_handlers._SLOTS.clear()
            replies += super().send_and_receive([msg], timeout=timeout)
        return replies


def run(grid, cfg, path):
    split_handlers._OUTPUT_SHAPES.clear()  # one shape-probing forward per run (counted below)
    results = run_federated(grid, cfg, path)
    assert results["status"] == "completed"
    client = {node: {k: v.numpy() for k, v in ctx.state[PRIVATE_STATE].items()}
              for node, ctx in grid.contexts.items()}
    return client, dict(np.load(path / "server_half.npz"))


def test_kept_graph_and_rebuilt_state_both_equal_end_to_end_training(
        tmp_path, flower_message_context, uplink_calls):
    cfg = split_cfg(tmp_path, f"split.steps_per_round={STEPS}")
    split_handlers._SLOTS.clear()
    kept_client, kept_server = run(LoopbackGrid(1), cfg, tmp_path / "kept")
    # One forward per step (and the shape probe): each backward message reused the graph
    # of the forward it sent.
    assert uplink_calls["n"] == STEPS + 1
    uplink_calls["n"] = 0
    lost_client, lost_server = run(SlotLost(1), cfg, tmp_path / "lost")
    # Without the slot each backward recomputes the forward it sent (all but the last
    # step also compute the next step's).
    assert uplink_calls["n"] == 2 * STEPS + 1

    reference = {n: p.detach().numpy()
                 for n, p in end_to_end_steps(cfg, 0, 1, rnd=1, steps=STEPS)[0].named_parameters()}
    for client, server in ((kept_client[101], kept_server), (lost_client[101], lost_server)):
        assert len(client) > 40 and len(server) > 10
        for name, value in client.items():
            np.testing.assert_allclose(value, reference[name], rtol=0, atol=1e-5, err_msg=name)
        for name, value in server.items():
            np.testing.assert_allclose(value, reference[f"receiver.{name}"], rtol=0, atol=1e-5,
                                       err_msg=name)


def test_interleaved_nodes_never_use_each_others_slot(tmp_path, flower_message_context):
    """Parallel mode: the two nodes' messages alternate in one process, so each message
    finds the other node's slot. Taking it would mix their optimisers and graphs; the
    run must equal one in which no message ever finds a slot."""
    cfg = split_cfg(tmp_path, "num_clients=2", "min_train_clients=2", "data.num_samples=240",
                    "split.mode=parallel", f"split.steps_per_round={STEPS}")
    split_handlers._SLOTS.clear()
    mixed_client, mixed_server = run(LoopbackGrid(2), cfg, tmp_path / "mixed")
    lost_client, lost_server = run(SlotLost(2), cfg, tmp_path / "lost")
    # The nodes trained on different data: a mix-up would show.
    differs = [n for n in mixed_client[101]
               if not np.allclose(mixed_client[101][n], mixed_client[102][n], atol=1e-4)]
    assert len(differs) > 10
    for node in (101, 102):
        for name, value in mixed_client[node].items():
            np.testing.assert_allclose(value, lost_client[node][name], rtol=0, atol=1e-6,
                                       err_msg=f"node {node}: {name}")
    for name, value in mixed_server.items():
        np.testing.assert_allclose(value, lost_server[name], rtol=0, atol=1e-6, err_msg=name)
