"""The fast path on Flower's deployment engine (deploy.fast_node): a SuperLink and a
SuperNode on loopback with TLS and SuperNode authentication, the SuperNode started by
`deploy.fast_node supernode` with the long-lived `deploy.fast_node executor` in place
of flower-superexec. Four split steps over it must give the parameters of end-to-end
training in one process (the equivalence contract of tests/test_split.py, same
tolerance), every ClientApp task must have run in the one executor process, and every
process is stopped by PID. Another Flower version is refused, by a real process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import config_from_dict
from deploy import fast_node
from deploy.launch import Deployment, threads_per_app
from fl_server import fast_pull
from models.mtsc import workload as mtsc
from models.mtsc.split import end_to_end_steps

pytestmark = pytest.mark.engine  # real Flower or Ray processes (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
# tests/test_split.py's split_cfg, as `key=value` overrides of configs/quickstart.yaml.
OVERRIDES = ["num_clients=1", "min_train_clients=1", "rounds=1", "fraction_evaluate=0",
             "data.num_samples=120", "train.batch_size=16", "train.weight_decay=0.01",
             "channel.model=tdl-d", "channel.snr_range_db=[0,20]", "split.mode=sequential",
             f"split.steps_per_round={STEPS}", "split.downlink.model=awgn",
             "split.downlink.snr_db=10", "split.client_timeout_s=120"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone but answers kill(0)
        return f.read().split(")")[-1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")


@pytest.mark.timeout(400)
def test_split_steps_through_the_fast_supernode_equal_end_to_end_training(
        tmp_path, monkeypatch, one_torch_thread):
    # One torch thread on the node as in this process (one_torch_thread, tests/conftest.py).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dep = Deployment(tmp_path / "deploy", num_supernodes=1, tls=True, auth=True,
                     state_dir=str(tmp_path / "state"), fast=True)
    try:
        dep.start()
        pids = {name: p.pid for name, p in dep.procs.items()}
        link, node, executor = (cmdline(pids[n]) for n in ("superlink", "supernode-0",
                                                            "superexec-0"))
        assert "--enable-supernode-auth" in link and "--ssl-certfile" in link
        assert "--database" not in link  # the fast path keeps the SuperLink's state in memory
        assert "deploy.fast_node supernode" in node and "--isolation process" in node
        assert "--auth-supernode-private-key" in node and "--root-certificates" in node
        assert "deploy.fast_node executor" in executor
        result = dep.submit(" ".join(OVERRIDES), tmp_path / "runs", timeout=300)
        executor_log = (dep.logs / "superexec-0.log").read_text()
    finally:
        dep.stop()
    assert not [n for n, pid in pids.items() if alive(pid)]

    assert result["status"] == "completed"
    (row,) = result["rounds"]
    assert row["split_steps"] == STEPS and row["clients_accepted"] == 1
    print(f"fast path: {row['seconds_per_message']:.3f} s per message, "
          f"{row['seconds_per_step']:.3f} s per step")
    # begin, then an output and a backward message per step: all in one process.
    tasks = re.findall(r"fast executor (\d+): task (\d+): pull", executor_log)
    assert {int(pid) for pid, _ in tasks} == {pids["superexec-0"]}
    assert len(tasks) == 1 + 2 * STEPS, executor_log[-3000:]

    cfg = config_from_dict(result["config"])  # the run's own config, as the ServerApp loaded it
    reference = end_to_end_steps(cfg, 0, 1, rnd=1, steps=STEPS)[0]
    ref = {n: p.detach().numpy() for n, p in reference.named_parameters()}
    (run_dir,) = (tmp_path / "runs").iterdir()
    (saved,) = (tmp_path / "state" / "node-0").glob("*/partition-0/round-1.npz")
    client, server = np.load(saved), np.load(run_dir / "server_half.npz")
    assert set(mtsc.client_parameters(reference)) <= set(client.files)
    compared = 0
    for name in mtsc.client_parameters(reference):
        np.testing.assert_allclose(client[name], ref[name], rtol=0, atol=1e-5, err_msg=name)
        compared += 1
    for name in server.files:
        np.testing.assert_allclose(server[name], ref[f"receiver.{name}"], rtol=0, atol=1e-5,
                                   err_msg=name)
        compared += 1
    initial = {n: p.detach().numpy() for n, p in mtsc.build(cfg).named_parameters()}
    moved = [n for n in mtsc.client_parameters(reference)
             if not np.allclose(client[n], initial[n], atol=1e-6)]
    assert len(moved) > 0.5 * len(client.files), "the steps barely trained anything"
    assert compared > 50


def test_another_flower_version_is_refused_by_both_commands_and_the_launcher(tmp_path,
                                                                            monkeypatch):
    # A real process that finds flwr 1.42.0 installed (a distribution record first on
    # its path): it must stop before touching Flower, naming both versions.
    fake = tmp_path / "site" / "flwr-1.42.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: flwr\nVersion: 1.42.0\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT}")
    for command in (["supernode", "--superlink", "127.0.0.1:1", "--insecure"],
                    ["executor", "--runtime-api-address", "127.0.0.1:1", "--insecure"]):
        out = subprocess.run([sys.executable, "-m", "deploy.fast_node", *command], env=env,
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 3, out.stderr
        assert "flwr 1.42.0 is installed" in out.stderr and "flwr==1.41.0" in out.stderr
    assert fast_node.installed_flower_version() == fast_node.SUPPORTED_FLOWER
    with pytest.raises(fast_node.FlowerVersionError, match="1.42.0"):
        fast_node.require_supported_flower("1.42.0")
    # The launcher refuses before it starts anything; the ServerApp keeps Flower's pulls.
    monkeypatch.setenv(fast_pull.FAST_SERVER_ENV, "1")
    monkeypatch.setattr(fast_node, "installed_flower_version", lambda: "1.42.0")
    monkeypatch.setattr(fast_pull, "installed_flower_version", lambda: "1.42.0")
    with pytest.raises(fast_node.FlowerVersionError, match="1.42.0"):
        Deployment(tmp_path / "deploy", num_supernodes=1, fast=True)
    assert not fast_pull.shorten_reply_pulls()
    assert not (tmp_path / "deploy").exists()


def test_the_supernode_pulls_often_only_while_messages_flow(monkeypatch):
    slept = []
    monkeypatch.setattr(fast_node.time, "sleep", slept.append)
    clock = fast_node.NodeClock(poll_s=0.02)
    clock.sleep(3)  # no message yet: Flower's idle pace
    assert slept == [3]
    clock.message_arrived()  # a run is exchanging messages
    for _ in range(fast_node.FLAT_POLLS):
        clock.sleep(3)
    assert slept[1:] == [0.02] * fast_node.FLAT_POLLS
    clock.sleep(3)
    assert slept[-1] == pytest.approx(0.02 * fast_node.BACKOFF_GROWTH)
    clock.sleep(0.5)  # waiting for the ClientApp's reply in the node's own state
    assert slept[-1] == 0.002
    for _ in range(30):  # idle again: back at Flower's pace, never slower
        clock.sleep(3)
    assert slept[-1] == 3 and max(slept) == 3 and sum(slept[-30:]) < 70
    assert clock.monotonic is fast_node.time.monotonic  # the rest of `time` is Flower's


def test_the_launcher_shares_the_cores_and_puts_the_superlink_state_where_asked(tmp_path,
                                                                               monkeypatch):
    # Torch threads per app: a ServerApp and N ClientApps share the machine's cores.
    assert [threads_per_app(n, cpus=c) for n, c in ((2, 2), (2, 16), (1, 1), (7, 4))] == \
        [1, 5, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    stock = Deployment(tmp_path / "a", num_supernodes=2)
    assert stock.env()["OMP_NUM_THREADS"] == str(threads_per_app(2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert stock.env()["OMP_NUM_THREADS"] == "3"
    # The SuperLink's state: SQLite under the workdir by default, memory on the fast path
    # unless asked otherwise; anything else is refused, naming the value.
    db = str(tmp_path / "a" / "superlink.db")
    assert stock.superlink_command()[-3:] == ["--database", db, "--enable-supernode-auth"]
    assert "--database" not in Deployment(tmp_path / "b", fast=True).superlink_command()
    assert "--database" in Deployment(tmp_path / "c", fast=True,
                                      superlink_state="file").superlink_command()
    with pytest.raises(ValueError, match="superlink_state='disk'"):
        Deployment(tmp_path / "d", superlink_state="disk")
