"""`flwr run .` on Flower's local SuperLink (simulation runtime): the app as packaged.

Starts a real `flower-superlink` on loopback (via `flwr run`), waits for the run, checks
its metrics, and stops the SuperLink by PID. Project-local FLWR_HOME, free ports.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine  # real Flower or Ray processes (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlink_pids(flwr_home: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"{flwr_home}/local-superlink"],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.timeout(300)
def test_flwr_run_on_the_local_simulation_superlink(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    out_dir = tmp_path / "runs"
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ,
               FLWR_HOME=str(flwr_home),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # never reinstall torch
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    overrides = (f"rounds=1 data.num_samples=200 train.local_epochs=1 "
                 f"output_dir={out_dir}")
    try:
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "--run-config", f'overrides="{overrides}"',
             "--federation-config", "num-supernodes=2", "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        deadline = time.time() + 30
        runs = []
        while time.time() < deadline and not runs:
            runs = [p for p in out_dir.glob("*/metrics.json")
                    if json.loads(p.read_text())["status"] == "completed"]
            time.sleep(0.5)
        assert runs, log[-3000:]
        saved = json.loads(runs[0].read_text())
        assert [r["round"] for r in saved["rounds"]] == [1]
        assert saved["rounds"][0]["clients_accepted"] == 2
    finally:
        for pid in superlink_pids(flwr_home):
            try:
                os.killpg(pid, signal.SIGTERM)  # it runs in its own session
            except ProcessLookupError:
                pass
    gone_by = time.time() + 30  # SIGTERM: it shuts down its simulation first
    while superlink_pids(flwr_home) and time.time() < gone_by:
        time.sleep(0.5)
    assert superlink_pids(flwr_home) == []
