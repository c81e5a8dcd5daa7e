"""Client-side DP-SGD with Opacus: what trains, what is accounted, what is refused."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from test_server_rounds import LoopbackGrid
from torch.utils.data import DataLoader

from common.config import ConfigError, load_config
from fl_client.node import PRIVATE_STATE
from fl_server.rounds import run_federated
from models.mtsc import workload as mtsc
from privacy.dp import HISTORY_KEY, ClientDP, epsilon_of

DP = ["privacy.dp.mode=local", "privacy.dp.noise_multiplier=1.0"]


@pytest.fixture
def tosc_dp_cfg(tmp_path, pretrained_dir):
    """A tosc experiment with DP-SGD; one teacher for every test (pretrained_dir)."""
    def make(*overrides):
        return load_config("configs/distill_quickstart.yaml", [
            "num_clients=2", "min_train_clients=2", "rounds=3", "data.num_samples=200",
            "train.local_epochs=1", "fraction_evaluate=0", "distill.teacher.public_samples=40",
            "distill.teacher.epochs=1",
            f"distill.teacher.checkpoint={pretrained_dir / 'teacher-40-public.pt'}",
            f"output_dir={tmp_path}", *DP, *overrides])
    return make


def test_a_dp_step_moves_the_lora_adapters_and_heads_and_every_one_has_per_example_grads():
    cfg = load_config("configs/quickstart.yaml", ["num_clients=3", "data.num_samples=240", *DP])
    model = mtsc.build(cfg, "cpu")  # on its device before Opacus wraps it
    mtsc.set_trainable(model, "ab")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert all(".lora_" in n or n.startswith("task_decoders.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, _ = mtsc.load_data(cfg, 0, 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dp = ClientDP(cfg.privacy.dp, rounds=1, local_epochs=1)
    net, opt, loader = dp.make_private(model, opt, DataLoader(train, batch_size=16))
    batch = next(b for b in loader if len(b["image"]) > 0)
    h, _ = net(batch)
    sum(model.task_decoders.losses(h, batch).values()).backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and getattr(p, "grad_sample", None) is None]
    assert missing == []
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable  # every adapter and head moved; the frozen base did not
    assert dp.epsilon() > 0


def test_a_clients_epsilon_over_rounds_is_one_accountant_over_all_its_steps(
        tosc_dp_cfg, tmp_path, flower_message_context):
    cfg = tosc_dp_cfg()
    grid = LoopbackGrid(2)
    rows = run_federated(grid, cfg, tmp_path / "run")["rounds"]
    eps = [r["dp_epsilon_max"] for r in rows]
    assert eps[0] < eps[1] < eps[2]  # cumulative, not per round
    from models.tosc import workload as tosc

    per_client = []
    for context in grid.contexts.values():
        history = context.state.array_records[PRIVATE_STATE][HISTORY_KEY].numpy()
        pid = int(context.node_config["partition-id"])
        train, _ = tosc.load_data(cfg, pid, 2)
        steps_per_round = math.ceil(len(train) / cfg.train.batch_size)
        one = RDPAccountant()
        for _ in range(cfg.rounds * steps_per_round):
            one.step(noise_multiplier=1.0, sample_rate=1 / steps_per_round)
        assert history[:, 2].sum() == cfg.rounds * steps_per_round
        assert epsilon_of([tuple(h) for h in history], 1e-5) == pytest.approx(
            one.get_epsilon(1e-5), rel=1e-9)
        per_client.append(one.get_epsilon(1e-5))
    assert eps[-1] == pytest.approx(max(per_client), rel=1e-9)
    assert rows[-1]["dp_epsilon_mean"] == pytest.approx(sum(per_client) / 2, rel=1e-9)


def test_a_target_epsilon_is_reached_after_the_configured_rounds(tosc_dp_cfg, tmp_path,
                                                                 flower_message_context):
    cfg = tosc_dp_cfg("privacy.dp.noise_multiplier=null", "privacy.dp.epsilon=2.0")
    rows = run_federated(LoopbackGrid(2), cfg, tmp_path / "run")["rounds"]
    assert 1.9 < rows[-1]["dp_epsilon_max"] <= 2.0 + 1e-6


def test_a_client_over_its_budget_stops_training_and_the_run_goes_on(
        tosc_dp_cfg, tmp_path, flower_message_context, caplog):
    one = ["num_clients=1", "min_train_clients=1"]
    first = run_federated(LoopbackGrid(1), tosc_dp_cfg(*one, "rounds=1"),
                          tmp_path / "first")["rounds"][0]["dp_epsilon_max"]
    cfg = tosc_dp_cfg(*one, f"privacy.dp.max_epsilon={first * 1.2}")
    with caplog.at_level(logging.WARNING):
        results = run_federated(LoopbackGrid(1), cfg, tmp_path / "run")
    rows = results["rounds"]
    assert results["status"] == "completed" and len(rows) == 3
    assert rows[0]["clients_accepted"] == 1 and rows[0]["dp_epsilon_max"] == first
    assert all("dp_epsilon_max" not in r for r in rows[1:])  # nobody trained again
    assert "privacy.dp.max_epsilon" in caplog.text


@pytest.mark.parametrize("override, words", [
    ("privacy.dp.epsilon=0", ["'privacy.dp.epsilon'", "exactly one"]),
    ("privacy.dp.noise_multiplier=null", ["'privacy.dp.epsilon'", "exactly one"]),
    ("privacy.dp.max_grad_norm=0", ["'privacy.dp.max_grad_norm'", "> 0"]),
    ("split.mode=parallel", ["'privacy.dp.mode'", "split"]),
])
def test_dp_settings_that_cannot_work_are_refused_with_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [*DP, override])
    for w in words:
        assert w in str(err.value)


def test_a_non_positive_epsilon_is_refused():
    with pytest.raises(ConfigError, match=r"'privacy.dp.epsilon': got -1.0, allowed: > 0"):
        load_config("configs/quickstart.yaml", ["privacy.dp.mode=local", "privacy.dp.epsilon=-1"])


def test_a_resumed_run_continues_each_clients_accountant_from_the_nodes_disk(
        tosc_dp_cfg, tmp_path, flower_message_context):
    state = [f"client_state_dir={tmp_path}/state"]
    straight = run_federated(LoopbackGrid(2), tosc_dp_cfg(*state),
                             tmp_path / "straight")["rounds"]
    run_federated(LoopbackGrid(2), tosc_dp_cfg(*state, "rounds=1"), tmp_path / "cut")
    # Fresh contexts, as a new Flower run has: the accountants come from the nodes' disks.
    resumed = run_federated(LoopbackGrid(2), tosc_dp_cfg(*state), tmp_path / "cut",
                            resume=True)["rounds"]
    assert [r["dp_epsilon_max"] for r in resumed] == [r["dp_epsilon_max"] for r in straight]
