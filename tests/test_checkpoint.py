"""Checkpoint / resume: the file format, atomic saves, and a run interrupted after
round k and resumed that ends with the same adapters as an uninterrupted run."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from test_server_rounds import LoopbackGrid

from common.config import ConfigError
from fl_server.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from fl_server.rounds import run_federated


def record(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return ArrayRecord({"b.lora_B.weight": Array(rng.standard_normal((3, 2)).astype(dtype)),
                        "a.lora_A.weight": Array(rng.standard_normal((2, 5)).astype(dtype))})


def test_a_checkpoint_holds_named_records_state_and_metrics(tmp_path):
    rows = [{"round": 1, "train_loss": 2.5}]
    save_checkpoint(tmp_path, 1, {"global": record(0), "server_half": record(1, np.float64)},
                    strategy_state={"name": "x", "python_random": [3, [1, 2], None]},
                    metrics=rows, config={"rounds": 3})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.metrics == rows and ckpt.config == {"rounds": 3}
    assert ckpt.strategy_state["python_random"] == [3, [1, 2], None]
    for name, seed, dtype in (("global", 0, np.float32), ("server_half", 1, np.float64)):
        want = record(seed, dtype)
        assert list(ckpt.arrays[name].keys()) == list(want.keys())  # order kept
        for k in want:
            got = ckpt.arrays[name][k].numpy()
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, want[k].numpy())


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"global": record(0)})

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"global": record(1)})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1
    np.testing.assert_array_equal(ckpt.arrays["global"]["a.lora_A.weight"].numpy(),
                                  record(0)["a.lora_A.weight"].numpy())


def test_an_unreadable_checkpoint_is_reported(tmp_path):
    checkpoint_path(tmp_path).write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "empty") is None


def with_state_dir(grid, state_dir):
    for ctx in grid.contexts.values():
        ctx.node_config["state-dir"] = str(state_dir)
    return grid


def interrupt_before_round(grid, rnd):
    """The server dies when it opens round `rnd`: federated training ("train") or
    split training ("train.split_begin")."""
    real = grid.send_and_receive

    def failing(messages, *, timeout=None):
        if any(m.metadata.message_type in ("train", "train.split_begin")
               and int(m.content["config"]["server-round"]) == rnd for m in messages):
            raise KeyboardInterrupt("server stopped")
        return real(messages, timeout=timeout)

    grid.send_and_receive = failing
    return grid


def saved_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def final_adapters(run_dir):
    return saved_npz(run_dir / "global_adapters.npz")


def test_an_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(
        tiny_cfg, flower_message_context, tmp_path):
    cfg = tiny_cfg
    cfg.rounds, cfg.fraction_train = 3, 0.67  # 2 of 3 clients per round: sampling matters
    full = run_federated(with_state_dir(LoopbackGrid(3), tmp_path / "state-a"), cfg,
                         tmp_path / "full")

    run_dir = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        run_federated(interrupt_before_round(
            with_state_dir(LoopbackGrid(3), tmp_path / "state-b"), 3), cfg, run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["status"] == "failed" and len(saved["rounds"]) == 2
    assert load_checkpoint(run_dir).round == 2
    # A resumed run is a new Flower run: every node starts with an empty context.
    resumed = run_federated(with_state_dir(LoopbackGrid(3), tmp_path / "state-b"), cfg,
                            run_dir, resume=True)

    assert resumed["status"] == "completed" and [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    a, b = final_adapters(tmp_path / "full"), final_adapters(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for ra, rb in zip(full["rounds"], resumed["rounds"]):
        assert {k: v for k, v in ra.items() if k != "seconds"} == \
               {k: v for k, v in rb.items() if k != "seconds"}

    # Without the clients' saved private tensors the resumed run does not match:
    # the test above is sensitive to what the clients keep.
    other = tmp_path / "parts-nostate"
    with pytest.raises(KeyboardInterrupt):
        run_federated(interrupt_before_round(LoopbackGrid(3), 3), cfg, other)
    run_federated(LoopbackGrid(3), cfg, other, resume=True)
    c = final_adapters(other)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_resume_refuses_another_config(tiny_cfg, flower_message_context, tmp_path):
    save_checkpoint(tmp_path, 1, {"global": record(0)}, {"python_random": [3, [], None]},
                    [], tiny_cfg.to_dict())
    saved_seed, tiny_cfg.seed = tiny_cfg.seed, tiny_cfg.seed + 7
    with pytest.raises(ConfigError, match=f"seed: checkpoint {saved_seed}, now {tiny_cfg.seed}"):
        run_federated(LoopbackGrid(3), tiny_cfg, tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_federated(LoopbackGrid(3), tiny_cfg, tmp_path / "nothing", resume=True)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_a_split_run_interrupted_and_resumed_ends_where_an_uninterrupted_one_does(
        tiny_cfg, flower_message_context, tmp_path, mode):
    cfg = tiny_cfg
    cfg.rounds, cfg.split.mode, cfg.split.steps_per_round = 3, mode, 2
    full = run_federated(with_state_dir(LoopbackGrid(3), tmp_path / "state-a"), cfg,
                         tmp_path / "full")

    run_dir = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        run_federated(interrupt_before_round(
            with_state_dir(LoopbackGrid(3), tmp_path / "state-b"), 3), cfg, run_dir)
    ckpt = load_checkpoint(run_dir)
    assert ckpt.round == 2 and set(ckpt.arrays) == {"global", "server_half", "server_optimizer"}
    # In sequential mode one server half trains all round long: its AdamW moments
    # carry over rounds and must be in the checkpoint (parallel: fresh copies each round).
    assert (len(ckpt.arrays["server_optimizer"]) > 0) == (mode == "sequential")
    resumed = run_federated(with_state_dir(LoopbackGrid(3), tmp_path / "state-b"), cfg,
                            run_dir, resume=True)

    assert resumed["status"] == "completed" and [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    for name in ("global_adapters.npz", "server_half.npz"):
        a, b = saved_npz(tmp_path / "full" / name), saved_npz(run_dir / name)
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
    volatile = ("seconds", "seconds_per_step", "seconds_per_message")
    for ra, rb in zip(full["rounds"], resumed["rounds"]):
        assert {k: v for k, v in ra.items() if k not in volatile} == \
               {k: v for k, v in rb.items() if k not in volatile}

    # Without the clients' saved halves the resumed run ends elsewhere: the test is
    # sensitive to what the clients keep on their disks.
    other = tmp_path / "parts-nostate"
    with pytest.raises(KeyboardInterrupt):
        run_federated(interrupt_before_round(LoopbackGrid(3), 3), cfg, other)
    run_federated(LoopbackGrid(3), cfg, other, resume=True)
    a, c = saved_npz(tmp_path / "full" / "server_half.npz"), saved_npz(other / "server_half.npz")
    assert any(not np.array_equal(a[k], c[k]) for k in a)
