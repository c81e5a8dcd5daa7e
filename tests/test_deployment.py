"""The app on Flower's deployment engine: a SuperLink and two SuperNodes on loopback with
TLS and SuperNode authentication (certificates made by deploy.certs), every process
stopped by PID. A federated LoRA round submitted with `flwr run`, then the same run
continued from its checkpoint by a second `flwr run`, the clients resuming from their
node's own state-dir, on the fast path (`deploy.launch --fast`: a Flower run costs
half the time there). Flower's own SuperNode and SuperExec, as `deploy.launch` starts
them by default, answer our ClientApp in tests/test_hostile_server.py, and run a split
step among the long checks here (`make test-all`)."""

import os

import numpy as np
import pytest

from deploy.launch import Deployment

pytestmark = pytest.mark.engine  # real Flower or Ray processes (tests/conftest.py)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for good but still answers kill(0); its state is Z.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


LORA = "fraction_evaluate=0.5 min_train_clients=1 data.num_samples=160 train.batch_size=16"


def tls_deployment(tmp_path, fast: bool = False) -> Deployment:
    return Deployment(tmp_path / "deploy", num_supernodes=2, tls=True, auth=True,
                      state_dir=str(tmp_path / "state"), fast=fast)


def saved_rounds(tmp_path, run_dir) -> list[list[str]]:
    """The rounds each node kept its private tensors for, on its own disk."""
    return [sorted(p.name for p in (tmp_path / "state" / f"node-{node}" / run_dir.name)
                   .glob("partition-*/round-*.npz")) for node in (0, 1)]


@pytest.mark.timeout(600)
def test_federated_lora_on_supernodes_with_tls_resumed_from_its_checkpoint(tmp_path):
    dep = tls_deployment(tmp_path, fast=True)
    try:
        dep.start()
        pids = [p.pid for p in dep.procs.values()]
        superlink_cmd = open(f"/proc/{dep.procs['superlink'].pid}/cmdline").read()
        assert "--enable-supernode-auth" in superlink_cmd and "--ssl-certfile" in superlink_cmd
        listed = dep.flwr("supernode", "list", dep.connection)
        assert listed.stdout.count("online") == 2, listed.stdout
        # Round 1, then the same run resumed from its checkpoint for round 2 (a new
        # Flower run: the clients continue from their node's state-dir).
        first = dep.submit(f"rounds=1 {LORA}", tmp_path / "runs", timeout=300)
        (run_dir,) = (tmp_path / "runs").iterdir()
        metrics = dep.submit(f"rounds=2 {LORA}", tmp_path / "runs", resume=str(run_dir),
                             timeout=300)
    finally:
        dep.stop()
    assert first["status"] == "completed" and metrics["status"] == "completed"
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0] == first["rounds"][0]
    assert saved_rounds(tmp_path, run_dir) == [["round-1.npz", "round-2.npz"]] * 2
    assert all(r["clients_accepted"] == 2 and r["clients_rejected"] == 0 for r in rounds)
    assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
    assert all(np.isfinite(r["accuracy"]) for r in rounds)
    assert all(r["bytes_up"] == 49152 for r in rounds)
    assert not [pid for pid in pids if alive(pid)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_split_step_on_flowers_own_supernodes_with_tls(tmp_path):
    dep = tls_deployment(tmp_path)
    try:
        dep.start()
        pids = [p.pid for p in dep.procs.values()]
        # One split step per client: three exchanges (begin, output, backward).
        split = dep.submit("split.mode=parallel split.steps_per_round=1 rounds=1 "
                           "fraction_evaluate=0 min_train_clients=1 data.num_samples=160 "
                           "train.batch_size=16 split.client_timeout_s=200",
                           tmp_path / "split-runs", timeout=300)
    finally:
        dep.stop()
    assert split["status"] == "completed"
    (row,) = split["rounds"]
    assert row["split_steps"] == 2 and row["clients_accepted"] == 2
    assert row["clients_dropped"] == 0 and row["bytes_up_per_step"] > 0
    assert np.isfinite(row["train_loss"])
    assert not [pid for pid in pids if alive(pid)]
