"""Central DP with Flower's wrappers around our strategies (privacy/central_dp.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from test_server_rounds import LoopbackGrid
from test_strategies import as_numpy, lora_arrays, reply, send

from common.config import ConfigError, load_config
from fl_client.client_app import app
from fl_server.loop import initial_arrays, make_strategy
from fl_server.rounds import run_federated

CENTRAL = ["privacy.dp.mode=central", "privacy.dp.noise_multiplier=0.5",
           "privacy.dp.max_grad_norm=0.1", "num_clients=3", "min_train_clients=3"]


def central_strategy(*overrides):
    return make_strategy(load_config("configs/quickstart.yaml", [*CENTRAL, *overrides]))


def update_norm(new, old):
    return np.sqrt(sum(((new[k] - old[k]).astype(np.float64) ** 2).sum() for k in old))


def test_server_side_clipping_bounds_every_update_and_noise_has_the_configured_std(
        flower_message_context):
    strategy = central_strategy()
    rng = np.random.default_rng(0)
    sent = lora_arrays(rng, 4, in_f=256, out_f=256)
    send(strategy, sent)
    far = [{k: v + rng.normal(0, 1, v.shape).astype(np.float32) for k, v in sent.items()}
           for _ in range(3)]
    replies = [reply(i + 1, a, 10, **{"uniform-weight": 1.0}) for i, a in enumerate(far)]
    strategy.aggregate_train(1, replies)
    for r in replies:  # the wrapper clipped them in place, before our strategy averaged
        assert update_norm(as_numpy(r.content["arrays"]), sent) <= 0.1 * (1 + 1e-5)
    # Updates of norm ~1e-5 (an exactly zero update divides by zero in flwr 1.41's
    # clipping): what the aggregate moves is the noise, N(0, (sigma C / n)^2).
    strategy = central_strategy()
    send(strategy, sent)
    tiny = [{k: v + np.float32(1e-8) * rng.standard_normal(v.shape).astype(np.float32)
             for k, v in sent.items()} for _ in range(3)]
    aggregate, _ = strategy.aggregate_train(
        1, [reply(i + 1, a, 10, **{"uniform-weight": 1.0}) for i, a in enumerate(tiny)])
    noise = np.concatenate([(v - sent[k]).ravel() for k, v in as_numpy(aggregate).items()])
    assert noise.std() == pytest.approx(0.5 * 0.1 / 3, rel=0.05)


def test_client_side_clipping_clips_on_the_client_with_flowers_mod(flower_message_context):
    cfg = load_config("configs/quickstart.yaml", [*CENTRAL, "privacy.dp.clipping=client",
                                                  "data.num_samples=240", "train.batch_size=16",
                                                  "train.local_epochs=1"])
    strategy = make_strategy(cfg)
    arrays = initial_arrays(cfg, "ab")
    config = ConfigRecord({"experiment": cfg.to_json()})
    msg = list(strategy.configure_train(1, arrays, config, LoopbackGrid(3)))[0]
    assert "clipping_norm" in msg.content["config"]
    context = Context(run_id=1, node_id=msg.metadata.dst_node_id, state=RecordDict(),
                      run_config={}, node_config={"partition-id": 0, "num-partitions": 3})
    out = app(Message(msg.content, dst_node_id=context.node_id, message_type="train"), context)
    assert not out.has_error(), out.error
    assert update_norm(as_numpy(out.content["arrays"]), as_numpy(arrays)) <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_a_central_dp_run_reports_the_round_level_epsilon(tmp_path, flower_message_context,
                                                           clipping):
    cfg = load_config("configs/quickstart.yaml", [
        *CENTRAL, f"privacy.dp.clipping={clipping}", "rounds=2", "data.num_samples=240",
        "train.batch_size=16", "train.local_epochs=1", f"output_dir={tmp_path}"])
    rows = run_federated(LoopbackGrid(3), cfg, tmp_path / "run")["rounds"]
    assert [r["clients_accepted"] for r in rows] == [3, 3]
    assert 0 < rows[0]["dp_central_epsilon"] < rows[1]["dp_central_epsilon"]


@pytest.mark.parametrize("override, words", [
    ("strategy.name=svd_lora", ["'strategy.name'", "svd_lora", "not a mean"]),
    ("strategy.name=krum_lora", ["'strategy.name'", "Krum"]),
    ("fraction_train=0.5", ["'fraction_train'", "no sampling amplification"]),
    ("privacy.dp.max_epsilon=3", ["'privacy.dp.max_epsilon'", "mode local"]),
])
def test_central_dp_refuses_what_its_wrappers_cannot_do(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [*CENTRAL, override])
    for w in words:
        assert w in str(err.value)


