"""The per-process model cache (fl_client/model_cache.py): a client process builds a
workload's model once and resets it for every message, with the numbers of a fresh
build per message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_client import model_cache
from fl_server.rounds import run_federated
from models import get_workload
from tests.test_checkpoint import final_adapters, with_state_dir
from tests.test_server_rounds import LoopbackGrid
from tests.test_user_data_workloads import taco_cfg, tosc_cfg


def _three_rounds(cfg, root, reuse: bool, monkeypatch):
    """A 3-round in-process run (3 clients, 2 sampled per round: one process serves
    them all, as a Ray actor does); the global arrays, the rows and the builds."""
    model_cache.clear()
    workload = get_workload(cfg.workload)
    builds = []
    build = workload.build

    def counted(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(workload, "build", counted)
    cfg.simulation.reuse_models = reuse
    out = run_federated(with_state_dir(LoopbackGrid(3), root / "state"), cfg, root / "run")
    monkeypatch.setattr(workload, "build", build)
    arrays = final_adapters(root / "run")
    # Timings aside ("seconds", tosc's "teacher_seconds": the first run computes the
    # teacher's outputs, later ones read them from its store).
    rows = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in out["rounds"]]
    return arrays, rows, len(builds)


def _assert_same(a, b):
    (arrays_a, rows_a, _), (arrays_b, rows_b, _) = a, b
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)
    assert rows_a == rows_b


@pytest.mark.parametrize("strategy", ["fedavg_lora", "ffa_lora"])
def test_reused_mtsc_models_give_bit_identical_rounds(strategy, tiny_cfg, tmp_path,
                                                     flower_message_context, monkeypatch,
                                                     one_torch_thread):
    """ffa_lora trains only B (the A factors' requires_grad flips): a reused model must
    come back with every flag as built."""
    cfg = tiny_cfg
    cfg.rounds, cfg.fraction_train, cfg.strategy.name = 3, 0.67, strategy
    fresh = _three_rounds(cfg, tmp_path / "fresh", False, monkeypatch)
    reused = _three_rounds(cfg, tmp_path / "reused", True, monkeypatch)
    _assert_same(fresh, reused)
    # 2 trains + 3 evaluations a round without the cache; one model with it (and the
    # server's own build for the initial adapters in both).
    assert fresh[2] - reused[2] >= 10 and model_cache.cached_models() == 1


@pytest.mark.parametrize("workload", ["tosc", "taco"])
def test_reused_tosc_and_taco_models_give_bit_identical_rounds(workload, pretrained_dir,
                                                               tmp_path, monkeypatch,
                                                               flower_message_context,
                                                               one_torch_thread):
    source = ["data.num_samples=96"]
    make = tosc_cfg if workload == "tosc" else taco_cfg
    cfg = make(source, pretrained_dir / f"{workload}-cache-test.pt", tmp_path, "rounds=3",
               "num_clients=3", "fraction_train=0.67")
    fresh = _three_rounds(cfg, tmp_path / "fresh", False, monkeypatch)
    reused = _three_rounds(cfg, tmp_path / "reused", True, monkeypatch)
    _assert_same(fresh, reused)
    assert reused[2] < fresh[2]


def test_a_model_that_keeps_hooks_is_not_reused_and_dp_runs_are_never_cached():
    model_cache.clear()
    built = []

    def build():
        built.append(torch.nn.Linear(2, 2))
        return built[-1]

    key = model_cache.model_key("{}", 8, torch.device("cpu"))
    m = model_cache.checkout(key, build)
    with torch.no_grad():
        m.weight.add_(1.0)  # a message trains it ...
    m.weight.requires_grad_(False)
    m.eval()
    model_cache.checkin(m)
    again = model_cache.checkout(key, build)  # ... and the next one gets it back as built
    assert again is m and len(built) == 1
    assert torch.equal(again.weight, built[0].weight) and again.weight.requires_grad
    assert again.training
    again.register_forward_hook(lambda *a: None)  # e.g. Opacus's
    model_cache.checkin(again)
    assert model_cache.cached_models() == 0  # dropped: the next message builds anew
    assert model_cache.checkout(key, build) is not m and len(built) == 2
    assert model_cache.checkout(key, build, enabled=False) is not built[1]
