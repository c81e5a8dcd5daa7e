"""A client restored from a run folder (reports/runs.py, `restore_client`) is the client
that ended the run: the same parameters and batch-norm statistics, bit for bit, and so
the same evaluation outputs."""

import copy

import numpy as np
import pytest
import torch
from test_server_rounds import LoopbackGrid

from common.config import config_from_dict, load_config
from fl_server.rounds import run_federated
from models.client_state import local_parameters
from models.mtsc import workload as mtsc
from models.taco import task
from models.taco import workload as taco
from reports.runs import RunFolderError, restore_client


@pytest.fixture
def taco_with_batchnorm(monkeypatch):
    """TACO's task models with BatchNorm in place of GroupNorm: running statistics that a
    client learns from its data and keeps as buffers, not parameters."""
    monkeypatch.setattr(task, "norm_layer", lambda channels: torch.nn.BatchNorm2d(channels))


def tiny_taco_cfg(pretrained_dir, tmp_path, run_dir, *extra):
    """A 2-client TACO run on a tiny codec (one pre-trained file per test run), its
    clients' state kept in the run folder as `python -m simulation` keeps it."""
    return load_config("configs/taco_quickstart.yaml", [
        "num_clients=2", "data.num_samples=160", "train.local_epochs=1",
        "taco.eval_images=3", "taco.codec.public_samples=32", "taco.codec.epochs=1",
        f"taco.codec.checkpoint={pretrained_dir / 'codec-tiny.pt'}", f"output_dir={tmp_path}",
        f"client_state_dir={run_dir / 'client-state'}", *extra])


def _equal_models(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_a_restored_taco_client_evaluates_bit_for_bit_as_it_ended_the_run(
        taco_with_batchnorm, flower_message_context, tmp_path, pretrained_dir, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = tiny_taco_cfg(pretrained_dir, tmp_path, run_dir, "rounds=2")
    # The client as it evaluates the final global state in the run's last round.
    seen: dict[int, torch.nn.Module] = {}
    tests = [taco.load_data(cfg, pid, cfg.num_clients)[1] for pid in range(cfg.num_clients)]
    evaluate = taco.evaluate

    def keep_the_evaluated_client(model, data, c):
        pid = next(p for p, t in enumerate(tests)
                   if torch.equal(t.tensors["image"], data.tensors["image"]))
        seen[pid] = copy.deepcopy(model).eval()
        return evaluate(model, data, c)

    monkeypatch.setattr(taco, "evaluate", keep_the_evaluated_client)
    run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
    assert sorted(seen) == [0, 1]

    fresh = taco.build(cfg).eval()
    for pid, ended in seen.items():
        stats = {k for k, v in ended.named_buffers() if "running_mean" in k}
        assert stats, "the task models should hold batch-norm statistics"
        # The statistics moved in training: restoring without buffers would be caught.
        moved = {k for k in stats if not torch.equal(ended.state_dict()[k], fresh.state_dict()[k])}
        assert moved == stats

        restored = restore_client(cfg, run_dir, pid)
        assert not restored.training
        assert _equal_models(restored, ended) == []
        images = tests[pid].tensors["image"][:8]
        with torch.no_grad():
            for part in ("classifier", "segmenter"):
                assert torch.equal(getattr(restored, part)(images), getattr(ended, part)(images))
            assert torch.equal(restored.codec.indices(images), ended.codec.indices(images))
        torch.manual_seed(0)
        again = evaluate(restored, tests[pid], cfg)
        torch.manual_seed(0)
        assert again == evaluate(ended, tests[pid], cfg)


def test_a_restored_mtsc_client_holds_its_saved_tensors_under_the_final_adapters(
        tmp_path, tiny_cfg, flower_message_context):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(tiny_cfg.to_dict(), {"client_state_dir": str(run_dir / "state")})
    run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
    restored = restore_client(cfg, run_dir, 1)
    (saved_file,) = (run_dir / "state").glob(f"*/partition-1/round-{cfg.rounds}.npz")
    saved, final = np.load(saved_file), np.load(run_dir / "global_adapters.npz")
    shared = mtsc.shared_state(restored)
    assert set(shared) == set(final.files)
    assert all(np.array_equal(shared[k], final[k]) for k in final.files)
    kept = local_parameters(restored)
    private = [k for k in saved.files if "lora_" not in k]
    assert len(private) > 20
    assert all(np.array_equal(kept[k].detach().numpy(), saved[k]) for k in private)


def test_restoring_a_client_without_its_saved_state_names_the_folder(tmp_path, tiny_cfg,
                                                                   flower_message_context):
    run_dir = tmp_path / "run"
    run_federated(LoopbackGrid(tiny_cfg.num_clients), tiny_cfg, run_dir)  # no state dir
    assert np.load(run_dir / "global_adapters.npz").files
    with pytest.raises(RunFolderError, match="partition 1: no saved private state under"):
        restore_client(tiny_cfg, run_dir, 1)
    with pytest.raises(RunFolderError, match="no metrics.json"):
        restore_client(tiny_cfg, tmp_path / "elsewhere", 0)
