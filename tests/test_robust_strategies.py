"""Robust aggregation over LoRA adapters: one poisoned client moves FedAvg far and
Flower's FedMedian / FedTrimmedAvg / Krum (behind our reply checks) little."""

import numpy as np
import pytest
from test_strategies import as_numpy, lora_arrays, reply, send

from common.config import load_config
from strategies import FedAvgLoRA, build_strategy

HONEST, NOISE = 6, 0.01


def rounds_replies(poison):
    """Six honest clients near the global adapters plus one that sends `poison(update)`."""
    rng = np.random.default_rng(0)
    global_arrays = lora_arrays(rng, rank=4)
    honest = [{k: v + NOISE * rng.standard_normal(v.shape).astype(np.float32)
               for k, v in global_arrays.items()} for _ in range(HONEST)]
    bad = {k: poison(v).astype(np.float32) for k, v in honest[0].items()}
    clients = honest + [bad]
    replies = [reply(i + 1, a, 100) for i, a in enumerate(clients)]
    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in global_arrays}
    return global_arrays, replies, honest_mean


def shift(strategy_name, poison, **kwargs):
    """Largest distance (max abs) between the aggregate and the honest clients' mean."""
    global_arrays, replies, honest_mean = rounds_replies(poison)
    strategy = build_strategy(strategy_name, min_available_nodes=1, **kwargs)
    send(strategy, global_arrays, node_ids=range(1, len(replies) + 1))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients_accepted"] == len(replies)
    out = as_numpy(arrays)
    return max(float(np.abs(out[k] - honest_mean[k]).max()) for k in out)


@pytest.mark.parametrize("poison", [lambda v: 1e3 * v, lambda v: -50.0 * v],
                         ids=["huge", "flipped"])
@pytest.mark.parametrize("name,kwargs", [("fedmedian_lora", {}),
                                         ("trimmed_avg_lora", {"trim_beta": 0.2}),
                                         ("krum_lora", {"num_malicious_nodes": 1})])
def test_one_poisoned_client_moves_robust_aggregates_little(name, kwargs, poison,
                                                            flower_message_context):
    plain = shift("fedavg_lora", poison)
    robust = shift(name, poison, **kwargs)
    # FedAvg follows the attacker by about |poison| / 7 (several units here); the
    # robust aggregates stay within the honest clients' noise (0.01 per coordinate).
    assert plain > 5.0
    assert robust < 0.05
    assert robust < plain / 100


def test_robust_strategies_keep_the_reply_checks(flower_message_context):
    global_arrays, replies, _ = rounds_replies(lambda v: v * np.nan)
    strategy = build_strategy("fedmedian_lora", min_available_nodes=1)
    send(strategy, global_arrays, node_ids=range(1, len(replies) + 1))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients_rejected"] == 1 and metrics["clients_accepted"] == HONEST
    assert all(np.isfinite(v).all() for v in as_numpy(arrays).values())
    assert isinstance(strategy, FedAvgLoRA) and strategy.lora_train == "ab"


def test_robust_strategies_are_selected_by_config():
    cfg = load_config("configs/quickstart.yaml",
                      ["strategy.name=trimmed_avg_lora", "strategy.trim_beta=0.3"])
    from fl_server.loop import make_strategy
    strategy = make_strategy(cfg)
    assert type(strategy).__name__ == "TrimmedAvgLoRA" and strategy.beta == 0.3
    cfg = load_config("configs/quickstart.yaml",
                      ["strategy.name=krum_lora", "strategy.krum_malicious=2"])
    assert make_strategy(cfg).num_malicious_nodes == 2
