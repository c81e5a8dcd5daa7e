"""The simulation on an existing Ray cluster: a head and a second node started with
`ray start` on 127.0.0.1 (separate temp dirs, free ports, one CPU each), the run joining
it through RAY_ADDRESS, 3 clients x 2 rounds. The clients must have run on both nodes.
Every process the test started (the two `ray start --block` and everything they spawned,
found by their session) is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.config import load_config
from fl_client.client_app import make_app
from simulation.run import ray_address, simulate

pytestmark = pytest.mark.engine  # real Flower or Ray processes (tests/conftest.py)

RAY = str(Path(sys.executable).parent / "ray")
WORKER_PORTS = 40  # the span of each node's worker-port range
TAKEN_PORTS: set[int] = set()  # every port a node of this module was given


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RayNode:
    """`ray start --block` in its own session: it and every Ray process it starts
    (GCS, raylet, workers) share that session, which is how the test finds them."""

    def __init__(self, temp_dir: str, head_port: int | None = None,
                 address: str | None = None):
        # Ray refuses to start when one of its ports lies in its worker-port range (seen:
        # the metrics port drawn inside it), so the ports are drawn again until none
        # lies in that range or in anything an earlier node of this test took.
        for _ in range(500):
            (node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics,
             client_server, min_worker) = free_ports(8)
            single = {node_manager, object_manager, agent_http, agent_grpc, runtime_env,
                      metrics, client_server, head_port or 0}
            workers = set(range(min_worker, min_worker + WORKER_PORTS + 1))
            if not (single & workers or (single | workers) & TAKEN_PORTS):
                TAKEN_PORTS.update(single | workers)
                break
        else:
            raise RuntimeError("no worker-port range clear of the other Ray ports in 500 draws")
        args = [RAY, "start", "--block", "--num-cpus=1", "--num-gpus=0",
                "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                f"--min-worker-port={min_worker}",
                f"--max-worker-port={min_worker + WORKER_PORTS}"]
        if head_port is not None:
            args += ["--head", f"--port={head_port}", f"--ray-client-server-port={client_server}",
                     "--include-dashboard=false"]
        else:
            args += [f"--address={address}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.log = open(Path(temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def pids(self) -> list[int]:
        """Every live process of this node's session: `ray start` and all that Ray
        started below it (GCS, raylet, agents, workers; none of them leaves the session)."""
        return [pid for pid in all_pids() if session_of(pid) == self.proc.pid]

    def stop(self) -> list[int]:
        """SIGTERM to each process by PID, SIGKILL to what is left after 20 s; returns
        the PIDs still alive after that (none expected)."""
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                self.proc.poll()  # reap `ray start`, our child
                time.sleep(0.2)
        self.proc.wait(timeout=10)
        self.log.close()
        return self.pids()


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def session_of(pid: int) -> int | None:
    """Field 6 of /proc/PID/stat (None once the process is gone). A zombie keeps its
    entry until reaped, so it counts as gone here."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[3])


def wait_for_nodes(address: str, count: int, timeout: float = 180) -> list[str]:
    """The ids of the cluster's live nodes once there are `count` (a probe process, so
    that this one holds no Ray connection when the run starts). A probe that hangs
    (ray.init can wait on a head still starting, seen once on a loaded machine) is
    killed and the next one tries, until the deadline."""
    probe = ("import ray, json; ray.init(address=%r, log_to_driver=False); "
             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address)
    deadline = time.monotonic() + timeout
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    while time.monotonic() < deadline:
        try:
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                 text=True, env=env, timeout=45)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0:
            nodes = json.loads(out.stdout.strip().splitlines()[-1])
            if len(nodes) >= count:
                return nodes
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes")


def test_address_from_the_config_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert ray_address(load_config("configs/quickstart.yaml", [])) == "10.0.0.9:6379"
    cfg = load_config("configs/quickstart.yaml", ["simulation.ray_address=10.0.0.5:7000"])
    assert ray_address(cfg) == "10.0.0.5:7000"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address(load_config("configs/quickstart.yaml", [])) is None


@pytest.mark.slow  # a long end-to-end check (make test-all); make test keeps tests/test_simulation.py
@pytest.mark.timeout(300)
def test_three_clients_train_on_a_two_node_ray_cluster(tmp_path, monkeypatch):
    # Short paths: Ray's sockets live under its temp dir (a Unix socket path is short).
    head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    where = tmp_path / "actors"
    where.mkdir()

    def note_node(msg, context, call_next):
        # Inside the client actor: which Ray node runs this ClientApp call.
        import ray

        (where / f"{os.getpid()}-{ray.get_runtime_context().get_node_id()}").touch()
        return call_next(msg, context)

    try:
        nodes.append(RayNode(head_dir, head_port=port))
        nodes.append(RayNode(worker_dir, address=address))
        node_ids = wait_for_nodes(address, 2)
        monkeypatch.setenv("RAY_ADDRESS", address)
        cfg = load_config("configs/quickstart.yaml", [
            "num_clients=3", "rounds=2", "data.num_samples=240", "train.local_epochs=1",
            "simulation.num_cpus_per_client=1", f"output_dir={tmp_path}",
        ])
        results = simulate(cfg, tmp_path / "run", client_app=make_app(mods=[note_node]))
        rounds = results["rounds"]
        assert results["status"] == "completed"
        assert [r["clients_accepted"] for r in rounds] == [3, 3]
        assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
        used = {p.name.split("-", 1)[1] for p in where.iterdir()}
        assert used == set(node_ids), (used, node_ids)  # both nodes ran clients
    finally:
        left = {n.proc.pid: n.stop() for n in nodes}
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
    assert all(not pids for pids in left.values()), left
